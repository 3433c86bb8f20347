"""Stage `evaluate`: the shipped ONNX model against count-based baselines on the test split.

    models/model.onnx                  the exported model, run with onnxruntime (rnnlm.inference)
    data/processed/{train,test}.npy, vocab.json
    metrics/train.json                 PyTorch test perplexity
    metrics/train_run.json             the MLflow run id
    metrics/export_model.json          the registered model version export created
      -> metrics/eval.json             perplexities (RNN via ONNX alone, with its continuous
                                       cache, with cache and n-gram as `rnnlm score` scores;
                                       Kneser-Ney, unigram), the RNN's improvement over
                                       Kneser-Ney, the test OOV rate
      -> metrics/samples.txt           generated text: fixed seed, the prompts from params
      -> MLflow                        the same metrics and both files, in the training run;
                                       the registered version's test_ppl and scored_test_ppl
                                       tags, and the alias @champion moved to it when it
                                       serves better than the champion

The RNN's test perplexity `headline/test_ppl` is that of the shipped network: the ONNX model via
`LanguageModel.logprobs_and_hidden` (the network alone), over the whole test stream with the
state carried. It must agree with the PyTorch test perplexity of the `train` stage within
`evaluate.tolerance` (relative), or the stage fails: a gap means the exported graph or the
inference code is not the model that was trained. It becomes the registered version's
`test_ppl` tag. `headline/cache_test_ppl` is the same stream with the continuous cache the
export stage tuned on validation (rnnlm.cache; equal to `headline/test_ppl` when the model
carries none), and `headline/scored_test_ppl` what `rnnlm score` gives: with the cache and then
the Kneser-Ney n-gram the model carries (rnnlm.ngram, weight `test/ngram_weight`; equal to the
cache's figure when it carries none). It becomes the version's `scored_test_ppl` tag, which
the @champion alias ranks versions by: what each one serves. All three come from that one pass
of the network: its log-probs and hidden vectors are mixed with the cache
(`cache.mix_stream`), then the n-gram (`LanguageModel.new_ngram`), as
`LanguageModel.token_nlls` mixes them. When
`train.eval_batch_size` > 1 the PyTorch figure was computed over that many parallel rows (each
from a zero state, the tail dropped), so the check scores the ONNX model in the same layout;
eval.json always reports the whole-stream figure.

The baselines (rnnlm.ngram) use the same split, vocabulary and convention: add-one unigram
and interpolated Kneser-Ney of order `export.ngram_order` with `export.ngram_discount` (the
n-gram the model mixes in, counted again: the same counts give the same model), counts from
train.npy only. `headline/improvement_over_kn_pct` is 100 * (1 - RNN / KN perplexity), the
network alone against Kneser-Ney alone; `test/oov_rate` is defined as in the tokenize stage's
stats.json: the share of word tokens (`<eos>` excluded) that are `<unk>`. The `headline/`
metrics are what runs are compared by: MLflow's chart view shows their section first (train
adds `headline/val_ppl`).

Run via `dvc repro evaluate`, or directly: `python -m rnnlm.evaluate [--params params.yaml]`.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rnnlm import ngram, tracking
from rnnlm.cache import mix_stream
from rnnlm.config import (
    EvaluateParams,
    MlflowParams,
    Params,
    Paths,
)
from rnnlm.errors import RnnlmError, short_repr
from rnnlm.files import (
    read_json,
    staged_files,
    write_json_atomic,
    write_text_atomic,
)
from rnnlm.inference import LanguageModel, ModelLoadError, token_nll
from rnnlm.processed import read_split, read_vocab
from rnnlm.stage import stage_main
from rnnlm.streams import batchify, lm_pairs, split_stats

log = logging.getLogger(__name__)

ARTIFACT_DIR = "evaluation"  # folder of the MLflow run's artifacts


class EvaluateError(RnnlmError):
    """Inputs are missing or inconsistent, or the ONNX model disagrees with PyTorch."""


def relative_difference(value: float, reference: float) -> float:
    """|value - reference| / reference."""
    return abs(value - reference) / reference


def check_agreement(onnx_ppl: float, torch_ppl: float, tolerance: float) -> float:
    """Relative difference of the two test perplexities; EvaluateError beyond `tolerance`."""
    diff = relative_difference(onnx_ppl, torch_ppl)
    if not diff <= tolerance:  # also catches NaN
        raise EvaluateError(
            f"the ONNX model's test perplexity {onnx_ppl:.4f} differs from PyTorch's "
            f"{torch_ppl:.4f} (metrics/train.json) by {100 * diff:.3f}% > evaluate.tolerance = "
            f"{100 * tolerance:g}%: the exported model is not the trained one (re-run export "
            "after train, and check the export parity metrics)"
        )
    return diff


def improvement_pct(ppl: float, baseline_ppl: float) -> float:
    """How much lower `ppl` is than `baseline_ppl`, in percent of the baseline."""
    return 100.0 * (1.0 - ppl / baseline_ppl)


def score_rows(lm: LanguageModel, stream: np.ndarray, n_rows: int, window: int = 256) -> float:
    """Perplexity of `stream` laid out as training's evaluation does with `n_rows` rows.

    Inputs and targets (`streams.lm_pairs`) are cut into `n_rows` contiguous rows
    (`streams.batchify`: the last len % n_rows tokens dropped), each row starting from a zero
    state and walked in windows with its state carried.
    """
    try:
        inputs, targets = (batchify(a, n_rows) for a in lm_pairs(stream))
    except ValueError as err:
        raise EvaluateError(f"the test split: {err}") from None
    length = inputs.shape[1]
    state = lm.initial_state(n_rows)
    nll = 0.0
    for start in range(0, length, window):
        logits, state = lm.step(inputs[:, start : start + window], state)
        # logits (rows, time, vocab) -> (rows * time, vocab) to match the flattened targets.
        chunk = targets[:, start : start + window]
        nll += float(token_nll(logits.reshape(-1, logits.shape[-1]), chunk.reshape(-1)).sum())
    return math.exp(nll / targets.size)


def generate_samples(lm: LanguageModel, p: EvaluateParams) -> dict[str, list[str]]:
    """Prompt name -> `p.samples_per_prompt` continuations of it (same seed for each prompt)."""
    return {
        name: lm.generate(
            prompt,
            max_tokens=p.sample_tokens,
            temperature=p.sample_temperature,
            seed=p.sample_seed,
            num_samples=p.samples_per_prompt,
        )
        for name, prompt in p.sample_prompts.items()
    }


def format_samples(
    samples: Mapping[str, Sequence[str]], prompts: Mapping[str, str], header: str
) -> str:
    """The samples file: a header line, then per prompt its name, text and numbered samples."""
    lines = [header]
    for name, texts in samples.items():
        lines += ["", f"## {name}: {prompts[name]!r}"]
        lines += [f"{i}. {text}" for i, text in enumerate(texts, start=1)]
    return "\n".join(lines) + "\n"


def read_train_test_ppl(paths: Paths) -> float:
    """The PyTorch test perplexity of the best checkpoint, from metrics/train.json."""
    path = paths.train_metrics
    try:
        train = read_json(path)
    except (FileNotFoundError, ValueError) as err:
        raise EvaluateError(str(err)) from None
    value = train.get("test_ppl") if isinstance(train, dict) else None
    if not isinstance(value, int | float) or isinstance(value, bool):
        raise EvaluateError(f"{path}: no test_ppl (run the train stage first)")
    return float(value)


def read_registered_version(paths: Paths) -> tuple[str, str] | None:
    """(registered model name, version) the export stage created; None when not registered."""
    path = paths.export_model
    try:
        record = read_json(path)
    except (FileNotFoundError, ValueError) as err:
        raise EvaluateError(str(err)) from None
    if not isinstance(record, dict):
        raise EvaluateError(f"{path}: expected a JSON object (run the export stage first)")
    name, version = record.get("registered_model"), record.get("registered_version")
    if name is None and version is None:
        return None
    if not isinstance(name, str) or not isinstance(version, str):
        raise EvaluateError(
            f"{path}: registered_model = {short_repr(name)}, registered_version = "
            f"{short_repr(version)}: "
            "expected two strings (run the export stage again)"
        )
    return name, version


def load_model(path: Path, vocab: Sequence[str]) -> LanguageModel:
    """The exported model; EvaluateError unless it exists and has the processed vocabulary."""
    if not path.is_file():
        raise EvaluateError(f"{path}: ONNX model not found (run the export stage first)")
    try:
        lm = LanguageModel(path)
    except ModelLoadError as err:
        raise EvaluateError(str(err)) from None
    if lm.vocab != list(vocab):
        raise EvaluateError(
            f"{path}: its vocabulary ({lm.vocab_size} tokens) is not data/processed/vocab.json "
            f"({len(vocab)} tokens): the model comes from another run of the pipeline"
        )
    return lm


def run(
    p: EvaluateParams,
    paths: Paths,
    ml: MlflowParams,
    kn_order: int,
    kn_discount: ngram.Discount,
    eval_batch_size: int = 1,
) -> dict[str, Any]:
    """Score the ONNX model and the baselines on the test split; write, log and return metrics.

    Args:
        kn_order, kn_discount: the Kneser-Ney baseline's (`export.ngram_order`, `_discount`).
        eval_batch_size: `train.eval_batch_size`, the row layout of the PyTorch test figure.
    """
    vocab = read_vocab(paths)
    train, test = (read_split(paths, split, len(vocab)) for split in ("train", "test"))
    torch_ppl = read_train_test_ppl(paths)
    lm = load_model(paths.onnx_model, vocab)
    run_id = tracking.read_run_id(paths.train_run)
    registered = read_registered_version(paths)
    tracked = tracking.attach_run(ml, run_id)  # an unusable store fails before the work

    start = time.perf_counter()
    network_logp, hidden = lm.logprobs_and_hidden(test)
    rnn_ppl = ngram.perplexity(network_logp)
    seconds = {"rnn": time.perf_counter() - start}
    comparable = rnn_ppl if eval_batch_size == 1 else score_rows(lm, test, eval_batch_size)
    rel_diff = check_agreement(comparable, torch_ppl, p.tolerance)
    start = time.perf_counter()
    cached_logp = mix_stream(lm.cache, network_logp, hidden, test)
    mixer = lm.new_ngram()  # then the n-gram, as `rnnlm score` scores
    scored_logp = cached_logp if mixer is None else mixer.mix(cached_logp, test)
    cached_ppl, scored_ppl = ngram.perplexity(cached_logp), ngram.perplexity(scored_logp)
    seconds["mixture"] = time.perf_counter() - start
    start = time.perf_counter()
    kn = ngram.fit_kneser_ney(train, len(vocab), kn_order, kn_discount)
    kn_ppl = ngram.perplexity(kn.logprobs(test))
    seconds["kn"] = time.perf_counter() - start
    unigram_ppl = ngram.perplexity(
        ngram.unigram_logprobs(ngram.fit_unigram(train, len(vocab)), test)
    )
    metrics: dict[str, Any] = {
        "headline/test_ppl": round(rnn_ppl, 4),
        "headline/cache_test_ppl": round(cached_ppl, 4),
        "headline/scored_test_ppl": round(scored_ppl, 4),
        "test/pytorch_ppl": torch_ppl,
        "test/onnx_pytorch_rel_diff": float(f"{rel_diff:.3g}"),
        "headline/kn_test_ppl": round(kn_ppl, 4),
        "headline/unigram_test_ppl": round(unigram_ppl, 4),
        "headline/improvement_over_kn_pct": round(improvement_pct(rnn_ppl, kn_ppl), 4),
        "test/ngram_weight": lm.ngram.weight if lm.ngram else 0.0,
        "test/oov_rate": split_stats(test, n_docs=0)["oov_rate"],
        "test/tokens": len(test),
    }
    write_outputs(paths, metrics, generate_samples(lm, p), p, run_id)
    log_evaluation(tracked, paths, metrics, kn.discounts)
    if registered is not None:
        name, version = registered
        description = (
            f"{lm.cell} {lm.hidden_dim}x{lm.num_layers}: test perplexity {scored_ppl:.2f} as "
            f"served (the network alone {rnn_ppl:.2f}, Kneser-Ney {kn_order}-gram "
            f"{kn_ppl:.2f}); MLflow run {run_id}"
        )
        tracking.record_test_perplexity(tracked, name, version, rnn_ppl, scored_ppl, description)
    log.info(
        "test perplexity: RNN (ONNX) %.2f [%.1fs; PyTorch %.2f, %.2g%% apart], with its cache "
        "(%s) %.2f, with cache and n-gram (%s: what rnnlm score gives) %.2f [both %.1fs]; "
        "Kneser-Ney order %d %.2f [%.1fs], unigram %.2f; RNN vs KN %+.1f%%; OOV %.2f%%",
        rnn_ppl,
        seconds["rnn"],
        torch_ppl,
        100 * rel_diff,
        lm.cache or "off",
        cached_ppl,
        lm.ngram or "off",
        scored_ppl,
        seconds["mixture"],
        kn_order,
        kn_ppl,
        seconds["kn"],
        unigram_ppl,
        -metrics["headline/improvement_over_kn_pct"],
        100 * metrics["test/oov_rate"],
    )
    return metrics


def write_outputs(
    paths: Paths,
    metrics: Mapping[str, Any],
    samples: Mapping[str, Sequence[str]],
    p: EvaluateParams,
    run_id: str,
) -> None:
    """metrics/eval.json and metrics/samples.txt, together or not at all."""
    header = (
        f"# {len(samples)} prompt(s) x {p.samples_per_prompt} sample(s) of {p.sample_tokens} "
        f"tokens from {paths.onnx_model.name} (MLflow run {run_id}), seed {p.sample_seed}, "
        f"temperature {p.sample_temperature:g}"
    )
    with staged_files(paths.metrics_dir) as staged:
        write_json_atomic(staged / paths.eval_metrics.name, metrics)
        write_text_atomic(
            staged / paths.samples.name, format_samples(samples, p.sample_prompts, header)
        )


def log_evaluation(
    tracked: tracking.TrackedRun,
    paths: Paths,
    metrics: Mapping[str, Any],
    kn_discounts: Mapping[int, Sequence[float]],
) -> None:
    """The metrics, the Kneser-Ney discounts estimated per order (its order and discount
    rule are export params of the run) and both output files, in the training run."""
    tracked.log_metrics(metrics)
    tracked.set_tags(
        {
            "evaluate.kn_discounts": str(
                {n: [round(d, 4) for d in ds] for n, ds in kn_discounts.items()}
            ),
        }
    )
    tracked.log_artifact(paths.eval_metrics, ARTIFACT_DIR)
    tracked.log_artifact(paths.samples, ARTIFACT_DIR)


def run_from_params(params: Params) -> dict[str, Any]:
    return run(
        params.evaluate,
        params.paths,
        params.mlflow,
        params.export.ngram_order,
        params.export.ngram_discount,
        params.train.eval_batch_size,
    )


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, lambda params, args: run_from_params(params), argv)


if __name__ == "__main__":
    main()
