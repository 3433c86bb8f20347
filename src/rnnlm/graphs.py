"""Scoring graphs derived from an exported model: its recurrent part and a log-probability head.

    split_for_scoring(model, logits="logits", state_out=["h1"])
      -> recurrent: tokens, h0[, c0]           -> <cut>..., h1[, c1][, extra outputs]
      -> head:      <cut>..., targets (b, t, 1) -> target_logprob (b, t, 1) float32

Scoring a stream needs, per token, only log p(target), not the (batch, time, vocab) logits:
the head ends the network's own output projection with LogSoftmax and GatherElements, so
onnxruntime never hands the logits to Python. The cut between the two parts is found from
the graph alone (no op names are assumed): the head is every node that the logits need and
the state outputs do not, the cut the activations it reads from the rest (for the models rnnlm
exports, one tensor: the top recurrent layer's outputs). Two sessions let the recurrence of
one window run while the head of the previous one does (`rnnlm.inference` pipelines them).

Needs the `onnx` package (a dependency of rnnlm; imported by `rnnlm.inference` only when a
stream is scored, so `generate` and `next` start without it). No torch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import onnx
from onnx import TensorProto, helper

TARGETS_INPUT = "targets"  # (batch, time, 1) int64: the token each position predicts
LOGPROB_OUTPUT = "target_logprob"  # (batch, time, 1) float32: log p(target | stream so far)


class GraphSplitError(ValueError):
    """The model's graph cannot be cut into a recurrent part and a head."""


@dataclass(frozen=True)
class ScoringGraphs:
    """The two halves of a model for scoring, serialised for onnxruntime."""

    recurrent: bytes
    head: bytes
    cut: tuple[str, ...]  # tensors the recurrent part hands to the head, in order


def _producers(graph: onnx.GraphProto) -> dict[str, int]:
    """Tensor name -> index of the node that writes it."""
    return {name: i for i, node in enumerate(graph.node) for name in node.output if name}


def _ancestors(graph: onnx.GraphProto, producers: dict[str, int], names: Iterable[str]) -> set[int]:
    """Indices of the nodes that the tensors `names` are computed from (themselves included)."""
    needed: set[int] = set()
    todo = [producers[n] for n in names if n in producers]
    while todo:
        i = todo.pop()
        if i in needed:
            continue
        needed.add(i)
        todo.extend(producers[n] for n in graph.node[i].input if n in producers)
    return needed


# Initializers of up to this many values (shapes, axes) keep their values for shape inference;
# larger ones (the weights) are declared by type and shape only.
_SMALL_INITIALIZER_VALUES = 1024


def _value_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """Type (element type and shape, as far as known) of every tensor of the graph.

    Shape inference runs on a copy of the graph whose weights are declared, not copied: on the
    model itself it would copy every weight twice (tens of MB of peak memory for nothing).
    """
    graph = model.graph
    small = [t for t in graph.initializer if math.prod(t.dims) <= _SMALL_INITIALIZER_VALUES]
    kept = {t.name for t in small}
    declared = [
        helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in graph.initializer
        if t.name not in kept
    ]
    light = helper.make_model(
        helper.make_graph(
            list(graph.node),
            "types",
            [*graph.input, *declared],
            list(graph.output),
            initializer=small,
            value_info=list(graph.value_info),
        ),
        opset_imports=list(model.opset_import),
    )
    light.ir_version = model.ir_version
    light.functions.extend(model.functions)
    inferred = onnx.shape_inference.infer_shapes(light, strict_mode=False).graph
    return {v.name: v.type for v in [*inferred.input, *inferred.output, *inferred.value_info]}


def _subgraph(
    model: onnx.ModelProto,
    nodes: Sequence[onnx.NodeProto],
    inputs: Sequence[onnx.ValueInfoProto],
    outputs: Sequence[onnx.ValueInfoProto],
    name: str,
) -> bytes:
    """A model of `nodes` over `inputs`, with the initializers they read and `model`'s opsets,
    checked and serialised (one copy of its weights alive at a time)."""
    read = {n for node in nodes for n in node.input}
    graph = helper.make_graph(
        list(nodes),
        name,
        list(inputs),
        list(outputs),
        initializer=[t for t in model.graph.initializer if t.name in read],
    )
    part = helper.make_model(graph, opset_imports=list(model.opset_import))
    part.ir_version = model.ir_version
    part.functions.extend(model.functions)
    data = part.SerializeToString()
    del part, graph
    onnx.checker.check_model(data)
    return data


def split_for_scoring(
    model: onnx.ModelProto,
    logits: str,
    state_out: Sequence[str],
    extra_outputs: Sequence[str] = (),
) -> ScoringGraphs:
    """Cut `model` into its recurrent part and a head that returns the targets' log-probs.

    Args:
        model: an exported rnnlm model (fp32 or int8): tokens and state in, logits
            (batch, time, vocab) and state out.
        logits: the name of its logits output; `state_out` those of its state outputs.
        extra_outputs: other graph outputs that the recurrent part should also return
            (e.g. per-step hidden vectors for a cache model).

    Raises:
        GraphSplitError: a graph with control flow, or whose logits do not depend on anything
            the state outputs are computed from.
    """
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for node in
           graph.node for a in node.attribute):  # fmt: skip
        raise GraphSplitError("the graph has control flow (If/Loop/Scan): cannot split it")
    outputs = {o.name: o for o in graph.output}
    missing = [n for n in (logits, *state_out, *extra_outputs) if n not in outputs]
    if missing:
        raise GraphSplitError(f"the graph has no output(s) {', '.join(missing)}")
    producers = _producers(graph)
    recurrent = _ancestors(graph, producers, [*state_out, *extra_outputs])
    head = _ancestors(graph, producers, [logits]) - recurrent
    # Constants read by the head are made in the head: they are no activation to hand over.
    constants = {i for i in recurrent if not graph.node[i].input}
    initializers = {t.name for t in graph.initializer}
    cut: list[str] = []
    for i in sorted(head):
        for name in graph.node[i].input:
            if not name or name in initializers or name in cut:
                continue
            source = producers.get(name)
            if source is None or (source in recurrent and source not in constants):
                cut.append(name)  # a graph input, or an activation of the recurrent part
    for i in sorted(head):
        for name in graph.node[i].input:
            source = producers.get(name)
            if source in constants:
                head.add(source)
    if not head or not cut:
        raise GraphSplitError(
            f"{logits} is computed by the nodes that make {', '.join(state_out)}: no head to cut"
        )
    types = _value_types(model)
    untyped = [n for n in cut if n not in types or not types[n].tensor_type.elem_type]
    if untyped:
        raise GraphSplitError(f"cannot infer the type of {', '.join(untyped)}")
    cut_infos = [helper.make_value_info(n, types[n]) for n in cut]
    graph_inputs = {i.name for i in graph.input}
    recurrent_part = _subgraph(
        model,
        [graph.node[i] for i in sorted(recurrent)],
        list(graph.input),
        [*(v for v in cut_infos if v.name not in graph_inputs)]
        + [outputs[n] for n in [*state_out, *extra_outputs]],
        "recurrent",
    )
    targets = helper.make_tensor_value_info(TARGETS_INPUT, TensorProto.INT64, ["batch", "time", 1])
    logprob = helper.make_tensor_value_info(LOGPROB_OUTPUT, TensorProto.FLOAT, ["batch", "time", 1])
    log_softmax = f"{logits}/log_softmax"
    head_nodes = [graph.node[i] for i in sorted(head)] + [
        # log p over the vocabulary, then the target's: the logits never leave onnxruntime.
        helper.make_node("LogSoftmax", [logits], [log_softmax], axis=-1),
        helper.make_node("GatherElements", [log_softmax, TARGETS_INPUT], [LOGPROB_OUTPUT], axis=-1),
    ]
    head_part = _subgraph(model, head_nodes, [*cut_infos, targets], [logprob], "head")
    return ScoringGraphs(recurrent_part, head_part, tuple(cut))
