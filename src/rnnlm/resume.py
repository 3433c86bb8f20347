"""Interrupted trainings resume exactly where they stopped.

`<models_dir>/checkpoints/last.ckpt` is written at the end of every epoch (Lightning's
ModelCheckpoint) and, on Ctrl-C or SIGTERM, right after the training step in progress; a SIGKILL
loses at most the epoch in progress. Besides Lightning's own state (weights, optimizer, schedule,
loop counters, callbacks) a checkpoint carries what an exact continuation also needs: the
position inside the epoch, the hidden state carried across windows, the RNG state (dropout
masks), the MLflow run id, and a fingerprint of everything that shapes the training (model and
train params, the processed data's MD5s). A resume happens only into a checkpoint whose
fingerprint matches; anything else starts afresh.
"""

from __future__ import annotations

import logging
import shutil
import signal
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.trainer.states import TrainerFn

from rnnlm.config import ModelParams, TrainParams, as_flat_dict

log = logging.getLogger(__name__)

LAST = "last.ckpt"
STATE_KEY = "rnnlm_resume"  # our part of a Lightning checkpoint
# Params that do not change what is trained: a changed value still resumes.
NOT_FINGERPRINTED = {"train.resume", "train.progress_every_s"}
HOW_TO_START_AFRESH = (
    "start afresh with train.resume=false (`dvc exp run -S train.resume=false`, or "
    "`python -m rnnlm.train --no-resume`)"
)


class ResumeError(RuntimeError):
    """A checkpoint exists but cannot be resumed from."""


class TrainingInterrupted(Exception):
    """Ctrl-C or SIGTERM stopped training after a checkpoint was saved."""

    def __init__(self, signal_name: str, checkpoint: Path, epoch: int, step: int) -> None:
        super().__init__(
            f"training interrupted by {signal_name} at epoch {epoch}, step {step}; "
            f"checkpoint saved to {checkpoint}. Run `dvc repro` (or `python -m rnnlm.train`) "
            f"to resume, or {HOW_TO_START_AFRESH}."
        )
        self.signal_name = signal_name
        self.checkpoint = checkpoint

    @property
    def exit_code(self) -> int:
        """The shell's convention for a process ended by a signal: 128 + its number."""
        return 128 + int(getattr(signal, self.signal_name, signal.SIGTERM))


def fingerprint(
    model_p: ModelParams, train_p: TrainParams, data_md5: Mapping[str, str]
) -> dict[str, str]:
    """Everything a checkpoint must have been trained with to be resumed from, as strings."""
    values = {
        **{f"model.{k}": v for k, v in as_flat_dict(model_p).items()},
        **{f"train.{k}": v for k, v in as_flat_dict(train_p).items()},
        **{f"data.md5.{name}": md5 for name, md5 in data_md5.items()},
    }
    return {k: repr(v) for k, v in sorted(values.items()) if k not in NOT_FINGERPRINTED}


def describe_changes(saved: Mapping[str, str], current: Mapping[str, str], limit: int = 4) -> str:
    changed = [
        f"{key}: {saved.get(key, '(absent)')} -> {current.get(key, '(absent)')}"
        for key in sorted(set(saved) | set(current))
        if saved.get(key) != current.get(key)
    ]
    more = f", and {len(changed) - limit} more" if len(changed) > limit else ""
    return ", ".join(changed[:limit]) + more


@dataclass(frozen=True)
class ResumePoint:
    checkpoint: Path
    run_id: str | None
    epoch: int
    global_step: int


def read_checkpoint(path: Path) -> dict[str, Any]:
    """A Lightning checkpoint, loaded without unpickling arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise ResumeError(
            f"cannot resume from {path}: the checkpoint is truncated or corrupt "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no detail'}). "
            f"Delete {path.parent} or {HOW_TO_START_AFRESH}."
        ) from None


def find_resume_point(
    checkpoint_dir: Path, expected: Mapping[str, str], resume: bool, may_delete: bool = True
) -> ResumePoint | None:
    """The checkpoint to continue from, or None to start afresh (stale checkpoints removed).

    Raises ResumeError for an unreadable checkpoint: its training may be days of work, so it is
    deleted only when the user asks (train.resume=false).
    """
    if not checkpoint_dir.exists():
        return None
    last = checkpoint_dir / LAST
    if not resume:
        reason = "train.resume is false"
    elif not last.is_file():
        reason = f"no {LAST} (training never finished an epoch)"
    else:
        checkpoint = read_checkpoint(last)
        saved = (checkpoint.get(STATE_KEY) or {}).get("fingerprint")
        if saved is None:
            reason = f"{last} was not written by this version of rnnlm"
        elif dict(saved) != dict(expected):
            changes = describe_changes(saved, expected)
            reason = f"{last} was trained with other params or data ({changes})"
        else:
            return ResumePoint(
                checkpoint=last,
                run_id=checkpoint[STATE_KEY].get("run_id"),
                epoch=int(checkpoint.get("epoch", 0)),
                global_step=int(checkpoint.get("global_step", 0)),
            )
    if may_delete:
        log.warning("starting afresh: %s; removing %s", reason, checkpoint_dir)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return None


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
        datamodule: Any,
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
        train_state = getattr(pl_module, "train_state", None) if mid_epoch else None
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
                pl_module.resume_train_state(tuple(state["train_state"]))
        if trainer.world_size == 1:
            self._pending_rng = state["rng"]
        log.info(
            "resuming from %s: epoch %d, step %d%s",
            self.checkpoint,
            checkpoint.get("epoch", 0),
            checkpoint.get("global_step", 0),
            f", {windows} windows into the epoch" if windows else "",
        )
