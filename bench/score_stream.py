"""Benchmark: `rnnlm score` on big inputs, wall time and peak memory against the targets.

    python bench/score_stream.py                         # 5 MB and 20 MB of state_union prose
    python bench/score_stream.py --sizes 1 5 50 --per-sentence
    python bench/score_stream.py --sizes 1 --no-cache    # also the network alone (no cache/n-gram)
    python bench/score_stream.py --source synthetic      # words from the model's vocabulary
    python bench/score_stream.py --pythonpath /tmp/old/src   # another version's rnnlm, same inputs

Builds each input by shuffling the paragraphs of the raw corpus (data/raw/, one paragraph a line
as the `line` rule reads them; blank-line separated under `blank_line`) and repeating them up to
the size asked for, or, with `--source synthetic`, from sentences of words drawn from the
model's own vocabulary (Zipf-like). Then runs `rnnlm score --json` (rnnlm.cli) on it in a
subprocess, which reports its own peak resident memory as it exits (VmHWM in
/proc/self/status, Linux: the peak of its own address space; os.wait4's ru_maxrss would also
count the parent's memory at the fork, a whole benchmark's when bench/inference.py runs this).
Prints a table against the targets: >= 1 MB/min (MB = 10^6 bytes) and <= 300 MB peak RSS
whatever the size. Wall time includes the interpreter start and the model load (about a
second). The figures depend on the machine and on what else runs on it: the load averages
before and after are printed with them. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MB = 1_000_000
MIN_MB_PER_MIN, MAX_RSS_MB = 1.0, 300.0
# Runs the CLI, then writes the process's peak resident memory on stderr (Linux only).
_CLI_WITH_PEAK = """
import runpy, sys
try:
    runpy.run_module("rnnlm.cli", run_name="__main__", alter_sys=True)
finally:
    with open("/proc/self/status") as status:
        sys.stderr.write("\\n" + next(line for line in status if line.startswith("VmHWM:")))
"""
_PEAK = re.compile(r"\nVmHWM:\s+(\d+) kB\s*$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("models/model.onnx"))
    parser.add_argument(
        "--sizes", type=float, nargs="+", default=[5.0, 20.0], help="input sizes in MB"
    )
    parser.add_argument(
        "--source",
        default="data/raw",
        help="a folder of .txt files to draw paragraphs from, or 'synthetic'",
    )
    parser.add_argument("--per-sentence", action="store_true", help="also time --per-sentence")
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="also time --no-cache --no-ngram: the network alone, what the cache and the "
        "n-gram cost",
    )
    parser.add_argument("--threads", type=int, help="passed to rnnlm score (default: its own)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    parser.add_argument("--keep", type=Path, help="write the inputs here instead of a temp dir")
    parser.add_argument(
        "--pythonpath", type=Path, help="prepended to PYTHONPATH: score with another rnnlm source"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def corpus_paragraphs(folder: Path) -> list[str]:
    """Every non-empty line of the .txt files under `folder` (UTF-8, else Latin-1)."""
    from rnnlm.text import decode_document

    paragraphs = []
    for path in sorted(folder.rglob("*.txt")):
        text = decode_document(path.read_bytes())
        paragraphs += [line.strip() for line in text.split("\n") if line.strip()]
    return paragraphs


def synthetic_paragraphs(model: Path, seed: int, count: int = 5000) -> list[str]:
    """Paragraphs of 1-6 sentences of 5-30 words drawn from the model's vocabulary by rank."""
    from rnnlm.inference import LanguageModel

    words = [w for w in LanguageModel(model).vocab[2:] if w.isalpha()]
    rng = random.Random(seed)
    weights = [1.0 / (rank + 10) for rank in range(len(words))]
    paragraphs = []
    for _ in range(count):
        sentences = []
        for _ in range(rng.randint(1, 6)):
            chosen = rng.choices(words, weights, k=rng.randint(5, 30))
            sentences.append(" ".join(chosen).capitalize() + ".")
        paragraphs.append(" ".join(sentences))
    return paragraphs


def write_input(path: Path, paragraphs: list[str], size: int, separator: str, seed: int) -> int:
    """Shuffled paragraphs, reshuffled on each pass, until `size` bytes; returns the bytes."""
    rng = random.Random(seed)
    order = list(paragraphs)
    written = 0
    with path.open("w", encoding="utf-8", newline="\n") as out:
        while written < size:
            rng.shuffle(order)
            for paragraph in order:
                data = paragraph + separator
                out.write(data)
                written += len(data.encode("utf-8"))
                if written >= size:
                    break
    return written


def score(args: argparse.Namespace, path: Path, extra: list[str]) -> dict[str, float | str]:
    """Run `rnnlm score --json` on `path`; its wall time, peak RSS and result."""
    env = dict(os.environ)
    if args.pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(args.pythonpath), env.get("PYTHONPATH")) if p
        )
    command = [sys.executable, "-c", _CLI_WITH_PEAK, "score", "--json", "--model", str(args.model)]
    if args.threads:
        command += ["--threads", str(args.threads)]
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        proc = subprocess.Popen([*command, *extra, str(path)], stdout=out, stderr=err, env=env)
        timer = threading.Timer(args.timeout, proc.kill)
        timer.start()
        try:
            proc.wait()
        finally:
            timer.cancel()
        seconds = time.perf_counter() - started
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read().decode(), err.read().decode(errors="replace")
    peak = _PEAK.search(stderr)
    stderr = stderr[: peak.start()] if peak else stderr
    row: dict[str, float | str] = {
        "seconds": seconds,
        "peak_rss_mb": int(peak[1]) * 1024 / MB if peak else float("nan"),
        "exit": proc.returncode,
    }
    if proc.returncode == 0:
        result = json.loads(stdout)
        row.update(tokens=result["tokens"], ppl=result["ppl"])
        row["scoring_seconds"] = result.get("seconds", float("nan"))
    else:
        row["error"] = (stderr.strip().splitlines() or ["(no message)"])[-1][:200]
    return row


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from rnnlm.inference import LanguageModel

    rule = LanguageModel(args.model).tokenizer.paragraphs
    if args.source == "synthetic":
        paragraphs = synthetic_paragraphs(args.model, args.seed)
    else:
        paragraphs = corpus_paragraphs(Path(args.source))
        if not paragraphs:
            sys.exit(f"no .txt files under {args.source}: use --source synthetic")
    separator = "\n" if rule == "line" else "\n\n"
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; model {args.model} (paragraph rule {rule!r}); "
        f"source {args.source} ({len(paragraphs)} paragraphs); onnxruntime threads: "
        f"{args.threads or 'default'}"
    )
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for size_mb in args.sizes:
            path = folder / f"score_{size_mb:g}MB.txt"
            size = write_input(path, paragraphs, int(size_mb * MB), separator, args.seed)
            modes = [("", [])] + (
                [("per-sentence", ["--per-sentence"])] if args.per_sentence else []
            )
            modes += [("network", ["--no-cache", "--no-ngram"])] if args.no_cache else []
            for mode, extra in modes:
                row = {"mb": size / MB, "mode": mode or "total", **score(args, path, extra)}
                rows.append(row)
                print(f"  {row['mb']:.1f} MB {row['mode']}: {row}", flush=True)
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print()
    header = (
        f"{'input':>8}  {'mode':<12} {'wall':>9} {'MB/min':>7} {'peak RSS':>9} "
        f"{'tokens':>10} {'ppl':>8}  {'>= 1 MB/min':<11}  {'<= 300 MB':<9}"
    )
    print(header)
    print("-" * len(header))
    for row in rows:
        seconds = float(row["seconds"])
        rate = float(row["mb"]) / seconds * 60
        rss = float(row["peak_rss_mb"])
        if row["exit"] != 0:
            print(f"{row['mb']:>5.1f} MB  {row['mode']:<12} exit {row['exit']}: {row['error']}")
            continue
        print(
            f"{row['mb']:>5.1f} MB  {row['mode']:<12} {seconds:>8.1f}s {rate:>7.2f} "
            f"{rss:>6.0f} MB {row['tokens']:>10,} {float(row['ppl']):>8.2f}  "
            f"{'yes' if rate >= MIN_MB_PER_MIN else 'NO':<11}  "
            f"{'yes' if rss <= MAX_RSS_MB else 'NO':<9}"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
