"""tracking.py without a training: provenance tags, the tracking URI, the store's experiment."""

from __future__ import annotations

import contextlib
import dataclasses
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import pytest
import sqlalchemy
from mlflow.exceptions import MlflowException, RestException

from rnnlm import tracking
from rnnlm.config import MlflowParams
from tests.fixtures import unused_port

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


# --- MLflow failures keep their cause ------------------------------------------------------

FAST_BUSY_TIMEOUT_MS = 200


def make_store(tmp_path_factory: pytest.TempPathFactory, experiment: str) -> Store:
    """A local SQLite store with one experiment (creating one is slow: modules share one)."""
    db = tmp_path_factory.mktemp("store") / "mlflow.db"
    uri = f"sqlite:///{db}"
    artifacts = (db.parent / "a").as_uri()
    experiment_id = mlflow.MlflowClient(uri).create_experiment(experiment, artifacts)
    return Store(uri, db, experiment_id)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Store:
    return make_store(tmp_path_factory, "faults")


@dataclasses.dataclass(frozen=True)
class Store:
    uri: str
    db: Path
    experiment_id: str

    def new_run(self) -> str:
        return mlflow.MlflowClient(self.uri).create_run(self.experiment_id).info.run_id

    def ml(self) -> MlflowParams:
        return MlflowParams(experiment_name="faults", tracking_uri=self.uri)


@contextlib.contextmanager
def write_locked(db: Path) -> Iterator[None]:
    """Another connection holds `db`'s write lock (BEGIN EXCLUSIVE) for the block.

    MLflow sets SQLite's busy timeout to 20 s per session (mlflow.store.db.utils, not
    configurable); here it waits FAST_BUSY_TIMEOUT_MS instead, so a test takes well under a
    second.
    """
    import mlflow.store.db.utils as db_utils

    replaced = []

    class FastSql:
        def __getattr__(self, name: str) -> Any:
            return getattr(sqlalchemy.sql, name)

        @staticmethod
        def text(statement: str) -> Any:
            if "busy_timeout" in statement:
                replaced.append(statement)
                statement = f"PRAGMA busy_timeout = {FAST_BUSY_TIMEOUT_MS};"
            return sqlalchemy.sql.text(statement)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(db_utils, "sql", FastSql())
        holder = sqlite3.connect(db, isolation_level=None)
        holder.execute("BEGIN EXCLUSIVE")
        try:
            yield
        finally:
            holder.execute("ROLLBACK")
            holder.close()
    assert replaced, "MLflow no longer sets busy_timeout: update write_locked"


def test_an_experiment_another_process_just_created_is_joined(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `dvc queue` workers against a new tracking server both find no experiment; the
    second one's create_experiment fails with RESOURCE_ALREADY_EXISTS and must join it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    real = mlflow.MlflowClient.get_experiment_by_name
    lookups: list[str] = []

    def not_yet_on_first_lookup(self: mlflow.MlflowClient, name: str) -> Any:
        lookups.append(name)
        return None if len(lookups) == 1 else real(self, name)

    monkeypatch.setattr(mlflow.MlflowClient, "get_experiment_by_name", not_yet_on_first_lookup)
    tracked = tracking.start_run(store.ml(), "late", {})
    assert lookups == ["faults", "faults"]  # looked up again after the failed create
    assert tracked.experiment_id == store.experiment_id
    run = mlflow.MlflowClient(store.uri).get_run(tracked.run_id)
    assert run.info.experiment_id == store.experiment_id


def test_a_run_not_in_the_store_is_reported_as_absent(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(tracking.StoreError) as err:
        tracking.attach_run(store.ml(), "0" * 32)
    assert err.value.kind == "not_found"
    message = str(err.value)
    assert f"not found at {store.uri}" in message and "retrain" in message
    assert f"Run with id={'0' * 32} not found" in message  # MLflow's own words
    assert "\n" not in message


def test_a_locked_store_is_reported_as_locked_not_as_a_missing_run(
    store: Store, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_id = store.new_run()
    with write_locked(store.db), pytest.raises(tracking.StoreError) as err:
        tracking.attach_run(store.ml(), run_id)
    message = str(err.value)
    assert err.value.kind == "locked"
    assert f"MLflow store {store.uri} is locked" in message
    assert "sqlite3.OperationalError: database is locked" in message
    assert "not found" not in message and "retrain" not in message
    assert "\n" not in message and "[SQL:" not in message
    # MLflow's own ERROR with the traceback and the SQL is left out: the user reads it once.
    assert not [r for r in caplog.records if r.name.startswith("mlflow.store.db")]


def test_resuming_in_a_locked_store_fails_instead_of_starting_a_new_run(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    run_id = store.new_run()
    with write_locked(store.db), pytest.raises(tracking.StoreError, match="locked"):
        tracking.resume_run(store.ml(), run_id)
    assert tracking.resume_run(store.ml(), "0" * 32) is None  # absent: a new run starts


def test_a_read_only_store_is_reported_as_read_only(
    store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = store.new_run()
    # Opened read-only by SQLite itself: chmod does not stop root, who runs some test machines.
    read_only = f"sqlite:///file:{store.db}?mode=ro&uri=true"
    monkeypatch.chdir(tmp_path)  # MLflow makes a folder `file:/...` (the db's) in the cwd
    tracked = tracking.TrackedRun(uri=read_only, run_id=run_id, experiment_id="")
    with pytest.raises(tracking.StoreError) as err:
        tracked.log_params({"lr": 0.1})
    assert err.value.kind == "read_only"
    message = str(err.value)
    assert message.startswith(f"logging params to run {run_id}: MLflow store {read_only} ")
    assert "cannot be written (sqlite3.OperationalError: attempt to write a readonly database)" in (
        message
    )
    assert "\n" not in message


def test_a_server_lost_after_the_start_check_is_reported_as_unreachable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{unused_port()}"
    tracked = tracking.TrackedRun(uri=uri, run_id="r" * 32, experiment_id="")
    with pytest.raises(tracking.StoreError) as err:
        tracked.set_tags({"a": "b"})
    assert err.value.kind == "unreachable"
    assert f"MLflow tracking server {uri} is unreachable ([Errno 111] Connection refused)" in str(
        err.value
    )


@pytest.mark.parametrize(
    ("error", "kind", "cause"),
    [
        (
            RestException({"error_code": "RESOURCE_DOES_NOT_EXIST",
                           "message": "Run 'x' not found"}),
            "not_found",
            "RESOURCE_DOES_NOT_EXIST: Run 'x' not found",
        ),
        (  # a server whose own SQLite store is locked
            RestException({"error_code": "TEMPORARILY_UNAVAILABLE", "message": "(sqlite3."
                           "OperationalError) database is locked\n[SQL: SELECT 1]"}),
            "locked",
            "TEMPORARILY_UNAVAILABLE: (sqlite3.OperationalError) database is locked",
        ),
        (
            RestException({"error_code": "INVALID_PARAMETER_VALUE", "message": "Changing param"
                           " values is not allowed. Param with key='lr' was already logged"}),
            "rejected",
            "INVALID_PARAMETER_VALUE: Changing param values is not allowed. Param with key='lr' "
            "was already logged",
        ),
        (
            RestException({"error_code": "PERMISSION_DENIED", "message": "Permission denied"}),
            "denied",
            "PERMISSION_DENIED: Permission denied",
        ),
        (
            MlflowException("API request to http://h:5000/api/2.0/mlflow/runs/get failed with "
                            "exception HTTPConnectionPool(host='h', port=5000): Max retries "
                            "exceeded (Caused by NewConnectionError('<urllib3.connection.HTTP"
                            "Connection object>: Failed to establish a new connection: [Errno "
                            "111] Connection refused'))"),
            "unreachable",
            "[Errno 111] Connection refused",
        ),
        (  # MlflowClient() opening a locked store: SQLAlchemy's error, not wrapped by MLflow
            sqlalchemy.exc.OperationalError("SELECT name FROM sqlite_master", {},
                                            sqlite3.OperationalError("database is locked")),
            "locked",
            "sqlite3.OperationalError: database is locked",
        ),
        (
            MlflowException("(sqlite3.OperationalError) database or disk is full\n[SQL: INSERT]"),
            "disk_full",
            "(sqlite3.OperationalError) database or disk is full",
        ),
        (
            PermissionError(13, "Permission denied", "/store/mlflow.db.lock"),
            "read_only",
            "PermissionError: [Errno 13] Permission denied: '/store/mlflow.db.lock'",
        ),
        (MlflowException("Detected out-of-date database schema"), "failed",
         "Detected out-of-date database schema"),
    ],
)  # fmt: skip
def test_mlflow_failures_are_sorted_by_what_they_mean(
    error: BaseException, kind: str, cause: str
) -> None:
    assert tracking.error_kind(error) == kind
    assert tracking.error_cause(error) == cause
    message = str(tracking.store_error("sqlite:////s/mlflow.db", error, "doing x"))
    assert message.startswith("doing x: ") and cause in message and "\n" not in message


def test_a_failed_run_ends_failed_with_its_cause(store: Store) -> None:
    run_id = store.new_run()
    tracked = tracking.TrackedRun(uri=store.uri, run_id=run_id, experiment_id="")
    tracked.mark_failed(RuntimeError("CUDA out of memory"))
    run = mlflow.MlflowClient(store.uri).get_run(run_id)
    assert run.info.status == "FAILED" and run.info.end_time is not None
    assert run.data.tags["rnnlm.error"] == "RuntimeError: CUDA out of memory"


def test_marking_failed_without_a_store_does_not_hide_the_error(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{unused_port()}"
    tracking.TrackedRun(uri=uri, run_id="r" * 32, experiment_id="").mark_failed(ValueError("x"))
    assert "could not be marked FAILED" in caplog.text and "unreachable" in caplog.text
