"""End to end: `python -m rnnlm.batch_score` on Spark local[2] with the tiny pipeline's registry.

A few hundred generated documents (and a null, an empty and a blank one) in a Parquet file are
scored with models:/rnnlm/1 on two Spark workers, in processes where torch looks uninstalled
(the driver and Spark's Python workers alike). Every score must equal LanguageModel.score on the
exported models/model.onnx, every bad document must get an error row, and a job that fails must
leave the previous output as it was.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from rnnlm.inference import LanguageModel
from tests.e2e._pipeline import TAIL, pipeline_env
from tests.e2e.conftest import TinyPipeline
from tests.fixtures import blocker_log, make_tiny_corpus_docs, write_import_blocker

pytestmark = pytest.mark.e2e

BAD = {None: "no text: the value is null", "": "nothing to score: the text has no words"}
BLANK = " \n\t "
SCORES = ("ppl", "nll", "mean_nll")


def documents() -> list[str | None]:
    """About 300 paragraphs of generated prose, then the bad ones."""
    docs = make_tiny_corpus_docs(n_docs=50, seed=11)
    paragraphs = [
        p for name, text in sorted(docs.items()) if name != "README" for p in text.split("\n\n")
    ]
    return [*paragraphs, None, "", BLANK]


def batch_score(pipeline: TinyPipeline, tmp: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = pipeline_env(pipeline.project, pipeline.mirror_url)
    blocker = write_import_blocker(tmp / "blocker", tmp / "blocker-log")
    env["PYTHONPATH"] = f"{blocker}:{pipeline.project / 'src'}"
    env["RNNLM_PROJECT_ROOT"] = str(pipeline.project)  # its registry (params.yaml: mlflow)
    env["PYSPARK_SUBMIT_ARGS"] = "--conf spark.ui.enabled=false pyspark-shell"
    params = str(pipeline.project / "params.yaml")
    return subprocess.run(
        [sys.executable, "-m", "rnnlm.batch_score", "--params", params, *args],
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_spark_scores_every_document_as_the_library_does(
    tiny_pipeline: TinyPipeline, tmp_path: Path
) -> None:
    texts = documents()
    ids = [f"doc-{i:03d}" for i in range(len(texts))]
    source = tmp_path / "corpus.parquet"
    pd.DataFrame({"id": ids, "text": texts}).to_parquet(source)
    output = tmp_path / "scores.parquet"
    result = batch_score(
        tiny_pipeline, tmp_path, "--input", str(source), "--output", str(output),
        "--model", "models:/rnnlm/1", "--master", "local[2]",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-TAIL:]
    assert f"scored {len(texts)} documents" in result.stderr, result.stderr[-TAIL:]

    scored = pd.read_parquet(output)
    assert scored.columns.tolist() == ["id", "row", *SCORES, "tokens", "unknown", "error"]
    assert scored["row"].tolist() == list(range(len(texts)))  # sorted, every document once
    assert scored["id"].tolist() == ids
    library = LanguageModel(tiny_pipeline.project / "models" / "model.onnx", threads=1)
    for text, row in zip(texts, scored.itertuples(), strict=True):
        if text is None or not text.strip():
            assert row.error == BAD.get(text, BAD[""]), (text, row)
            assert all(math.isnan(getattr(row, name)) for name in SCORES)
            continue
        expected = library.score(text)
        assert pd.isna(row.error), row
        assert (row.tokens, row.unknown) == (expected.tokens, expected.unknown), row
        for name in SCORES:
            assert getattr(row, name) == pytest.approx(getattr(expected, name), rel=1e-6)

    # torch looked uninstalled in the driver and in Spark's Python workers (pyspark probes it).
    processes, _ = blocker_log(tmp_path / "blocker-log")
    assert any("rnnlm.batch_score" in line for line in processes), processes  # the driver
    assert any("pyspark.daemon" in line for line in processes), processes  # the executors

    # A failed job leaves the previous output as it was, and says why in one line.
    before = {p.name: p.read_bytes() for p in output.iterdir()}
    failed = batch_score(
        tiny_pipeline, tmp_path, "--input", str(source), "--output", str(output),
        "--model", "models:/rnnlm/7",
    )  # fmt: skip
    assert failed.returncode == 1, failed.stderr[-TAIL:]
    errors = [line for line in failed.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "downloading model models:/rnnlm/7" in errors[0], errors
    assert "Traceback" not in failed.stderr
    assert {p.name: p.read_bytes() for p in output.iterdir()} == before
    # Nothing left beside the output (temporaries), no stray MLflow store where it ran.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["blocker", "blocker-log", "corpus.parquet", "scores.parquet"]
    )
