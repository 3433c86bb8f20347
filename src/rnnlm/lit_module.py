"""LightningModule around `RNNLM`: loss, truncated BPTT, evaluation, optimizer and schedule.

Logged keys: `train/loss` (the cross-entropy) and `train/lr` per step, `train/ar` and
`train/tar` per step when those regularisers are on; `val/loss`, `val/ppl` per epoch; `test/loss`,
`test/ppl` after training (epoch time and throughput come from callbacks.EpochSummary).

With `ema_decay` set, `average` holds an exponential moving average of `net`'s weights, updated
after every optimizer step; validation and test run it, and it is what a checkpoint's consumers
(export) take. Both live in the checkpoint, so a resumed run continues the same average.
Evaluation perplexity is exp(total NLL / total tokens) over the whole split (summed across
processes under DDP, so it is the same number on one device or many: each evaluation row is
read by exactly one process), not a mean of per-window perplexities. It never touches MLflow or
paths.
"""

from __future__ import annotations

import copy
from dataclasses import asdict
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.utilities.types import OptimizerLRSchedulerConfig
from torch import Tensor

from rnnlm.config import TrainParams
from rnnlm.model import RNNLM, RNNLMConfig, State, detach_state

# Devices with torch's fused Adam/AdamW kernels (the ones this project trains on).
FUSED_ADAM_DEVICES = frozenset({"cpu", "cuda", "mps"})


class LitRNNLM(pl.LightningModule):
    average_steps: Tensor  # a buffer, registered when averaging

    def __init__(
        self,
        model: dict[str, Any],
        optimizer: str,
        lr: float,
        weight_decay: float,
        lr_schedule: str,
        lr_factor: float,
        lr_patience: int,
        lr_threshold: float,
        min_lr: float,
        ar_alpha: float,
        tar_beta: float,
        ema_decay: float | None,
    ) -> None:
        super().__init__()
        # Plain dicts and numbers only, so checkpoints load with torch.load(weights_only=True).
        self.save_hyperparameters(logger=False)
        self.net = RNNLM(RNNLMConfig(**model))
        self.average: RNNLM | None = None
        if ema_decay is not None:
            self.average = copy.deepcopy(self.net).requires_grad_(False)
            # Optimizer steps averaged so far: drives the decay's warm-up, resumes exactly.
            self.register_buffer("average_steps", torch.zeros((), dtype=torch.int64))
        self._steps_averaged: int | None = None
        self._state: dict[str, State | None] = {"train": None, "val": None, "test": None}
        self._nll_sum: dict[str, Tensor] = {}
        self._token_count: dict[str, Tensor] = {}

    @classmethod
    def of(cls, config: RNNLMConfig, t: TrainParams) -> LitRNNLM:
        """The module for network `config`, optimised as the `train` params say."""
        return cls(
            model=asdict(config),
            optimizer=t.optimizer,
            lr=t.lr,
            weight_decay=t.weight_decay,
            lr_schedule=t.lr_schedule,
            lr_factor=t.lr_factor,
            lr_patience=t.lr_patience,
            lr_threshold=t.lr_threshold,
            min_lr=t.min_lr,
            ar_alpha=t.ar_alpha,
            tar_beta=t.tar_beta,
            ema_decay=t.ema_decay,
        )

    def forward(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        return self.net(ids, state)

    @property
    def eval_net(self) -> RNNLM:
        """The weights validation, test and export use: the average when there is one."""
        return self.average if self.average is not None else self.net

    def _step(self, split: str, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, int, Tensor, Tensor]:
        """Run one window, carrying the state of `split` from the previous window.

        Returns the summed NLL, the token count, and the top layer's outputs before and after
        the output dropout (for AR/TAR)."""
        inputs, targets = batch
        net = self.net if split == "train" else self.eval_net
        state = self._state[split]
        if state is None:
            state = net.init_state(inputs.shape[0], inputs.device)
        window = net.window(inputs, state)
        # Truncated BPTT: keep the state's values for the next window but cut the graph, so
        # gradients flow back at most one window while the context keeps growing.
        self._state[split] = detach_state(window.state)
        nll = net.decoder.nll(window.dropped, targets)
        return nll, targets.numel(), window.hidden, window.dropped

    @property
    def train_state(self) -> State | None:
        """The hidden state carried from the last training window to the next one."""
        return self._state["train"]

    def resume_train_state(self, state: State) -> None:
        """Continue an interrupted epoch from `state` (Lightning does not rerun the epoch start)."""
        self._state["train"] = tuple(t.to(self.device) for t in state)

    def on_train_epoch_start(self) -> None:
        self._state["train"] = None  # each epoch starts from a zero state

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        nll, n_tokens, hidden, dropped = self._step("train", batch)
        loss = nll / n_tokens
        self.log("train/loss", loss, on_step=True, on_epoch=False, prog_bar=True)
        ar_alpha, tar_beta = self.hparams["ar_alpha"], self.hparams["tar_beta"]
        objective = loss
        if ar_alpha > 0.0:
            ar = activation_penalty(dropped)
            self.log("train/ar", ar, on_step=True, on_epoch=False)
            objective = objective + ar_alpha * ar
        if tar_beta > 0.0:
            tar = temporal_activation_penalty(hidden)
            self.log("train/tar", tar, on_step=True, on_epoch=False)
            objective = objective + tar_beta * tar
        return objective

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.average is not None:
            self._update_average()
        # The learning rate is logged only on the steps the logger writes, to keep steps cheap.
        every = self.trainer.log_every_n_steps  # type: ignore[attr-defined]  # set at runtime
        if self.global_step % every == 0:
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            self.log("train/lr", lr, on_step=True, on_epoch=False)

    @torch.no_grad()
    def _update_average(self) -> None:
        assert self.average is not None  # called only when averaging
        if self._steps_averaged is None:  # read the buffer once (no device sync per step)
            self._steps_averaged = int(self.average_steps.item())
        n = self._steps_averaged
        # Warm-up: early averages follow the weights closely instead of remembering the random
        # initialisation for thousands of steps.
        decay = min(self.hparams["ema_decay"], (1.0 + n) / (10.0 + n))
        # parameters() yields a tied weight once, in the same order for both copies.
        averaged: list[Tensor] = list(self.average.parameters())
        torch._foreach_lerp_(averaged, [p.detach() for p in self.net.parameters()], 1.0 - decay)
        self._steps_averaged = n + 1
        self.average_steps.fill_(n + 1)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._steps_averaged = None  # the loaded buffer is the count to continue from

    def _start_eval(self, split: str) -> None:
        self._state[split] = None  # each evaluation pass starts from a zero state
        self._nll_sum[split] = torch.zeros((), dtype=torch.float64, device=self.device)
        self._token_count[split] = torch.zeros((), dtype=torch.float64, device=self.device)

    def _eval_step(self, split: str, batch: tuple[Tensor, Tensor]) -> None:
        if batch[1].shape[0] == 0:
            # Under DDP with fewer evaluation rows than processes, the processes without a row
            # step through empty windows alongside the others and add nothing to the sums.
            return
        nll, n_tokens, _, _ = self._step(split, batch)
        self._nll_sum[split] += nll.double()
        self._token_count[split] += n_tokens

    def _end_eval(self, split: str) -> None:
        nll = self.trainer.strategy.reduce(self._nll_sum[split], reduce_op="sum")
        count = self.trainer.strategy.reduce(self._token_count[split], reduce_op="sum")
        loss = (nll / count).float()
        # Values are already reduced over processes, so no sync_dist here.
        self.log(f"{split}/loss", loss, prog_bar=split == "val")
        self.log(f"{split}/ppl", torch.exp(loss), prog_bar=split == "val")

    def on_validation_epoch_start(self) -> None:
        self._start_eval("val")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step("val", batch)

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step("test", batch)

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def configure_optimizers(self) -> OptimizerLRSchedulerConfig:
        hp = self.hparams
        params = list(self.net.parameters())  # not the average: it follows, it is not trained
        kinds = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        options: dict[str, Any] = {"lr": hp["lr"], "weight_decay": hp["weight_decay"]}
        if hp["optimizer"] != "sgd" and all(p.device.type in FUSED_ADAM_DEVICES for p in params):
            # One fused kernel per step instead of a chain of foreach ops over the parameters
            # (LSTM 512 training step on the 2-core VM: -3% time). Same update, other rounding.
            options["fused"] = True
        optimizer: torch.optim.Optimizer = kinds[hp["optimizer"]](params, **options)
        if hp["lr_schedule"] == "cosine":
            # Over the whole budget (max_epochs; Lightning counts the steps of every device).
            total_steps = max(1, int(self.trainer.estimated_stepping_batches))
            cosine = torch.optim.lr_scheduler.CosineAnnealingLR(
                optimizer, T_max=total_steps, eta_min=hp["min_lr"]
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": cosine, "interval": "step"},
            }
        plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode="min",
            factor=hp["lr_factor"],
            patience=hp["lr_patience"],
            threshold=hp["lr_threshold"],
            threshold_mode="rel",
            min_lr=hp["min_lr"],
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": plateau, "monitor": "val/loss", "interval": "epoch"},
        }


def activation_penalty(dropped: Tensor) -> Tensor:
    """AR: the mean square of the top layer's (dropped) outputs; keeps activations small."""
    return dropped.pow(2).mean()


def temporal_activation_penalty(hidden: Tensor) -> Tensor:
    """TAR: the mean square of the step h_t - h_{t-1} of the undropped outputs (batch, time,
    features); favours slowly changing states. Zero for a one-step window."""
    if hidden.shape[1] < 2:
        return hidden.new_zeros(())
    return (hidden[:, 1:] - hidden[:, :-1]).pow(2).mean()
