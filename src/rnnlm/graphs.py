"""Scoring graphs derived from an exported model: one that returns the targets' log-probs.

    scoring_graph(model, logits="logits", state_out=["h1"])
      -> tokens, h0[, c0], targets (b, t, 1) -> target_logprob (b, t, 1) float32, h1[, c1][, extras]
    state_graph(model, state_out=["h1"])
      -> tokens, h0[, c0]                    -> h1[, c1]    (the recurrence alone)

Scoring a stream needs, per token, only log p(target), not the (batch, time, vocab) logits:
the scoring graph is the network with its logits ended by LogSoftmax and GatherElements, so
onnxruntime never hands the logits to Python. One graph, run by one session on every core the
caller allows: the recurrence of a large model gains most from the second core (each core then
keeps half of the hidden-to-hidden weights in its own L2 cache; `rnnlm.inference`). The state
graph reads a context whose log-probs are not wanted (batched scoring's segments): every node
the state outputs need, and no output projection.

Needs the `onnx` package (a dependency of rnnlm; imported by `rnnlm.inference` only when a
stream is scored, so `generate` and `next` start without it). No torch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import onnx
from onnx import TensorProto, helper

TARGETS_INPUT = "targets"  # (batch, time, 1) int64: the token each position predicts
LOGPROB_OUTPUT = "target_logprob"  # (batch, time, 1) float32: log p(target | stream so far)


class ScoringGraphError(ValueError):
    """The model's graph lacks what a scoring graph is built from."""


def _producers(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensor name -> index of the node that writes it."""
    return {name: i for i, node in enumerate(graph.node) for name in node.output if name}


def _ancestors(graph: onnx.GraphProto, names: Iterable[str]) -> set[int]:
    """Indices of the nodes that the tensors `names` are computed from (themselves included)."""
    producers = _producers(graph)
    needed: set[int] = set()
    todo = [producers[n] for n in names if n in producers]
    while todo:
        i = todo.pop()
        if i in needed:
            continue
        needed.add(i)
        todo.extend(producers[n] for n in graph.node[i].input if n in producers)
    return needed


def _outputs(model: onnx.ModelProto, names: Sequence[str]) -> list[onnx.ValueInfoProto]:
    """The graph outputs `names`, in that order; ScoringGraphError for any it lacks."""
    outputs = {o.name: o for o in model.graph.output}
    missing = [n for n in names if n not in outputs]
    if missing:
        raise ScoringGraphError(f"the graph has no output(s) {', '.join(missing)}")
    return [outputs[n] for n in names]


def _set_outputs(model: onnx.ModelProto, outputs: Sequence[onnx.ValueInfoProto]) -> None:
    copies = [onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in outputs]
    del model.graph.output[:]
    model.graph.output.extend(copies)


def _no_control_flow(model: onnx.ModelProto) -> None:
    """Subgraphs may read outer tensors that their node does not list as inputs: a part of
    such a graph cannot be found from node inputs alone."""
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for node in
           model.graph.node for a in node.attribute):  # fmt: skip
        raise ScoringGraphError("the graph has control flow (If/Loop/Scan): cannot cut it")


def _serialised(model: onnx.ModelProto, keep: set[int], name: str) -> bytes:
    """`model` cut down in place to the nodes at the indices `keep` and the initializers they
    read, serialised. In place, because the weights are most of the model: a copy of them, and
    another parsed back by onnx's checker, raised the peak memory of building the GRU 512's
    scoring graph by about 100 MB (onnxruntime checks the graph as it loads it)."""
    graph = model.graph
    for i in reversed(range(len(graph.node))):
        if i not in keep:
            del graph.node[i]
    read = {n for node in graph.node for n in node.input}
    for i in reversed(range(len(graph.initializer))):
        if graph.initializer[i].name not in read:
            del graph.initializer[i]
    graph.name = name
    # The metadata (vocabulary, tokenizer, the n-gram's tables: 3.5 MB for the shipped model)
    # is read from the model file; a scoring session has no use for another copy.
    del model.metadata_props[:]
    return model.SerializeToString()


def scoring_graph(
    model: onnx.ModelProto,
    logits: str,
    state_out: Sequence[str],
    extra_outputs: Sequence[str] = (),
) -> bytes:
    """`model` returning the targets' log-probs instead of its logits (built in `model`,
    which it changes).

    Args:
        model: an exported rnnlm model (fp32 or int8): tokens and state in, logits
            (batch, time, vocab) and state out.
        logits: the name of its logits output; `state_out` those of its state outputs.
        extra_outputs: other graph outputs to return too (e.g. per-step hidden vectors for a
            cache model), after the state.

    Raises:
        ScoringGraphError: one of the outputs named is not in the graph, or the graph has
            control flow.
    """
    graph = model.graph
    kept = _outputs(model, [logits, *state_out, *extra_outputs])[1:]
    _no_control_flow(model)
    log_softmax = f"{logits}/log_softmax"
    graph.node.extend(
        [
            # log p over the vocabulary, then the target's: the logits never leave onnxruntime.
            helper.make_node("LogSoftmax", [logits], [log_softmax], axis=-1),
            helper.make_node(
                "GatherElements", [log_softmax, TARGETS_INPUT], [LOGPROB_OUTPUT], axis=-1
            ),
        ]
    )
    graph.input.append(
        helper.make_tensor_value_info(TARGETS_INPUT, TensorProto.INT64, ["batch", "time", 1])
    )
    _set_outputs(
        model,
        [
            helper.make_tensor_value_info(LOGPROB_OUTPUT, TensorProto.FLOAT, ["batch", "time", 1]),
            *kept,
        ],
    )
    return _serialised(
        model, _ancestors(graph, [LOGPROB_OUTPUT, *state_out, *extra_outputs]), "scoring"
    )


def state_graph(model: onnx.ModelProto, state_out: Sequence[str]) -> bytes:
    """The part of `model` that computes its state outputs: the recurrence without the output
    projection (cut in `model`, which it changes).

    Raises:
        ScoringGraphError: a state output is not in the graph, or the graph has control flow.
    """
    _set_outputs(model, _outputs(model, state_out))
    _no_control_flow(model)
    return _serialised(model, _ancestors(model.graph, state_out), "state")
