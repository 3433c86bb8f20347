"""Shared pytest fixtures. Helpers behind them live in tests/fixtures.py.

- `tiny_docs`: a synthetic corpus, file name -> text (one Latin-1 document, a README).
- `tiny_mirror`: a temporary folder laid out like the NLTK data server, holding `tinycorpus`.
- `http_mirror`: the base URL of a loopback HTTP server serving `tiny_mirror`.
- `shared_mirror`: the shared offline NLTK mirror beside the project (skips when absent).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fixtures import (
    TINY_ID,
    build_nltk_mirror,
    encode_docs,
    make_tiny_corpus_docs,
    serve_directory,
)

SHARED_MIRROR = Path(__file__).resolve().parents[1].parent / "shared" / "nltk_data"


@pytest.fixture
def tiny_docs() -> dict[str, str]:
    """Twenty synthetic documents plus a README, file name -> text."""
    return make_tiny_corpus_docs()


@pytest.fixture
def tiny_mirror(tmp_path: Path, tiny_docs: dict[str, str]) -> Path:
    """A folder mirror with package `tinycorpus` (index.xml names https://example.invalid/)."""
    return build_nltk_mirror(tmp_path / "mirror", {TINY_ID: encode_docs(tiny_docs)})


@pytest.fixture
def http_mirror(tiny_mirror: Path) -> Iterator[str]:
    """Base URL (ending in '/') of a loopback HTTP server serving `tiny_mirror`."""
    with serve_directory(tiny_mirror) as server:
        yield server.url


@pytest.fixture
def shared_mirror() -> Path:
    """The shared offline NLTK mirror (state_union, inaugural) beside the project."""
    if not (SHARED_MIRROR / "index.xml").is_file():
        pytest.skip(f"shared NLTK mirror not found at {SHARED_MIRROR}")
    return SHARED_MIRROR
