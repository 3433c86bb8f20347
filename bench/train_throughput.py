"""Training throughput: the project's Lightning path vs a plain PyTorch loop, same work.

Both train the same RNNLM (same init, data, windows, optimizer, clipping) for the same number of
steps on CPU; the first `--warmup` steps are not timed. The Lightning side is the real thing:
`LitRNNLM` + `CorpusDataModule` + the Trainer configured by `train.build_trainer` (callbacks,
checkpointing off, an MLflow logger on a temporary SQLite store, logging every 50 steps).

    python bench/train_throughput.py                      # 200/200x2 LSTM, batch 20, bptt 35
    python bench/train_throughput.py --processed data/processed --steps 300

Without --processed, a random token stream with a 7.7k vocabulary stands in for the corpus
(throughput does not depend on the token values).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint

from rnnlm import tracking, train
from rnnlm.callbacks import EpochSummary, RunLogger
from rnnlm.config import MlflowParams, Paths, TrainParams, load_params
from rnnlm.datamodule import CorpusDataModule, StreamWindows
from rnnlm.files import save_npy_atomic, write_json_atomic
from rnnlm.lit_module import LitRNNLM
from rnnlm.model import RNNLMConfig, detach_state
from rnnlm.processed import read_vocab
from rnnlm.streams import SPECIAL_TOKENS

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"  # every value not set below


def fake_processed(paths: Paths, vocab_size: int, n_tokens: int) -> Paths:
    """Random ids in `paths.processed_dir`, laid out as the tokenize stage writes them."""
    rng = np.random.default_rng(0)
    tokens = [*SPECIAL_TOKENS, *(f"w{i}" for i in range(len(SPECIAL_TOKENS), vocab_size))]
    write_json_atomic(paths.vocab, {"tokens": tokens})
    for split, n in (("train", n_tokens), ("validation", 2000), ("test", 2000)):
        save_npy_atomic(paths.split_ids(split), rng.integers(0, vocab_size, n).astype(np.int32))
    return paths


def model_config(args: argparse.Namespace, vocab_size: int) -> RNNLMConfig:
    return RNNLMConfig(
        vocab_size=vocab_size,
        cell=args.cell,
        embedding_dim=args.dim,
        hidden_dim=args.dim,
        num_layers=args.layers,
        dropout=0.2,
        embedding_dropout=0.0,
        tie_weights=args.tie,
        weight_drop=0.0,
    )


def train_params(args: argparse.Namespace) -> TrainParams:
    """params.yaml's train section with this benchmark's batch, window, optimizer and clip."""
    return dataclasses.replace(
        load_params(PARAMS).train,
        batch_size=args.batch_size,
        bptt=args.bptt,
        max_epochs=1000,
        optimizer="sgd",
        lr=args.lr,
        grad_clip=args.clip,
        accelerator="cpu",
        devices=1,
    )


def plain_loop(args: argparse.Namespace, processed: Paths, vocab_size: int) -> float:
    """Tokens/s of a hand-written loop: forward, loss, backward, clip, step."""
    torch.manual_seed(args.seed)
    module = LitRNNLM.of(model_config(args, vocab_size), train_params(args))
    net = module.net.train()
    optimizer = torch.optim.SGD(net.parameters(), lr=args.lr)
    windows = StreamWindows(np.load(processed.split_ids("train")), args.batch_size, args.bptt)
    state = net.init_state(args.batch_size)
    tokens, start = 0, 0.0
    for step in range(args.warmup + args.steps):
        if step == args.warmup:
            start, tokens = time.perf_counter(), 0
        inputs, targets = windows[step % len(windows)]
        logits, state = net(inputs, state)
        state = detach_state(state)
        loss = F.cross_entropy(logits.reshape(-1, vocab_size), targets.reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip)
        optimizer.step()
        tokens += targets.numel()
    return tokens / (time.perf_counter() - start)


class StepTimer(pl.Callback):
    """Times steps warmup..warmup+steps inside the Trainer."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.tokens = warmup, 0.0, 0

    def on_train_batch_start(self, trainer, module, batch, idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step == self.warmup:
            self.start, self.tokens = time.perf_counter(), 0

    def on_train_batch_end(self, trainer, module, outputs, batch, idx) -> None:  # type: ignore[no-untyped-def]
        if trainer.global_step > self.warmup:
            self.tokens += batch[1].numel()
            self.end = time.perf_counter()


def lightning_loop(
    args: argparse.Namespace, processed: Paths, vocab_size: int, store: Path
) -> float:
    torch.manual_seed(args.seed)
    t = train_params(args)
    module = LitRNNLM.of(model_config(args, vocab_size), t)
    datamodule = CorpusDataModule(processed, args.batch_size, args.bptt)
    tracked = tracking.start_run(
        MlflowParams(experiment_name="bench", tracking_uri=f"sqlite:///{store}/mlflow.db"),
        "train-throughput",
        {},
    )
    timer = StepTimer(args.warmup)
    trainer, _ = train.build_trainer(t, store / "ckpt", RunLogger(tracked), EpochSummary())
    # Stopping mid-epoch, there is no validation: drop the callbacks that monitor it (they only
    # act at epoch end, so the per-step path is unchanged).
    trainer.callbacks = [
        c for c in trainer.callbacks if not isinstance(c, EarlyStopping | ModelCheckpoint)
    ]
    trainer.callbacks.append(timer)
    trainer.fit_loop.epoch_loop.max_steps = args.warmup + args.steps
    trainer.limit_val_batches = 0
    trainer.fit(module, datamodule=datamodule)
    return timer.tokens / (timer.end - timer.start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processed", type=Path, help="tokenize outputs (default: random data)")
    parser.add_argument("--cell", default="lstm")
    parser.add_argument("--dim", type=int, default=200)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tie", action="store_true")
    parser.add_argument("--batch-size", type=int, default=20)
    parser.add_argument("--bptt", type=int, default=35)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--clip", type=float, default=0.25)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of each loop")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    train.quiet_lightning(interactive=False)

    with tempfile.TemporaryDirectory() as tmp:
        paths = load_params(PARAMS).paths
        if args.processed:
            processed = dataclasses.replace(paths, processed_dir=args.processed)
        else:
            processed = fake_processed(
                dataclasses.replace(paths, processed_dir=Path(tmp) / "processed"), 7751, 200_000
            )
        vocab_size = len(read_vocab(processed))
        plain, lightning = [], []
        # Alternate the two so that drift in machine load hits both alike.
        for round_ in range(args.rounds):
            plain.append(plain_loop(args, processed, vocab_size))
            lightning.append(lightning_loop(args, processed, vocab_size, Path(tmp) / f"r{round_}"))
    best_plain, best_lightning = max(plain), max(lightning)
    print(
        f"model: {args.cell} {args.dim}x{args.layers}, vocab {vocab_size}, batch "
        f"{args.batch_size}, bptt {args.bptt}, {torch.get_num_threads()} threads, "
        f"{args.steps} timed steps after {args.warmup} warm-up, best of {args.rounds}"
    )
    print(f"{'loop':<12}{'tokens/s (each round)':>36}{'best':>10}")
    print(f"{'plain':<12}{', '.join(f'{v:.0f}' for v in plain):>36}{best_plain:>10.0f}")
    print(f"{'lightning':<12}{', '.join(f'{v:.0f}' for v in lightning):>36}{best_lightning:>10.0f}")
    ratio = best_lightning / best_plain
    print(
        f"lightning / plain = {ratio:.3f} (target >= 0.95: {'met' if ratio >= 0.95 else 'MISSED'})"
    )


if __name__ == "__main__":
    main()
