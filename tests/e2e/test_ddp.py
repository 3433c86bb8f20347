"""A real two-process DDP training on CPU: `python -m rnnlm.train` with train.devices 2.

Lightning's launcher starts the second process by running `python -m rnnlm.train` again (with
LOCAL_RANK=1) and the two synchronise over gloo. Checked: one MLflow run and one set of outputs
(rank 0's), throughput summed over both processes, no process or checkpoint left behind, and
validation/test perplexity over the whole split: the numbers one process computes from the
saved checkpoint. Two layouts: an even one (each process trains 2 rows and evaluates 1), which
must train exactly as one process with the same batch_size does, and one where the processes
train 2 and 1 rows and evaluation is a single stream, which rank 0 reads alone while rank 1
steps through empty windows.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rnnlm import export, train
from rnnlm.config import Params
from rnnlm.processed import read_split, read_vocab
from rnnlm.streams import batchify, lm_pairs
from tests.e2e._pipeline import TAIL
from tests.fixtures import prepare_tiny_project, write_full_params

pytestmark = pytest.mark.e2e

TIMEOUT_S = 300  # two interpreters starting torch on a busy 2-core CI machine
EXIT_GRACE_S = 10  # for rank 1 to be gone once rank 0 has exited


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Params:
    """The tiny corpus, downloaded from a folder mirror and tokenized once."""
    return prepare_tiny_project(tmp_path_factory.mktemp("ddp"))


def ddp_params(data: Params, root: Path, batch_size: int, eval_batch_size: int) -> Params:
    """`data` trained by 2 CPU processes, with models/, metrics/ and an MLflow store in `root`."""
    return dataclasses.replace(
        data,
        paths=dataclasses.replace(
            data.paths, models_dir=root / "models", metrics_dir=root / "metrics"
        ),
        train=dataclasses.replace(
            data.train,
            accelerator="cpu",
            devices=2,
            strategy="ddp",
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            max_epochs=2,
        ),
        mlflow=dataclasses.replace(data.mlflow, tracking_uri=f"sqlite:///{root}/mlruns/mlflow.db"),
    )


def session_processes(sid: int) -> list[str]:
    """'pid state command' of every process (zombies included) in session `sid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:  # gone meanwhile
            continue
        # pid (comm) state ppid pgrp session ...: comm may hold spaces, so split after ')'.
        state, _, _, session = text[text.rindex(")") + 2 :].split()[:4]
        if int(session) == sid:
            found.append(f"{stat.parent.name} {state} {text[: text.rindex(')') + 1]}")
    return found


def whole_split_ppl(net: torch.nn.Module, stream: np.ndarray, n_rows: int) -> float:
    """exp(mean NLL) of a split read as `n_rows` rows from a zero state, in one process.

    Each row goes through the network in a single call (no windows, no Lightning): the same
    computation as evaluation's windows with the state carried, up to float rounding.
    """
    inputs, targets = (torch.from_numpy(batchify(a, n_rows)) for a in lm_pairs(stream))
    with torch.no_grad():
        logits, _ = net(inputs, net.init_state(n_rows))
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).double(), targets.reshape(-1), reduction="sum"
        )
    return math.exp(nll.item() / targets.numel())


@dataclass(frozen=True)
class DdpRun:
    params: Params
    returncode: int
    log: str
    left_behind: list[str]  # processes of its session still there after the grace period
    seconds: float

    @property
    def metrics(self) -> dict[str, Any]:
        paths = self.params.paths
        return {
            **json.loads(paths.train_metrics.read_text()),
            **json.loads(paths.train_run.read_text()),
        }

    def curve(self) -> list[dict[str, float]]:
        path = self.params.paths.metrics_dir / "train_curve.csv"
        with path.open() as f:
            return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def train_two_processes(params: Params, root: Path) -> DdpRun:
    """`python -m rnnlm.train` with `params` (2 devices), as DVC would run it."""
    params_file = write_full_params(params, root / "params.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(CI="1", OMP_NUM_THREADS="1", RNNLM_PROJECT_ROOT=str(root))
    started = time.monotonic()
    # Its own session, so that every process it starts (rank 1) can be found afterwards.
    process = subprocess.Popen(
        [sys.executable, "-m", "rnnlm.train", "--params", str(params_file)],
        env=env,
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = process.communicate(timeout=TIMEOUT_S)
        seconds = time.monotonic() - started
        deadline = time.monotonic() + EXIT_GRACE_S
        while (left := session_processes(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if process.poll() is None or session_processes(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    print(f"2-process DDP training: {seconds:.1f} s")
    return DdpRun(params, process.returncode, log, left, seconds)


@pytest.fixture(
    scope="module",
    params=[(4, 2), (3, 1)],
    ids=["even-shards", "uneven-shards-eval-on-rank0"],
)
def ddp_run(
    request: pytest.FixtureRequest, tiny_data: Params, tmp_path_factory: pytest.TempPathFactory
) -> DdpRun:
    """Two epochs by two processes: (train.batch_size, train.eval_batch_size) from params."""
    batch_size, eval_batch_size = request.param
    root = tmp_path_factory.mktemp("ddp-run")
    run = train_two_processes(ddp_params(tiny_data, root, batch_size, eval_batch_size), root)
    assert run.returncode == 0, f"train exited {run.returncode}:\n{run.log[-TAIL:]}"
    return run


def test_both_processes_exit_cleanly_and_leave_nothing_behind(ddp_run: DdpRun) -> None:
    assert ddp_run.left_behind == []
    assert "Traceback" not in ddp_run.log, ddp_run.log[-TAIL:]
    # Rank 1 logs warnings only: each line once.
    assert ddp_run.log.count("epoch 0: train loss") == 1, ddp_run.log[-TAIL:]
    assert ddp_run.log.count("best epoch") == 1, ddp_run.log[-TAIL:]
    paths = ddp_run.params.paths
    assert sorted(p.name for p in paths.models_dir.iterdir()) == ["model.ckpt"]  # no checkpoints/
    assert sorted(p.name for p in paths.metrics_dir.iterdir()) == [
        "train.json", "train_curve.csv", "train_curve.png", "train_run.json",
    ]  # fmt: skip


def test_one_mlflow_run_from_rank_0(ddp_run: DdpRun) -> None:
    metrics, ml = ddp_run.metrics, ddp_run.params.mlflow
    assert metrics["devices"] == 2 and metrics["accelerator"] == "cpu"
    assert metrics["epochs"] == 2
    client = mlflow.MlflowClient(ml.tracking_uri)
    experiment = client.get_experiment_by_name(ml.experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [metrics["run_id"]]  # rank 1 started none
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["devices"] == "2"
    assert run.data.params["train.devices"] == "2"
    steps = [m.step for m in client.get_metric_history(run.info.run_id, "val/ppl")]
    assert len(steps) == len(set(steps)) == metrics["epochs"]


def test_throughput_counts_the_tokens_of_both_processes(ddp_run: DdpRun) -> None:
    paths, t = ddp_run.params.paths, ddp_run.params.train
    vocab_size = len(read_vocab(paths))
    train_tokens = batchify(read_split(paths, "train", vocab_size), t.batch_size).size
    for row in ddp_run.curve():
        assert row["tokens_per_s"] * row["epoch_time_s"] == pytest.approx(train_tokens, rel=1e-4)


def test_perplexity_is_over_the_whole_split_as_one_process_computes_it(ddp_run: DdpRun) -> None:
    """The saved checkpoint, scored in this process: the numbers the two processes reported."""
    paths, metrics = ddp_run.params.paths, ddp_run.metrics
    checkpoint = paths.models_dir / "model.ckpt"
    net = export.load_checkpoint(checkpoint)  # an ordinary checkpoint: the export stage takes it
    assert not any("module." in k for k in torch.load(checkpoint, weights_only=True)["state_dict"])
    for split, key in (("validation", "val_ppl"), ("test", "test_ppl")):
        stream = read_split(paths, split, len(read_vocab(paths)))
        expected = whole_split_ppl(net, stream, ddp_run.params.train.eval_batch_size)
        print(f"{split}: DDP {metrics[key]}, one process {expected:.6f}")
        assert metrics[key] == pytest.approx(expected, rel=1e-5), split


def test_only_unequal_shards_are_warned_about(ddp_run: DdpRun) -> None:
    warned = "train.batch_size = 3 is not a multiple of the 2 processes" in ddp_run.log
    assert warned == bool(ddp_run.params.train.batch_size % 2)


@pytest.mark.parametrize("ddp_run", [(4, 2)], ids=["even-shards"], indirect=True)
def test_even_shards_train_as_one_process_with_the_same_batch_size(
    ddp_run: DdpRun, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """DDP averages the processes' gradients: with equal shards, that is the whole batch's
    (unequal shards weigh rows differently from one process, and say so: test above)."""
    params = ddp_run.params
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RNNLM_PROJECT_ROOT", str(tmp_path))
    one = ddp_params(params, tmp_path, params.train.batch_size, params.train.eval_batch_size)
    one = dataclasses.replace(one, train=dataclasses.replace(one.train, devices=1, strategy="auto"))
    single = train.run(one.model, one.train, one.mlflow, one.paths, one.corpus.name)
    assert single["devices"] == 1
    for key in ("val_ppl", "test_ppl"):
        assert ddp_run.metrics[key] == pytest.approx(single[key], rel=1e-4), key
    with (one.paths.metrics_dir / "train_curve.csv").open() as f:
        single_loss = [float(row["train_loss"]) for row in csv.DictReader(f)]
    assert [r["train_loss"] for r in ddp_run.curve()] == pytest.approx(single_loss, rel=1e-4)
