"""End to end: the tiny pipeline logging to a real MLflow tracking server, then the server gone.

Starts `mlflow server` as `make mlflow-server` does (SQLite backend, artifacts proxied by the
server, here both in tmp_path), runs `dvc repro` in a copy of the project with
MLFLOW_TRACKING_URI pointing at it, and reads everything back through the server: the run, its
params and metrics (per step, per epoch, final, evaluate's), its artifacts (downloaded through
the server's artifact proxy), the logged pyfunc model (its ONNX file inside) and the registered
version. Nothing may land in a local store. Then, with the server stopped, the train stage must
fail fast with one clear line and leave models/ as it was.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
from mlflow import MlflowClient
from mlflow.artifacts import download_artifacts

from tests.e2e._pipeline import EXPERIMENT, TAIL, pipeline_env, repro_log, write_tiny_params
from tests.fixtures import MlflowServer, mlflow_server

pytestmark = pytest.mark.e2e

# Python start-up and imports included: 20 s seen on a busy 2-core AMD VM (three test workers);
# MLflow's own retries against a dead server would take minutes.
FAIL_FAST_S = 40.0


def file_state(folder: Path) -> dict[str, tuple[str, int]]:
    """Relative path -> (SHA-256, mtime_ns) of every file under `folder`."""
    return {
        path.relative_to(folder).as_posix(): (
            hashlib.sha256(path.read_bytes()).hexdigest(),
            path.stat().st_mtime_ns,
        )
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def check_run(client: MlflowClient, project: Path, tmp: Path) -> str:
    """The one FINISHED run on the server, with everything the stages log; returns its id."""
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None, f"no experiment {EXPERIMENT!r} on the server"
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    train = json.loads((project / "metrics" / "train.json").read_text(encoding="utf-8"))
    train_run = json.loads((project / "metrics" / "train_run.json").read_text(encoding="utf-8"))
    evaluate = json.loads((project / "metrics" / "eval.json").read_text(encoding="utf-8"))
    assert run.info.run_id == train_run["run_id"]
    assert run.info.status == "FINISHED"
    # Proxied artifacts: clients upload and download through the server, never to a path.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/"), run.info.artifact_uri

    params = run.data.params
    assert params["model.cell"] == "lstm" and params["model.hidden_dim"] == "16"
    assert params["train.max_epochs"] == "2" and params["train.seed"] == "1234"
    metrics = run.data.metrics
    assert metrics["test/ppl"] == pytest.approx(train["test_ppl"], rel=1e-4)
    assert metrics["headline/val_ppl"] == pytest.approx(train["val_ppl"])
    assert metrics["headline/test_ppl"] == pytest.approx(evaluate["headline/test_ppl"])
    assert "parity/max_abs_err" in metrics  # export's

    run_id = run.info.run_id
    step_losses = client.get_metric_history(run_id, "train/loss")  # every log_every_n_steps
    assert len(step_losses) >= 2 and len({m.step for m in step_losses}) == len(step_losses)
    for per_epoch in ("val/ppl", "train/epoch_loss"):
        history = client.get_metric_history(run_id, per_epoch)
        assert len(history) == 2, (per_epoch, history)  # one value per epoch

    listed = {a.path for a in client.list_artifacts(run_id)}
    assert {"training", "data", "checkpoint", "config"} <= listed, listed
    assert {a.path for a in client.list_artifacts(run_id, "training")} >= {
        "training/train_curve.png",
        "training/train_curve.csv",
    }
    downloads = tmp / "downloads"
    downloads.mkdir()
    expected = {
        "checkpoint/model.ckpt": project / "models" / "model.ckpt",
        "data/vocab.json": project / "data" / "processed" / "vocab.json",
        "config/params.yaml": project / "params.yaml",
    }
    for artifact, original in expected.items():
        local = Path(client.download_artifacts(run_id, artifact, str(downloads)))
        assert local.read_bytes() == original.read_bytes(), artifact
    plot = Path(client.download_artifacts(run_id, "training/train_curve.png", str(downloads)))
    assert plot.read_bytes().startswith(b"\x89PNG")
    return run_id


def check_model(client: MlflowClient, project: Path, run_id: str, tmp: Path) -> None:
    """The pyfunc model logged from the run (the ONNX file inside it), and version 1 of
    `rnnlm` registered from it."""
    export = json.loads((project / "metrics" / "export_model.json").read_text(encoding="utf-8"))
    logged = client.get_logged_model(export["model_id"])
    assert logged.source_run_id == run_id
    assert logged.artifact_location.startswith("mlflow-artifacts:/"), logged.artifact_location
    uri = client.tracking_uri
    folder = Path(
        download_artifacts(
            artifact_uri=export["model_uri"],
            dst_path=str(tmp / "m"),
            tracking_uri=uri,
            registry_uri=uri,
        )
    )
    assert "python_function" in (folder / "MLmodel").read_text(encoding="utf-8")
    served = onnx.load(str(folder / "artifacts" / "model.onnx"))  # the pyfunc's ONNX file
    shipped = onnx.load(str(project / "models" / "model.onnx"))
    assert served.SerializeToString() == shipped.SerializeToString()

    versions = client.search_model_versions("name='rnnlm'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].run_id == run_id  # the training run is the version's source run
    assert export["model_id"] in versions[0].source, versions[0].source  # models:/<model_id>
    champion = client.get_model_version_by_alias("rnnlm", "champion")  # through the server too
    assert str(champion.version) == "1" and float(champion.tags["test_ppl"]) > 1


def check_server_down(project: Path, env: dict[str, str], server: MlflowServer) -> None:
    """With the server stopped, `python -m rnnlm.train` fails at once and writes nothing."""
    before = file_state(project / "models")
    assert "model.ckpt" in before
    start = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "rnnlm.train"],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    elapsed = time.monotonic() - start
    output = f"stdout:\n{result.stdout[-TAIL:]}\nstderr:\n{result.stderr[-TAIL:]}"
    assert result.returncode == 1, output
    assert elapsed < FAIL_FAST_S, f"took {elapsed:.1f} s to fail\n{output}"
    assert "Traceback" not in result.stderr, output
    naming = [line for line in result.stderr.splitlines() if server.url in line]
    assert len(naming) == 1, output
    assert "ERROR" in naming[0] and "unreachable" in naming[0], naming
    assert file_state(project / "models") == before


def test_pipeline_logs_to_tracking_server(
    project_copy: Path, http_mirror: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    project = project_copy
    write_tiny_params(project)
    mlruns = file_state(project / "mlruns")  # the tracked mlruns/.gitkeep
    with mlflow_server(tmp_path / "server") as server:
        # Also for this process: an MLflow call that forgets its URI must not create a store
        # in the working directory.
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.url)
        env = {**pipeline_env(project, http_mirror), "MLFLOW_TRACKING_URI": server.url}
        try:
            repro_log(project, env)
            client = MlflowClient(tracking_uri=server.url)
            run_id = check_run(client, project, tmp_path)
            check_model(client, project, run_id, tmp_path)
        except BaseException:
            print(f"mlflow server log (tail):\n{server.log_tail()}", file=sys.stderr)
            raise
        stored = [p.name for p in server.artifacts.rglob("*") if p.is_file()]
        assert "model.ckpt" in stored and "model.onnx" in stored, stored

    stray = [*project.rglob("mlflow.db"), *project.rglob("mlartifacts")]
    assert not stray, f"a local MLflow store in the project: {stray}"
    assert file_state(project / "mlruns") == mlruns
    assert server.process.returncode is not None  # stopped
    check_server_down(project, env, server)
