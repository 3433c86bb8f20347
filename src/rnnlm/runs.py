"""`rnnlm runs`: the experiment's MLflow runs side by side in the terminal.

Shows, for each run, the parameters that differ between the runs (the ones that are equal
everywhere say nothing) and the key metrics, sortable by any metric, or as JSON:

    rnnlm runs                       # newest first
    rnnlm runs --sort test_ppl       # best perplexity first
    rnnlm runs --json --all-params

Reads the same tracking store as the pipeline (MLFLOW_TRACKING_URI, else the project's
mlruns/ SQLite store) through rnnlm.tracking.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

# Column name -> MLflow metric key. The first present key of a tuple wins.
KEY_METRICS: dict[str, tuple[str, ...]] = {
    "test_ppl": ("headline/test_ppl", "test/ppl"),  # the shipped ONNX model's, else PyTorch's
    # What `rnnlm score` reports: with the cache and the n-gram, else (runs exported before
    # the n-gram) with the cache.
    "scored_ppl": ("headline/scored_test_ppl", "headline/cache_test_ppl"),
    "kn_test_ppl": ("headline/kn_test_ppl",),
    "vs_kn_pct": ("headline/improvement_over_kn_pct",),
    "val_ppl": ("headline/val_ppl",),
    "epochs": ("val/best_epoch",),
    "train_min": ("train/time_s",),
    "tokens_per_s": ("train/mean_tokens_per_s",),
}
# Params that are provenance or bookkeeping, not choices worth comparing.
IGNORED_PARAMS = ("train.log_every_n_steps",)
LOWER_IS_BETTER = {"test_ppl", "scored_ppl", "kn_test_ppl", "val_ppl", "train_min"}
# MLflow refuses to search for more runs than this (its SEARCH_MAX_RESULTS_THRESHOLD).
MAX_LIMIT = 50_000


def parse_limit(text: str) -> int:
    """`--limit`: a whole number of runs in [1, MAX_LIMIT], else a one-line usage error."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected int, got {text!r}") from None
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be >= 1 and <= {MAX_LIMIT}, got {text.strip()}")
    return value


def metric_value(run: Mapping[str, Any], column: str) -> float | None:
    for key in KEY_METRICS[column]:
        if key in run["metrics"]:
            value = float(run["metrics"][key])
            if column == "train_min":
                return value / 60.0
            if column == "epochs":
                return int(value) + 1  # val/best_epoch is 0-based
            return value
    return None


def differing_params(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """Param keys whose values are not the same in every run (missing counts as a value)."""
    keys = sorted({k for run in runs for k in run["params"]} - set(IGNORED_PARAMS))
    return [k for k in keys if len({run["params"].get(k) for run in runs}) > 1]


def build_rows(
    runs: Sequence[Mapping[str, Any]], param_keys: Sequence[str]
) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        row: dict[str, Any] = {
            "run_id": run["run_id"],
            "name": run["run_name"],
            "started": dt.datetime.fromtimestamp(run["start_time"] / 1000).strftime(
                "%Y-%m-%d %H:%M"
            ),
            "status": run["status"],
        }
        row.update({key: run["params"].get(key) for key in param_keys})
        row.update({column: metric_value(run, column) for column in KEY_METRICS})
        rows.append(row)
    return rows


def sort_rows(rows: list[dict[str, Any]], column: str | None) -> list[dict[str, Any]]:
    """Sort by a column; lower-is-better metrics ascend, the others descend; blanks last."""
    if column is None:
        return rows
    if rows and column not in rows[0]:
        raise ValueError(f"cannot sort by {column!r}: columns are {', '.join(rows[0])}")
    present = [r for r in rows if r.get(column) is not None]
    missing = [r for r in rows if r.get(column) is None]
    descending = column in KEY_METRICS and column not in LOWER_IS_BETTER
    return sorted(present, key=lambda r: r[column], reverse=descending) + missing


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}" if abs(value) >= 1 else f"{value:.3g}"
    return str(value)


def format_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(lines)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "runs", help="compare the experiment's MLflow runs", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--params", default="params.yaml", help="params file (mlflow section)")
    parser.add_argument("--experiment", help="experiment name (default: from params.yaml)")
    parser.add_argument("--sort", metavar="COLUMN", help=f"one of: {', '.join(KEY_METRICS)}")
    parser.add_argument("--limit", type=parse_limit, default=50, help="at most this many runs (50)")
    parser.add_argument("--all-params", action="store_true", help="show every param")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def run_command(args: argparse.Namespace) -> str:
    """Everything `rnnlm runs` prints, as a string (raises on a bad store or argument)."""
    import dataclasses
    from pathlib import Path

    from rnnlm import tracking
    from rnnlm.config import ConfigError, MlflowParams, load_params

    params_path = Path(args.params)
    if params_path.exists():
        ml = load_params(params_path).mlflow
    elif args.experiment:  # outside a project: the store comes from MLFLOW_TRACKING_URI
        ml = MlflowParams(experiment_name=args.experiment, tracking_uri=None)
    else:
        raise ConfigError(
            f"{params_path}: parameters file not found: run from the project root, or pass "
            "--params FILE or --experiment NAME"
        )
    if args.experiment:
        ml = dataclasses.replace(ml, experiment_name=args.experiment)
    runs = tracking.search_runs(ml, max_results=args.limit)
    if not runs:
        return f"no runs in experiment {ml.experiment_name!r} yet (run `dvc repro`)"
    param_keys = (
        sorted({k for r in runs for k in r["params"]})
        if args.all_params
        else differing_params(runs)
    )
    rows = sort_rows(build_rows(runs, param_keys), args.sort)
    if args.json:
        return json.dumps(rows, indent=2)
    columns = ["run_id", "name", "started", *param_keys, *KEY_METRICS]
    # Drop metric columns no run has, so the table stays narrow.
    columns = [c for c in columns if c not in KEY_METRICS or any(r[c] is not None for r in rows)]
    table = format_table([{**r, "run_id": r["run_id"][:8]} for r in rows], columns)
    return f"experiment {ml.experiment_name!r}: {len(rows)} runs\n{table}"
