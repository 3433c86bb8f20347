"""Stage `train`: data/processed/ -> models/model.ckpt, metrics/train.json, one MLflow run.

Trains the recurrent LM with truncated BPTT on whatever accelerator Lightning finds (or the one
`train.accelerator` names), keeps the best checkpoint by validation loss, evaluates it on the
whole test stream and records everything in one MLflow run:

    models/model.ckpt          best checkpoint (Lightning format, loads with weights_only=True)
    metrics/train.json         final metrics (numbers only: a DVC metrics file)
    metrics/train_run.json     the MLflow run id (export/evaluate log to it), accelerator
    metrics/train_curve.csv    per-epoch curve (dvc plots), and as a picture train_curve.png

Run via `dvc repro train`, or directly: `python -m rnnlm.train [--params params.yaml]`.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.trainer.states import TrainerFn
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from rnnlm import resume, tracking
from rnnlm.config import (
    SPLITS,
    ConfigError,
    MlflowParams,
    ModelParams,
    Params,
    Paths,
    TrainParams,
    as_flat_dict,
    load_params,
    stage_argparser,
)
from rnnlm.datamodule import CorpusDataModule
from rnnlm.files import (
    configure_logging,
    describe_os_error,
    md5_file,
    staged_files,
    write_json_atomic,
    write_text_atomic,
)
from rnnlm.lit_module import LitRNNLM

log = logging.getLogger(__name__)

CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "val_ppl", "lr", "epoch_time_s", "tokens_per_s")


def processed_files(paths: Paths) -> list[Path]:
    """The tokenize outputs training reads (their MD5s fingerprint a resumable checkpoint)."""
    return [paths.vocab, paths.tokenizer, *(paths.split_ids(split) for split in SPLITS)]


class TrainError(RuntimeError):
    """Training cannot start or its outputs cannot be written."""


class EpochSummary(pl.Callback):
    """Per-epoch training time, throughput and mean loss; the curve rows; a one-line log.

    Training time stops when validation starts, so throughput is training alone. Logs
    `train/epoch_time_s`, `train/tokens_per_s` and `train/epoch_loss` once per epoch. Under DDP
    tokens and loss are summed over the processes: tokens/s is that of the whole job.
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._start = 0.0
        self._seconds: float | None = None
        self._tokens = 0
        self._loss_sum: torch.Tensor | float = 0.0
        self._epoch: dict[str, float] = {}
        self._restore = True

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._start, self._seconds, self._tokens, self._loss_sum = time.perf_counter(), None, 0, 0.0

    def state_dict(self) -> dict[str, Any]:
        """The curve so far and, mid-epoch, the epoch's progress (checkpointed for a resume)."""
        in_training = self._seconds is None and self._tokens > 0
        progress = {
            "seconds": time.perf_counter() - self._start,
            "tokens": self._tokens,
            "loss_sum": float(self._loss_sum),
        }
        return {"rows": list(self.rows), "epoch_progress": progress if in_training else None}

    def on_load_checkpoint(
        self, trainer: pl.Trainer, module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        # Lightning restores callbacks for trainer.test(ckpt_path=best) too: only a resumed fit
        # takes the saved curve, or testing would cut the curve back to the best epoch.
        self._restore = trainer.state.fn == TrainerFn.FITTING

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not self._restore:
            return
        self.rows = list(state_dict.get("rows", []))
        # Lightning continues an interrupted epoch without calling on_train_epoch_start again.
        if progress := state_dict.get("epoch_progress"):
            self._start = time.perf_counter() - progress["seconds"]
            self._seconds, self._tokens = None, int(progress["tokens"])
            self._loss_sum = float(progress["loss_sum"])

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        n = batch[1].numel()
        self._tokens += n
        # Kept as a tensor: calling .item() here would force a device sync every step.
        self._loss_sum = self._loss_sum + outputs["loss"].detach() * n

    def on_validation_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.state.fn == TrainerFn.FITTING and self._seconds is None:
            self._seconds = time.perf_counter() - self._start

    def on_validation_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # Logged here, not at train-epoch end, so they go out in the same logger call as the
        # validation metrics: one write per epoch and no key logged twice at one step.
        if trainer.state.fn != TrainerFn.FITTING or self._seconds is None or not self._tokens:
            return
        # Every process trained its own rows (as many windows each, so all of them get here).
        local = [float(self._loss_sum), float(self._tokens)]
        totals = torch.tensor(local, dtype=torch.float64, device=module.device)
        loss_sum, tokens = trainer.strategy.reduce(totals, reduce_op="sum").tolist()
        self._epoch = {
            "train_loss": loss_sum / tokens,
            "epoch_time_s": self._seconds,
            "tokens_per_s": tokens / max(self._seconds, 1e-9),
        }
        module.log("train/epoch_loss", self._epoch["train_loss"])
        module.log("train/epoch_time_s", self._epoch["epoch_time_s"])
        module.log("train/tokens_per_s", self._epoch["tokens_per_s"])

    def on_train_epoch_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        # Validation has run by now, so its metrics are in callback_metrics.
        metrics = trainer.callback_metrics
        if not self._epoch or "val/loss" not in metrics:
            return
        row = {
            "epoch": trainer.current_epoch,
            **self._epoch,
            "val_loss": float(metrics["val/loss"]),
            "val_ppl": float(metrics["val/ppl"]),
            "lr": trainer.optimizers[0].param_groups[0]["lr"],
        }
        self.rows.append(row)
        self._epoch = {}
        log.info(
            "epoch %d: train loss %.3f, val ppl %.2f, lr %.2g, %.0fs, %.0f tokens/s",
            row["epoch"],
            row["train_loss"],
            row["val_ppl"],
            row["lr"],
            row["epoch_time_s"],
            row["tokens_per_s"],
        )


class ProgressLog(pl.Callback):
    """A progress line every `every_s` seconds of training, for logs without a terminal.

    Lightning's progress bar needs a TTY: under CI, `dvc queue`, nohup or `make repro > log`
    an epoch of several minutes would otherwise pass without a line. Each line gives the epoch,
    the step within it, tokens/s since the epoch started, the latest loss and the epoch's ETA.
    Throughput is this process's (the epoch summary gives the whole job's under DDP).
    """

    def __init__(self, every_s: float, clock: Any = time.monotonic) -> None:
        self.every_s = every_s
        self._clock = clock
        self._epoch_start = 0.0
        self._last = 0.0
        self._tokens = 0
        self._first_batch = 0

    def on_train_epoch_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self._epoch_start = self._last = self._clock()
        self._tokens = 0
        self._first_batch = -1  # set at the first batch: a resumed epoch starts mid-way

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self._first_batch < 0:
            self._first_batch = idx
        self._tokens += batch[1].numel()
        now = self._clock()
        if now - self._last < self.every_s:
            return
        self._last = now
        done, total = idx + 1, trainer.num_training_batches
        elapsed = max(now - self._epoch_start, 1e-9)
        batches_done = done - self._first_batch
        eta = elapsed / batches_done * (total - done) if isinstance(total, int) else math.nan
        log.info(
            "epoch %d: step %d/%s (%.0f%%), %.0f tokens/s, loss %.3f, epoch ETA %s",
            trainer.current_epoch,
            done,
            total,
            100.0 * done / total if isinstance(total, int) and total else math.nan,
            self._tokens / elapsed,
            float(outputs["loss"]),
            format_duration(eta),
        )


def format_duration(seconds: float) -> str:
    """12 s, 4 min 05 s, 2 h 03 min; '?' when unknown."""
    if not math.isfinite(seconds):
        return "?"
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def curve_csv(rows: list[dict[str, float]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(
        out, fieldnames=CURVE_COLUMNS, extrasaction="ignore", lineterminator="\n"
    )
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (round(v, 6) if isinstance(v, float) else v) for k, v in row.items()})
    return out.getvalue()


def plot_curve(rows: list[dict[str, float]], path: Path) -> None:
    """The training curve as a PNG (metrics/train_curve.png, an MLflow artifact too)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_ppl) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r.get("train_loss", math.nan) for r in rows], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss (nats/token)", title="Loss")
    ax_loss.legend()
    ax_ppl.plot(epochs, [r["val_ppl"] for r in rows], "o-", color="tab:orange")
    ax_ppl.xaxis.get_major_locator().set_params(integer=True)
    ax_loss.xaxis.get_major_locator().set_params(integer=True)
    ax_ppl.set(xlabel="epoch", ylabel="perplexity", title="Validation perplexity")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def is_global_zero() -> bool:
    """Whether this process will be global rank 0, known before Lightning sets up DDP.

    torchrun sets RANK (and GROUP_RANK for the node), srun SLURM_PROCID; Lightning's own
    launcher gives its children LOCAL_RANK > 0 and reads NODE_RANK on the other nodes.
    """
    ranks = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    return all(int(os.environ.get(name) or 0) == 0 for name in ranks)


def check_inputs(paths: Paths) -> None:
    missing = [path.name for path in processed_files(paths) if not path.exists()]
    if missing:
        raise TrainError(
            f"{paths.processed_dir}: missing {', '.join(missing)} (run the tokenize stage first)"
        )


def data_md5(paths: Paths) -> dict[str, str]:
    return {path.name: md5_file(path) for path in processed_files(paths)}


def run_tags(model_p: ModelParams, corpus_name: str, md5: dict[str, str]) -> dict[str, str]:
    return {
        "corpus": corpus_name,
        "cell": model_p.cell,
        "stage": "train",
        **tracking.git_info(tracking.project_root()),
        **tracking.dvc_experiment_tags(),
        **{f"data.md5.{name}": value for name, value in md5.items()},
    }


def build_trainer(
    t: TrainParams,
    checkpoint_dir: Path,
    logger: Any,
    summary: EpochSummary,
    resumable: resume.Resumable | None = None,
) -> tuple[pl.Trainer, ModelCheckpoint]:
    interactive = sys.stderr.isatty() and not os.environ.get("CI")
    checkpoint = ModelCheckpoint(
        dirpath=checkpoint_dir,  # explicit: Lightning cannot derive one from a SQLite logger
        filename="best",
        monitor="val/loss",
        mode="min",
        save_top_k=1,
        save_last=True,
        auto_insert_metric_name=False,
    )
    callbacks: list[pl.Callback] = [
        checkpoint,
        EarlyStopping(monitor="val/loss", mode="min", patience=t.early_stopping_patience),
        summary,
    ]
    if not interactive and is_global_zero():  # a terminal has Lightning's progress bar
        callbacks.append(ProgressLog(t.progress_every_s))
    if resumable is not None:
        callbacks.append(resumable)  # last: its checkpoints include the others' step
    trainer = pl.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=t.precision,
        max_epochs=t.max_epochs,
        max_time={"minutes": t.max_time_min} if t.max_time_min else None,
        gradient_clip_val=t.grad_clip,
        gradient_clip_algorithm="norm",
        logger=logger,
        callbacks=callbacks,
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=interactive,
        enable_model_summary=interactive,
        num_sanity_val_steps=0,
        deterministic=t.deterministic,
        # Windows must reach each process in order (the state is carried across them): the
        # datamodule shards rows per process itself instead of a shuffling DistributedSampler.
        use_distributed_sampler=False,
    )
    return trainer, checkpoint


def check_launcher_world(t: TrainParams, env: Mapping[str, str] = os.environ) -> None:
    """torchrun/srun started the processes: their count must be devices x num_nodes.

    Lightning checks it too, but only once training starts and with a traceback per process.
    """
    if isinstance(t.devices, str):  # auto: Lightning counts the devices itself
        return
    expected = t.devices * t.num_nodes
    started = None
    if "TORCHELASTIC_RUN_ID" in env and "WORLD_SIZE" in env:
        started, launcher = int(env["WORLD_SIZE"]), "torchrun"
    elif "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in ("bash", "interactive"):
        started, launcher = int(env["SLURM_NTASKS"]), "srun"
    if started is not None and started != expected:
        raise TrainError(
            f"{launcher} started {started} processes but train.devices x train.num_nodes = "
            f"{t.devices} x {t.num_nodes} = {expected}: make them agree"
        )


def quiet_lightning(interactive: bool) -> None:
    """Keep CI logs to our own lines: Lightning's banners and tips only on a terminal."""
    if not interactive:
        for name in ("pytorch_lightning", "lightning.pytorch", "lightning_fabric"):
            logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    # Under DDP our epoch values are summed over the processes already (LitRNNLM._end_eval,
    # EpochSummary): Lightning's advice to add sync_dist does not apply.
    warnings.filterwarnings("ignore", message=".*when logging on epoch level in distributed.*")
    warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    # A resume reuses models/checkpoints/ on purpose, and continues an interrupted epoch
    # exactly (resume.Resumable restores the position, hidden state and RNG), whatever
    # Lightning's generic check of the data loader concludes.
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


def run(
    model_p: ModelParams,
    train_p: TrainParams,
    ml: MlflowParams,
    paths: Paths,
    corpus_name: str,
    params_file: Path | None = None,
    extra_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train, test the best checkpoint, write outputs, track the run; return the final metrics."""
    check_inputs(paths)
    t = train_p.for_cell(model_p.cell)
    check_launcher_world(t)
    quiet_lightning(sys.stderr.isatty() and not os.environ.get("CI"))
    pl.seed_everything(t.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")

    datamodule = CorpusDataModule(
        paths.processed_dir, t.batch_size, t.bptt, t.eval_batch_size, t.eval_bptt
    )
    model_config = {"vocab_size": datamodule.vocab_size, **as_flat_dict(model_p)}
    module = LitRNNLM(
        model=model_config,
        optimizer=t.optimizer,
        lr=t.lr,
        weight_decay=t.weight_decay,
        lr_factor=t.lr_factor,
        lr_patience=t.lr_patience,
        lr_threshold=t.lr_threshold,
        min_lr=t.min_lr,
    )

    md5 = data_md5(paths)
    checkpoint_dir = paths.checkpoints_dir
    fingerprint = resume.fingerprint(model_p, t, md5)
    point = resume.find_resume_point(checkpoint_dir, fingerprint, t.resume, is_global_zero())

    # The run is created before any file is written: an unreachable store fails fast here.
    tracked = None
    if is_global_zero():
        tracked = tracking_run(
            model_p, t, ml, corpus_name, md5, point, datamodule.vocab_size, extra_params
        )
    logger = tracked.lightning_logger(skip_logged=point is not None) if tracked else False

    summary = EpochSummary()
    resumable = resume.Resumable(
        datamodule, checkpoint_dir, fingerprint, tracked.run_id if tracked else None
    )
    try:
        trainer, checkpoint = build_trainer(t, checkpoint_dir, logger, summary, resumable)
    except BaseException:
        if tracked is not None:  # created a moment ago: it must not stay RUNNING forever
            tracked.set_status("FAILED")
        raise
    try:
        trainer.fit(
            module,
            datamodule=datamodule,
            ckpt_path=point.checkpoint if point else None,
            weights_only=True,
        )
        best_path = checkpoint.best_model_path
        if not best_path:
            raise TrainError("training finished without a checkpoint (no validation epoch ran)")
        test_metrics = trainer.test(
            module, datamodule=datamodule, ckpt_path=best_path, verbose=False
        )[0]
    except (resume.TrainingInterrupted, SIGTERMException) as err:
        if tracked is not None:
            # Shown as KILLED (not FAILED) until resumed; spooled if the store went away.
            tracked.set_status("KILLED")
        if isinstance(err, resume.TrainingInterrupted):
            raise
        # Lightning's own SIGTERM handling (outside the training loop, e.g. during the test).
        raise resume.TrainingInterrupted(
            "SIGTERM", resumable.checkpoint, trainer.current_epoch, trainer.global_step
        ) from None
    train_time = resumable.train_seconds()

    if not trainer.is_global_zero:
        return {}
    assert tracked is not None
    best_row = min(summary.rows, key=lambda r: r["val_loss"])
    metrics = {
        "epochs": len(summary.rows),
        "best_epoch": best_row["epoch"],
        "val_loss": round(best_row["val_loss"], 6),
        "val_ppl": round(best_row["val_ppl"], 4),
        "test_loss": round(float(test_metrics["test/loss"]), 6),
        "test_ppl": round(float(test_metrics["test/ppl"]), 4),
        "train_time_s": round(train_time, 1),
        "tokens_per_s": round(
            sum(r.get("tokens_per_s", 0.0) for r in summary.rows) / len(summary.rows), 1
        ),
        "devices": trainer.num_devices * trainer.num_nodes,
    }
    run_record = {
        "run_id": tracked.run_id,
        "experiment_id": tracked.experiment_id,
        "accelerator": type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
    }
    write_outputs(paths, Path(best_path), metrics, run_record, summary.rows)
    log_run(tracked, paths, metrics, run_record, params_file)
    shutil.rmtree(checkpoint_dir, ignore_errors=True)
    if tracked.offline_error:
        log.warning(
            "training finished and its outputs are written, but MLflow store %s went away "
            "(%s). Not logged: %s. They are kept in %s: run `rnnlm relog` when the store is "
            "back (export and evaluate need it too).",
            tracked.uri,
            tracked.offline_error,
            tracked.unsent_summary(),
            tracked.spool_file,
        )
    log.info(
        "best epoch %d: val ppl %.2f, test ppl %.2f; %d epochs in %.0fs; run %s",
        metrics["best_epoch"],
        metrics["val_ppl"],
        metrics["test_ppl"],
        metrics["epochs"],
        train_time,
        tracked.run_id,
    )
    return {**metrics, **run_record}


def tracking_run(
    model_p: ModelParams,
    t: TrainParams,
    ml: MlflowParams,
    corpus_name: str,
    md5: dict[str, str],
    point: resume.ResumePoint | None,
    vocab_size: int,
    extra_params: dict[str, Any] | None,
) -> tracking.TrackedRun:
    """The run a resumed training continues, else a new one with every param logged."""
    if point is not None and point.run_id:
        tracked = tracking.resume_run(ml, point.run_id)
        if tracked is not None:
            tracked.spool_dir = tracking.unsent_dir()
            return tracked
    run_name = (
        os.environ.get("DVC_EXP_NAME")
        or f"{model_p.cell}-{model_p.hidden_dim}x{model_p.num_layers}"
    )
    tags = run_tags(model_p, corpus_name, md5)
    if point is not None and point.run_id:
        tags["rnnlm.resumed_from_run"] = point.run_id  # that run is not in this store
    tracked = tracking.start_run(ml, run_name, tags)
    # From here on a lost tracking server does not stop training (see TrackedRun).
    tracked.spool_dir = tracking.unsent_dir()
    tracked.log_params(
        {
            **{f"model.{k}": v for k, v in as_flat_dict(model_p).items()},
            **{f"train.{k}": v for k, v in as_flat_dict(t).items() if k != "cell_overrides"},
            "data.vocab_size": vocab_size,
            **(extra_params or {}),
        }
    )
    return tracked


def write_outputs(
    paths: Paths,
    best_checkpoint: Path,
    metrics: dict[str, Any],
    run_record: dict[str, Any],
    rows: list[dict[str, float]],
) -> None:
    with staged_files(paths.models_dir) as staged:
        shutil.copyfile(best_checkpoint, staged / paths.checkpoint.name)
    with staged_files(paths.metrics_dir) as staged:
        write_text_atomic(staged / paths.train_curve.name, curve_csv(rows))
        plot_curve(rows, staged / paths.train_curve_png.name)
        write_json_atomic(staged / paths.train_metrics.name, metrics)
        write_json_atomic(staged / paths.train_run.name, run_record)


def log_run(
    tracked: tracking.TrackedRun,
    paths: Paths,
    metrics: dict[str, Any],
    run_record: dict[str, Any],
    params_file: Path | None,
) -> None:
    """Final metrics, tags and artifacts (per-step/epoch metrics came from Lightning's logger)."""
    tracked.set_tags({"accelerator": run_record["accelerator"], "devices": str(metrics["devices"])})
    tracked.log_metrics(
        {
            "val/best_loss": metrics["val_loss"],
            "val/best_ppl": metrics["val_ppl"],
            "val/best_epoch": metrics["best_epoch"],
            "train/time_s": metrics["train_time_s"],
            "train/mean_tokens_per_s": metrics["tokens_per_s"],
        }
    )
    for path in (paths.train_curve_png, paths.train_curve, paths.train_metrics, paths.train_run):
        tracked.log_artifact(path, "training")
    tracked.log_artifact(paths.vocab, "data")
    tracked.log_artifact(paths.tokenizer, "data")
    tracked.log_artifact(paths.checkpoint, "checkpoint")
    if params_file is not None and params_file.exists():
        tracked.log_artifact(params_file, "config")


def run_from_params(
    params: Params, params_file: Path | None = None, resume_allowed: bool = True
) -> dict[str, Any]:
    train_p = params.train if resume_allowed else dataclasses.replace(params.train, resume=False)
    extra = {
        **{f"tokenize.{k}": v for k, v in as_flat_dict(params.tokenize).items()},
        "corpus.name": params.corpus.name,
    }
    return run(
        params.model,
        train_p,
        params.mlflow,
        params.paths,
        params.corpus.name,
        params_file=params_file,
        extra_params=extra,
    )


def main(argv: list[str] | None = None) -> None:
    parser = stage_argparser(__doc__.splitlines()[0])
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="start afresh even if an interrupted run left a checkpoint (as train.resume=false)",
    )
    args = parser.parse_args(argv)
    # The other DDP processes report their problems only, not every line a second time.
    configure_logging(logging.INFO if is_global_zero() else logging.WARNING)
    try:
        run_from_params(
            load_params(args.params), params_file=args.params, resume_allowed=not args.no_resume
        )
    except resume.TrainingInterrupted as err:
        log.error("%s", err)
        raise SystemExit(err.exit_code) from None
    except (
        ConfigError,
        TrainError,
        resume.ResumeError,
        tracking.TrackingError,
    ) as err:
        log.error("%s", err)
        raise SystemExit(1) from None
    except OSError as err:  # disk full, unwritable models/ or metrics/
        log.error("%s", describe_os_error(err))
        raise SystemExit(1) from None
    except MisconfigurationException as err:  # e.g. train.devices: 4 on a machine with 2 GPUs
        log.error("Lightning cannot train with these train params: %s", " ".join(str(err).split()))
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
