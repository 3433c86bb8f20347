"""tracking.py without a training: provenance tags, the tracking URI, the store's experiment."""

from __future__ import annotations

import subprocess
from pathlib import Path

from rnnlm import tracking

GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "-c", "commit.gpgsign=false"]


def _git(root: Path, *args: str) -> None:
    subprocess.run([*GIT, *args], cwd=root, check=True, capture_output=True)


def test_git_dirty_counts_what_defines_a_run_not_what_dvc_rewrites(tmp_path: Path) -> None:
    root = tmp_path / "clone"
    for name in ("src/rnnlm/train.py", "params.yaml", "dvc.yaml", "dvc.lock", "README.md"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(f"{name}\n")
    (root / "metrics").mkdir()
    (root / "metrics" / "train.json").write_text("{}\n")
    _git(root, "init", "-q")
    _git(root, "add", "-A")
    _git(root, "commit", "-q", "-m", "fresh clone")
    clean = tracking.git_info(root)
    assert clean["git.dirty"] == "false" and len(clean["git.commit"]) == 40
    assert "git.dirty_files" not in clean

    # What `dvc repro` rewrites before a stage runs, and docs: still clean.
    (root / "dvc.lock").write_text("rewritten by dvc repro\n")
    (root / "metrics" / "train.json").write_text('{"test_ppl": 1.0}\n')
    (root / "README.md").write_text("edited\n")
    assert tracking.git_info(root)["git.dirty"] == "false"

    (root / "params.yaml").write_text("train: {lr: 0.1}\n")
    (root / "src" / "rnnlm" / "new_module.py").write_text("x = 1\n")  # untracked, imported
    dirty = tracking.git_info(root)
    assert dirty["git.dirty"] == "true"
    assert dirty["git.dirty_files"] == "params.yaml, src/rnnlm/new_module.py"


def test_git_info_outside_a_repository(tmp_path: Path) -> None:
    assert tracking.git_info(tmp_path) == {"git.commit": "unknown"}
