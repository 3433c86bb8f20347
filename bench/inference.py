"""Benchmark: the project's onnxruntime inference path vs torch eager on CPU, fp32 vs int8.

    python bench/inference.py                       # random-init LSTM 200/200x2, 7.7k vocab
    python bench/inference.py --checkpoint models/model.ckpt --processed data/processed

Measures, in one run on the same network:
  - per-token latency of single-stream generation (sampling at temperature 1, state carried):
    `LanguageModel.generate` (fp32 and int8 ONNX) vs a torch eager loop doing the same work
    (forward one token, softmax, multinomial), with 1 thread and with all cores;
  - batch scoring throughput (tokens/s) on 32 x 64 tokens: forward + per-token NLL;
  - bare onnxruntime session loops (argmax, no tokenizer or sampling): the API's overhead;
  - with --checkpoint: validation perplexity fp32 vs int8.
Prints a table and the ratios against the targets (ONNX >= 6x torch eager per token, int8 >=
1.7x fp32, int8 validation perplexity within 0.5%). Each figure is the best of --repeats
rounds, rounds interleaved so that background load hits every contender alike. Not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from nltk.tokenize.punkt import PunktParameters

from rnnlm import export
from rnnlm.inference import LanguageModel, session_options, token_nll
from rnnlm.model import RNNLM, RNNLMConfig
from rnnlm.streams import EOS, EOS_ID, UNK
from rnnlm.text import TextTokenizer

GEN_TARGET, INT8_TARGET, PPL_TOLERANCE_PCT = 6.0, 1.7, 0.5


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="a trained models/model.ckpt")
    parser.add_argument("--processed", type=Path, default=Path("data/processed"))
    parser.add_argument("--vocab-size", type=int, default=7700, help="random model only")
    parser.add_argument("--hidden", type=int, default=200, help="random model only")
    parser.add_argument("--layers", type=int, default=2, help="random model only")
    parser.add_argument("--cell", default="lstm", help="random model only")
    parser.add_argument("--tokens", type=int, default=300, help="generated tokens per round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds; the best one counts")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def default_threads() -> int:
    """All cores this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def build_model(args: argparse.Namespace) -> tuple[RNNLM, list[str], dict, str]:
    """The network, its vocabulary and tokenizer dict, and a description."""
    if args.checkpoint:
        net = export.load_checkpoint(args.checkpoint)
        vocab = json.loads((args.processed / "vocab.json").read_text())["tokens"]
        tokenizer = json.loads((args.processed / "tokenizer.json").read_text())
        kind = f"trained ({args.checkpoint})"
    else:
        torch.manual_seed(0)
        config = RNNLMConfig(
            vocab_size=args.vocab_size,
            cell=args.cell,
            embedding_dim=args.hidden,
            hidden_dim=args.hidden,
            num_layers=args.layers,
            dropout=0.0,  # inference: dropout is off anyway
            embedding_dropout=0.0,
            tie_weights=True,
            weight_drop=0.0,
        )
        net = RNNLM(config).eval()
        vocab = [UNK, EOS, *(f"w{i}" for i in range(2, args.vocab_size))]
        tokenizer = TextTokenizer(punkt=PunktParameters()).to_dict()
        kind = "random init"
    c = net.config
    return net.eval(), vocab, tokenizer, f"{c.cell} {c.hidden_dim}x{c.num_layers}, {kind}"


def write_models(net: RNNLM, vocab: list[str], tokenizer: dict, folder: Path) -> dict[str, Path]:
    """fp32 and int8 ONNX models, written and checked exactly as the export stage does."""
    fp32, int8 = export.write_onnx_models(net, folder, vocab, tokenizer, {"source": "bench"})
    export.verify_parity(net, fp32, atol=1e-4)
    return {"fp32": fp32, "int8": int8}


def torch_generate(net: RNNLM, n_tokens: int, seed: int = 0) -> None:
    """Eager single-stream sampling: what LanguageModel.generate does, in torch."""
    generator = torch.Generator().manual_seed(seed)
    with torch.inference_mode():
        state = net.init_state(1)
        token = torch.full((1, 1), EOS_ID, dtype=torch.long)
        for _ in range(n_tokens):
            logits, state = net(token, state)
            probs = torch.softmax(logits[:, -1].double(), dim=-1)
            token = torch.multinomial(probs, 1, generator=generator)


def torch_score(net: RNNLM, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        logits, _ = net(ids[:, :-1], net.init_state(ids.shape[0]))
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"
        )
    return float(nll)


def onnx_score(model: LanguageModel, ids: np.ndarray) -> float:
    logits, _ = model.step(ids[:, :-1])
    return float(token_nll(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).sum())


def bare_session_loop(path: Path, threads: int, n_tokens: int) -> Callable[[], None]:
    """A session fed one token per call, argmax, no tokenizer or sampling: the floor."""
    session = ort.InferenceSession(
        str(path), session_options(threads), providers=["CPUExecutionProvider"]
    )
    names = [i.name for i in session.get_inputs()]
    shape = [i.shape for i in session.get_inputs()][1]

    def loop() -> None:
        feeds = {n: np.zeros((shape[0], 1, shape[2]), np.float32) for n in names[1:]}
        token = np.array([[EOS_ID]], dtype=np.int64)
        for _ in range(n_tokens):
            logits, *state = session.run(None, {names[0]: token, **feeds})
            feeds = dict(zip(names[1:], state, strict=True))
            token = logits[:, -1].argmax(-1)[:, None]

    return loop


def best_seconds(fn: Callable[[], object], results: list[float]) -> None:
    start = time.perf_counter()
    fn()
    results.append(time.perf_counter() - start)


def measure(args: argparse.Namespace, net: RNNLM, paths: dict[str, Path]) -> dict[str, dict]:
    """name -> {threads -> {"ms_per_token", "tokens_per_s"}}."""
    rng = np.random.default_rng(0)
    ids = rng.integers(2, net.config.vocab_size, size=(args.batch, args.length + 1))
    score_tokens = args.batch * args.length
    figures: dict[str, dict] = {}
    for threads in sorted({1, default_threads()}):
        torch.set_num_threads(threads)
        models = {name: LanguageModel(path, threads=threads) for name, path in paths.items()}
        contenders: dict[str, tuple[Callable[[], object], Callable[[], object] | None]] = {
            "torch eager": (
                lambda: torch_generate(net, args.tokens),
                lambda: torch_score(net, torch.from_numpy(ids)),
            ),
        }
        for name, path in paths.items():
            contenders[f"onnxruntime {name} (bare session)"] = (
                bare_session_loop(path, threads, args.tokens),
                None,
            )
        for name, model in models.items():
            contenders[f"rnnlm.inference {name}"] = (
                lambda m=model: m.generate("", max_tokens=args.tokens, seed=0),
                lambda m=model: onnx_score(m, ids),
            )
        timings = {name: ([], []) for name in contenders}
        for gen, score in contenders.values():  # warm-up
            gen()
            if score:
                score()
        for _ in range(args.repeats):
            for name, (gen, score) in contenders.items():
                best_seconds(gen, timings[name][0])
                if score:
                    best_seconds(score, timings[name][1])
        for name, (gen_times, score_times) in timings.items():
            figures.setdefault(name, {})[threads] = {
                "ms_per_token": min(gen_times) * 1e3 / args.tokens,
                "tokens_per_s": score_tokens / min(score_times) if score_times else None,
            }
    return figures


def validation_ppl(args: argparse.Namespace, paths: dict[str, Path]) -> dict[str, float] | None:
    file = args.processed / "validation.npy"
    if not args.checkpoint or not file.exists():
        return None
    stream = np.load(file).astype(np.int64)
    return {name: LanguageModel(path).score_ids(stream).ppl for name, path in paths.items()}


def verdict(value: float, target: float) -> str:
    return "met" if value >= target else "MISSED"


def report(args: argparse.Namespace, description: str, figures: dict, ppl: dict | None) -> None:
    threads = sorted(next(iter(figures.values())))
    print(f"model: {description}, vocab {args.vocab_size if not args.checkpoint else 'of ckpt'}")
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores ({default_threads()} usable); "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}; best of {args.repeats} "
        f"rounds of {args.tokens} tokens"
    )
    print()
    header = f"{'':34s}" + "".join(
        f"{f'gen ms/tok {t}t':>16s}{f'score tok/s {t}t':>18s}" for t in threads
    )
    print(header)
    for name, by_threads in figures.items():
        cells = ""
        for t in threads:
            f = by_threads[t]
            tps = f"{f['tokens_per_s']:,.0f}" if f["tokens_per_s"] else "-"
            cells += f"{f['ms_per_token']:16.3f}{tps:>18s}"
        print(f"{name:34s}{cells}")
    print()
    torch_f, fp32_f = figures["torch eager"], figures["rnnlm.inference fp32"]
    int8_f = figures["rnnlm.inference int8"]
    for t in threads:
        gen = torch_f[t]["ms_per_token"] / fp32_f[t]["ms_per_token"]
        gen8 = torch_f[t]["ms_per_token"] / int8_f[t]["ms_per_token"]
        q = fp32_f[t]["ms_per_token"] / int8_f[t]["ms_per_token"]
        score = fp32_f[t]["tokens_per_s"] / torch_f[t]["tokens_per_s"]
        score8 = int8_f[t]["tokens_per_s"] / fp32_f[t]["tokens_per_s"]
        print(
            f"{t} thread(s): generation fp32 vs torch {gen:.2f}x "
            f"(target >= {GEN_TARGET:g}x: {verdict(gen, GEN_TARGET)}), int8 vs torch {gen8:.2f}x; "
            f"int8 vs fp32 {q:.2f}x (target >= {INT8_TARGET:g}x: {verdict(q, INT8_TARGET)}); "
            f"scoring fp32 vs torch {score:.2f}x, int8 vs fp32 {score8:.2f}x"
        )
    best = {k: min(v[t]["ms_per_token"] for t in threads) for k, v in figures.items()}
    gen = best["torch eager"] / best["rnnlm.inference fp32"]
    q = best["rnnlm.inference fp32"] / best["rnnlm.inference int8"]
    print(
        f"best of each: generation fp32 vs torch {gen:.2f}x ({verdict(gen, GEN_TARGET)}), "
        f"int8 vs fp32 {q:.2f}x ({verdict(q, INT8_TARGET)})"
    )
    if ppl:
        change = 100 * (ppl["int8"] / ppl["fp32"] - 1)
        ok = "met" if abs(change) <= PPL_TOLERANCE_PCT else "MISSED"
        print(
            f"validation perplexity: fp32 {ppl['fp32']:.3f}, int8 {ppl['int8']:.3f} "
            f"({change:+.3f}%, target within {PPL_TOLERANCE_PCT}%: {ok})"
        )
    else:
        print("validation perplexity: needs --checkpoint (a random model's is meaningless)")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    net, vocab, tokenizer, description = build_model(args)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_models(net, vocab, tokenizer, Path(tmp))
        sizes = {k: p.stat().st_size / 1e6 for k, p in paths.items()}
        figures = measure(args, net, paths)
        ppl = validation_ppl(args, paths)
    report(args, f"{description}, fp32 {sizes['fp32']:.1f} MB, int8 {sizes['int8']:.1f} MB",
           figures, ppl)  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps({"figures": figures, "ppl": ppl, "sizes_mb": sizes}))


if __name__ == "__main__":
    sys.exit(main())
