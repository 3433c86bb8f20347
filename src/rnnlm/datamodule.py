"""LightningDataModule over the `tokenize` outputs (it never downloads or tokenizes).

Each split is one token stream. For language modelling it becomes (input, target) pairs with
the convention of `rnnlm.streams.lm_pairs` (inputs start with `<eos>`, every token is predicted).

Training cuts the stream into `batch_size` parallel streams (rows) and walks them in windows of
`bptt` tokens, in order: window k+1 continues where window k stopped, which is what lets the
model carry its hidden state across windows (truncated BPTT). Evaluation does the same with
`eval_batch_size` rows (1 = the whole split as one stream, state carried from start to end).
Under DDP each process takes its own rows, so the processes together cover the whole split.
Evaluation may have fewer rows than processes: the processes without a row then read as many
windows of no row at all, so that every process steps through the same number of windows.
"""

from __future__ import annotations

import logging

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from rnnlm.config import ConfigError, Paths
from rnnlm.processed import read_split, read_vocab
from rnnlm.streams import batchify, lm_pairs, shard_rows

log = logging.getLogger(__name__)


class StreamWindows(Dataset):
    """Consecutive (input, target) windows of shape (rows, <= bptt) over batchified streams."""

    def __init__(
        self, stream: np.ndarray, n_rows: int, bptt: int, rank: int = 0, world_size: int = 1
    ) -> None:
        # With fewer rows than processes the last processes own none: their windows have shape
        # (0, <= bptt) but there are as many of them, so the processes stay in step.
        inputs, targets = lm_pairs(stream)
        rows = shard_rows(n_rows, rank, world_size)
        self.inputs = torch.from_numpy(batchify(inputs, n_rows)[rows].copy())
        self.targets = torch.from_numpy(batchify(targets, n_rows)[rows].copy())
        self.bptt = bptt

    @property
    def n_tokens(self) -> int:
        return self.targets.numel()

    def __len__(self) -> int:
        return -(-self.inputs.shape[1] // self.bptt)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(index)
        window = slice(index * self.bptt, (index + 1) * self.bptt)
        return self.inputs[:, window], self.targets[:, window]


class ResumableSequentialSampler(Sampler[int]):
    """Indices 0..n-1 in order; after `skip_next(k)` the next pass starts at k.

    Its length stays n: Lightning counts an epoch's windows from it, the skipped ones included
    (they were trained before the interruption).
    """

    def __init__(self, n: int) -> None:
        self.n = n
        self._start = 0

    def skip_next(self, k: int) -> None:
        if not 0 <= k <= self.n:
            raise ValueError(f"cannot skip {k} of {self.n} windows")
        self._start = k

    def __iter__(self):
        start, self._start = self._start, 0
        return iter(range(start, self.n))

    def __len__(self) -> int:
        return self.n


class CorpusDataModule(pl.LightningDataModule):
    def __init__(
        self,
        paths: Paths,
        batch_size: int,
        bptt: int,
        eval_batch_size: int = 1,
        eval_bptt: int | None = None,
    ) -> None:
        super().__init__()
        self.paths = paths
        self.batch_size = batch_size
        self.bptt = bptt
        self.eval_batch_size = eval_batch_size
        self.eval_bptt = eval_bptt or bptt
        self.vocab = read_vocab(paths)
        self.datasets: dict[str, StreamWindows] = {}
        self._train_skip = 0

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def setup(self, stage: str | None = None) -> None:
        rank, world = (
            (self.trainer.global_rank, self.trainer.world_size) if self.trainer else (0, 1)
        )
        if "train" not in self.datasets:  # setup runs for fit and again for test
            self._check_shards(rank, world)
        for split, rows, bptt in (
            ("train", self.batch_size, self.bptt),
            ("validation", self.eval_batch_size, self.eval_bptt),
            ("test", self.eval_batch_size, self.eval_bptt),
        ):
            if split not in self.datasets:
                stream = read_split(self.paths, split, self.vocab_size)
                self.datasets[split] = StreamWindows(stream, rows, bptt, rank, world)

    def _check_shards(self, rank: int, world: int) -> None:
        if self.batch_size < world:
            # Every process must train on rows of its own (a process without one would have no
            # gradient to contribute). Evaluation has no such need: see StreamWindows.
            raise ConfigError(
                f"train.batch_size = {self.batch_size} parallel rows cannot be shared by "
                f"{world} training processes (train.devices x train.num_nodes): set "
                f"train.batch_size >= {world} or train on fewer devices"
            )
        if rank == 0 and self.batch_size % world:
            log.warning(
                "train.batch_size = %d is not a multiple of the %d processes: they train on "
                "unequal numbers of rows, and DDP averages their gradients with equal weights "
                "(the rows of smaller shards count a little more than in one process)",
                self.batch_size,
                world,
            )

    def skip_train_windows(self, k: int) -> None:
        """Start the next training pass at window k (resuming an interrupted epoch)."""
        self._train_skip = k

    def _loader(self, split: str) -> DataLoader:
        sampler = ResumableSequentialSampler(len(self.datasets[split]))
        if split == "train":
            sampler.skip_next(self._train_skip)
            self._train_skip = 0
        # batch_size=None: every item already is a (rows, bptt) batch, and order matters.
        # Its own generator: starting an epoch must not draw from the global RNG, which the
        # dropout masks use, or a resumed run would see other masks than an uninterrupted one.
        return DataLoader(
            self.datasets[split], batch_size=None, sampler=sampler, generator=torch.Generator()
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")
