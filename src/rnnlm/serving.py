"""The registered model: rnnlm behind MLflow's pyfunc interface, text in and results out.

    model = mlflow.pyfunc.load_model("models:/rnnlm@champion")
    model.predict(pd.DataFrame({"text": ["The state of the union"]}), params={"task": "next"})
    mlflow models serve -m models:/rnnlm/3 --env-manager local        (HTTP: POST /invocations)
    python -m rnnlm.batch_score --input docs/ --output scores.parquet    (Spark)

The export stage logs this model to the training run and registers each version of
`export.registered_model_name` from it (`model_files` says what goes in, tracking.py logs it):

    MLmodel               flavor python_function: signature (input, outputs, params with their
                          defaults), model_config (ServingConfig), input example
    served_model.py       MLflow's "model from code" (no pickle): builds TextModel
    code/rnnlm/           the rnnlm modules TextModel imports (SERVED_MODULES): numpy,
                          onnxruntime and NLTK underneath, never torch
    artifacts/model.onnx  models/model.onnx, byte for byte (artifact ONNX_ARTIFACT): a client
                          that wants the raw network downloads it
    requirements.txt      SERVED_PACKAGES, pinned to the versions the model was exported with

Input: one document (or prompt) per row, in the string column `text` (a DataFrame; a list of
strings also does). Params choose the task and its options; their defaults are those of
`LanguageModel.next_words` and `.generate`:

    task      score      one row per document: ppl, nll, mean_nll, tokens, unknown
                         (LanguageModel.score(text).to_dict())
              next       next_words: the k most likely next tokens, [{word, probability}, ...]
              generate   generated: num_samples continuations of the prompt
    k, max_tokens, temperature, top_k, top_p, seed, num_samples, stop_at_eos, include_prompt

Every output row also has `error`: null, or why that document got no result (a null text,
a text with no words to score, a prompt over 100,000 characters). A whole request is refused,
with a `RequestError` (MLflow's INVALID_PARAMETER_VALUE, HTTP 400 from the scoring server) in
one line, when it is malformed: a value that is not a string, an unknown task, a param out of
range, or more than ServingConfig allows in one request (documents, characters, tokens to
generate). MLflow's own checks come first: a request without a `text` column, or a param of the
wrong type, is refused by MLflow (also HTTP 400), and params the signature does not declare are
dropped by MLflow with a warning in the server's log.

Imports mlflow (the PythonModel base class, its exception and signature types), pandas and
rnnlm.inference, never torch. This module is the served model's code, not a pipeline step: its
MLflow imports are the model's interface; logging and loading models stays in rnnlm.tracking.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.metadata
import inspect
import math
import shutil
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel, PythonModelContext
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from mlflow.types.schema import Array, Object, Property

from rnnlm.errors import RnnlmError, is_int, short_repr
from rnnlm.inference import LanguageModel, check_k, check_sampling

TEXT_COLUMN = "text"
ONNX_ARTIFACT = "onnx_model"  # the model's artifact name for the .onnx file
MODEL_CODE = Path(__file__).with_name("served_model.py")
# The rnnlm modules TextModel needs, shipped as the model's code: what serving.py imports,
# transitively (a unit test keeps the list in step with the imports).
SERVED_MODULES = (
    "__init__",
    "cache",
    "errors",
    "graphs",
    "inference",
    "ngram",
    "serving",
    "streams",
    "text",
)
# What the served model imports, pinned in its requirements: no torch, no Lightning.
SERVED_PACKAGES = ("mlflow", "onnx", "onnxruntime", "numpy", "nltk", "pandas", "threadpoolctl")

TASKS = ("score", "next", "generate")
DEFAULT_TASK = "score"
# Param -> (its MLflow type, the LanguageModel method whose keyword it is): its default is
# that method's, so a served answer is the library's for the same arguments.
TASK_PARAMS: dict[str, tuple[str, str]] = {
    "k": ("long", "next_words"),
    "max_tokens": ("long", "generate"),
    "temperature": ("double", "generate"),
    "top_k": ("long", "generate"),
    "top_p": ("double", "generate"),
    "seed": ("long", "generate"),
    "num_samples": ("long", "generate"),
    "stop_at_eos": ("boolean", "generate"),
    "include_prompt": ("boolean", "generate"),
}
SCORE_COLUMNS = ("ppl", "nll", "mean_nll", "tokens", "unknown")  # ScoreResult.to_dict()'s keys
OUTPUT_COLUMNS = {
    "score": (*SCORE_COLUMNS, "error"),
    "next": ("next_words", "error"),
    "generate": ("generated", "error"),
}
EXAMPLE_TEXT = "The state of the union is strong."


class RequestError(MlflowException):
    """A request the served model refuses, said in one line. MLflow's INVALID_PARAMETER_VALUE:
    the scoring server answers it with HTTP 400 and {"error_code": ..., "message": <the line>}.

    The message is the one it was raised with, whoever assigns another: MLflow's scoring server
    rewrites the message of an MlflowException from predict into "Failed to predict data
    '<the request's data>'. \\nError: <message>", several lines that echo the request (all of it
    for an `inputs` payload, however large). The client gets the reason alone.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._reason

    @message.setter
    def message(self, value: str) -> None:
        if not hasattr(self, "_reason"):  # MlflowException.__init__'s assignment
            self._reason = value


class ServingConfigError(RnnlmError, ValueError):
    """The model_config the model was loaded with is unusable."""


@dataclass(frozen=True)
class ServingConfig:
    """The served model's model_config: what one loaded copy may use and one request hold.

    The export stage writes it from params.yaml (`export.serving_*`); `load_model(...,
    model_config=...)`, SERVING_MODEL_CONFIG for `mlflow models serve`, or rnnlm.batch_score
    override keys of it. None: no limit.
    """

    threads: int  # onnxruntime intra-op threads of the loaded model
    max_documents: int | None  # rows in one request
    max_chars: int | None  # characters of text in one request, all rows together
    max_tokens: int | None  # generate: rows x num_samples x max_tokens in one request

    @classmethod
    def read(cls, config: Mapping[str, Any] | None) -> ServingConfig:
        """The config from MLflow's model_config, every key present and in range."""
        config = dict(config or {})
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(config) - set(names))
        missing = [name for name in names if name not in config]
        if unknown or missing:
            problem = f"unknown key {unknown[0]!r}" if unknown else f"{missing[0]!r} missing"
            raise ServingConfigError(f"model_config: {problem} (keys: {', '.join(names)})")
        for name in names:
            value = config[name]
            optional = name != "threads"
            if value is None and optional:
                continue
            if is_int(value) and value >= 1:
                config[name] = int(value)  # a plain int (json-able) even from numpy
                continue
            raise ServingConfigError(
                f"model_config: {name} = {short_repr(value)}: expected an integer >= 1"
                + (" or null (no limit)" if optional else "")
            )
        return cls(**config)

    def to_dict(self) -> dict[str, int | None]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Request:
    """A request's task and the keywords of the LanguageModel method that runs it."""

    task: str
    options: dict[str, Any]


def param_defaults() -> dict[str, Any]:
    """Every param with its default: `task`, then LanguageModel's own defaults."""
    defaults: dict[str, Any] = {"task": DEFAULT_TASK}
    for name, (_, method) in TASK_PARAMS.items():
        defaults[name] = inspect.signature(getattr(LanguageModel, method)).parameters[name].default
    return defaults


def read_params(params: Mapping[str, Any] | None) -> Request:
    """The task and its options from a request's params (absent ones take their default);
    RequestError naming the param when one is unknown or out of range. Every param is
    checked, whatever the task."""
    given = dict(params or {})
    values = param_defaults()
    unknown = sorted(set(given) - set(values), key=str)
    if unknown:
        raise RequestError(f"unknown param {short_repr(unknown[0])} (params: {', '.join(values)})")
    values.update(given)
    task = values.pop("task")
    if task not in TASKS:
        raise RequestError(f"task = {short_repr(task)}: expected one of {', '.join(TASKS)}")
    for name in ("stop_at_eos", "include_prompt"):
        if not isinstance(values[name], bool):
            raise RequestError(f"{name} = {short_repr(values[name])}: expected true or false")
    try:
        check_k(values["k"])
        values["k"] = int(values["k"])  # MLflow hands `long` params over as numpy integers
        check_sampling(
            values["temperature"],
            values["top_k"],
            values["top_p"],
            values["max_tokens"],
            values["num_samples"],
            values["seed"],
        )
    except ValueError as err:
        raise RequestError(str(err)) from None
    method = {"score": None, "next": "next_words", "generate": "generate"}[task]
    options = {n: v for n, v in values.items() if TASK_PARAMS[n][1] == method}
    return Request(task=task, options=options)


def _is_missing(value: object) -> bool:
    """A null cell: None (JSON null), NaN or pd.NA (pandas' missing values)."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def read_texts(model_input: Any) -> list[str | None]:
    """The request's documents in order (None for a null one): the `text` column of a
    DataFrame, or a list of strings; RequestError for anything else, or for a value that is
    neither a string nor null."""
    if isinstance(model_input, pd.DataFrame):
        if TEXT_COLUMN not in model_input.columns:
            columns = ", ".join(short_repr(str(c), 30) for c in model_input.columns[:10])
            # Behind MLflow's schema enforcement the other columns are already dropped.
            raise RequestError(
                f"no {TEXT_COLUMN!r} column"
                + (f" (columns: {columns})" if columns else "")
                + f': send {{"dataframe_records": [{{"{TEXT_COLUMN}": "..."}}]}} or '
                '{"inputs": ["...", ...]}'
            )
        values = model_input[TEXT_COLUMN].tolist()
    elif isinstance(model_input, list | tuple | pd.Series):
        values = list(model_input)
    else:
        raise RequestError(
            f"input of type {type(model_input).__name__}: expected a DataFrame with a "
            f"{TEXT_COLUMN!r} column, or a list of strings"
        )
    texts: list[str | None] = []
    for i, value in enumerate(values):
        if isinstance(value, str):
            texts.append(value)
        elif _is_missing(value):
            texts.append(None)
        else:
            raise RequestError(
                f"{TEXT_COLUMN}[{i}] = {short_repr(value)}: expected a string, got "
                f"{type(value).__name__}"
            )
    return texts


def check_limits(texts: Sequence[str | None], request: Request, config: ServingConfig) -> None:
    """RequestError when the request holds more than `config` allows."""
    hint = "send less per request, or score a corpus with rnnlm.batch_score"
    if config.max_documents is not None and len(texts) > config.max_documents:
        raise RequestError(
            f"{len(texts):,} documents in one request, at most {config.max_documents:,} "
            f"(model_config max_documents): {hint}"
        )
    chars = sum(len(text) for text in texts if text is not None)
    if config.max_chars is not None and chars > config.max_chars:
        raise RequestError(
            f"{chars:,} characters of text in one request, at most {config.max_chars:,} "
            f"(model_config max_chars): {hint}"
        )
    if request.task == "generate" and config.max_tokens is not None:
        tokens = len(texts) * request.options["num_samples"] * request.options["max_tokens"]
        if tokens > config.max_tokens:
            raise RequestError(
                f"{len(texts):,} prompts x {request.options['num_samples']:,} samples x "
                f"{request.options['max_tokens']:,} max_tokens = {tokens:,} tokens to generate "
                f"in one request, at most {config.max_tokens:,} (model_config max_tokens)"
            )


def answer(model: LanguageModel, text: str | None, request: Request) -> dict[str, Any]:
    """One document's output row: the task's result and error None, or only the error."""
    if text is None:
        return {"error": f"no {TEXT_COLUMN}: the value is null"}
    try:
        if request.task == "score":
            result: dict[str, Any] = model.score(text).to_dict()
        elif request.task == "next":
            words = model.next_words(text, **request.options)
            result = {"next_words": [{"word": w, "probability": p} for w, p in words]}
        else:
            result = {"generated": model.generate(text, **request.options)}
    except ValueError as err:  # LanguageModel's refusal of this text, in one line
        return {"error": str(err)}
    except TimeoutError:  # NLTK's regex time limit (nltk.redos) ran out on this text
        return {"error": "NLTK's tokenizer gave up on the text (regex time limit)"}
    return {**result, "error": None}


def run_request(
    model: LanguageModel, texts: Sequence[str | None], request: Request
) -> pd.DataFrame:
    """The output rows of `texts`, in order, with the task's columns (OUTPUT_COLUMNS).

    Columns hold Python objects (None where a row has no value), so that a null stays null in
    JSON and Arrow, never NaN.
    """
    rows = [answer(model, text, request) for text in texts]
    return pd.DataFrame(
        {
            column: pd.Series([row.get(column) for row in rows], dtype=object)
            for column in OUTPUT_COLUMNS[request.task]
        }
    )


class TextModel(PythonModel):
    """The pyfunc model: LanguageModel on the model's ONNX artifact, tasks chosen by params."""

    def load_context(self, context: PythonModelContext) -> None:
        self.config = ServingConfig.read(context.model_config)
        self.model = LanguageModel(context.artifacts[ONNX_ARTIFACT], threads=self.config.threads)
        self.model.prepare_generation()  # every request then samples in two levels

    def predict(
        self,
        context: PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> pd.DataFrame:
        request = read_params(params)
        texts = read_texts(model_input)
        check_limits(texts, request, self.config)
        return run_request(self.model, texts, request)


def signature() -> ModelSignature:
    """Input `text`; the outputs of every task (each row has its task's columns); params."""
    next_word = Object([Property("word", "string"), Property("probability", "double")])
    outputs = Schema(
        [
            *(
                ColSpec("long" if name in ("tokens", "unknown") else "double", name, required=False)
                for name in SCORE_COLUMNS
            ),
            ColSpec(Array(next_word), "next_words", required=False),
            ColSpec(Array("string"), "generated", required=False),
            ColSpec("string", "error", required=False),
        ]
    )
    defaults = param_defaults()
    types = {"task": "string", **{name: dtype for name, (dtype, _) in TASK_PARAMS.items()}}
    params = ParamSchema([ParamSpec(name, types[name], defaults[name]) for name in defaults])
    return ModelSignature(
        # Optional only so that a request without it reaches read_texts' one-line refusal:
        # MLflow's own would echo the whole request back on a second line.
        inputs=Schema([ColSpec("string", TEXT_COLUMN, required=False)]),
        outputs=outputs,
        params=params,
    )


def input_example() -> tuple[pd.DataFrame, dict[str, Any]]:
    """What MLflow stores as the model's example request (and checks against the signature)."""
    return pd.DataFrame({TEXT_COLUMN: [EXAMPLE_TEXT]}), {"task": DEFAULT_TASK}


def requirements() -> list[str]:
    """SERVED_PACKAGES pinned to the versions installed here."""
    return [f"{name}=={importlib.metadata.version(name)}" for name in SERVED_PACKAGES]


@contextlib.contextmanager
def served_code() -> Iterator[Path]:
    """A temporary `rnnlm/` folder holding SERVED_MODULES as they are here, without caches."""
    package = Path(__file__).parent
    with tempfile.TemporaryDirectory(prefix="rnnlm-served-code.") as tmp:
        folder = Path(tmp) / package.name
        folder.mkdir()
        for name in SERVED_MODULES:
            shutil.copy2(package / f"{name}.py", folder / f"{name}.py")
        yield folder


@contextlib.contextmanager
def model_files(onnx_model: Path, config: ServingConfig) -> Iterator[dict[str, Any]]:
    """The keywords of mlflow.pyfunc.save_model / log_model that make this model from
    `onnx_model` (valid while the block runs: the code is a temporary copy)."""
    ServingConfig.read(config.to_dict())  # a bad config fails here, not when a server loads it
    with served_code() as code:
        yield {
            "python_model": str(MODEL_CODE),
            "code_paths": [str(code)],
            "artifacts": {ONNX_ARTIFACT: str(onnx_model)},
            "signature": signature(),
            "input_example": input_example(),
            "pip_requirements": requirements(),
            "model_config": config.to_dict(),
        }
