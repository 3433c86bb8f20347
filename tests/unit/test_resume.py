"""When a training resumes and when it starts afresh; the pieces an exact resume relies on.

The signal-driven interrupt/resume cycle of a real process is in tests/e2e/test_train_resume.py.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import pytest
import torch

from rnnlm import resume, train
from rnnlm.config import Params
from rnnlm.datamodule import CorpusDataModule, ResumableSequentialSampler
from tests.fixtures import write_full_params

MD5 = {"train.npy": "aa", "vocab.json": "bb"}


def expected(params: Params, **train_changes: object) -> dict[str, str]:
    t = dataclasses.replace(params.train, **train_changes)
    return resume.fingerprint(params.model, t, MD5)


def write_checkpoint(folder: Path, fingerprint: dict[str, str] | None, run_id: str = "r1") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": fingerprint, "run_id": run_id, "mid_epoch_windows": 0}
    path = folder / resume.LAST
    torch.save({"epoch": 2, "global_step": 40, resume.STATE_KEY: state}, path)
    return path


def test_fingerprint_covers_model_train_and_data_but_not_the_resume_switch(
    tiny_params: Params,
) -> None:
    base = expected(tiny_params)
    assert {"model.hidden_dim", "train.lr", "train.seed", "data.md5.train.npy"} <= set(base)
    assert expected(tiny_params, resume=False) == base
    assert expected(tiny_params, lr=0.02) != base
    other_data = resume.fingerprint(tiny_params.model, tiny_params.train, {**MD5, "train.npy": "x"})
    assert other_data != base


def test_matching_checkpoint_is_resumed(tiny_params: Params, tmp_path: Path) -> None:
    path = write_checkpoint(tmp_path / "ckpt", expected(tiny_params))
    point = resume.find_resume_point(tmp_path / "ckpt", expected(tiny_params), resume=True)
    assert point == resume.ResumePoint(checkpoint=path, run_id="r1")


def test_changed_param_starts_afresh_and_says_what_changed(
    tiny_params: Params, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_checkpoint(tmp_path / "ckpt", expected(tiny_params))
    with caplog.at_level(logging.WARNING, logger="rnnlm"):
        point = resume.find_resume_point(
            tmp_path / "ckpt", expected(tiny_params, lr=0.02), resume=True
        )
    assert point is None
    assert not (tmp_path / "ckpt").exists()  # never resumed into later
    assert "starting afresh" in caplog.text and "train.lr: 0.01 -> 0.02" in caplog.text


def test_resume_false_starts_afresh(tiny_params: Params, tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "ckpt", expected(tiny_params))
    assert resume.find_resume_point(tmp_path / "ckpt", expected(tiny_params), False) is None
    assert not (tmp_path / "ckpt").exists()


def test_foreign_or_incomplete_checkpoint_folder_starts_afresh(
    tiny_params: Params, tmp_path: Path
) -> None:
    write_checkpoint(tmp_path / "a", None)  # a Lightning checkpoint without our state
    assert resume.find_resume_point(tmp_path / "a", expected(tiny_params), True) is None
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "best.ckpt").write_bytes(b"x")  # killed before the first epoch ended
    assert resume.find_resume_point(tmp_path / "b", expected(tiny_params), True) is None
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_only_rank_zero_deletes(tiny_params: Params, tmp_path: Path) -> None:
    write_checkpoint(tmp_path / "ckpt", expected(tiny_params))
    assert (
        resume.find_resume_point(tmp_path / "ckpt", expected(tiny_params, lr=0.02), True, False)
        is None
    )
    assert (tmp_path / "ckpt" / resume.LAST).exists()


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_checkpoint_is_an_error_not_a_silent_fresh_start(
    tiny_params: Params, tmp_path: Path, damage: str
) -> None:
    path = write_checkpoint(tmp_path / "ckpt", expected(tiny_params))
    data = path.read_bytes()
    path.write_bytes(
        {"truncated": data[: len(data) // 2], "garbage": b"not a checkpoint", "empty": b""}[damage]
    )
    with pytest.raises(resume.ResumeError, match="truncated or corrupt") as err:
        resume.find_resume_point(tmp_path / "ckpt", expected(tiny_params), True)
    assert str(path) in str(err.value) and "train.resume=false" in str(err.value)
    assert path.exists()  # the user decides
    # Asked for a fresh start, it gets one.
    assert resume.find_resume_point(tmp_path / "ckpt", expected(tiny_params), False) is None


def test_sampler_skips_once_and_keeps_its_length() -> None:
    sampler = ResumableSequentialSampler(5)
    sampler.skip_next(3)
    assert len(sampler) == 5
    assert list(sampler) == [3, 4]
    assert list(sampler) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="cannot skip 6 of 5"):
        sampler.skip_next(6)


def test_starting_an_epoch_leaves_the_global_rng_alone(processed_tiny: Params) -> None:
    """Dropout masks come from the global RNG: a data loader must not draw from it."""
    p = processed_tiny
    data = CorpusDataModule(p.paths, 4, 8)
    data.setup("fit")
    loader = data.train_dataloader()
    before = torch.get_rng_state()
    next(iter(loader))
    assert torch.equal(torch.get_rng_state(), before)


def test_train_with_a_stale_checkpoint_starts_afresh_in_a_new_run(
    processed_tiny: Params, caplog: pytest.LogCaptureFixture
) -> None:
    p = processed_tiny
    folder = p.paths.models_dir / "checkpoints"
    stale = resume.fingerprint(
        p.model, dataclasses.replace(p.train, lr=0.5), train.data_md5(p.paths)
    )
    write_checkpoint(folder, stale, run_id="old-run")
    with caplog.at_level(logging.WARNING, logger="rnnlm"):
        metrics = train.run_from_params(p)
    assert "train.lr: 0.5 -> 0.01" in caplog.text
    assert metrics["run_id"] != "old-run" and metrics["epochs"] == p.train.max_epochs


def test_main_reports_a_corrupt_checkpoint_and_no_resume_overrides_it(
    processed_tiny: Params, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    p = processed_tiny
    folder = p.paths.models_dir / "checkpoints"
    folder.mkdir(parents=True)
    (folder / resume.LAST).write_bytes(b"\x80\x02 half a checkpoint")
    argv = ["--params", str(write_full_params(p, tmp_path / "params.yaml"))]
    with pytest.raises(SystemExit) as exit_info:
        train.main(argv)  # the stage's entry point, as `python -m rnnlm.train` runs it
    assert exit_info.value.code == 1
    (error,) = [r for r in caplog.records if r.levelname == "ERROR"]
    assert "truncated or corrupt" in error.message and str(folder / resume.LAST) in error.message
    assert "\n" not in error.message and error.exc_info is None  # one line, no traceback
    assert not (p.paths.models_dir / "model.ckpt").exists()

    caplog.clear()
    with caplog.at_level(logging.INFO):
        train.main([*argv, "--no-resume"])
    assert "starting afresh: train.resume is false" in caplog.text
    assert (p.paths.models_dir / "model.ckpt").is_file()
