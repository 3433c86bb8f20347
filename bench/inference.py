"""Benchmark: inference against the machine's limit, and against the method it replaced.

    python bench/inference.py                                # the shipped models/, 1 MB, 20 MB
    python bench/inference.py --score-mb 0.3 --rss-mb 0 --rounds 2   # a quick look
    python bench/inference.py --requantize                   # int8 from the current quantizer

Measures in one run, on the shipped model (models/model.onnx and models/model.int8.onnx):
  - the machine's sustained fp32 GEMM rate on the output projection's shape (numpy and an
    onnxruntime MatMul, all cores), and from it the floor: tokens/s if every FLOP of a token
    (recurrence + projection, from the model's sizes) ran at that rate;
  - the output rows the scoring graph computes a token (an adaptive softmax: the head and
    the target's cluster, not the whole vocabulary) and the floor of that smaller work;
  - scoring tokens/s end to end (bytes in, perplexity out; tokenizer included) on a
    multi-MB input of corpus prose: `LanguageModel.score_stream` in fp32 and int8 (default
    threads: all cores), exact (one stream, the default) and batched (rows=8), and today's
    method before the scoring graph, kept here as a baseline (one session call per 256-token
    window returning the logits, NLL in numpy); each as a fraction of the floor. Then a
    profile: each stage alone (the tokenizer; the scoring session and the recurrence alone,
    on 1 thread and on all cores) in microseconds a token, against scoring end to end, and
    the scoring session by operator (onnxruntime's profiler; exact and rows=8), with the
    GFLOP/s that the recurrent op and the projection reach;
  - generation ms/token (temperature 1, one stream, 300 tokens) through `generate`, fp32 and
    int8, 1 and 2 threads, against today's loop (a plain session call and the old sampling
    per token), with the bound of reading the projection once a token (a bare GEMV);
  - validation perplexity int8 vs fp32 (data/processed/validation.npy, when present);
  - peak resident memory of `rnnlm score` on a 20 MB input, in a subprocess (os.wait4).
Each timing is the best of --rounds rounds, contenders interleaved in each round so that
background load hits them alike. Prints tables and the verdicts against the targets of issue 15.
Not a test: the figures depend on the machine and on what else runs on it.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper
from score_stream import corpus_paragraphs, write_input
from score_stream import score as run_cli_score

from rnnlm.inference import (
    CONTEXT,
    PRECISION_KEY,
    WINDOW,
    LanguageModel,
    default_threads,
    inverse_cdf,
    read_chunks,
    segment_tokens,
    session_options,
)
from rnnlm.streams import EOS_ID, UNK_ID, lm_pairs

MB = 1_000_000
FLOOR_TARGET, INT8_SCORE_TARGET, RSS_TARGET_MB = 0.60, 1.6, 300.0
GEN_TARGET, INT8_GEN_TARGET, PPL_TOLERANCE_PCT = 2.0, 1.7, 0.5
ROWS = 8  # the batched mode's rows (rnnlm score --rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--int8", type=Path, default=Path("models/model.int8.onnx"))
    parser.add_argument(
        "--requantize", action="store_true", help="int8: quantize --model with export's quantizer"
    )
    parser.add_argument("--processed", type=Path, default=Path("data/processed"))
    parser.add_argument("--source", type=Path, default=Path("data/raw"), help="corpus .txt files")
    parser.add_argument("--score-mb", type=float, default=1.0, help="scoring input, MB")
    parser.add_argument("--rss-mb", type=float, default=20.0, help="peak-memory input; 0: skip")
    parser.add_argument("--tokens", type=int, default=300, help="generated tokens per round")
    parser.add_argument("--rounds", type=int, default=5, help="rounds; the best one counts")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


CPU_SECONDS: dict[str, float] = {}  # best CPU time (all threads) of each contender, by name


def best_of(
    rounds: int, contenders: dict[str, Callable[[], object]], warm_up: bool = True
) -> dict[str, float]:
    """Best wall seconds of each contender over `rounds` interleaved rounds (after a warm-up
    run of each, unless `warm_up` is false); its best CPU seconds go to CPU_SECONDS."""
    for run in contenders.values() if warm_up else ():
        run()
    best = dict.fromkeys(contenders, math.inf)
    for _ in range(rounds):
        for name, run in contenders.items():
            cpu, start = time.process_time(), time.perf_counter()
            run()
            best[name] = min(best[name], time.perf_counter() - start)
            CPU_SECONDS[name] = min(CPU_SECONDS.get(name, math.inf), time.process_time() - cpu)
    return best


def flops_per_token(model: LanguageModel) -> float:
    """Multiply-adds x 2 of one token: the recurrent layers and the output projection."""
    c = model.config
    gates = {"lstm": 4, "gru": 3}.get(model.cell, 1)
    recurrent = sum(
        2 * gates * ((c["embedding_dim"] if layer == 0 else c["hidden_dim"]) + c["hidden_dim"])
        * c["hidden_dim"]
        for layer in range(c["num_layers"])
    )  # fmt: skip
    return recurrent + 2 * c["hidden_dim"] * c["vocab_size"]


def scored_rows(model: LanguageModel, targets: np.ndarray) -> float:
    """Output rows (words and cluster entries) the scoring graph computes a token, on average
    over `targets`: every word for one softmax; for an adaptive one, the head and the target's
    tail cluster (rnnlm.graphs)."""
    adaptive = model._adaptive_softmax()
    if adaptive is None:
        return float(model.vocab_size)
    tails = sum(
        float(np.mean((targets >= start) & (targets < end))) * (end - start)
        for start, end in adaptive.tails
    )
    return adaptive.head_width + tails


def matmul_session(weights: np.ndarray, threads: int) -> ort.InferenceSession:
    """onnxruntime: x (n, hidden) @ weights (hidden, vocab), the weights an initializer."""
    hidden, vocab = weights.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "projection",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", hidden])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", vocab])],
        [numpy_helper.from_array(weights, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return ort.InferenceSession(
        model.SerializeToString(), session_options(threads), providers=["CPUExecutionProvider"]
    )


class Projection:
    """The output projection's product alone, as the machine's reference: (ROWS, hidden) @
    (hidden, vocab) on all cores (numpy and onnxruntime, weights prepacked), `repeat` times a
    call, so that a timing is sustained over a good part of a scoring run; and the 1-row
    product on one core (onnxruntime), generation's bound: the weights read once a token."""

    ROWS, GEMV_REPEAT = 1024, 100

    def __init__(self, model: LanguageModel, threads: int, repeat: int) -> None:
        hidden, vocab = int(model.config["hidden_dim"]), model.vocab_size
        rng = np.random.default_rng(0)
        self.weights = rng.standard_normal((hidden, vocab), dtype=np.float32)
        self.x = rng.standard_normal((self.ROWS, hidden), dtype=np.float32)
        self.one = self.x[:1].copy()
        self.session = matmul_session(self.weights, threads)
        self.single = matmul_session(self.weights, 1)
        self.repeat = repeat
        self.flops = 2 * self.ROWS * hidden * vocab * repeat

    def numpy(self) -> None:
        for _ in range(self.repeat):
            np.matmul(self.x, self.weights)

    def onnxruntime(self) -> None:
        for _ in range(self.repeat):
            self.session.run(None, {"x": self.x})

    def gemv(self) -> None:
        for _ in range(self.GEMV_REPEAT):
            self.single.run(None, {"x": self.one})


def old_nll_in_place(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Today's per-token NLL (before issue 15): float32 exp over the vocabulary, float64 log."""
    top = logits.max(axis=-1)
    target_gap = top.astype(np.float64) - logits[np.arange(len(targets)), targets]
    logits -= top[:, None]
    np.exp(logits, out=logits)
    return np.log(logits.sum(axis=-1).astype(np.float64)) + target_gap


def baseline_score(model: LanguageModel, path: Path) -> tuple[float, int]:
    """Today's `score_stream` loop: tokenize, then per window of 256 one session call that
    returns the logits (batch 1), copied and turned into NLLs by numpy, state carried."""
    state = model.initial_state(1)
    previous, ids, nll, tokens = EOS_ID, [], 0.0, 0

    def window(size: int) -> None:
        nonlocal state, previous, ids, nll, tokens
        inputs, targets = lm_pairs(np.array(ids[:size]), previous)
        del ids[:size]
        logits, state = model._run(inputs[None], state)
        nll += float(old_nll_in_place(logits[0].copy(), targets).sum())
        previous, tokens = int(targets[-1]), tokens + size

    with path.open("rb") as file:
        for words in model.tokenizer.stream_sentences(read_chunks(file)):
            ids += [model.stoi.get(w, UNK_ID) for w in words]
            ids.append(EOS_ID)
            while len(ids) >= WINDOW:
                window(WINDOW)
    if ids:
        window(len(ids))
    return nll, tokens


def baseline_generate(model: LanguageModel, n_tokens: int, seed: int = 0) -> None:
    """Today's `generate` loop at temperature 1: a session call returning fresh arrays and
    the old sampling (exp over the vocabulary into a new array) per token."""
    rng = np.random.default_rng(seed)
    state = model.initial_state(1)
    ids = np.full((1, 1), EOS_ID, dtype=np.int64)
    logits, state = model._run(ids, state)
    for _ in range(n_tokens):
        x = logits[:, -1, :]
        p = np.exp(x - x.max(axis=-1, keepdims=True))
        ids[:, 0] = inverse_cdf(p, rng.random(1))
        logits, state = model._run(ids, state)


def new_score(model: LanguageModel, path: Path, rows: int = 1) -> tuple[float, int]:
    with path.open("rb") as file:
        result = model.score_stream(file, rows=rows)
    return result.nll, result.tokens


def stage_profile(
    model_path: Path, path: Path, cores: int, max_tokens: int = 200_000
) -> dict[str, float]:
    """Microseconds a token of each scoring stage alone: the tokenizer (CPU time, the
    caller's thread) and, in wall time, the scoring session (network, log-softmax and
    targets' log-probs) and the recurrence alone (the state graph), on 1 and on `cores`
    threads, one window after another with the state carried."""
    model = LanguageModel(model_path, threads=1, cache=False, ngram=False)
    started = time.process_time()
    ids: list[int] = []
    with path.open("rb") as file:
        for words in model.tokenizer.stream_sentences(read_chunks(file)):
            ids += [model.stoi.get(w, UNK_ID) for w in words]
            ids.append(EOS_ID)
            if len(ids) >= max_tokens:
                break
    profile = {"tokenize": (time.process_time() - started) / len(ids) * 1e6}
    inputs, targets = lm_pairs(np.array(ids))
    n = len(ids) // WINDOW * WINDOW
    windows = [
        (inputs[None, i : i + WINDOW], targets[None, i : i + WINDOW]) for i in range(0, n, WINDOW)
    ]
    for threads in sorted({1, cores}):
        sessions = LanguageModel(
            model_path, threads=threads, cache=False, ngram=False
        )._scoring_sessions()
        state = model.initial_state(1)
        started = time.perf_counter()
        for x, y in windows:
            _, state, _ = sessions.score(x, state, y)
        profile[f"score {threads}t"] = (time.perf_counter() - started) / n * 1e6
        state = model.initial_state(1)
        started = time.perf_counter()
        for x, _ in windows:
            state = sessions.advance(x, state)
        profile[f"recurrence {threads}t"] = (time.perf_counter() - started) / n * 1e6
    return profile


def op_profile(
    model_path: Path, ids: np.ndarray, cores: int, rows: int, max_calls: int = 40
) -> dict[str, float]:
    """Microseconds a token per operator type of the scoring session (onnxruntime's own
    profiler, `cores` threads), exact (rows 1: 256-token windows, the state carried) or with
    `rows` segments side by side (from zero states: the contexts' reads are not included)."""
    from rnnlm.inference import _build_graph

    model = LanguageModel(model_path, threads=cores, cache=False, ngram=False)
    options = session_options(cores, spinning=rows == 1)  # as _ScoringSessions sets them
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp(prefix="rnnlm-ortprof-")) / "p")
    graph = _build_graph(
        model_path,
        "scoring",
        model._outputs[0],
        model._outputs[1:],
        adaptive=model._adaptive_softmax(),
    )
    session = ort.InferenceSession(graph, options, providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]  # tokens, state..., targets
    inputs, targets = lm_pairs(ids)
    width = segment_tokens(rows) * rows if rows > 1 else WINDOW
    calls = min(max_calls, len(ids) // width)
    state = model.initial_state(rows)
    for i in range(calls):
        x = inputs[i * width : (i + 1) * width].reshape(rows, -1)
        y = targets[i * width : (i + 1) * width].reshape(rows, -1, 1)
        out = session.run(None, dict(zip(names, [x, *state, y], strict=True)))
        state = tuple(out[1:]) if rows == 1 else state
    trace = Path(session.end_profiling())
    per_op: dict[str, float] = {}
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            op = event["args"]["op_name"]
            per_op[op] = per_op.get(op, 0.0) + event["dur"] / (calls * width)
    shutil.rmtree(trace.parent, ignore_errors=True)
    return dict(sorted(per_op.items(), key=lambda item: -item[1]))


def requantized(fp32: Path, folder: Path) -> Path:
    """`fp32` quantized by the export stage's quantizer, with its metadata (precision int8)."""
    from rnnlm import export

    model = LanguageModel(fp32)
    int8 = folder / "model.int8.onnx"
    export.quantize_model(fp32, int8, model.cell)
    props = {p.key: p.value for p in onnx.load(str(fp32), load_external_data=False).metadata_props}
    export.attach_metadata(int8, {**props, PRECISION_KEY: "int8"}, "requantized by bench")
    return int8


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def isa() -> str:
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("flags")
        ).split()  # fmt: skip
    except (OSError, StopIteration):
        return "unknown"
    wanted = ["avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
    return " ".join(f for f in wanted if f in flags)


def verdict(ok: bool) -> str:
    return "met" if ok else "MISSED"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    cores = default_threads()
    tmp = Path(tempfile.mkdtemp(prefix="rnnlm-bench-"))
    try:
        int8_path = requantized(args.model, tmp) if args.requantize else args.int8
        paths = {"fp32": args.model, "int8": int8_path}
        fp32 = LanguageModel(args.model)
        print(
            f"{cpu_name()} ({isa()}), {os.cpu_count()} CPUs ({cores} usable); numpy "
            f"{np.__version__}, onnxruntime {ort.__version__}; load average "
            f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
        )
        print(
            f"model {args.model}: {fp32.cell} {fp32.config['hidden_dim']}x"
            f"{fp32.config['num_layers']}, vocabulary {fp32.vocab_size:,}; int8 {int8_path}"
            f"{' (requantized)' if args.requantize else ''}; best of {args.rounds} interleaved "
            "rounds"
        )
        figures: dict[str, object] = {}

        # Scoring, end to end, against the machine's limit measured in the same rounds.
        # The GEMMs of about a tenth of the scoring input's tokens (~200,000 tokens a MB).
        projection = Projection(fp32, cores, repeat=max(10, int(args.score_mb * 20)))
        flops = flops_per_token(fp32)
        paragraphs = corpus_paragraphs(args.source)
        text = tmp / "score.txt"
        size = write_input(text, paragraphs, int(args.score_mb * MB), "\n", 0)
        # The network alone, as the baseline scores; the shipped mixture (the continuous cache
        # and the n-gram the model carries) as its own contender.
        models = {
            name: LanguageModel(path, cache=False, ngram=False) for name, path in paths.items()
        }
        baseline_model = LanguageModel(args.model, threads=cores)  # today's: all cores
        parts = [part for part, on in (("cache", fp32.cache), ("ngram", fp32.ngram)) if on]
        cached = {f"fp32 {'+'.join(parts)}": LanguageModel(args.model)} if parts else {}
        for model in [*models.values(), *cached.values()]:  # the scoring sessions: built once
            model.score("We will build a strong nation.")
        results: dict[str, tuple[float, int]] = {}

        def scored(name: str, run: Callable[[], tuple[float, int]]) -> Callable[[], None]:
            def go() -> None:
                results[name] = run()

            return go

        seconds = best_of(
            args.rounds,
            {
                "GEMM numpy": projection.numpy,
                "GEMM onnxruntime": projection.onnxruntime,
                "fp32": scored("fp32", lambda: new_score(models["fp32"], text)),
                "int8": scored("int8", lambda: new_score(models["int8"], text)),
                f"fp32 rows={ROWS}": scored(
                    f"fp32 rows={ROWS}", lambda: new_score(models["fp32"], text, ROWS)
                ),
                f"int8 rows={ROWS}": scored(
                    f"int8 rows={ROWS}", lambda: new_score(models["int8"], text, ROWS)
                ),
                "baseline fp32": scored(
                    "baseline fp32", lambda: baseline_score(baseline_model, text)
                ),
                **{
                    name: scored(name, lambda m=model: new_score(m, text))
                    for name, model in cached.items()
                },
            },
            warm_up=False,
        )
        rates = {
            name: projection.flops / seconds.pop(f"GEMM {name}") / 1e9
            for name in ("numpy", "onnxruntime")
        }
        floor = max(rates.values()) * 1e9 / flops
        figures["gemm"] = {"gflops": rates, "flops_per_token": flops, "floor_tokens_per_s": floor}
        print(
            f"\nfp32 GEMM ({projection.ROWS} x {fp32.config['hidden_dim']}) @ "
            f"({fp32.config['hidden_dim']} x {fp32.vocab_size}), {cores} threads, timed in the "
            f"scoring rounds: numpy {rates['numpy']:.0f} GFLOP/s, onnxruntime "
            f"{rates['onnxruntime']:.0f} GFLOP/s; {flops / 1e6:.2f} MFLOP a token -> floor "
            f"{floor:,.0f} tokens/s"
        )
        tokens = results["fp32"][1]
        rel = abs(results["fp32"][0] / results["baseline fp32"][0] - 1)
        int8_change = math.exp((results["int8"][0] - results["fp32"][0]) / tokens) - 1
        print(
            f"\nscoring {size / MB:.1f} MB of corpus prose ({tokens:,} tokens), end to end, "
            f"default threads ({cores}); fp32 NLL equals the baseline's to {rel:.1e} relative; "
            f"int8 perplexity {int8_change:+.3%} against fp32"
        )
        print(
            f"{'':16s}{'seconds':>9s}{'tokens/s':>11s}{'of floor':>10s}{'vs baseline':>13s}"
            f"{'core-us/token':>15s}"
        )
        score_rows = {}
        for name, secs in seconds.items():
            tps = tokens / secs
            score_rows[name] = tps
            print(
                f"{name:16s}{secs:9.2f}{tps:11,.0f}{tps / floor:10.0%}"
                f"{tps / (tokens / seconds['baseline fp32']):12.2f}x"
                f"{CPU_SECONDS[name] / tokens * 1e6:15.1f}"
            )
        print(
            "(core-us/token: CPU time of all its threads; onnxruntime's spinning pool threads "
            "count in the baseline's)"
        )
        batched = math.exp((results[f"fp32 rows={ROWS}"][0] - results["fp32"][0]) / tokens) - 1
        print(
            f"rows={ROWS}: {ROWS} segments of {segment_tokens(ROWS)} tokens side by side, each "
            f"after the {CONTEXT} tokens before it; perplexity {batched:+.3%} against exact"
        )
        figures["score"] = {
            "tokens": tokens,
            "tokens_per_s": score_rows,
            "nll_rel_diff": rel,
            "int8_ppl_change": int8_change,
            "batched_ppl_change": batched,
        }

        profile = {name: stage_profile(path, text, cores) for name, path in paths.items()}
        figures["profile"] = profile
        columns = list(profile["fp32"])
        print(
            "\nwhere the time goes: us a token of each stage alone (tokenize: CPU time on the "
            "caller's thread; the rest wall time, one window after another; score = network + "
            "log-probs, recurrence = the state graph alone) against scoring end to end"
        )
        print(f"{'':6s}" + "".join(f"{c:>15s}" for c in columns) + f"{'end to end':>12s}")
        for name, stage in profile.items():
            print(
                f"{name:6s}"
                + "".join(f"{stage[c]:15.1f}" for c in columns)
                + f"{1e6 / score_rows[name]:12.1f}"
            )

        ids = np.load(args.processed / "validation.npy").astype(np.int64)
        recurrent_flops = flops - 2 * fp32.config["hidden_dim"] * fp32.vocab_size
        rows_a_token = scored_rows(fp32, ids[1:])
        done_flops = recurrent_flops + 2 * fp32.config["hidden_dim"] * rows_a_token
        figures["gemm"]["scored_flops_per_token"] = done_flops
        print(
            f"\nthe scoring graph computes {rows_a_token:,.0f} of the {fp32.vocab_size:,} output "
            f"rows a token (validation targets; the adaptive softmax's head and the target's "
            f"cluster): {done_flops / 1e6:.2f} MFLOP a token, whose floor is "
            f"{max(rates.values()) * 1e9 / done_flops:,.0f} tokens/s; the targets keep the "
            "floor of the whole vocabulary above"
        )
        print(
            "\nthe scoring session by operator (onnxruntime's profiler, all cores, us a token; "
            "GFLOP/s of the recurrent op and the projection from their FLOPs a token)"
        )
        recurrent_op = {"lstm": "LSTM", "gru": "GRU"}.get(fp32.cell, "RNN")
        # onnxruntime runs the projection as MatMul, or as Gemm where it fuses the bias in.
        projection_ops = ("MatMul", "Gemm")
        work = {recurrent_op: recurrent_flops, "projection": done_flops - recurrent_flops}
        ops_figures = {}
        for rows in (1, ROWS):
            for name, path in paths.items():
                ops = op_profile(path, ids, cores, rows)
                ops_figures[f"{name} rows={rows}"] = ops
                top = sorted(ops, key=lambda op: -ops[op])[:5]
                spent = {
                    recurrent_op: ops.get(recurrent_op, 0.0),
                    "projection": sum(ops.get(op, 0.0) for op in projection_ops),
                }
                speeds = [
                    f"{part} {work[part] / spent[part] / 1e3:.0f} GFLOP/s"
                    for part in work
                    if name == "fp32" and spent[part]
                ]
                print(
                    f"  {name} rows={rows}: total {sum(ops.values()):.1f}; "
                    + ", ".join(f"{op} {ops[op]:.1f}" for op in top)
                    + (f" ({'; '.join(speeds)})" if speeds else "")
                )
        figures["ops"] = ops_figures

        # Generation.
        gen: dict[str, Callable[[], object]] = {}
        for threads in sorted({1, 2}):
            for name, path in paths.items():
                model = LanguageModel(path, threads=threads, cache=False, ngram=False)
                model.prepare_generation()  # per token, not the two levels' building
                gen[f"{name} {threads}t"] = lambda m=model: m.generate(
                    "", max_tokens=args.tokens, seed=0
                )
                gen[f"{name} {threads}t baseline"] = lambda m=model: baseline_generate(
                    m, args.tokens
                )
        for name, model in cached.items():  # sampling from the mixture, one thread
            one_thread = LanguageModel(model.path, threads=1)
            one_thread.prepare_generation()
            gen[f"{name} 1t"] = lambda m=one_thread: m.generate("", max_tokens=args.tokens, seed=0)
        gen["gemv"] = projection.gemv
        gen_seconds = best_of(args.rounds * 5, gen)
        gemv_ms = gen_seconds.pop("gemv") * 1e3 / projection.GEMV_REPEAT
        ms = {name: secs * 1e3 / args.tokens for name, secs in gen_seconds.items()}
        figures["generate_ms_per_token"] = {**ms, "gemv bound": gemv_ms}
        print(
            f"\ngeneration, ms/token (one stream, temperature 1, {args.tokens} tokens, best of "
            f"{args.rounds * 5}); bound of reading the fp32 projection once a token "
            f"(onnxruntime GEMV alone, 1 core): {gemv_ms:.3f} ms"
        )
        print(f"{'':10s}{'generate':>10s}{'baseline':>10s}{'speed-up':>10s}")
        mixed = [k for k in ms if any(k.startswith(name) for name in cached)]
        for key in [k for k in ms if not k.endswith("baseline") and k not in mixed]:
            print(f"{key:10s}{ms[key]:10.3f}{ms[key + ' baseline']:10.3f}"
                  f"{ms[key + ' baseline'] / ms[key]:9.2f}x")  # fmt: skip
        for key in mixed:
            print(f"{key}: {ms[key]:.3f} ms/token, {ms[key] / ms['fp32 1t'] - 1:+.0%} on fp32 1t")

        # Accuracy of int8.
        validation = args.processed / "validation.npy"
        ppl = None
        if validation.exists():
            stream = np.load(validation).astype(np.int64)
            ppl = {
                name: LanguageModel(p, threads=cores, cache=False, ngram=False)
                .score_ids(stream)
                .ppl
                for name, p in paths.items()
            }
            figures["validation_ppl"] = ppl

        # Peak memory of the CLI on a big input.
        rss = None
        if args.rss_mb > 0:
            big = tmp / "rss.txt"
            write_input(big, paragraphs, int(args.rss_mb * MB), "\n", 1)
            cli = argparse.Namespace(
                model=args.model, threads=None, pythonpath=None, timeout=7200.0
            )
            rss = run_cli_score(cli, big, [])
            figures["cli_20mb"] = rss
            print(
                f"\n`rnnlm score` on {args.rss_mb:g} MB (subprocess): "
                f"{rss.get('tokens', 0):,} tokens in {float(rss['seconds']):.1f} s wall "
                f"({float(rss.get('tokens', 0)) / float(rss['scoring_seconds']):,.0f} tokens/s "
                f"scoring), peak RSS {float(rss['peak_rss_mb']):.0f} MB"
            )

        print("\ntargets (issue 15)")
        fp32_floor = score_rows["fp32"] / floor
        print(f"  score fp32 >= {FLOOR_TARGET:.0%} of floor: {fp32_floor:.0%} "
              f"({verdict(fp32_floor >= FLOOR_TARGET)})")  # fmt: skip
        for suffix in ("", f" rows={ROWS}"):
            q = score_rows[f"int8{suffix}"] / score_rows[f"fp32{suffix}"]
            print(f"  score int8 >= {INT8_SCORE_TARGET}x fp32{suffix or ' (exact)'}: {q:.2f}x "
                  f"({verdict(q >= INT8_SCORE_TARGET)})")  # fmt: skip
        g = ms["fp32 1t baseline"] / ms["fp32 1t"]
        print(f"  generation fp32 1 thread >= {GEN_TARGET}x today's: {g:.2f}x "
              f"({verdict(g >= GEN_TARGET)})")  # fmt: skip
        for threads in (1, 2):
            g8 = ms[f"fp32 {threads}t"] / ms[f"int8 {threads}t"]
            print(f"  generation int8 >= {INT8_GEN_TARGET}x fp32, {threads} thread(s): {g8:.2f}x "
                  f"({verdict(g8 >= INT8_GEN_TARGET)})")  # fmt: skip
        if ppl:
            change = 100 * (ppl["int8"] / ppl["fp32"] - 1)
            print(f"  int8 validation perplexity within {PPL_TOLERANCE_PCT}%: fp32 "
                  f"{ppl['fp32']:.3f}, int8 {ppl['int8']:.3f} ({change:+.3f}%, "
                  f"{verdict(abs(change) <= PPL_TOLERANCE_PCT)})")  # fmt: skip
        if rss:
            peak = float(rss["peak_rss_mb"])
            print(f"  peak RSS <= {RSS_TARGET_MB:.0f} MB on {args.rss_mb:g} MB: {peak:.0f} MB "
                  f"({verdict(peak <= RSS_TARGET_MB)})")  # fmt: skip
        print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        if args.json:
            args.json.write_text(json.dumps(figures, indent=2, default=float) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
