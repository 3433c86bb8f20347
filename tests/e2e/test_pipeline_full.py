"""End to end: the whole pipeline (`dvc repro`) on the synthetic corpus, in a copy of the project.

The run is the session's `tiny_pipeline` (tests/e2e/conftest.py), shared with the tests that
build on it; this test only reads it.

download -> tokenize -> train -> export -> evaluate with a 16-dim LSTM for 2 epochs, the corpus
served by a loopback HTTP mirror and MLflow on its default store (the copy's mlruns/mlflow.db).
Checks every declared output and the metric values, that DVC sees nothing stale, the single
MLflow run with the metrics of all three tracked stages and the registered model, the
inference CLI on the exported model, `dvc plots show`, and that a second repro does nothing.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import pytest

from rnnlm.inference import LanguageModel
from tests.e2e._pipeline import (
    BIN,
    declared_outputs,
    dvc,
    experiment_runs,
    mlflow_client,
    pipeline_env,
    repro_log,
    run_ok,
)
from tests.e2e.conftest import TinyPipeline
from tests.fixtures import TINY_ID

pytestmark = pytest.mark.e2e

STAGES = ("download", "tokenize", "train", "export", "evaluate")


def read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def check_metrics(project: Path) -> dict[str, dict]:
    """Values of the metrics files; returns them by stage."""
    metrics = project / "metrics"
    stats = read_json(project / "data" / "processed" / "stats.json")
    train = read_json(metrics / "train.json")
    train_run = read_json(metrics / "train_run.json")
    export = read_json(metrics / "export.json")
    export_model = read_json(metrics / "export_model.json")
    evaluate = read_json(metrics / "eval.json")
    # DVC metrics files hold numbers only (`dvc exp show` stays narrow); ids live beside them.
    for numbers in (train, export, evaluate):
        assert all(isinstance(v, int | float) for v in numbers.values()), numbers
    vocab_size = stats["vocab_size"]

    assert 50 < vocab_size < 500
    assert train["epochs"] == 2 and train["best_epoch"] in (0, 1)
    assert train_run["accelerator"] == "cpu" and train["devices"] == 1
    # Two epochs of a tiny model: better than uniform over the vocabulary, worse than perfect.
    assert 1.0 < train["test_ppl"] < vocab_size, train
    assert 1.0 < train["val_ppl"] < vocab_size, train
    assert math.isclose(train["test_loss"], math.log(train["test_ppl"]), rel_tol=1e-3)
    assert len(train_run["run_id"]) == 32

    assert 0.0 <= export["parity/max_abs_err"] < 1e-4, export
    assert 0.0 <= export["parity/step_max_abs_err"] < 1e-4, export
    assert export["onnx/size_mb"] > 0 and export["int8/size_mb"] > 0
    assert export["onnx/ms_per_token"] > 0 and export["int8/ms_per_token"] > 0
    # The exported model scores validation as the best checkpoint did in training.
    assert export["onnx/val_ppl"] == pytest.approx(train["val_ppl"], rel=1e-3)
    assert abs(export["int8/val_ppl_change_pct"]) < 10, export
    assert export_model["registered_model"] == "rnnlm"
    assert export_model["registered_version"] == "1"
    assert export_model["model_uri"].startswith("models:/")

    rnn_ppl = evaluate["headline/test_ppl"]
    assert evaluate["test/pytorch_ppl"] == train["test_ppl"]
    assert abs(rnn_ppl - train["test_ppl"]) / train["test_ppl"] <= 1e-3, (evaluate, train)
    assert evaluate["test/onnx_pytorch_rel_diff"] <= 1e-3
    kn, unigram = evaluate["headline/kn_test_ppl"], evaluate["headline/unigram_test_ppl"]
    assert 1.0 < kn < unigram  # trigrams beat unigrams
    assert math.isclose(
        evaluate["headline/improvement_over_kn_pct"],
        100 * (1 - rnn_ppl / evaluate["headline/kn_test_ppl"]),
        abs_tol=1e-2,
    )
    assert evaluate["test/tokens"] == stats["test"]["tokens"]
    assert 0.0 <= evaluate["test/oov_rate"] < 0.1
    return {"train": {**train, **train_run}, "export": export, "evaluate": evaluate}


def check_mlflow(project: Path, metrics: dict[str, dict]) -> None:
    """One run in experiment `rnnlm` holding the metrics of train, export and evaluate."""
    runs = experiment_runs(project)
    assert len(runs) == 1, [r.info.run_id for r in runs]
    run = runs[0]
    assert run.info.run_id == metrics["train"]["run_id"]
    assert run.info.status == "FINISHED"
    logged = run.data.metrics
    assert logged["headline/val_ppl"] == pytest.approx(metrics["train"]["val_ppl"])
    assert logged["test/ppl"] == pytest.approx(metrics["train"]["test_ppl"], rel=1e-4)
    assert logged["parity/max_abs_err"] == pytest.approx(metrics["export"]["parity/max_abs_err"])
    assert logged["headline/test_ppl"] == pytest.approx(metrics["evaluate"]["headline/test_ppl"])
    kn = metrics["evaluate"]["headline/kn_test_ppl"]
    assert logged["headline/kn_test_ppl"] == pytest.approx(kn)
    params = run.data.params
    assert params["model.cell"] == "lstm" and params["model.hidden_dim"] == "16"
    assert params["corpus.name"] == TINY_ID and params["train.max_epochs"] == "2"
    assert run.data.tags["stage"] == "train" and run.data.tags["corpus"] == TINY_ID
    # A run from a clean checkout says so: dvc.lock and the outputs DVC rewrote do not count.
    assert run.data.tags["git.dirty"] == "false", run.data.tags.get("git.dirty_files")

    client = mlflow_client(project)
    versions = client.search_model_versions("name='rnnlm'")
    assert [str(v.version) for v in versions] == ["1"]
    assert versions[0].run_id == run.info.run_id
    champion = client.get_model_version_by_alias("rnnlm", "champion")
    assert str(champion.version) == "1" and champion.tags["corpus"] == TINY_ID


def test_dvc_repro_whole_pipeline(tiny_pipeline: TinyPipeline) -> None:
    """The session's tiny pipeline (conftest.tiny_pipeline: `dvc repro` in a committed copy):
    read only, the other tests copy it."""
    project = tiny_pipeline.project
    env = pipeline_env(project, tiny_pipeline.mirror_url)
    for stage in STAGES:
        assert f"Running stage '{stage}'" in tiny_pipeline.log, tiny_pipeline.log[-4000:]

    outputs = declared_outputs(project)
    assert set(outputs) == set(STAGES)
    assert f"data/raw/{TINY_ID}" in outputs["download"]
    assert "models/model.onnx" in outputs["export"]
    missing = [p for paths in outputs.values() for p in paths if not (project / p).exists()]
    assert not missing, f"declared outputs missing after dvc repro: {missing}"
    assert "models/model.int8.onnx" in outputs["export"]  # restored with model.onnx
    assert not (project / "models" / "checkpoints").exists()

    metrics = check_metrics(project)
    with (project / "metrics" / "train_curve.csv").open(newline="") as f:
        curve = list(csv.DictReader(f))
    assert [int(row["epoch"]) for row in curve] == [0, 1]
    # train.json rounds to 4 decimals, the curve to 6: equal within the rounding.
    best = min(float(r["val_ppl"]) for r in curve)
    assert best == pytest.approx(metrics["train"]["val_ppl"], abs=5e-5)
    samples = (project / "metrics" / "samples.txt").read_text(encoding="utf-8")
    assert samples.startswith("# 2 prompt(s) x 2 sample(s) of 8 tokens")
    assert "## nation: 'The state of the union'" in samples and "\n1. " in samples

    assert json.loads(dvc(project, env, "status", "--json").stdout) == {}
    check_mlflow(project, metrics)

    model = project / "models" / "model.onnx"
    generate = [str(BIN / "rnnlm"), "generate", "--model", str(model), "--seed", "1"]
    first = run_ok([*generate, "--max-tokens", "5"], cwd=project, env=env).stdout
    assert first.strip(), "rnnlm generate printed nothing"
    assert run_ok([*generate, "--max-tokens", "5"], cwd=project, env=env).stdout == first

    plots = json.loads(dvc(project, env, "plots", "show", "--json").stdout)["data"]
    # The two charts and the PNG; no stray chart of another CSV column.
    assert set(plots) == {"validation perplexity", "loss", "metrics/train_curve.png"}, set(plots)
    rows = plots["validation perplexity"][0]["content"]["data"]["values"]
    assert [float(r["val_ppl"]) for r in rows] == [float(r["val_ppl"]) for r in curve]
    model_meta = LanguageModel(model)
    assert model_meta.provenance["git_dirty"] == "false"

    before = {p: (project / p).stat().st_mtime_ns for ps in outputs.values() for p in ps}
    log = repro_log(project, env)
    assert "Running stage" not in log, log[-4000:]
    for stage in STAGES:
        assert f"Stage '{stage}' didn't change" in log
    assert {p: (project / p).stat().st_mtime_ns for p in before} == before
    assert len(experiment_runs(project)) == 1
    assert json.loads(dvc(project, env, "status", "--json").stdout) == {}
