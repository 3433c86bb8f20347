"""The recurrent language model as a plain `nn.Module`: no Lightning, no file I/O.

    ids (batch, time) -> embedding -> dropout -> RNN/GRU/LSTM layers -> dropout -> linear -> logits

In training, `weight_drop` applies DropConnect to the hidden-to-hidden matrices (Merity et al.
2018, "Regularizing and Optimizing LSTM Language Models"): one mask per forward call, that is per
truncated-BPTT window. Evaluation and the exported graph use the plain weights.

The vanilla `rnn_tanh` cell is h_t = tanh(W h_{t-1} + U x_t + b) and the output distribution
o_t = softmax(V h_t + c); `rnn_relu`, `gru` and `lstm` swap the recurrence. The recurrent state
goes in and out of `forward` explicitly, as a tuple of tensors of shape
(num_layers, batch, hidden_dim) — one for RNN/GRU, two (h, c) for LSTM — so that training,
evaluation, ONNX export and incremental generation share this one code path.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from rnnlm.config import Cell, ModelParams

State = tuple[Tensor, ...]


@dataclass(frozen=True)
class RNNLMConfig:
    """The network's shape: params.yaml's `model` section and the vocabulary size.

    Stored as a plain dict in checkpoints (LitRNNLM's hyperparameters) and in the ONNX
    metadata; every field is required, the values come from params.yaml.
    """

    vocab_size: int
    cell: Cell
    embedding_dim: int
    hidden_dim: int
    num_layers: int
    dropout: float  # on the recurrent layers' outputs (and between layers)
    embedding_dropout: float  # on the embeddings fed to the first layer
    tie_weights: bool
    weight_drop: float  # DropConnect on the hidden-to-hidden weights, training only

    @classmethod
    def of(cls, model: ModelParams, vocab_size: int) -> RNNLMConfig:
        return cls(vocab_size=vocab_size, **asdict(model))


def state_names(cell: Cell) -> tuple[str, ...]:
    """Names of the recurrent state tensors, as the ONNX model's inputs/outputs use them."""
    return ("h", "c") if cell == "lstm" else ("h",)


class LockedDropout(nn.Module):
    """Variational dropout: one mask per sequence, shared by every time step.

    Dropping the same units at every step regularises recurrent models better than a fresh
    mask per step (Gal & Ghahramani 2016; Merity et al. 2018). Identity in eval mode, so the
    exported graph has no dropout at all.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:  # x: (batch, time, features)
        if not self.training or self.p == 0.0:
            return x
        mask = x.new_empty(x.shape[0], 1, x.shape[2]).bernoulli_(1.0 - self.p) / (1.0 - self.p)
        return x * mask


class RNNLM(nn.Module):
    def __init__(self, config: RNNLMConfig) -> None:
        super().__init__()
        if config.tie_weights and config.embedding_dim != config.hidden_dim:
            raise ValueError(
                f"tie_weights needs embedding_dim == hidden_dim "
                f"(got {config.embedding_dim} and {config.hidden_dim})"
            )
        self.config = config
        self.embedding = nn.Embedding(config.vocab_size, config.embedding_dim)
        self.embedding_dropout = LockedDropout(config.embedding_dropout)
        rnn_kwargs = {
            "input_size": config.embedding_dim,
            "hidden_size": config.hidden_dim,
            "num_layers": config.num_layers,
            "dropout": config.dropout if config.num_layers > 1 else 0.0,
            "batch_first": True,
        }
        if config.cell == "lstm":
            self.rnn: nn.RNNBase = nn.LSTM(**rnn_kwargs)
        elif config.cell == "gru":
            self.rnn = nn.GRU(**rnn_kwargs)
        else:
            self.rnn = nn.RNN(nonlinearity=config.cell.removeprefix("rnn_"), **rnn_kwargs)
        self.output_dropout = LockedDropout(config.dropout)
        self.decoder = nn.Linear(config.hidden_dim, config.vocab_size)
        if config.tie_weights:
            # Sharing input and output embeddings halves the parameters and regularises: the
            # standard recipe for small corpora (Press & Wolf 2017; Inan et al. 2017).
            self.decoder.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.decoder.bias)
        if not self.config.tie_weights:
            nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        for name, param in self.rnn.named_parameters():
            if name.startswith("weight_hh"):
                # Orthogonal recurrent weights keep the vanilla RNN's gradients from exploding
                # or vanishing early in training.
                for gate in param.data.chunk(param.shape[0] // self.config.hidden_dim):
                    nn.init.orthogonal_(gate)
            elif name.startswith("weight_ih"):
                nn.init.xavier_uniform_(param)
            else:
                nn.init.zeros_(param)
        if self.config.cell == "lstm":
            # Forget-gate bias 1: remember by default at the start of training.
            for name, param in self.rnn.named_parameters():
                if name.startswith("bias_ih"):
                    param.data[self.config.hidden_dim : 2 * self.config.hidden_dim] = 1.0

    def init_state(self, batch_size: int, device: torch.device | None = None) -> State:
        """A zero state for `batch_size` streams."""
        shape = (self.config.num_layers, batch_size, self.config.hidden_dim)
        device = device or self.embedding.weight.device
        return tuple(torch.zeros(shape, device=device) for _ in state_names(self.config.cell))

    def _dropped_recurrent_weights(self) -> dict[str, Tensor]:
        """The hidden-to-hidden matrices with DropConnect applied: a fresh mask per call."""
        p = self.config.weight_drop
        return {
            name: nn.functional.dropout(weight, p, training=True)
            for name, weight in self.rnn.named_parameters()
            if name.startswith("weight_hh")
        }

    def recurrent(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        """ids (batch, time), state -> the top layer's outputs (batch, time, hidden_dim) before
        the output dropout, and the next state."""
        x = self.embedding_dropout(self.embedding(ids))  # (batch, time, embedding_dim)
        rnn_state = state if self.config.cell == "lstm" else state[0]
        if self.training and self.config.weight_drop > 0.0:
            # The dropped matrices replace the parameters for this call only; gradients flow
            # back to the plain weights through the mask.
            weights = self._dropped_recurrent_weights()
            out, next_state = functional_call(self.rnn, weights, (x, rnn_state), strict=False)
        else:
            out, next_state = self.rnn(x, rnn_state)
        if not isinstance(next_state, tuple):
            next_state = (next_state,)
        return out, next_state

    def forward(self, ids: Tensor, state: State) -> tuple[Tensor, State]:
        """ids (batch, time) int64, state -> logits (batch, time, vocab), next state."""
        window = self.window(ids, state)
        return window.logits, window.state

    def forward_with_hidden(self, ids: Tensor, state: State) -> tuple[Tensor, State, Tensor]:
        """`forward`, plus the top layer's output at every step (batch, time, hidden_dim).

        That output (h of the top layer, for LSTM too) is what the exported model also returns
        for the continuous cache (rnnlm.cache); it is taken before the output dropout.
        """
        window = self.window(ids, state)
        return window.logits, window.state, window.hidden

    def window(self, ids: Tensor, state: State) -> Window:
        """One pass over a window of ids, with every intermediate training and export need."""
        hidden, next_state = self.recurrent(ids, state)
        dropped = self.output_dropout(hidden)
        return Window(self.decoder(dropped), next_state, hidden, dropped)


class Window(NamedTuple):
    """What `RNNLM.window` computes for a window of ids."""

    logits: Tensor  # (batch, time, vocab)
    state: State  # the state after the window's last step
    hidden: Tensor  # the top layer's outputs before the output dropout (batch, time, hidden_dim)
    dropped: Tensor  # the same after the output dropout (what the decoder saw; AR's input)


def detach_state(state: State) -> State:
    return tuple(s.detach() for s in state)
