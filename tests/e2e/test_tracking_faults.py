"""Fault injection: the MLflow tracking server dies while a real training runs.

Training must not care: it runs to the end, writes its checkpoint and outputs, and ends with a
warning that names what was not logged and how to send it (`rnnlm relog`). Once the server is
back, `rnnlm relog` delivers it and the run looks as if nothing had happened.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest

from rnnlm.config import Params
from tests.e2e._pipeline import TAIL
from tests.fixtures import mlflow_server, write_full_params

pytestmark = pytest.mark.e2e


def test_server_lost_mid_training_then_relogged(processed_tiny: Params, tmp_path: Path) -> None:
    with mlflow_server(tmp_path / "server") as server:
        port = int(server.url.rsplit(":", 1)[1])
        params = dataclasses.replace(
            processed_tiny,
            # A few seconds per epoch: time to lose the server in the middle of training.
            train=dataclasses.replace(
                processed_tiny.train, batch_size=1, bptt=8, max_epochs=2, log_every_n_steps=50
            ),
            mlflow=dataclasses.replace(processed_tiny.mlflow, tracking_uri=server.url),
        )
        params_file = write_full_params(params, tmp_path / "params.yaml")
        command = [sys.executable, "-m", "rnnlm.train", "--params", str(params_file)]
        process = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        first_epoch = params.paths.models_dir / "checkpoints" / "last.ckpt"
        deadline = time.monotonic() + 180
        while not first_epoch.exists() and process.poll() is None:
            assert time.monotonic() < deadline, "no epoch finished in 180 s"
            time.sleep(0.1)
        server.stop()  # mid-training: epoch 1 is still to come
        out, err = process.communicate(timeout=600)
    log = out + err
    assert process.returncode == 0, log[-TAIL:]
    assert "Traceback" not in log

    # Everything the stage owes DVC is there.
    assert (params.paths.models_dir / "model.ckpt").is_file()
    metrics = json.loads((params.paths.metrics_dir / "train.json").read_text())
    assert metrics["epochs"] == 2
    run_id = json.loads(params.paths.train_run.read_text())["run_id"]
    spool = tmp_path / "mlruns" / "unsent" / f"{run_id}.jsonl"
    warning = next(line for line in log.splitlines() if "went away" in line)
    assert str(spool) in warning and "rnnlm relog" in warning
    assert "val/ppl (" in warning  # names the metrics that were not logged
    assert spool.is_file()

    # The server comes back (same port, same store): the spool is replayed into the run.
    with mlflow_server(tmp_path / "server", port=port) as server:
        relog = subprocess.run(
            [str(Path(sys.executable).parent / "rnnlm"), "relog"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert relog.returncode == 0, relog.stderr[-TAIL:]
        assert f"run {run_id}:" in relog.stdout
        assert not spool.exists()
        client = mlflow.MlflowClient(server.url)
        run = client.get_run(run_id)
        assert run.info.status == "FINISHED"
        val_steps = [m.step for m in client.get_metric_history(run_id, "val/ppl")]
        assert len(val_steps) == 2 and val_steps == sorted(set(val_steps))
        assert run.data.metrics["headline/val_ppl"] == pytest.approx(metrics["val_ppl"])
        train_steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
        assert train_steps == sorted(set(train_steps))  # nothing twice
        artifacts = {a.path for a in client.list_artifacts(run_id, "checkpoint")}
        assert "checkpoint/model.ckpt" in artifacts
