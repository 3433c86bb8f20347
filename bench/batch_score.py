"""Benchmark: Spark batch scoring (rnnlm.batch_score), local[1] and local[2], vs `rnnlm score`.

    python bench/batch_score.py                        # data/raw/state_union, models/model.onnx
    python bench/batch_score.py --input docs/ --model models/model.onnx --masters 'local[2]'

The input is a folder of text files, one document each, listed as batch_score lists them (by
default the 65 state_union speeches and the package's README).
Every run scores every document from a fresh state, and the runs must agree (tokens per
document equal, perplexities within 1e-6):

  rnnlm score, a process per file   `rnnlm score --json FILE` for each file in turn: what a shell
                                    loop over a corpus does (the CLI scores one input at a time)
  library, one process              LanguageModel(model, threads=1).score_stream on each file:
                                    the scoring alone, no process start or Spark
  batch_score local[N]              `python -m rnnlm.batch_score --master local[N]`, end to end
                                    (interpreter, MLflow, the .onnx wrapped as the pyfunc, JVM
                                    start); "job" is batch_score's own figure, from the Spark
                                    session's start to the output written

The runs take turns, `--rounds` times (2 by default), and each is reported by its best round:
wall seconds, documents/s and tokens/s (tokens as scored: <eos> included), and the overhead
against the library's time. The machine's load averages are printed after each round: the
figures move with what else runs on it. Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

JOB_LINE = re.compile(r"scored (\d+) documents \((\d+) tokens.* in ([0-9.]+) s on ")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", type=Path, default=Path("data/raw/state_union"))
    parser.add_argument("--model", type=Path, default=Path("models/model.onnx"))
    parser.add_argument("--masters", nargs="+", default=["local[1]", "local[2]"])
    parser.add_argument("--rounds", type=int, default=2, help="each run this often; the best")
    parser.add_argument("--skip-cli", action="store_true", help="leave out the rnnlm score loop")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def env() -> dict[str, str]:
    """This interpreter's environment, Spark's UI and progress bars off."""
    return {
        **os.environ,
        "PYSPARK_SUBMIT_ARGS": "--conf spark.ui.enabled=false "
        "--conf spark.ui.showConsoleProgress=false pyspark-shell",
    }


def run_cli(folder: Path, names: list[str], model: Path) -> tuple[float, dict[str, dict]]:
    """`rnnlm score --json` per file: wall seconds and each file's result."""
    results = {}
    start = time.perf_counter()
    for name in names:
        out = subprocess.run(
            [sys.executable, "-m", "rnnlm.cli", "score", "--model", str(model), "--threads", "1",
             "--json", str(folder / name)],
            capture_output=True, text=True, check=True, env=env(),
        ).stdout  # fmt: skip
        results[name] = json.loads(out)
    return time.perf_counter() - start, results


def run_library(folder: Path, names: list[str], model: Path) -> tuple[float, dict[str, dict]]:
    """score_stream per file in this process, the model loaded once (timed with the load)."""
    from rnnlm.inference import LanguageModel

    start = time.perf_counter()
    lm = LanguageModel(model, threads=1)
    results = {}
    for name in names:
        with (folder / name).open("rb") as source:
            results[name] = lm.score_stream(source).to_dict()
    return time.perf_counter() - start, results


def run_spark(folder: Path, model: Path, master: str, out: Path) -> tuple[float, float, dict]:
    """batch_score end to end: wall seconds, the job's seconds, and each file's row."""
    import pandas as pd

    start = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "rnnlm.batch_score", "--input", str(folder), "--output", str(out),
         "--model", str(model), "--master", master],
        capture_output=True, text=True, env=env(),
    )  # fmt: skip
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"batch_score --master {master} failed:\n{done.stderr[-3000:]}")
    match = JOB_LINE.search(done.stderr)
    assert match, done.stderr[-3000:]
    rows = pd.read_parquet(out).set_index("path").to_dict("index")
    return wall, float(match[3]), rows


def check_agree(name: str, got: dict[str, dict], reference: dict[str, dict]) -> None:
    assert set(got) == set(reference), (name, set(got) ^ set(reference))
    for doc, row in got.items():
        want = reference[doc]
        assert row["tokens"] == want["tokens"], (name, doc, row, want)
        assert abs(row["ppl"] / want["ppl"] - 1) <= 1e-6, (name, doc, row, want)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    from rnnlm.batch_score import list_documents

    names = list_documents(args.input)
    size = sum((args.input / name).stat().st_size for name in names)
    machine = platform.processor() or platform.machine()
    print(
        f"{len(names)} documents, {size / 1e6:.2f} MB, {args.model} ({machine}, "
        f"{os.cpu_count()} cores); load averages {os.getloadavg()}"
    )
    # name -> [(wall s, job s or None), one per round]; the rounds interleave the runs, so that
    # a burst of load from elsewhere falls on all of them alike.
    rounds: dict[str, list[tuple[float, float | None]]] = {}
    tokens = 0
    with tempfile.TemporaryDirectory() as tmp:
        for number in range(args.rounds):
            library_s, reference = run_library(args.input, names, args.model)
            tokens = sum(r["tokens"] for r in reference.values())
            rounds.setdefault("library, one process", []).append((library_s, None))
            if not args.skip_cli:
                cli_s, cli = run_cli(args.input, names, args.model)
                check_agree("rnnlm score", cli, reference)
                rounds.setdefault("rnnlm score, a process per file", []).append((cli_s, None))
            for master in args.masters:
                label = re.sub(r"\W", "", master)  # local[2] -> local2: [] would be a glob
                out = Path(tmp) / f"{label}-{number}"
                wall, job, rows = run_spark(args.input, args.model, master, out)
                check_agree(master, rows, reference)
                rounds.setdefault(f"batch_score {master}", []).append((wall, job))
            print(f"round {number + 1}: load averages {os.getloadavg()}", flush=True)
    print(f"{tokens:,} tokens scored by every run; the best of {args.rounds} round(s):")
    library_s = min(wall for wall, _ in rounds["library, one process"])
    head = f"{'run':34} {'wall s':>8} {'docs/s':>8} {'tokens/s':>9} {'vs library':>10}"
    print(f"{head}  job s (docs/s, tokens/s); every round's wall s")
    figures = []
    for name, results in rounds.items():
        wall = min(w for w, _ in results)
        jobs = [j for _, j in results if j is not None]
        job = min(jobs) if jobs else None
        line = (
            f"{name:34} {wall:8.1f} {len(names) / wall:8.2f} {tokens / wall:9,.0f} "
            f"{wall / library_s:9.2f}x"
        )
        if job is not None:
            line += f"  {job:.1f} ({len(names) / job:.2f}, {tokens / job:,.0f})"
        line += "; " + ", ".join(f"{w:.1f}" for w, _ in results)
        print(line)
        figures.append({"run": name, "rounds": results, "documents": len(names), "tokens": tokens})
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
