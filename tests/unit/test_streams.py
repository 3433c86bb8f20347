"""streams.py: the stream conventions every stage and the inference path share."""

from __future__ import annotations

import numpy as np
import pytest

from rnnlm.streams import EOS_ID, UNK_ID, check_token_ids, lm_pairs, padded_history, split_stats


def test_lm_pairs_predict_every_token_from_an_eos_start() -> None:
    stream = np.array([4, 5, 1, 6], dtype=np.int32)
    inputs, targets = lm_pairs(stream)
    assert inputs.tolist() == [EOS_ID, 4, 5, 1]
    assert targets.tolist() == [4, 5, 1, 6]
    assert inputs.dtype == targets.dtype == np.int64


def test_padded_history_starts_at_a_sentence_boundary() -> None:
    assert padded_history(np.array([7, 8], dtype=np.int32), 2).tolist() == [1, 1, 7, 8]
    assert padded_history(np.array([7]), 0).dtype == np.int64


def test_split_stats() -> None:
    ids = np.array([5, UNK_ID, 7, EOS_ID, UNK_ID, EOS_ID], dtype=np.int32)
    assert split_stats(ids, n_docs=3) == {
        "documents": 3,
        "sentences": 2,
        "tokens": 6,
        "oov_rate": 0.5,
    }
    assert split_stats(np.array([], dtype=np.int32), 0)["oov_rate"] == 0.0


@pytest.mark.parametrize(
    ("stream", "message"),
    [
        ([[1, 2]], r"expected one 1-D sequence of token ids, got shape \(1, 2\)"),
        ([], "nothing to score: the stream is empty"),
        ([1.0, 2.0], "token ids must be integers, got dtype float64"),
        ([0, 9], r"token ids must lie in \[0, 5\), got 0..9"),
        ([-1], r"token ids must lie in \[0, 5\), got -1..-1"),
        (5, "stream = 5: expected a sequence of token ids"),
    ],
)
def test_check_token_ids_says_what_is_wrong(stream: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        check_token_ids(stream, 5)  # type: ignore[arg-type]


def test_check_token_ids_accepts_ids_and_empty_when_asked() -> None:
    ids = check_token_ids(np.array([0, 4], dtype=np.uint8), 5)
    assert ids.dtype == np.int64 and ids.tolist() == [0, 4]
    assert check_token_ids([], 5, allow_empty=True).size == 0
