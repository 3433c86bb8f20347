"""The `rnnlm` command: use an exported model (models/model.onnx) on CPU with onnxruntime.

    rnnlm generate [--model M] [--prompt TEXT] [--max-tokens N] [--temperature T] [--top-k K]
                   [--top-p P] [--seed S] [--num-samples N] [--stop-at-eos] [--no-cache]
                   [--no-ngram]
    rnnlm score    [--model M] [--per-sentence] [--json] [--no-cache] [--no-ngram] FILE|-
                   [--threads N] [--rows N]   (any size: a stream; default: every core, one row)
    rnnlm next     [--model M] [--prompt TEXT] [-k K] [--no-cache] [--no-ngram]
    rnnlm runs     [--sort COLUMN] [--json] [--all-params]   (the MLflow runs, side by side)
    rnnlm relog    [--tracking-uri URI]   (send what a training could not log to MLflow)

The model file is self-contained (vocabulary and tokenizer are in its metadata), so `--model`
is all a subcommand needs. `score`, `next` and `generate` use the continuous cache (rnnlm.cache)
and the Kneser-Ney n-gram (rnnlm.ngram) the export stage tuned when the model carries them;
`--no-cache` and `--no-ngram` leave each out, both give the network alone.
Exit codes (rnnlm.entry lists them all): 0 success; 1 the model or the input cannot be used;
2 bad command-line arguments; 130 Ctrl-C. Errors are one line on stderr; only a bug shows a
traceback, and says that it is one.

Adding a subcommand: write `add_<name>(subparsers)` that creates its parser with `_command`
and sets `handler=<function(args) -> int>`, then append it to `SUBCOMMANDS`. This module
imports only rnnlm.inference (onnxruntime, numpy, nltk): a handler that needs a heavy package
(e.g. `rnnlm runs` and mlflow) imports it inside itself, so the other subcommands stay fast and
torch-free.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import stat
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import BinaryIO, NoReturn, TextIO

from rnnlm import runs
from rnnlm.entry import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, one_line, run_guarded
from rnnlm.errors import RnnlmError, format_duration
from rnnlm.inference import (
    CONTEXT,
    MAX_ROWS,
    MAX_SAMPLES,
    MAX_THREADS,
    MAX_TOKENS,
    LanguageModel,
    ScoreResult,
    SentenceScore,
)

DEFAULT_MODEL = Path("models/model.onnx")


class CliError(RnnlmError):
    """A problem with the user's input, reported as one line (exit code 1)."""


class UsageError(RnnlmError):
    """An argument the library refused (exit code 2, as argparse's own refusals)."""

    exit_code = EXIT_USAGE


class _Parser(argparse.ArgumentParser):
    """argparse, with the error line kept to one line whatever the arguments hold."""

    def error(self, message: str) -> NoReturn:
        super().error(one_line(message))


def _number(
    kind: type, low: float, high: float | None = None, low_open: bool = False
) -> Callable[[str], int | float]:
    """An argparse `type` that parses `kind` and checks the range, with a readable message."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {kind.__name__}, got {text!r}") from None
        if kind is float and not math.isfinite(value):  # nan, inf: no range holds them
            raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
        if (value <= low if low_open else value < low) or (high is not None and value > high):
            interval = f"{'>' if low_open else '>='} {low}" + (
                f" and <= {high}" if high is not None else ""
            )
            # int() and float() accept surrounding whitespace: show the number alone.
            raise argparse.ArgumentTypeError(f"must be {interval}, got {text.strip()}")
        return value

    return parse


def _command(
    subparsers: argparse._SubParsersAction, name: str, help_text: str
) -> argparse.ArgumentParser:
    """A subcommand parser with the options every model-using subcommand shares."""
    parser = subparsers.add_parser(name, help=help_text, description=help_text)
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL,
        help=f"exported ONNX model (default: {DEFAULT_MODEL})",
    )
    parser.add_argument(
        "--threads",
        type=_number(int, 1, MAX_THREADS),
        default=None,
        help="cores to use (default: all of them; on a busy machine one can generate faster)",
    )
    return parser


def _load(args: argparse.Namespace) -> LanguageModel:
    return LanguageModel(
        args.model, threads=args.threads, cache=not args.no_cache, ngram=not args.no_ngram
    )


def _add_no_cache(parser: argparse.ArgumentParser) -> None:
    """--no-cache and --no-ngram: what the model mixes into its network's distribution."""
    parser.add_argument(
        "--no-cache",
        action="store_true",
        help="without the continuous cache (default: on when the model carries the settings "
        "the export stage tuned for it)",
    )
    parser.add_argument(
        "--no-ngram",
        action="store_true",
        help="without the Kneser-Ney n-gram (default: on when the model carries one); with "
        "--no-cache: the network alone",
    )


def add_generate(subparsers: argparse._SubParsersAction) -> None:
    parser = _command(subparsers, "generate", "continue a prompt with sampled text")
    parser.add_argument(
        "--prompt", default="", help="text to continue (default: '' = a new sentence)"
    )
    parser.add_argument(
        "--max-tokens", type=_number(int, 0, MAX_TOKENS), default=50, help="default: 50"
    )
    parser.add_argument(
        "--temperature",
        type=_number(float, 0.0),
        default=1.0,
        help="sampling temperature; 0 = always the most likely word (default: 1)",
    )
    parser.add_argument(
        "--top-k", type=_number(int, 0), default=0, help="sample among the k best (0 = all)"
    )
    parser.add_argument(
        "--top-p",
        type=_number(float, 0.0, 1.0, low_open=True),
        default=1.0,
        help="nucleus sampling: the smallest set of best words with this mass (default: 1)",
    )
    parser.add_argument(
        "--seed", type=_number(int, 0), default=None, help="random seed (reproducible output)"
    )
    parser.add_argument(
        "--num-samples",
        type=_number(int, 1, MAX_SAMPLES),
        default=1,
        help="texts to generate (default: 1)",
    )
    parser.add_argument(
        "--stop-at-eos", action="store_true", help="end each text at its first end of sentence"
    )
    _add_no_cache(parser)
    parser.set_defaults(handler=run_generate)


def run_generate(args: argparse.Namespace) -> int:
    model = _load(args)
    texts = model.generate(
        args.prompt,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        stop_at_eos=args.stop_at_eos,
        num_samples=args.num_samples,
    )
    for text in texts:
        print(text)
    return EXIT_OK


def add_score(subparsers: argparse._SubParsersAction) -> None:
    parser = _command(subparsers, "score", "perplexity of a text under the model")
    parser.add_argument("file", metavar="FILE", help="text file to score, or - for stdin")
    parser.add_argument(
        "--per-sentence", action="store_true", help="also the perplexity of each sentence"
    )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_no_cache(parser)
    parser.add_argument(
        "--rows",
        type=_number(int, 1, MAX_ROWS),
        default=1,
        help="score N segments of the text side by side: faster, but each segment then reads "
        f"only the {CONTEXT} tokens before it, not the whole text, so the perplexity moves "
        "slightly (default: 1, the state carried through the whole text)",
    )
    parser.set_defaults(handler=run_score)


def open_input(name: str) -> BinaryIO:
    """The file to score, opened in binary mode, or stdin's bytes for '-'."""
    if name == "-":
        if sys.stdin is None:  # started with stdin closed (`<&-`)
            raise CliError("-: standard input is closed")
        return sys.stdin.buffer
    path = Path(name)
    try:
        return path.open("rb")
    except FileNotFoundError:
        raise CliError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"{path}: is a directory, expected a text file") from None
    except OSError as err:
        raise CliError(f"{path}: cannot read ({err.strerror})") from None
    except ValueError:  # a NUL byte: no file can have that name
        raise CliError(f"{name!r}: not a valid file name") from None


def _is_terminal(stream: TextIO | None) -> bool:
    try:
        return stream is not None and stream.isatty()
    except ValueError:  # closed
        return False


def _size(stream: BinaryIO) -> int | None:
    """The size of a regular file (stdin redirected from one included), else None."""
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) else None


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 100_000 else f"{n / 1e3:.1f} kB"


def _rate(n: int, seconds: float) -> str:
    """Throughput in MB (10^6 bytes) a minute."""
    return f"{n / 1e6 / max(seconds, 1e-9) * 60:.3g} MB/min"


class _Progress:
    """How far scoring has got, redrawn on one terminal line of stderr at most once a second
    (only once it has run for 2 s: a short input shows nothing)."""

    def __init__(
        self, out: TextIO, total: int | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._out = out
        self._total = total
        self._clock = clock
        self._start = self._last = clock()
        self._shown = False

    def __call__(self, done: int, tokens: int) -> None:
        now = self._clock()
        if now - self._last < 1.0 or now - self._start < 2.0:
            return
        self._last = now
        elapsed = now - self._start
        line = f"rnnlm: scoring: {_megabytes(done)}"
        if self._total:
            line += f" of {_megabytes(self._total)} ({min(done / self._total, 1.0):.0%})"
        line += f", {tokens:,} tokens, {format_duration(elapsed)}, {_rate(done, elapsed)}"
        self._out.write(f"\r{line}\x1b[K")
        self._out.flush()
        self._shown = True

    def clear(self) -> None:
        if self._shown:
            self._out.write("\r\x1b[K")
            self._out.flush()
            self._shown = False


class _JsonSentences:
    """The per-sentence records of `--json`, spooled to a temporary file as they come (kept in
    memory up to a few MB): memory stays bounded whatever the number of sentences."""

    def __init__(self) -> None:
        self._file = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed by print or close)
            max_size=1 << 22, mode="w+", encoding="utf-8", errors="surrogatepass"
        )
        self._count = 0

    def __call__(self, sentence: SentenceScore) -> None:
        if self._count:
            self._file.write(", ")
        self._file.write(json.dumps(sentence.to_dict(), ensure_ascii=False))
        self._count += 1

    def print(self, result: ScoreResult) -> None:
        """The same line as json.dumps(result.to_dict(per_sentence=True)), sentences included."""
        head = json.dumps(result.to_dict(), ensure_ascii=False)
        sys.stdout.write(f'{head[:-1]}, "sentences": [')
        self._file.seek(0)
        shutil.copyfileobj(self._file, sys.stdout)
        sys.stdout.write("]}\n")
        self.close()

    def close(self) -> None:
        self._file.close()


def _print_sentence(sentence: SentenceScore) -> None:
    print(f"{sentence.ppl:10.2f}  {sentence.tokens:5d}  {sentence.text}")


def run_score(args: argparse.Namespace) -> int:
    """Score the input as a stream: memory stays bounded whatever its size.

    `--per-sentence` lines are printed as the sentences are scored (with `--json`, spooled and
    printed at the end). On a terminal, stderr shows progress for long inputs and, in text
    mode, the throughput at the end; `--json` gives `bytes` and `seconds` instead.
    """
    model = _load(args)  # first: a bad --model before stdin is read
    stream = open_input(args.file)
    spool = _JsonSentences() if args.per_sentence and args.json else None
    on_sentence: Callable[[SentenceScore], None] | None = spool
    if args.per_sentence and not args.json:
        on_sentence = _print_sentence
    # Not over per-sentence lines on the same terminal.
    show = _is_terminal(sys.stderr) and not (
        args.per_sentence and not args.json and _is_terminal(sys.stdout)
    )
    progress = _Progress(sys.stderr, _size(stream)) if show else None
    with contextlib.ExitStack() as stack:
        if args.file != "-":
            stack.enter_context(stream)
        if spool is not None:
            stack.callback(spool.close)
        try:
            result = model.score_stream(
                stream, on_sentence, progress, name=args.file, rows=args.rows
            )
        except ValueError as err:
            raise CliError(f"{args.file}: {err}") from None
        finally:
            if progress is not None:
                progress.clear()
        if args.json:
            if spool is not None:
                spool.print(result)
            else:
                print(json.dumps(result.to_dict(), ensure_ascii=False))
            return EXIT_OK
    mixed = f"; continuous cache: {model.cache}" if model.cache is not None else ""
    mixed += f"; n-gram: {model.ngram}" if model.ngram is not None else ""
    print(
        f"perplexity {result.ppl:.2f} over {result.tokens} tokens "
        f"({result.mean_nll:.4f} nats/token, {result.unknown} unknown{mixed})"
    )
    if _is_terminal(sys.stderr) and result.bytes is not None and result.seconds is not None:
        print(
            f"rnnlm: scored {_megabytes(result.bytes)} in {format_duration(result.seconds)} "
            f"({_rate(result.bytes, result.seconds)}, "
            f"{result.tokens / max(result.seconds, 1e-9):,.0f} tokens/s)",
            file=sys.stderr,
        )
    return EXIT_OK


def add_next(subparsers: argparse._SubParsersAction) -> None:
    parser = _command(subparsers, "next", "the most likely next words after a prompt")
    parser.add_argument("--prompt", default="", help="text so far (default: a sentence start)")
    parser.add_argument(
        "-k", type=_number(int, 1), default=5, help="how many words to list (default: 5)"
    )
    _add_no_cache(parser)
    parser.set_defaults(handler=run_next)


def run_next(args: argparse.Namespace) -> int:
    for word, prob in _load(args).next_words(args.prompt, args.k):
        print(f"{word}\t{prob:.6f}")
    return EXIT_OK


def add_runs(subparsers: argparse._SubParsersAction) -> None:
    runs.add_parser(subparsers).set_defaults(handler=_runs)


def _runs(args: argparse.Namespace) -> int:
    # mlflow is imported inside runs.run_command, so the other subcommands never load it.
    from rnnlm.config import ConfigError
    from rnnlm.tracking import TrackingError

    try:
        print(runs.run_command(args))
    except (TrackingError, ConfigError) as err:
        raise CliError(str(err)) from None
    return EXIT_OK


def add_relog(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "relog",
        help="send what a training could not log while its MLflow store was away",
        description="Replay mlruns/unsent/*.jsonl (written when the tracking store went away "
        "during training) into their runs, then delete them.",
    )
    parser.add_argument(
        "--tracking-uri",
        help="the store to send to (default: MLFLOW_TRACKING_URI, else the one the run used)",
    )
    parser.set_defaults(handler=_relog)


def _relog(args: argparse.Namespace) -> int:
    from rnnlm.spool import relog_unsent, unsent_dir
    from rnnlm.tracking import TrackingError

    try:
        report = relog_unsent(args.tracking_uri)
    except TrackingError as err:
        raise CliError(str(err)) from None
    if not report:
        print(f"nothing to send ({unsent_dir()} holds no records)")
        return EXIT_OK
    problems = set(report.problems)  # what could not be sent: stderr, and exit 1
    for line in report:
        print(one_line(line), file=sys.stderr if line in problems else sys.stdout)
    return EXIT_FAILURE if problems else EXIT_OK


SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [
    add_generate,
    add_score,
    add_next,
    add_runs,
    add_relog,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="rnnlm",
        description="Generate, score and predict with an exported rnnlm model (CPU, ONNX).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in SUBCOMMANDS:
        add(subparsers)
    return parser


def _configure_logging() -> None:
    """Library warnings (unknown prompt words) as one `rnnlm: warning: ...` line on stderr."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("rnnlm: warning: %(message)s"))
    logger = logging.getLogger("rnnlm")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.WARNING)
    logger.propagate = False


def _tolerant_output() -> None:
    """Print what cannot be encoded (a lone surrogate from an undecodable argument, any
    non-ASCII under an ASCII locale) as a backslash escape instead of failing."""
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def _fail(message: object) -> None:
    print(f"rnnlm: error: {one_line(str(message))}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; return the exit code (the console script passes it to sys.exit).

    Failures end as every rnnlm command's do (rnnlm.entry): one line, a documented code.
    """
    _tolerant_output()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed usage and the message (or --help)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    _configure_logging()

    def work() -> int:
        if sys.stdout is None:  # started with stdout closed (`>&-`): print() would drop it all
            raise CliError("standard output is closed: redirect it to a file or /dev/null")
        try:
            return int(args.handler(args))
        except ValueError as err:  # an argument the library refused
            raise UsageError(str(err)) from None
        except TimeoutError:  # NLTK's regex time limit (nltk.redos) ran out on a pathological text
            raise CliError("NLTK's tokenizer gave up on the text (regex time limit)") from None

    return run_guarded(work, _fail)


if __name__ == "__main__":
    sys.exit(main())
