"""End to end on real data: download and tokenize `state_union` from the shared NLTK mirror.

Skipped when the shared mirror beside the project is absent. Checks the corpus-level numbers
the rest of the pipeline relies on: 65 addresses, a few hundred thousand tokens, a vocabulary
under the 10k cap and 6 held-out addresses each for validation and test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from rnnlm import download, tokenization
from rnnlm.streams import EOS_ID, UNK_ID
from tests.fixtures import params_with

pytestmark = [pytest.mark.e2e, pytest.mark.mirror]

SPLITS = ("train", "validation", "test")


def test_state_union_download_and_tokenize(
    tmp_path: Path, shared_mirror: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(download.MIRROR_ENV, str(shared_mirror))
    params = params_with(
        {
            "paths": {
                "raw_dir": str(tmp_path / "raw"),
                "processed_dir": str(tmp_path / "processed"),
                "models_dir": str(tmp_path / "models"),
                "metrics_dir": str(tmp_path / "metrics"),
            },
            "corpus": {"name": "state_union"},
        }
    )
    summary = download.run(params.corpus, params.paths)
    assert summary["files"] == 66  # 65 addresses and the README
    stats = tokenization.run(params.tokenize, params.paths, "state_union")

    out = params.paths.processed_dir
    splits = json.loads((out / "splits.json").read_text())
    documents = sorted(n for s in SPLITS for n in splits[s])
    assert len(documents) == 65 and "README" not in documents
    assert documents[0] == "1945-Truman.txt" and documents[-1] == "2006-GWBush.txt"
    assert splits["validation"] == [documents[i] for i in range(8, 65, 10)]
    assert splits["test"] == [documents[i] for i in range(9, 65, 10)]
    assert [stats[s]["documents"] for s in SPLITS] == [53, 6, 6]  # type: ignore[index]

    total = sum(stats[s]["tokens"] for s in SPLITS)  # type: ignore[index]
    assert 300_000 <= total <= 500_000
    assert 5_000 <= stats["vocab_size"] <= 10_000  # type: ignore[operator]
    vocab = json.loads((out / "vocab.json").read_text())["tokens"]
    assert len(vocab) == stats["vocab_size"]
    assert {"the", "america", "congress", "."} <= set(vocab[:200])
    for split in SPLITS:
        ids = np.load(out / f"{split}.npy")
        assert len(ids) == stats[split]["tokens"]  # type: ignore[index]
        assert stats[split]["oov_rate"] < 0.1  # type: ignore[index]
        assert ids[-1] == EOS_ID and 0 < int((ids == UNK_ID).sum()) < len(ids) / 10
        # Sentences of a plausible length: Punkt neither merges paragraphs nor cuts at "Mr.".
        mean_len = len(ids) / stats[split]["sentences"]  # type: ignore[index]
        assert 10 < mean_len < 40
