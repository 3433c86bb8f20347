"""graphs.py: an exported model cut into its recurrent part and a log-probability head.

The parts, run one after the other, must give what the whole model gives: the same next state,
and log softmax(logits)[target] for every position; for every cell, fp32 and int8, a batch of
streams from a non-zero state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from rnnlm.graphs import (
    LOGPROB_OUTPUT,
    TARGETS_INPUT,
    GraphSplitError,
    ScoringGraphs,
    split_for_scoring,
)
from rnnlm.inference import token_nll
from tests.unit.test_export import (
    VOCAB,
    build_net,
    one_torch_thread,  # noqa: F401 (autouse)
    write_model,
)


def session(model: bytes | str) -> ort.InferenceSession:
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"])


def run_parts(
    parts: ScoringGraphs, feeds: dict[str, np.ndarray], targets: np.ndarray, n_state: int
) -> tuple[np.ndarray, list[np.ndarray], dict[str, np.ndarray]]:
    """Log-probs (batch, time), the next state and every recurrent output, by name."""
    recurrent = session(parts.recurrent)
    names = [o.name for o in recurrent.get_outputs()]
    values = dict(zip(names, recurrent.run(names, feeds), strict=True))
    head_feeds = {name: values.get(name, feeds.get(name)) for name in parts.cut}
    (logprob,) = session(parts.head).run(
        [LOGPROB_OUTPUT], {**head_feeds, TARGETS_INPUT: targets[..., None]}
    )
    return logprob[..., 0], [values[n] for n in names[len(names) - n_state :]], values


@pytest.mark.parametrize(
    ("cell", "layers", "precision"),
    [("rnn_tanh", 1, "fp32"), ("gru", 1, "fp32"), ("lstm", 2, "fp32"), ("gru", 2, "int8")],
)
def test_the_parts_give_what_the_whole_model_gives(
    tmp_path: Path, cell: str, layers: int, precision: str
) -> None:
    path = write_model(tmp_path / "m.onnx", build_net(cell, layers=layers), quantize=True)
    if precision == "int8":
        path = tmp_path / "m.int8.onnx"
    model = onnx.load(str(path))
    state_in = [i.name for i in model.graph.input][1:]
    state_out = [o.name for o in model.graph.output][1:]
    parts = split_for_scoring(model, "logits", state_out)
    assert len(parts.cut) == 1  # the top layer's outputs: one activation between the parts
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, len(VOCAB), size=(3, 7))
    targets = rng.integers(0, len(VOCAB), size=(3, 7))
    state = {n: rng.normal(size=(layers, 3, 8)).astype(np.float32) * 0.5 for n in state_in}
    feeds = {"tokens": tokens, **state}
    logprob, next_state, _ = run_parts(parts, feeds, targets, len(state_out))
    logits, *expected_state = session(str(path)).run(None, feeds)
    expected = -token_nll(logits.reshape(-1, len(VOCAB)), targets.reshape(-1)).reshape(3, 7)
    assert logprob.dtype == np.float32 and logprob.shape == (3, 7)
    np.testing.assert_allclose(logprob, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(next_state, expected_state, strict=True):
        np.testing.assert_array_equal(got, want)


def test_extra_outputs_come_from_the_recurrent_part(tmp_path: Path) -> None:
    """A graph output besides logits and state (e.g. per-step hidden vectors for a cache
    model) is returned by the recurrent part when asked for, and the head is unchanged."""
    path = write_model(tmp_path / "m.onnx", build_net("gru", layers=1))
    model = onnx.load(str(path))
    hidden = next(n.output[0] for n in model.graph.node if n.op_type == "GRU")
    shape = ["time", 1, "batch", 8]  # the GRU op's Y: (time, directions, batch, hidden)
    model.graph.output.append(helper.make_tensor_value_info(hidden, TensorProto.FLOAT, shape))
    parts = split_for_scoring(model, "logits", ["h1"], extra_outputs=[hidden])
    feeds = {"tokens": np.array([[1, 2, 3]]), "h0": np.zeros((1, 1, 8), np.float32)}
    _, _, values = run_parts(parts, feeds, np.array([[2, 3, 4]]), 1)
    expected = session(model.SerializeToString()).run([hidden], feeds)[0]
    np.testing.assert_array_equal(values[hidden], expected)
    assert parts.cut == (hidden,)


def test_graphs_that_cannot_be_split() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("logits", "h1")]
    both = helper.make_graph([helper.make_node("Split", ["x"], ["logits", "h1"], num_outputs=2)],
                             "g", [x], out)  # fmt: skip
    model = helper.make_model(both, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(GraphSplitError, match="computed by the nodes that make h1: no head"):
        split_for_scoring(model, "logits", ["h1"])
    with pytest.raises(GraphSplitError, match="no output"):
        split_for_scoring(model, "logits", ["h1"], extra_outputs=["hidden"])
