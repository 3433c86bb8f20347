"""Atomic file and folder writes, shared by every stage.

A stage that fails half-way must leave no half-written output behind: each write goes to a
temporary sibling first and is renamed into place only when complete (rename is atomic on POSIX
within one filesystem).

When the disk is full or a folder cannot be written, the helpers raise `WriteError`, an OSError
that names the output (never its temporary) and keeps the OS's reason; a stage's `main` turns it,
like any OSError, into one line with `describe_os_error`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

# Errors that only a write can cause: blamed on the output even when the OS names no file (a
# failing `write()` on an open file does not).
WRITE_ONLY_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


# Every temporary of an atomic write is `.<output name>.<8 random characters>.tmp` (tempfile's
# names), beside its output; `_swap_in` adds `.old` for a folder it sets aside. Nothing else is.
TEMP_PREFIX, TEMP_SUFFIX = ".", ".tmp"
_TEMP_NAME = re.compile(r"\.(?P<output>.+)\.[a-z0-9_]{8}(?P<old>\.old)?\.tmp")


class WriteError(OSError):
    """An output could not be written: `filename` is the output, `strerror` the OS's reason."""


def write_error(err: OSError, output: Path) -> WriteError:
    """`err` (from writing `output` or its temporary) as a WriteError that names `output`."""
    return WriteError(err.errno, err.strerror or str(err), str(output))


def describe_os_error(err: OSError) -> str:
    """One line for a stage's exit message: which path, and the OS's reason (no traceback).

    "cannot write data/processed/train.npy: No space left on device" for a WriteError;
    "<path>: <reason>" for other OSErrors that carry a path; the error's own text otherwise.
    """
    if isinstance(err, WriteError):
        line = f"cannot write {err.filename}: {err.strerror}"
    elif err.strerror is None:
        line = str(err)
    else:
        names = [str(n) for n in (err.filename, err.filename2) if n is not None]
        line = f"{' -> '.join(names)}: {err.strerror}" if names else err.strerror
    return line.replace("\n", " ")


def _blamed_output(err: OSError, staging: Path, output: Path) -> Path | None:
    """The output a failure in the body of a staged write concerns; None if it is not a write.

    A path the error names inside `staging` maps to the same place inside `output`. An error
    that names no path at all counts only when it is write-only (ENOSPC, EROFS, ...), so a read
    error in the body (a missing input, a reset connection) passes through unchanged, and so
    does an error about some other file, which names that file.
    """
    names = [n for n in (err.filename2, err.filename) if isinstance(n, str | bytes | os.PathLike)]
    for name in names:  # filename2 first: it is the destination of a failed copy
        path = Path(os.fsdecode(name))
        if path.is_relative_to(staging):
            return output / path.relative_to(staging)
    if not names and err.errno in WRITE_ONLY_ERRNOS:
        return output
    return None


@contextlib.contextmanager
def writing(path: Path, output: Path | None = None) -> Iterator[None]:
    """Re-raise the block's failures to write `path` as WriteError naming `output` (or `path`).

    `path` may be a temporary (file or folder) that stands for `output`; see `_blamed_output`
    for which errors count as failures to write it. Other errors pass through unchanged.
    """
    path = Path(path)
    try:
        yield
    except OSError as err:
        blamed = _blamed_output(err, path, Path(output) if output is not None else path)
        if blamed is None:
            raise
        raise write_error(err, blamed) from err


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename `tmp` onto `target`; a folder already there is set aside and restored on failure.

    os.replace cannot replace a non-empty folder, and deleting the old one first would lose it
    if the rename then failed.
    """
    if not target.is_dir() or target.is_symlink():
        os.replace(tmp, target)
        return
    old = tmp.with_name(f"{tmp.stem}.old{TEMP_SUFFIX}")
    os.replace(target, old)
    try:
        os.replace(tmp, target)
    except OSError:
        os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def configure_logging(level: int = logging.INFO) -> None:
    """Configure logging once, from a stage's `main`."""
    logging.basicConfig(
        level=level,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )


@contextlib.contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside `target`; on success rename it onto `target`.

    Works for files and folders. On any exception the temporary is removed and `target` is
    left as it was. Failures to write (disk full, an unwritable or missing folder) are raised as
    WriteError naming `target`.
    """
    target = Path(target)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(
            prefix=f"{TEMP_PREFIX}{target.name}.", suffix=TEMP_SUFFIX, dir=target.parent
        )
    except OSError as err:
        raise write_error(err, target) from err
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the caller decides whether it is a file or a folder
    try:
        with writing(tmp, target):
            yield tmp
        try:
            _swap_in(tmp, target)
        except OSError as err:
            raise write_error(err, target) from err
    finally:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def _temp_dir_beside(path: Path) -> Path:
    """A new empty folder `.<name>.<random>.tmp` beside `path` (its parent created); a failure
    is a WriteError naming `path`."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        prefix = f"{TEMP_PREFIX}{path.name}."
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=TEMP_SUFFIX, dir=path.parent))
    except OSError as err:
        raise write_error(err, path) from err


@contextlib.contextmanager
def staged_files(dest_dir: Path) -> Iterator[Path]:
    """Yield an empty staging folder; on success move each file in it into `dest_dir`.

    For stages with several outputs in one folder: nothing reaches `dest_dir` unless every file
    was written, and files of `dest_dir` that the stage does not write (DVC's .gitignore) stay.
    Write failures are raised as WriteError naming the file in `dest_dir`, not the staged one.
    """
    dest_dir = Path(dest_dir)
    try:
        dest_dir.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise write_error(err, dest_dir) from err
    stage = _temp_dir_beside(dest_dir)
    try:
        with writing(stage, dest_dir):
            yield stage
        for item in sorted(stage.iterdir()):
            try:
                os.replace(item, dest_dir / item.name)
            except OSError as err:
                raise write_error(err, dest_dir / item.name) from err
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def remove_stale_temporaries(folders: Iterable[Path]) -> list[Path]:
    """Clear up after killed processes in `folders`: delete the temporaries of atomic writes,
    and put back an output that a kill between `_swap_in`'s two renames left set aside.

    Only names of the form atomic_path, staged_files and scratch_dir make are touched. Call it
    only while no other process can be writing there (a stage holds its checkout's lock).

    Returns:
        What was removed or put back.
    """
    found = []
    for folder in dict.fromkeys(Path(f) for f in folders):
        try:
            entries = sorted(folder.iterdir())
        except (FileNotFoundError, NotADirectoryError):
            continue
        for entry in entries:
            match = _TEMP_NAME.fullmatch(entry.name)
            if match is None:
                continue
            found.append(entry)
            output = folder / match["output"]
            if match["old"] and not os.path.lexists(output):
                os.replace(entry, output)
            elif entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    return found


@contextlib.contextmanager
def scratch_dir(beside: Path) -> Iterator[Path]:
    """An empty temporary folder beside `beside` (same disk), removed when the block ends.

    Named as the other temporaries, so that what a killed process leaves is cleared up by
    `remove_stale_temporaries`. Failing to create it is a WriteError naming `beside`.
    """
    folder = _temp_dir_beside(beside)
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_text_atomic(path: Path, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON (sorted keys, so diffs stay small)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, tmp.open("wb") as fh:
        np.save(fh, array, allow_pickle=False)


def md5_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    """Hex MD5 of a file, read in chunks (DVC and the NLTK index both identify files by it)."""
    digest = hashlib.md5(usedforsecurity=False)
    with Path(path).open("rb") as fh:
        while chunk := fh.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def read_json(path: Path) -> Any:
    """Read a JSON file; any way it can be wrong is a ValueError naming it (FileNotFoundError
    when it is missing)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: not found (has the stage that writes it run?)") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text (byte {err.start}); not a JSON file") from None
    except RecursionError:
        raise ValueError(f"{path}: JSON nested too deeply") from None
