"""The offline spool: what a training could not log while its MLflow store was away, and
`rnnlm relog`, which sends it once the store is back.

    mlruns/unsent/<run_id>.jsonl      one JSON record per line: params, tags, metrics (with
                                      their steps and timestamps), artifacts, the final status
    mlruns/unsent/<run_id>/           copies of the spooled artifacts (the originals may be
                                      temporaries)
    mlruns/unsent/<run_id>.jsonl.bad  lines relog could not send (damaged, refused by the store,
                                      artifact copy gone), kept as they were for inspection
    mlruns/unsent/.lock               taken briefly by writers and by relog's reads and rewrites

A record is written whole or not at all per line, so a crash mid-write loses at most that
record (the next write starts a fresh line). `relog_unsent` replays each file in order; what it
sent leaves the file (rewritten atomically, deleted once empty), so running it again sends only
the rest. Metric values the run already holds (same key, step and timestamp) are not sent
again: MLflow would store them twice.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from filelock import FileLock

from rnnlm import tracking
from rnnlm.errors import RnnlmError, short_repr
from rnnlm.files import write_bytes_atomic

BAD_SUFFIX = ".bad"
STATUSES = ("RUNNING", "FINISHED", "FAILED", "KILLED")
# Each kind of record and the key that holds what it logs.
_PAYLOAD = {
    "params": "params",
    "tags": "tags",
    "metrics": "metrics",
    "artifact": "path",
    "status": "status",
}
LOCK_TIMEOUT_S = 60.0
# Failures of one record, not of the store: the record goes to the .bad file, the rest goes on.
_RECORD_KINDS_OF_FAILURE = ("rejected", "not_found")


def unsent_dir(root: Path | None = None) -> Path:
    """Where a train stage keeps what it could not log (git-ignored, beside the local store)."""
    return (root or tracking.project_root()) / "mlruns" / "unsent"


def _lock(folder: Path) -> FileLock:
    folder.mkdir(parents=True, exist_ok=True)
    return FileLock(str(folder / ".lock"), timeout=LOCK_TIMEOUT_S)


class Spool:
    """The spool folder of one process: a file per run, and what this process put there."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.records: list[dict[str, Any]] = []  # written by this process, for its summary

    def file(self, run_id: str) -> Path:
        return self.folder / f"{run_id}.jsonl"

    def write(self, uri: str, run_id: str, record: dict[str, Any]) -> None:
        """Append `record` (an artifact's file is copied into the spool first)."""
        spool_file = self.file(run_id)
        with _lock(self.folder):
            if record["kind"] == "artifact":  # keep a copy: the file may be a temporary one
                folder = spool_file.with_suffix("") / (record["artifact_path"] or "")
                folder.mkdir(parents=True, exist_ok=True)
                copy = folder / Path(record["path"]).name
                shutil.copyfile(record["path"], copy)
                record = {**record, "path": str(copy)}
            line = json.dumps({"uri": uri, "run_id": run_id, **record}).encode("utf-8")
            with spool_file.open("a+b") as f:
                if f.tell() > 0:  # a writer that died mid-line left no newline: start afresh
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        line = b"\n" + line
                f.write(line + b"\n")
        self.records.append(record)

    def summary(self) -> str:
        """What was not logged, for the stage's closing warning."""
        steps: dict[str, list[int]] = {}
        counts: dict[str, int] = {}
        for record in self.records:
            if record["kind"] == "metrics":
                for key, _, _, step in record["metrics"]:
                    steps.setdefault(key, []).append(step)
            else:
                counts[record["kind"]] = counts.get(record["kind"], 0) + 1
        parts = [
            f"{key} ({len(s)} values, steps {min(s)}-{max(s)})" for key, s in sorted(steps.items())
        ]
        parts += [f"{n} {kind} record(s)" for kind, n in sorted(counts.items())]
        return "; ".join(parts)


class RelogReport(list[str]):
    """What `relog_unsent` did, one line each: a line per spool file sent and per thing that
    could not be sent. Those last are also in `problems`; a caller exits non-zero for them."""

    def __init__(self) -> None:
        super().__init__()
        self.problems: list[str] = []

    def note(self, line: str) -> None:
        self.append(line)

    def problem(self, line: str) -> None:
        self.append(line)
        self.problems.append(line)


@dataclass
class _Line:
    """One line of a spool file: its record, or why it has none."""

    number: int  # 1-based, as an editor shows it
    raw: bytes
    record: dict[str, Any] | None = None
    problem: str | None = None
    sent: bool = False


def _is_str_map(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(v, str) for v in value.values())


def _is_metric(item: Any) -> bool:
    return (
        isinstance(item, list)
        and len(item) == 4
        and isinstance(item[0], str)
        and isinstance(item[1], int | float)
        and all(isinstance(x, int) and not isinstance(x, bool) for x in item[2:])
    )


def record_problem(record: Any, run_id: str) -> str | None:
    """Why `record` (one parsed line of run `run_id`'s spool) cannot be replayed; None if it
    can."""
    if not isinstance(record, dict):
        return f"not a spool record (a JSON {type(record).__name__}, not an object)"
    kind = record.get("kind")
    if kind is None:
        return "not a spool record (no 'kind')"
    if not isinstance(kind, str) or kind not in _PAYLOAD:
        return f"unknown record kind {_short(kind)}"
    key = _PAYLOAD[kind]
    if key not in record:
        return f"not a spool record ({kind} record without {key!r})"
    if record.get("run_id", run_id) != run_id:
        return f"a record of run {_short(record['run_id'])}, not of {run_id}"
    value = record[key]
    valid = {
        "params": _is_str_map,
        "tags": _is_str_map,
        "metrics": lambda v: isinstance(v, list) and all(_is_metric(m) for m in v),
        "artifact": lambda v: (
            isinstance(v, str) and isinstance(record.get("artifact_path"), str | None)
        ),
        "status": lambda v: v in STATUSES,
    }[kind]
    if not valid(value):
        return f"not a spool record (malformed {key!r}: {_short(value)})"
    return None


def _short(value: Any) -> str:
    """A value of a record as JSON shows it, cut short."""
    return short_repr(value, show=json.dumps)


def parse_spool(data: bytes, run_id: str) -> list[_Line]:
    """The lines of a spool file, each with its record or its problem; blank lines left out.
    A last line without its newline is one a writer did not finish."""
    chunks = data.split(b"\n")
    lines = []
    for i, raw in enumerate(chunks):
        if not raw.strip():
            continue
        line = _Line(number=i + 1, raw=raw)
        unfinished = i == len(chunks) - 1  # no newline after it
        try:
            record = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            line.problem = "not a JSON record" + (" (truncated?)" if unfinished else "")
        else:
            line.problem = record_problem(record, run_id)
            line.record = None if line.problem else record
        lines.append(line)
    return lines


class _SentMetrics:
    """The run's metric values already in the store, by key (fetched once per key), so that a
    replay sends none of them twice (MLflow keeps duplicates)."""

    def __init__(self, tracked: tracking.TrackedRun) -> None:
        self.tracked = tracked
        self.seen: dict[str, set[tuple[int, int]]] = {}

    def new(self, items: list[list[Any]]) -> list[list[Any]]:
        fresh = []
        for item in items:
            key, _, timestamp, step = item
            if key not in self.seen:
                history = self.tracked.client.get_metric_history(self.tracked.run_id, key)
                self.seen[key] = {(m.step, m.timestamp) for m in history}
            if (step, timestamp) not in self.seen[key]:
                fresh.append(item)
        return fresh

    def sent(self, items: list[list[Any]]) -> None:
        for key, _, timestamp, step in items:
            self.seen.setdefault(key, set()).add((step, timestamp))


def _artifact_file(record: dict[str, Any], spool: Path) -> Path | None:
    """The spooled copy of an artifact: where the record says, else in this spool's folder
    (the project moved since), else None."""
    recorded = Path(record["path"])
    here = spool.with_suffix("") / (record.get("artifact_path") or "") / recorded.name
    return next((p for p in (recorded, here) if p.is_file()), None)


def _replay(
    tracked: tracking.TrackedRun, record: dict[str, Any], spool: Path, metrics: _SentMetrics
) -> str | None:
    """Send one record; return why it could not be (a problem of the record), else None."""
    kind = record["kind"]
    if kind == "params":
        tracking.send_params(tracked, record["params"])
    elif kind == "tags":
        tracking.send_tags(tracked, record["tags"])
    elif kind == "metrics":
        items = metrics.new(record["metrics"])
        if items:
            tracking.send_metrics(tracked, items)
            metrics.sent(items)
    elif kind == "artifact":
        copy = _artifact_file(record, spool)
        if copy is None:
            name = "/".join(filter(None, [record.get("artifact_path"), Path(record["path"]).name]))
            return f"artifact {name}: its spooled copy {_shown(Path(record['path']))} is gone"
        tracked.client.log_artifact(tracked.run_id, str(copy), record.get("artifact_path"))
    elif kind == "status":
        tracking.send_status(tracked, record["status"])
    return None


def _shown(path: Path) -> str:
    """`path` relative to the current folder when under it (as a user typed it), else whole."""
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def _spool_files(folder: Path) -> Iterator[Path]:
    yield from sorted(folder.glob("*.jsonl"))


def relog_unsent(uri_override: str | None = None, root: Path | None = None) -> RelogReport:
    """Send every spooled record to its run; return what was done, a line per spool file sent
    and a line per problem (also in the report's `problems`).

    Each file is replayed in order (params, tags, metrics with their original steps and
    timestamps, artifacts, the final status). Nothing blocks the other files: a damaged line
    (cut short by a crash, not JSON, keys missing), a record the store refuses and an artifact
    whose copy is gone are named by file and line, skipped and kept in `<file>.bad`; a run not
    in the store leaves its file as it is. When the store itself fails (locked, read-only,
    unreachable) the file keeps what was not sent yet, and the other files for that store are
    not tried. Sent records leave the file, so relog can be run again until all is sent.
    """
    folder = unsent_dir(root)
    report = RelogReport()
    failed_stores: dict[str, str] = {}  # uri -> why, so it is not tried once per file
    reported: set[Path] = set()  # .bad files this relog wrote to: their lines are named above
    for spool in _spool_files(folder):
        if _relog_file(spool, uri_override, failed_stores, report):
            reported.add(spool.with_name(spool.name + BAD_SUFFIX))
    for bad in sorted(folder.glob(f"*.jsonl{BAD_SUFFIX}")):
        if bad not in reported:
            try:
                count = sum(1 for line in bad.read_bytes().split(b"\n") if line.strip())
            except OSError as err:
                report.problem(f"{_shown(bad)}: cannot read it ({err})")
                continue
            report.note(
                f"{_shown(bad)}: {count} line(s) an earlier relog could not send, kept for "
                f"you to inspect (fix them and rename the file to {bad.with_suffix('').name} "
                "to try again, or delete it)"
            )
    return report


def _relog_file(
    spool: Path, uri_override: str | None, failed_stores: dict[str, str], report: RelogReport
) -> bool:
    """Replay one spool file, reporting what could not be sent; never raises. True when lines
    went to its .bad file."""
    run_id, shown = spool.stem, _shown(spool)
    try:
        with _lock(spool.parent):
            data = spool.read_bytes()
    except OSError as err:  # unreadable, or the lock held past its timeout
        report.problem(f"{shown}: cannot read it ({err}); nothing sent")
        return False
    lines = parse_spool(data, run_id)
    bad = [line for line in lines if line.problem]
    for line in bad:
        report.problem(f"{shown}:{line.number}: {line.problem}; skipped")
    todo = [line for line in lines if line.record is not None]
    named = (str(ln.record["uri"]) for ln in todo if ln.record and "uri" in ln.record)
    uri = uri_override or os.environ.get("MLFLOW_TRACKING_URI") or next(named, "")
    if todo and not uri:
        report.problem(
            f"{shown}: no record names the store of run {run_id}; nothing sent. "
            "Name it: rnnlm relog --tracking-uri URI"
        )
    elif todo and uri in failed_stores:
        report.problem(f"{shown}: nothing sent, {failed_stores[uri]} (see above)")
    elif todo and (tracked := _open_run(spool, uri, run_id, failed_stores, report)):
        bad += _replay_lines(tracked, todo, spool, failed_stores, report)
    sent = [line for line in todo if line.sent]
    kept = [line for line in todo if not line.sent and not line.problem]
    if trouble := _settle(spool, data, kept, bad, sent):
        report.problem(trouble)
    if sent or bad:
        parts = [f"run {run_id}: {len(sent)} records sent to {uri}"]
        if bad:
            parts.append(f"{len(bad)} line(s) not sent, kept in {shown}{BAD_SUFFIX}")
        if kept:
            parts.append(f"{len(kept)} left in {shown}")
        report.note("; ".join(parts))
    return bool(bad) and not trouble


def _replay_lines(
    tracked: tracking.TrackedRun,
    todo: list[_Line],
    spool: Path,
    failed_stores: dict[str, str],
    report: RelogReport,
) -> list[_Line]:
    """Send `todo` in order, marking each line sent; return the lines that cannot be sent (the
    store refused them, their artifact is gone). Stop at the first failure of the store."""
    shown, uri = _shown(spool), tracked.uri
    metrics = _SentMetrics(tracked)
    refused = []
    for line in todo:
        assert line.record is not None
        try:
            line.problem = _replay(tracked, line.record, spool, metrics)
        except Exception as err:  # MLflow raises many types; store_error sorts them
            problem = tracking.store_error(uri, err)
            if problem.kind not in _RECORD_KINDS_OF_FAILURE:  # the store failed, not the line
                failed_stores[uri] = f"store {uri} failed"
                after = sum(1 for ln in todo if ln.number > line.number)
                rest = f"it and the {after} record(s) after it stay" if after else "it stays"
                report.problem(
                    f"{shown}:{line.number}: not sent: {problem}; {rest} in the file for the "
                    "next relog"
                )
                break
            line.problem = f"the store refused it ({problem.cause})"
        if line.problem:
            report.problem(f"{shown}:{line.number}: {line.problem}; skipped")
            refused.append(line)
        else:
            line.sent = True
    return refused


def _open_run(
    spool: Path, uri: str, run_id: str, failed_stores: dict[str, str], report: RelogReport
) -> tracking.TrackedRun | None:
    """The run to replay into, or None after reporting why there is none."""
    shown = _shown(spool)
    try:
        tracking.check_tracking_uri(uri)
        tracked = tracking.TrackedRun(uri=uri, run_id=run_id, experiment_id="")
        tracked.client.get_run(run_id)
    except Exception as err:
        problem = tracking.store_error(uri, err)
        if problem.kind == "not_found":
            report.problem(
                f"{shown}: run {run_id} is not in {uri} ({problem.cause}); nothing sent, the "
                "file is kept. Set MLFLOW_TRACKING_URI (or --tracking-uri) to the store the "
                "run was created in"
            )
        else:
            failed_stores[uri] = f"store {uri} failed"
            report.problem(f"{shown}: nothing sent: {problem}")
        return None
    return tracked


def _settle(
    spool: Path, data: bytes, kept: list[_Line], bad: list[_Line], sent: list[_Line]
) -> str | None:
    """Rewrite `spool` with only the lines still to send (and whatever a writer appended since
    it was read); move the bad lines to its .bad file; drop the copies of sent artifacts.
    Return why that could not be done, else None."""
    if not bad and not sent:
        return None
    bad_file = spool.with_name(spool.name + BAD_SUFFIX)
    # Whatever stops the rewrite leaves the file whole: a later relog sends its records again,
    # all but the metric values the run already holds (skipped), so nothing is stored twice.
    try:
        with _lock(spool.parent):
            now = spool.read_bytes() if spool.exists() else b""
            if not now.startswith(data):  # not one writer appending: another relog?
                return f"{_shown(spool)}: changed by another process during relog; left as it is"
            if bad:
                with bad_file.open("ab") as f:
                    f.write(b"".join(line.raw + b"\n" for line in sorted(bad, key=_number)))
            rest = b"".join(line.raw + b"\n" for line in kept) + now[len(data) :]
            if rest.strip():
                write_bytes_atomic(spool, rest)
            else:
                spool.unlink()
            _drop_sent_copies(spool, sent, keep_folder=bool(rest.strip()) or bad_file.exists())
    except (OSError, RnnlmError) as err:  # RnnlmError: write_bytes_atomic's WriteError
        return f"{_shown(spool)}: cannot take out what relog sent or skipped ({err}); left as is"
    return None


def _number(line: _Line) -> int:
    return line.number


def _drop_sent_copies(spool: Path, sent: list[_Line], keep_folder: bool) -> None:
    folder = spool.with_suffix("")
    if not keep_folder:
        shutil.rmtree(folder, ignore_errors=True)
        return
    for line in sent:
        if line.record and line.record["kind"] == "artifact":
            copy = _artifact_file(line.record, spool)
            if copy is not None and folder in copy.parents:
                copy.unlink()
    for sub in sorted(folder.glob("**/"), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # not empty: a copy still to send
            sub.rmdir()
