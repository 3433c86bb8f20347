"""A stage that fails under `dvc repro` leaves the previous outputs as they were.

DVC deletes a stage's outputs before running it unless they are `persist: true`; every output
of dvc.yaml is, and every stage writes atomically, so a failure (here: the MLflow server that
evaluate needs is down) costs nothing. The stage also removes the temporaries a killed stage
left beside its outputs before it starts.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from rnnlm.files import md5_file
from tests.e2e._pipeline import BIN, TAIL, declared_outputs, dvc, pipeline_env
from tests.e2e.conftest import TinyPipeline, clone_pipeline
from tests.fixtures import unused_port

pytestmark = pytest.mark.e2e


def test_a_failed_stage_keeps_every_previous_output(
    tiny_pipeline: TinyPipeline, tmp_path: Path
) -> None:
    project = clone_pipeline(tiny_pipeline, tmp_path / "project")
    env = pipeline_env(project, tiny_pipeline.mirror_url)
    outputs = [project / path for paths in declared_outputs(project).values() for path in paths]
    files = [path for path in outputs if path.is_file()]
    before = {path: md5_file(path) for path in files}
    assert project / "metrics" / "eval.json" in before
    # What an export killed mid-write leaves: a staged copy of models/ beside it.
    stale = project / ".models.k1ll3d_0.tmp"
    (stale / "model.onnx").parent.mkdir(parents=True)
    (stale / "model.onnx").write_bytes(b"half a model")

    down = f"http://127.0.0.1:{unused_port()}"
    failed = subprocess.run(
        [str(BIN / "dvc"), "repro", "--force", "--single-item", "evaluate"],
        cwd=project,
        env={**env, "MLFLOW_TRACKING_URI": down},
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = failed.stdout + failed.stderr
    assert failed.returncode != 0, log[-TAIL:]
    assert f"MLflow tracking server {down} is unreachable" in log, log[-TAIL:]
    assert "Traceback" not in log
    assert {path: md5_file(path) for path in files} == before  # eval.json, samples.txt too
    assert not stale.exists()
    assert dvc(project, env, "status", "--json").stdout.strip() == "{}"
    status = subprocess.run(
        ["git", "status", "--porcelain"], cwd=project, capture_output=True, text=True, check=True
    )
    assert status.stdout == ""
