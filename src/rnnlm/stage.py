"""What every stage's `python -m rnnlm.<stage>` entry shares.

Each stage module has the same three layers: `run(...)` takes the params sections it needs
(tests call it), `run_from_params(params)` picks them from a `Params`, and `main(argv)` is
`stage_main(...)` around the latter. `stage_main` parses `--params` (and a stage's own flags),
configures logging, and turns every expected failure (an `RnnlmError`: bad params, a missing
input, an unusable tracking store, a failed check, an interrupted training) and every OSError (a
full disk, an unwritable folder) into one line on stderr and the error's exit code. Anything
else is a bug: its traceback stays visible.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from pathlib import Path

from rnnlm.config import DEFAULT_PARAMS, Params, load_params
from rnnlm.errors import RnnlmError
from rnnlm.files import configure_logging, describe_os_error

PARAMS_ENV = "RNNLM_PARAMS"  # another params file for every stage (tests, scripts)


def stage_argparser(description: str) -> argparse.ArgumentParser:
    """The argument parser every stage entry point shares: only `--params`."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--params",
        type=Path,
        default=Path(os.environ.get(PARAMS_ENV, DEFAULT_PARAMS)),
        help="parameters file (default: params.yaml)",
    )
    return parser


def stage_main(
    doc: str,
    work: Callable[[Params, argparse.Namespace], object],
    argv: list[str] | None = None,
    *,
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None,
    log_level: int = logging.INFO,
    error_prefix: str = "",
) -> None:
    """Run `work(params, args)` as a stage's command-line entry; exit non-zero in one line.

    Args:
        doc: the stage module's docstring; its first line describes the command.
        add_arguments: adds the stage's own flags (train's --no-resume) to the parser.
        log_level: INFO, or WARNING for processes that should only report problems.
        error_prefix: put before every error line ("download failed: ").
    """
    parser = stage_argparser(doc.strip().splitlines()[0])
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    configure_logging(log_level)
    log = logging.getLogger(getattr(work, "__module__", __name__))  # the stage's own logger
    try:
        work(load_params(args.params), args)
    except RnnlmError as err:
        log.error("%s%s", error_prefix, err)
        raise SystemExit(err.exit_code) from None
    except OSError as err:  # a missing input, a full disk, an unwritable folder: path + reason
        log.error("%s%s", error_prefix, describe_os_error(err))
        raise SystemExit(1) from None
