"""The tiny pipeline, run once per test run and copied by the tests that build on it.

`tiny_pipeline` is a copy of the project with the tiny params, `dvc repro` run once (download
from a loopback mirror, tokenize, train, export, evaluate) and committed: the baseline that the
experiment, queue and remote tests start from. Those tests work on `clone_pipeline(...)`, a
copy of it with its own git history, DVC cache and MLflow store; `test_pipeline_full` checks
the original and must leave it as it found it.
"""

from __future__ import annotations

import shutil
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from tests.e2e._pipeline import commit_all, pipeline_env, repro_log, write_tiny_params
from tests.fixtures import (
    TINY_ID,
    build_nltk_mirror,
    copy_project,
    encode_docs,
    make_tiny_corpus_docs,
    serve_directory,
)


@dataclass(frozen=True)
class TinyPipeline:
    project: Path  # `dvc repro` done, everything committed
    mirror_url: str  # the loopback mirror it downloaded from (up for the whole session)
    log: str  # what `dvc repro` printed


@pytest.fixture(scope="session")
def tiny_pipeline(
    tmp_path_factory: pytest.TempPathFactory, worker_id: str
) -> Iterator[TinyPipeline]:
    """Built by the first test that asks for it, in whichever pytest-xdist worker: the others
    wait for it (a file lock in the run's shared temp folder) and reuse it."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if worker_id != "master" else base) / "tiny_pipeline"
    with FileLock(str(root) + ".lock"):
        if not (root / "built").is_file():
            shutil.rmtree(root, ignore_errors=True)
            build_tiny_pipeline(root)
    # This worker's own server for the same mirror (the builder's stops with its session).
    with serve_directory(root / "mirror") as server:
        log = (root / "built").read_text(encoding="utf-8")
        yield TinyPipeline(root / "project", server.url, log)


def build_tiny_pipeline(root: Path) -> None:
    """The tiny project under `root`: `dvc repro` from a loopback mirror, committed."""
    mirror = build_nltk_mirror(root / "mirror", {TINY_ID: encode_docs(make_tiny_corpus_docs())})
    with serve_directory(mirror) as server:
        project = copy_project(root / "project")
        write_tiny_params(project)
        commit_all(project, "tiny params")  # a clean checkout, as a fresh clone is
        log = repro_log(project, pipeline_env(project, server.url))
        commit_all(project, "tiny pipeline baseline")
    (root / "built").write_text(log, encoding="utf-8")


def relocate_mlflow_store(db: Path, old: Path, new: Path) -> None:
    """Point a copied SQLite store at its new folder: MLflow stores artifact locations as
    absolute paths (experiments, runs, logged models, model versions)."""
    with sqlite3.connect(db) as con:
        tables = [
            row[0] for row in con.execute("SELECT name FROM sqlite_master WHERE type='table'")
        ]
        for table in tables:
            columns = [
                row[1]
                for row in con.execute(f'PRAGMA table_info("{table}")')
                if "CHAR" in row[2].upper() or "TEXT" in row[2].upper()
            ]
            for column in columns:
                con.execute(
                    f'UPDATE "{table}" SET "{column}" = replace("{column}", ?, ?) '
                    f'WHERE "{column}" LIKE ?',
                    (str(old), str(new), f"%{old}%"),
                )


def clone_pipeline(pipeline: TinyPipeline, dest: Path) -> Path:
    """A copy of the tiny pipeline's project at `dest`: files, git history, DVC cache and
    MLflow store (relocated), without DVC's temporary state."""
    shutil.copytree(
        pipeline.project,
        dest,
        symlinks=True,
        ignore=lambda folder, names: ["tmp"] if Path(folder).name == ".dvc" else [],
    )
    relocate_mlflow_store(dest / "mlruns" / "mlflow.db", pipeline.project, dest)
    return dest
