"""graphs.py: an exported model's scoring graph (targets' log-probs) and state graph.

The scoring graph must give what the model gives: the same next state, and
log softmax(logits)[target] for every position; the state graph the same next state; for every
cell, fp32 and int8, a batch of streams from a non-zero state.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper

from rnnlm.graphs import (
    HEAD_OUTPUT,
    LOGPROB_OUTPUT,
    TARGETS_INPUT,
    AdaptiveSoftmax,
    ScoringGraphError,
    sampling_graphs,
    scoring_graph,
    state_graph,
    tail_input,
    tail_output,
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


@pytest.mark.parametrize(
    ("cell", "layers", "precision"),
    [("rnn_tanh", 1, "fp32"), ("gru", 1, "fp32"), ("lstm", 2, "fp32"), ("gru", 2, "int8")],
)
def test_the_scoring_and_state_graphs_give_what_the_model_gives(
    tmp_path: Path, cell: str, layers: int, precision: str
) -> None:
    path = write_model(tmp_path / "m.onnx", build_net(cell, layers=layers), quantize=True)
    if precision == "int8":
        path = tmp_path / "m.int8.onnx"
    model = onnx.load(str(path))
    state_in = [i.name for i in model.graph.input][1:]
    state_out = [o.name for o in model.graph.output if o.name.endswith("1")]
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, len(VOCAB), size=(3, 7))
    targets = rng.integers(0, len(VOCAB), size=(3, 7))
    state = {n: rng.normal(size=(layers, 3, 8)).astype(np.float32) * 0.5 for n in state_in}
    feeds = {"tokens": tokens, **state}
    logits, *expected_state = session(str(path)).run(["logits", *state_out], feeds)
    expected = -token_nll(logits.reshape(-1, len(VOCAB)), targets.reshape(-1)).reshape(3, 7)

    graph = scoring_graph(model, "logits", state_out)
    onnx.checker.check_model(graph)
    scoring = session(graph)
    assert [o.name for o in scoring.get_outputs()] == [LOGPROB_OUTPUT, *state_out]
    logprob, *next_state = scoring.run(None, {**feeds, TARGETS_INPUT: targets[..., None]})
    assert logprob.dtype == np.float32 and logprob.shape == (3, 7, 1)
    np.testing.assert_allclose(logprob[..., 0], expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(next_state, expected_state, strict=True):
        np.testing.assert_array_equal(got, want)

    recurrence = onnx.load_from_string(state_graph(onnx.load(str(path)), state_out))
    onnx.checker.check_model(recurrence)
    assert not recurrence.graph.initializer or all(
        t.name in {n for node in recurrence.graph.node for n in node.input}
        for t in recurrence.graph.initializer
    ), "the state graph keeps weights it does not read"
    assert not {"MatMul", "Gemm"} & {n.op_type for n in recurrence.graph.node}, (
        "the state graph computes the output projection"
    )
    for got, want in zip(session(recurrence.SerializeToString()).run(None, feeds), expected_state,
                         strict=True):  # fmt: skip
        np.testing.assert_array_equal(got, want)


def test_extra_outputs_follow_the_state(tmp_path: Path) -> None:
    """A graph output besides logits and state (e.g. per-step hidden vectors for a cache
    model) is returned after the state when asked for."""
    path = write_model(tmp_path / "m.onnx", build_net("gru", layers=1))
    model = onnx.load(str(path))
    feeds = {"tokens": np.array([[1, 2, 3]]), "h0": np.zeros((1, 1, 8), np.float32)}
    expected = session(str(path)).run(["hidden"], feeds)[0]
    scoring = session(scoring_graph(model, "logits", ["h1"], extra_outputs=["hidden"]))
    assert [o.name for o in scoring.get_outputs()] == [LOGPROB_OUTPUT, "h1", "hidden"]
    values = scoring.run(None, {**feeds, TARGETS_INPUT: np.array([[[2], [3], [4]]])})
    np.testing.assert_array_equal(values[2], expected)


def test_graphs_that_lack_what_scoring_needs() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1]) for n in ("logits", "h1")]
    both = helper.make_graph([helper.make_node("Split", ["x"], ["logits", "h1"], num_outputs=2)],
                             "g", [x], out)  # fmt: skip
    model = helper.make_model(both, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ScoringGraphError, match="no output"):
        scoring_graph(model, "logits", ["h1"], extra_outputs=["hidden"])
    with pytest.raises(ScoringGraphError, match="no output"):
        state_graph(model, ["h2"])
    branch = helper.make_graph([], "b", [], [x])  # returns the outer x: read without an input
    flow = helper.make_node("If", ["cond"], ["h1"], then_branch=branch, else_branch=branch)
    cond = helper.make_tensor_value_info("cond", TensorProto.BOOL, [])
    looped = helper.make_graph([flow], "g", [x, cond], [out[1]])
    model = helper.make_model(looped, opset_imports=[helper.make_opsetid("", 18)])
    with pytest.raises(ScoringGraphError, match="control flow"):
        state_graph(model, ["h1"])
    with pytest.raises(ScoringGraphError, match="control flow"):
        scoring_graph(model, "h1", [])


def full_logprob(path: Path, feeds: dict[str, np.ndarray], targets: np.ndarray) -> np.ndarray:
    """log softmax(logits)[target] (batch, time) from the model's own logits, float64."""
    logits = session(str(path)).run(["logits"], feeds)[0]
    return -token_nll(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1)).reshape(
        targets.shape
    )


@pytest.mark.parametrize(("cell", "cutoffs", "precision"), [
    ("lstm", (4, 12), "fp32"), ("gru", (7,), "fp32"), ("lstm", (4, 12), "int8"),
])  # fmt: skip
def test_an_adaptive_softmax_is_scored_target_only(
    tmp_path: Path, cell: str, cutoffs: tuple[int, ...], precision: str
) -> None:
    """The head on every position, each tail cluster on its targets' positions only: the
    vocabulary-wide projection is gone from the graph, and log p(target) is the model's, for
    windows whose targets fill every cluster, leave a tail empty, or are one position."""
    path = write_model(tmp_path / "m.onnx", build_net(cell, layers=1, cutoffs=cutoffs),
                       quantize=True)  # fmt: skip
    if precision == "int8":
        path = tmp_path / "m.int8.onnx"
    adaptive = AdaptiveSoftmax("hidden", cutoffs, len(VOCAB))
    state_out = ["h1", "c1"] if cell == "lstm" else ["h1"]
    graph = onnx.load_from_string(scoring_graph(onnx.load(str(path)), "logits", state_out,
                                                adaptive=adaptive))  # fmt: skip
    onnx.checker.check_model(graph)
    assert "NonZero" in {n.op_type for n in graph.graph.node}
    # What onnxruntime runs (its constant folding cuts the projection into the parts): no
    # product reads a weight as wide as the vocabulary.
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    scoring = ort.InferenceSession(graph.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])  # fmt: skip
    optimized = onnx.load(options.optimized_model_filepath).graph
    wide = {t.name for t in optimized.initializer if len(VOCAB) in t.dims}
    products = [n for n in optimized.node if "MatMul" in n.op_type or n.op_type == "Gemm"]
    assert products and not [n.name for n in products if wide & set(n.input)], (
        "the scoring graph multiplies by the vocabulary-wide projection"
    )
    rng = np.random.default_rng(1)
    head_only = rng.integers(0, cutoffs[0], size=(2, 5))
    windows = [rng.integers(0, len(VOCAB), size=(3, 40)), head_only, np.array([[len(VOCAB) - 1]])]
    for targets in windows:
        batch, time = targets.shape
        state = {n: rng.normal(size=(1, batch, 8)).astype(np.float32) * 0.5
                 for n in ["h0", "c0"][: len(state_out)]}  # fmt: skip
        feeds = {"tokens": rng.integers(0, len(VOCAB), size=(batch, time)), **state}
        logprob = scoring.run([LOGPROB_OUTPUT], {**feeds, TARGETS_INPUT: targets[..., None]})[0]
        expected = full_logprob(path, feeds, targets)
        if precision == "fp32":
            np.testing.assert_allclose(logprob[..., 0], expected, rtol=1e-5, atol=1e-5)
        else:  # a tail's rows are quantized apart from the others: their own int8 scale
            assert np.abs(logprob[..., 0] - expected).mean() < 0.02
    assert any((t >= cutoffs[-1]).any() for t in windows), "no window reached the last tail"


def test_an_adaptive_softmax_not_found_in_the_graph_is_scored_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A decoder input the graph does not have: the full log-softmax (the same numbers),
    with a warning that names why."""
    path = write_model(tmp_path / "m.onnx", build_net("gru", layers=1, cutoffs=(4, 12)))
    adaptive = AdaptiveSoftmax("elsewhere", (4, 12), len(VOCAB))
    with caplog.at_level("WARNING", logger="rnnlm.graphs"):
        graph = scoring_graph(onnx.load(str(path)), "logits", ["h1"], adaptive=adaptive)
    assert "scoring computes the whole adaptive softmax (" in caplog.text
    assert "elsewhere" in caplog.text
    targets = np.array([[1, 5, 20]])
    feeds = {"tokens": np.array([[2, 3, 4]]), "h0": np.zeros((1, 1, 8), np.float32)}
    logprob = session(graph).run([LOGPROB_OUTPUT], {**feeds, TARGETS_INPUT: targets[..., None]})
    np.testing.assert_allclose(logprob[0][..., 0], full_logprob(path, feeds, targets), rtol=1e-5)


def test_the_sampling_graphs_give_the_head_and_each_cluster_of_the_model(tmp_path: Path) -> None:
    """The head graph: the head words' log-probs and, per tail cluster, the log of its mass
    (log-sum-exp of its words), with the model's next state and hidden vectors; the tail
    graph: log p(word | cluster) of the rows fed to that cluster (none for another)."""
    cutoffs = (4, 12)
    path = write_model(tmp_path / "m.onnx", build_net("lstm", layers=1, cutoffs=cutoffs))
    adaptive = AdaptiveSoftmax("hidden", cutoffs, len(VOCAB))
    head, tails = sampling_graphs(onnx.load(str(path)), ["h1", "c1"], adaptive, ["hidden"])
    rng = np.random.default_rng(3)
    feeds = {
        "tokens": rng.integers(0, len(VOCAB), size=(2, 6)),
        **{n: rng.normal(size=(1, 2, 8)).astype(np.float32) for n in ("h0", "c0")},
    }
    logits, *expected = session(str(path)).run(["logits", "h1", "c1", "hidden"], feeds)
    head_logprob, *got = session(head).run([HEAD_OUTPUT, "h1", "c1", "hidden"], feeds)
    mass = [np.logaddexp.reduce(logits[..., a:b], axis=-1, keepdims=True)
            for a, b in adaptive.tails]  # fmt: skip
    np.testing.assert_allclose(
        head_logprob, np.concatenate([logits[..., : cutoffs[0]], *mass], axis=-1), atol=1e-5
    )
    for a, b in zip(got, expected, strict=True):
        np.testing.assert_array_equal(a, b)
    rows = expected[2].reshape(-1, 8)  # the hidden vectors of every position
    tail_session = session(tails)
    first, second = tail_session.run(
        [tail_output(1), tail_output(2)], {tail_input(1): rows, tail_input(2): rows[:0]}
    )
    assert second.shape == (0, len(VOCAB) - cutoffs[1])
    start, end = adaptive.tails[0]
    flat_logits, flat_mass = logits.reshape(-1, len(VOCAB)), mass[0].reshape(-1, 1)
    np.testing.assert_allclose(first, flat_logits[:, start:end] - flat_mass, atol=1e-5)
