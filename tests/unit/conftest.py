"""Fixtures shared by the unit tests of the inference path (test_cli, test_fuzz_inference)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_onnx_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer, 8-unit LSTM over `test_export.VOCAB`, exported with rnnlm metadata."""
    # Imported here: torch and the export helpers load only when a test asks for a model.
    from tests.unit.test_export import build_net, write_model

    return write_model(tmp_path_factory.mktemp("tiny_onnx") / "model.onnx", build_net("lstm"))
