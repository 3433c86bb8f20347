"""End to end: `dvc repro tokenize` in a copy of the project, fed by a loopback HTTP mirror.

Runs the real `download` and `tokenize` stages through DVC on the synthetic `tinycorpus`, then
checks the outputs, that DVC sees nothing stale, that a second repro does nothing, and that a
`tokenize` param change reruns `tokenize` only.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from rnnlm import tokenization
from rnnlm.download import MIRROR_ENV
from tests.fixtures import TINY_ID, encode_docs, serve_directory

pytestmark = pytest.mark.e2e

ZIP_PATH = f"/packages/corpora/{TINY_ID}.zip"
PROCESSED = tokenization.OUTPUTS
SPLITS = ("train", "validation", "test")


def stage_env(project: Path, mirror_url: str) -> dict[str, str]:
    """The environment DVC and its stages run in: this venv's python, the copy's code."""
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"RNNLM_PARAMS", "MLFLOW_TRACKING_URI", "RNNLM_PROJECT_ROOT", "PYTHONPATH"}
    }
    env.update(
        {
            # dvc.yaml runs `python -m rnnlm...`: it must be this venv's interpreter.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            # The package is installed editable from the original tree; run the copy's code.
            "PYTHONPATH": str(project / "src"),
            MIRROR_ENV: mirror_url,
            "DVC_NO_ANALYTICS": "1",
            "DVC_SITE_CACHE_DIR": str(project.parent / "dvc_site_cache"),
        }
    )
    return env


def dvc(project: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """Run `dvc <args>` in `project`; fail with its output unless it exits 0."""
    result = subprocess.run(
        [str(Path(sys.executable).parent / "dvc"), *args],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, (
        f"dvc {' '.join(args)} exited {result.returncode}\n"
        f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    )
    return result


def repro(project: Path, env: dict[str, str]) -> str:
    """`dvc repro tokenize`; return its log (DVC logs to stdout and stderr)."""
    result = dvc(project, env, "repro", "tokenize")
    return result.stdout + result.stderr


def status(project: Path, env: dict[str, str]) -> dict[str, object]:
    """`dvc status tokenize --json`: {} when the stage and its upstream are up to date."""
    return json.loads(dvc(project, env, "status", "tokenize", "--json").stdout)


def mtimes(*folders: Path) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for f in folders for p in f.rglob("*") if p.is_file()}


def edit_params(project: Path, section: str, key: str, value: object) -> None:
    path = project / "params.yaml"
    raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    raw[section][key] = value
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")


def test_dvc_repro_tokenize_on_tiny_corpus(
    project_copy: Path, tiny_mirror: Path, tiny_docs: dict[str, str]
) -> None:
    project = project_copy
    assert (project / ".dvc" / "config").is_file()
    assert (project / "src" / "rnnlm" / "tokenization.py").is_file()
    assert not (project / ".venv").exists()
    edit_params(project, "corpus", "name", TINY_ID)
    raw_dir = project / "data" / "raw" / TINY_ID
    processed = project / "data" / "processed"

    with serve_directory(tiny_mirror) as server:
        env = stage_env(project, server.url)

        log = repro(project, env)
        assert "Running stage 'download'" in log and "Running stage 'tokenize'" in log
        assert server.requests == ["/index.xml", ZIP_PATH]
        on_disk = {p.name: p.read_bytes() for p in raw_dir.iterdir()}
        assert on_disk == encode_docs(tiny_docs)
        assert sorted(p.name for p in processed.iterdir() if p.name != ".gitignore") == sorted(
            PROCESSED
        )
        stats = json.loads((processed / "stats.json").read_text())
        vocab = json.loads((processed / "vocab.json").read_text())["tokens"]
        assert [stats[s]["documents"] for s in SPLITS] == [16, 2, 2]
        assert stats["vocab_size"] == len(vocab) and 50 < len(vocab) < 500
        assert stats["train"]["tokens"] > 5 * stats["test"]["tokens"] > 0
        assert all(0.0 <= stats[s]["oov_rate"] < 0.1 for s in SPLITS)
        lock = yaml.safe_load((project / "dvc.lock").read_text())
        assert {"download", "tokenize"} <= set(lock["stages"])
        assert status(project, env) == {}

        before = mtimes(raw_dir, processed)
        log = repro(project, env)
        assert "Running stage" not in log
        assert "Stage 'download' didn't change" in log
        assert "Stage 'tokenize' didn't change" in log
        assert mtimes(raw_dir, processed) == before
        assert len(server.requests) == 2

        edit_params(project, "tokenize", "min_freq", 1)
        assert status(project, env) != {}
        log = repro(project, env)
        assert "Running stage 'tokenize'" in log
        assert "Running stage 'download'" not in log
        assert mtimes(raw_dir) == {k: v for k, v in before.items() if k.startswith(str(raw_dir))}
        assert len(server.requests) == 2  # download did not run again
        rerun = json.loads((processed / "stats.json").read_text())
        assert rerun["vocab_size"] > stats["vocab_size"]  # words seen once now count
        assert all(rerun[s]["oov_rate"] <= stats[s]["oov_rate"] for s in SPLITS)
        assert status(project, env) == {}
