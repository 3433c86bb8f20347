"""processed.py: the one reader of the tokenize outputs refuses a wrong file in one line."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from rnnlm.config import Paths
from rnnlm.processed import (
    ProcessedDataError,
    read_split,
    read_split_rule,
    read_tokenizer,
    read_vocab,
)
from tests.fixtures import shipped_params


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    processed = tmp_path / "processed"
    processed.mkdir()
    return dataclasses.replace(shipped_params().paths, processed_dir=processed)


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.array([2.0, 3.0]), "token ids must be integers, got dtype float64"),
        (np.array([[2, 3]]), r"expected one 1-D sequence of token ids, got shape \(1, 2\)"),
        (np.array([2, 9]), r"token ids must lie in \[0, 5\), got 2..9"),
        (np.array([], dtype=np.int32), "the split is empty"),
        (np.array(["a", "b"]), "token ids must be integers"),
    ],
    ids=["floats", "2-D", "out-of-range", "empty", "strings"],
)
def test_a_wrong_split_is_refused_naming_the_file(
    paths: Paths, array: np.ndarray, message: str
) -> None:
    np.save(paths.split_ids("train"), array)
    with pytest.raises(ProcessedDataError, match=message) as err:
        read_split(paths, "train", vocab_size=5)
    text = str(err.value)
    assert text.startswith(f"{paths.split_ids('train')}: ") and "\n" not in text
    assert text.endswith("(vocabulary of 5; run the tokenize stage first)")


def test_a_split_that_is_no_npy_file_or_a_pickle_is_refused(paths: Paths) -> None:
    paths.split_ids("test").write_bytes(b"not an array")
    with pytest.raises(ProcessedDataError, match=r"not a \.npy array"):
        read_split(paths, "test", 5)
    np.save(paths.split_ids("test"), np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ProcessedDataError, match=r"not a \.npy array"):  # never unpickled
        read_split(paths, "test", 5)
    with pytest.raises(ProcessedDataError, match=r"validation\.npy: not found"):
        read_split(paths, "validation", 5)


def test_a_good_split_comes_back_as_int64(paths: Paths) -> None:
    np.save(paths.split_ids("train"), np.array([0, 1, 4], dtype=np.int32))
    ids = read_split(paths, "train", 5)
    assert ids.dtype == np.int64 and ids.tolist() == [0, 1, 4]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[1, 2]", r'expected \{"tokens": \[strings\]\}'),
        ('{"tokens": ["<unk>", 3]}', r'expected \{"tokens": \[strings\]\}'),
        ('{"tokens": ["the", "<unk>", "<eos>"]}', "must start with <unk>, <eos>"),
        ('{"tokens": ["<unk>", "<eos>", "a", "a"]}', "lists a token twice"),
        ("{not json", "not valid JSON"),
    ],
)
def test_a_wrong_vocabulary_is_refused(paths: Paths, content: str, message: str) -> None:
    paths.vocab.write_text(content)
    with pytest.raises(ProcessedDataError, match=message):
        read_vocab(paths)


def test_vocabulary_and_tokenizer_round_trip(paths: Paths) -> None:
    paths.vocab.write_text(json.dumps({"tokens": ["<unk>", "<eos>", "the"]}))
    assert read_vocab(paths) == ["<unk>", "<eos>", "the"]
    paths.tokenizer.write_text(json.dumps({"lowercase": True}))
    with pytest.raises(ProcessedDataError, match="not a tokenizer file"):
        read_tokenizer(paths)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b'{"tokens": ["<unk>", "<eos>", "caf\xe9"]}', "not UTF-8 text (byte 34); not a JSON file"),
        (b"[" * 100_000 + b"]" * 100_000, "JSON nested too deeply"),
        (b'{"tokens": ', "not valid JSON"),
    ],
    ids=["latin-1", "deep", "truncated"],
)
def test_a_json_input_that_is_no_json_is_refused_naming_the_file(
    paths: Paths, content: bytes, message: str
) -> None:
    paths.vocab.write_bytes(content)
    with pytest.raises(ProcessedDataError) as err:
        read_vocab(paths)
    text = str(err.value)
    assert text.startswith(f"{paths.vocab}: ") and message in text and "\n" not in text


def test_the_split_rule_is_read_and_checked(paths: Paths) -> None:
    paths.splits.write_text(json.dumps({"split_by": "span", "train": [], "spans": {}}))
    assert read_split_rule(paths) == "span"
    paths.splits.write_text(json.dumps({"train": ["a.txt"]}))  # written before split rules
    with pytest.raises(ProcessedDataError, match=r"split_by = None, expected one of document"):
        read_split_rule(paths)
