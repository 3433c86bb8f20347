"""config.py: the real params.yaml loads, dvc.yaml's params exist, every bad value is refused.

Each refusal must be a `ConfigError` whose message names the offending key and value, so a typo
in params.yaml (or in `dvc exp run -S`) is found from the message alone.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import fnmatch
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import pytest
import yaml

from rnnlm import serving
from rnnlm.config import (
    SPLITS,
    CellOverrides,
    ConfigError,
    Params,
    as_flat_dict,
    load_params,
    params_digest,
    parse_params,
    training_values,
)
from rnnlm.model import RNNLMConfig
from rnnlm.stage import stage_argparser

ROOT = Path(__file__).resolve().parents[2]
PARAMS_YAML = ROOT / "params.yaml"
DVC_YAML = ROOT / "dvc.yaml"


def shipped_with(overrides: Any) -> Any:
    """The shipped params.yaml with `overrides` (section -> key -> value) applied; anything
    but a mapping of mappings replaces what it names (or everything) whole."""
    if not isinstance(overrides, Mapping):
        return overrides
    raw = yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))
    for section, values in overrides.items():
        if isinstance(values, Mapping) and isinstance(raw.get(section), Mapping):
            raw[section] = {**raw[section], **values}
        else:
            raw[section] = values
    return raw


def refused(overrides: Any) -> str:
    """The message of the ConfigError that parsing the shipped params with `overrides` raises."""
    with pytest.raises(ConfigError) as err:
        parse_params(shipped_with(overrides))
    message = str(err.value)
    assert message.startswith("params.yaml: ")
    assert "\n" not in message
    return message


def test_real_params_yaml_loads_every_value() -> None:
    params = load_params(PARAMS_YAML)
    raw = yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))
    flat = as_flat_dict(params)
    for section, values in raw.items():
        assert isinstance(getattr(params, section), typing.get_type_hints(Params)[section])
        for key, value in values.items():
            if f"{section}.{key}" in flat:
                assert flat[f"{section}.{key}"] == value, f"{section}.{key}"
                continue
            # A mapping of sections (train.cell_overrides) flattens to section.key.name.field.
            for name, fields in value.items():
                for field_name, field_value in fields.items():
                    flat_key = f"{section}.{key}.{name}.{field_name}"
                    assert flat[flat_key] == field_value, flat_key
    assert isinstance(params.paths.raw_dir, Path)


def test_real_params_yaml_sets_every_field() -> None:
    """Every knob is visible in params.yaml, so no stage runs on a hidden default."""
    raw = yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))
    written = {f"{s}.{k}" for s, values in raw.items() for k in values}
    hints = typing.get_type_hints(Params)
    fields = {f"{s}.{f.name}" for s in hints for f in dataclasses.fields(hints[s])}
    assert written == fields


def _dvc_params_entries() -> list[str]:
    stages = yaml.safe_load(DVC_YAML.read_text(encoding="utf-8"))["stages"]
    entries: list[str] = []
    for stage in stages.values():
        for entry in stage.get("params", []):
            if isinstance(entry, dict):  # {other_file.yaml: [keys]}
                for keys in entry.values():
                    entries.extend(keys)
            else:
                entries.append(entry)
    return entries


@pytest.mark.parametrize("entry", _dvc_params_entries())
def test_dvc_yaml_params_entry_exists_in_params(entry: str) -> None:
    obj: Any = load_params(PARAMS_YAML)
    for part in entry.split("."):
        assert hasattr(obj, part), f"dvc.yaml lists params {entry!r}, Params has no {part!r}"
        obj = getattr(obj, part)
    if "." not in entry:  # a whole section
        assert dataclasses.is_dataclass(obj)


def test_dvc_yaml_params_cover_sections_and_templates_resolve() -> None:
    text = DVC_YAML.read_text(encoding="utf-8")
    entries = _dvc_params_entries()
    assert {"corpus", "tokenize", "model", "train"} <= {e.split(".")[0] for e in entries}
    flat = as_flat_dict(load_params(PARAMS_YAML))
    templates = re.findall(r"\$\{([^}]+)\}", text)
    assert templates, "dvc.yaml should take its paths from params.yaml"
    for ref in templates:
        assert ref.strip() in flat, f"dvc.yaml uses ${{{ref}}}, which Params lacks"


def _dvc_yaml_files() -> dict[str, set[str]]:
    """Stage -> the paths dvc.yaml declares as its outs and metrics, templated from params."""
    flat = as_flat_dict(load_params(PARAMS_YAML))
    stages = yaml.safe_load(DVC_YAML.read_text(encoding="utf-8"))["stages"]
    declared: dict[str, set[str]] = {}
    for name, stage in stages.items():
        entries = [*stage.get("outs", []), *stage.get("metrics", [])]
        paths = [e if isinstance(e, str) else next(iter(e)) for e in entries]
        declared[name] = {
            re.sub(r"\$\{([^}]+)\}", lambda m: str(flat[m[1].strip()]), path) for path in paths
        }
    return declared


def test_dvc_yaml_declares_every_file_paths_names() -> None:
    """Paths is the code's one home for file names; dvc.yaml must spell the same ones."""
    paths = load_params(PARAMS_YAML).paths
    expected = {
        "tokenize": {
            paths.vocab, paths.tokenizer, paths.splits, paths.stats,
            *(paths.split_ids(split) for split in SPLITS),
        },
        "train": {
            paths.checkpoint, paths.train_metrics, paths.train_run, paths.train_curve,
            paths.train_curve_png,
        },
        "export": {paths.onnx_model, paths.int8_model, paths.export_metrics, paths.export_model},
        "evaluate": {paths.eval_metrics, paths.samples},
    }  # fmt: skip
    declared = _dvc_yaml_files()
    for stage, files in expected.items():
        assert declared[stage] == {str(f) for f in files}, stage


def test_missing_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match=re.escape(f"{missing}: parameters file not found")):
        load_params(missing)


def test_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    path.write_text("train:\n  lr: [0.1, 0.2\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}: not valid YAML")):
        load_params(path)


@pytest.mark.parametrize("text", ["", "# nothing but a comment\n"], ids=["empty", "comment"])
def test_empty_file_is_refused_naming_what_is_missing(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"{path}: paths: missing (and corpus, ")):
        load_params(path)


def test_an_empty_section_is_refused_naming_its_first_key() -> None:
    assert refused({"model": None}).startswith("params.yaml: model.cell: missing (and ")


BILLION_LAUGHS = """\
a: &a [x, x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        # Latin-1 bytes from an editor that did not save UTF-8
        (b"model:\n  cell: gru\n  # caf\xe9\n", "not UTF-8 text (byte 0xe9 on line 3); save it"),
        (BILLION_LAUGHS.encode(), "more than 100,000 values once its YAML aliases"),
        (b"a: &a [1, *a]\n", "a YAML alias refers to a value that contains it"),
        (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "nested too deeply"),
        (b"# " + b"x" * (1 << 20) + b"\n", "bytes, more than 1,048,576: not a parameters file"),
        (b"model: [\n", "not valid YAML"),
    ],
)
def test_hostile_params_files_are_refused_in_one_short_line(
    tmp_path: Path, content: bytes, message: str
) -> None:
    path = tmp_path / "params.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as err:
        load_params(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value)
    assert len(str(err.value).splitlines()[0]) < 300


def test_a_huge_value_is_shown_cut_short(tmp_path: Path) -> None:
    path = tmp_path / "params.yaml"
    text = PARAMS_YAML.read_text(encoding="utf-8")
    path.write_text(re.sub(r"(?m)^  lr: .*$", "  lr: " + "9" * 100_000 + "x", text, count=1))
    with pytest.raises(ConfigError, match=r"train\.lr = '9{56}\.\.\.: expected float") as err:
        load_params(path)
    assert len(str(err.value)) < 300


def test_errors_from_a_file_name_the_file(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    shipped = PARAMS_YAML.read_text(encoding="utf-8")
    assert "\n  cell: " in shipped
    path.write_text(shipped.replace("\n  cell: ", "\n  cel: ", 1))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: model.cel: unknown key")):
        load_params(path)


def test_unknown_top_level_section() -> None:
    message = refused({"modle": {"cell": "gru"}})
    assert "modle: unknown key" in message
    assert "allowed: paths, corpus, tokenize, model, train, mlflow" in message


@pytest.mark.parametrize(
    ("section", "key"),
    [("train", "lr_rate"), ("corpus", "url"), ("paths", "data_dir"), ("mlflow", "uri")],
)
def test_unknown_key_in_section(section: str, key: str) -> None:
    message = refused({section: {key: 1}})
    assert f"{section}.{key}: unknown key" in message


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "batch_size", "32", "'32': expected int"),
        ("train", "batch_size", 32.0, "32.0: expected int"),
        ("train", "batch_size", True, "True: expected int"),
        ("train", "batch_size", None, "None: expected int"),
        ("train", "lr", "fast", "'fast': expected float"),
        ("train", "lr", True, "True: expected float"),
        ("train", "max_time_min", "1h", "'1h': expected float or null"),
        ("tokenize", "lowercase", "yes", "'yes': expected bool"),
        ("tokenize", "lowercase", 1, "1: expected bool"),
        ("corpus", "name", 42, "42: expected str"),
        ("corpus", "name", "  ", "'  ': expected str"),
        ("paths", "raw_dir", "", "'': expected a path"),
        ("paths", "raw_dir", ["data"], "['data']: expected a path"),
        ("mlflow", "tracking_uri", 3, "3: expected str or null"),
        ("train", "cell_overrides", ["gru"], "['gru']: expected dict"),
    ],
)
def test_wrong_type_names_key_and_value(
    section: str, key: str, value: object, expected: str
) -> None:
    message = refused({section: {key: value}})
    assert f"{section}.{key} = {expected}" in message


def test_int_becomes_float_and_str_becomes_path() -> None:
    params = parse_params(
        shipped_with({"corpus": {"timeout_s": 5}, "paths": {"raw_dir": "elsewhere/raw"}})
    )
    assert params.corpus.timeout_s == 5.0 and isinstance(params.corpus.timeout_s, float)
    assert params.paths.raw_dir == Path("elsewhere/raw")


@pytest.mark.parametrize("section", ["train", "model"])
def test_section_must_be_a_mapping(section: str) -> None:
    assert f"{section} = 5: expected " in refused({section: 5})


def test_top_level_must_be_a_mapping() -> None:
    assert "[1, 2]: expected a mapping" in refused([1, 2])


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("train", "batch_size", 0, "train.batch_size = 0: must be >= 1"),
        ("train", "lr", 0.0, "train.lr = 0.0: must be > 0.0 and <= 100.0"),
        ("train", "lr", 101, "train.lr = 101.0: must be > 0.0 and <= 100.0"),
        ("train", "seed", -1, "train.seed = -1: must be >= 0 and <= 4294967295"),
        ("train", "lr_factor", 1.5, "train.lr_factor = 1.5: must be > 0.0 and <= 1.0"),
        ("train", "max_time_min", 0, "train.max_time_min = 0.0: must be > 0.0"),
        ("model", "dropout", 0.99, "model.dropout = 0.99: must be >= 0.0 and <= 0.95"),
        ("model", "num_layers", 0, "model.num_layers = 0: must be >= 1 and <= 16"),
        ("corpus", "timeout_s", 0, "corpus.timeout_s = 0.0: must be > 0 and <= 3600"),
        ("corpus", "retries", 21, "corpus.retries = 21: must be >= 0 and <= 20"),
        ("tokenize", "max_size", 2, "tokenize.max_size = 2: must be >= 3"),
        ("tokenize", "min_freq", 0, "tokenize.min_freq = 0: must be >= 1"),
        ("tokenize", "split_every", 2, "tokenize.split_every = 2: must be >= 3"),
    ],
)
def test_out_of_range(section: str, key: str, value: object, expected: str) -> None:
    assert expected in refused({section: {key: value}})


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("model", "cell", "transformer"),
        ("model", "cell", "LSTM"),
        ("train", "optimizer", "rmsprop"),
        ("train", "precision", "16"),
        ("tokenize", "paragraphs", "sentence"),
    ],
)
def test_literal_not_allowed(section: str, key: str, value: str) -> None:
    message = refused({section: {key: value}})
    assert f"{section}.{key} = {value!r}: expected one of " in message


def test_literal_lists_the_allowed_values() -> None:
    message = refused({"model": {"cell": "transformer"}})
    assert "'rnn_tanh', 'rnn_relu', 'gru', 'lstm'" in message


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"val_remainder": 10}, "tokenize.val_remainder = 10: must be < tokenize.split_every (10)"),
        ({"test_remainder": 12}, "tokenize.test_remainder = 12: must be < tokenize.split_every"),
        (
            {"split_every": 5, "val_remainder": 8, "test_remainder": 4},
            "tokenize.val_remainder = 8: must be < tokenize.split_every (5)",
        ),
        (
            {"val_remainder": 3, "test_remainder": 3},
            "tokenize.val_remainder = tokenize.test_remainder = 3",
        ),
    ],
    ids=["val-equal", "test-above", "smaller-every", "same-remainder"],
)
def test_tokenize_remainders(values: dict[str, int], expected: str) -> None:
    assert expected in refused({"tokenize": values})


def test_tokenize_valid_remainders() -> None:
    p = parse_params(
        shipped_with({"tokenize": {"split_every": 5, "val_remainder": 0, "test_remainder": 4}})
    )
    assert (p.tokenize.split_every, p.tokenize.val_remainder, p.tokenize.test_remainder) == (
        5,
        0,
        4,
    )


def test_softmax_cutoffs_must_increase_and_stay_inside_the_vocabulary() -> None:
    message = refused({"model": {"softmax_cutoffs": [4000, 1000]}})
    assert "model.softmax_cutoffs = [4000, 1000]: must be strictly increasing" in message
    assert "each value must be >= 1" in refused({"model": {"softmax_cutoffs": [0, 10]}})
    adaptive = parse_params(shipped_with({"model": {"softmax_cutoffs": [10, 20]}})).model
    assert adaptive.softmax_cutoffs == [10, 20]
    with pytest.raises(ConfigError, match=r"below the vocabulary size, 20 \(tokenize"):
        RNNLMConfig.of(adaptive, vocab_size=20)
    assert RNNLMConfig.of(adaptive, vocab_size=21).softmax_cutoffs == (10, 20)
    # Checkpoints and models written before the key existed load as one-softmax networks.
    old = dataclasses.asdict(RNNLMConfig.of(adaptive, 21))
    del old["softmax_cutoffs"]
    assert RNNLMConfig(**old).softmax_cutoffs == ()


def test_tie_weights_needs_equal_dims() -> None:
    message = refused({"model": {"embedding_dim": 128, "hidden_dim": 256}})
    assert "model.tie_weights = true" in message and "128 and 256" in message
    untied = parse_params(
        shipped_with({"model": {"embedding_dim": 128, "hidden_dim": 256, "tie_weights": False}})
    )
    assert untied.model.embedding_dim != untied.model.hidden_dim


def test_cell_overrides_unknown_cell() -> None:
    message = refused({"train": {"cell_overrides": {"transformer": {"lr": 0.1}}}})
    assert "train.cell_overrides.transformer: unknown cell" in message
    assert "rnn_tanh, rnn_relu, gru, lstm" in message


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ({"lr_rate": 0.1}, "train.cell_overrides.gru.lr_rate: unknown key"),
        ({"lr": -1}, "train.cell_overrides.gru.lr = -1.0: must be > 0.0"),
        ({"grad_clip": "big"}, "train.cell_overrides.gru.grad_clip = 'big': expected float"),
    ],
)
def test_cell_overrides_values_are_checked(override: dict[str, object], expected: str) -> None:
    assert expected in refused({"train": {"cell_overrides": {"gru": override}}})


def test_cell_overrides_parse_into_dataclasses() -> None:
    p = parse_params(
        shipped_with({"train": {"cell_overrides": {"gru": {"lr": 1}, "rnn_tanh": {}}}})
    )
    assert p.train.cell_overrides == {"gru": CellOverrides(lr=1.0), "rnn_tanh": CellOverrides()}


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("gpu", "train.devices = 'gpu': expected an int >= 1 or 'auto'"),
        (0, "train.devices = 0: must be >= 1 or 'auto'"),
        (-2, "train.devices = -2: must be >= 1 or 'auto'"),
        (True, "train.devices = True: expected int or str"),
        (1.5, "train.devices = 1.5: expected int or str"),
    ],
)
def test_devices_bad(value: object, expected: str) -> None:
    assert expected in refused({"train": {"devices": value}})


@pytest.mark.parametrize("value", [1, 4, "auto"])
def test_devices_good(value: int | str) -> None:
    assert parse_params(shipped_with({"train": {"devices": value}})).train.devices == value


def test_params_are_frozen() -> None:
    params = load_params(PARAMS_YAML)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.train.lr = 1.0  # type: ignore[misc]


def test_as_flat_dict() -> None:
    params = parse_params(
        shipped_with(
            {"paths": {"raw_dir": "r"}, "corpus": {"name": "inaugural"}, "model": {"cell": "gru"}}
        )
    )
    flat = as_flat_dict(params)
    assert flat["paths.raw_dir"] == "r" and isinstance(flat["paths.raw_dir"], str)
    assert flat["paths.processed_dir"] == "data/processed"
    assert flat["corpus.name"] == "inaugural"
    assert flat["model.cell"] == "gru"
    assert flat["tokenize.min_freq"] == params.tokenize.min_freq
    assert flat["mlflow.tracking_uri"] is None
    assert flat["train.cell_overrides.rnn_tanh.lr"] == 0.002  # sections in a mapping flatten
    hints = typing.get_type_hints(Params)
    expected_keys = {
        f"{name}.{f.name}"
        for name in hints
        for f in dataclasses.fields(hints[name])
        if f.name != "cell_overrides"
    } | {
        f"train.cell_overrides.{cell}.{f.name}"
        for cell in params.train.cell_overrides
        for f in dataclasses.fields(CellOverrides)
    }
    assert set(flat) == expected_keys
    trained = dataclasses.replace(params.train, lr=0.5)
    assert as_flat_dict(trained, prefix="train.")["train.lr"] == 0.5


def test_for_cell_applies_only_that_cells_overrides() -> None:
    train = dataclasses.replace(
        load_params(PARAMS_YAML).train,
        lr=1e-3,
        grad_clip=0.5,
        ar_alpha=2.0,
        tar_beta=1.0,
        cell_overrides={
            "rnn_tanh": CellOverrides(lr=1e-4, ar_alpha=0.0, tar_beta=0.0),
            "gru": CellOverrides(grad_clip=1.0),
        },
    )
    assert train.for_cell("lstm") is train
    tanh = train.for_cell("rnn_tanh")
    assert (tanh.lr, tanh.grad_clip, tanh.ar_alpha, tanh.tar_beta) == (1e-4, 0.5, 0.0, 0.0)
    gru = train.for_cell("gru")
    assert (gru.lr, gru.grad_clip, gru.ar_alpha, gru.tar_beta) == (1e-3, 1.0, 2.0, 1.0)
    assert dataclasses.replace(tanh, lr=train.lr, ar_alpha=2.0, tar_beta=1.0) == train
    assert train.lr == 1e-3  # the original is untouched


def test_stage_argparser_accepts_only_params(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RNNLM_PARAMS", raising=False)
    parser = stage_argparser("test")
    assert parser.parse_args([]).params == Path("params.yaml")
    assert parser.parse_args(["--params", "x.yaml"]).params == Path("x.yaml")
    with pytest.raises(SystemExit):
        parser.parse_args(["--lr", "0.1"])
    monkeypatch.setenv("RNNLM_PARAMS", "exp/params.yaml")
    assert stage_argparser("test").parse_args([]).params == Path("exp/params.yaml")


@dataclasses.dataclass(frozen=True)
class Leaf:
    """One key of params.yaml: its dotted name, its place in the parsed YAML, its annotation."""

    key: str
    path: tuple[str, ...]
    annotation: Any
    metadata: Mapping[str, Any]


def walk_keys(cls: type, raw: Mapping[str, Any], path: tuple[str, ...] = ()) -> list[Leaf]:
    """Every field of `cls` and of the sections inside it. A mapping-valued key (a dict of
    sections or of strings) also gives one leaf per entry that `raw` holds, so a key added to
    a dataclass or to params.yaml is walked without touching this test."""
    hints = typing.get_type_hints(cls)
    leaves = []
    for f in dataclasses.fields(cls):
        here, tp = (*path, f.name), hints[f.name]
        leaves.append(Leaf(".".join(here), here, tp, f.metadata))
        value = raw.get(f.name) or {}
        if dataclasses.is_dataclass(tp):
            leaves += walk_keys(tp, value, here)
        elif typing.get_origin(tp) is dict:
            entry_tp = typing.get_args(tp)[1]
            for name in value:
                entry = (*here, name)
                leaves.append(Leaf(".".join(entry), entry, entry_tp, {}))
                if dataclasses.is_dataclass(entry_tp):
                    leaves += walk_keys(entry_tp, value[name], entry)
    return leaves


REAL_RAW = yaml.safe_load(PARAMS_YAML.read_text(encoding="utf-8"))
LEAVES = walk_keys(Params, REAL_RAW)
# Keys params.yaml must set: all but the fields of a per-cell override (absent = no override)
# and the entries of mappings (a prompt or a cell's overrides may be dropped).
LEAVES_REQUIRED = [
    leaf
    for leaf in LEAVES
    if ".cell_overrides." not in leaf.key and not leaf.key.startswith("evaluate.sample_prompts.")
]
# Keys whose value is free text (names, paths, URLs, prompts): any non-blank string. A new
# string key belongs here or, when it has a fixed set of values, gets a Literal type.
FREE_TEXT_KEYS = (
    "paths.*", "corpus.name", "corpus.index_url", "train.strategy", "mlflow.experiment_name",
    "mlflow.tracking_uri", "export.registered_model_name",
    "evaluate.sample_prompts.*",
)  # fmt: skip
# Values refused by a section's own check (__post_init__) rather than by the key's type.
CHECKED_AFTER_TYPES: dict[str, list[tuple[str, object]]] = {
    "train.devices": [("not allowed", "gpu"), ("below range", 0)],
}


def _options(tp: Any) -> set[Any]:
    """The types (or Literal types) a value may have, null left out."""
    union = isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union
    return set(typing.get_args(tp) if union else [tp]) - {type(None)}


def _range_ends(leaf: Leaf, kind: type) -> list[tuple[str, object]]:
    """A value of type `kind` just outside each end of `leaf`'s range."""
    step = 1e-6 if kind is float else 1
    lo, hi = leaf.metadata.get("lo"), leaf.metadata.get("hi")
    ends: list[tuple[str, object]] = []
    if lo is not None:
        ends.append(("below range", kind(lo if leaf.metadata["lo_open"] else lo - step)))
    if hi is not None:
        ends.append(("above range", kind(hi + step * max(1, abs(hi)))))
    return ends


def bad_values(leaf: Leaf) -> list[tuple[str, object]]:
    """(what is wrong, value) pairs that params.yaml must refuse for `leaf`."""
    tp = leaf.annotation
    if dataclasses.is_dataclass(tp) or typing.get_origin(tp) is dict:
        return [("wrong type", value) for value in ("x", 5, [1], True)]
    options = _options(tp)
    lists = [o for o in options if typing.get_origin(o) is list]
    if lists:  # a grid: a non-empty list, each value in the range (or null where allowed)
        (item,) = typing.get_args(lists[0])
        bad = [("wrong type", value) for value in ("x", 5, [], ["x"], [True], {"x": 1})]
        if type(None) not in typing.get_args(tp):  # list[...] | None allows null
            bad.append(("wrong type", None))
        if item is float:
            bad.append(("not finite", [0.5, float("nan")]))
        return bad + [(what, [end]) for what, end in _range_ends(leaf, item)]
    literals = [o for o in options if typing.get_origin(o) is Literal]
    numbers = options & {int, float}
    bad: list[tuple[str, object]] = [("wrong type", [1]), ("wrong type", {"x": 1})]
    if bool not in options:
        bad.append(("wrong type", True))
    if not options & {str, Path} and not literals:
        bad.append(("wrong type", "x"))
    if not numbers:
        bad.append(("wrong type", 42))
    if options & {str, Path}:
        bad.append(("blank", "  "))
    bad += [("not allowed", "no-such-choice") for _ in literals]
    if float in numbers:
        bad += [("not finite", value) for value in (float("nan"), float("inf"), -float("inf"))]
    bad += CHECKED_AFTER_TYPES.get(leaf.key, [])
    if numbers and leaf.metadata:
        bad += _range_ends(leaf, float if float in numbers else int)
    return bad


def with_value(raw: Mapping[str, Any], path: tuple[str, ...], value: object) -> dict[str, Any]:
    """A deep copy of `raw` with the key at `path` set to `value`."""
    out = copy.deepcopy(dict(raw))
    node = out
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    return out


def test_the_walk_reaches_every_key() -> None:
    walked = {leaf.key for leaf in LEAVES}
    assert set(as_flat_dict(load_params(PARAMS_YAML))) <= walked
    assert {"train.cell_overrides.rnn_tanh.lr", "evaluate.sample_prompts.nation"} <= walked


def test_every_numeric_key_has_a_range() -> None:
    """A number with no bounds is an unchecked knob: give the new field `_range(...)`."""

    def numeric(tp: Any) -> bool:
        if typing.get_origin(tp) is list:  # a grid of numbers
            return numeric(typing.get_args(tp)[0])
        return bool(_options(tp)) and _options(tp) <= {int, float}

    unbounded = [
        leaf.key
        for leaf in LEAVES
        if numeric(leaf.annotation)
        if leaf.metadata.get("lo") is None and leaf.metadata.get("hi") is None
    ]
    assert unbounded == []


def test_string_keys_are_choices_or_known_free_text() -> None:
    free = [
        leaf.key
        for leaf in LEAVES
        if _options(leaf.annotation) & {str, Path}
        if not any(fnmatch.fnmatch(leaf.key, pattern) for pattern in FREE_TEXT_KEYS)
        if leaf.key not in CHECKED_AFTER_TYPES
    ]
    assert free == [], "a Literal of the allowed values, or add the key to FREE_TEXT_KEYS"


@pytest.mark.parametrize("leaf", LEAVES, ids=[leaf.key for leaf in LEAVES])
def test_every_key_refuses_bad_values_naming_the_key(leaf: Leaf) -> None:
    """Each key of the real params.yaml, set to a wrong type, a value out of its range or not
    among its choices (everything else as shipped), stops parsing with its dotted name."""
    assert parse_params(REAL_RAW) is not None  # the rest of the file is valid
    for what, value in bad_values(leaf):
        message = refused(with_value(REAL_RAW, leaf.path, value))
        assert f"params.yaml: {leaf.key} = {value!r}: " in message, (what, message)


@pytest.mark.parametrize("text", [".nan", ".inf", "-.inf", "1" + "0" * 400])
def test_yaml_special_numbers_are_refused(tmp_path: Path, text: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(PARAMS_YAML.read_text(encoding="utf-8").replace("lr: 0.005", f"lr: {text}"))
    with pytest.raises(ConfigError, match=re.escape(f"{path}: train.lr = ")):
        load_params(path)


@pytest.mark.parametrize(
    "key", [leaf.key for leaf in LEAVES_REQUIRED], ids=[leaf.key for leaf in LEAVES_REQUIRED]
)
def test_every_key_deleted_from_params_yaml_is_refused_by_name(key: str) -> None:
    """params.yaml is the one source of values: no code default stands in for a lost key."""
    raw = copy.deepcopy(REAL_RAW)
    *parents, name = key.split(".")
    node = raw
    for part in parents:
        node = node[part]
    del node[name]
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    message = str(err.value)
    assert message.startswith(f"params.yaml: {key}: missing"), message
    assert "\n" not in message


def _imported_modules(module: str, src: Path = ROOT / "src" / "rnnlm") -> set[str]:
    """`module` and every rnnlm module it imports, directly or not (read from the source)."""
    found, todo = {module}, [module]
    while todo:
        tree = ast.parse((src / f"{todo.pop()}.py").read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module == "rnnlm":
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("rnnlm."):
                names = [(node.module or "").split(".")[1]]
            elif isinstance(node, ast.Import):
                names = [a.name.split(".")[1] for a in node.names if a.name.startswith("rnnlm.")]
            for name in names:
                if name not in found and (src / f"{name}.py").is_file():
                    found.add(name)
                    todo.append(name)
    return found


# Modules a stage does not import but ships: the export stage logs the registered model with
# the file MLflow executes to build it (rnnlm.serving.MODEL_CODE), so editing it reruns export.
SHIPPED_NOT_IMPORTED = {"export": {serving.MODEL_CODE.stem}}


def test_each_stage_depends_on_exactly_the_modules_it_imports() -> None:
    """A module a stage imports but does not list would not rerun it when edited; one it lists
    but does not import reruns it for nothing (evaluate must not rerun for tokenization.py)."""
    stages = yaml.safe_load(DVC_YAML.read_text(encoding="utf-8"))["stages"]
    for name, stage in stages.items():
        module = re.fullmatch(r"PYTHONPATH=src python -m rnnlm\.(\w+)", stage["cmd"])
        assert module, f"{name}: cmd {stage['cmd']!r}"
        listed = {Path(dep).stem for dep in stage["deps"] if dep.startswith("src/rnnlm/")}
        assert listed == _imported_modules(module[1]) | SHIPPED_NOT_IMPORTED.get(name, set()), name
    assert "tokenization" not in _imported_modules("evaluate")


def test_params_digest_is_order_independent() -> None:
    a = params_digest({"model.cell": "lstm", "train.lr": 0.1})
    assert a == params_digest({"train.lr": 0.1, "model.cell": "lstm"})
    assert a != params_digest({"model.cell": "gru", "train.lr": 0.1})
    assert len(a) == 64


def test_resume_fingerprint_and_export_digest_start_from_the_same_values() -> None:
    from rnnlm import resume

    params = load_params(PARAMS_YAML)
    values = training_values(params.model, params.train)
    fingerprint = resume.fingerprint(params.model, params.train, {"train.npy": "abc"})
    assert set(fingerprint) == (set(values) - resume.NOT_FINGERPRINTED) | {"data.md5.train.npy"}
    assert len(params_digest(values)) == 64
