"""The entry every stage and the `rnnlm` command share: exit codes, one line per failure, the
checkout's stage lock and the clean-up after killed stages."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from rnnlm import entry, stage
from rnnlm.config import load_params
from rnnlm.errors import RnnlmError
from tests.fixtures import PROJECT_ROOT, write_params

SRC = str(PROJECT_ROOT / "src")


@pytest.mark.parametrize(
    ("env", "zero"),
    [
        ({}, True),
        ({"LOCAL_RANK": "1"}, False),  # Lightning's launcher, a second device
        ({"NODE_RANK": "1"}, False),  # Lightning's launcher, on another node
        ({"SLURM_PROCID": "2", "SLURM_LOCALID": "0"}, False),  # srun, on another node
        ({"SLURM_PROCID": "0"}, True),
        ({"SLURM_PROCID": "0", "LOCAL_RANK": "1"}, False),  # launcher inside an allocation
        ({"RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}, True),  # torchrun
        ({"RANK": "4", "LOCAL_RANK": "0", "GROUP_RANK": "1"}, False),
    ],
)
def test_global_zero_is_known_from_every_launcher_environment(
    env: dict[str, str], zero: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert stage.is_global_zero() is zero


# -- run_guarded: every kind of ending -------------------------------------------------------


def _raise(exc: BaseException) -> Callable[[], None]:
    def work() -> None:
        raise exc

    return work


@pytest.mark.parametrize(
    ("exc", "code", "line"),
    [
        (RnnlmError("params.yaml: train.lr = -1: must be > 0"), 1, "train.lr = -1"),
        (FileNotFoundError(2, "No such file or directory", "data/x.npy"), 1, "data/x.npy: No such"),
        (KeyboardInterrupt(), 130, "interrupted (Ctrl-C)"),
        (RnnlmError("two\nlines"), 1, "two\\nlines"),
    ],
)
def test_expected_failures_end_in_one_line_and_their_exit_code(
    exc: BaseException, code: int, line: str, capsys: pytest.CaptureFixture[str]
) -> None:
    lines: list[str] = []
    assert entry.run_guarded(_raise(exc), lines.append) == code
    assert len(lines) == 1 and line in lines[0] and "\n" not in lines[0]
    assert "Traceback" not in capsys.readouterr().err


def test_a_bug_keeps_its_traceback_and_says_it_is_one(capsys: pytest.CaptureFixture[str]) -> None:
    lines: list[str] = []
    assert entry.run_guarded(_raise(ZeroDivisionError("boom")), lines.append) == entry.EXIT_BUG
    assert "Traceback" in capsys.readouterr().err
    (line,) = lines
    assert line.startswith("unexpected ZeroDivisionError (a bug in rnnlm") and line.endswith("boom")


def test_sigterm_stops_the_work_through_its_finally_blocks() -> None:
    cleaned: list[str] = []
    lines: list[str] = []

    def work() -> None:
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises before this ends
        finally:
            cleaned.append("temporaries removed")

    assert entry.run_guarded(work, lines.append) == entry.EXIT_SIGTERM
    assert cleaned == ["temporaries removed"]
    assert lines == ["stopped by SIGTERM; previous outputs are unchanged"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored afterwards


def _guarded_printer(*extra: str) -> list[str]:
    """A process that prints 100 kB through run_guarded, its stderr lines to the caller."""
    code = textwrap.dedent(
        """
        import sys
        from rnnlm.entry import run_guarded
        def report(line):
            print("ERROR", line, file=sys.stderr)
        sys.exit(run_guarded(lambda: print("x" * 100_000), report))
        """
    )
    return [sys.executable, "-c", code, *extra]


def test_a_full_standard_output_is_one_line_not_a_traceback() -> None:
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            _guarded_printer(),
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": SRC},
            timeout=60,
        )
    assert done.returncode == 1
    assert done.stderr.splitlines() == [
        "ERROR cannot write standard output: No space left on device"
    ]


def test_a_reader_that_stops_early_is_not_an_error() -> None:
    with subprocess.Popen(
        _guarded_printer(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": SRC},
    ) as proc:
        assert proc.stdout is not None and proc.stderr is not None
        proc.stdout.close()  # like `| head -c 0`
        err = proc.stderr.read()
        assert proc.wait(timeout=60) == 0
    assert err == b""


# -- the stage lock and the clean-up after killed stages -------------------------------------


def _params_file(tmp_path: Path) -> Path:
    return write_params(tmp_path / "params.yaml", {})


def test_a_second_stage_in_the_same_checkout_is_refused_naming_the_first(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    params_file = _params_file(tmp_path)
    lock = load_params(params_file).paths.stage_lock
    ran = []
    with stage.checkout_lock(lock, "train"), pytest.raises(SystemExit) as exit_info:
        stage.stage_main("a stage", lambda p, a: ran.append(1), ["--params", str(params_file)])
    assert exit_info.value.code == entry.EXIT_BUSY and not ran
    (error,) = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert "another rnnlm stage is running in this checkout: train " in error
    assert f"(pid {os.getpid()}, started " in error
    # Released when its holder ends, however it ends: the next stage runs.
    stage.stage_main("a stage", lambda p, a: ran.append(1), ["--params", str(params_file)])
    assert ran == [1]
    assert not lock.exists()  # a stage that ends leaves nothing in models/


def test_a_real_training_process_is_refused_while_another_holds_the_lock(
    tmp_path: Path,
) -> None:
    params_file = _params_file(tmp_path)
    lock = load_params(params_file).paths.stage_lock
    env = {**os.environ, "PYTHONPATH": SRC}
    for name in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        env.pop(name, None)
    with stage.checkout_lock(lock, "train"):
        done = subprocess.run(
            [sys.executable, "-m", "rnnlm.train", "--params", str(params_file)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
    assert done.returncode == entry.EXIT_BUSY, done.stderr
    (line,) = [line for line in done.stderr.splitlines() if " ERROR " in line]
    assert f"another rnnlm stage is running in this checkout: train (pid {os.getpid()}" in line
    assert "Traceback" not in done.stderr


def test_a_ddp_peer_does_not_take_the_lock_rank_zero_holds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    params_file = _params_file(tmp_path)
    monkeypatch.setenv("LOCAL_RANK", "1")
    ran = []
    with stage.checkout_lock(load_params(params_file).paths.stage_lock, "train"):
        stage.stage_main("a stage", lambda p, a: ran.append(1), ["--params", str(params_file)])
    assert ran == [1]


def test_temporaries_of_killed_stages_are_removed_and_nothing_else(tmp_path: Path) -> None:
    params_file = _params_file(tmp_path)
    paths = load_params(params_file).paths
    stale = [
        paths.processed_dir / ".train.npy.k2j4_9ab.tmp",  # atomic_path's file
        paths.raw_dir / ".tinycorpus.a1b2c3d4.tmp",  # atomic_path's folder
        paths.models_dir.parent / ".models.zz99yy88.tmp",  # staged_files' folder
        paths.raw_dir / ".tinycorpus.a1b2c3d4.old.tmp",  # a folder set aside by _swap_in
    ]
    kept = [
        paths.processed_dir / "train.npy",
        paths.processed_dir / "notes.tmp",
        paths.metrics_dir / ".draft.tmp",
        paths.raw_dir / "tinycorpus" / ".x.a1b2c3d4.tmp",  # inside an output: not ours to judge
    ]
    for path in stale[1:]:
        (path / "sub").mkdir(parents=True)
        (path / "sub" / "big").write_bytes(b"0" * 1000)
    for path in [stale[0], *kept]:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")
    stage.stage_main("a stage", lambda p, a: None, ["--params", str(params_file)])
    assert [p for p in stale if p.exists()] == []
    assert all(p.exists() for p in kept)


def test_an_output_set_aside_by_a_killed_swap_is_put_back(tmp_path: Path) -> None:
    """Killed between atomic_path's two renames: the output is missing and the previous one is
    set aside as `.<name>.<random>.old.tmp`; the next stage puts it back before it starts."""
    params_file = _params_file(tmp_path)
    raw_dir = load_params(params_file).paths.raw_dir
    set_aside = raw_dir / ".tinycorpus.q7w8e9r0.old.tmp"
    (set_aside / "1990-Dubois.txt").parent.mkdir(parents=True)
    (set_aside / "1990-Dubois.txt").write_text("the previous corpus")
    seen = []
    stage.stage_main(
        "a stage",
        lambda p, a: seen.append(sorted(p.name for p in raw_dir.iterdir())),
        ["--params", str(params_file)],
    )
    assert seen == [["tinycorpus"]]
    assert (raw_dir / "tinycorpus" / "1990-Dubois.txt").read_text() == "the previous corpus"
