"""MLflow in one place: the only module of the pipeline that calls mlflow.

Logging (runs, metrics, artifacts), the model registry, and saving or downloading models happen
here. (rnnlm.serving, the served model's own code, imports mlflow for its interface: the
PythonModel base class, its exception and the signature types.)

Tracking URI: MLFLOW_TRACKING_URI when set, else `mlflow.tracking_uri` from params.yaml, else a
SQLite store under the PROJECT's `mlruns/` (`sqlite:///<root>/mlruns/mlflow.db`, artifacts in
`<root>/mlruns/artifacts`). The project root is resolved so that DVC experiments that run in a
copy of the repository under `.dvc/tmp/exps/` still log to the project's own store.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from rnnlm.config import MlflowParams
from rnnlm.errors import RnnlmError, short_repr
from rnnlm.files import read_json

log = logging.getLogger(__name__)

# DVC runs queued and --temp experiments in <root>/.dvc/tmp/exps/<name>/ (DVC >= 2.x).
_DVC_EXP_COPY = re.compile(r"^(?P<root>.*?)/\.dvc/tmp/exps/")
SERVER_CHECK_TIMEOUT_S = 5.0
# MLflow 3's UI opens an experiment on its GenAI pages (traces, evaluations) unless this tag says
# it holds model-training runs; "custom_model_development" is the UI's value for those.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
DESCRIPTION_TAG = "mlflow.note.content"  # what the UI shows as an experiment's description
EXPERIMENT_DESCRIPTION = (
    "Recurrent language models (GRU, LSTM, vanilla RNN) trained by the rnnlm DVC pipeline. "
    "One run per training: params, per-step and per-epoch curves, the ONNX model and its "
    "evaluation. The numbers to compare are in the charts' first section, headline/: "
    "test_ppl (the shipped ONNX network's test perplexity), cache_test_ppl (with its continuous "
    "cache), scored_test_ppl (with cache and Kneser-Ney n-gram: what rnnlm score reports), "
    "val_ppl (the best epoch's), "
    "kn_test_ppl and unigram_test_ppl (count-based baselines on the same split) and "
    "improvement_over_kn_pct. In the UI choose 'Model training' (or add "
    "?workflowType=machine_learning to the URL) to see the runs."
)
REGISTERED_MODEL_DESCRIPTION = (
    "Recurrent language models exported by the rnnlm pipeline. Each version is a pyfunc model, "
    "text in and results out (params task = score, next or generate; mlflow models serve runs "
    "it, no torch needed), holding the self-contained ONNX file as artifacts/model.onnx "
    "(vocabulary and tokenizer in its metadata; onnxruntime alone runs it). "
    "Each version carries tags corpus, test_ppl (the network alone) and scored_test_ppl (with "
    "the cache and n-gram it serves); the alias @champion is the version with the lowest "
    "scored_test_ppl on its corpus, moved by the evaluate stage only when a new version beats it."
)
CHAMPION_ALIAS = "champion"
# Run tags a registered version carries too, so the registry says what each version is.
VERSION_TAGS_FROM_RUN = ("corpus", "cell")
# Database stores MLflow accepts besides sqlite (a driver may follow a "+": mysql+pymysql://).
DATABASE_SCHEMES = {"sqlite", "postgresql", "mysql", "mssql", "databricks"}


class TrackingError(RnnlmError):
    """The tracking store cannot be reached or used."""


class StoreError(TrackingError):
    """An MLflow call failed; `kind` says why (see `error_kind`), `cause` is MLflow's reason
    in one line."""

    def __init__(self, message: str, kind: str, cause: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.cause = cause


def project_root(cwd: Path | None = None) -> Path:
    """The project's root: RNNLM_PROJECT_ROOT, else cwd unless cwd is a DVC experiment copy."""
    if env := os.environ.get("RNNLM_PROJECT_ROOT"):
        return Path(env).resolve()
    cwd = (cwd or Path.cwd()).resolve()
    match = _DVC_EXP_COPY.match(cwd.as_posix() + "/")
    return Path(match["root"]) if match else cwd


def resolve_tracking_uri(ml: MlflowParams, root: Path | None = None) -> str:
    if env := os.environ.get("MLFLOW_TRACKING_URI"):
        return env
    if ml.tracking_uri:
        return ml.tracking_uri
    return f"sqlite:///{(root or project_root()) / 'mlruns' / 'mlflow.db'}"


def default_artifact_location(uri: str, root: Path | None = None) -> str | None:
    """Artifacts beside a local SQLite store; a server decides for itself (None)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "artifacts").as_uri()
    return None


def check_tracking_uri(uri: str, timeout: float = SERVER_CHECK_TIMEOUT_S) -> None:
    """Fail within seconds, with a clear message, when an HTTP tracking server is unreachable."""
    if uri.startswith(("http://", "https://")):
        url = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                response.read(64)
        except (urllib.error.URLError, OSError, ValueError) as err:
            reason = getattr(err, "reason", err)
            raise StoreError(_unreachable(uri, str(reason)), "unreachable", str(reason)) from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(
                f"cannot create the MLflow store folder {db.parent}: {err}"
            ) from None
    elif uri == "databricks":  # Databricks' hosted MLflow, configured by its own profile
        return
    elif uri.startswith("file:") or "://" not in uri:
        raise TrackingError(
            f"tracking URI {uri!r}: MLflow's file store is no longer supported; use "
            "sqlite:///path/to/mlflow.db or an http(s) tracking server"
        )
    elif uri.split("://", 1)[0].split("+", 1)[0] not in DATABASE_SCHEMES:
        raise TrackingError(
            f"tracking URI {uri!r}: unknown scheme (use http(s)://host:port for a server, "
            f"or one of {', '.join(s + '://' for s in sorted(DATABASE_SCHEMES))} for a database)"
        )


# MLflow failures, translated in one place. MLflow wraps a store's failure in MlflowException
# (a server's in RestException, a subclass) whose `error_code` names a databricks_pb2 ErrorCode;
# a SQL store's database error is MlflowException(TEMPORARILY_UNAVAILABLE) whose __cause__ is
# SQLAlchemy's OperationalError, itself holding the driver's error in `.orig`
# (sqlite3.OperationalError: database is locked).
_NOT_FOUND_CODES = {"RESOURCE_DOES_NOT_EXIST"}
_DENIED_CODES = {"PERMISSION_DENIED", "UNAUTHENTICATED", "CUSTOMER_UNAUTHORIZED"}
_REJECTED_CODES = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS"}
_KINDS_BY_TEXT = (  # the first match wins; texts are SQLite's, PostgreSQL's, MySQL's, the OS's
    ("locked", ("database is locked", "database table is locked", "lock wait timeout")),
    ("disk_full", ("database or disk is full", "no space left", "[errno 28]")),
    (
        "read_only",
        (
            "readonly database",
            "read-only",
            "permission denied",
            "[errno 13]",
            "[errno 30]",
            "unable to open database file",
        ),
    ),
)
_CAUSE_CHARS = 300
# Noise in SQLAlchemy's messages: the statement, its parameters, the link to its docs.
_SQLALCHEMY_NOISE = ("[SQL:", "[parameters:", "(Background on this error", "(raised as a result")
_ERRNO = re.compile(r"\[Errno -?\d+\][^'\")\]]*")


def _chain(err: BaseException) -> Iterator[BaseException]:
    """`err`, then what caused it (explicitly, else implicitly), and so on."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def error_cause(err: BaseException) -> str:
    """Why an MLflow call failed, in one line without SQL or traceback, e.g.
    `sqlite3.OperationalError: database is locked` or `[Errno 111] Connection refused`."""
    for link in _chain(err):
        orig = getattr(link, "orig", None)  # SQLAlchemy's DBAPIError: the driver's own error
        if isinstance(orig, BaseException):
            module = type(orig).__module__.split(".")[0]
            return _one_line(f"{module}.{type(orig).__name__}: {orig}")
    text = str(err)
    if text.startswith("API request to"):  # MLflow's REST client lost the server
        if match := _ERRNO.search(text):
            return _one_line(match[0].strip())
        if "timeout" in text.lower():
            return _one_line(text.split(". To increase", 1)[0])
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith(_SQLALCHEMY_NOISE)] or lines
    first = lines[0] if lines else ""
    from mlflow.exceptions import MlflowException

    if isinstance(err, MlflowException):
        return _one_line(first)
    return _one_line(f"{type(err).__name__}: {first}" if first else type(err).__name__)


def _one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= _CAUSE_CHARS else text[: _CAUSE_CHARS - 3] + "..."


def error_kind(err: BaseException) -> str:
    """What an MLflow failure means for the caller:

    not_found    the run (experiment, model) is not in the store: MLflow's RESOURCE_DOES_NOT_EXIST
    locked       another process holds the store's write lock (SQLite "database is locked", or
                 our own first-use file lock timed out)
    read_only    the store cannot be written: a read-only database file or folder, permissions
    disk_full    the store's disk is full
    unreachable  the tracking server does not answer (refused, reset, timed out)
    denied       the server refused our credentials
    rejected     the store refused this request (an invalid or conflicting value): the store
                 itself works
    failed       anything else
    """
    code = getattr(err, "error_code", None)
    if code in _NOT_FOUND_CODES:
        return "not_found"
    if code in _DENIED_CODES:
        return "denied"
    if type(err).__name__ == "Timeout" and type(err).__module__.startswith("filelock"):
        return "locked"
    text = "\n".join(str(link) for link in _chain(err)).lower()
    for kind, needles in _KINDS_BY_TEXT:
        if any(needle in text for needle in needles):
            return kind
    if str(err).startswith("API request to") or any(
        isinstance(link, ConnectionError) or type(link).__name__ in ("ConnectionError", "Timeout")
        for link in _chain(err)
    ):
        return "unreachable"
    if code in _REJECTED_CODES:
        return "rejected"
    return "failed"


def _unreachable(uri: str, reason: str) -> str:
    return (
        f"MLflow tracking server {uri} is unreachable ({reason}). Start it "
        "(make mlflow-server), fix MLFLOW_TRACKING_URI, or unset it to use the "
        "local SQLite store under mlruns/."
    )


def store_error(uri: str, err: BaseException, doing: str = "") -> StoreError:
    """The one-line TrackingError for an MLflow failure: what was being done, the store, what
    went wrong in the store's own words, what to do. `doing` reads like "reading run <id>"."""
    if isinstance(err, StoreError):
        return err
    if isinstance(err, TrackingError):  # ours (check_tracking_uri's): already says it all
        return StoreError(f"{doing}: {err}" if doing else str(err), "failed", str(err))
    kind, cause = error_kind(err), error_cause(err)
    prefix = f"{doing}: " if doing else ""
    db = Path(uri.removeprefix("sqlite:///")) if uri.startswith("sqlite:///") else None
    if kind == "locked":
        holder = f"{db}" if db else "the store's database"
        message = (
            f"MLflow store {uri} is locked: another process holds a write lock on {holder} "
            f"({cause}). Wait for it to finish (another training or relog, `mlflow ui`, a "
            "sqlite3 shell with an open transaction), then run this again"
        )
    elif kind == "read_only":
        where = f"{db} and its folder {db.parent}" if db else "the server's database"
        message = (
            f"MLflow store {uri} cannot be written ({cause}). Make {where} writable (SQLite "
            "writes a journal file beside the database), or point MLFLOW_TRACKING_URI at a "
            "writable store"
        )
    elif kind == "disk_full":
        where = f"the disk of {db.parent}" if db else "the server's disk"
        message = f"MLflow store {uri}: no space left ({cause}). Free space on {where}"
    elif kind == "unreachable":
        message = _unreachable(uri, cause)
    elif kind == "denied":
        message = (
            f"MLflow tracking server {uri} refused access ({cause}). Set "
            "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (or MLFLOW_TRACKING_TOKEN)"
        )
    elif kind == "not_found":
        message = f"not in MLflow store {uri} ({cause})"
    else:
        message = f"MLflow store {uri}: {cause}"
    return StoreError(prefix + message, kind, cause)


class _DropDbErrorTracebacks(logging.Filter):
    """MLflow's SQL store logs every database error with a traceback before raising it; the
    error reaches the user once, translated by store_error, instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("SQLAlchemy database error")


_DB_ERROR_FILTER = _DropDbErrorTracebacks()


@contextlib.contextmanager
def _store_lock(uri: str) -> Iterator[None]:
    """Serialise first use of a SQLite store: concurrent creators race on its schema."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    from filelock import FileLock

    db = Path(uri.removeprefix("sqlite:///"))
    with FileLock(str(db) + ".lock", timeout=120):
        yield


def _client(uri: str):  # -> mlflow.MlflowClient
    import mlflow

    # Fail fast instead of MLflow's default minutes of retries against a dead server.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    db_logger = logging.getLogger("mlflow.store.db.utils")
    if _DB_ERROR_FILTER not in db_logger.filters:
        db_logger.addFilter(_DB_ERROR_FILTER)
    return mlflow.MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point mlflow's fluent API at `uri` for the block only.

    mlflow.set_tracking_uri also exports MLFLOW_TRACKING_URI, which every later subprocess and
    stage would inherit (and which wins over params.yaml): it is undone on the way out.
    """
    import mlflow

    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(None)  # type: ignore[arg-type]  # None clears both (mlflow 3)
        if env_before is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env_before


# What defines a run, for the dirty flag: the code, its dependencies and the pipeline's params
# and stages. dvc.lock and the outputs are left out: `dvc repro` rewrites them before a stage
# runs, so counting them would make every run "dirty" and the flag say nothing.
DEFINING_PATHS = ("src", "params.yaml", "dvc.yaml", "pyproject.toml", "constraints.txt")
_DIRTY_FILES_SHOWN = 10


def git_info(root: Path) -> dict[str, str]:
    """Commit of the code and whether the files that define a run differ from it.

    `git.dirty` is "true" when a file under DEFINING_PATHS is modified, staged or new (an
    untracked module under src/ changes what runs as much as an edited one); `git.dirty_files`
    names them (the first few).
    """

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=True, timeout=10
        ).stdout

    try:
        commit = git("rev-parse", "HEAD").strip()
        status = git("status", "--porcelain", "--untracked-files=all", "--", *DEFINING_PATHS)
    except (OSError, subprocess.SubprocessError):
        return {"git.commit": "unknown"}
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    info = {"git.commit": commit, "git.dirty": str(bool(changed)).lower()}
    if changed:
        more = len(changed) - _DIRTY_FILES_SHOWN
        info["git.dirty_files"] = ", ".join(changed[:_DIRTY_FILES_SHOWN]) + (
            f" and {more} more" if more > 0 else ""
        )
    return info


def dvc_experiment_tags() -> dict[str, str]:
    """The DVC experiment name and baseline, when run by `dvc exp run`."""
    names = {"DVC_EXP_NAME": "dvc.exp_name", "DVC_EXP_BASELINE_REV": "dvc.exp_baseline_rev"}
    return {tag: os.environ[env] for env, tag in names.items() if os.environ.get(env)}


class Spooler(Protocol):
    """Where a run's records go while its store is unreachable (`rnnlm.spool.Spool`)."""

    def file(self, run_id: str) -> Path: ...

    def write(self, uri: str, run_id: str, record: dict[str, Any]) -> None: ...

    def summary(self) -> str: ...


@dataclass
class TrackedRun:
    """A run in the tracking store; the handle stages log through.

    With a `spool` (the train stage), losing the store does not stop the stage: the first
    failed call switches the handle offline, and from then on every record (metrics, tags,
    params, artifacts, the final status) goes to the spool instead, for `rnnlm relog` to send
    once the store is back. Without one, a failure raises TrackingError.
    """

    uri: str
    run_id: str
    experiment_id: str
    spool: Spooler | None = None
    offline_error: str | None = field(default=None, init=False)

    @property
    def client(self) -> Any:  # an mlflow.MlflowClient
        return _client(self.uri)

    @property
    def spool_file(self) -> Path | None:
        return self.spool.file(self.run_id) if self.spool else None

    def _deliver(self, record: dict[str, Any], send: Callable[[], object]) -> None:
        """Send now, or keep `record` for later when the store is (or just went) unreachable."""
        if self.offline_error is None:
            try:
                send()
                return
            except Exception as err:  # MLflow raises many types; all mean "not logged"
                kind = record["kind"]
                doing = (
                    f"setting run {self.run_id} {record['status']}"
                    if kind == "status"
                    else f"logging {kind} to run {self.run_id}"
                )
                self.go_offline(err, doing)
        assert self.spool is not None  # go_offline raised otherwise
        self.spool.write(self.uri, self.run_id, record)

    def go_offline(self, err: Exception, doing: str = "") -> None:
        """Stop calling the store (each failed call costs its retries); spool from now on.
        Without a spool, raise the failure as a StoreError instead."""
        if self.spool is None:
            raise store_error(self.uri, err, doing) from err
        self.offline_error = error_cause(err)
        log.warning(
            "MLflow tracking store %s stopped answering (%s); training goes on and what is "
            "not logged is kept in %s for `rnnlm relog`",
            self.uri,
            self.offline_error,
            self.spool_file,
        )

    def log_params(self, params: Mapping[str, Any]) -> None:
        values = {k: str(v)[:6000] for k, v in params.items()}
        self._deliver({"kind": "params", "params": values}, lambda: send_params(self, values))

    def set_tags(self, tags: Mapping[str, str]) -> None:
        values = {k: str(v) for k, v in tags.items()}
        self._deliver({"kind": "tags", "tags": values}, lambda: send_tags(self, values))

    def log_metrics(self, metrics: Mapping[str, float], step: int = 0) -> None:
        now = int(time.time() * 1000)
        items = [[k, float(v), now, int(step)] for k, v in metrics.items()]
        self._deliver({"kind": "metrics", "metrics": items}, lambda: send_metrics(self, items))

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        record = {"kind": "artifact", "path": str(path), "artifact_path": artifact_path}
        self._deliver(
            record, lambda: self.client.log_artifact(self.run_id, str(path), artifact_path)
        )

    def set_status(self, status: str) -> None:
        """RUNNING, FINISHED, FAILED or KILLED."""
        self._deliver({"kind": "status", "status": status}, lambda: send_status(self, status))

    def mark_failed(self, err: BaseException | None = None) -> None:
        """End the run FAILED after `err`, best effort: never raises, so the caller's own
        error goes on. The one-line cause goes to tag `rnnlm.error`. With a spool and the store
        away, both are spooled for `rnnlm relog`."""
        try:
            if err is not None:
                self.set_tags({"rnnlm.error": _one_line(f"{type(err).__name__}: {err}")})
            self.set_status("FAILED")
        except Exception as problem:  # the store is away and there is no spool
            log.warning("MLflow run %s could not be marked FAILED: %s", self.run_id, problem)

    def unsent_summary(self) -> str:
        """What was not logged, for the stage's closing warning."""
        return self.spool.summary() if self.spool else ""

    def last_logged_steps(self) -> dict[str, int]:
        """Metric key -> the highest step the run has a value for."""
        try:
            client = self.client
            keys = client.get_run(self.run_id).data.metrics
            return {
                key: max((m.step for m in client.get_metric_history(self.run_id, key)), default=-1)
                for key in keys
            }
        except Exception as err:
            raise store_error(self.uri, err, f"reading the metrics of run {self.run_id}") from err


def send_params(tracked: TrackedRun, params: Mapping[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k, v) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow's per-request limit
        tracked.client.log_batch(tracked.run_id, params=items[i : i + 100])


def send_tags(tracked: TrackedRun, tags: Mapping[str, str]) -> None:
    from mlflow.entities import RunTag

    tracked.client.log_batch(tracked.run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def send_metrics(tracked: TrackedRun, items: Sequence[Sequence[Any]]) -> None:
    from mlflow.entities import Metric

    metrics = [Metric(k, v, ts, step) for k, v, ts, step in items]
    for i in range(0, len(metrics), 1000):  # MLflow's per-request limit
        tracked.client.log_batch(tracked.run_id, metrics=metrics[i : i + 1000])


def send_status(tracked: TrackedRun, status: str) -> None:
    if status == "RUNNING":
        tracked.client.update_run(tracked.run_id, status=status)
    else:  # a terminal status also sets the run's end time
        tracked.client.set_terminated(tracked.run_id, status)


def start_run(
    ml: MlflowParams, run_name: str, tags: Mapping[str, str], spool: Spooler | None = None
) -> TrackedRun:
    """Create a run in the experiment (created if missing) and return its handle.

    With a `spool`, the handle keeps what it cannot log once the store goes away.
    """
    root = project_root()
    uri = resolve_tracking_uri(ml, root)
    check_tracking_uri(uri)
    try:
        with _store_lock(uri):
            client = _client(uri)
            experiment = client.get_experiment_by_name(ml.experiment_name)
            if experiment is None:
                experiment_id = _create_experiment(client, ml.experiment_name, uri, root)
            else:
                experiment_id = experiment.experiment_id
                # A store made before these tags existed, or by hand: the UI reads them.
                if EXPERIMENT_KIND_TAG not in experiment.tags:
                    client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
                if DESCRIPTION_TAG not in experiment.tags:
                    client.set_experiment_tag(
                        experiment_id, DESCRIPTION_TAG, EXPERIMENT_DESCRIPTION
                    )
        run = client.create_run(experiment_id, run_name=run_name, tags=dict(tags))
    except Exception as err:  # MLflow raises many types; all mean "the store is unusable"
        if isinstance(err, TrackingError):
            raise
        doing = f"starting a run in experiment {ml.experiment_name!r}"
        raise store_error(uri, err, doing) from err
    log.info("MLflow run %s in experiment %r at %s", run.info.run_id, ml.experiment_name, uri)
    return TrackedRun(uri=uri, run_id=run.info.run_id, experiment_id=experiment_id, spool=spool)


def _create_experiment(client: Any, name: str, uri: str, root: Path) -> str:
    """Create experiment `name`; its id. A server has no lock beside it (`_store_lock`): when
    another process (a parallel `dvc queue` worker) created it first, that one is used."""
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(
            name,
            artifact_location=default_artifact_location(uri, root),
            tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND, DESCRIPTION_TAG: EXPERIMENT_DESCRIPTION},
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        experiment = client.get_experiment_by_name(name)
        if experiment is None:  # created and deleted again meanwhile: nothing to join
            raise
        return experiment.experiment_id


_RUN_ID = re.compile(r"[0-9A-Za-z_-]{1,64}")


def read_run_id(record: Path) -> str:
    """The training's MLflow run id, from the record the train stage writes (train_run.json)."""
    try:
        data = read_json(record)
    except (FileNotFoundError, ValueError) as err:
        raise TrackingError(str(err)) from None
    run_id = data.get("run_id") if isinstance(data, dict) else None
    if not isinstance(run_id, str) or not run_id:
        raise TrackingError(f"{record}: no run_id (run the train stage first)")
    if not _RUN_ID.fullmatch(run_id):  # it goes into store queries and artifact paths
        raise TrackingError(
            f"{record}: run_id = {short_repr(run_id)} is not an MLflow run id "
            "(run the train stage again)"
        )
    return run_id


def attach_run(ml: MlflowParams, run_id: str) -> TrackedRun:
    """The run a previous stage created (its id read from that stage's metrics file)."""
    uri = resolve_tracking_uri(ml)
    check_tracking_uri(uri)
    try:
        run = _client(uri).get_run(run_id)
    except Exception as err:
        problem = store_error(uri, err, f"reading MLflow run {run_id} (metrics/train_run.json)")
        if problem.kind != "not_found":
            raise problem from None
        raise StoreError(
            f"MLflow run {run_id} (metrics/train_run.json) not found at {uri}: it was logged to "
            "another store (e.g. the local mlruns/ of whoever trained this model). Point "
            "MLFLOW_TRACKING_URI at that store, or retrain (`dvc repro -f -s train`) to log a "
            f"run of your own ({problem.cause})",
            problem.kind,
            problem.cause,
        ) from None
    return TrackedRun(uri=uri, run_id=run_id, experiment_id=run.info.experiment_id)


def resume_run(ml: MlflowParams, run_id: str, spool: Spooler | None = None) -> TrackedRun | None:
    """The run an interrupted training logged to, set RUNNING again; None if the store lacks it.

    Setting it RUNNING must reach the store (a TrackingError otherwise); from then on the
    handle spools what it cannot log, as a new run's does.
    """
    uri = resolve_tracking_uri(ml)
    check_tracking_uri(uri)
    try:
        run = _client(uri).get_run(run_id)
    except Exception as err:
        problem = store_error(uri, err, f"resuming MLflow run {run_id}")
        if problem.kind != "not_found":  # a locked or unreachable store is not an absent run
            raise problem from err
        log.warning("MLflow run %s to resume is not in %s (%s)", run_id, uri, problem.cause)
        return None
    tracked = TrackedRun(uri=uri, run_id=run_id, experiment_id=run.info.experiment_id)
    tracked.set_status("RUNNING")  # no spool yet: a failure raises TrackingError
    # From here on the run is RUNNING: what fails is spooled, it never leaves the run so.
    tracked = TrackedRun(uri=uri, run_id=run_id, experiment_id=tracked.experiment_id, spool=spool)
    resumes = int(run.data.tags.get("rnnlm.resumes", "0")) + 1
    tracked.set_tags({"rnnlm.resumes": str(resumes)})
    log.info("MLflow run %s continued (resume %d) at %s", run_id, resumes, uri)
    return tracked


def fail_pending_models(tracked: TrackedRun) -> list[str]:
    """Mark FAILED the logged models of `tracked`'s run still PENDING: what an export killed
    while uploading (Ctrl-C, SIGKILL) left behind. MLflow finalizes a model itself only when
    an Exception interrupts the upload. Call it before logging a new model; returns their ids.
    """
    from mlflow.entities import LoggedModelStatus

    client = tracked.client
    try:
        experiment_id = tracked.experiment_id or client.get_run(tracked.run_id).info.experiment_id
        # The SQL store ignores `status` in filters: select the run's models, check in Python.
        models = client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{tracked.run_id}'"
        )
        pending = [m.model_id for m in models if m.status == LoggedModelStatus.PENDING]
        for model_id in pending:
            client.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
            log.warning(
                "MLflow model %s of run %s was left PENDING by an interrupted export; "
                "marked FAILED",
                model_id,
                tracked.run_id,
            )
    except Exception as err:
        raise store_error(tracked.uri, err, f"checking the models of run {tracked.run_id}") from err
    return pending


def log_pyfunc_model(
    tracked: TrackedRun,
    model: Mapping[str, Any],
    *,
    name: str,
    registered_model_name: str | None,
    params: Mapping[str, Any] | None = None,
    metrics: Mapping[str, float] | None = None,
) -> dict[str, str | None]:
    """Log a pyfunc model to `tracked`'s run; register it by name.

    `model` holds the keywords of mlflow.pyfunc.log_model that make the model (rnnlm.serving.
    model_files: its code, artifacts, signature, input example, requirements, model_config).
    It becomes a LoggedModel linked to the run (source run = the training run). `metrics` go to
    the run and to the logged model. With `registered_model_name` a new version of that
    registered model is created from it.

    Returns:
        {"model_uri": ..., "model_id": ..., "registered_model": ..., "registered_version": ...}
        (the last two None when not registered).
    """
    try:
        import mlflow

        _client(tracked.uri)  # the retry settings
        # The fluent API (start_run, log_model, register_model) reads a process-wide URI.
        with fluent_tracking_uri(tracked.uri), mlflow.start_run(run_id=tracked.run_id):
            info = mlflow.pyfunc.log_model(
                name=name,
                params={k: str(v) for k, v in (params or {}).items()} or None,
                **model,
            )
            if metrics:
                mlflow.log_metrics(dict(metrics), model_id=info.model_id)
            result = {
                "model_uri": info.model_uri,
                "model_id": info.model_id,
                "registered_model": registered_model_name,
                "registered_version": (
                    _register(tracked, info.model_uri, registered_model_name)
                    if registered_model_name
                    else None
                ),
            }
    except Exception as err:  # MLflow raises many types; all mean "could not log"
        raise store_error(
            tracked.uri, err, f"logging model {name!r} to run {tracked.run_id}"
        ) from err
    log.info(
        "logged model %r to run %s as %s%s",
        name,
        tracked.run_id,
        info.model_uri,
        f", registered {registered_model_name} v{result['registered_version']}"
        if registered_model_name
        else "",
    )
    return result


def save_pyfunc_model(model: Mapping[str, Any], path: Path) -> None:
    """Write a pyfunc model into the new folder `path` (the keywords of mlflow.pyfunc.save_model
    in `model`, as for log_pyfunc_model): a model no store holds, e.g. from a plain .onnx file."""
    import mlflow

    try:
        mlflow.pyfunc.save_model(str(path), **model)
    except Exception as err:  # MLflow raises many types
        raise TrackingError(f"cannot build a pyfunc model in {path}: {error_cause(err)}") from err


def download_model(model_uri: str, dest: Path, ml: MlflowParams) -> Path:
    """Download the MLflow model at `model_uri` (models:/name/version, models:/name@alias,
    runs:/..., or a folder) from the store `ml` resolves to, into the empty folder `dest`;
    returns the local folder of the model."""
    import mlflow

    uri = resolve_tracking_uri(ml)
    check_tracking_uri(uri)
    try:
        # The fluent URI as well: MLflow 3.17 resolves models:/name/version with the process's
        # registry URI whatever registry_uri says (else a stray ./mlflow.db is created, empty).
        with fluent_tracking_uri(uri):
            local = mlflow.artifacts.download_artifacts(
                artifact_uri=model_uri, dst_path=str(dest), tracking_uri=uri, registry_uri=uri
            )
    except Exception as err:
        raise store_error(uri, err, f"downloading model {model_uri}") from err
    return Path(local)


def _register(tracked: TrackedRun, model_uri: str, name: str) -> str:
    """A new version of registered model `name` from `model_uri` (fluent URI set by the
    caller), tagged with the run and what it is; the model gets its description once."""
    import mlflow

    client = tracked.client
    run_tags = client.get_run(tracked.run_id).data.tags
    version = mlflow.register_model(
        model_uri,
        name,
        tags={
            "mlflow_run_id": tracked.run_id,
            **{k: run_tags[k] for k in VERSION_TAGS_FROM_RUN if k in run_tags},
        },
    )
    if not client.get_registered_model(name).description:
        client.update_registered_model(name, description=REGISTERED_MODEL_DESCRIPTION)
    return str(version.version)


# The registered version's tags: the network's own test perplexity, and that of what the
# version serves (`rnnlm score`: with the cache and n-gram its model carries), which ranks it.
TEST_PPL_TAG = "test_ppl"
SCORED_PPL_TAG = "scored_test_ppl"


def _tagged_float(version: Any, tag: str) -> float | None:
    """A registered version's tag as a number; None when absent or not a number."""
    try:
        value = float(version.tags.get(tag, "nan"))
    except ValueError:
        return None
    return value if value == value else None  # NaN: not scored


def _champion_rank(version: Any) -> float | None:
    """The perplexity @champion compares a version by: its `scored_test_ppl` tag (what it
    serves); a version evaluated before that tag existed, by its `test_ppl` (the network
    alone, what it was ranked by then); None when it carries neither."""
    scored = _tagged_float(version, SCORED_PPL_TAG)
    return scored if scored is not None else _tagged_float(version, TEST_PPL_TAG)


def record_test_perplexity(
    tracked: TrackedRun,
    name: str,
    version: str,
    test_ppl: float,
    scored_test_ppl: float,
    description: str,
) -> dict[str, Any]:
    """Tag version `version` of registered model `name` with its test perplexities (the
    network alone, and as served), and point the alias @champion at the best version of the
    champion's corpus.

    The champion is recomputed from every version's tags (lowest `_champion_rank` among the
    versions of the same `corpus` tag, the older on a tie), so it moves only when a version
    beats it and concurrent experiments converge on the same answer. The first scored version
    of a model becomes champion; versions of another corpus than the champion's never displace
    it (their perplexities are not comparable: train those under another
    `export.registered_model_name`).

    Returns:
        {"champion_version": ..., "is_champion": bool, "champion_corpus": ...}.
    """
    try:
        client = tracked.client
        client.set_model_version_tag(name, version, TEST_PPL_TAG, f"{test_ppl:.4f}")
        client.set_model_version_tag(name, version, SCORED_PPL_TAG, f"{scored_test_ppl:.4f}")
        client.update_model_version(name, version, description=description)
        try:
            champion = client.get_model_version_by_alias(name, CHAMPION_ALIAS)
        except Exception:  # MLflow raises RestException/MlflowException: no such alias yet
            champion = None
        mine = client.get_model_version(name, version)
        corpus = (champion or mine).tags.get("corpus")
        scored = [
            (ppl, int(v.version), v)
            for v in client.search_model_versions(f"name = '{name}'")
            if v.tags.get("corpus") == corpus and (ppl := _champion_rank(v)) is not None
        ]
        best = min(scored, key=lambda item: item[:2])[2]
        if champion is None or str(champion.version) != str(best.version):
            client.set_registered_model_alias(name, CHAMPION_ALIAS, str(best.version))
    except Exception as err:  # MLflow raises many types; all mean "could not record"
        doing = f"recording the test perplexity of {name} v{version}"
        raise store_error(tracked.uri, err, doing) from err
    result = {
        "champion_version": str(best.version),
        "is_champion": str(best.version) == str(version),
        "champion_corpus": corpus,
    }
    log.info(
        "registered model %s v%s: test ppl %.2f, as served %.2f; @%s is v%s (corpus %s)",
        name,
        version,
        test_ppl,
        scored_test_ppl,
        CHAMPION_ALIAS,
        result["champion_version"],
        corpus,
    )
    return result


def search_runs(ml: MlflowParams, max_results: int = 1000) -> list[dict[str, Any]]:
    """The experiment's runs, newest first, as plain dicts (for `rnnlm runs`)."""
    uri = resolve_tracking_uri(ml)
    check_tracking_uri(uri)
    try:
        client = _client(uri)
        experiment = client.get_experiment_by_name(ml.experiment_name)
        if experiment is None:
            raise TrackingError(f"no MLflow experiment named {ml.experiment_name!r} at {uri}")
        runs = client.search_runs(
            [experiment.experiment_id],
            order_by=["attributes.start_time DESC"],
            max_results=max_results,
        )
    except TrackingError:
        raise
    except Exception as err:
        raise store_error(uri, err, f"listing the runs of {ml.experiment_name!r}") from err
    return [
        {
            "run_id": run.info.run_id,
            "run_name": run.info.run_name,
            "status": run.info.status,
            "start_time": run.info.start_time,
            "params": dict(run.data.params),
            "metrics": dict(run.data.metrics),
            "tags": {k: v for k, v in run.data.tags.items() if not k.startswith("mlflow.")},
        }
        for run in runs
    ]
