"""End to end: queued DVC experiments run two at a time, each its own MLflow run in one store.

From a copy of the session's committed tiny pipeline (conftest.tiny_pipeline), queues two seeds with
`dvc exp run --queue` and runs them with `dvc queue start -j 2` (two celery workers, each
experiment in its own copy under .dvc/tmp/exps/), polling `dvc queue status` until the queue
is done. Every experiment must succeed, and the store must hold one new FINISHED run per
experiment with its seed and its own registered model version, both running at the same time,
with no "database is locked" in any experiment's log.

Twice: with the default store, the project's own SQLite file (mlruns/mlflow.db) written by
concurrent processes; and with MLFLOW_TRACKING_URI set to a tracking server when the queue
starts, which the workers' experiments must inherit (nothing new in mlruns/, which holds the
baseline's run).
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.e2e._pipeline import (
    BIN,
    EXPERIMENT,
    committed_json,
    dvc,
    exp_show_revs,
    experiment_runs,
    metric_file,
    mlflow_client,
    param,
    pipeline_env,
    set_git_identity,
)
from tests.e2e.conftest import TinyPipeline, clone_pipeline
from tests.fixtures import MlflowServer, mlflow_server

pytestmark = pytest.mark.e2e

REGISTERED = "rnnlm"  # export.registered_model_name in the real params.yaml
SEEDS = {"seed-11": 11, "seed-12": 12}  # as many as workers: one round, all at once
JOBS = 2
QUEUE_TIMEOUT_S = 900.0  # two tiny experiments take 1-2 minutes on 2 busy cores
POLL_S = 3.0


def queue_states(project: Path, env: dict[str, str]) -> dict[str, str]:
    """Experiment name -> its status (Queued, Running, Success, Failed) in `dvc queue status`."""
    table = dvc(project, env, "queue", "status").stdout
    states: dict[str, str] = {}
    for line in table.splitlines():
        # Task  Name  Created  Status: "1a2b3c4  seed-11  02:01 PM  Running"
        match = re.match(r"^\s*[0-9a-f]{7}\s+(\S+)\s+.*?\s(\w+)\s*$", line)
        if match:
            states[match[1]] = match[2]
    return states


def wait_for_queue(project: Path, env: dict[str, str]) -> dict[str, str]:
    """Poll `dvc queue status` until no experiment is queued or running; the final states."""
    deadline = time.monotonic() + QUEUE_TIMEOUT_S
    while True:
        states = queue_states(project, env)
        if set(states) >= set(SEEDS) and not {"Queued", "Running"} & set(states.values()):
            return states
        if time.monotonic() > deadline:
            logs = {name: queue_log(project, env, name)[-2000:] for name in SEEDS}
            pytest.fail(
                f"queue not done after {QUEUE_TIMEOUT_S:.0f} s: {states}\nlogs (tails): {logs}"
            )
        time.sleep(POLL_S)


def queue_log(project: Path, env: dict[str, str], name: str) -> str:
    return dvc(project, env, "queue", "logs", name).stdout


@pytest.fixture(params=["sqlite", "server"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[MlflowServer | None]:
    """None for the project's SQLite store, else a running tracking server."""
    if request.param == "sqlite":
        yield None
        return
    with mlflow_server(tmp_path / "server") as running:
        yield running


def test_queued_experiments_run_in_parallel(
    tiny_pipeline: TinyPipeline, tmp_path: Path, server: MlflowServer | None
) -> None:
    project = clone_pipeline(tiny_pipeline, tmp_path / "project")  # a committed baseline
    mlruns = sorted(p.name for p in (project / "mlruns").iterdir())
    env = pipeline_env(project, tiny_pipeline.mirror_url)
    if server is not None:
        env["MLFLOW_TRACKING_URI"] = server.url
    set_git_identity(project)

    for name, seed in SEEDS.items():
        dvc(project, env, "exp", "run", "--queue", "-n", name, "-S", f"train.seed={seed}")
    assert set(queue_states(project, env).values()) == {"Queued"}
    started = time.monotonic()
    try:
        dvc(project, env, "queue", "start", "-j", str(JOBS))
        states = wait_for_queue(project, env)
    finally:
        # No worker outlives the test, whatever happened (a no-op once the queue is done).
        stop = [str(BIN / "dvc"), "queue", "stop", "--kill"]
        subprocess.run(stop, cwd=project, env=env, capture_output=True, timeout=120)
    print(f"{len(SEEDS)} experiments, {JOBS} workers: {time.monotonic() - started:.0f} s")

    logs = {name: queue_log(project, env, name) for name in SEEDS}
    assert states == dict.fromkeys(SEEDS, "Success"), (states, logs)
    for name, log in logs.items():
        assert "database is locked" not in log, f"{name}:\n{log[-4000:]}"
        assert "Running stage 'train'" in log, f"{name}:\n{log[-4000:]}"

    client = MlflowClient(server.url) if server else mlflow_client(project)
    if server is not None:
        assert sorted(p.name for p in (project / "mlruns").iterdir()) == mlruns
        assert len(experiment_runs(project)) == 1  # the baseline's: the rest went to the server
        assert "database is locked" not in server.log_tail(chars=10**7)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    every_run = client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time ASC"]
    )
    baseline = [] if server is not None else every_run[:1]  # the baseline logged locally
    runs = every_run[len(baseline) :]
    assert all("dvc.exp_name" not in b.data.tags for b in baseline)
    by_name = {run.data.tags.get("dvc.exp_name"): run for run in runs}
    assert len(runs) == len(SEEDS) and set(by_name) == set(SEEDS), [
        (r.info.run_name, r.data.tags.get("dvc.exp_name")) for r in runs
    ]
    assert len({r.info.run_id for r in [*baseline, *runs]}) == len(SEEDS) + len(baseline)
    for name, run in by_name.items():
        assert run.info.status == "FINISHED", (name, run.info.status)
        assert run.data.params["train.seed"] == str(SEEDS[name])
        assert run.info.run_name == name
        assert "test/ppl" in run.data.metrics and "headline/test_ppl" in run.data.metrics
    # Two workers: some runs overlapped in time (each run spans its train stage).
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans)), spans

    # export registered one model version per run; concurrent registrations got distinct ones.
    versions = client.search_model_versions(f"name='{REGISTERED}'")
    assert sorted(int(v.version) for v in versions) == list(range(1, len(every_run) + 1))
    assert {v.run_id for v in versions} == {r.info.run_id for r in every_run}

    shown = exp_show_revs(json.loads(dvc(project, env, "exp", "show", "--json").stdout))
    for name, run in by_name.items():
        data = shown[name]
        assert committed_json(project, data, "metrics/train_run.json")["run_id"] == run.info.run_id
        assert param(data, "train", "seed") == SEEDS[name]
        registered = committed_json(project, data, "metrics/export_model.json")
        assert {
            v.run_id for v in versions if str(v.version) == registered["registered_version"]
        } == {run.info.run_id}
        test_ppl = metric_file(data, "metrics/eval.json")["headline/test_ppl"]
        assert test_ppl == pytest.approx(run.data.metrics["headline/test_ppl"])
    # @champion: the best of the concurrently evaluated versions, whichever finished last.
    scored = {str(v.version): float(v.tags["test_ppl"]) for v in versions}
    champion = client.get_model_version_by_alias(REGISTERED, "champion")
    assert scored[str(champion.version)] == min(scored.values()), (champion.version, scored)
