"""batch_score.py without Spark: inputs, models, Java, what each Spark task runs, atomic output.

The Spark job itself (local[2], a registered model, torch hidden) is tests/e2e/test_batch_score.py.
Here the function the workers run is called directly on pandas batches, and the job's output
step with a writer that fails half-way.
"""

from __future__ import annotations

import stat
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pandas as pd
import pyspark
import pytest

from rnnlm import batch_score
from rnnlm.batch_score import BatchScoreError, Job
from rnnlm.inference import LanguageModel
from tests.unit.test_export import (
    build_net,
    one_torch_thread,  # noqa: F401 (autouse)
    write_model,
)

UNLIMITED = {"threads": 1, "max_documents": None, "max_chars": None, "max_tokens": None}


@pytest.fixture(scope="module")
def onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_model(tmp_path_factory.mktemp("onnx") / "model.onnx", build_net("gru"))


@pytest.fixture(scope="module")
def pyfunc_model(onnx_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pyfunc folder batch_score builds from a .onnx file."""
    folder = tmp_path_factory.mktemp("pyfunc") / "model"
    return batch_score.prepare_model(str(onnx_model), folder, Path("no-params.yaml"))


def test_the_input_kind_comes_from_the_path(tmp_path: Path) -> None:
    parts = tmp_path / "table"
    parts.mkdir()
    (parts / "part-0.parquet").write_bytes(b"")
    (parts / "_SUCCESS").write_bytes(b"")
    texts = tmp_path / "texts"
    (texts / "sub").mkdir(parents=True)
    (texts / "a.parquet").write_bytes(b"")  # one of many files: still a text folder
    (texts / "sub" / "b.txt").write_bytes(b"")
    (tmp_path / "docs.csv").write_bytes(b"text\n")
    assert batch_score.input_format(parts, "auto") == "parquet"
    assert batch_score.input_format(texts, "auto") == "text"
    assert batch_score.input_format(tmp_path / "docs.csv", "auto") == "csv"
    assert batch_score.input_format(texts, "csv") == "csv"
    for requested in ("auto", "parquet"):
        with pytest.raises(BatchScoreError, match=r"missing: no such file or folder"):
            batch_score.input_format(tmp_path / "missing", requested)


def test_a_text_folder_lists_every_file_empty_ones_included(tmp_path: Path) -> None:
    (tmp_path / "sub" / ".git").mkdir(parents=True)
    for name in ("b.txt", "sub/a.txt", "sub/.git/config", ".hidden", "empty"):
        (tmp_path / name).write_bytes(b"" if name == "empty" else b"x")
    assert batch_score.list_documents(tmp_path) == ["b.txt", "empty", "sub/a.txt"]
    with pytest.raises(BatchScoreError, match="a text input is a folder of files"):
        batch_score.list_documents(tmp_path / "b.txt")
    (tmp_path / "none").mkdir()
    with pytest.raises(BatchScoreError, match="none: no files to score"):
        batch_score.list_documents(tmp_path / "none")


def test_the_spark_task_function_scores_rows_as_the_library_does(
    pyfunc_model: Path, onnx_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The function the Spark workers run, on pandas batches (SparkFiles.get answered here)."""
    monkeypatch.setattr(pyspark.SparkFiles, "get", lambda name: str(pyfunc_model.parent / name))
    library = LanguageModel(onnx_model)
    texts = ["The president said that we will build a strong nation.", None, "", "Today"]
    table = batch_score.scorer(pyfunc_model.name, UNLIMITED, None)
    batches = [
        pd.DataFrame({"id": ["a", "b"], "text": texts[:2], "row": [0, 1]}),
        pd.DataFrame({"id": ["c", "d"], "text": texts[2:], "row": [2, 3]}),
    ]
    out = pd.concat(list(table(iter(batches))), ignore_index=True)
    assert out.columns.tolist() == ["id", "row", *(n for n, _ in batch_score.RESULT_FIELDS)]
    assert out["error"].tolist() == [
        None,
        "no text: the value is null",
        "nothing to score: the text has no words",
        None,
    ]
    for i in (0, 3):
        assert out.loc[i, ["ppl", "nll", "mean_nll", "tokens", "unknown"]].tolist() == list(
            library.score(texts[i]).to_dict().values()
        )
    # A text folder: the worker reads each file and decodes it as the corpus is (Latin-1 here).
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.txt").write_bytes("The café is open.".encode("latin-1"))
    (tmp_path / "empty.txt").write_bytes(b"")
    folder = batch_score.scorer(pyfunc_model.name, UNLIMITED, str(tmp_path))
    out = next(folder(iter([pd.DataFrame({"path": ["empty.txt", "sub/a.txt"]})])))
    assert out["path"].tolist() == ["empty.txt", "sub/a.txt"]
    assert out["error"].tolist() == ["nothing to score: the text has no words", None]
    assert out.loc[1, "ppl"] == library.score("The café is open.").ppl


def test_a_model_is_a_onnx_file_a_pyfunc_folder_or_a_uri(
    pyfunc_model: Path, onnx_model: Path, tmp_path: Path
) -> None:
    import mlflow

    info = mlflow.models.Model.load(str(pyfunc_model))
    assert info.flavors["python_function"]["config"] == UNLIMITED  # no request limits
    assert (pyfunc_model / "artifacts" / "model.onnx").read_bytes() == onnx_model.read_bytes()
    assert batch_score.prepare_model(str(pyfunc_model), tmp_path / "x", Path("p")) == pyfunc_model
    assert not (tmp_path / "x").exists()
    (tmp_path / "plain").mkdir()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not onnx")
    cases = [
        (tmp_path / "plain", "plain: a folder without an MLmodel file, not an MLflow model"),
        (tmp_path / "missing.onnx", "missing.onnx: no such model file"),
        (bad, "bad.onnx: not an ONNX model (cannot parse it)"),
    ]
    for model, message in cases:
        with pytest.raises(BatchScoreError, match=message.replace("(", r"\(").replace(")", r"\)")):
            batch_score.prepare_model(str(model), tmp_path / "m", Path("p"))


def _fake_java(folder: Path, version_line: str) -> str:
    java = folder / "java"
    java.write_text(f"#!/bin/sh\necho '{version_line}' >&2\n", encoding="utf-8")
    java.chmod(java.stat().st_mode | stat.S_IEXEC)
    return str(java)


def test_java_17_or_later_is_required(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(batch_score.shutil, "which", lambda name: None)
    with pytest.raises(BatchScoreError, match="Spark needs Java 17 or later and `java` is not on"):
        batch_score.check_java()
    for line, ok in [
        ('openjdk version "17.0.15" 2025-04-15', True),
        ('openjdk version "21" 2023-09-19', True),
        ('java version "1.8.0_392"', False),
        ('openjdk version "11.0.2" 2019-01-15', False),
    ]:
        java = _fake_java(tmp_path, line)
        monkeypatch.setattr(batch_score.shutil, "which", lambda name, java=java: java)
        if ok:
            batch_score.check_java()
        else:
            with pytest.raises(
                BatchScoreError, match=f"Spark needs Java 17 or later; .* is '{line}'"
            ):
                batch_score.check_java()


class _FailingWrite:
    """A DataFrame whose parquet writer leaves part files, then fails (a task died)."""

    def __init__(self) -> None:
        self.write = self

    def parquet(self, path: str) -> None:
        Path(path).mkdir()
        (Path(path) / "part-00000.parquet").write_bytes(b"half")
        raise RuntimeError("Job aborted due to stage failure")


def test_a_failed_job_leaves_the_previous_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    output = tmp_path / "scores.parquet"
    output.mkdir()
    (output / "part-00000.parquet").write_bytes(b"previous scores")
    model = tmp_path / "model"
    model.mkdir()
    (model / "MLmodel").write_text("flavors: {}\n")
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_text("Some text.")
    spark: Any = SimpleNamespace()
    monkeypatch.setattr(batch_score, "start_spark", lambda master: spark)
    monkeypatch.setattr(batch_score, "score", lambda *args: _FailingWrite())
    job = Job(tmp_path / "docs", output, str(model), "auto", None, None, Path("params.yaml"))
    with pytest.raises(RuntimeError, match="Job aborted"):
        batch_score.run(job)
    assert [p.name for p in output.iterdir()] == ["part-00000.parquet"]
    assert (output / "part-00000.parquet").read_bytes() == b"previous scores"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "model", "scores.parquet"]


def test_command_line(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    code = batch_score.main(["--input", str(tmp_path / "nothing"), "--output", str(tmp_path / "o")])
    assert code == 1
    assert caplog.messages[-1] == f"{tmp_path / 'nothing'}: no such file or folder"
    with pytest.raises(SystemExit) as exit_:
        batch_score.main(["--input", "x", "--output", "y", "--partitions", "0"])
    assert exit_.value.code == 2
