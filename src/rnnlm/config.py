"""Typed, validated parameters: the only code that opens params.yaml.

Each top-level section of params.yaml maps to one frozen dataclass below. `load_params` builds
them all and fails with a `ConfigError` that names the key, the value and what is allowed when a
key is unknown or missing, a value has the wrong type, or a value is out of range. A stage reads
only the sections it needs (see dvc.yaml's `params:` lists).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from rnnlm.errors import RnnlmError, short_repr

DEFAULT_PARAMS = Path("params.yaml")
# The shipped params.yaml is ~5 kB and ~150 YAML nodes. Far larger is no parameters file: a
# mistake or an attack (YAML aliases can make a few lines stand for billions of values).
MAX_PARAMS_BYTES = 1 << 20
MAX_PARAMS_NODES = 100_000  # counted with every alias expanded


class ConfigError(RnnlmError, ValueError):
    """A params.yaml problem, with the offending key and value in the message."""


def _range(lo: float | None = None, hi: float | None = None, *, lo_open: bool = False) -> dict:
    """Field metadata for a numeric range check (inclusive unless `lo_open`)."""
    return {"lo": lo, "hi": hi, "lo_open": lo_open}


SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class Paths:
    """Where each stage reads and writes, relative to the project root.

    The four folders come from params.yaml; the files the stages exchange are named here and
    nowhere else (dvc.yaml spells the same names; a test keeps the two in step).
    """

    raw_dir: Path
    processed_dir: Path
    models_dir: Path
    metrics_dir: Path

    def corpus_dir(self, corpus_name: str) -> Path:
        """download -> tokenize: the extracted corpus package."""
        return self.raw_dir / corpus_name

    @property
    def stage_lock(self) -> Path:
        """Held by the stage running on these outputs (rnnlm.stage): one stage at a time."""
        return self.models_dir / ".rnnlm.lock"

    # tokenize -> train, export, evaluate
    @property
    def vocab(self) -> Path:
        return self.processed_dir / "vocab.json"

    @property
    def tokenizer(self) -> Path:
        return self.processed_dir / "tokenizer.json"

    @property
    def splits(self) -> Path:
        return self.processed_dir / "splits.json"

    @property
    def stats(self) -> Path:
        return self.processed_dir / "stats.json"

    def split_ids(self, split: str) -> Path:
        """The token ids of `split` (one of SPLITS)."""
        return self.processed_dir / f"{split}.npy"

    # train -> export, evaluate
    @property
    def checkpoint(self) -> Path:
        return self.models_dir / "model.ckpt"

    @property
    def checkpoints_dir(self) -> Path:
        """Resume checkpoints of an unfinished training (deleted when it completes)."""
        return self.models_dir / "checkpoints"

    @property
    def train_metrics(self) -> Path:
        return self.metrics_dir / "train.json"

    @property
    def train_run(self) -> Path:
        """The training's MLflow run id and where it ran (not a metrics file: no numbers)."""
        return self.metrics_dir / "train_run.json"

    @property
    def train_curve(self) -> Path:
        return self.metrics_dir / "train_curve.csv"

    @property
    def train_curve_png(self) -> Path:
        return self.metrics_dir / "train_curve.png"

    # export -> evaluate, inference
    @property
    def onnx_model(self) -> Path:
        return self.models_dir / "model.onnx"

    @property
    def int8_model(self) -> Path:
        return self.models_dir / "model.int8.onnx"

    @property
    def export_metrics(self) -> Path:
        return self.metrics_dir / "export.json"

    @property
    def export_model(self) -> Path:
        """The logged model's MLflow id and URI, its registered name and version."""
        return self.metrics_dir / "export_model.json"

    # evaluate
    @property
    def eval_metrics(self) -> Path:
        return self.metrics_dir / "eval.json"

    @property
    def samples(self) -> Path:
        return self.metrics_dir / "samples.txt"


@dataclass(frozen=True)
class CorpusParams:
    """Stage `download`: which NLTK corpus package and where to get it."""

    name: str
    # The NLTK data server's index; RNNLM_NLTK_MIRROR (a folder or URL) takes precedence.
    index_url: str
    # Each wait for data from a server; a read that gets none for this long fails (and is retried).
    timeout_s: float = field(metadata=_range(0, 3600, lo_open=True))
    retries: int = field(metadata=_range(0, 20))
    # All network work of the stage (index, package, retries and waits between them).
    deadline_s: float = field(metadata=_range(0, 86400, lo_open=True))


# The split rules the tokenize stage runs (what `tokenize.split_by: auto` resolves to).
SplitRule = Literal["document", "span"]


@dataclass(frozen=True)
class TokenizeParams:
    """Stage `tokenize`: tokenization, vocabulary and the train/validation/test split rule."""

    lowercase: bool
    # `line`: each non-empty line is a paragraph; `blank_line`: blank lines separate paragraphs.
    paragraphs: Literal["line", "blank_line"]
    max_size: int = field(metadata=_range(3))
    min_freq: int = field(metadata=_range(1))
    # `document`: documents sorted by file name, index i split by the rule below. `span`: each
    # document cut into split_every spans of about equal length (never inside a paragraph, nor
    # inside a sentence), span i split by the rule below. `auto`: `document` when every split
    # gets a document that way, else `span` (see rnnlm.tokenization).
    split_by: Literal["auto", "document", "span"]
    # Index i (of a document, or of a span) goes to test when i % split_every == test_remainder,
    # to validation when i % split_every == val_remainder, to train otherwise.
    split_every: int = field(metadata=_range(3))
    val_remainder: int = field(metadata=_range(0))
    test_remainder: int = field(metadata=_range(0))

    def __post_init__(self) -> None:
        for key in ("val_remainder", "test_remainder"):
            value = getattr(self, key)
            if value >= self.split_every:
                raise ConfigError(
                    f"tokenize.{key} = {value}: must be < tokenize.split_every ({self.split_every})"
                )
        if self.val_remainder == self.test_remainder:
            raise ConfigError(
                f"tokenize.val_remainder = tokenize.test_remainder = {self.val_remainder}: "
                "validation and test must get different documents"
            )


Cell = Literal["rnn_tanh", "rnn_relu", "gru", "lstm"]


@dataclass(frozen=True)
class ModelParams:
    """Stage `train`: the network (see model.py)."""

    cell: Cell
    embedding_dim: int = field(metadata=_range(1, 65536))
    hidden_dim: int = field(metadata=_range(1, 65536))
    num_layers: int = field(metadata=_range(1, 16))
    dropout: float = field(metadata=_range(0.0, 0.95))
    embedding_dropout: float = field(metadata=_range(0.0, 0.95))
    tie_weights: bool
    # DropConnect on the hidden-to-hidden matrices, one mask per training window (0: off).
    weight_drop: float = field(metadata=_range(0.0, 0.95))
    # Adaptive softmax (model.py's Decoder): the ids where the frequency-sorted vocabulary is
    # cut into a head and tail clusters; null: one softmax over the whole vocabulary.
    softmax_cutoffs: list[int] | None = field(metadata=_range(1, 16 * 65536))

    def __post_init__(self) -> None:
        cutoffs = self.softmax_cutoffs
        if cutoffs is not None and any(a >= b for a, b in itertools.pairwise(cutoffs)):
            raise ConfigError(
                f"model.softmax_cutoffs = {short_repr(cutoffs)}: must be strictly increasing "
                "(vocabulary ids where the head ends and each tail cluster ends)"
            )
        if self.tie_weights and self.embedding_dim != self.hidden_dim:
            raise ConfigError(
                f"model.tie_weights = true needs model.embedding_dim == model.hidden_dim "
                f"(got {self.embedding_dim} and {self.hidden_dim}): set them equal or "
                "tie_weights: false"
            )


@dataclass(frozen=True)
class CellOverrides:
    """Per-cell training settings that replace the `train` values for that cell only."""

    # Absent (null): the `train` value applies.
    lr: float | None = field(default=None, metadata=_range(0.0, 100.0, lo_open=True))
    grad_clip: float | None = field(default=None, metadata=_range(0.0, lo_open=True))
    ar_alpha: float | None = field(default=None, metadata=_range(0.0, 100.0))
    tar_beta: float | None = field(default=None, metadata=_range(0.0, 100.0))


@dataclass(frozen=True)
class TrainParams:
    """Stage `train`: optimisation, truncated BPTT and the Lightning Trainer."""

    seed: int = field(metadata=_range(0, 2**32 - 1))
    batch_size: int = field(metadata=_range(1))
    bptt: int = field(metadata=_range(1))
    eval_batch_size: int = field(metadata=_range(1))
    eval_bptt: int = field(metadata=_range(1))
    max_epochs: int = field(metadata=_range(1))
    max_time_min: float | None = field(metadata=_range(0.0, lo_open=True))
    optimizer: Literal["adamw", "adam", "sgd"]
    lr: float = field(metadata=_range(0.0, 100.0, lo_open=True))
    weight_decay: float = field(metadata=_range(0.0))
    grad_clip: float = field(metadata=_range(0.0, lo_open=True))
    # plateau: lr *= lr_factor after an epoch that improved val loss by < lr_threshold (relative);
    # cosine: from lr down to min_lr along a half cosine, step by step, over max_epochs.
    lr_schedule: Literal["plateau", "cosine"]
    lr_factor: float = field(metadata=_range(0.0, 1.0, lo_open=True))
    lr_patience: int = field(metadata=_range(0))
    # Relative val-loss improvement below which an epoch counts as a plateau.
    lr_threshold: float = field(metadata=_range(0.0, 1.0))
    min_lr: float = field(metadata=_range(0.0))
    # Activation regularisation (AR, alpha * mean of the dropped top-layer outputs squared) and
    # temporal activation regularisation (TAR, beta * mean squared step of the undropped
    # outputs), Merity et al. 2018; training loss only, 0: off.
    ar_alpha: float = field(metadata=_range(0.0, 100.0))
    tar_beta: float = field(metadata=_range(0.0, 100.0))
    # Validation, test, the checkpoint's exported weights: an exponential moving average of the
    # weights with this decay per optimizer step (warmed up as min(decay, (1 + n) / (10 + n)));
    # null: the raw weights.
    ema_decay: float | None = field(metadata=_range(0.0, 0.99999, lo_open=True))
    early_stopping_patience: int = field(metadata=_range(1))
    cell_overrides: dict[str, CellOverrides]
    # Lightning's built-in accelerators; `auto` picks CUDA or MPS when present, else the CPU.
    accelerator: Literal["auto", "cpu", "cuda", "gpu", "mps", "tpu", "hpu"]
    devices: int | str
    strategy: str
    num_nodes: int = field(metadata=_range(1))
    # How long DDP processes wait for a peer (to join at the start, or in any collective).
    ddp_timeout_s: float = field(metadata=_range(1.0, 86400.0))
    precision: Literal["32-true", "32", "16-mixed", "bf16-mixed", "64-true"]
    # torch.use_deterministic_algorithms: needed for bitwise-repeatable CUDA runs; CPU runs repeat
    # without it, and it costs about 8% of CPU training throughput.
    deterministic: bool
    log_every_n_steps: int = field(metadata=_range(1))
    # Without a terminal (CI, a log file) a progress line is logged this often during an epoch.
    progress_every_s: float = field(metadata=_range(0.0))
    # Continue an interrupted training from models/checkpoints/last.ckpt when its params and
    # data match these; false: always start afresh (the old checkpoints are deleted).
    resume: bool

    def __post_init__(self) -> None:
        for cell in self.cell_overrides:
            if cell not in typing.get_args(Cell):
                raise ConfigError(
                    f"train.cell_overrides.{cell}: unknown cell "
                    f"(allowed: {', '.join(typing.get_args(Cell))})"
                )
        if isinstance(self.devices, str) and self.devices != "auto":
            raise ConfigError(
                f"train.devices = {short_repr(self.devices)}: expected an int >= 1 or 'auto'"
            )
        if isinstance(self.devices, int) and self.devices < 1:
            raise ConfigError(f"train.devices = {self.devices}: must be >= 1 or 'auto'")

    def for_cell(self, cell: str) -> TrainParams:
        """These params with the overrides for `cell` applied."""
        override = self.cell_overrides.get(cell)
        if override is None:
            return self
        changes = {k: v for k, v in dataclasses.asdict(override).items() if v is not None}
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class MlflowParams:
    """Where runs are tracked. MLFLOW_TRACKING_URI, when set, wins over `tracking_uri`."""

    experiment_name: str
    # null: SQLite under the project's mlruns/ (sqlite:///<root>/mlruns/mlflow.db).
    tracking_uri: str | None


@dataclass(frozen=True)
class ExportParams:
    """Stage `export`: checkpoint -> ONNX (fp32 and int8), parity check, model registry."""

    # torchscript: the only exporter that keeps the time axis dynamic for every cell with
    # torch 2.13 (dynamo freezes it for nn.RNN); the parity check refuses a model that is wrong.
    exporter: Literal["torchscript", "dynamo"]
    opset: int = field(metadata=_range(13, 22))
    atol: float = field(metadata=_range(0.0, 1.0, lo_open=True))
    latency_tokens: int = field(metadata=_range(1, 100000))
    latency_threads: int = field(metadata=_range(1, 256))
    # Largest allowed |int8 - fp32| / fp32 validation perplexity, in percent; beyond it the
    # export fails (the int8 model is a DVC out: it must be usable when it is there).
    int8_max_ppl_change_pct: float = field(metadata=_range(0.0, 100.0, lo_open=True))
    registered_model_name: str | None  # null: log to MLflow without registering
    # The continuous cache's grid, searched on the validation split (rnnlm.cache.tune_cache):
    # every combination is tried, and the cache off (lambda 0) is always a candidate.
    cache_thetas: list[float] = field(metadata=_range(0.0, 1000.0, lo_open=True))
    cache_lambdas: list[float] = field(metadata=_range(0.0, 0.99, lo_open=True))
    cache_windows: list[int] = field(metadata=_range(1, 100_000))
    # The interpolated Kneser-Ney n-gram (rnnlm.ngram), counted on the training split: the one
    # the model mixes in after its cache (its weight fitted on validation; `ngram_mix: false`
    # ships none) and the evaluate stage's Kneser-Ney baseline.
    ngram_order: int = field(metadata=_range(1, 10))
    # modified: discounts D1, D2, D3+ per order (Chen & Goodman); single: one D per order.
    ngram_discount: Literal["modified", "single"]
    ngram_mix: bool
    # The registered pyfunc model's model_config (rnnlm.serving.ServingConfig): onnxruntime
    # threads per loaded copy, and what one request may hold; null: no limit.
    serving_threads: int = field(metadata=_range(1, 256))
    serving_max_documents: int | None = field(metadata=_range(1))
    serving_max_chars: int | None = field(metadata=_range(1))
    serving_max_tokens: int | None = field(metadata=_range(1))


@dataclass(frozen=True)
class EvaluateParams:
    """Stage `evaluate`: test perplexity of the ONNX model, count-based baselines, samples."""

    # Largest allowed |ONNX - PyTorch| / PyTorch test perplexity; beyond it the stage fails.
    tolerance: float = field(metadata=_range(0.0, 1.0, lo_open=True))
    # Samples: name -> prompt, each continued `samples_per_prompt` times from one seed.
    sample_prompts: dict[str, str]
    sample_tokens: int = field(metadata=_range(1, 10000))
    samples_per_prompt: int = field(metadata=_range(1, 100))
    sample_temperature: float = field(metadata=_range(0.0))
    sample_seed: int = field(metadata=_range(0, 2**32 - 1))


@dataclass(frozen=True)
class Params:
    """Every section of params.yaml."""

    paths: Paths
    corpus: CorpusParams
    tokenize: TokenizeParams
    model: ModelParams
    train: TrainParams
    mlflow: MlflowParams
    export: ExportParams
    evaluate: EvaluateParams


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    return {type(None): "null", Path: "a path"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp`; return it converted (int->float, str->Path)."""
    origin = typing.get_origin(tp)
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        for option in typing.get_args(tp):
            try:
                return _coerce(key, value, option)
            except ConfigError:
                continue
    elif origin is Literal:
        if value in typing.get_args(tp) and type(value) is not bool:
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        if value is None:  # a section whose keys are all commented out: each key is missing
            value = {}
        if isinstance(value, Mapping):
            return build_section(typing.cast(type, tp), value, prefix=key)
        raise ConfigError(f"{key} = {short_repr(value)}: expected a mapping of keys to values")
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            # YAML's .nan slips past every range check (all comparisons are false), and .inf
            # (or an int beyond any float) is no setting: refuse them here.
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if math.isfinite(number):
                return number
            raise ConfigError(f"{key} = {short_repr(value)}: expected a finite number")
    elif tp is str:
        if isinstance(value, str) and value.strip():
            return value
    elif tp is Path:
        if isinstance(value, str) and value.strip():
            return Path(value)
    elif origin is list:
        (item_tp,) = typing.get_args(tp)
        if isinstance(value, list) and value:
            try:
                return [_coerce(key, item, item_tp) for item in value]
            except ConfigError:
                pass
        raise ConfigError(
            f"{key} = {short_repr(value)}: expected a non-empty list of {_type_name(item_tp)}"
        )
    elif origin is dict:
        if isinstance(value, Mapping):
            key_tp, value_tp = typing.get_args(tp)
            return {
                _coerce(f"{key}.{k}", k, key_tp): _coerce(f"{key}.{k}", v, value_tp)
                for k, v in value.items()
            }
    raise ConfigError(f"{key} = {short_repr(value)}: expected {_type_name(tp)}")


def _check_range(key: str, value: Any, meta: Mapping[str, Any]) -> None:
    """The range in `meta` holds for `value`, or for each item of a list."""
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open", False)
    if value is None or (lo is None and hi is None):
        return
    items = value if isinstance(value, list) else [value]
    too_low = lo is not None and any(v <= lo if lo_open else v < lo for v in items)
    too_high = hi is not None and any(v > hi for v in items)
    if too_low or too_high:
        bounds = [
            f"{'>' if lo_open else '>='} {lo}" if lo is not None else "",
            f"<= {hi}" if hi is not None else "",
        ]
        allowed = " and ".join(b for b in bounds if b)
        each = "each value " if isinstance(value, list) else ""
        raise ConfigError(f"{key} = {short_repr(value)}: {each}must be {allowed}")


def _key_text(key: Any) -> str:
    """A key as written, unless printing it whole would not make a short readable line."""
    if isinstance(key, str) and len(key) <= 60 and key.isprintable():
        return key
    return short_repr(key)


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from the mapping `raw`, validating every key under `prefix`."""
    if not isinstance(raw, Mapping):
        where = f"{prefix} = " if prefix else "top level = "
        raise ConfigError(f"{where}{short_repr(raw)}: expected a mapping of keys to values")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields), key=str)
    if unknown:
        raise ConfigError(
            f"{prefix}.{_key_text(unknown[0])}: unknown key (allowed: {', '.join(fields)})"
        )
    # params.yaml is the one source of values: a key left out is an error, not a default.
    missing = [
        name
        for name, f in fields.items()
        if name not in raw
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        key = f"{prefix}.{missing[0]}".lstrip(".")
        more = f" (and {', '.join(missing[1:])})" if len(missing) > 1 else ""
        raise ConfigError(
            f"{key}: missing{more}; every key must be set (see the shipped params.yaml)"
        )
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        values[name] = _coerce(key, value, hints[name])
        _check_range(key, values[name], fields[name].metadata)
    return cls(**values)


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate an already-parsed params mapping; errors are prefixed with `source`."""
    if raw is None:  # an empty file: every section is missing
        raw = {}
    try:
        return build_section(Params, raw, prefix="")
    except ConfigError as err:
        raise ConfigError(f"{source}: {str(err).lstrip('.')}") from None


def _expanded_size(node: yaml.Node, source: str, limit: int) -> int:
    """How many YAML nodes `node` stands for once every alias is expanded, stopping early
    (ConfigError) past `limit` or at an alias that contains itself."""
    sizes: dict[int, int] = {}  # an alias is the same node object: each is counted once
    open_nodes: set[int] = set()

    def size(n: yaml.Node) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if key in open_nodes:
            raise ConfigError(f"{source}: a YAML alias refers to a value that contains it")
        open_nodes.add(key)
        total = 1
        if isinstance(n, yaml.SequenceNode):
            total += sum(size(child) for child in n.value)
        elif isinstance(n, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in n.value)
        if total > limit:
            raise ConfigError(
                f"{source}: stands for more than {limit:,} values once its YAML aliases (*name) "
                "are expanded; a parameters file is a few hundred"
            )
        open_nodes.discard(key)
        sizes[key] = total
        return total

    return size(node)


def parse_yaml(data: bytes, source: str) -> Any:
    """The YAML document in `data` (UTF-8), refused in one line when it is not one, or when it
    is far larger than a parameters file (in bytes, or in values once aliases expand)."""
    if len(data) > MAX_PARAMS_BYTES:
        raise ConfigError(
            f"{source}: {len(data):,} bytes, more than {MAX_PARAMS_BYTES:,}: not a parameters file"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{source}: not UTF-8 text (byte 0x{data[err.start]:02x} on line {line}); "
            "save it as UTF-8"
        ) from None
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, source, MAX_PARAMS_NODES)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        raise ConfigError(f"{source}: not valid YAML: {err}") from None
    except RecursionError:
        raise ConfigError(f"{source}: nested too deeply to be a parameters file") from None
    finally:
        loader.dispose()


def load_params(path: Path | str = DEFAULT_PARAMS) -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = fh.read(MAX_PARAMS_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{path}: parameters file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, expected a parameters file") from None
    return parse_params(parse_yaml(data, str(path)), source=str(path))


def as_flat_dict(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten nested dataclasses into `section.key` entries (for tracking and digests)."""
    flat: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            flat.update(as_flat_dict(value, prefix=f"{key}."))
        elif (
            value
            and isinstance(value, Mapping)
            and all(map(dataclasses.is_dataclass, value.values()))
        ):
            for name, section in value.items():
                flat.update(as_flat_dict(section, prefix=f"{key}.{name}."))
        elif isinstance(value, Path):
            flat[key] = str(value)
        else:
            flat[key] = value
    return flat


def training_values(model: ModelParams, train: TrainParams) -> dict[str, Any]:
    """What a training ran with: the `model` and `train` params as one flat dict (`model.*`,
    `train.*`). A resumable checkpoint's fingerprint and the exported model's params digest
    are both made from it."""
    return {**as_flat_dict(model, "model."), **as_flat_dict(train, "train.")}


def params_digest(values: Mapping[str, Any]) -> str:
    """sha256 of a flat parameter dict, independent of key order (the ONNX provenance)."""
    text = json.dumps(dict(values), sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
