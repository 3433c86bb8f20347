"""What Lightning calls back during training: callbacks and the MLflow logger of our run.

    EpochSummary   per-epoch loss, time and throughput; the rows of the training curve
    ProgressLog    a progress line every few seconds when there is no terminal
    Resumable      what an exact resume needs (position, hidden state, RNG), and Ctrl-C/SIGTERM
                   turned into a checkpoint
    RunLogger      Lightning's MLFlowLogger bound to the run train created, spooling when the
                   store goes away

They reach the datamodule and the LightningModule through the small Protocols below, not
through their concrete classes.
"""

from __future__ import annotations

import logging
import math
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol, cast

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import MLFlowLogger
from pytorch_lightning.trainer.states import TrainerFn

from rnnlm import tracking
from rnnlm.errors import format_duration
from rnnlm.model import State
from rnnlm.resume import LAST, STATE_KEY, TrainingInterrupted

log = logging.getLogger(__name__)


class SkipsTrainWindows(Protocol):
    """A datamodule that can start the next training pass at window k (a resumed epoch)."""

    def skip_train_windows(self, k: int) -> None: ...


class CarriesTrainState(Protocol):
    """A LightningModule that carries a hidden state from one training window to the next."""

    @property
    def train_state(self) -> State | None: ...

    def resume_train_state(self, state: State) -> None: ...


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

    def __init__(self, every_s: float, clock: Callable[[], float] = time.monotonic) -> None:
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
            "epoch %d: step %d/%s (%.0f%%), %s tokens/s, loss %.3f, epoch ETA %s",
            trainer.current_epoch,
            done,
            total,
            100.0 * done / total if isinstance(total, int) and total else math.nan,
            f"{self._tokens / elapsed:,.0f}",
            float(outputs["loss"]),
            format_duration(eta),
        )


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Resumable(pl.Callback):
    """Saves what an exact resume needs, restores it, and turns Ctrl-C/SIGTERM into a checkpoint.

    On the first Ctrl-C or SIGTERM, training finishes the step in progress, saves `last.ckpt`
    and raises TrainingInterrupted; a second one stops at once. Position, hidden state and RNG
    are restored exactly in a single process; under DDP each process restarts the interrupted
    epoch's remaining windows from a zero hidden state (rank 0's checkpoint only has its own).

    Must come after the other callbacks, so that a checkpoint saved at a step's end includes
    their work for that step.
    """

    def __init__(
        self,
        datamodule: SkipsTrainWindows,
        checkpoint_dir: Path,
        fingerprint: Mapping[str, str],
        run_id: str | None,
    ) -> None:
        self.datamodule = datamodule
        self.checkpoint = checkpoint_dir / LAST
        self.fingerprint = dict(fingerprint)
        self.run_id = run_id
        self.windows_done = 0  # training windows finished in the current epoch (this process)
        self.stop_signal: str | None = None
        self._stop_agreed = False
        self._saved_after_stop = False
        self._pending_rng: Mapping[str, Any] | None = None
        self._previous_handlers: dict[int, Any] = {}
        self._elapsed_before = 0.0  # training seconds of earlier, interrupted segments
        self._segment_start: float | None = None

    # -- time ------------------------------------------------------------------------------
    def train_seconds(self) -> float:
        """Training wall time over every segment of this run (resumes included)."""
        running = time.perf_counter() - self._segment_start if self._segment_start else 0.0
        return self._elapsed_before + running

    # -- signals ---------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.stop_signal is not None:  # asked twice: stop now, without a new checkpoint
            raise KeyboardInterrupt
        self.stop_signal = name
        log.warning(
            "%s received: finishing the current step and saving a checkpoint "
            "(send it again to stop at once)",
            name,
        )

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._segment_start = time.perf_counter()
        # Replaces Lightning's own SIGTERM handler for the training loop: that one stops
        # without saving, and at a point a resume cannot continue from exactly.
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous_handlers[signum] = signal.signal(signum, self._on_signal)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers = {}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()
        # Stop the clock: testing the best checkpoint afterwards is not training time.
        self._elapsed_before, self._segment_start = self.train_seconds(), None

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._restore_handlers()

    # -- the training loop -----------------------------------------------------------------
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not called for an epoch continued after a resume (its count comes from the checkpoint).
        self.windows_done = 0

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, idx: int
    ) -> None:
        if self._pending_rng is not None:
            # Restored here, right before the first step, so that nothing between loading the
            # checkpoint and this step draws from the generators.
            _set_rng_state(self._pending_rng)
            self._pending_rng = None
        if self._stop_agreed and self._saved_after_stop:
            raise TrainingInterrupted(
                self.stop_signal or "SIGTERM",
                self.checkpoint,
                trainer.current_epoch,
                trainer.global_step,
            )

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        idx: int,
    ) -> None:
        self.windows_done += 1
        stop = self.stop_signal is not None
        if trainer.world_size > 1:  # every process must stop at the same step
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        self._stop_agreed = stop
        if stop and self.windows_done < trainer.num_training_batches:
            # The last window of an epoch is checkpointed after validation (ModelCheckpoint).
            trainer.save_checkpoint(self.checkpoint)

    # -- checkpoint contents -----------------------------------------------------------------
    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._stop_agreed:
            self._saved_after_stop = True
        mid_epoch = 0 < self.windows_done < trainer.num_training_batches
        train_state = cast(CarriesTrainState, pl_module).train_state if mid_epoch else None
        checkpoint[STATE_KEY] = {
            "fingerprint": self.fingerprint,
            "run_id": self.run_id,
            "mid_epoch_windows": self.windows_done if mid_epoch else 0,
            "train_state": [t.detach().cpu() for t in train_state] if train_state else None,
            "rng": _rng_state(),
            "train_seconds": self.train_seconds(),
        }

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        state = checkpoint.get(STATE_KEY)
        # Testing the best checkpoint after training loads it too: that is no resume (its
        # training time would count twice).
        if state is None or trainer.state.fn != TrainerFn.FITTING:
            return
        self._elapsed_before = float(state.get("train_seconds", 0.0))
        windows = int(state.get("mid_epoch_windows", 0))
        if windows:
            self.datamodule.skip_train_windows(windows)
            self.windows_done = windows
            if trainer.world_size == 1 and state.get("train_state"):
                cast(CarriesTrainState, pl_module).resume_train_state(tuple(state["train_state"]))
        if trainer.world_size == 1:
            self._pending_rng = state["rng"]
        log.info(
            "resuming from %s: epoch %d, step %d%s",
            self.checkpoint,
            checkpoint.get("epoch", 0),
            checkpoint.get("global_step", 0),
            f", {windows} windows into the epoch" if windows else "",
        )


class RunLogger(MLFlowLogger):
    """Lightning's MLflow logger bound to our run (per-step and per-epoch metrics).

    `skip_logged` (a resumed run): values at steps the run already has are dropped, so a
    segment replayed after a SIGKILL does not log its metrics twice. When the store is lost,
    logging goes through the run's handle (which spools it), so training never stops for it.
    """

    def __init__(self, tracked: tracking.TrackedRun, skip_logged: bool = False) -> None:
        super().__init__(tracking_uri=tracked.uri, run_id=tracked.run_id, log_model=False)
        self.tracked = tracked
        self.logged_until = tracked.last_logged_steps() if skip_logged else {}

    @property
    def experiment(self) -> Any:  # an MlflowClient
        if self._initialized:
            return self._mlflow_client
        # Lightning calls mlflow.set_tracking_uri here: keep it from leaking.
        with tracking.fluent_tracking_uri(self._tracking_uri):
            return MLFlowLogger.experiment.fget(self)  # type: ignore[attr-defined]

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if step is not None:
            metrics = {k: v for k, v in metrics.items() if step > self.logged_until.get(k, -1)}
        if not metrics:
            return
        if self.tracked.offline_error is None:
            try:
                super().log_metrics(metrics, step)
                return
            except Exception as err:
                self.tracked.go_offline(err)
        self.tracked.log_metrics(metrics, step or 0)  # offline now: spooled

    def finalize(self, status: str = "success") -> None:
        if self.tracked.offline_error is None:
            try:
                super().finalize(status)
                return
            except Exception as err:
                self.tracked.go_offline(err)
        states = {"success": "FINISHED", "failed": "FAILED", "finished": "FINISHED"}
        self.tracked.set_status(states.get(status, status.upper()))
