"""Stage `evaluate`: the ONNX model's test perplexity against PyTorch's, baselines, samples, MLflow.

The end-to-end test trains the tiny model (`train.run_from_params` on `processed_tiny`), exports
it (`export.run`) and evaluates it; the other tests need no trained model.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch

from rnnlm import evaluate, export, ngram, train
from rnnlm.cache import CacheSettings
from rnnlm.config import Params
from rnnlm.datamodule import StreamWindows
from rnnlm.inference import (
    CACHE_KEY,
    NGRAM_KEY,
    LanguageModel,
    cache_metadata,
    ngram_metadata,
)
from rnnlm.ngram import NgramSettings
from rnnlm.processed import ProcessedDataError
from tests.fixtures import shipped_params, write_full_params
from tests.unit.test_export import build_net, write_model

EVAL_PARAMS = dataclasses.replace(
    shipped_params().evaluate,
    sample_prompts={"nation": "The nation", "people": "Our people will"},
    sample_tokens=8,
    samples_per_prompt=2,
    sample_seed=11,
)


def torch_rows_ppl(net: torch.nn.Module, stream: np.ndarray, n_rows: int, bptt: int) -> float:
    """Test perplexity as training's evaluation computes it with `n_rows` parallel rows."""
    windows = StreamWindows(stream, n_rows, bptt)
    state, nll = net.init_state(n_rows), 0.0
    with torch.no_grad():
        for inputs, targets in windows:
            logits, state = net(inputs, state)
            nll += float(
                torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).double(),
                    targets.reshape(-1),
                    reduction="sum",
                )
            )
    return math.exp(nll / windows.n_tokens)


def _artifacts(client: mlflow.MlflowClient, run_id: str, path: str) -> set[str]:
    return {item.path for item in client.list_artifacts(run_id, path)}


@pytest.fixture
def exported(processed_tiny: Params) -> Params:
    """`processed_tiny` with a trained (2 epochs) and exported tiny LSTM, registered as `tiny`."""
    train.run_from_params(processed_tiny)
    p = dataclasses.replace(processed_tiny.export, registered_model_name="tiny")
    export.run_from_params(dataclasses.replace(processed_tiny, export=p))
    return processed_tiny


def test_evaluate_end_to_end_on_a_trained_and_exported_model(exported: Params) -> None:
    paths = exported.paths
    train_metrics = json.loads(paths.train_metrics.read_text())
    run_id = json.loads(paths.train_run.read_text())["run_id"]
    # Whether tuning turned the cache and the n-gram on for this tiny model is the export
    # tests' business: here they are off first, then on with fixed settings (below).
    set_cache(paths.onnx_model, None)
    set_ngram(paths.onnx_model, None)
    metrics = evaluate.run(EVAL_PARAMS, paths, exported.mlflow, 3, "modified")

    written = json.loads((paths.metrics_dir / "eval.json").read_text())
    assert written == metrics
    # The shipped ONNX model reproduces PyTorch's test perplexity (train stage) within 0.1%.
    torch_ppl = train_metrics["test_ppl"]
    assert metrics["test/pytorch_ppl"] == torch_ppl
    assert metrics["headline/test_ppl"] == pytest.approx(torch_ppl, rel=1e-3)
    assert metrics["test/onnx_pytorch_rel_diff"] < 1e-4
    # Baselines on the same split and vocabulary, recomputed here from the processed files.
    vocab = json.loads((paths.processed_dir / "vocab.json").read_text())["tokens"]
    train_ids = np.load(paths.processed_dir / "train.npy")
    test_ids = np.load(paths.processed_dir / "test.npy")
    kn = ngram.fit_kneser_ney(train_ids, len(vocab), order=3)
    unigram = ngram.fit_unigram(train_ids, len(vocab))
    expected_kn = ngram.perplexity(kn.logprobs(test_ids))
    assert metrics["headline/kn_test_ppl"] == pytest.approx(expected_kn, abs=1e-4)
    assert metrics["headline/unigram_test_ppl"] == pytest.approx(
        ngram.perplexity(ngram.unigram_logprobs(unigram, test_ids)), abs=1e-4
    )
    assert 1 < metrics["headline/kn_test_ppl"] < metrics["headline/unigram_test_ppl"] < len(vocab)
    assert metrics["headline/improvement_over_kn_pct"] == pytest.approx(
        100 * (1 - metrics["headline/test_ppl"] / expected_kn), abs=1e-3
    )
    stats = json.loads((paths.processed_dir / "stats.json").read_text())
    assert metrics["test/oov_rate"] == stats["test"]["oov_rate"] > 0
    assert metrics["test/tokens"] == len(test_ids) == stats["test"]["tokens"]

    # Without a cache or an n-gram in the model, what it scores is the network's.
    lm = LanguageModel(paths.models_dir / "model.onnx")
    assert lm.cache is None and lm.ngram is None
    assert metrics["headline/cache_test_ppl"] == metrics["headline/test_ppl"]
    assert metrics["headline/scored_test_ppl"] == metrics["headline/test_ppl"]
    assert metrics["test/ngram_weight"] == 0

    # Samples: a header, each prompt, its samples; reproducible from the seed.
    samples = (paths.metrics_dir / "samples.txt").read_text()
    assert "seed 11" in samples and run_id in samples
    for name, prompt in EVAL_PARAMS.sample_prompts.items():
        assert f"## {name}: {prompt!r}" in samples
        texts = lm.generate(prompt, max_tokens=8, seed=11, num_samples=2)
        for i, text in enumerate(texts, start=1):
            assert text.startswith(prompt)
            assert f"\n{i}. {text}\n" in samples

    # The same metrics, both files and the baseline's settings are in the training run.
    client = mlflow.MlflowClient(exported.mlflow.tracking_uri)
    run = client.get_run(run_id)
    for key, value in metrics.items():
        assert run.data.metrics[key] == pytest.approx(value), key
    assert run.data.metrics["test/ppl"] == pytest.approx(torch_ppl, rel=1e-4)  # from train
    assert run.data.tags["evaluate.kn_discounts"] == str(
        {n: [round(d, 4) for d in ds] for n, ds in kn.discounts.items()}
    )
    assert _artifacts(client, run.info.run_id, "evaluation") == {
        "evaluation/eval.json",
        "evaluation/samples.txt",
    }
    # The registered version says what it is and how good; the first one is the champion.
    version = client.get_model_version("tiny", "1")
    assert float(version.tags["test_ppl"]) == pytest.approx(metrics["headline/test_ppl"], abs=1e-4)
    assert float(version.tags["scored_test_ppl"]) == pytest.approx(
        metrics["headline/scored_test_ppl"], abs=1e-4
    )
    assert version.tags["corpus"] == "tinycorpus" and version.tags["cell"] == "lstm"
    assert "test perplexity" in version.description and run_id in version.description
    assert str(client.get_model_version_by_alias("tiny", "champion").version) == "1"
    assert "champion" in client.get_registered_model("tiny").description

    # With train.eval_batch_size > 1 the check compares like with like (rows, zero states).
    net = export.load_checkpoint(paths.models_dir / "model.ckpt")
    rows_ppl = torch_rows_ppl(net, test_ids, n_rows=3, bptt=8)
    assert evaluate.score_rows(lm, test_ids, 3, window=5) == pytest.approx(rows_ppl, rel=1e-5)
    assert evaluate.score_rows(lm, test_ids, 1) == pytest.approx(
        lm.score_ids(test_ids, cache=False).ppl
    )
    (paths.metrics_dir / "train.json").write_text(
        json.dumps({**train_metrics, "test_ppl": round(rows_ppl, 4)})
    )
    # With the cache and the n-gram in the model: the gate and headline/test_ppl stay the
    # network's, headline/cache_test_ppl adds the cache, headline/scored_test_ppl the n-gram
    # too: what `rnnlm score` gives.
    set_cache(paths.onnx_model, CacheSettings(window=50, theta=0.5, lam=0.2))
    set_ngram(paths.onnx_model, NgramSettings(kn, 0.3))
    rows_metrics = evaluate.run(
        EVAL_PARAMS, paths, exported.mlflow, 3, "modified", eval_batch_size=3
    )
    # Still the whole stream:
    assert rows_metrics["headline/test_ppl"] == metrics["headline/test_ppl"]
    assert rows_metrics["test/onnx_pytorch_rel_diff"] < 1e-4
    cached = LanguageModel(paths.onnx_model)
    assert cached.cache == CacheSettings(window=50, theta=0.5, lam=0.2)
    assert rows_metrics["headline/cache_test_ppl"] == pytest.approx(
        cached.score_ids(test_ids, ngram=False).ppl, abs=1e-4
    )
    assert rows_metrics["headline/cache_test_ppl"] != rows_metrics["headline/test_ppl"]
    assert cached.ngram is not None and cached.ngram.weight == 0.3
    assert rows_metrics["test/ngram_weight"] == 0.3
    scored = mix_logprobs_of(cached, test_ids, kn, 0.3)
    assert rows_metrics["headline/scored_test_ppl"] == pytest.approx(scored, abs=1e-4)
    assert rows_metrics["headline/scored_test_ppl"] != rows_metrics["headline/cache_test_ppl"]

    # A PyTorch figure 0.2% away fails the stage and leaves its outputs as they were.
    before = {
        name: (paths.metrics_dir / name).read_bytes() for name in ("eval.json", "samples.txt")
    }
    (paths.metrics_dir / "train.json").write_text(
        json.dumps({**train_metrics, "test_ppl": torch_ppl * 1.002})
    )
    # |ONNX - 1.002 x PyTorch| / (1.002 x PyTorch) = 0.1996%, give or take ONNX's 1e-6.
    with pytest.raises(evaluate.EvaluateError, match=r"by 0\.(199|2)\d*% > evaluate\.tolerance"):
        evaluate.run(EVAL_PARAMS, paths, exported.mlflow, 3, "modified")
    assert {name: (paths.metrics_dir / name).read_bytes() for name in before} == before
    loose = dataclasses.replace(EVAL_PARAMS, tolerance=0.01, sample_prompts={})
    bigram = evaluate.run(loose, paths, exported.mlflow, 2, "modified")["headline/kn_test_ppl"]
    assert bigram != metrics["headline/kn_test_ppl"]


def set_cache(path: Path, settings: CacheSettings | None) -> None:
    """Put these cache settings (None: no cache) into the exported model's metadata."""
    export.attach_metadata(path, {CACHE_KEY: json.dumps(cache_metadata(settings))})


def set_ngram(path: Path, settings: NgramSettings | None) -> None:
    """Put this n-gram (None: none) into the exported model's metadata."""
    export.attach_metadata(path, {NGRAM_KEY: json.dumps(ngram_metadata(settings))})


def mix_logprobs_of(lm: LanguageModel, stream: np.ndarray, kn: ngram.KneserNey, w: float) -> float:
    """Perplexity of `stream` scored by `lm` with its cache and without its n-gram, then mixed
    with `kn` by weight `w` here, the whole stream at once."""
    cached = -lm.token_nlls(stream, ngram=False)
    return ngram.perplexity(ngram.mix_logprobs(cached, kn.logprobs(stream), w))


def test_check_agreement() -> None:
    assert evaluate.check_agreement(100.05, 100.0, 1e-3) == pytest.approx(5e-4)
    with pytest.raises(evaluate.EvaluateError, match=r"100\.2000 differs from PyTorch's 100\.0000"):
        evaluate.check_agreement(100.2, 100.0, 1e-3)
    with pytest.raises(evaluate.EvaluateError):
        evaluate.check_agreement(math.nan, 100.0, 1e-3)


def test_improvement_and_samples_format() -> None:
    assert evaluate.improvement_pct(80.0, 100.0) == pytest.approx(20.0)
    assert evaluate.improvement_pct(120.0, 100.0) == pytest.approx(-20.0)
    text = evaluate.format_samples({"a": ["One.", "Two."]}, {"a": "the prompt"}, "# header")
    assert text == "# header\n\n## a: 'the prompt'\n1. One.\n2. Two.\n"


def test_missing_inputs_are_named(processed_tiny: Params, tmp_path: Path) -> None:
    paths, ml = processed_tiny.paths, processed_tiny.mlflow
    with pytest.raises(evaluate.EvaluateError, match=r"train\.json: not found"):
        evaluate.run(EVAL_PARAMS, paths, ml, 3, "modified")
    (paths.metrics_dir).mkdir(parents=True, exist_ok=True)
    (paths.metrics_dir / "train.json").write_text(json.dumps({"epochs": 2}))
    with pytest.raises(evaluate.EvaluateError, match=r"no test_ppl \(run the train stage first\)"):
        evaluate.run(EVAL_PARAMS, paths, ml, 3, "modified")
    (paths.metrics_dir / "train.json").write_text(json.dumps({"test_ppl": 5.0}))
    with pytest.raises(evaluate.EvaluateError, match=r"not found \(run the export stage first\)"):
        evaluate.run(EVAL_PARAMS, paths, ml, 3, "modified")
    # A model exported from another vocabulary is refused before anything is scored.
    write_model(paths.onnx_model, build_net())
    with pytest.raises(evaluate.EvaluateError, match=r"vocabulary .* is not data/processed"):
        evaluate.run(EVAL_PARAMS, paths, ml, 3, "modified")
    (paths.processed_dir / "test.npy").unlink()
    with pytest.raises(
        ProcessedDataError, match=r"test\.npy: not found \(run the tokenize stage first\)"
    ):
        evaluate.run(EVAL_PARAMS, paths, ml, 3, "modified")
    assert not (paths.metrics_dir / "eval.json").exists()


def test_main_reports_a_missing_model(
    processed_tiny: Params, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    paths = processed_tiny.paths
    paths.metrics_dir.mkdir(parents=True, exist_ok=True)
    (paths.metrics_dir / "train.json").write_text(json.dumps({"test_ppl": 5.0}))
    params_file = write_full_params(processed_tiny, tmp_path / "params.yaml")
    with pytest.raises(SystemExit) as exit_:
        evaluate.main(["--params", str(params_file)])
    assert exit_.value.code == 1
    assert "ONNX model not found (run the export stage first)" in caplog.text


def test_champion_moves_only_to_a_version_that_serves_better_on_the_same_corpus(
    tmp_path: Path,
) -> None:
    from rnnlm import tracking

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    client.create_registered_model("lm")
    corpora = ["union", "union", "union", "inaugural", "union", "union"]
    for corpus in corpora:
        client.create_model_version("lm", source=str(tmp_path), tags={"corpus": corpus})
    tracked = tracking.TrackedRun(uri=uri, run_id="unused", experiment_id="0")

    def record(version: str, ppl: float, scored: float) -> str:
        result = tracking.record_test_perplexity(tracked, "lm", version, ppl, scored, f"v{version}")
        champion = str(client.get_model_version_by_alias("lm", tracking.CHAMPION_ALIAS).version)
        assert result["champion_version"] == champion
        assert result["is_champion"] == (champion == version)
        return champion

    assert record("1", 80.0, 75.0) == "1"  # the first scored version
    assert record("2", 85.0, 78.0) == "1"  # serves worse: the champion stays
    # A worse network that serves better (its cache and n-gram gain more) is what users get.
    assert record("3", 82.0, 70.0) == "3"
    assert record("4", 50.0, 45.0) == "3"  # another corpus is not comparable
    assert record("5", 60.0, 70.0) == "3"  # a tie of what is served keeps the older version
    version = client.get_model_version("lm", "2")
    assert (version.tags["test_ppl"], version.tags["scored_test_ppl"]) == ("85.0000", "78.0000")
    assert client.get_model_version("lm", "4").description == "v4"
    # A version evaluated before the scored tag existed ranks by its network's figure: v3
    # without its tag ranks 82, so v5 (70) leads, where v3 won the tie before.
    client.delete_model_version_tag("lm", "3", "scored_test_ppl")
    assert record("6", 90.0, 72.0) == "5"
