"""End to end: share a pipeline's results through a DVC remote and pull them into a fresh clone.

In a copy of the session's tiny pipeline (`dvc repro` done), add a local-folder remote as the
project's default (in the committed .dvc/config, as a team would), commit and `dvc push`. Then
`git clone` the copy, which has code, params, dvc.lock and the git-tracked metrics but no DVC
cache and no cached outputs. In the clone, with no corpus mirror at all: `dvc pull`, then
`dvc status` says up to date and `dvc repro` runs no stage; the pulled corpus, processed data and
models (fp32 and int8) are byte-identical to the originals, and `rnnlm generate` works at once.
What DVC does not share (mlruns/, MLflow's) is absent from the clone.
A second clone pulls only the ONNX model, and shows how a pull from a remote that lacks the
files (nobody pushed) fails.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from rnnlm.files import md5_file
from tests.e2e._pipeline import (
    BIN,
    cached_outputs,
    commit_all,
    dvc,
    pipeline_env,
    repro_log,
    run_ok,
)
from tests.e2e.conftest import TinyPipeline, clone_pipeline
from tests.fixtures import TINY_ID

pytestmark = pytest.mark.e2e

REMOTE = "shared"
STAGES = ("download", "tokenize", "train", "export", "evaluate")
# What `dvc pull` brings: the outs DVC caches.
PULLED = (
    f"data/raw/{TINY_ID}",
    "data/processed/vocab.json",
    "data/processed/tokenizer.json",
    "data/processed/splits.json",
    "data/processed/train.npy",
    "data/processed/validation.npy",
    "data/processed/test.npy",
    "models/model.ckpt",
    "models/model.onnx",
    "models/model.int8.onnx",
)
# What `git clone` brings: the lock file, and the `cache: false` outs (metrics, plots and the
# samples), which DVC never pushes. They must be committed, or a clone can never be up to date.
IN_GIT = (
    "dvc.lock",
    "params.yaml",
    "data/processed/stats.json",
    "metrics/train.json",
    "metrics/train_run.json",
    "metrics/train_curve.csv",
    "metrics/train_curve.png",
    "metrics/export.json",
    "metrics/export_model.json",
    "metrics/eval.json",
    "metrics/samples.txt",
)


def tree_md5(project: Path, names: tuple[str, ...]) -> dict[str, str]:
    """Relative path -> MD5 of every file under `names` (files or folders) in `project`."""
    digests: dict[str, str] = {}
    for name in names:
        path = project / name
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for file in files:
            digests[file.relative_to(project).as_posix()] = md5_file(file)
    return digests


def git(project: Path, *args: str) -> str:
    """stdout of `git <args>` in `project`, which must exit 0."""
    return run_ok(["git", *args], cwd=project, env=dict(os.environ)).stdout


def added_paths(pull_stdout: str) -> set[str]:
    """Paths `dvc pull` lists as added to the workspace (lines `A       data/raw/x/`)."""
    lines = [line.split() for line in pull_stdout.splitlines() if line.startswith("A ")]
    return {fields[1].rstrip("/") for fields in lines}


def generate(project: Path, env: dict[str, str], model: Path) -> str:
    """Five seeded tokens from `model` with the inference CLI."""
    args = [str(BIN / "rnnlm"), "generate", "--model", str(model), "--seed", "1"]
    out = run_ok([*args, "--max-tokens", "5"], cwd=project, env=env).stdout
    assert out.strip(), f"rnnlm generate printed nothing with {model}"
    return out


def push_pipeline(project: Path, env: dict[str, str], storage: Path) -> None:
    """Add `storage` as the default remote of a pipeline that has run, commit, push, push again."""
    assert json.loads(dvc(project, env, "status", "--json").stdout) == {}  # it has run
    assert sorted(cached_outputs(project)) == sorted(PULLED)

    # The remote goes in .dvc/config, which is committed: every clone then pulls with a bare
    # `dvc pull`, as a team sharing one bucket does. Credentials and personal overrides go in
    # .dvc/config.local (`dvc remote modify --local`), which .dvc/.gitignore keeps out of git.
    # An absolute folder path is fine here, as the clone lives on the same machine; a team
    # commits a URL everyone can reach (s3://..., gs://..., ssh://...).
    dvc(project, env, "remote", "add", "--default", REMOTE, str(storage))
    commit_all(project, "tiny pipeline run, shared DVC remote")
    assert git(project, "status", "--porcelain") == ""
    assert git(project, "check-ignore", ".dvc/config.local").strip() == ".dvc/config.local"
    assert set(IN_GIT) <= set(git(project, "ls-files").split())

    push = dvc(project, env, "push").stdout
    # Each cached file, plus the manifest DVC keeps for the corpus folder (an `.dir` object).
    pushed = len(tree_md5(project, PULLED)) + 1
    assert f"{pushed} files pushed" in push, push
    assert "Everything is up to date." in dvc(project, env, "push").stdout
    assert f"Cache and remote '{REMOTE}' are in sync." in dvc(project, env, "status", "-c").stdout


def test_push_then_pull_into_fresh_clone(tiny_pipeline: TinyPipeline, tmp_path: Path) -> None:
    project = clone_pipeline(tiny_pipeline, tmp_path / "project")  # `dvc repro` done
    env = pipeline_env(project, tiny_pipeline.mirror_url)
    push_pipeline(project, env, tmp_path / "dvc-storage")
    originals = tree_md5(project, PULLED + IN_GIT)

    clone = tmp_path / "clone"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    # No mirror: nothing in the clone may fetch the corpus from the NLTK server again.
    clone_env = pipeline_env(clone, str(tmp_path / "no-mirror"))
    assert not (clone / ".dvc" / "cache").exists()
    assert [p for p in PULLED if (clone / p).exists()] == []
    assert [p for p in IN_GIT if not (clone / p).is_file()] == []
    assert REMOTE in dvc(clone, clone_env, "remote", "list").stdout
    assert set(json.loads(dvc(clone, clone_env, "status", "--json").stdout)) == set(STAGES)

    pull = dvc(clone, clone_env, "pull").stdout
    assert added_paths(pull) == set(PULLED), pull
    assert json.loads(dvc(clone, clone_env, "status", "--json").stdout) == {}
    assert "Data and pipelines are up to date." in dvc(clone, clone_env, "status").stdout
    log = repro_log(clone, clone_env)
    assert "Running stage" not in log, log[-4000:]
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change" in log
    assert tree_md5(clone, PULLED + IN_GIT) == originals
    # Pulled outs are git-ignored (DVC's .gitignore entries are committed): the tree stays clean.
    assert git(clone, "status", "--porcelain") == ""
    assert "Everything is up to date." in dvc(clone, clone_env, "pull").stdout
    assert "Everything is up to date." in dvc(clone, clone_env, "push").stdout

    # Not shared through DVC: MLflow's store.
    assert (project / "mlruns" / "mlflow.db").is_file()
    assert [p.name for p in (clone / "mlruns").iterdir()] == [".gitkeep"]

    model = Path("models") / "model.onnx"
    assert generate(clone, clone_env, clone / model) == generate(project, env, project / model)

    check_partial_pull_and_missing_remote(tmp_path, project, clone_env)


def check_partial_pull_and_missing_remote(
    tmp_path: Path, project: Path, env: dict[str, str]
) -> None:
    """A clone that pulls only the model; a pull from a remote nobody pushed to fails."""
    clone = tmp_path / "model-only"
    git(tmp_path, "clone", "-q", str(project), str(clone))
    env = {**env, "PYTHONPATH": str(clone / "src")}

    empty = tmp_path / "empty-storage"
    empty.mkdir()
    dvc(clone, env, "remote", "add", "--local", "empty", str(empty))
    assert git(clone, "status", "--porcelain") == ""  # .dvc/config.local is not for git
    failed = subprocess.run(
        [str(BIN / "dvc"), "pull", "-r", "empty"],
        cwd=clone,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode == 1, failed
    # DVC 3.67 still prints "Everything is up to date." on stdout here: trust the exit code.
    assert "Some of the cache files do not exist neither locally nor on remote" in failed.stderr
    assert "Checkout failed for following targets" in failed.stderr
    assert [p for p in PULLED if p not in failed.stderr] == []

    pull = dvc(clone, env, "pull", "models/model.onnx").stdout
    assert added_paths(pull) == {"models/model.onnx"}, pull
    assert [p for p in PULLED if (clone / p).exists()] == ["models/model.onnx"]
    generate(clone, env, clone / "models" / "model.onnx")  # the .onnx file alone is enough
