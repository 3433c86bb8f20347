"""`rnnlm runs`: which params differ, key metrics, sorting, table and JSON output."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from rnnlm import runs, tracking
from rnnlm.config import MlflowParams
from tests.fixtures import params_with, write_full_params


def _run(run_id: str, params: dict, metrics: dict) -> dict:
    return {
        "run_id": run_id,
        "run_name": f"name-{run_id}",
        "status": "FINISHED",
        "start_time": 1_700_000_000_000,
        "params": params,
        "metrics": metrics,
        "tags": {},
    }


RUNS = [
    _run("a1", {"model.cell": "lstm", "train.lr": "0.003", "train.seed": "1"}, {"test/ppl": 80.0}),
    _run("b2", {"model.cell": "gru", "train.lr": "0.003", "train.seed": "1"}, {"test/ppl": 75.5}),
    _run("c3", {"model.cell": "rnn_tanh", "train.lr": "0.001", "train.seed": "1"}, {}),
]


def test_only_params_that_differ_are_shown() -> None:
    assert runs.differing_params(RUNS) == ["model.cell", "train.lr"]
    assert runs.differing_params(RUNS[:1]) == []


def test_rows_carry_params_and_key_metrics() -> None:
    rows = runs.build_rows(RUNS, ["model.cell"])
    assert rows[0]["model.cell"] == "lstm"
    assert rows[0]["test_ppl"] == 80.0
    assert rows[2]["test_ppl"] is None


def test_sorting_puts_the_best_first_and_blanks_last() -> None:
    rows = runs.sort_rows(runs.build_rows(RUNS, ["model.cell"]), "test_ppl")
    assert [r["run_id"] for r in rows] == ["b2", "a1", "c3"]
    with pytest.raises(ValueError, match="cannot sort by 'nope'"):
        runs.sort_rows(rows, "nope")


def test_table_has_a_header_and_one_line_per_run() -> None:
    rows = runs.build_rows(RUNS, ["model.cell"])
    table = runs.format_table(rows, ["run_id", "model.cell", "test_ppl"]).splitlines()
    assert table[0].split() == ["run_id", "model.cell", "test_ppl"]
    assert len(table) == 2 + len(RUNS)
    assert "75.50" in table[3] and table[4].split()[-1] == "-"


def test_against_a_real_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ml = MlflowParams(experiment_name="cmp", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    for cell, ppl in (("lstm", 71.0), ("gru", 69.0)):
        run = tracking.start_run(ml, cell, {"cell": cell})
        run.log_params({"model.cell": cell, "train.seed": 1})
        run.log_metrics({"test/ppl": ppl, "train/time_s": 540.0})
    params_file = write_full_params(
        params_with({"mlflow": {"experiment_name": "cmp", "tracking_uri": ml.tracking_uri}}),
        tmp_path / "params.yaml",
    )

    args = argparse.Namespace(
        params=str(params_file), experiment=None, sort="test_ppl", limit=50,
        all_params=False, json=True,
    )  # fmt: skip
    rows = json.loads(runs.run_command(args))
    assert [(r["model.cell"], r["test_ppl"]) for r in rows] == [("gru", 69.0), ("lstm", 71.0)]
    assert rows[0]["train_min"] == pytest.approx(9.0)
    assert "train.seed" not in rows[0]

    args.json = False
    text = runs.run_command(args)
    assert "2 runs" in text and "model.cell" in text and "gru" in text

    args.experiment = "missing"
    with pytest.raises(tracking.TrackingError, match="no MLflow experiment named 'missing'"):
        runs.run_command(args)
