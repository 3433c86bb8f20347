"""`rnnlm relog` against damaged spools: what it can send is sent, what it cannot is named by
file and line and kept, one file's trouble never stops the others, and a second relog sends
nothing twice."""

from __future__ import annotations

import json
from pathlib import Path

import mlflow
import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import TEMPORARILY_UNAVAILABLE

from rnnlm import cli, tracking
from rnnlm import spool as spool_module
from rnnlm.spool import Spool, relog_unsent, unsent_dir
from tests.unit.test_tracking import Store, make_store, write_locked


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return make_store(tmp_path_factory, "relog")


@pytest.fixture
def root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder, the current one (messages name spool files relative to it)."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("RNNLM_PROJECT_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def spool_a_training(root: Path, store: Store, run_id: str | None = None) -> tuple[str, Path]:
    """What a training that lost its store spools: params, tags, 3 metric records (steps 0-2),
    an artifact and the final status (7 lines). Returns the run id and the spool file."""
    run_id = run_id or store.new_run()
    spool = Spool(unsent_dir(root))
    spool.write(store.uri, run_id, {"kind": "params", "params": {"train.lr": "0.1"}})
    spool.write(store.uri, run_id, {"kind": "tags", "tags": {"cell": "lstm"}})
    for step in range(3):
        metrics = [["train/loss", 5.0 - step, 1_700_000_000_000 + step, step]]
        spool.write(store.uri, run_id, {"kind": "metrics", "metrics": metrics})
    temporary = root / "tmp" / "model.ckpt"
    temporary.parent.mkdir(exist_ok=True)
    temporary.write_bytes(b"weights")
    record = {"kind": "artifact", "path": str(temporary), "artifact_path": "checkpoint"}
    spool.write(store.uri, run_id, record)
    spool.write(store.uri, run_id, {"kind": "status", "status": "FINISHED"})
    return run_id, spool.file(run_id)


def loss_steps(store: Store, run_id: str) -> list[int]:
    history = mlflow.MlflowClient(store.uri).get_metric_history(run_id, "train/loss")
    return sorted(m.step for m in history)


def test_a_whole_spool_is_sent_and_removed(root: Path, store: Store) -> None:
    run_id, spool = spool_a_training(root, store)
    report = relog_unsent()
    assert report == [f"run {run_id}: 7 records sent to {store.uri}"] and not report.problems
    assert not spool.exists() and not spool.with_suffix("").exists()
    client = mlflow.MlflowClient(store.uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params == {"train.lr": "0.1"} and run.data.tags["cell"] == "lstm"
    assert loss_steps(store, run_id) == [0, 1, 2]
    assert [a.path for a in client.list_artifacts(run_id, "checkpoint")] == [
        "checkpoint/model.ckpt"
    ]
    assert relog_unsent() == []  # nothing left


def test_a_line_cut_short_by_a_crash_is_named_and_kept(root: Path, store: Store) -> None:
    run_id, spool = spool_a_training(root, store)
    with spool.open("ab") as f:
        f.write(b'{"uri": "sqlite:///x", "run_id": "' + run_id.encode() + b'", "kind": "met')
    report = relog_unsent()
    assert report.problems == [
        f"mlruns/unsent/{run_id}.jsonl:8: not a JSON record (truncated?); skipped"
    ]
    assert report[-1] == (
        f"run {run_id}: 7 records sent to {store.uri}; 1 line(s) not sent, kept in "
        f"mlruns/unsent/{run_id}.jsonl.bad"
    )
    assert not spool.exists()
    bad = spool.with_name(spool.name + ".bad")
    assert bad.read_bytes().endswith(b'"kind": "met\n')  # as it was, for inspection
    assert mlflow.MlflowClient(store.uri).get_run(run_id).info.status == "FINISHED"
    assert not spool.with_suffix("").exists()  # the sent artifact's copy and its folders

    again = relog_unsent()  # idempotent: nothing sent twice, no problem reported twice
    assert not again.problems
    assert again == [
        f"mlruns/unsent/{run_id}.jsonl.bad: 1 line(s) an earlier relog could not send, kept "
        f"for you to inspect (fix them and rename the file to {run_id}.jsonl to try again, or "
        "delete it)"
    ]
    assert loss_steps(store, run_id) == [0, 1, 2]


def test_garbage_and_incomplete_records_are_skipped_by_line(root: Path, store: Store) -> None:
    run_id, spool = spool_a_training(root, store)
    lines = spool.read_text().splitlines()
    damaged = [
        lines[0],
        "<<<<<<< merge garbage",
        json.dumps({"uri": store.uri, "run_id": run_id, "kind": "metrics"}),
        json.dumps({"uri": store.uri, "run_id": run_id, "kind": "hyperparams", "x": 1}),
        json.dumps({"uri": store.uri, "run_id": run_id, "kind": "metrics", "metrics": [[1]]}),
        "[1, 2]",
        json.dumps({"uri": store.uri, "run_id": "other", "kind": "status", "status": "FAILED"}),
        "",
        *lines[1:],
    ]
    spool.write_text("\n".join(damaged) + "\n")
    report = relog_unsent()
    name = f"mlruns/unsent/{run_id}.jsonl"
    assert report.problems == [
        f"{name}:2: not a JSON record; skipped",
        f"{name}:3: not a spool record (metrics record without 'metrics'); skipped",
        f'{name}:4: unknown record kind "hyperparams"; skipped',
        f"{name}:5: not a spool record (malformed 'metrics': [[1]]); skipped",
        f"{name}:6: not a spool record (a JSON list, not an object); skipped",
        f'{name}:7: a record of run "other", not of {run_id}; skipped',
    ]
    assert report[-1].startswith(f"run {run_id}: 7 records sent to {store.uri}; 6 line(s)")
    assert len(spool.with_name(spool.name + ".bad").read_text().splitlines()) == 6
    assert loss_steps(store, run_id) == [0, 1, 2]


def test_a_missing_artifact_copy_is_named_and_the_rest_is_sent(root: Path, store: Store) -> None:
    run_id, spool = spool_a_training(root, store)
    copy = spool.with_suffix("") / "checkpoint" / "model.ckpt"
    copy.unlink()
    report = relog_unsent()
    assert report.problems == [
        f"mlruns/unsent/{run_id}.jsonl:6: artifact checkpoint/model.ckpt: its spooled copy "
        f"mlruns/unsent/{run_id}/checkpoint/model.ckpt is gone; skipped"
    ]
    run = mlflow.MlflowClient(store.uri).get_run(run_id)
    assert run.info.status == "FINISHED"  # the status after it still went
    assert report[-1].startswith(f"run {run_id}: 6 records sent")


def test_a_run_missing_from_the_store_does_not_stop_the_next_file(root: Path, store: Store) -> None:
    absent = "0" * 32  # sorts first
    _, first = spool_a_training(root, store, run_id=absent)
    before = first.read_bytes()
    run_id, second = spool_a_training(root, store)
    report = relog_unsent()
    assert report.problems == [
        f"mlruns/unsent/{absent}.jsonl: run {absent} is not in {store.uri} (Run with "
        f"id={absent} not found); nothing sent, the file is kept. Set MLFLOW_TRACKING_URI (or "
        "--tracking-uri) to the store the run was created in"
    ]
    assert report[-1] == f"run {run_id}: 7 records sent to {store.uri}"
    assert first.read_bytes() == before and not second.exists()


def test_the_relog_command_sends_the_rest_and_exits_1_naming_what_it_could_not(
    root: Path, store: Store, capsys: pytest.CaptureFixture[str]
) -> None:
    absent = "0" * 32
    spool_a_training(root, store, run_id=absent)
    run_id, _ = spool_a_training(root, store)
    assert cli.main(["relog"]) == 1
    out, err = capsys.readouterr()
    assert out == f"run {run_id}: 7 records sent to {store.uri}\n"
    assert err.startswith(f"mlruns/unsent/{absent}.jsonl: run {absent} is not in {store.uri}")
    assert len(err.splitlines()) == 1


def test_a_store_failing_mid_file_keeps_the_rest_for_the_next_relog(
    root: Path, store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id, spool = spool_a_training(root, store)
    _, other = spool_a_training(root, store)  # same store: not tried once it failed
    send_metrics = tracking.send_metrics
    calls = []

    def lost_on_the_second_call(tracked: tracking.TrackedRun, items: list) -> None:
        calls.append(items)
        if len(calls) == 2:
            raise MlflowException(
                "(sqlite3.OperationalError) database is locked\n[SQL: INSERT INTO metrics]",
                error_code=TEMPORARILY_UNAVAILABLE,
            )
        send_metrics(tracked, items)

    monkeypatch.setattr(tracking, "send_metrics", lost_on_the_second_call)
    report = relog_unsent()
    first, second = sorted([spool, other])
    assert len(report.problems) == 2
    assert report.problems[0].startswith(
        f"mlruns/unsent/{first.name}:4: not sent: MLflow store {store.uri} is locked"
    )
    assert report.problems[0].endswith(
        "it and the 3 record(s) after it stay in the file for the next relog"
    )
    assert report.problems[1] == (
        f"mlruns/unsent/{second.name}: nothing sent, store {store.uri} failed (see above)"
    )
    assert len(first.read_text().splitlines()) == 4  # metrics at steps 1, 2; artifact; status

    monkeypatch.setattr(tracking, "send_metrics", send_metrics)
    again = relog_unsent()
    assert not again.problems and not spool.exists() and not other.exists()
    assert loss_steps(store, run_id) == [0, 1, 2]


def test_a_relog_killed_before_it_rewrote_the_file_sends_no_metric_twice(
    root: Path, store: Store
) -> None:
    run_id, spool = spool_a_training(root, store)
    saved = spool.read_bytes()
    relog_unsent()
    spool.write_bytes(saved)  # as if relog died after sending, before taking the lines out
    (spool.with_suffix("") / "checkpoint").mkdir(parents=True)
    (spool.with_suffix("") / "checkpoint" / "model.ckpt").write_bytes(b"weights")
    report = relog_unsent()
    assert not report.problems
    assert loss_steps(store, run_id) == [0, 1, 2]  # not [0, 0, 1, 1, 2, 2]


def test_a_write_after_a_crash_mid_line_starts_a_new_line(root: Path, store: Store) -> None:
    run_id, spool = spool_a_training(root, store)
    with spool.open("ab") as f:
        f.write(b'{"kind": "tags", "ta')  # the training died here; its resume spools on
    Spool(unsent_dir(root)).write(store.uri, run_id, {"kind": "tags", "tags": {"resumed": "1"}})
    report = relog_unsent()
    assert report.problems == [f"mlruns/unsent/{run_id}.jsonl:8: not a JSON record; skipped"]
    assert mlflow.MlflowClient(store.uri).get_run(run_id).data.tags["resumed"] == "1"


def test_a_locked_store_names_the_lock_and_keeps_every_file(root: Path, store: Store) -> None:
    _, first = spool_a_training(root, store)
    _, second = spool_a_training(root, store)
    saved = {first: first.read_bytes(), second: second.read_bytes()}
    with write_locked(store.db):
        report = relog_unsent()
    one, two = sorted(saved)
    assert len(report.problems) == 2 and report == report.problems
    assert report.problems[0].startswith(
        f"mlruns/unsent/{one.name}: nothing sent: MLflow store {store.uri} is locked: another "
        f"process holds a write lock on {store.db} (sqlite3.OperationalError: database is "
        "locked)"
    )
    assert report.problems[1] == (
        f"mlruns/unsent/{two.name}: nothing sent, store {store.uri} failed (see above)"
    )
    assert {path: path.read_bytes() for path in saved} == saved

    assert not relog_unsent().problems  # the lock gone, all is sent
    assert not first.exists() and not second.exists()


def test_an_unreachable_store_keeps_the_file_and_names_the_server(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    from tests.fixtures import unused_port

    uri = f"http://127.0.0.1:{unused_port()}"
    spool = Spool(unsent_dir(root))
    spool.write(uri, "r" * 32, {"kind": "tags", "tags": {"a": "b"}})
    report = relog_unsent()
    assert report.problems == [
        f"mlruns/unsent/{'r' * 32}.jsonl: nothing sent: MLflow tracking server {uri} is "
        f"unreachable ([Errno 111] Connection refused). Start it (make mlflow-server), fix "
        "MLFLOW_TRACKING_URI, or unset it to use the local SQLite store under mlruns/."
    ]
    assert spool.file("r" * 32).is_file()


def test_the_report_is_still_a_list_of_lines() -> None:
    report = spool_module.RelogReport()
    report.note("sent")
    report.problem("not sent")
    assert report == ["sent", "not sent"] and report.problems == ["not sent"]
    assert "\n".join(report) == "sent\nnot sent"
