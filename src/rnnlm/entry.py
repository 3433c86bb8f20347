"""How every command ends: one line and a documented exit code, or a bug shown as one.

The five stages (`python -m rnnlm.<stage>`, through rnnlm.stage.stage_main) and the `rnnlm`
command (rnnlm.cli.main) run their work through `run_guarded`, so they fail the same way:

    0    success; also when whoever read standard output stopped early (`rnnlm score | head`)
    1    an expected failure: bad params or input, an unusable model file or tracking store,
         a full disk, an unwritable folder, standard output full or closed
    2    bad command-line arguments (argparse)
    70   a bug: an unexpected exception, its traceback printed above the closing line
    75   another rnnlm stage holds this checkout's lock: try again when it has finished
    130  interrupted by Ctrl-C (SIGINT)
    143  stopped by SIGTERM

An expected failure is an `RnnlmError` (its own `exit_code`) or an OSError; both end in one
line. SIGTERM is turned into an exception while the work runs, so `finally` blocks (removing
temporaries, closing an MLflow run) run as they do for Ctrl-C. No imports beyond the standard
library and rnnlm.errors / rnnlm.files: the torch-free `rnnlm` command uses it.
"""

from __future__ import annotations

import errno
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from rnnlm.errors import RnnlmError
from rnnlm.files import describe_os_error

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
EXIT_BUG = 70  # sysexits.h EX_SOFTWARE
EXIT_BUSY = 75  # sysexits.h EX_TEMPFAIL
EXIT_SIGINT = 128 + signal.SIGINT
EXIT_SIGTERM = 128 + signal.SIGTERM


class Interrupted(RnnlmError):
    """A signal stopped the work; outputs are as they were (temporaries are removed)."""

    def __init__(self, signum: int) -> None:
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}; previous outputs are unchanged")
        self.exit_code = 128 + signum


def one_line(text: str) -> str:
    """`text` with newlines, other control characters and lone surrogates escaped (\\n)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(signum)


@contextmanager
def sigterm_raises() -> Iterator[None]:
    """While the block runs, SIGTERM raises Interrupted (in the main thread only: elsewhere
    Python cannot install handlers). Code that handles SIGTERM itself (training, which saves a
    checkpoint first) replaces the handler for its own span and restores this one."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _silence_stdout() -> None:
    """Point standard output at /dev/null: what is still buffered for a reader that is gone
    (or a full disk) must not fail again, with a traceback, when Python exits."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, AttributeError, ValueError):  # no stdout at all, or not a real file
        pass


def _flush_stdout() -> None:
    """Flush standard output now, so a full or closed one is reported by name."""
    if sys.stdout is None:
        return
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        raise
    except OSError as err:
        raise RnnlmError(f"cannot write standard output: {err.strerror or err}") from None


def _is_stdout_error(err: OSError) -> bool:
    """An error that names no file and that writing standard output would give."""
    return err.filename is None and err.errno in (errno.ENOSPC, errno.EIO, errno.EBADF)


def run_guarded(work: Callable[[], int | None], report: Callable[[str], None]) -> int:
    """Run `work()` and return the process's exit code (see the module docstring).

    `report` writes one error line (a stage logs it, the CLI prints `rnnlm: error: ...`).
    """
    try:
        with sigterm_raises():
            code = work()
            _flush_stdout()
        return EXIT_OK if code is None else code
    except BrokenPipeError:  # the reader of stdout went away: stop quietly, as `cat` would
        _silence_stdout()
        return EXIT_OK
    except RnnlmError as err:
        report(one_line(str(err)))
        if isinstance(err.__cause__, OSError) and _is_stdout_error(err.__cause__):
            _silence_stdout()
        return err.exit_code
    except KeyboardInterrupt:
        report("interrupted (Ctrl-C); previous outputs are unchanged")
        return EXIT_SIGINT
    except OSError as err:  # a missing input, a full disk, an unwritable folder: path + reason
        if _is_stdout_error(err) and sys.stdout is not None:
            report(f"cannot write standard output: {err.strerror}")
            _silence_stdout()
        else:
            report(one_line(describe_os_error(err)))
        return EXIT_FAILURE
    except Exception as err:  # a bug: keep its traceback visible, and say that it is one
        traceback.print_exc(file=sys.stderr)
        report(
            f"unexpected {type(err).__name__} (a bug in rnnlm; the traceback above shows "
            f"where, please report it): {one_line(str(err))[:200]}"
        )
        return EXIT_BUG
