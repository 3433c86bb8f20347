"""The recurrent language model as a plain `nn.Module`: no Lightning, no file I/O.

    ids (batch, time) -> embedding -> dropout -> RNN/GRU/LSTM layers -> dropout -> decoder -> logits

The decoder is one softmax over the vocabulary, or with `softmax_cutoffs` an adaptive softmax
(Grave, Joulin, Cissé, Grangier & Jégou 2017, "Efficient softmax approximation for GPUs"): the
frequency-sorted vocabulary is cut into a head (the most frequent words plus one entry per tail
cluster) and tail clusters, p(w) = p_head(cluster of w) * p_cluster(w). Training and evaluation
compute, per token, the head and only the target's cluster: on state_union ([1000, 4000]) 86% of
the training tokens never touch a tail, and a training step of the 256-unit GRU (batch 20 x 35,
two threads) took 1/1.86 of the time in a measurement on the project's 2-core VM. Every word keeps
its full-size output vector (tied to its embedding), so the exported graph computes the whole
distribution as before and returns log-probabilities in place of the logits (the same softmax).

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

import itertools
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn
from torch.func import functional_call

from rnnlm.config import Cell, ConfigError, ModelParams

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
    # Adaptive softmax cut points (see Decoder); empty: one softmax. Defaulted so that
    # checkpoints and models saved before it load as what they are.
    softmax_cutoffs: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        # Checkpoints and ONNX metadata store it as a list (or null): one canonical form.
        object.__setattr__(self, "softmax_cutoffs", tuple(self.softmax_cutoffs or ()))

    @classmethod
    def of(cls, model: ModelParams, vocab_size: int) -> RNNLMConfig:
        """The network of params.yaml's `model` section over a vocabulary of `vocab_size`."""
        cutoffs = model.softmax_cutoffs or []
        if cutoffs and cutoffs[-1] >= vocab_size:
            raise ConfigError(
                f"model.softmax_cutoffs = {cutoffs}: each cut must be below the vocabulary "
                f"size, {vocab_size} (tokenize's vocab.json); lower them or set null"
            )
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
        self.decoder = Decoder(config.hidden_dim, config.vocab_size, config.softmax_cutoffs)
        if config.tie_weights:
            # Sharing input and output embeddings halves the parameters and regularises: the
            # standard recipe for small corpora (Press & Wolf 2017; Inan et al. 2017).
            self.decoder.weight = self.embedding.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        self.decoder.reset_parameters(output_vectors=not self.config.tie_weights)
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
        return self.decoder(window.dropped), window.state

    def forward_with_hidden(self, ids: Tensor, state: State) -> tuple[Tensor, State, Tensor]:
        """`forward`, plus the top layer's output at every step (batch, time, hidden_dim).

        That output (h of the top layer, for LSTM too) is what the exported model also returns
        for the continuous cache (rnnlm.cache); it is taken before the output dropout.
        """
        window = self.window(ids, state)
        return self.decoder(window.dropped), window.state, window.hidden

    def window(self, ids: Tensor, state: State) -> Window:
        """One pass of the recurrence over a window of ids, with every intermediate that
        training and export need; the decoder's work is left to the caller (`decoder.nll`
        when only the targets' probabilities count)."""
        hidden, next_state = self.recurrent(ids, state)
        return Window(next_state, hidden, self.output_dropout(hidden))


class Window(NamedTuple):
    """What `RNNLM.window` computes for a window of ids."""

    state: State  # the state after the window's last step
    hidden: Tensor  # the top layer's outputs before the output dropout (batch, time, hidden_dim)
    dropped: Tensor  # the same after the output dropout (the decoder's input; AR's input)


class Decoder(nn.Module):
    """Top-layer outputs -> a distribution over the vocabulary: one softmax, or adaptive.

    `weight` (vocab, hidden) and `bias` hold every word's output vector and bias (the weight is
    the embedding table when tied), under the names nn.Linear uses, so checkpoints of the one-
    softmax model keep their keys. With cutoffs c_0 < ... < c_{K-1}, words [0, c_0) form the
    head, [c_{k-1}, c_k) and the last [c_{K-1}, vocab) the K tail clusters; `cluster_weight` and
    `cluster_bias` score the clusters in the head's softmax. The tokenize stage numbers words
    most frequent first, so the head holds the frequent ones (any order gives a proper
    distribution; frequency order makes it fast).
    """

    def __init__(self, hidden_dim: int, vocab_size: int, cutoffs: tuple[int, ...] = ()) -> None:
        super().__init__()
        if cutoffs and (
            cutoffs[0] < 1
            or cutoffs[-1] >= vocab_size
            or any(a >= b for a, b in itertools.pairwise(cutoffs))
        ):
            raise ValueError(
                f"softmax cutoffs {list(cutoffs)} must increase strictly within [1, {vocab_size})"
            )
        self.cutoffs = tuple(cutoffs)
        self.weight: Tensor = nn.Parameter(torch.empty(vocab_size, hidden_dim))
        self.bias = nn.Parameter(torch.empty(vocab_size))
        if self.cutoffs:
            self.cluster_weight = nn.Parameter(torch.empty(len(cutoffs), hidden_dim))
            self.cluster_bias = nn.Parameter(torch.empty(len(cutoffs)))

    @property
    def tails(self) -> list[tuple[int, int]]:
        """The [start, end) ids of each tail cluster."""
        ends = [*self.cutoffs[1:], self.weight.shape[0]]
        return list(zip(self.cutoffs, ends, strict=True))

    def reset_parameters(self, output_vectors: bool) -> None:
        """Zero biases; small random word vectors when they are the decoder's own (untied)."""
        nn.init.zeros_(self.bias)
        if output_vectors:
            nn.init.uniform_(self.weight, -0.1, 0.1)
        if self.cutoffs:
            nn.init.uniform_(self.cluster_weight, -0.1, 0.1)
            nn.init.zeros_(self.cluster_bias)

    def forward(self, x: Tensor) -> Tensor:
        """x (..., hidden) -> logits (..., vocab): the scores of the one softmax, or the
        log-probabilities of the adaptive one (softmax of either is the distribution)."""
        scores = nn.functional.linear(x, self.weight, self.bias)
        if not self.cutoffs:
            return scores
        head = self._head_log_probs(x, scores[..., : self.cutoffs[0]])
        parts = [head[..., : self.cutoffs[0]]]
        for k, (start, end) in enumerate(self.tails):
            cluster = head[..., self.cutoffs[0] + k : self.cutoffs[0] + k + 1]
            parts.append(scores[..., start:end].log_softmax(-1) + cluster)
        return torch.cat(parts, dim=-1)

    def _head_log_probs(self, x: Tensor, head_scores: Tensor) -> Tensor:
        """log p over the head: its words, then one entry per tail cluster."""
        cluster_scores = nn.functional.linear(x, self.cluster_weight, self.cluster_bias)
        return torch.cat([head_scores, cluster_scores], dim=-1).log_softmax(-1)

    def nll(self, x: Tensor, targets: Tensor) -> Tensor:
        """The summed -log p(target) of x (..., hidden) and targets (...) int64, computing
        only the head and, for each tail cluster, the rows whose target lies in it."""
        x = x.reshape(-1, x.shape[-1])
        targets = targets.reshape(-1)
        if not self.cutoffs:
            logits = nn.functional.linear(x, self.weight, self.bias)
            return nn.functional.cross_entropy(logits, targets, reduction="sum")
        head_size = self.cutoffs[0]
        # Views by split, not slicing: the backward of a slice writes its gradient into a
        # zeroed copy of the whole (vocab, hidden) table, one per slice; split's backward
        # joins the parts' gradients once (LSTM 512 training step: -6% time on the 2-core VM).
        sizes = [head_size, *(end - start for start, end in self.tails)]
        weights, biases = self.weight.split(sizes), self.bias.split(sizes)
        head_scores = nn.functional.linear(x, weights[0], biases[0])
        head = self._head_log_probs(x, head_scores)
        # 0 for a head word, k for the k-th tail cluster (1-based).
        cluster = torch.bucketize(targets, targets.new_tensor(self.cutoffs), right=True)
        head_target = torch.where(cluster == 0, targets, head_size + cluster - 1)
        total = -head.gather(1, head_target.unsqueeze(1)).sum()
        for k, (start, _) in enumerate(self.tails, start=1):
            rows = (cluster == k).nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            scores = nn.functional.linear(x[rows], weights[k], biases[k])
            total = total + nn.functional.cross_entropy(
                scores, targets[rows] - start, reduction="sum"
            )
        return total


def detach_state(state: State) -> State:
    return tuple(s.detach() for s in state)
