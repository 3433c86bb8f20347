"""Stage `train` on the tiny corpus: outputs, the MLflow run, determinism, failures."""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
import torch

from rnnlm import tracking, train
from rnnlm.config import CellOverrides, Params
from rnnlm.errors import format_duration
from rnnlm.files import md5_file
from rnnlm.lit_module import LitRNNLM
from tests.fixtures import (
    prepare_tiny_project,
    shipped_params,
    unused_port,
    write_full_params,
)


def _client(params: Params) -> mlflow.MlflowClient:
    return mlflow.MlflowClient(params.mlflow.tracking_uri)


def _artifacts(client: mlflow.MlflowClient, run_id: str, path: str | None = None) -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifacts(client, run_id, item.path) if item.is_dir else {item.path}
    return found


@dataclasses.dataclass(frozen=True)
class Trained:
    params: Params
    metrics: dict
    environ_after: dict[str, str]  # os.environ right after training, before the fixture ends


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """A tiny two-epoch training run with its params file logged, shared by this module's
    tests that only read it (the MLflow store under its own folder)."""
    root = tmp_path_factory.mktemp("trained")
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.setenv("RNNLM_PROJECT_ROOT", str(root))
        params = prepare_tiny_project(root)
        # The shipped cosine schedule here (every other training in the suite has the plateau
        # one, TINY_OVERRIDES), so its per-step path is checked without a training of its own.
        params = dataclasses.replace(
            params, train=dataclasses.replace(params.train, lr_schedule="cosine", min_lr=1e-4)
        )
        params_file = write_full_params(params, root / "params.yaml")
        metrics = train.run_from_params(params, params_file=params_file)
        yield Trained(params, metrics, dict(os.environ))


def test_train_writes_outputs_checkpoint_and_a_complete_mlflow_run(
    trained: Trained,
) -> None:
    params, metrics = trained.params, trained.metrics
    paths = params.paths
    assert (paths.models_dir / "model.ckpt").is_file()
    assert not (paths.models_dir / "checkpoints").exists()
    on_disk = json.loads(paths.train_metrics.read_text())
    record = json.loads(paths.train_run.read_text())
    assert {**on_disk, **record} == metrics
    # A DVC metrics file holds numbers only: ids and names are in the run record.
    assert all(isinstance(v, int | float) for v in on_disk.values()), on_disk
    assert set(record) == {"run_id", "experiment_id", "accelerator"}
    assert paths.train_curve_png.read_bytes().startswith(b"\x89PNG")
    assert metrics["epochs"] == params.train.max_epochs
    # Two epochs on a 177-word vocabulary: well below uniform guessing.
    assert 1.0 < metrics["test_ppl"] < 60 and 1.0 < metrics["val_ppl"] < 60
    rows = list(csv.DictReader((paths.metrics_dir / "train_curve.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    assert float(rows[1]["val_ppl"]) < float(rows[0]["val_ppl"])
    assert min(float(r["val_ppl"]) for r in rows) == pytest.approx(metrics["val_ppl"], rel=1e-4)

    # The checkpoint loads without unpickling arbitrary objects.
    checkpoint = torch.load(paths.models_dir / "model.ckpt", weights_only=True)
    assert checkpoint["hyper_parameters"]["model"]["cell"] == "lstm"
    assert checkpoint["hyper_parameters"]["model"]["vocab_size"] > 10
    assert any(k.startswith("net.") for k in checkpoint["state_dict"])

    client = _client(params)
    run = client.get_run(metrics["run_id"])
    assert run.info.status == "FINISHED"
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.name == params.mlflow.experiment_name
    # MLflow 3's UI opens a model-training experiment on its runs, with a description.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert "headline/" in experiment.tags["mlflow.note.content"]

    assert run.data.params["model.cell"] == "lstm"
    assert run.data.params["train.batch_size"] == str(params.train.batch_size)
    assert run.data.params["tokenize.min_freq"] == str(params.tokenize.min_freq)
    assert run.data.params["corpus.name"] == "tinycorpus"
    # The split rule that ran: tinycorpus's 20 documents fill every split by document.
    assert run.data.params["tokenize.split_by"] == "auto"
    assert run.data.params["tokenize.split_rule"] == "document"
    assert "model/cell" not in run.data.params  # Lightning's hparams are not logged twice

    for key in (
        "val/loss",
        "val/ppl",
        "headline/val_ppl",
        "test/ppl",
        "train/loss",
        "train/lr",
        "epoch",
    ):
        assert key in run.data.metrics, key
    for key in ("train/epoch_time_s", "train/tokens_per_s"):
        assert run.data.metrics[key] > 0
    assert run.data.metrics["test/ppl"] == pytest.approx(metrics["test_ppl"], rel=1e-4)
    assert len(client.get_metric_history(run.info.run_id, "val/ppl")) == metrics["epochs"]
    for key in run.data.metrics:
        steps = collections.Counter(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert max(steps.values()) == 1, f"{key} logged twice at one step"

    tags = run.data.tags
    assert tags["corpus"] == "tinycorpus"
    assert tags["accelerator"] == "cpu"
    assert tags["git.commit"]
    assert tags["data.md5.train.npy"] == md5_file(paths.processed_dir / "train.npy")

    artifacts = _artifacts(client, run.info.run_id)
    assert {
        "checkpoint/model.ckpt",
        "config/params.yaml",
        "data/vocab.json",
        "data/tokenizer.json",
        "training/train_curve.png",
        "training/train_curve.csv",
        "training/train.json",
        "training/train_run.json",
    } <= artifacts


def test_cosine_schedule_falls_from_lr_to_min_lr_over_the_whole_budget(
    trained: Trained,
) -> None:
    t = trained.params.train
    assert t.lr_schedule == "cosine"
    client = _client(trained.params)
    run_id = trained.metrics["run_id"]
    # Steps are logged from 0: a value at step s is the one after s + 1 optimizer steps, and
    # val/ppl's last step is the budget's last optimizer step.
    total = 1 + max(m.step for m in client.get_metric_history(run_id, "val/ppl"))
    logged = sorted((m.step + 1, m.value) for m in client.get_metric_history(run_id, "train/lr"))
    assert len(logged) > 4 and logged[-1][0] > total * 0.9  # both epochs, to near the end
    for done, rate in logged:  # per optimizer step, not per epoch
        expected = t.min_lr + (t.lr - t.min_lr) * (1 + math.cos(math.pi * done / total)) / 2
        assert rate == pytest.approx(expected, rel=1e-4), (done, total)


def test_same_seed_same_perplexity(trained: Trained, tmp_path: Path) -> None:
    first = trained.metrics
    params = dataclasses.replace(  # the same data and store, its own outputs
        trained.params,
        paths=dataclasses.replace(
            trained.params.paths, models_dir=tmp_path / "models", metrics_dir=tmp_path / "m"
        ),
    )
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.setenv("RNNLM_PROJECT_ROOT", str(trained.params.paths.raw_dir.parents[1]))
        again = train.run_from_params(params)
    assert again["run_id"] != first["run_id"]
    assert f"{again['val_ppl']:.4g}" == f"{first['val_ppl']:.4g}"
    assert f"{again['test_ppl']:.4g}" == f"{first['test_ppl']:.4g}"


class _ValidationWorsensEachEpoch(LitRNNLM):
    """Validation loss raised by 10 nats per epoch: the first epoch is the best on any CPU.

    Training itself is untouched; no real improvement between epochs comes near 10 nats (a
    22,000-fold drop in perplexity), so which epoch is best no longer depends on the numerical
    path a machine's kernels take.
    """

    def on_validation_epoch_end(self) -> None:
        self._nll_sum["val"] += 10.0 * self.current_epoch * self._token_count["val"]
        super().on_validation_epoch_end()


def test_testing_the_best_checkpoint_keeps_the_whole_curve_and_training_time(
    processed_tiny: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The best checkpoint (which trainer.test loads, callbacks included) is not the last one.
    monkeypatch.setattr(train, "LitRNNLM", _ValidationWorsensEachEpoch)
    p = processed_tiny
    t = dataclasses.replace(p.train, max_epochs=3)
    start = time.monotonic()
    metrics = train.run(p.model, t, p.mlflow, p.paths, p.corpus.name)
    elapsed = time.monotonic() - start
    assert metrics["best_epoch"] == 0
    assert metrics["epochs"] == 3
    rows = list(csv.DictReader((p.paths.metrics_dir / "train_curve.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [0, 1, 2]
    assert metrics["val_ppl"] == pytest.approx(float(rows[0]["val_ppl"]), rel=1e-4)
    # Counted once: the test's checkpoint load is not a resume adding its time again.
    assert metrics["train_time_s"] <= elapsed


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_trainer_settings_lightning_refuses_fail_in_one_line(
    processed_tiny: Params, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    t = dataclasses.replace(processed_tiny.train, accelerator="cuda", devices=2, strategy="ddp")
    params_file = write_full_params(dataclasses.replace(processed_tiny, train=t), tmp_path / "p")
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--params", str(params_file)])
    assert exit_info.value.code == 1
    (record,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "cannot train with these train params: `CUDAAccelerator` can not run" in record.message
    assert "\n" not in record.message and record.exc_info is None


def test_dvc_experiment_tags_cell_overrides_and_progress_lines(
    processed_tiny: Params, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DVC_EXP_NAME", "brisk-lynx")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    p = processed_tiny
    t = dataclasses.replace(
        p.train,
        max_epochs=1,
        cell_overrides={"rnn_tanh": CellOverrides(lr=0.0042)},
        progress_every_s=0.0,  # a progress line after every step
    )
    m = dataclasses.replace(p.model, cell="rnn_tanh")
    with caplog.at_level(logging.INFO, logger="rnnlm.callbacks"):
        metrics = train.run(m, t, p.mlflow, p.paths, p.corpus.name)
    run = _client(p).get_run(metrics["run_id"])
    assert run.data.tags["dvc.exp_name"] == "brisk-lynx"
    assert run.data.tags["dvc.exp_baseline_rev"] == "abc123"
    assert run.info.run_name == "brisk-lynx"
    assert run.data.params["train.lr"] == "0.0042"
    # Without a terminal (as here: pytest captures stderr) training says how far it is.
    progress = [r.getMessage() for r in caplog.records if "epoch ETA" in r.getMessage()]
    assert progress, "no progress lines"
    pattern = r"epoch 0: step (\d+)/(\d+) \(\d+%\), [\d,]+ tokens/s, loss [\d.]+, epoch ETA .+"
    steps = [re.fullmatch(pattern, line) for line in progress]
    assert all(steps), progress
    assert [int(m[1]) for m in steps] == list(range(1, len(steps) + 1))  # type: ignore[index]
    assert int(steps[-1][2]) == len(steps)  # type: ignore[index]


def test_progress_durations_read_well() -> None:
    assert format_duration(12.4) == "12 s"
    assert format_duration(245) == "4 min 05 s"
    assert format_duration(7380) == "2 h 03 min"
    assert format_duration(math.nan) == "?"


def test_unreachable_tracking_server_fails_fast_and_writes_nothing(
    processed_tiny: Params, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = processed_tiny
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://127.0.0.1:{unused_port()}")
    start = time.monotonic()
    with pytest.raises(tracking.TrackingError, match="unreachable"):
        train.run(p.model, p.train, p.mlflow, p.paths, p.corpus.name)
    assert time.monotonic() - start < 10
    assert not p.paths.models_dir.exists() or not any(p.paths.models_dir.iterdir())


def test_missing_inputs_give_a_clear_error(tiny_params: Params) -> None:
    p = tiny_params
    with pytest.raises(train.TrainError, match="run the tokenize stage"):
        train.run(p.model, p.train, p.mlflow, p.paths, p.corpus.name)


def test_a_model_too_big_for_memory_is_refused_before_a_run_starts(
    processed_tiny: Params,
) -> None:
    p = processed_tiny
    huge = dataclasses.replace(p.model, embedding_dim=100_000, hidden_dim=100_000)
    with pytest.raises(train.TrainError) as err:
        train.run(huge, p.train, p.mlflow, p.paths, p.corpus.name)
    message = str(err.value)
    assert re.match(r"the model does not fit: training it needs about [\d,.]+ GiB \(", message)
    n_params = int(re.search(r"\(([\d,]+) parameters x 4 copies", message)[1].replace(",", ""))
    assert n_params > 8 * 100_000**2  # the LSTM's four gates, input and recurrent weights
    assert "Make model.hidden_dim, model.embedding_dim or model.num_layers smaller" in message
    assert not p.paths.checkpoint.exists() and not p.paths.train_metrics.exists()
    assert _client(p).search_runs([e.experiment_id for e in _client(p).search_experiments()]) == []


def test_a_node_that_never_joins_ends_the_wait_naming_the_address(
    processed_tiny: Params, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    p = processed_tiny
    t = dataclasses.replace(p.train, strategy="ddp", num_nodes=2, devices=1, ddp_timeout_s=2)
    address = f"127.0.0.1:{unused_port()}"
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", address.rsplit(":", 1)[1])
    monkeypatch.setenv("NODE_RANK", "0")
    caplog.set_level(logging.INFO, logger="rnnlm")
    with pytest.raises(train.TrainError) as err:
        train.run(p.model, t, p.mlflow, p.paths, p.corpus.name)
    assert str(err.value).startswith(
        f"DDP gave up after train.ddp_timeout_s = 2 s waiting for its peers (2 node(s) x 1 "
        f"device(s)) at {address}: start the training on every node"
    )
    assert f"waiting for 2 node(s) to join at {address}" in caplog.text
    # Lightning's launcher wrote LOCAL_RANK and WORLD_SIZE; the next training in this process
    # must not take itself for a child rank.
    assert "LOCAL_RANK" not in os.environ and "WORLD_SIZE" not in os.environ
    assert os.environ["MASTER_PORT"] == address.rsplit(":", 1)[1]
    (run,) = _client(p).search_runs([e.experiment_id for e in _client(p).search_experiments()])
    assert run.info.status == "FAILED"


@pytest.mark.parametrize("fault", ["allocation", "strategy"])
def test_a_run_that_cannot_train_is_marked_failed_and_said_in_one_line(
    processed_tiny: Params, monkeypatch: pytest.MonkeyPatch, fault: str
) -> None:
    p = processed_tiny
    t = p.train
    if fault == "allocation":  # what the CPU allocator raises for a batch that does not fit

        def no_memory(*args: object, **kwargs: object) -> None:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to ...")

        monkeypatch.setattr(LitRNNLM, "training_step", no_memory)
        expected = "out of memory while training (train.batch_size = 4, train.bptt = 8)"
    else:
        t = dataclasses.replace(t, strategy="nonsense")
        expected = "Lightning cannot train with these train params: You selected an invalid"
    with pytest.raises(train.TrainError) as err:
        train.run(p.model, t, p.mlflow, p.paths, p.corpus.name)
    assert str(err.value).startswith(expected) and "\n" not in str(err.value)
    (run,) = _client(p).search_runs([e.experiment_id for e in _client(p).search_experiments()])
    assert run.info.status == "FAILED"
    assert not p.paths.checkpoint.exists()


def test_the_memory_estimate_counts_the_real_network(tiny_params: Params) -> None:
    from rnnlm.model import RNNLM, RNNLMConfig

    config = RNNLMConfig.of(tiny_params.model, vocab_size=123)
    n_params, need = train.training_bytes(config, tiny_params.train)
    assert n_params == sum(p.numel() for p in RNNLM(config).parameters())
    t = tiny_params.train
    assert need == 4 * (4 * n_params + 3 * t.batch_size * t.bptt * 123)


def test_project_root_of_a_dvc_experiment_copy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("RNNLM_PROJECT_ROOT", raising=False)
    copy = tmp_path / "proj" / ".dvc" / "tmp" / "exps" / "tmpab12" / "sub"
    assert tracking.project_root(copy) == tmp_path / "proj"
    assert tracking.project_root(tmp_path / "proj") == tmp_path / "proj"
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    ml = shipped_params().mlflow
    uri = tracking.resolve_tracking_uri(ml, root=tmp_path / "proj")
    assert uri == f"sqlite:///{tmp_path}/proj/mlruns/mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://example.invalid:5000")
    assert tracking.resolve_tracking_uri(ml) == "http://example.invalid:5000"


def test_file_store_uri_is_refused() -> None:
    with pytest.raises(tracking.TrackingError, match="file store"):
        tracking.check_tracking_uri("./mlruns")


@pytest.mark.parametrize("uri", ["htp://127.0.0.1:5000", "s3://bucket/mlruns", "ftp://x/y"])
def test_unknown_tracking_uri_scheme_is_refused_by_name(uri: str) -> None:
    with pytest.raises(tracking.TrackingError, match="unknown scheme") as err:
        tracking.check_tracking_uri(uri)
    assert repr(uri) in str(err.value)


def test_known_database_schemes_pass_the_scheme_check() -> None:
    for uri in ("postgresql://u@h/db", "mysql+pymysql://u@h/db", "databricks"):
        tracking.check_tracking_uri(uri)  # no I/O for databases: MLflow connects later


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TORCHELASTIC_RUN_ID": "x", "WORLD_SIZE": "2"}, "torchrun started 2 processes"),
        ({"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "job"}, "srun started 4 processes"),
    ],
)
def test_launcher_world_that_disagrees_with_train_devices_is_refused_by_name(
    tiny_params: Params, env: dict[str, str], message: str
) -> None:
    t = dataclasses.replace(tiny_params.train, devices=1, num_nodes=1)
    with pytest.raises(train.TrainError, match=message) as err:
        train.check_launcher_world(t, env)
    assert "train.devices x train.num_nodes = 1 x 1 = 1" in str(err.value)
    train.check_launcher_world(dataclasses.replace(t, devices=int(env.get("WORLD_SIZE", 4))), env)
    train.check_launcher_world(t, {"SLURM_NTASKS": "4", "SLURM_JOB_NAME": "interactive"})
    train.check_launcher_world(dataclasses.replace(t, devices="auto"), env)


def test_training_in_process_leaves_no_tracking_uri_behind(trained: Trained) -> None:
    """mlflow.set_tracking_uri (Lightning's logger calls it) exports MLFLOW_TRACKING_URI: a later
    stage or subprocess would inherit it and log there whatever its params say."""
    assert "MLFLOW_TRACKING_URI" not in trained.environ_after
    assert mlflow.get_tracking_uri() != trained.params.mlflow.tracking_uri
