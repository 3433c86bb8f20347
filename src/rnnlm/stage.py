"""What every stage's `python -m rnnlm.<stage>` entry shares.

Each stage module has the same three layers: `run(...)` takes the params sections it needs
(tests call it), `run_from_params(params)` picks them from a `Params`, and `main(argv)` is
`stage_main(...)` around the latter. `stage_main`:

1. parses `--params` (and a stage's own flags) and configures logging;
2. takes the stage lock of the outputs (`models/.rnnlm.lock`, `Paths.stage_lock`): one stage
   at a time per checkout, so two trainings never share models/checkpoints/ or one MLflow run.
   A second stage is refused in one line naming the holder (exit 75). A DVC experiment run
   with `--temp` or `--queue` is a copy with its own models/, hence its own lock;
3. removes the temporaries a killed stage left beside the outputs (safe: the lock is held);
4. runs the work through `entry.run_guarded`: an expected failure (an `RnnlmError`, an OSError)
   is one line on stderr and a documented exit code, a bug keeps its traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from rnnlm.config import DEFAULT_PARAMS, Params, Paths, load_params
from rnnlm.entry import EXIT_BUSY, run_guarded
from rnnlm.errors import RnnlmError
from rnnlm.files import configure_logging, remove_stale_temporaries, write_error

PARAMS_ENV = "RNNLM_PARAMS"  # another params file for every stage (tests, scripts)

log = logging.getLogger(__name__)


class StageBusy(RnnlmError):
    """Another stage holds the checkout's lock."""

    exit_code = EXIT_BUSY


def is_global_zero() -> bool:
    """Whether this process will be global rank 0, known before Lightning sets up DDP.

    torchrun sets RANK (and GROUP_RANK for the node), srun SLURM_PROCID; Lightning's own
    launcher gives its children LOCAL_RANK > 0 and reads NODE_RANK on the other nodes.
    """
    ranks = ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK")
    return all(int(os.environ.get(name) or 0) == 0 for name in ranks)


def _holder(lock_file: Path) -> str:
    """Who holds the lock, from what it wrote into the file (it may be mid-write)."""
    try:
        info = json.loads(lock_file.read_text(encoding="utf-8"))
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["started"]))
        return f"{info['stage']} (pid {info['pid']}, started {started})"
    except (OSError, ValueError, KeyError, TypeError):
        return "a process that has just started"


def _locked_fd(lock_file: Path) -> int:
    """An open descriptor of `lock_file`, exclusively flocked; StageBusy if another has it.

    The holder deletes the file before it lets go (so that a finished stage leaves nothing
    in models/): a newcomer that opened the file just before may lock a file that is gone,
    so it checks that its descriptor is still the file at that path, else starts again.
    """
    while True:
        try:
            lock_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise write_error(err, lock_file) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            current = os.stat(lock_file, follow_symlinks=False)
        except BlockingIOError:
            os.close(fd)
            raise StageBusy(
                f"{lock_file}: another rnnlm stage is running in this checkout: "
                f"{_holder(lock_file)}. Two stages here would overwrite each other's outputs; "
                "wait for it to finish (or stop it), or run an experiment in its own copy "
                "(dvc exp run --temp)"
            ) from None
        except FileNotFoundError:  # deleted by its holder meanwhile: lock the new one
            os.close(fd)
            continue
        except BaseException:
            os.close(fd)
            raise
        if os.path.samestat(current, os.fstat(fd)):
            return fd
        os.close(fd)


@contextlib.contextmanager
def checkout_lock(lock_file: Path, stage: str) -> Iterator[None]:
    """Hold `lock_file` exclusively for the block, or raise StageBusy naming its holder.

    An advisory lock (flock) on an open file: the kernel releases it when the process ends,
    however it ends, so a killed stage never leaves the checkout locked (only the file, which
    the next stage takes over). A stage that ends deletes it.
    """
    fd = _locked_fd(lock_file)
    try:
        record = {"stage": stage, "pid": os.getpid(), "started": time.time(), "argv": sys.argv}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock_file.unlink()  # while still holding it: see _locked_fd
        os.close(fd)


def output_folders(paths: Paths) -> list[Path]:
    """The folders where atomic writes put their temporaries: each output folder, and its
    parent (staged_files stages a whole folder beside it)."""
    folders = [paths.raw_dir, paths.processed_dir, paths.models_dir, paths.metrics_dir]
    return folders + [folder.parent for folder in folders]


def clean_up_after_killed_stages(paths: Paths) -> None:
    for stale in remove_stale_temporaries(output_folders(paths)):
        log.info("removed %s, left by a stage that was killed", stale)


def _module_name(name: str) -> str:
    """`rnnlm.train` also when the stage runs as `python -m rnnlm.train` (then `__main__`)."""
    spec = getattr(sys.modules.get(name), "__spec__", None) if name == "__main__" else None
    return spec.name if spec is not None else name


class _MainAsModule(logging.Filter):
    """Shows what a stage module logs as `__main__` (it runs as `python -m rnnlm.<stage>`)
    under its own name, as its error lines are."""

    def __init__(self, module: str) -> None:
        super().__init__()
        self.module = module

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "__main__":
            record.name = self.module
        return True


def _name_main_logger(module: str) -> None:
    for handler in logging.getLogger().handlers:
        for old in [f for f in handler.filters if isinstance(f, _MainAsModule)]:
            handler.removeFilter(old)
        handler.addFilter(_MainAsModule(module))


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
    module = _module_name(getattr(work, "__module__", __name__))
    stage_log = logging.getLogger(module)  # the stage's own logger
    _name_main_logger(module)

    def guarded_work() -> None:
        params = load_params(args.params)
        if not is_global_zero():  # a DDP peer: rank 0 holds the lock for the whole training
            work(params, args)
            return
        with checkout_lock(params.paths.stage_lock, module.rsplit(".", 1)[-1]):
            clean_up_after_killed_stages(params.paths)
            work(params, args)

    code = run_guarded(guarded_work, lambda line: stage_log.error("%s%s", error_prefix, line))
    if code:
        raise SystemExit(code)
