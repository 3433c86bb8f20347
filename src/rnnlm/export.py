"""Stage `export`: models/model.ckpt -> models/model.onnx (+ model.int8.onnx), metrics/export.json.

    models/model.ckpt + data/processed/{vocab,tokenizer}.json + metrics/train_run.json (run id)
    + data/processed/{train,validation}.npy (the n-gram's counts; the tuning)
      -> models/model.onnx        tokens (batch, time) int64, h0[, c0] -> logits, hidden, h1[, c1]
      -> models/model.int8.onnx   the same with dynamic int8 weights
      -> metrics/export.json      parity error, sizes, per-token latency, validation perplexity,
                                  the continuous cache and the n-gram's weight tuned on
                                  validation
      -> metrics/export_model.json  the logged model's id and URI, its registered version
      -> MLflow                   a pyfunc model (rnnlm.serving: text in, results out, the
                                  .onnx file inside) logged to the training run, registered
                                  by name

The network is rebuilt from the checkpoint (loaded with weights_only=True) and exported with the
exporter `export.exporter` names. With torch 2.13 only the TorchScript exporter keeps the time
axis dynamic for every cell: the dynamo exporter unrolls `nn.RNN` over the example's length and
records a fixed time size in GRU/LSTM output shapes. Whichever is used, `verify_parity` runs on
every export and the stage fails unless onnxruntime matches PyTorch within `export.atol` at batch
sizes and lengths other than the example's, from a non-zero state, and one token per call with
the state fed back matches the whole sequence at once.

The continuous cache (rnnlm.cache, Grave et al. 2017) needs no training, only three settings:
the stage runs the exported model once over the validation split, collecting each token's
log-probability and the top layer's hidden vector, then scores every combination of
`export.cache_thetas` x `cache_lambdas` x `cache_windows` on those arrays (`tune_cache`; a few
seconds). The best goes into both models' metadata (`rnnlm.cache`), which `rnnlm score` and
`next` then use; when none beats the model alone the entry is null and they score without.
`onnx/val_ppl` and `int8/val_ppl` stay the network's own; `cache/val_ppl` is with the cache.

Then the interpolated Kneser-Ney n-gram of `export.ngram_order` (rnnlm.ngram) is counted on the
training split and its weight w in p = (1 - w) p_cached + w p_kn fitted by EM on the validation
log-probs with the tuned cache (`ngram.interpolation_weight`; the likelihood is concave in w).
With `export.ngram_mix` on and a gain on validation, its tables and weight go into both models'
metadata (`rnnlm.ngram`), which scoring, `next`, generation and serving then mix in;
`ngram/val_ppl` is the whole mixture's validation perplexity.

The model is self-contained: vocabulary, tokenizer, provenance, the cache's settings and the
n-gram travel in its metadata (the schema is in rnnlm.inference). Everything is written to a
staging folder first and moved into models/ only when every check passed, so a failed export
leaves models/ as it was.

The int8 model is a DVC out like model.onnx, so the two always come from the same checkpoint:
`dvc checkout`, `dvc exp apply` and `dvc pull` restore them together. Its size, speed-up and
perplexity change are in metrics/export.json, and it is logged to the MLflow run.

Run via `dvc repro export`, or directly: `python -m rnnlm.export [--params params.yaml]`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from rnnlm import ngram, serving, tracking
from rnnlm.cache import CacheTuning, mix_stream, tune_cache
from rnnlm.config import (
    ExportParams,
    MlflowParams,
    Params,
    Paths,
    as_flat_dict,
    params_digest,
    training_values,
)
from rnnlm.errors import RnnlmError
from rnnlm.files import (
    staged_files,
    write_json_atomic,
)
from rnnlm.inference import (
    CACHE_KEY,
    CONVENTIONS_KEY,
    FORMAT_KEY,
    FORMAT_VERSION,
    HIDDEN_OUTPUT,
    IO_KEY,
    LOGITS_OUTPUT,
    MODEL_KEY,
    NGRAM_KEY,
    PRECISION_KEY,
    PROVENANCE_KEY,
    TOKENIZER_KEY,
    TOKENS_INPUT,
    VOCAB_KEY,
    LanguageModel,
    cache_metadata,
    conventions,
    io_metadata,
    ngram_metadata,
    state_io_names,
)
from rnnlm.model import RNNLM, RNNLMConfig, state_names
from rnnlm.ngram import NgramSettings
from rnnlm.processed import read_split, read_tokenizer, read_vocab
from rnnlm.stage import stage_main
from rnnlm.text import TextTokenizer

log = logging.getLogger(__name__)

MLFLOW_MODEL_NAME = "pyfunc"  # the logged model's name in the run (rnnlm.serving's model)

# (batch, time) of the example the exporter traces. The parity check runs at shapes that differ
# from it in both dimensions, so an axis the exporter fixed to the example's size is caught.
EXPORT_SHAPE = (2, 5)
PARITY_SHAPES = ((3, 11), (1, 1), (4, 2))
STEP_SHAPE = (3, 9)  # batch, tokens fed one per call
STATE_SCALE = 0.5  # std of the random non-zero initial states of the parity check

# Op types quantize_dynamic turns into int8 kernels. MatMul (the vocabulary projection, most of
# the work per token) and LSTM (DynamicQuantizeLSTM) carry the speed-up; Gather stores the
# embedding table in int8 (dequantized after the lookup), a smaller file at no cost in speed.
# onnxruntime has no int8 RNN or GRU kernel: those layers stay float32.
QUANTIZED_OPS = {
    "lstm": ("MatMul", "LSTM", "Gather"),
    "gru": ("MatMul", "Gather"),
    "rnn_tanh": ("MatMul", "Gather"),
    "rnn_relu": ("MatMul", "Gather"),
}


class ExportError(RnnlmError):
    """The export cannot run, or produced a model that must not be used."""


class ParityError(ExportError):
    """onnxruntime's outputs differ from PyTorch's: the exported graph is wrong."""


def load_checkpoint(path: Path) -> RNNLM:
    """Rebuild the trained `RNNLM` from a Lightning checkpoint, in eval mode."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"{path}: checkpoint not found (run the train stage first)")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        raise ExportError(f"{path}: not a loadable checkpoint ({err})") from None
    hparams = checkpoint.get("hyper_parameters", {}) if isinstance(checkpoint, dict) else {}
    if not isinstance(hparams.get("model"), Mapping) or "state_dict" not in checkpoint:
        raise ExportError(
            f"{path}: not an rnnlm checkpoint (needs state_dict and hyper_parameters['model'])"
        )
    try:
        net = RNNLM(RNNLMConfig(**hparams["model"]))
        state_dict = checkpoint["state_dict"]
        # A run with weight averaging evaluated and tested the average: ship the same weights.
        prefix = "average." if any(k.startswith("average.") for k in state_dict) else "net."
        weights = {
            key.removeprefix(prefix): value
            for key, value in state_dict.items()
            if key.startswith(prefix)
        }
        net.load_state_dict(weights)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ExportError(f"{path}: checkpoint does not match the model code ({err})") from None
    return net.eval()


class _SingleStateGraph(nn.Module):
    """The exported signature for rnn_tanh/rnn_relu/gru: (tokens, h0) -> (logits, hidden, h1).

    `hidden` (batch, time, hidden_dim) is the top layer's output at every step, for the
    continuous cache (rnnlm.cache).
    """

    def __init__(self, net: RNNLM) -> None:
        super().__init__()
        self.net = net

    def forward(self, tokens: torch.Tensor, h0: torch.Tensor) -> tuple[torch.Tensor, ...]:
        logits, state, hidden = self.net.forward_with_hidden(tokens, (h0,))
        return (logits, hidden, *state)


class _LSTMGraph(_SingleStateGraph):
    """The exported signature for lstm: (tokens, h0, c0) -> (logits, hidden, h1, c1)."""

    def forward(  # type: ignore[override]
        self, tokens: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        logits, state, hidden = self.net.forward_with_hidden(tokens, (h0, c0))
        return (logits, hidden, *state)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Keep the exporters' progress lines and deprecation notices out of the stage's log."""
    with (
        warnings.catch_warnings(),
        contextlib.redirect_stdout(io.StringIO()),
    ):
        warnings.simplefilter("ignore")
        yield


def export_onnx(net: RNNLM, path: Path, exporter: str, opset: int) -> None:
    """Write `net` as ONNX: tokens, h0[, c0] -> logits, hidden, h1[, c1]; batch and time
    dynamic."""
    config = net.config
    names = state_names(config.cell)
    state_in, state_out = state_io_names(names)
    batch, length = EXPORT_SHAPE
    tokens = torch.randint(0, config.vocab_size, (batch, length), generator=_generator(0))
    state = tuple(
        torch.zeros(config.num_layers, batch, config.hidden_dim) for _ in state_in
    )  # (layers, batch, hidden)
    graph = (_LSTMGraph if config.cell == "lstm" else _SingleStateGraph)(net).eval()
    common: dict[str, Any] = {
        "input_names": [TOKENS_INPUT, *state_in],
        "output_names": [LOGITS_OUTPUT, HIDDEN_OUTPUT, *state_out],
        "opset_version": opset,
    }
    try:
        with _quiet_exporter(), torch.no_grad():
            if exporter == "dynamo":
                batch_dim, time_dim = torch.export.Dim("batch"), torch.export.Dim("time")
                torch.onnx.export(
                    graph,
                    (tokens, *state),
                    str(path),
                    dynamo=True,
                    external_data=False,
                    dynamic_shapes={
                        TOKENS_INPUT: {0: batch_dim, 1: time_dim},
                        **{name: {1: batch_dim} for name in state_in},
                    },
                    **common,
                )
            elif exporter == "torchscript":
                axes = {
                    name: {0: "batch", 1: "time"}
                    for name in (TOKENS_INPUT, LOGITS_OUTPUT, HIDDEN_OUTPUT)
                }
                axes.update({name: {1: "batch"} for name in [*state_in, *state_out]})
                torch.onnx.export(
                    graph, (tokens, *state), str(path), dynamo=False, dynamic_axes=axes, **common
                )
            else:
                raise ExportError(f"unknown exporter {exporter!r} (torchscript or dynamo)")
    except ExportError:
        raise
    except Exception as err:
        raise ExportError(f"the {exporter} exporter failed: {err}") from err


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _max_abs(a: np.ndarray, b: np.ndarray) -> float:
    """Max |a - b|; inf when shapes differ or a value is not finite (never passes a check)."""
    if a.shape != b.shape:
        return math.inf
    diff = float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
    return diff if math.isfinite(diff) else math.inf


def fixed_dimensions(session: ort.InferenceSession) -> list[str]:
    """Batch/time dimensions the graph declares with a fixed size, e.g. ['logits[1] = 5']."""
    problems = []
    for arg in [*session.get_inputs(), *session.get_outputs()]:
        dynamic = (0, 1) if arg.name in (TOKENS_INPUT, LOGITS_OUTPUT, HIDDEN_OUTPUT) else (1,)
        for dim in dynamic:
            size = arg.shape[dim] if dim < len(arg.shape) else None
            if isinstance(size, int):
                problems.append(f"{arg.name}[{dim}] = {size}")
    return problems


def verify_parity(
    net: RNNLM,
    model_path: Path,
    atol: float,
    *,
    shapes: Sequence[tuple[int, int]] = PARITY_SHAPES,
    step_shape: tuple[int, int] = STEP_SHAPE,
    seed: int = 0,
) -> dict[str, float]:
    """Compare the ONNX model at `model_path` with `net`; raise ParityError beyond `atol`.

    For each (batch, time) in `shapes`: random tokens and a random non-zero initial state;
    logits, the top layer's hidden vectors and final states must match PyTorch's. Then
    `step_shape`: tokens fed one per call with the state fed back must match the whole
    sequence run at once (and PyTorch). Last, the graph must not declare a fixed batch or time
    size (`fixed_dimensions`).

    Returns:
        The max absolute difference of each check, e.g. {"b3_t11/logits": 2e-7,
        "b3_t11/hidden": ..., ..., "step/logits": ..., "max": ...}.
    """
    config = net.config
    names = state_names(config.cell)
    state_in, state_out = state_io_names(names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
    outputs = [LOGITS_OUTPUT, HIDDEN_OUTPUT, *state_out]
    checked = ["logits", "hidden", *names]  # the keys of `errors`, in the order of `outputs`
    rng = _generator(seed)

    def sample(batch: int, length: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        tokens = torch.randint(0, config.vocab_size, (batch, length), generator=rng)
        shape = (config.num_layers, batch, config.hidden_dim)
        return tokens, tuple(torch.randn(shape, generator=rng) * STATE_SCALE for _ in names)

    def run_onnx(tokens: np.ndarray, state: Sequence[np.ndarray]) -> list[np.ndarray]:
        feeds = {TOKENS_INPUT: tokens, **dict(zip(state_in, state, strict=True))}
        try:
            return session.run(outputs, feeds)
        except Exception as err:
            raise ParityError(
                f"onnxruntime cannot run the exported model on tokens of shape "
                f"{tuple(tokens.shape)}: {' '.join(str(err).split())}. The exporter probably "
                "fixed a dimension that must stay dynamic (try export.exporter: torchscript)."
            ) from None

    def run_torch(tokens: torch.Tensor, state: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
        with torch.no_grad():
            logits, next_state, hidden = net.forward_with_hidden(tokens, state)
        return [logits.numpy(), hidden.numpy(), *(s.numpy() for s in next_state)]

    errors: dict[str, float] = {}
    for batch, length in shapes:
        tokens, state = sample(batch, length)
        expected = run_torch(tokens, state)
        got = run_onnx(tokens.numpy(), [s.numpy() for s in state])
        for name, e, g in zip(checked, expected, got, strict=True):
            errors[f"b{batch}_t{length}/{name}"] = _max_abs(e, g)
    # One token per call with the state fed back vs the whole sequence at once (and PyTorch).
    tokens, state = sample(*step_shape)
    expected = run_torch(tokens, state)
    full = run_onnx(tokens.numpy(), [s.numpy() for s in state])
    steps: list[list[np.ndarray]] = []  # per step: logits, hidden (batch, 1, ...)
    onnx_state = [s.numpy() for s in state]
    for t in range(step_shape[1]):
        step_logits, step_hidden, *onnx_state = run_onnx(tokens[:, t : t + 1].numpy(), onnx_state)
        steps.append([step_logits, step_hidden])
    stepped = [np.concatenate(outs, axis=1) for outs in zip(*steps, strict=True)] + onnx_state
    for name, e, f, g in zip(checked, expected, full, stepped, strict=True):
        errors[f"step/{name}"] = max(_max_abs(f, g), _max_abs(e, g))
    fixed = fixed_dimensions(session)
    if fixed:
        raise ParityError(
            "the exported ONNX model declares fixed sizes for dimensions that must stay "
            f"dynamic ({', '.join(fixed)}; the exporter recorded the example's shape; values "
            f"match within {max(errors.values()):.2g}): try export.exporter: torchscript"
        )
    worst = max(errors, key=lambda key: errors[key])
    errors["max"] = errors[worst]
    if not errors[worst] <= atol:
        raise ParityError(
            f"the exported ONNX model does not match PyTorch: max |difference| "
            f"{errors[worst]:.3g} > export.atol = {atol:g} at {worst} "
            f"({config.cell}, checks: {', '.join(f'{k}={v:.2g}' for k, v in errors.items())})"
        )
    return errors


def build_metadata(
    config: RNNLMConfig,
    vocab: Sequence[str],
    tokenizer: Mapping[str, Any],
    provenance: Mapping[str, Any],
    precision: str = "fp32",
) -> dict[str, str]:
    """The rnnlm metadata_props (JSON strings) that make the .onnx file self-contained."""
    if len(vocab) != config.vocab_size:
        raise ExportError(
            f"the vocabulary has {len(vocab)} tokens but the model {config.vocab_size}: "
            "vocab.json and model.ckpt come from different runs of the pipeline"
        )
    TextTokenizer.from_dict(tokenizer)  # fails here, not at inference time, when malformed
    dump = _json_entry
    return {
        FORMAT_KEY: dump(FORMAT_VERSION),
        MODEL_KEY: dump(dataclasses.asdict(config)),
        IO_KEY: dump(io_metadata(state_names(config.cell))),
        VOCAB_KEY: dump(list(vocab)),
        TOKENIZER_KEY: dump(dict(tokenizer)),
        PROVENANCE_KEY: dump(dict(provenance)),
        CONVENTIONS_KEY: dump(
            conventions(bool(tokenizer["lowercase"]), str(tokenizer["paragraphs"]))
        ),
        CACHE_KEY: dump(cache_metadata(None)),  # until the export stage tunes it
        NGRAM_KEY: dump(ngram_metadata(None)),  # the same for the n-gram
        PRECISION_KEY: precision,
    }


def _json_entry(value: Any) -> str:
    """A metadata value as compact JSON."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def attach_metadata(path: Path, metadata: Mapping[str, str], doc: str | None = None) -> None:
    """Set the rnnlm metadata on the ONNX file at `path` (in place) and run onnx.checker;
    `doc` replaces the model's description (None keeps it)."""
    model = onnx.load(str(path))
    kept = {p.key: p.value for p in model.metadata_props if p.key not in metadata}
    onnx.helper.set_model_props(model, {**kept, **metadata})
    if doc is not None:
        model.doc_string = doc
    model.producer_name = "rnnlm"
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as err:
        raise ExportError(f"{path.name}: onnx.checker refused the model: {err}") from None
    onnx.save(model, str(path))


def quantize_model(src: Path, dst: Path, cell: str) -> None:
    """Dynamic int8 quantization of the weights of `src` (an fp32 rnnlm model) into `dst`.

    Activations are quantized on the fly per call, so no calibration data is needed. The
    exported graph needs no pre-processing: opset >= 10 has DynamicQuantizeLinear and the
    quantized ops need no shape information beyond what the exporter recorded.
    """
    from onnxruntime.quantization import QuantType, quantize_dynamic

    # The quantizer logs advice through the root logger ("consider pre-processing", tensors
    # without quantization parameters: the activations, quantized dynamically on purpose).
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with _quiet_exporter():
            quantize_dynamic(
                str(src),
                str(dst),
                op_types_to_quantize=list(QUANTIZED_OPS[cell]),
                # One scale per output column (per word of the projection): the shipped GRU's
                # validation perplexity moves +0.03% instead of +0.11% with one scale for the
                # whole matrix; scoring runs as fast, generation ~10% slower (bench/inference.py).
                per_channel=True,
                weight_type=QuantType.QInt8,
                # 7-bit weights. Without VNNI (AVX2), onnxruntime multiplies uint8 activations
                # by int8 weights with VPMADDUBSW, whose int16 sum of two products saturates for
                # large values; the int8 file must hold wherever it runs. A tiny GRU's int8
                # perplexity on an AMD EPYC (AVX2): +7.8% off fp32 with 8 bits, +0.18% with 7;
                # the shipped LSTM 512 there: -0.007% and +0.037% (both inside the gate).
                reduce_range=True,
            )
    finally:
        logging.disable(disabled)


def measure_latency(
    path: Path, n_tokens: int, threads: int, warmup: int = 20, rounds: int = 3
) -> float:
    """Milliseconds per token of single-stream sampling through `LanguageModel.generate`,
    the network alone (the cache's mixing is numpy, the same for fp32 and int8, and would
    blur what quantization gains).

    The best of `rounds` runs of `n_tokens`: the least disturbed by other processes.
    """
    model = LanguageModel(path, threads=threads, cache=False, ngram=False)
    model.prepare_generation()  # the steady state per token, not the graphs' building
    model.generate("", max_tokens=warmup, seed=0)
    best = math.inf
    for _ in range(rounds):
        start = time.perf_counter()
        model.generate("", max_tokens=n_tokens, seed=0)
        best = min(best, time.perf_counter() - start)
    return best * 1e3 / n_tokens


def model_metrics(
    path: Path, prefix: str, validation: np.ndarray, p: ExportParams
) -> dict[str, float]:
    """Size, per-token generation latency and validation perplexity (the network alone,
    without the continuous cache and the n-gram) of an exported file."""
    return {
        f"{prefix}/size_mb": round(path.stat().st_size / 1e6, 3),
        f"{prefix}/ms_per_token": round(
            measure_latency(path, p.latency_tokens, p.latency_threads), 4
        ),
        f"{prefix}/val_ppl": round(
            LanguageModel(path, cache=False, ngram=False).score_ids(validation).ppl, 4
        ),
    }


def tune_model_cache(
    path: Path, validation: np.ndarray, p: ExportParams
) -> tuple[CacheTuning, np.ndarray]:
    """The continuous cache's best settings for the exported model at `path` on `validation`
    (one pass of the network, then `export.cache_*`'s grid on the collected arrays), and the
    log-prob of each validation token with them."""
    logp, hidden = LanguageModel(path, cache=False, ngram=False).logprobs_and_hidden(validation)
    tuning = tune_cache(logp, hidden, validation, p.cache_thetas, p.cache_lambdas, p.cache_windows)
    return tuning, mix_stream(tuning.settings, logp, hidden, validation)


@dataclasses.dataclass(frozen=True)
class NgramTuning:
    """The n-gram to mix in (None: none pays, or `export.ngram_mix` is off), the validation
    perplexity before and with it, and the weight EM found (reported even when not shipped)."""

    settings: NgramSettings | None
    base_ppl: float
    ppl: float
    weight: float


def tune_ngram(
    train: np.ndarray,
    validation: np.ndarray,
    scored_logp: np.ndarray,
    vocab_size: int,
    p: ExportParams,
) -> NgramTuning:
    """Count the Kneser-Ney n-gram on `train` and fit its weight in the mixture by EM on
    `validation`, whose tokens have log-probs `scored_logp` as the model scores them so far
    (the network with its tuned cache)."""
    model = ngram.fit_kneser_ney(train, vocab_size, p.ngram_order, p.ngram_discount)
    kn_logp = model.logprobs(validation)
    weight = ngram.interpolation_weight(scored_logp, kn_logp)
    base_ppl = ngram.perplexity(scored_logp)
    ppl = ngram.perplexity(ngram.mix_logprobs(scored_logp, kn_logp, weight))
    pays = p.ngram_mix and 0 < weight < 1 and ppl < base_ppl
    settings = NgramSettings(model, weight) if pays else None
    return NgramTuning(settings, base_ppl, ppl if pays else base_ppl, weight)


def check_int8_perplexity(metrics: Mapping[str, float], max_change_pct: float) -> None:
    """Raise ExportError when the int8 model's validation perplexity differs from the fp32
    model's by more than `max_change_pct` percent (`export.int8_max_ppl_change_pct`)."""
    change = 100 * (metrics["int8/val_ppl"] / metrics["onnx/val_ppl"] - 1)
    if not abs(change) <= max_change_pct:
        raise ExportError(
            f"the int8 model's validation perplexity {metrics['int8/val_ppl']:.3f} is "
            f"{change:+.2f}% off the fp32 model's {metrics['onnx/val_ppl']:.3f}, more than "
            f"export.int8_max_ppl_change_pct = {max_change_pct:g}%: quantize fewer ops "
            "(export.QUANTIZED_OPS) or raise the limit"
        )


def cache_metrics(tuning: CacheTuning, seconds: float) -> dict[str, float]:
    """`cache/*` of metrics/export.json: the tuned settings (0 when the cache is off), the
    validation perplexity with them and its gain over the network alone (`onnx/val_ppl`)."""
    settings = tuning.settings
    return {
        "cache/val_ppl": round(tuning.ppl, 4),
        "cache/val_gain_pct": round(100 * (1 - tuning.ppl / tuning.model_ppl), 4),
        "cache/theta": settings.theta if settings else 0.0,
        "cache/lambda": settings.lam if settings else 0.0,
        "cache/window": settings.window if settings else 0,
        "cache/tune_s": round(seconds, 2),
    }


def ngram_metrics(tuning: NgramTuning, entry: str, seconds: float) -> dict[str, float]:
    """`ngram/*` of metrics/export.json: the weight (0 when none is shipped), the validation
    perplexity of the whole mixture, its gain over the network with its cache, and the size
    of the metadata entry that carries the tables."""
    return {
        "ngram/weight": round(tuning.settings.weight, 4) if tuning.settings else 0.0,
        "ngram/em_weight": round(tuning.weight, 4),
        "ngram/val_ppl": round(tuning.ppl, 4),
        "ngram/val_gain_pct": round(100 * (1 - tuning.ppl / tuning.base_ppl), 4),
        "ngram/entry_mb": round(len(entry) / 1e6, 3),
        "ngram/tune_s": round(seconds, 2),
    }


def write_onnx_models(
    net: RNNLM,
    folder: Path,
    vocab: Sequence[str],
    tokenizer: Mapping[str, Any],
    provenance: Mapping[str, Any],
    *,
    exporter: str = "torchscript",
    opset: int = 17,
    names: tuple[str, str] = ("model.onnx", "model.int8.onnx"),
) -> tuple[Path, Path]:
    """The export sequence: fp32 ONNX, its metadata, the int8 copy, its metadata.

    Used by the stage, the tests and bench/inference.py, so each ships the same files. Parity
    is checked separately (`verify_parity`): the stage fails on it, a benchmark reports it.

    Returns:
        The paths of the fp32 and int8 models inside `folder`.
    """
    config = net.config
    fp32, int8 = folder / names[0], folder / names[1]
    doc = (
        f"rnnlm {config.cell} {config.hidden_dim}x{config.num_layers} language model, vocabulary "
        f"of {len(vocab)} (metadata rnnlm.vocab). A stream starts with <eos> from a zero state; "
        "text becomes ids as metadata rnnlm.conventions says"
    )
    export_onnx(net, fp32, exporter, opset)
    metadata = build_metadata(config, vocab, tokenizer, provenance)
    attach_metadata(fp32, metadata, doc)
    quantize_model(fp32, int8, config.cell)
    attach_metadata(int8, {**metadata, PRECISION_KEY: "int8"}, doc + ", int8 weights")
    return fp32, int8


def serving_config(p: ExportParams) -> serving.ServingConfig:
    """The registered model's model_config, from the `export.serving_*` params."""
    return serving.ServingConfig(
        threads=p.serving_threads,
        max_documents=p.serving_max_documents,
        max_chars=p.serving_max_chars,
        max_tokens=p.serving_max_tokens,
    )


def provenance_of(p: ExportParams, run_id: str, digest: str) -> dict[str, Any]:
    """Where the model comes from: MLflow run, code version, params, exporter."""
    git = tracking.git_info(tracking.project_root())
    return {
        "mlflow_run_id": run_id,
        "git_commit": git.get("git.commit", "unknown"),
        "git_dirty": git.get("git.dirty", "unknown"),
        "params_digest": digest,
        "exporter": p.exporter,
        "opset": p.opset,
        "torch": torch.__version__,
    }


def run(p: ExportParams, paths: Paths, ml: MlflowParams, digest: str) -> dict[str, Any]:
    """Export, verify, quantize, measure, log to MLflow, then move the files into models/.

    Args:
        digest: `config.params_digest` of what the model was trained with (provenance).

    Returns:
        The metrics written to metrics/export.json, and the logged model's record
        (model_uri, model_id, registered_model, registered_version) of export_model.json.
    """
    net = load_checkpoint(paths.checkpoint)
    vocab = read_vocab(paths)
    tokenizer = read_tokenizer(paths)
    train, validation = (read_split(paths, split, len(vocab)) for split in ("train", "validation"))
    run_id = tracking.read_run_id(paths.train_run)
    tracked = tracking.attach_run(ml, run_id)  # an unusable store fails before any work
    tracking.fail_pending_models(tracked)  # an earlier export's, killed while uploading
    provenance = provenance_of(p, run_id, digest)

    with staged_files(paths.models_dir) as staged:
        fp32, int8 = write_onnx_models(
            net,
            staged,
            vocab,
            tokenizer,
            provenance,
            exporter=p.exporter,
            opset=p.opset,
            names=(paths.onnx_model.name, paths.int8_model.name),
        )
        parity = verify_parity(net, fp32, p.atol)
        log.info("parity with PyTorch: max |difference| %.2g (atol %g)", parity["max"], p.atol)
        started = time.perf_counter()
        tuning, cached_logp = tune_model_cache(fp32, validation, p)
        tune_s = time.perf_counter() - started
        log.info(
            "continuous cache tuned on validation in %.1fs: %s, val ppl %.2f -> %.2f",
            tune_s,
            tuning.settings or "off (no setting beats the model alone)",
            tuning.model_ppl,
            tuning.ppl,
        )
        started = time.perf_counter()
        ngram_tuning = tune_ngram(train, validation, cached_logp, len(vocab), p)
        ngram_entry = _json_entry(ngram_metadata(ngram_tuning.settings))
        ngram_s = time.perf_counter() - started
        log.info(
            "Kneser-Ney %d-gram fitted, its weight tuned on validation in %.1fs: %s, val ppl "
            "%.2f -> %.2f",
            p.ngram_order,
            ngram_s,
            ngram_tuning.settings
            or ("off (export.ngram_mix)" if not p.ngram_mix else "off (it does not pay)"),
            ngram_tuning.base_ppl,
            ngram_tuning.ppl,
        )
        entry = {CACHE_KEY: _json_entry(cache_metadata(tuning.settings)), NGRAM_KEY: ngram_entry}
        for path in (fp32, int8):
            attach_metadata(path, entry)
        metrics: dict[str, Any] = {
            "parity/max_abs_err": parity["max"],
            "parity/step_max_abs_err": max(v for k, v in parity.items() if k.startswith("step/")),
            **model_metrics(fp32, "onnx", validation, p),
            **model_metrics(int8, "int8", validation, p),
            **cache_metrics(tuning, tune_s),
            **ngram_metrics(ngram_tuning, ngram_entry, ngram_s),
        }
        metrics["int8/speedup"] = round(
            metrics["onnx/ms_per_token"] / metrics["int8/ms_per_token"], 3
        )
        metrics["int8/val_ppl_change_pct"] = round(
            100 * (metrics["int8/val_ppl"] / metrics["onnx/val_ppl"] - 1), 4
        )
        check_int8_perplexity(metrics, p.int8_max_ppl_change_pct)
        with serving.model_files(fp32, serving_config(p)) as model:
            record = tracking.log_pyfunc_model(
                tracked,
                model,
                name=MLFLOW_MODEL_NAME,
                registered_model_name=p.registered_model_name,
                params={f"export.{k}": v for k, v in as_flat_dict(p).items()},
                metrics=metrics,
            )
        tracked.log_artifact(int8, "onnx_int8")
    with staged_files(paths.metrics_dir) as staged:
        write_json_atomic(staged / paths.export_metrics.name, metrics)
        write_json_atomic(staged / paths.export_model.name, record)
    log.info(
        "exported %s: %.1f MB, %.3f ms/token, val ppl %.2f; int8 %.1f MB, %.2fx faster, "
        "val ppl %+.2f%%",
        paths.onnx_model,
        metrics["onnx/size_mb"],
        metrics["onnx/ms_per_token"],
        metrics["onnx/val_ppl"],
        metrics["int8/size_mb"],
        metrics["int8/speedup"],
        metrics["int8/val_ppl_change_pct"],
    )
    return {**metrics, **record}


def run_from_params(params: Params) -> dict[str, Any]:
    digest = params_digest(training_values(params.model, params.train))
    return run(params.export, params.paths, params.mlflow, digest=digest)


def main(argv: list[str] | None = None) -> None:
    stage_main(__doc__, lambda params, args: run_from_params(params), argv)


if __name__ == "__main__":
    main()
