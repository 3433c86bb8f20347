"""End to end: DVC experiments on the tiny pipeline, all tracked in the project's one MLflow store.

After a baseline `dvc repro` (committed), runs one experiment in the workspace
(`dvc exp run -S model.cell=gru`) and one in a temporary copy under `.dvc/tmp/exps/`
(`dvc exp run --temp -S train.seed=3`). The `--temp` one must log to the project's own
mlruns/mlflow.db (tracking.project_root), not to a store inside `.dvc/tmp`. Then checks the
three MLflow runs and their DVC tags, `dvc exp show`, and `rnnlm runs` side by side.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from tests.e2e._pipeline import (
    BIN,
    commit_all,
    dvc,
    experiment_runs,
    pipeline_env,
    repro_log,
    run_ok,
    set_git_identity,
    write_tiny_params,
)

pytestmark = pytest.mark.e2e

TRAINED = ("train", "export", "evaluate")  # the stages an experiment's override reruns


def exp_show_revs(exp_show: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Experiment name -> its `data` (params, metrics) from `dvc exp show --json`."""
    found: dict[str, dict[str, Any]] = {}
    for baseline in exp_show:
        for experiment in baseline.get("experiments") or []:
            for rev in experiment.get("revs") or []:
                found[rev["name"]] = rev["data"]
    return found


def metric_file(data: dict[str, Any], name: str) -> dict[str, Any]:
    """The values of metrics file `name` in one revision of `dvc exp show --json`."""
    return data["metrics"][name]["data"]


def param(data: dict[str, Any], section: str, key: str) -> Any:
    return data["params"]["params.yaml"]["data"][section][key]


def test_dvc_experiments_share_one_mlflow_store(project_copy: Path, http_mirror: str) -> None:
    project = project_copy
    write_tiny_params(project)
    env = pipeline_env(project, http_mirror)
    repro_log(project, env)
    commit_all(project, "tiny pipeline baseline")
    set_git_identity(project)
    baseline_rev = run_ok(["git", "rev-parse", "HEAD"], cwd=project, env=env).stdout.strip()

    result = dvc(project, env, "exp", "run", "-S", "model.cell=gru")
    log = result.stdout + result.stderr
    for stage in TRAINED:
        assert f"Running stage '{stage}'" in log, log[-4000:]
    assert "Running stage 'tokenize'" not in log
    result = dvc(project, env, "exp", "run", "--temp", "-S", "train.seed=3")
    log = result.stdout + result.stderr
    assert "Running stage 'train'" in log, log[-4000:]

    # No second store: the --temp run resolved the project root from .dvc/tmp/exps/<name>/.
    stray = list((project / ".dvc" / "tmp").rglob("mlflow.db")) + list(
        (project / ".dvc" / "tmp").rglob("mlruns")
    )
    assert not stray, f"MLflow store(s) inside .dvc/tmp: {stray}"
    runs = experiment_runs(project)
    assert len(runs) == 3, [(r.info.run_name, r.data.params.get("model.cell")) for r in runs]
    assert all(r.info.status == "FINISHED" for r in runs)
    settings = [(r.data.params["model.cell"], r.data.params["train.seed"]) for r in runs]
    assert len(set(settings)) == 3, settings
    assert settings[0] == ("lstm", "1234")  # the committed baseline
    assert settings[1][0] == "gru"
    assert settings[2][1] == "3"
    assert all("test/rnn_ppl" in r.data.metrics for r in runs)  # evaluate logged to each

    baseline_run, *exp_runs = runs
    assert "dvc.exp_name" not in baseline_run.data.tags
    exp_names = [r.data.tags.get("dvc.exp_name") for r in exp_runs]
    assert all(exp_names) and len(set(exp_names)) == 2, exp_names
    for run in exp_runs:
        assert run.data.tags.get("dvc.exp_baseline_rev") == baseline_rev
        assert run.info.run_name == run.data.tags["dvc.exp_name"]

    shown = exp_show_revs(json.loads(dvc(project, env, "exp", "show", "--json").stdout))
    assert set(exp_names) <= set(shown), (exp_names, sorted(shown))
    for run, name in zip(exp_runs, exp_names, strict=True):
        data = shown[name]
        train = metric_file(data, "metrics/train.json")
        evaluate = metric_file(data, "metrics/eval.json")
        assert train["run_id"] == run.info.run_id  # DVC's experiment and MLflow's run agree
        assert evaluate["test/rnn_ppl"] == pytest.approx(run.data.metrics["test/rnn_ppl"])
        assert param(data, "model", "cell") == run.data.params["model.cell"]
        assert str(param(data, "train", "seed")) == run.data.params["train.seed"]

    runs_cmd = [str(BIN / "rnnlm"), "runs", "--params", str(project / "params.yaml")]
    rows = json.loads(run_ok([*runs_cmd, "--json"], cwd=project, env=env).stdout)
    assert {row["run_id"] for row in rows} == {r.info.run_id for r in runs}
    assert {"model.cell", "train.seed"} <= set(rows[0])
    assert "model.hidden_dim" not in rows[0]  # the same in every run
    assert {(row["model.cell"], row["train.seed"]) for row in rows} == set(settings)
    assert all(row["test_ppl"] > 1.0 for row in rows)

    table = run_ok(runs_cmd, cwd=project, env=env).stdout.splitlines()
    assert table[0] == "experiment 'rnnlm': 3 runs"
    header, rule, *data_rows = table[1:]
    assert "model.cell" in header and "train.seed" in header
    assert set(rule) <= {"-", " "}
    assert len(data_rows) == 3, table
    assert {row.split()[0] for row in data_rows} == {r.info.run_id[:8] for r in runs}
