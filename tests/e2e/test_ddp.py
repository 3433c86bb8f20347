"""A real two-process DDP training on CPU: `python -m rnnlm.train` with train.devices 2.

Lightning's launcher starts the second process by running `python -m rnnlm.train` again (with
LOCAL_RANK=1) and the two synchronise over gloo. Checked: one MLflow run and one set of outputs
(rank 0's), throughput summed over both processes, no process or checkpoint left behind, and
validation/test perplexity over the whole split: the numbers one process computes from the
saved checkpoint. Two layouts: an even one (each process trains 2 rows and evaluates 1), and
one where the processes train 2 and 1 rows and evaluation is a single stream, which rank 0
reads alone while rank 1 steps through empty windows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from rnnlm import export
from rnnlm.config import Params
from rnnlm.datamodule import batchify, lm_pairs, load_split
from rnnlm.download import MIRROR_ENV
from tests.e2e._pipeline import TAIL
from tests.fixtures import (
    TINY_ID,
    build_nltk_mirror,
    encode_docs,
    make_tiny_corpus_docs,
    make_tiny_params,
    prepare_tiny_data,
    write_full_params,
)

pytestmark = pytest.mark.e2e

TIMEOUT_S = 300  # two interpreters starting torch on a busy 2-core CI machine
EXIT_GRACE_S = 10  # for rank 1 to be gone once rank 0 has exited


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> Params:
    """The tiny corpus, downloaded from a folder mirror and tokenized once."""
    root = tmp_path_factory.mktemp("ddp")
    mirror = build_nltk_mirror(root / "mirror", {TINY_ID: encode_docs(make_tiny_corpus_docs())})
    params = make_tiny_params(root)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(MIRROR_ENV, str(mirror))
        prepare_tiny_data(params)
    return params


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


@pytest.mark.parametrize(
    ("batch_size", "eval_batch_size"),
    [(4, 2), (3, 1)],
    ids=["even-shards", "uneven-shards-eval-on-rank0"],
)
def test_two_process_ddp_training_is_tracked_once_and_evaluates_the_whole_split(
    tiny_data: Params, tmp_path: Path, batch_size: int, eval_batch_size: int
) -> None:
    params = ddp_params(tiny_data, tmp_path, batch_size, eval_batch_size)
    params_file = write_full_params(params, tmp_path / "params.yaml")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(CI="1", OMP_NUM_THREADS="1", RNNLM_PROJECT_ROOT=str(tmp_path))
    started = time.monotonic()
    # Its own session, so that every process it starts (rank 1) can be found afterwards.
    process = subprocess.Popen(
        [sys.executable, "-m", "rnnlm.train", "--params", str(params_file)],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        log, _ = process.communicate(timeout=TIMEOUT_S)
        deadline = time.monotonic() + EXIT_GRACE_S
        while (left := session_processes(process.pid)) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if process.poll() is None or session_processes(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
            process.communicate()
    elapsed = time.monotonic() - started
    assert process.returncode == 0, f"train exited {process.returncode}:\n{log[-TAIL:]}"
    assert left == [], f"processes left behind: {left}"
    assert "Traceback" not in log, log[-TAIL:]
    # Rank 1 logs warnings only; the summary line comes from rank 0 alone.
    assert log.count("best epoch") == 1, log[-TAIL:]
    assert log.count("epoch 0: train loss") == 1, log[-TAIL:]
    print(f"2-process DDP training: {elapsed:.1f} s")

    paths = params.paths
    metrics = json.loads((paths.metrics_dir / "train.json").read_text())
    assert metrics["devices"] == 2 and metrics["accelerator"] == "cpu"
    assert metrics["epochs"] == 2
    assert sorted(p.name for p in paths.models_dir.iterdir()) == ["model.ckpt"]
    assert sorted(p.name for p in paths.metrics_dir.iterdir()) == [
        "train.json",
        "train_curve.csv",
    ]

    client = mlflow.MlflowClient(params.mlflow.tracking_uri)
    experiment = client.get_experiment_by_name(params.mlflow.experiment_name)
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [metrics["run_id"]]  # rank 1 started none
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags["devices"] == "2"
    assert run.data.params["train.devices"] == "2"
    history = client.get_metric_history(run.info.run_id, "val/ppl")
    assert [m.step for m in history] == sorted({m.step for m in history})
    assert len(history) == metrics["epochs"]

    # Throughput is the job's: every training token of both processes, over the epoch's time.
    train_tokens = batchify(load_split(paths.processed_dir, "train"), batch_size).size
    curve = (paths.metrics_dir / "train_curve.csv").read_text().splitlines()
    header = curve[0].split(",")
    for line in curve[1:]:
        row = dict(zip(header, map(float, line.split(",")), strict=True))
        assert row["tokens_per_s"] * row["epoch_time_s"] == pytest.approx(train_tokens, rel=1e-4)

    # The checkpoint is an ordinary one (the export stage's loader takes it), and its
    # perplexity over each whole split, in one process, is what the two processes reported.
    checkpoint = paths.models_dir / "model.ckpt"
    net = export.load_checkpoint(checkpoint)
    assert not any("module." in k for k in torch.load(checkpoint, weights_only=True)["state_dict"])
    for split, key in (("validation", "val_ppl"), ("test", "test_ppl")):
        stream = load_split(paths.processed_dir, split)
        expected = whole_split_ppl(net, stream, eval_batch_size)
        print(f"{split}: DDP {metrics[key]}, one process {expected:.6f}")
        assert metrics[key] == pytest.approx(expected, rel=1e-5), split
