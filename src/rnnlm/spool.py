"""The offline spool: what a training could not log while its MLflow store was away, and
`rnnlm relog`, which sends it once the store is back.

    mlruns/unsent/<run_id>.jsonl    one JSON record per line: params, tags, metrics (with
                                    their steps and timestamps), artifacts, the final status
    mlruns/unsent/<run_id>/         copies of the spooled artifacts (the originals may be
                                    temporaries)

A record is written whole or not at all per line, so a crash mid-write loses at most that
record. `relog_unsent` replays each file in order and deletes it once all of it is stored.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from rnnlm import tracking


def unsent_dir(root: Path | None = None) -> Path:
    """Where a train stage keeps what it could not log (git-ignored, beside the local store)."""
    return (root or tracking.project_root()) / "mlruns" / "unsent"


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
        if record["kind"] == "artifact":  # keep a copy: the file may be a temporary one
            folder = spool_file.with_suffix("") / (record["artifact_path"] or "")
            folder.mkdir(parents=True, exist_ok=True)
            copy = folder / Path(record["path"]).name
            shutil.copyfile(record["path"], copy)
            record = {**record, "path": str(copy)}
        spool_file.parent.mkdir(parents=True, exist_ok=True)
        line = json.dumps({"uri": uri, "run_id": run_id, **record})
        with spool_file.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
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


def _replay(tracked: tracking.TrackedRun, record: dict[str, Any]) -> None:
    kind = record["kind"]
    if kind == "params":
        tracking.send_params(tracked, record["params"])
    elif kind == "tags":
        tracking.send_tags(tracked, record["tags"])
    elif kind == "metrics":
        tracking.send_metrics(tracked, record["metrics"])
    elif kind == "artifact":
        tracked.client.log_artifact(tracked.run_id, record["path"], record["artifact_path"])
    elif kind == "status":
        tracking.send_status(tracked, record["status"])


def relog_unsent(uri_override: str | None = None, root: Path | None = None) -> list[str]:
    """Send every spooled record to its run; return one line per spool file sent.

    Each file is replayed in order (params, tags, metrics with their original steps and
    timestamps, artifacts, the final status) and deleted once all of it is in the store.
    """
    done = []
    for spool in sorted(unsent_dir(root).glob("*.jsonl")):
        lines = [json.loads(line) for line in spool.read_text(encoding="utf-8").splitlines()]
        if not lines:
            spool.unlink()
            continue
        uri = uri_override or os.environ.get("MLFLOW_TRACKING_URI") or lines[0]["uri"]
        tracking.check_tracking_uri(uri)
        tracked = tracking.TrackedRun(uri=uri, run_id=lines[0]["run_id"], experiment_id="")
        try:
            tracked.client.get_run(tracked.run_id)
        except Exception as err:
            raise tracking.TrackingError(
                f"{spool}: run {tracked.run_id} is not in {uri} ({err}); set "
                "MLFLOW_TRACKING_URI to the store the run was created in"
            ) from None
        for record in lines:
            _replay(tracked, record)
        shutil.rmtree(spool.with_suffix(""), ignore_errors=True)
        spool.unlink()
        done.append(f"run {tracked.run_id}: {len(lines)} records sent to {uri}")
    return done
