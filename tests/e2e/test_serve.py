"""End to end: the registered model of the session's tiny pipeline, served by MLflow's own tools.

The tiny pipeline's export stage registered `rnnlm` v1, a pyfunc model (rnnlm.serving). Here it
is loaded with mlflow.pyfunc.load_model in a process where torch looks uninstalled (and rnnlm is
not on PYTHONPATH), and served by `mlflow models serve --env-manager local`, torch hidden as
well, on a free loopback port: one server for the module. Every task's answer must equal
LanguageModel's on the exported models/model.onnx for the same input; every malformed request
must get HTTP 400 with its reason (never a 5xx or a traceback), and the server must answer the
next request.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from rnnlm.inference import LanguageModel
from rnnlm.serving import SERVED_MODULES
from tests.e2e._pipeline import BIN, TAIL, pipeline_env
from tests.e2e.conftest import TinyPipeline
from tests.fixtures import HEAVY_MODULES, blocker_log, unused_port, write_import_blocker

pytestmark = pytest.mark.e2e

MODEL_URI = "models:/rnnlm/1"
START_TIMEOUT_S = 180.0  # the first start imports MLflow and downloads the model: slow when busy
TEXTS = ["The nation will build a strong economy.", "Our people must keep the peace"]
GENERATE = {"max_tokens": 6, "temperature": 0.7, "top_k": 10, "top_p": 0.9, "seed": 4}


@dataclass(frozen=True)
class Server:
    url: str
    log: Path

    def post(self, payload: object, raw: bytes | None = None) -> tuple[int, dict[str, Any]]:
        """POST /invocations; (status, JSON body)."""
        data = raw if raw is not None else json.dumps(payload).encode()
        request = urllib.request.Request(
            f"{self.url}/invocations", data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=120) as response:
                return response.status, json.loads(response.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read())

    def ping(self) -> int:
        try:
            with urllib.request.urlopen(f"{self.url}/ping", timeout=5) as response:
                return response.status
        except (urllib.error.URLError, OSError):
            return 0


def torch_free_env(pipeline: TinyPipeline, tmp: Path) -> dict[str, str]:
    """The pipeline's environment with its registry as the tracking store, and torch hidden
    (no rnnlm on PYTHONPATH either: the model brings its own code)."""
    env = pipeline_env(pipeline.project, pipeline.mirror_url)
    env["PYTHONPATH"] = str(write_import_blocker(tmp / "blocker", tmp / "blocker-log"))
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{pipeline.project / 'mlruns' / 'mlflow.db'}"
    return env


@pytest.fixture(scope="module")
def server(
    tiny_pipeline: TinyPipeline, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("serve")
    port = unused_port()
    command = [
        str(BIN / "mlflow"), "models", "serve", "-m", MODEL_URI, "--env-manager", "local",
        "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    log = tmp / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=tmp,
            env=torch_free_env(tiny_pipeline, tmp),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the uvicorn child stops with it
        )
    served = Server(f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while served.ping() != 200:
            tail = log.read_text(errors="replace")[-TAIL:]
            assert process.poll() is None, f"mlflow models serve exited:\n{tail}"
            assert time.monotonic() < deadline, f"no /ping within {START_TIMEOUT_S} s:\n{tail}"
            time.sleep(0.5)
        yield served
        processes, _ = blocker_log(tmp / "blocker-log")
        assert any("uvicorn" in line for line in processes), processes  # the scoring server
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


@pytest.fixture(scope="module")
def library(tiny_pipeline: TinyPipeline) -> LanguageModel:
    """The exported model through the library: the reference answers."""
    return LanguageModel(tiny_pipeline.project / "models" / "model.onnx", threads=1)


def test_each_task_answers_as_the_library_does(server: Server, library: LanguageModel) -> None:
    status, body = server.post(
        {"dataframe_split": {"columns": ["text"], "data": [[t] for t in [*TEXTS, ""]]}}
    )
    assert status == 200, body
    scores = body["predictions"]
    assert scores[:2] == [{**library.score(t).to_dict(), "error": None} for t in TEXTS]
    assert scores[2]["error"] == "nothing to score: the text has no words"
    assert scores[2]["ppl"] is None

    records = [{"text": t} for t in TEXTS]
    status, body = server.post({"dataframe_records": records, "params": {"task": "next", "k": 4}})
    assert status == 200, body
    assert [
        [(d["word"], d["probability"]) for d in row["next_words"]] for row in body["predictions"]
    ] == [library.next_words(t, 4) for t in TEXTS]

    params = {"task": "generate", "num_samples": 2, **GENERATE}
    status, body = server.post({"inputs": TEXTS, "params": params})
    assert status == 200, body
    assert [row["generated"] for row in body["predictions"]] == [
        library.generate(t, num_samples=2, **GENERATE) for t in TEXTS
    ]


def test_bad_requests_get_400_with_the_reason(server: Server) -> None:
    text_records = [{"text": t} for t in TEXTS]
    # (payload, the message, or a piece of it for MLflow's own refusals)
    cases: list[tuple[object, str, bool]] = [
        (
            {"dataframe_records": [{"txt": "a"}]},
            'no \'text\' column: send {"dataframe_records": [{"text": "..."}]} or '
            '{"inputs": ["...", ...]}',
            True,
        ),
        (
            {"dataframe_records": [{"text": "a"}, {"text": 5}]},
            "text[1] = 5: expected a string, got int",
            True,
        ),
        (
            {"dataframe_records": text_records, "params": {"task": "translate"}},
            "task = 'translate': expected one of score, next, generate",
            True,
        ),
        (
            {"inputs": TEXTS, "params": {"task": "generate", "temperature": -1}},
            "temperature = -1.0: must be >= 0 (0 = greedy)",
            True,
        ),
        (
            {"inputs": TEXTS, "params": {"task": "next", "k": 0}},
            "k = 0: must be an integer >= 1",
            True,
        ),
        (
            {"inputs": TEXTS, "params": {"top_p": 1.5}},
            "top_p = 1.5: must be in (0, 1] (1 = no limit)",
            True,
        ),
        ({"inputs": TEXTS, "params": {"k": "many"}}, "Invalid parameters found", False),
        (
            {"inputs": ["word " * 150_000]},  # 750 kB: over params.yaml's serving_max_chars
            "750,000 characters of text in one request, at most 500,000 "
            "(model_config max_chars): send less per request, or score a corpus with "
            "rnnlm.batch_score",
            True,
        ),
        (
            {"inputs": ["a"] * 1001},
            "1,001 documents in one request, at most 1,000 (model_config max_documents): send "
            "less per request, or score a corpus with rnnlm.batch_score",
            True,
        ),
        (
            {"inputs": TEXTS, "params": {"task": "generate", "max_tokens": 60_000}},
            "2 prompts x 1 samples x 60,000 max_tokens = 120,000 tokens to generate in one "
            "request, at most 100,000 (model_config max_tokens)",
            True,
        ),
        (None, "Ensure that input is a valid JSON formatted string", False),
    ]
    for payload, reason, ours in cases:
        raw = b"{not json" if payload is None else None
        status, body = server.post(payload, raw=raw)
        shown = str(payload)[:200]
        assert status == 400, (shown, status, body)
        assert "stack_trace" not in body and "Traceback" not in body["message"], (shown, body)
        if ours:  # rnnlm's refusal: exactly its one line, the request not echoed
            assert body["error_code"] == "INVALID_PARAMETER_VALUE", (shown, body)
            assert body["message"] == reason, shown
        else:  # MLflow's own refusal (schema, param types, JSON), the reason in its words
            assert reason in body["message"], (shown, body)
        assert server.ping() == 200, shown
    status, body = server.post({"inputs": TEXTS[:1]})  # still serving
    assert status == 200 and body["predictions"][0]["error"] is None, body


def test_pyfunc_loads_and_predicts_without_torch(
    tiny_pipeline: TinyPipeline, library: LanguageModel, tmp_path: Path
) -> None:
    """mlflow.pyfunc.load_model in a process where torch looks uninstalled (importing it fails)
    and rnnlm is not on PYTHONPATH: the model's own code is what runs."""
    script = f"""
import json, sys
import mlflow.pyfunc
import pandas as pd

model = mlflow.pyfunc.load_model({MODEL_URI!r}, dst_path={str(tmp_path / "model")!r})
frame = pd.DataFrame({{"text": {TEXTS!r}}})
import rnnlm
print(json.dumps({{
    "score": model.predict(frame).to_dict("records"),
    "next": model.predict(frame, params={{"task": "next", "k": 3}}).to_dict("records"),
    "generate": model.predict(frame, params={{"task": "generate", **{GENERATE!r}}})
        .to_dict("records"),
    "rnnlm": rnnlm.__file__,
    "heavy": sorted(m for m in sys.modules if m.split(".")[0] in {HEAVY_MODULES!r}),
}}))
"""
    (tmp_path / "model").mkdir()
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=tmp_path,
        env=torch_free_env(tiny_pipeline, tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-TAIL:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["heavy"] == []
    code = tmp_path / "model" / "code" / "rnnlm"
    assert Path(out["rnnlm"]) == code / "__init__.py"
    assert sorted(p.stem for p in code.glob("*.py")) == sorted(SERVED_MODULES)
    shipped = tiny_pipeline.project / "models" / "model.onnx"
    assert (tmp_path / "model" / "artifacts" / "model.onnx").read_bytes() == shipped.read_bytes()
    assert out["score"] == [{**library.score(t).to_dict(), "error": None} for t in TEXTS]
    assert [[(d["word"], d["probability"]) for d in r["next_words"]] for r in out["next"]] == [
        library.next_words(t, 3) for t in TEXTS
    ]
    assert [r["generated"] for r in out["generate"]] == [
        library.generate(t, **GENERATE) for t in TEXTS
    ]
