"""Shared pytest fixtures. Helpers behind them live in tests/fixtures.py.

- `tiny_docs`: a synthetic corpus, file name -> text (one Latin-1 document, a README).
- `tiny_mirror`: a temporary folder laid out like the NLTK data server, holding `tinycorpus`.
- `http_mirror`: the base URL of a loopback HTTP server serving `tiny_mirror`.
- `shared_mirror`: the offline NLTK mirror with state_union and inaugural: RNNLM_NLTK_MIRROR
  when it names a folder, else ../shared/nltk_data beside the project (skips when neither).
- `tiny_params`: a small `Params` for `tinycorpus`, every path and the MLflow store under tmp_path.
- `processed_tiny`: `tiny_params` after the download and tokenize stages ran on `tiny_mirror`.
- `project_copy`: the project's files (tracked, plus untracked but not ignored) in a fresh git
  repository under tmp_path, for tests that run DVC.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

# Tiny test models run fastest on one thread, and a suite that spawns DVC stages must not
# oversubscribe the cores. Set before torch is imported (the stages' subprocesses inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from rnnlm import download
from rnnlm.config import Params
from tests.fixtures import (
    PROJECT_ROOT,
    TINY_ID,
    build_nltk_mirror,
    copy_project,
    encode_docs,
    make_tiny_corpus_docs,
    make_tiny_params,
    prepare_tiny_data,
    serve_directory,
)

SHARED_MIRROR = PROJECT_ROOT.parent / "shared" / "nltk_data"


@pytest.fixture(autouse=True)
def _restore_rnnlm_logger() -> Iterator[None]:
    """`rnnlm.cli.main` configures the `rnnlm` logger for a process; undo it between tests."""
    logger = logging.getLogger("rnnlm")
    saved = (logger.handlers[:], logger.level, logger.propagate)
    yield
    logger.handlers[:], logger.level, logger.propagate = saved


# What a process reads to decide whether it is one rank of a distributed run. A test that
# leaves one of these in the worker's environment makes every later `python -m rnnlm.train`
# it starts believe it is a child rank (a DDP run then waits forever for the missing rank).
DISTRIBUTED_ENV = (
    "LOCAL_RANK",
    "NODE_RANK",
    "RANK",
    "GROUP_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "SLURM_PROCID",
)


@pytest.fixture(autouse=True)
def _no_leaked_distributed_env() -> Iterator[None]:
    """Fail the test that leaves a rank or rendezvous variable behind in os.environ."""
    before = {name: os.environ.get(name) for name in DISTRIBUTED_ENV}
    yield
    leaked = {
        name: os.environ.get(name)
        for name in DISTRIBUTED_ENV
        if os.environ.get(name) != before[name]
    }
    for name, value in before.items():
        if name in leaked:
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    assert not leaked, f"the test left distributed variables in os.environ: {leaked}"


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


def find_shared_mirror(environ: Mapping[str, str] = os.environ) -> Path | str:
    """The NLTK mirror with state_union and inaugural: a folder, or why there is none.

    RNNLM_NLTK_MIRROR wins (a folder, its index.xml or a file:// URL, read as the download
    stage reads it), else `../shared/nltk_data` beside the project.
    """
    named = environ.get(download.MIRROR_ENV, "").strip()
    if named:
        try:
            source = download.resolve_source("", named)
        except download.DownloadError as err:
            return f"{download.MIRROR_ENV}: {err}"
        if not source.local:
            return f"{download.MIRROR_ENV} = {named!r} is a URL; these tests read a folder"
        root = Path(source.root)
    else:
        root = SHARED_MIRROR
    if not (root / "index.xml").is_file():
        where = f"{download.MIRROR_ENV} = {named!r}" if named else "beside the project"
        return f"no NLTK mirror at {root} ({where}): no index.xml"
    return root.resolve()


# Read once, from the environment pytest started in: tests may unset the variable for
# themselves (test_download isolates every test from the developer's shell).
_SHARED_MIRROR_FOUND = find_shared_mirror()


@pytest.fixture
def shared_mirror() -> Path:
    """The shared offline NLTK mirror (state_union, inaugural): RNNLM_NLTK_MIRROR, else the one
    beside the project; the test is skipped, saying why, when neither holds one."""
    if isinstance(_SHARED_MIRROR_FOUND, str):
        pytest.skip(_SHARED_MIRROR_FOUND)
    return _SHARED_MIRROR_FOUND


@pytest.fixture
def tiny_params(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Params:
    """Params for `tinycorpus` with a 16-dim, 1-layer LSTM; every path under tmp_path.

    MLflow logs to a SQLite store under tmp_path, whatever MLFLOW_TRACKING_URI the shell sets.
    """
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RNNLM_PROJECT_ROOT", str(tmp_path))
    return make_tiny_params(tmp_path)


@pytest.fixture
def processed_tiny(
    tiny_params: Params, tiny_mirror: Path, monkeypatch: pytest.MonkeyPatch
) -> Params:
    """`tiny_params` with `tinycorpus` downloaded from `tiny_mirror` and tokenized."""
    monkeypatch.setenv(download.MIRROR_ENV, str(tiny_mirror))
    prepare_tiny_data(tiny_params)
    return tiny_params


@pytest.fixture
def project_copy(tmp_path: Path) -> Path:
    """The project's files in tmp_path/"project", committed to a fresh git repository."""
    return copy_project(tmp_path / "project")
