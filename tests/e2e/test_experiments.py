"""End to end: DVC experiments on the tiny pipeline, all tracked in the project's one MLflow store.

From the session's committed baseline (a copy of conftest.tiny_pipeline), runs one experiment
in the workspace (`dvc exp run -S model.cell=gru`) and one in a temporary copy under
`.dvc/tmp/exps/`
(`dvc exp run --temp -S train.seed=3`). The `--temp` one must log to the project's own
mlruns/mlflow.db (tracking.project_root), not to a store inside `.dvc/tmp`, and leave the
workspace alone. Then checks the three MLflow runs and their DVC tags, `dvc exp show` (and the
compact `make exps`), `dvc plots diff` against the baseline, `rnnlm runs` side by side, and
that the README's way back from a workspace experiment restores both ONNX models.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rnnlm.inference import LanguageModel
from tests.e2e._pipeline import (
    BIN,
    committed_json,
    dvc,
    exp_show_revs,
    experiment_runs,
    metric_file,
    param,
    pipeline_env,
    run_ok,
    set_git_identity,
)
from tests.e2e.conftest import TinyPipeline, clone_pipeline

pytestmark = pytest.mark.e2e

TRAINED = ("train", "export", "evaluate")  # the stages an experiment's override reruns


def model_run_ids(project: Path) -> tuple[str, str]:
    """The MLflow run each shipped ONNX model (fp32, int8) was exported from."""
    models = project / "models"
    return tuple(  # type: ignore[return-value]
        LanguageModel(models / name).provenance["mlflow_run_id"]
        for name in ("model.onnx", "model.int8.onnx")
    )


def test_dvc_experiments_share_one_mlflow_store(
    tiny_pipeline: TinyPipeline, tmp_path: Path
) -> None:
    project = clone_pipeline(tiny_pipeline, tmp_path / "project")  # a committed baseline
    env = pipeline_env(project, tiny_pipeline.mirror_url)
    set_git_identity(project)
    baseline_rev = run_ok(["git", "rev-parse", "HEAD"], cwd=project, env=env).stdout.strip()

    baseline_models = model_run_ids(project)
    assert baseline_models[0] == baseline_models[1]

    result = dvc(project, env, "exp", "run", "-S", "model.cell=gru")
    log = result.stdout + result.stderr
    for stage in TRAINED:
        assert f"Running stage '{stage}'" in log, log[-4000:]
    assert "Running stage 'tokenize'" not in log
    # A workspace experiment replaces the models, both of them (int8 is an out too).
    workspace_models = model_run_ids(project)
    assert workspace_models[0] == workspace_models[1] != baseline_models[0]

    result = dvc(project, env, "exp", "run", "--temp", "-S", "train.seed=3")
    log = result.stdout + result.stderr
    assert "Running stage 'train'" in log, log[-4000:]
    assert model_run_ids(project) == workspace_models  # --temp leaves the workspace alone

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
    assert all("headline/test_ppl" in r.data.metrics for r in runs)  # evaluate logged to each

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
        # DVC's experiment and MLflow's run (found by its dvc.exp_name tag) agree.
        assert committed_json(project, data, "metrics/train_run.json")["run_id"] == run.info.run_id
        assert train["val_ppl"] == pytest.approx(run.data.metrics["headline/val_ppl"])
        assert evaluate["headline/test_ppl"] == pytest.approx(run.data.metrics["headline/test_ppl"])
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

    # The compact view fits a terminal: changed params and headline metrics, no hashes.
    venv = BIN.parent  # this venv, already installed: `-o` keeps make from installing again
    make = [
        "make",
        "--no-print-directory",
        f"VENV={venv}",
        "-o",
        f"{venv}/.rnnlm-installed",
        "exps",
    ]
    view = run_ok(make, cwd=project, env={**env, "COLUMNS": "200"}).stdout
    header = next(line for line in view.splitlines() if "Experiment" in line)
    headline = ("val_ppl", "headline/test_ppl", "headline/scored_test_ppl", "headline/kn_test_ppl")
    for column in ("model.cell", "train.seed", *headline):
        assert column in header, view
    assert "src/rnnlm" not in view and "run_id" not in view and "parity/" not in view, view
    assert "ngram/" not in view and "cache/" not in view, view
    assert max(len(line) for line in view.splitlines()) <= 200, view

    # Learning curves of the --temp experiment against the committed baseline.
    temp_name = next(name for name in exp_names if name != exp_names[0])
    diff = json.loads(dvc(project, env, "plots", "diff", "HEAD", temp_name, "--json").stdout)
    chart = diff["data"]["validation perplexity"][0]["content"]
    revs = {row["rev"] for row in chart["data"]["values"]}
    assert revs == {"HEAD", temp_name}, revs

    # The README's way back from a workspace experiment: both models return to the baseline's.
    run_ok(["git", "checkout", "--", "params.yaml", "dvc.lock", "metrics"], cwd=project, env=env)
    dvc(project, env, "checkout")
    assert model_run_ids(project) == baseline_models
    assert json.loads(dvc(project, env, "status", "--json").stdout) == {}
