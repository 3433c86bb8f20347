"""Score a corpus on Spark: the perplexity of every document, with the registered model.

    python -m rnnlm.batch_score --input docs/ --output scores.parquet [--model models:/rnnlm/3]
                                [--master local[2]] [--partitions N] [--params params.yaml]
    spark-submit --master local[2] src/rnnlm/batch_score.py --input ... --output ...

Input (`--input`, the kind chosen by `--format`, by default from the path):
    a folder of text files   each file one document (empty ones included), read recursively
                             except hidden files and folders, decoded as the corpus is (UTF-8
                             when valid, else Latin-1); output column `path`, relative to the
                             folder. The Spark workers read the files: a folder every executor
                             sees (local mode, a shared mount)
    Parquet (.parquet)       a file or a folder of parts with a string column `text`
    CSV (.csv)               a header row and a column `text` (RFC 4180 quoting, multi-line
                             values); every column read as a string
A table's other columns are kept in the output, with `row`: the document's 0-based position in
the input.

Model (`--model`): an exported .onnx file (default models/model.onnx), a registry URI
(models:/rnnlm/3, models:/rnnlm@champion, runs:/...) read from the pipeline's tracking store
(MLFLOW_TRACKING_URI, else params.yaml's mlflow section, else mlruns/ of the project), or a
local pyfunc folder. A .onnx file is wrapped into the same pyfunc model the export stage
registers (rnnlm.serving), so both score identically. Each Spark task loads the model once
(onnxruntime threads = spark.task.cpus) and scores its documents with the pyfunc's `score`
task, without the serving limits on request size.

Output (`--output`, a Parquet folder): the key columns (`path`, or the table's columns and
`row`), then `ppl`, `nll`, `mean_nll`, `tokens`, `unknown` (LanguageModel.score(text)) and
`error`: null, or why the document has no score (a null text, a text without words); such a
row never fails the job. Sorted by `path` or `row`. Written to a temporary folder beside the
output and renamed into place when the job succeeded: a failed job leaves a previous output as
it was. The output must be on a filesystem the driver sees (a local or mounted path).

Spark runs the model in its Python workers: they import pandas, mlflow, onnxruntime, numpy,
NLTK and the model's own code (its rnnlm modules), never torch; the executors need no rnnlm
install. pyspark is the optional extra `rnnlm[spark]`; Java 17 or later the one system
requirement. Ends as every rnnlm command does (rnnlm.entry): one line and exit 1 on an
expected failure.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from rnnlm import serving, tracking
from rnnlm.config import DEFAULT_PARAMS, MlflowParams, load_params
from rnnlm.entry import run_guarded
from rnnlm.errors import RnnlmError
from rnnlm.files import atomic_path, configure_logging, scratch_dir
from rnnlm.inference import LanguageModel, ModelLoadError

if TYPE_CHECKING:
    from pyspark.sql import DataFrame, SparkSession

log = logging.getLogger(__name__)

DEFAULT_MODEL = Path("models/model.onnx")
FORMATS = ("auto", "text", "parquet", "csv")
MIN_JAVA = 17
# The scores, as rnnlm.serving's `score` task returns them, and their Spark types.
RESULT_FIELDS = (
    ("ppl", "double"),
    ("nll", "double"),
    ("mean_nll", "double"),
    ("tokens", "long"),
    ("unknown", "long"),
    ("error", "string"),
)
PATH_COLUMN = "path"  # the key of a text folder's documents
ROW_COLUMN = "row"  # the key of a table's documents
# A registry or artifact URI, as opposed to a path: "models:/...", "runs:/...", "s3://...".
_URI = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


class BatchScoreError(RnnlmError):
    """The job cannot run: a bad argument, input or model, no Java, no pyspark."""


@dataclasses.dataclass(frozen=True)
class Job:
    """What to score, with which model, into where."""

    input: Path
    output: Path
    model: str
    format: str
    master: str | None
    partitions: int | None
    params: Path


def input_format(path: Path, requested: str) -> str:
    """text, parquet or csv: `requested` unless auto, else from the path's suffix (a folder
    of .parquet or .csv parts counts as one), else text."""
    if not path.exists():
        raise BatchScoreError(f"{path}: no such file or folder")
    if requested != "auto":
        return requested
    suffixes = (
        {p.suffix for p in path.rglob("*") if p.is_file() and not p.name.startswith((".", "_"))}
        if path.is_dir()
        else {path.suffix}
    )
    for kind in ("parquet", "csv"):
        if path.suffix == f".{kind}" or suffixes == {f".{kind}"}:
            return kind
    return "text"


def mlflow_params(params: Path) -> MlflowParams:
    """The tracking store's settings: params.yaml's mlflow section when the file exists (run
    from the project), else the environment's MLFLOW_TRACKING_URI or the project's mlruns/."""
    if params.is_file():
        return load_params(params).mlflow
    return MlflowParams(experiment_name="rnnlm", tracking_uri=None)


def unlimited(threads: int) -> serving.ServingConfig:
    """The served model's config for batch scoring: no request limits (a Spark batch is no
    HTTP request, and a document may be a book), `threads` onnxruntime threads."""
    return serving.ServingConfig(
        threads=threads, max_documents=None, max_chars=None, max_tokens=None
    )


def prepare_model(model: str, folder: Path, params: Path) -> Path:
    """A local pyfunc folder for `model` (written under `folder` unless it is one already)."""
    if _URI.match(model):
        return tracking.download_model(model, folder, mlflow_params(params))
    path = Path(model)
    if path.is_dir():
        if not (path / "MLmodel").is_file():
            raise BatchScoreError(f"{path}: a folder without an MLmodel file, not an MLflow model")
        return path
    if not path.exists():
        raise BatchScoreError(f"{path}: no such model file (export one with dvc repro)")
    try:
        LanguageModel(path)  # an unusable file fails here, in rnnlm's words
    except ModelLoadError as err:
        raise BatchScoreError(str(err)) from None
    with serving.model_files(path, unlimited(threads=1)) as files:
        tracking.save_pyfunc_model(files, folder)
    return folder


def check_java(minimum: int = MIN_JAVA) -> None:
    """BatchScoreError unless `java -version` reports at least `minimum` (Spark 4 needs 17)."""
    java = shutil.which("java")
    if java is None:
        raise BatchScoreError(
            f"Spark needs Java {minimum} or later and `java` is not on PATH: install a JDK "
            "(e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME and PATH"
        )
    try:
        report = subprocess.run(
            [java, "-version"], capture_output=True, text=True, timeout=60
        ).stderr
    except (OSError, subprocess.SubprocessError) as err:
        raise BatchScoreError(f"cannot run {java} -version: {err}") from None
    match = re.search(r'version "(\d+)(?:\.(\d+))?', report)
    major = int(match[1]) if match else 0
    if major == 1 and match and match[2]:  # "1.8.0_392" is Java 8
        major = int(match[2])
    if major < minimum:
        first = report.strip().splitlines()[0] if report.strip() else "no version"
        raise BatchScoreError(
            f"Spark needs Java {minimum} or later; {java} is {first!r}: install a newer JDK "
            "and put it first on PATH (or set JAVA_HOME)"
        )


def start_spark(master: str | None) -> SparkSession:
    """The job's SparkSession: `master` when given, else what spark-submit (or Spark's
    defaults) set."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise BatchScoreError(
            "pyspark is not installed: pip install -c constraints.txt -e '.[spark]'"
        ) from None
    if SparkSession.getActiveSession() is None:
        check_java()
    builder = SparkSession.builder.appName("rnnlm-batch-score")
    if master:
        builder = builder.master(master)
    try:
        spark = builder.getOrCreate()
    except Exception as err:  # Py4J and Spark raise many types
        raise BatchScoreError(f"Spark did not start: {' '.join(str(err).split())[:300]}") from err
    spark.sparkContext.setLogLevel("WARN")
    return spark


def list_documents(folder: Path) -> list[str]:
    """The files of a text folder, recursively, as paths relative to it (sorted); hidden
    files and folders (a name starting with ".") left out. Empty files are documents too."""
    if not folder.is_dir():
        raise BatchScoreError(f"{folder}: a text input is a folder of files, one a document")
    names = [
        path.relative_to(folder).as_posix()
        for path in folder.rglob("*")
        if path.is_file()
        and not any(part.startswith(".") for part in path.relative_to(folder).parts)
    ]
    if not names:
        raise BatchScoreError(f"{folder}: no files to score")
    return sorted(names)


def read_documents(spark: SparkSession, path: Path, kind: str, names: list[str]) -> DataFrame:
    """The input as Spark rows: the key columns, and `text` (a table) or nothing more (a text
    folder, its files `names`: the workers read each file by its `path`)."""
    from pyspark.sql.types import LongType, StringType, StructField, StructType

    if kind == "text":
        return spark.createDataFrame([(name,) for name in names], f"{PATH_COLUMN} string")
    if kind == "parquet":
        frame = spark.read.parquet(spark_path(path))
    else:
        frame = spark.read.csv(spark_path(path), header=True, multiLine=True, escape='"')
    fields = {field.name: field for field in frame.schema.fields}
    if serving.TEXT_COLUMN not in fields:
        raise BatchScoreError(
            f"{path}: no {serving.TEXT_COLUMN!r} column (columns: {', '.join(fields) or 'none'})"
        )
    if not isinstance(fields[serving.TEXT_COLUMN].dataType, StringType):
        raise BatchScoreError(
            f"{path}: column {serving.TEXT_COLUMN!r} is "
            f"{fields[serving.TEXT_COLUMN].dataType.simpleString()}, expected string"
        )
    taken = [name for name in fields if name in {ROW_COLUMN, *(n for n, _ in RESULT_FIELDS)}]
    if taken:
        raise BatchScoreError(f"{path}: column {taken[0]!r} would clash with an output column")
    # The position in the input, before Spark spreads the rows over its tasks.
    schema = StructType([*frame.schema.fields, StructField(ROW_COLUMN, LongType(), False)])
    indexed = frame.rdd.zipWithIndex().map(lambda pair: (*pair[0], pair[1]))
    return spark.createDataFrame(indexed, schema)


def scorer(
    model_name: str, model_config: dict[str, Any], folder: str | None
) -> Callable[[Iterator[pd.DataFrame]], Iterator[pd.DataFrame]]:
    """The function each Spark task runs on its batches of rows (mapInPandas).

    Rows hold `text`, or for a text folder (`folder`: its absolute path) a file's `path`
    relative to it: the worker reads the file and decodes it with the model's copy of
    rnnlm.text. The function runs in Spark's Python workers. It is a closure, which Spark
    pickles by value, and refers to no rnnlm module: a worker needs pandas and mlflow, not an
    rnnlm install. The model folder reaches the workers through SparkContext.addFile; loading
    it puts the model's own rnnlm modules first on sys.path. Loading the model folder is the
    executors' one MLflow call (rnnlm.tracking, the driver's, is not there).
    """
    text_column, path_column = serving.TEXT_COLUMN, PATH_COLUMN

    def score(batches: Iterator[pd.DataFrame]) -> Iterator[pd.DataFrame]:
        import os

        import mlflow.pyfunc
        from pyspark import SparkFiles

        model = mlflow.pyfunc.load_model(SparkFiles.get(model_name), model_config=model_config)
        for batch in batches:
            if folder is None:
                texts = batch.pop(text_column).tolist()
            else:
                from rnnlm.text import decode_document  # the model's copy (its code/)

                texts = []
                for name in batch[path_column]:
                    with open(os.path.join(folder, name), "rb") as document:
                        texts.append(decode_document(document.read()))
            frame = pd.DataFrame({text_column: pd.Series(texts, dtype=object)})
            result = model.predict(frame, params={"task": "score"})
            yield pd.concat([batch.reset_index(drop=True), result], axis=1)

    return score


def score(spark: SparkSession, job: Job, kind: str, names: list[str], model_dir: Path) -> DataFrame:
    """The scored documents (of a text folder: its files `names`): key columns, then
    RESULT_FIELDS, sorted by the key."""
    from pyspark.sql.types import StructType

    documents = read_documents(spark, job.input, kind, names)
    key = PATH_COLUMN if kind == "text" else ROW_COLUMN
    keys = [f for f in documents.schema.fields if f.name != serving.TEXT_COLUMN]
    schema = StructType(keys)
    for name, dtype in RESULT_FIELDS:
        schema = schema.add(name, dtype, True)
    spark.sparkContext.addFile(str(model_dir), recursive=True)
    threads = int(spark.conf.get("spark.task.cpus", "1") or 1)
    config = unlimited(threads).to_dict()  # overrides what a registered model was saved with
    partitions = job.partitions or spark.sparkContext.defaultParallelism
    folder = str(job.input.resolve()) if kind == "text" else None
    scored = documents.repartition(partitions).mapInPandas(
        scorer(model_dir.name, config, folder), schema
    )
    # Sorted in one task after a shuffle: scoring stays spread over the tasks, and a global
    # orderBy would score everything twice (once to sample the sort key's range).
    return scored.repartition(1).sortWithinPartitions(key)


def summarize(output: Path) -> dict[str, int]:
    """Documents, tokens and error rows of the written output (read here: it is local)."""
    frame = pd.read_parquet(output, columns=["tokens", "error"])
    return {
        "documents": len(frame),
        "tokens": int(frame["tokens"].sum()),  # nulls (error rows) skipped
        "errors": int(frame["error"].notna().sum()),
    }


def spark_path(path: Path) -> str:
    """`path` for Spark's readers, which take it as a glob: its glob characters escaped."""
    return re.sub(r"([\\\[\]{}*?])", r"\\\1", str(path))


def run(job: Job) -> dict[str, Any]:
    """Prepare the model, score every document on Spark, write the output atomically; return
    the counts and throughput that were logged."""
    # A missing input, or a folder without files, fails before Spark starts. A text folder is
    # listed here, not by Spark's binaryFile source, which drops empty files unseen.
    kind = input_format(job.input, job.format)
    names = list_documents(job.input) if kind == "text" else []
    with scratch_dir(job.output) as scratch:
        model_dir = prepare_model(job.model, scratch / "model", job.params)
        spark = start_spark(job.master)
        started = time.perf_counter()
        scored = score(spark, job, kind, names, model_dir)
        with atomic_path(job.output) as tmp:
            scored.write.parquet(str(tmp))
        seconds = time.perf_counter() - started
    counts = summarize(job.output)
    result = {
        **counts,
        "seconds": round(seconds, 3),
        "documents_per_s": round(counts["documents"] / seconds, 3),
        "tokens_per_s": round(counts["tokens"] / seconds, 1),
        "format": kind,
        "master": spark.sparkContext.master,
    }
    log.info(
        "scored %d documents (%d tokens, %d with an error) from %s in %.1f s on %s: "
        "%.2f documents/s, %.0f tokens/s; wrote %s",
        counts["documents"],
        counts["tokens"],
        counts["errors"],
        job.input,
        seconds,
        result["master"],
        result["documents_per_s"],
        result["tokens_per_s"],
        job.output,
    )
    return result


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected int, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m rnnlm.batch_score",
        description="Perplexity of every document of a corpus, on Spark.",
    )
    parser.add_argument(
        "--input", type=Path, required=True, help="folder of text files, .parquet or .csv"
    )
    parser.add_argument("--output", type=Path, required=True, help="Parquet folder to write")
    parser.add_argument(
        "--model",
        default=str(DEFAULT_MODEL),
        help=f"a .onnx file, models:/NAME/VERSION, models:/NAME@ALIAS (default: {DEFAULT_MODEL})",
    )
    parser.add_argument("--format", choices=FORMATS, default="auto", help="input kind")
    parser.add_argument(
        "--master", help="Spark master, e.g. local[2] (default: spark-submit's, else local[*])"
    )
    parser.add_argument(
        "--partitions",
        type=_positive,
        help="Spark tasks the documents are spread over (default: Spark's default parallelism)",
    )
    parser.add_argument(
        "--params",
        type=Path,
        default=DEFAULT_PARAMS,
        help="params file whose mlflow section names the tracking store (for models:/ URIs)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    job = Job(
        input=args.input,
        output=args.output,
        model=args.model,
        format=args.format,
        master=args.master,
        partitions=args.partitions,
        params=args.params,
    )

    def work() -> None:
        run(job)

    return run_guarded(work, lambda line: log.error("%s", line))


if __name__ == "__main__":
    sys.exit(main())
