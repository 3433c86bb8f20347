"""rnnlm.files under faults: a full disk, an unwritable or read-only folder, a failed rename.

Every failure must leave the previous output as it was and no temporary behind, and raise a
WriteError that names the output (never its temporary) with the OS's reason; the stages' `main`
turn it into one line with `describe_os_error`.
"""

from __future__ import annotations

import errno
import importlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from rnnlm import files
from rnnlm.files import WriteError, describe_os_error
from tests.fixtures import fill_disk, write_params

PREVIOUS = b"previous output\n"
NO_SPACE = os.strerror(errno.ENOSPC)

Writer = Callable[[Path], None]
WRITERS: dict[str, Writer] = {
    "bytes": lambda path: files.write_bytes_atomic(path, b"x" * 10_000),
    "text": lambda path: files.write_text_atomic(path, "é" * 10_000),
    "json": lambda path: files.write_json_atomic(path, {"ids": list(range(3_000))}),
    "npy": lambda path: files.save_npy_atomic(path, np.arange(10_000, dtype=np.int32)),
}


def leftovers(folder: Path) -> list[str]:
    """Temporaries (files or folders named *.tmp) anywhere below `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*.tmp"))


def previous_file(tmp_path: Path) -> Path:
    target = tmp_path / "out" / "file"
    target.parent.mkdir()
    target.write_bytes(PREVIOUS)
    return target


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
def test_writers_work_on_a_disk_with_room(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: Writer
) -> None:
    """The disk-full stand-in lets writes that fit through unchanged."""
    target = previous_file(tmp_path)
    fill_disk(monkeypatch, target.parent, room=1_000_000)
    writer(target)
    assert target.read_bytes() != PREVIOUS
    assert len(target.read_bytes()) >= 10_000
    assert os.listdir(target.parent) == ["file"]


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
def test_disk_full_mid_write_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, writer: Writer
) -> None:
    target = previous_file(tmp_path)
    fill_disk(monkeypatch, target.parent, room=100)  # the write starts, then the disk is full
    with pytest.raises(WriteError) as err:
        writer(target)
    assert (err.value.errno, err.value.filename) == (errno.ENOSPC, str(target))
    assert describe_os_error(err.value) == f"cannot write {target}: {NO_SPACE}"
    assert target.read_bytes() == PREVIOUS
    assert os.listdir(target.parent) == ["file"]


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
def test_output_folder_under_a_regular_file(tmp_path: Path, writer: Writer) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_bytes(PREVIOUS)
    target = blocker / "sub" / "file"
    with pytest.raises(WriteError) as err:
        writer(target)
    assert describe_os_error(err.value) == f"cannot write {target}: {os.strerror(errno.ENOTDIR)}"
    assert blocker.read_bytes() == PREVIOUS
    assert os.listdir(tmp_path) == ["blocker"]


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES], ids=["read-only", "forbidden"])
def test_read_only_or_forbidden_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    """What creating the temporary raises on a read-only mount or a folder we may not write."""

    def refuse(*, prefix: str, suffix: str, dir: Path) -> tuple[int, str]:
        raise OSError(code, os.strerror(code), os.path.join(dir, f"{prefix}abc{suffix}"))

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    target = previous_file(tmp_path)
    with pytest.raises(WriteError) as err:
        files.write_json_atomic(target, {"a": 1})
    assert describe_os_error(err.value) == f"cannot write {target}: {os.strerror(code)}"
    with pytest.raises(WriteError) as err, files.staged_files(target.parent / "staged"):
        pytest.fail("the body must not run")
    assert err.value.filename == str(target.parent / "staged")
    assert target.read_bytes() == PREVIOUS


def _previous_folder(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    folder = tmp_path / "corpus"
    content = {"a.txt": b"old a", "b.txt": b"old b"}
    folder.mkdir()
    for name, data in content.items():
        (folder / name).write_bytes(data)
    return folder, content


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_disk_full_while_filling_a_folder_keeps_the_previous_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target, before = _previous_folder(tmp_path)
    fill_disk(monkeypatch, tmp_path, room=8)
    with pytest.raises(WriteError) as err, files.atomic_path(target) as staging:
        staging.mkdir()
        (staging / "a.txt").write_bytes(b"new a")
        (staging / "b.txt").write_bytes(b"new b")  # 3 bytes left: fails half-way
    assert describe_os_error(err.value) == f"cannot write {target}: {NO_SPACE}"
    assert _tree(target) == before
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("failing_move", ["aside", "into-place"])
def test_failed_folder_swap_restores_the_previous_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_move: str
) -> None:
    """Replacing a folder takes two renames; if either fails, the old folder is back in place."""
    target, before = _previous_folder(tmp_path)
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        moving_aside = Path(src) == target
        into_place = Path(dst) == target and not Path(src).name.endswith(".old.tmp")
        if (moving_aside and failing_move == "aside") or (
            into_place and failing_move == "into-place"
        ):
            raise OSError(errno.ENOSPC, NO_SPACE, str(src), None, str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(WriteError) as err, files.atomic_path(target) as staging:
        staging.mkdir()
        (staging / "new.txt").write_bytes(b"new")
    assert describe_os_error(err.value) == f"cannot write {target}: {NO_SPACE}"
    assert _tree(target) == before
    assert leftovers(tmp_path) == []


def test_folder_swap_replaces_the_previous_folder(tmp_path: Path) -> None:
    target, _ = _previous_folder(tmp_path)
    with files.atomic_path(target) as staging:
        staging.mkdir()
        (staging / "new.txt").write_bytes(b"new")
    assert _tree(target) == {"new.txt": b"new"}
    assert leftovers(tmp_path) == []


def _previous_outputs(tmp_path: Path) -> tuple[Path, dict[str, bytes]]:
    dest = tmp_path / "processed"
    dest.mkdir()
    before = {".gitignore": b"/x\n", "a.json": b"old a", "b.json": b"old b"}
    for name, data in before.items():
        (dest / name).write_bytes(data)
    return dest, before


def test_staged_files_disk_full_names_the_output_not_the_staged_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest, before = _previous_outputs(tmp_path)
    fill_disk(monkeypatch, tmp_path, room=50)
    with pytest.raises(WriteError) as err, files.staged_files(dest) as staged:
        files.write_bytes_atomic(staged / "a.json", b"a" * 40)  # fits
        files.write_bytes_atomic(staged / "b.json", b"b" * 40)  # does not
    assert describe_os_error(err.value) == f"cannot write {dest / 'b.json'}: {NO_SPACE}"
    assert _tree(dest) == before
    assert leftovers(tmp_path) == []


def test_staged_files_failed_move_names_the_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    dest, before = _previous_outputs(tmp_path)
    real_replace = os.replace

    def replace(src: str | Path, dst: str | Path) -> None:
        if Path(dst).parent == dest:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(src), None, str(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(WriteError) as err, files.staged_files(dest) as staged:
        files.write_bytes_atomic(staged / "a.json", b"new a")
    assert describe_os_error(err.value) == (
        f"cannot write {dest / 'a.json'}: {os.strerror(errno.EACCES)}"
    )
    assert _tree(dest) == before
    assert leftovers(tmp_path) == []


def test_read_errors_in_the_body_are_not_blamed_on_the_output(tmp_path: Path) -> None:
    missing = tmp_path / "missing-input.txt"
    with pytest.raises(OSError) as err, files.atomic_path(tmp_path / "out") as tmp:
        tmp.write_bytes(missing.read_bytes())
    assert type(err.value) is FileNotFoundError and err.value.filename == str(missing)
    with pytest.raises(OSError) as err, files.staged_files(tmp_path / "dest"):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")
    assert type(err.value) is ConnectionResetError
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("err", "line"),
    [
        (
            WriteError(errno.ENOSPC, NO_SPACE, "data/processed/train.npy"),
            f"cannot write data/processed/train.npy: {NO_SPACE}",
        ),
        (
            FileNotFoundError(errno.ENOENT, "No such file or directory", "models/model.ckpt"),
            "models/model.ckpt: No such file or directory",
        ),
        (
            OSError(errno.EXDEV, "Invalid cross-device link", "a", None, "b"),
            "a -> b: Invalid cross-device link",
        ),
        (OSError(errno.ENOSPC, NO_SPACE), NO_SPACE),
        (FileNotFoundError("metrics/train.json: not found"), "metrics/train.json: not found"),
        (OSError("first line\nsecond line"), "first line second line"),
    ],
    ids=["write", "read", "two-paths", "no-path", "own-message", "multi-line"],
)
def test_describe_os_error(err: OSError, line: str) -> None:
    assert describe_os_error(err) == line


# Stage modules whose `main` reports an OSError as one line, and the function it calls.
STAGE_MAINS = {
    "download": "run",
    "tokenization": "run",
    "export": "run_from_params",
    "evaluate": "run_from_params",
    "train": "run_from_params",
}


@pytest.mark.parametrize("module_name", STAGE_MAINS)
def test_stage_main_reports_a_write_error_in_one_line(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capsys: pytest.CaptureFixture[str],
    module_name: str,
) -> None:
    module = importlib.import_module(f"rnnlm.{module_name}")
    output = tmp_path / "data" / "processed" / "train.npy"

    def disk_full(*args: object, **kwargs: object) -> None:
        raise files.write_error(OSError(errno.ENOSPC, NO_SPACE), output)

    monkeypatch.setattr(module, STAGE_MAINS[module_name], disk_full)
    params = write_params(tmp_path / "params.yaml", {"paths": {"raw_dir": str(tmp_path / "raw")}})
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--params", str(params)])
    assert exit_info.value.code == 1
    errors = [r for r in caplog.records if r.levelname == "ERROR"]
    assert len(errors) == 1 and errors[0].exc_info is None
    assert errors[0].getMessage().endswith(f"cannot write {output}: {NO_SPACE}")
    assert "Traceback" not in capsys.readouterr().err
