"""The `rnnlm` command: use an exported model (models/model.onnx) on CPU with onnxruntime.

    rnnlm generate [--model M] [--prompt TEXT] [--max-tokens N] [--temperature T] [--top-k K]
                   [--top-p P] [--seed S] [--num-samples N] [--stop-at-eos]
    rnnlm score    [--model M] [--per-sentence] [--json] FILE|-
    rnnlm next     [--model M] [--prompt TEXT] [-k K]
    rnnlm runs     [--sort COLUMN] [--json] [--all-params]   (the MLflow runs, side by side)
    rnnlm relog    [--tracking-uri URI]   (send what a training could not log to MLflow)

The model file is self-contained (vocabulary and tokenizer are in its metadata), so `--model`
is all a subcommand needs. Exit codes: 0 success; 1 the model or the input cannot be used;
2 bad command-line arguments. Errors are one line on stderr, never a traceback.

Adding a subcommand: write `add_<name>(subparsers)` that creates its parser with `_command`
and sets `handler=<function(args) -> int>`, then append it to `SUBCOMMANDS`. This module
imports only rnnlm.inference (onnxruntime, numpy, nltk): a handler that needs a heavy package
(e.g. `rnnlm runs` and mlflow) imports it inside itself, so the other subcommands stay fast and
torch-free.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

from rnnlm import runs
from rnnlm.inference import (
    MAX_SAMPLES,
    MAX_THREADS,
    MAX_TOKENS,
    LanguageModel,
    ModelLoadError,
)
from rnnlm.text import decode_document

DEFAULT_MODEL = Path("models/model.onnx")
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class CliError(RuntimeError):
    """A problem with the user's input, reported as one line (exit code 1)."""


def one_line(text: str) -> str:
    """`text` with newlines, other control characters and lone surrogates escaped (\\n)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


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
        help="onnxruntime threads (default: all cores)",
    )
    return parser


def _load(args: argparse.Namespace) -> LanguageModel:
    return LanguageModel(args.model, threads=args.threads)


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
    parser.set_defaults(handler=run_score)


def read_text(name: str) -> str:
    """The text of a file (UTF-8, else Latin-1), or of stdin for '-'."""
    if name == "-":
        return decode_document(sys.stdin.buffer.read())
    path = Path(name)
    try:
        return decode_document(path.read_bytes())
    except FileNotFoundError:
        raise CliError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"{path}: is a directory, expected a text file") from None
    except OSError as err:
        raise CliError(f"{path}: cannot read ({err.strerror})") from None
    except ValueError:  # a NUL byte: no file can have that name
        raise CliError(f"{name!r}: not a valid file name") from None


def run_score(args: argparse.Namespace) -> int:
    model = _load(args)  # first: a bad --model is reported before stdin is read
    text = read_text(args.file)
    try:
        result = model.score(text)
    except ValueError as err:
        raise CliError(f"{args.file}: {err}") from None
    if args.json:
        print(json.dumps(result.to_dict(per_sentence=args.per_sentence), ensure_ascii=False))
        return EXIT_OK
    if args.per_sentence:
        for sentence in result.sentences:
            print(f"{sentence.ppl:10.2f}  {sentence.tokens:5d}  {sentence.text}")
    print(
        f"perplexity {result.ppl:.2f} over {result.tokens} tokens "
        f"({result.mean_nll:.4f} nats/token, {result.unknown} unknown)"
    )
    return EXIT_OK


def add_next(subparsers: argparse._SubParsersAction) -> None:
    parser = _command(subparsers, "next", "the most likely next words after a prompt")
    parser.add_argument("--prompt", default="", help="text so far (default: a sentence start)")
    parser.add_argument(
        "-k", type=_number(int, 1), default=5, help="how many words to list (default: 5)"
    )
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
        sent = relog_unsent(args.tracking_uri)
    except TrackingError as err:
        raise CliError(str(err)) from None
    print("\n".join(sent) if sent else f"nothing to send ({unsent_dir()} holds no records)")
    return EXIT_OK


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


def _fail(message: object, code: int) -> int:
    print(f"rnnlm: error: {one_line(str(message))}", file=sys.stderr)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run one subcommand; return the exit code (the console script passes it to sys.exit)."""
    _tolerant_output()
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # argparse has printed usage and the message (or --help)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    _configure_logging()
    try:
        return args.handler(args)
    except (ModelLoadError, CliError) as err:
        return _fail(err, EXIT_ERROR)
    except ValueError as err:  # an argument the library refused
        return _fail(err, EXIT_USAGE)
    except TimeoutError:  # NLTK's regex time limit (nltk.redos) ran out on a pathological text
        return _fail("NLTK's tokenizer gave up on the text (regex time limit)", EXIT_ERROR)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # output piped into `head`: stop quietly
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
