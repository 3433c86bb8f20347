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
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from rnnlm.config import ModelParams, TrainParams, training_values
from rnnlm.errors import RnnlmError

log = logging.getLogger(__name__)

LAST = "last.ckpt"
STATE_KEY = "rnnlm_resume"  # our part of a Lightning checkpoint
# Params that do not change what is trained: a changed value still resumes.
NOT_FINGERPRINTED = {"train.resume", "train.progress_every_s"}
HOW_TO_START_AFRESH = (
    "start afresh with train.resume=false (`dvc exp run -S train.resume=false`, or "
    "`python -m rnnlm.train --no-resume`)"
)


class ResumeError(RnnlmError):
    """A checkpoint exists but cannot be resumed from."""


class TrainingInterrupted(RnnlmError):
    """Ctrl-C or SIGTERM stopped training after a checkpoint was saved."""

    def __init__(self, signal_name: str, checkpoint: Path, epoch: int, step: int) -> None:
        super().__init__(
            f"training interrupted by {signal_name} at epoch {epoch}, step {step}; "
            f"checkpoint saved to {checkpoint}. Run `dvc repro` (or `python -m rnnlm.train`) "
            f"to resume, or {HOW_TO_START_AFRESH}."
        )
        self.signal_name = signal_name
        self.checkpoint = checkpoint
        # The shell's convention for a process ended by a signal: 128 + its number.
        self.exit_code = 128 + int(getattr(signal, signal_name, signal.SIGTERM))


def fingerprint(
    model_p: ModelParams, train_p: TrainParams, data_md5: Mapping[str, str]
) -> dict[str, str]:
    """Everything a checkpoint must have been trained with to be resumed from, as strings."""
    values = {
        **training_values(model_p, train_p),
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
    """The checkpoint a training continues from, and the MLflow run it logged to."""

    checkpoint: Path
    run_id: str | None


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
            return ResumePoint(checkpoint=last, run_id=checkpoint[STATE_KEY].get("run_id"))
    if may_delete:
        log.warning("starting afresh: %s; removing %s", reason, checkpoint_dir)
        shutil.rmtree(checkpoint_dir, ignore_errors=True)
    return None
