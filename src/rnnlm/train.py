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

import argparse
import csv
import dataclasses
import datetime
import io
import logging
import math
import os
import shutil
import sys
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint
from pytorch_lightning.strategies import DDPStrategy, Strategy, StrategyRegistry
from pytorch_lightning.utilities.exceptions import MisconfigurationException, SIGTERMException

from rnnlm import resume, tracking
from rnnlm.callbacks import EpochSummary, ProgressLog, Resumable, RunLogger
from rnnlm.config import (
    SPLITS,
    MlflowParams,
    ModelParams,
    Params,
    Paths,
    TrainParams,
    as_flat_dict,
)
from rnnlm.datamodule import CorpusDataModule
from rnnlm.entry import Interrupted
from rnnlm.errors import RnnlmError
from rnnlm.files import (
    md5_file,
    staged_files,
    write_json_atomic,
    write_text_atomic,
)
from rnnlm.lit_module import LitRNNLM
from rnnlm.model import RNNLM, RNNLMConfig
from rnnlm.processed import read_split_rule
from rnnlm.spool import Spool, unsent_dir
from rnnlm.stage import is_global_zero, stage_main

log = logging.getLogger(__name__)

CURVE_COLUMNS = ("epoch", "train_loss", "val_loss", "val_ppl", "lr", "epoch_time_s", "tokens_per_s")


def processed_files(paths: Paths) -> list[Path]:
    """The tokenize outputs training reads (their MD5s fingerprint a resumable checkpoint)."""
    return [paths.vocab, paths.tokenizer, *(paths.split_ids(split) for split in SPLITS)]


class TrainError(RnnlmError):
    """Training cannot start or its outputs cannot be written."""


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


GIB = 1 << 30
# Float32 copies of every weight a training holds: the weights, their gradients, and Adam's
# two moments (SGD keeps none).
WEIGHT_COPIES = {"adam": 4, "adamw": 4, "sgd": 2}


def training_bytes(config: RNNLMConfig, t: TrainParams) -> tuple[int, int]:
    """(parameters, bytes) a training of `config` needs, estimated without allocating: the
    network is built on the meta device. The bytes are the weight copies above plus one
    batch's logits, their softmax and its gradient (batch x bptt x vocabulary, 3 times; an
    upper bound for the adaptive softmax, which scores a tail only for its own tokens)."""
    with torch.device("meta"):
        n_params = sum(p.numel() for p in RNNLM(config).parameters())
    logits = t.batch_size * t.bptt * config.vocab_size
    return n_params, 4 * (WEIGHT_COPIES[t.optimizer] * n_params + 3 * logits)


def free_memory_bytes(accelerator: str) -> tuple[int, str]:
    """Free memory where training will run: (bytes, where). The first CUDA device's when
    training goes there; the machine's available RAM otherwise."""
    if accelerator in ("cuda", "gpu", "auto") and torch.cuda.is_available():
        free, _ = torch.cuda.mem_get_info()
        return free, "on cuda:0"
    return psutil.virtual_memory().available, "available in RAM"


def check_fits_in_memory(config: RNNLMConfig, t: TrainParams) -> None:
    """Refuse a model that cannot be trained here before anything is allocated or logged,
    with the size it would need (a typo such as hidden_dim: 650000 would otherwise end in an
    out-of-memory kill, or hours of swapping)."""
    n_params, need = training_bytes(config, t)
    free, where = free_memory_bytes(t.accelerator)
    if need > free:
        raise TrainError(
            f"the model does not fit: training it needs about {need / GIB:,.1f} GiB "
            f"({n_params:,} parameters x {WEIGHT_COPIES[t.optimizer]} copies for weights, "
            f"gradients and {t.optimizer}'s state, plus a batch's logits: train.batch_size x "
            f"train.bptt x {config.vocab_size:,} words), only {free / GIB:,.1f} GiB is {where}. "
            "Make model.hidden_dim, model.embedding_dim or model.num_layers smaller (or "
            "tokenize.max_size, train.batch_size, train.bptt)"
        )


def is_interactive() -> bool:
    """A person watches a terminal: Lightning's progress bar and summaries, not log lines."""
    return sys.stderr.isatty() and not os.environ.get("CI")


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
    resumable: Resumable | None = None,
) -> tuple[pl.Trainer, ModelCheckpoint]:
    interactive = is_interactive()
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
        strategy=strategy_for(t),
        num_nodes=t.num_nodes,
        precision=t.precision,
        max_epochs=t.max_epochs,
        max_time={"minutes": int(t.max_time_min), "seconds": round(t.max_time_min % 1 * 60)}
        if t.max_time_min
        else None,
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


def strategy_for(t: TrainParams) -> str | Strategy:
    """`train.strategy` as Lightning takes it; a DDP one built with `train.ddp_timeout_s`.

    `auto` over several nodes or devices is DDP (what Lightning would pick), built here so the
    timeout applies to it too.
    """
    name = t.strategy
    several = t.num_nodes > 1 or (isinstance(t.devices, int) and t.devices > 1)
    if name == "auto" and several:
        name = "ddp"
    entry = dict.get(StrategyRegistry, name)  # its registration (the registry's .get builds one)
    if entry is None or not issubclass(entry["strategy"], DDPStrategy):
        return name
    timeout = datetime.timedelta(seconds=t.ddp_timeout_s)
    return entry["strategy"](**{**entry["init_params"], "timeout": timeout})


def rendezvous_address(env: Mapping[str, str] = os.environ) -> str:
    """Where DDP processes meet: rank 0's MASTER_ADDR:MASTER_PORT (Lightning's defaults when
    unset: this machine, a free port)."""
    return f"{env.get('MASTER_ADDR', '127.0.0.1')}:{env.get('MASTER_PORT', '(a free port)')}"


def announce_rendezvous(t: TrainParams) -> None:
    """Multi-node training waits for every node before the first step: say for what."""
    if t.num_nodes > 1:
        log.log(
            logging.INFO if is_global_zero() else logging.WARNING,
            "waiting for %d node(s) to join at %s (NODE_RANK %s; gives up after "
            "train.ddp_timeout_s = %g s)",
            t.num_nodes,
            rendezvous_address(),
            os.environ.get("NODE_RANK", "0"),
            t.ddp_timeout_s,
        )


def out_of_memory(err: BaseException) -> bool:
    """An allocation failed (CUDA's OutOfMemoryError, or the CPU allocator's RuntimeError)."""
    text = str(err)
    return isinstance(err, torch.OutOfMemoryError) or (
        isinstance(err, RuntimeError)
        and ("can't allocate memory" in text or "out of memory" in text.lower())
    )


def peers_timed_out(err: BaseException) -> bool:
    """torch.distributed gave up on a peer (the store's or a collective's timeout)."""
    return isinstance(err, torch.distributed.DistError) or (
        isinstance(err, RuntimeError) and "timed out" in str(err).lower()
    )


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
    # exactly (callbacks.Resumable restores the position, hidden state and RNG), whatever
    # Lightning's generic check of the data loader concludes.
    warnings.filterwarnings("ignore", message=".*Checkpoint directory .* exists and is not empty.*")
    warnings.filterwarnings("ignore", message=".*your dataloader is not resumable.*")


@dataclass
class Session:
    """One training, set up: what fitting, testing and finishing need.

    `tracked` (the MLflow run) exists in the process of global rank 0 only: that is decided
    once, before Lightning starts its processes, and decides who writes outputs and logs.
    """

    t: TrainParams
    paths: Paths
    datamodule: CorpusDataModule
    module: LitRNNLM
    trainer: pl.Trainer
    checkpoint: ModelCheckpoint
    summary: EpochSummary
    resumable: Resumable
    point: resume.ResumePoint | None
    tracked: tracking.TrackedRun | None


# What Lightning's DDP launcher writes into os.environ of the process that calls fit (rank 0)
# before it starts the other ranks.
LAUNCHER_ENV = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")


@contextmanager
def launcher_env_restored() -> Iterator[None]:
    """Give the caller back its environment after a DDP run. Left behind, LOCAL_RANK tells the
    next training started from this process (or any process it starts) that it is a child rank,
    so it waits forever for a rank 0 that never comes."""
    before = {name: os.environ.get(name) for name in LAUNCHER_ENV}
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run(
    model_p: ModelParams,
    train_p: TrainParams,
    ml: MlflowParams,
    paths: Paths,
    corpus_name: str,
    params_file: Path | None = None,
    extra_params: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Train, test the best checkpoint, write outputs, track the run; return the final metrics
    (train.json's, with train_run.json's run id and accelerator); {} in the other processes."""
    with launcher_env_restored():
        return _run(model_p, train_p, ml, paths, corpus_name, params_file, extra_params)


def _run(
    model_p: ModelParams,
    train_p: TrainParams,
    ml: MlflowParams,
    paths: Paths,
    corpus_name: str,
    params_file: Path | None,
    extra_params: dict[str, Any] | None,
) -> dict[str, Any]:
    session = set_up(model_p, train_p, ml, paths, corpus_name, extra_params)
    tracked = session.tracked
    try:
        test_metrics = fit_and_test(session)
        if tracked is None:
            return {}
        metrics, record = final_metrics(session, tracked, test_metrics)
        finish(session, tracked, metrics, record, params_file)
    except resume.TrainingInterrupted:
        raise  # the run is KILLED until a resume continues it
    except BaseException as err:  # the run must not stay RUNNING, nor look FINISHED
        if tracked is not None and isinstance(err, KeyboardInterrupt | Interrupted):
            tracked.set_status("KILLED")
        elif tracked is not None:
            tracked.mark_failed(err)
        raise
    return {**metrics, **record}


def set_up(
    model_p: ModelParams,
    train_p: TrainParams,
    ml: MlflowParams,
    paths: Paths,
    corpus_name: str,
    extra_params: dict[str, Any] | None,
) -> Session:
    """Check the inputs, seed, build data and model, find a resume point, start the run and
    the Trainer. The run starts before any file is written: an unusable store fails here."""
    check_inputs(paths)
    t = train_p.for_cell(model_p.cell)
    check_launcher_world(t)
    rank_zero = is_global_zero()
    quiet_lightning(is_interactive())
    pl.seed_everything(t.seed, workers=True, verbose=False)
    if torch.cuda.is_available():
        torch.set_float32_matmul_precision("high")

    datamodule = CorpusDataModule(paths, t.batch_size, t.bptt, t.eval_batch_size, t.eval_bptt)
    config = RNNLMConfig.of(model_p, datamodule.vocab_size)
    check_fits_in_memory(config, t)
    module = LitRNNLM.of(config, t)
    md5 = data_md5(paths)
    fingerprint = resume.fingerprint(model_p, t, md5)
    point = resume.find_resume_point(paths.checkpoints_dir, fingerprint, t.resume, rank_zero)
    tracked = None
    if rank_zero:
        tracked = tracking_run(
            model_p, t, ml, corpus_name, md5, point, datamodule.vocab_size, extra_params
        )
    summary = EpochSummary()
    try:
        resumable = Resumable(
            datamodule, paths.checkpoints_dir, fingerprint, tracked.run_id if tracked else None
        )
        logger = RunLogger(tracked, skip_logged=point is not None) if tracked else False
        trainer, checkpoint = build_trainer(t, paths.checkpoints_dir, logger, summary, resumable)
    except BaseException as err:
        if tracked is not None:  # created a moment ago: it must not stay RUNNING forever
            tracked.mark_failed(err)
        # MisconfigurationException: e.g. train.devices: 4 with 2 GPUs; ValueError: e.g. an
        # unknown train.strategy.
        if isinstance(err, MisconfigurationException | ValueError):
            message = " ".join(str(err).split())
            raise TrainError(f"Lightning cannot train with these train params: {message}") from None
        raise
    return Session(
        t, paths, datamodule, module, trainer, checkpoint, summary, resumable, point, tracked
    )


def fit_and_test(session: Session) -> dict[str, float]:
    """Train (resuming from the session's point), then test the best checkpoint.

    Ctrl-C or SIGTERM end it with TrainingInterrupted, the run shown as KILLED until resumed.
    """
    trainer, tracked = session.trainer, session.tracked
    announce_rendezvous(session.t)
    try:
        trainer.fit(
            session.module,
            datamodule=session.datamodule,
            ckpt_path=session.point.checkpoint if session.point else None,
            weights_only=True,
        )
        best_path = session.checkpoint.best_model_path
        if not best_path:
            raise TrainError("training finished without a checkpoint (no validation epoch ran)")
        tested = trainer.test(
            session.module, datamodule=session.datamodule, ckpt_path=best_path, verbose=False
        )
        return dict(tested[0])
    except (RuntimeError, torch.distributed.DistError) as err:  # run() marks the run FAILED
        if out_of_memory(err):
            t = session.t
            raise TrainError(
                "out of memory while training (train.batch_size = "
                f"{t.batch_size}, train.bptt = {t.bptt}): make them or the model smaller "
                f"({' '.join(str(err).split())[:200]})"
            ) from None
        if not peers_timed_out(err):
            raise
        t = session.t
        raise TrainError(
            f"DDP gave up after train.ddp_timeout_s = {t.ddp_timeout_s:g} s waiting for its "
            f"peers ({t.num_nodes} node(s) x {t.devices} device(s)) at {rendezvous_address()}: "
            "start the training on every node with the same MASTER_ADDR and MASTER_PORT, and "
            f"check that the port is reachable ({' '.join(str(err).split())[:200]})"
        ) from None
    except (resume.TrainingInterrupted, SIGTERMException, Interrupted) as err:
        if tracked is not None:  # spooled if the store went away
            tracked.set_status("KILLED")
        if isinstance(err, resume.TrainingInterrupted):
            raise
        # SIGTERM outside the training loop (e.g. during the test), through Lightning's handler
        # or the one every stage has (rnnlm.entry).
        raise resume.TrainingInterrupted(
            "SIGTERM", session.resumable.checkpoint, trainer.current_epoch, trainer.global_step
        ) from None


def final_metrics(
    session: Session, tracked: tracking.TrackedRun, test_metrics: Mapping[str, float]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """train.json's numbers (the best epoch's, the test of its checkpoint, time, throughput)
    and train_run.json's record (MLflow run, accelerator)."""
    rows, trainer = session.summary.rows, session.trainer
    best_row = min(rows, key=lambda r: r["val_loss"])
    metrics = {
        "epochs": len(rows),
        "best_epoch": best_row["epoch"],
        "val_loss": round(best_row["val_loss"], 6),
        "val_ppl": round(best_row["val_ppl"], 4),
        "test_loss": round(float(test_metrics["test/loss"]), 6),
        "test_ppl": round(float(test_metrics["test/ppl"]), 4),
        "train_time_s": round(session.resumable.train_seconds(), 1),
        "tokens_per_s": round(sum(r.get("tokens_per_s", 0.0) for r in rows) / len(rows), 1),
        "devices": trainer.num_devices * trainer.num_nodes,
    }
    record = {
        "run_id": tracked.run_id,
        "experiment_id": tracked.experiment_id,
        "accelerator": type(trainer.accelerator).__name__.removesuffix("Accelerator").lower(),
    }
    return metrics, record


def finish(
    session: Session,
    tracked: tracking.TrackedRun,
    metrics: dict[str, Any],
    record: dict[str, Any],
    params_file: Path | None,
) -> None:
    """Write the outputs, log them, drop the resume checkpoints, say how it went."""
    paths = session.paths
    best = Path(session.checkpoint.best_model_path)
    write_outputs(paths, best, metrics, record, session.summary.rows)
    log_run(tracked, paths, metrics, record, params_file)
    shutil.rmtree(paths.checkpoints_dir, ignore_errors=True)
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
        metrics["train_time_s"],
        tracked.run_id,
    )


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
    """The run a resumed training continues, else a new one with every param logged.

    Once it exists a lost tracking server does not stop training: its handle spools what it
    cannot log (rnnlm.spool).
    """
    spool = Spool(unsent_dir())
    if point is not None and point.run_id:
        tracked = tracking.resume_run(ml, point.run_id, spool=spool)
        if tracked is not None:
            return tracked
    run_name = (
        os.environ.get("DVC_EXP_NAME")
        or f"{model_p.cell}-{model_p.hidden_dim}x{model_p.num_layers}"
    )
    tags = run_tags(model_p, corpus_name, md5)
    if point is not None and point.run_id:
        tags["rnnlm.resumed_from_run"] = point.run_id  # that run is not in this store
    tracked = tracking.start_run(ml, run_name, tags, spool=spool)
    try:
        tracked.log_params(
            {
                **{f"model.{k}": v for k, v in as_flat_dict(model_p).items()},
                **{f"train.{k}": v for k, v in as_flat_dict(t).items() if k != "cell_overrides"},
                "data.vocab_size": vocab_size,
                **(extra_params or {}),
            }
        )
    except BaseException as err:  # e.g. a full disk under the spool: not left RUNNING
        tracked.mark_failed(err)
        raise
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
            "headline/val_ppl": metrics["val_ppl"],
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
        # The rule that ran (`tokenize.split_by: auto` picks one per corpus).
        "tokenize.split_rule": read_split_rule(params.paths),
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--no-resume",
        action="store_true",
        help="start afresh even if an interrupted run left a checkpoint (as train.resume=false)",
    )


def main(argv: list[str] | None = None) -> None:
    stage_main(
        __doc__,
        lambda params, args: run_from_params(
            params, params_file=args.params, resume_allowed=not args.no_resume
        ),
        argv,
        add_arguments=add_arguments,
        # The other DDP processes report their problems only, not every line a second time.
        log_level=logging.INFO if is_global_zero() else logging.WARNING,
    )


if __name__ == "__main__":
    main()
