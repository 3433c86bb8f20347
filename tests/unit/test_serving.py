"""serving.py: the pyfunc model's answers equal LanguageModel's, and what it refuses, in one line.

The model is a tiny random GRU exported by `tests.unit.test_export.write_model`, served through
`TextModel` in this process (no MLflow store, no server: tests/e2e/test_serve.py runs those).
"""

from __future__ import annotations

import ast
import json
import math

import numpy as np
import pandas as pd
import pytest
from mlflow.pyfunc import PythonModelContext

from rnnlm import serving
from rnnlm.inference import MAX_PROMPT_CHARS, ScoreResult
from rnnlm.serving import RequestError, ServingConfig, ServingConfigError
from tests.unit.test_config import _imported_modules
from tests.unit.test_export import (
    build_net,
    one_torch_thread,  # noqa: F401 (autouse)
    write_model,
)

TEXTS = ["The president said that we will build a strong nation.", "Today congress must keep"]
CONFIG = ServingConfig(threads=1, max_documents=5, max_chars=500, max_tokens=100)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> serving.TextModel:
    """TextModel loaded as MLflow loads it: its artifact and model_config in the context."""
    path = write_model(tmp_path_factory.mktemp("served") / "model.onnx", build_net("gru"))
    model = serving.TextModel()
    model.load_context(PythonModelContext({serving.ONNX_ARTIFACT: str(path)}, CONFIG.to_dict()))
    return model


def predict(model: serving.TextModel, texts: list, **params: object) -> list[dict]:
    frame = model.predict(None, pd.DataFrame({"text": texts}), params=params)  # type: ignore[arg-type]
    return frame.to_dict("records")


def refusal(model: serving.TextModel, model_input: object, **params: object) -> str:
    """The one-line message of the RequestError that predict raises."""
    with pytest.raises(RequestError) as err:
        model.predict(None, model_input, params=params)  # type: ignore[arg-type]
    assert err.value.get_http_status_code() == 400
    message = err.value.message
    assert "\n" not in message and message == str(err.value)
    return message


def test_each_task_answers_as_the_library_does(served: serving.TextModel) -> None:
    lm = served.model
    rows = predict(served, TEXTS)
    assert [{k: v for k, v in row.items() if k != "error"} for row in rows] == [
        lm.score(text).to_dict() for text in TEXTS
    ]
    assert [row["error"] for row in rows] == [None, None]
    rows = predict(served, TEXTS, task="next", k=3)
    assert [[(d["word"], d["probability"]) for d in row["next_words"]] for row in rows] == [
        lm.next_words(text, 3) for text in TEXTS
    ]
    options = {"max_tokens": 6, "temperature": 0.8, "top_p": 0.9, "top_k": 5, "seed": 3}
    rows = predict(served, TEXTS, task="generate", num_samples=2, **options)
    assert [row["generated"] for row in rows] == [
        lm.generate(text, num_samples=2, **options) for text in TEXTS
    ]
    assert len(rows[0]["generated"]) == 2
    # A row's answer does not depend on the rows beside it: the seed applies to each prompt.
    assert predict(served, TEXTS[1:], task="generate", num_samples=2, **options) == rows[1:]


def test_defaults_are_the_library_defaults(served: serving.TextModel) -> None:
    defaults = serving.param_defaults()
    assert defaults["task"] == "score" and defaults["k"] == 5 and defaults["max_tokens"] == 50
    assert defaults["seed"] is None and defaults["include_prompt"] is True
    request = serving.read_params({"task": "generate"})
    assert request.options == {k: v for k, v in defaults.items() if k not in ("task", "k")}
    assert serving.read_params(None) == serving.Request("score", {})
    assert serving.read_params({"task": "next"}).options == {"k": 5}
    # MLflow hands a `long` param over as a numpy integer: it is an integer like any other.
    options = serving.read_params({"task": "next", "k": np.int64(3)}).options
    assert options == {"k": 3} and type(options["k"]) is int
    signature = serving.signature()
    assert {p.name: p.default for p in signature.params.params} == defaults
    assert signature.inputs.input_names() == [serving.TEXT_COLUMN]
    columns = {column for task in serving.TASKS for column in serving.OUTPUT_COLUMNS[task]}
    assert set(signature.outputs.input_names()) == columns
    assert set(serving.SCORE_COLUMNS) == set(ScoreResult(nll=1.0, tokens=2).to_dict())


def test_a_bad_document_gets_an_error_row_not_a_refusal(served: serving.TextModel) -> None:
    texts = [TEXTS[0], "", None, math.nan, ".", "x" * (MAX_PROMPT_CHARS + 1)]
    served_limits = served.config
    served.config = ServingConfig(threads=1, max_documents=None, max_chars=None, max_tokens=None)
    try:
        scored = predict(served, texts)
        prompted = predict(served, texts, task="next")
    finally:
        served.config = served_limits
    assert [row["error"] for row in scored[:4]] == [
        None,
        "nothing to score: the text has no words",
        "no text: the value is null",
        "no text: the value is null",
    ]
    assert scored[1]["ppl"] is None and scored[1]["tokens"] is None  # null, not NaN
    assert scored[4]["error"] is None and scored[4]["tokens"] == 2  # "." and <eos>
    assert [row["error"] is None for row in prompted[:2]] == [True, True]  # "" starts a sentence
    assert prompted[5]["error"].startswith(f"prompt: {MAX_PROMPT_CHARS + 1} characters, at most")
    assert prompted[5]["next_words"] is None
    frame = served.predict(None, pd.DataFrame({"text": ["", TEXTS[0]]}))  # type: ignore[arg-type]
    assert all(frame[c].dtype == object for c in frame.columns)
    json.dumps(frame.to_dict("records"), allow_nan=False)  # nulls are JSON null, not NaN


def test_malformed_requests_are_refused_in_one_line(served: serving.TextModel) -> None:
    frame = pd.DataFrame({"text": TEXTS})
    assert refusal(served, pd.DataFrame({"txt": TEXTS})) == (
        'no \'text\' column (columns: \'txt\'): send {"dataframe_records": [{"text": "..."}]} '
        'or {"inputs": ["...", ...]}'
    )
    assert refusal(served, pd.DataFrame({"text": ["a", 5]})) == (
        "text[1] = 5: expected a string, got int"
    )
    assert refusal(served, pd.DataFrame({"text": [["a"]]})).startswith("text[0] = ['a']")
    assert refusal(served, "just a string").startswith("input of type str: expected")
    assert refusal(served, frame, task="translate") == (
        "task = 'translate': expected one of score, next, generate"
    )
    assert refusal(served, frame, temprature=0.5).startswith("unknown param 'temprature'")
    assert (
        refusal(served, frame, temperature=-1.0) == "temperature = -1.0: must be >= 0 (0 = greedy)"
    )
    assert refusal(served, frame, top_p=0.0).startswith("top_p = 0.0: must be in (0, 1]")
    assert refusal(served, frame, k=0) == "k = 0: must be an integer >= 1"
    assert refusal(served, frame, seed=-1).startswith("seed = -1: must be an integer >= 0")
    assert refusal(served, frame, stop_at_eos="yes").startswith("stop_at_eos = 'yes': expected")
    # Every param is checked, whatever the task.
    assert refusal(served, frame, task="next", temperature=math.nan).startswith("temperature")
    # A list of strings is a request too (MLflow turns one into a DataFrame before predict).
    assert served.predict(None, TEXTS)["tokens"].tolist() == [  # type: ignore[arg-type]
        served.model.score(text).tokens for text in TEXTS
    ]


def test_a_request_over_the_limits_is_refused(served: serving.TextModel) -> None:
    message = refusal(served, ["a"] * 6)
    assert message.startswith("6 documents in one request, at most 5 (model_config max_documents)")
    assert refusal(served, ["a" * 300, "b" * 201]).startswith(
        "501 characters of text in one request, at most 500 (model_config max_chars)"
    )
    assert refusal(served, ["a", "b"], task="generate", max_tokens=26, num_samples=2) == (
        "2 prompts x 2 samples x 26 max_tokens = 104 tokens to generate in one request, at "
        "most 100 (model_config max_tokens)"
    )
    rows = predict(served, ["a", "b"], task="generate", max_tokens=25, num_samples=2, seed=1)
    assert [len(row["generated"]) for row in rows] == [2, 2]
    assert len(predict(served, ["a" * 250, "b" * 250])) == 2  # at the limits: answered


def test_request_error_keeps_its_line_when_mlflow_rewrites_it() -> None:
    """MLflow's scoring server prepends the request's data to the message of an exception
    from predict (`e.message = f"Failed to predict data ..."`); the client gets the reason."""
    err = RequestError("k = 0: must be an integer >= 1")
    err.message = (
        f"Failed to predict data '{pd.DataFrame({'text': TEXTS})}'. \nError: {err.message}"
    )
    body = json.loads(err.serialize_as_json())
    assert body["error_code"] == "INVALID_PARAMETER_VALUE"
    assert body["message"] == "k = 0: must be an integer >= 1"
    assert "stack_trace" not in body


def test_serving_config_is_read_whole() -> None:
    full = CONFIG.to_dict()
    assert ServingConfig.read(full) == CONFIG
    assert ServingConfig.read({**full, "max_chars": None}).max_chars is None
    assert type(ServingConfig.read({**full, "threads": np.int64(2)}).threads) is int
    bad = [
        ({k: v for k, v in full.items() if k != "threads"}, "model_config: 'threads' missing"),
        ({**full, "treads": 1}, "model_config: unknown key 'treads'"),
        ({**full, "threads": None}, "model_config: threads = None: expected an integer >= 1"),
        ({**full, "max_documents": 0}, "max_documents = 0: expected an integer >= 1 or null"),
        ({**full, "max_tokens": True}, "max_tokens = True: expected an integer >= 1"),
    ]
    for config, message in bad:
        with pytest.raises(ServingConfigError, match=message.replace("(", r"\(")):
            ServingConfig.read(config)


def test_the_model_ships_the_modules_it_imports_and_no_torch() -> None:
    assert set(serving.SERVED_MODULES) == _imported_modules("serving") | {"__init__"}
    with serving.served_code() as code:
        assert code.name == "rnnlm"
        assert sorted(p.name for p in code.iterdir()) == sorted(
            f"{name}.py" for name in serving.SERVED_MODULES
        )
        imported: set[str] = set()
        for name in serving.SERVED_MODULES:
            tree = ast.parse((code / f"{name}.py").read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.Import):
                    imported |= {alias.name.split(".")[0] for alias in node.names}
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    imported.add(node.module.split(".")[0])
    assert imported.isdisjoint({"torch", "lightning", "pytorch_lightning"}), imported
    assert {"mlflow", "onnxruntime", "numpy", "nltk", "pandas"} <= imported
    assert not code.exists()
    requirements = serving.requirements()
    assert [r.split("==")[0] for r in requirements] == list(serving.SERVED_PACKAGES)
    assert all(len(r.split("==")) == 2 and r.split("==")[1] for r in requirements)
    example, params = serving.input_example()
    assert example.columns.tolist() == ["text"] and params == {"task": "score"}
