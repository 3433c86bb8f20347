"""Scoring graphs derived from an exported model: one that returns the targets' log-probs.

    scoring_graph(model, logits="logits", state_out=["h1"])
      -> tokens, h0[, c0], targets (b, t, 1) -> target_logprob (b, t, 1) float32, h1[, c1][, extras]
    state_graph(model, state_out=["h1"])
      -> tokens, h0[, c0]                    -> h1[, c1]    (the recurrence alone)
    sampling_graphs(model, state_out, adaptive, ["hidden"])
      -> head: tokens, h0[, c0] -> head log-probs, h1[, c1], hidden
         tail: each cluster's hidden vectors -> log p(word | cluster)

Scoring a stream needs, per token, only log p(target), not the (batch, time, vocab) logits:
the scoring graph is the network with its logits ended by LogSoftmax and GatherElements, so
onnxruntime never hands the logits to Python. One graph, run by one session on every core the
caller allows: the recurrence of a large model gains most from the second core (each core then
keeps half of the hidden-to-hidden weights in its own L2 cache; `rnnlm.inference`). The state
graph reads a context whose log-probs are not wanted (batched scoring's segments): every node
the state outputs need, and no output projection.

An adaptive softmax (`AdaptiveSoftmax`: the cutoffs the model metadata records) is scored
the way it trains (`rnnlm.model.Decoder.nll`): every position computes the head (its words
and one score per tail cluster) and each tail cluster only the positions whose target lies in
it, so a token pays for about 1,400 of the shipped model's 7,751 output rows instead of all of
them. The graph's own projection is cut into one part per cluster (the weights, biases and an
int8 model's per-row scales and zero points sliced along the vocabulary), found from the
structure the exporters write; where it is not there, the full log-softmax is used (the same
numbers, slower) and a warning says so. Generation samples such a model in two levels the
same way (`sampling_graphs`): a draw from the head, then, for a draw that lands on a cluster,
a draw among that cluster's words.

Needs the `onnx` package (a dependency of rnnlm; imported by `rnnlm.inference` only when a
stream is scored, so `generate` and `next` start without it). No torch.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

log = logging.getLogger(__name__)

TARGETS_INPUT = "targets"  # (batch, time, 1) int64: the token each position predicts
LOGPROB_OUTPUT = "target_logprob"  # (batch, time, 1) float32: log p(target | stream so far)


class ScoringGraphError(ValueError):
    """The model's graph lacks what a scoring graph is built from."""


@dataclass(frozen=True)
class AdaptiveSoftmax:
    """How a model's output layer is cut (`rnnlm.model.Decoder`): the head holds words
    [0, cutoffs[0]) and one score per tail cluster; tail k the words [cutoffs[k-1], cutoffs[k])
    (the last up to vocab_size). `hidden`: the graph tensor the decoder reads, one vector a
    position (the top layer's output)."""

    hidden: str
    cutoffs: tuple[int, ...]
    vocab_size: int

    @property
    def tails(self) -> list[tuple[int, int]]:
        return list(zip(self.cutoffs, [*self.cutoffs[1:], self.vocab_size], strict=True))

    @property
    def head_width(self) -> int:
        """Entries of the head's softmax: its words and one per tail cluster."""
        return self.cutoffs[0] + len(self.cutoffs)


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


def _readers(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """Tensor name -> indices of the nodes that read it."""
    readers: dict[str, list[int]] = defaultdict(list)
    for i, node in enumerate(graph.node):
        for n in node.input:
            readers[n].append(i)
    return readers


def _descendants(graph: onnx.GraphProto, name: str) -> set[int]:
    """Indices of the nodes computed from the tensor `name`."""
    readers = _readers(graph)
    found: set[int] = set()
    todo = list(readers[name])
    while todo:
        i = todo.pop()
        if i not in found:
            found.add(i)
            todo.extend(j for out in graph.node[i].output for j in readers[out])
    return found


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


# Ops that map each row of their (rows, hidden) input to the same row of their output, so a
# projection built of them can run on some rows only and on some of its output columns.
_ROW_WISE_OPS = {"MatMul", "MatMulInteger", "Add", "Mul", "Cast", "DynamicQuantizeLinear"}
_LAST_AXIS = (-1, 2)  # of (batch, time, features)
_PREFIX = "target_only"  # of the tensors and initializers the target-only decoder adds


def _small_ints(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """The int64 constants of at most 8 values by tensor name (e.g. Slice bounds), from
    Constant nodes and initializers."""
    tensors = [(t.name, t) for t in graph.initializer]
    tensors += [
        (n.output[0], n.attribute[0].t)
        for n in graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    ]
    return {
        name: numpy_helper.to_array(t).ravel().tolist()
        for name, t in tensors
        if t.data_type == TensorProto.INT64 and int(np.prod(t.dims)) <= 8
    }


def _attribute(node: onnx.NodeProto, name: str, default: object = None) -> object:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _last_axis_slice(node: onnx.NodeProto, ints: dict[str, list[int]]) -> tuple[int, int] | None:
    """[start, end) that a Slice node takes along the last axis of a (batch, time, vocab)
    tensor, step 1; None for any other node or slice."""
    if node.op_type != "Slice" or len(node.input) < 4:
        return None
    starts, ends, axes = (ints.get(n) for n in node.input[1:4])
    steps = ints.get(node.input[4]) if len(node.input) > 4 and node.input[4] else [1]
    if not (starts and ends and axes) or len(starts) != 1 or axes[0] not in _LAST_AXIS:
        return None
    return (starts[0], ends[0]) if steps == [1] and starts[0] >= 0 else None


def _is_constant(graph: onnx.GraphProto, producers: dict[str, int], name: str) -> bool:
    return name in producers and graph.node[producers[name]].op_type == "Constant"


def _find_head(graph: onnx.GraphProto, softmax: AdaptiveSoftmax) -> tuple[str, str, str]:
    """(the full projection's scores, the head's slice of them, the head's log-probs): the
    pattern LogSoftmax(Concat(Slice(scores, 0:cutoffs[0]), cluster scores)) of
    `Decoder._head_log_probs`."""
    ints = _small_ints(graph)
    indices = _readers(graph)

    def readers(name: str) -> list[onnx.NodeProto]:
        return [graph.node[i] for i in indices[name]]

    for node in graph.node:
        if _last_axis_slice(node, ints) != (0, softmax.cutoffs[0]):
            continue
        for concat in readers(node.output[0]):
            if concat.op_type != "Concat" or _attribute(concat, "axis") not in _LAST_AXIS:
                continue
            for head in readers(concat.output[0]):
                if head.op_type == "LogSoftmax" and _attribute(head, "axis", -1) in _LAST_AXIS:
                    return node.input[0], node.output[0], head.output[0]
    raise ScoringGraphError("no head log-softmax over a slice of the output projection")


def _projection(graph: onnx.GraphProto, softmax: AdaptiveSoftmax, scores: str) -> tuple[
    list[onnx.NodeProto], dict[str, int]]:  # fmt: skip
    """The nodes from `softmax.hidden` to the full projection's `scores`, in graph order, and
    the initializers they read with a vocabulary axis (name -> that axis)."""
    producers = _producers(graph)
    if scores not in producers:
        raise ScoringGraphError(f"{scores} is not computed by a node")
    between = _descendants(graph, softmax.hidden) & _ancestors(graph, [scores])
    nodes = [graph.node[i] for i in sorted(between)]
    if not nodes or producers[scores] not in between:
        raise ScoringGraphError(f"{scores} is not computed from {softmax.hidden}")
    odd = sorted({n.op_type for n in nodes} - _ROW_WISE_OPS)
    if odd:
        raise ScoringGraphError(f"the output projection has ops {odd} that are not row-wise")
    dims = {t.name: list(t.dims) for t in graph.initializer}
    inner = {out for n in nodes for out in n.output} | {softmax.hidden}
    wide: dict[str, int] = {}
    for node in nodes:
        for name in node.input:
            if name in dims:
                axes = [a for a, d in enumerate(dims[name]) if d == softmax.vocab_size]
                if len(axes) > 1:
                    raise ScoringGraphError(f"{name}: more than one axis of the vocabulary's size")
                if axes:
                    wide[name] = axes[0]
            elif name and name not in inner and not _is_constant(graph, producers, name):
                raise ScoringGraphError(f"the output projection reads {name} from elsewhere")
    if not wide:
        raise ScoringGraphError("the output projection reads no vocabulary-sized weights")
    return nodes, wide


def _sliced_weights(
    graph: onnx.GraphProto, wide: dict[str, int], parts: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], dict[str, str]]:
    """Slice nodes that cut each vocabulary-wide initializer into `parts` along its vocabulary
    axis, added to `graph`: part -> {initializer: the part's tensor}. Nodes, not new
    initializers: onnxruntime folds them into constants as it loads the graph, so the model is
    not copied in Python (a copy of the shipped projection and its slices raised the peak
    memory of `rnnlm score` by 50 MB)."""
    names: dict[tuple[int, int], dict[str, str]] = {part: {} for part in parts}
    for weight, axis in wide.items():
        for start, end in parts:
            name = f"{_PREFIX}/{weight}/{start}:{end}"
            bounds = [f"{name}/{what}" for what in ("start", "end", "axis")]
            for bound, value in zip(bounds, (start, end, axis), strict=True):
                graph.initializer.append(
                    numpy_helper.from_array(np.array([value], np.int64), bound)
                )
            graph.node.insert(0, helper.make_node("Slice", [weight, *bounds], [name], name=name))
            names[(start, end)][weight] = name
    return names


def _clone(
    nodes: Sequence[onnx.NodeProto], renamed: dict[str, str], tag: str
) -> list[onnx.NodeProto]:
    """Copies of `nodes` reading `renamed[x]` for each input x it maps, their outputs suffixed
    with `tag` (and added to `renamed`)."""
    copies = []
    for node in nodes:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.name = f"{node.name}/{tag}"
        del copy.input[:]
        copy.input.extend(renamed.get(n, n) for n in node.input)
        del copy.output[:]
        for out in node.output:
            renamed[out] = f"{out}/{tag}" if out else ""
            copy.output.append(renamed[out])
        copies.append(copy)
    return copies


@dataclass(frozen=True)
class _CutProjection:
    scores: str  # the full projection's scores (batch, time, vocab), no longer computed
    nodes: list[onnx.NodeProto]  # the projection's nodes, from the hidden vectors to `scores`
    weights: dict[tuple[int, int], dict[str, str]]  # part -> {initializer: its slice}
    head_logprob: str  # the head's log-probs (batch, time, head words + clusters)


def _cut_projection(model: onnx.ModelProto, softmax: AdaptiveSoftmax) -> _CutProjection:
    """Cut `model`'s output projection into the head's part and each tail's (Slice nodes over
    its weights), and compute the head's log-probs from the head's part alone, where the
    slice of the full projection was (the graph stays in topological order). Checks the
    graph before it changes it.

    Raises:
        ScoringGraphError: the graph is not built the way this expects.
    """
    if next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0) < 13:
        raise ScoringGraphError("opset < 13")  # ReduceSum, Unsqueeze with axes as inputs
    graph = model.graph
    scores, head_scores, head_logprob = _find_head(graph, softmax)
    nodes, wide = _projection(graph, softmax, scores)
    head_part = (0, softmax.cutoffs[0])
    weights = _sliced_weights(graph, wide, [head_part, *softmax.tails])
    at = next(i for i, n in enumerate(graph.node) if head_scores in n.output)
    head = _clone(nodes, {**weights[head_part]}, "head")
    head.append(helper.make_node("Identity", [f"{scores}/head"], [head_scores],
                                 name=f"{_PREFIX}/head"))  # fmt: skip
    kept = [*graph.node[:at], *head, *graph.node[at + 1 :]]
    del graph.node[:]
    graph.node.extend(kept)
    return _CutProjection(scores, nodes, weights, head_logprob)


def _target_only_decoder(model: onnx.ModelProto, softmax: AdaptiveSoftmax, output: str) -> None:
    """Add to `model` the nodes that compute `output`, log p(target) (batch, time, 1) of an
    adaptive softmax, with the head on every position and each tail cluster on its positions
    only. Checks the graph before it changes it.

    Raises:
        ScoringGraphError: the graph is not built the way this expects.
    """
    graph = model.graph
    cut = _cut_projection(model, softmax)
    scores, nodes, weights, head_logprob = cut.scores, cut.nodes, cut.weights, cut.head_logprob
    tails = softmax.tails

    def name(what: str) -> str:
        return f"{_PREFIX}/{what}"

    def const(what: str, value: int | list[int]) -> str:
        graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), name(what)))
        return name(what)

    def node(op: str, inputs: list[str], what: str, **attrs: Any) -> str:
        new.append(helper.make_node(op, inputs, [name(what)], name=name(what), **attrs))
        return name(what)

    new: list[onnx.NodeProto] = []
    # cluster: 0 for a head word, k for the k-th tail (1-based); the head's target: the word,
    # or the entry of the target's cluster.
    one_axis, flat = const("last_axis", [-1]), const("flat", [-1])
    ge = node("GreaterOrEqual", [TARGETS_INPUT, const("cutoffs", list(softmax.cutoffs))], "ge")
    cluster = node("ReduceSum", [node("Cast", [ge], "ge_int", to=TensorProto.INT64), one_axis],
                   "cluster", keepdims=1)  # fmt: skip
    in_head = node("Equal", [cluster, const("zero", 0)], "in_head")
    entry = node("Add", [cluster, const("first_entry", softmax.cutoffs[0] - 1)], "entry")
    head_target = node("Where", [in_head, TARGETS_INPUT, entry], "head_target")
    head_lp = node("GatherElements", [head_logprob, head_target], "head_lp", axis=-1)
    # Each tail: the positions whose target is in it, gathered, scored by its part.
    rows_x = node("Flatten", [softmax.hidden], "rows_x", axis=-1)
    rows_target = node("Reshape", [TARGETS_INPUT, flat], "rows_target")
    rows_cluster = node("Reshape", [cluster, flat], "rows_cluster")
    total = node("ConstantOfShape", [node("Shape", [rows_target], "positions")], "tails_0",
                 value=numpy_helper.from_array(np.zeros(1, np.float32)))  # fmt: skip
    for k, (start, end) in enumerate(tails, start=1):
        tag = f"tail{k}"
        hit = node("Equal", [rows_cluster, const(f"{tag}_k", k)], f"{tag}_hit")
        rows = node("Reshape", [node("NonZero", [hit], f"{tag}_nz"), flat], f"{tag}_rows")
        x = node("Gather", [rows_x, rows], f"{tag}_x", axis=0)
        new += _clone(nodes, {softmax.hidden: x, **weights[(start, end)]}, tag)
        logprob = node("LogSoftmax", [f"{scores}/{tag}"], f"{tag}_logprob", axis=-1)
        local = node("Sub", [node("Gather", [rows_target, rows], f"{tag}_words", axis=0),
                             const(f"{tag}_start", start)], f"{tag}_local")  # fmt: skip
        picked = node("GatherElements", [logprob, node("Unsqueeze", [local, one_axis],
                      f"{tag}_column")], f"{tag}_picked", axis=1)  # fmt: skip
        total = node("ScatterElements", [total, rows, node("Reshape", [picked, flat],
                     f"{tag}_lp")], f"tails_{k}", axis=0)  # fmt: skip
    shaped = node("Reshape", [total, node("Shape", [TARGETS_INPUT], "shape")], "tails")
    new.append(helper.make_node("Add", [head_lp, shaped], [output], name=name(output)))
    graph.node.extend(new)


def _built_target_only(model: onnx.ModelProto, adaptive: AdaptiveSoftmax) -> bool:
    """`_target_only_decoder` writing LOGPROB_OUTPUT; False, with a warning, where the graph
    is not built as it expects."""
    try:
        _target_only_decoder(model, adaptive, LOGPROB_OUTPUT)
    except ScoringGraphError as err:
        log.warning("scoring computes the whole adaptive softmax (%s): the same numbers, slower",
                    err)  # fmt: skip
        return False
    return True


def scoring_graph(
    model: onnx.ModelProto,
    logits: str,
    state_out: Sequence[str],
    extra_outputs: Sequence[str] = (),
    adaptive: AdaptiveSoftmax | None = None,
) -> bytes:
    """`model` returning the targets' log-probs instead of its logits (built in `model`,
    which it changes).

    Args:
        model: an exported rnnlm model (fp32 or int8): tokens and state in, logits
            (batch, time, vocab) and state out.
        logits: the name of its logits output; `state_out` those of its state outputs.
        extra_outputs: other graph outputs to return too (e.g. per-step hidden vectors for a
            cache model), after the state.
        adaptive: the model's adaptive softmax, if it has one: scored target-only (module
            docstring).

    Raises:
        ScoringGraphError: one of the outputs named is not in the graph, or the graph has
            control flow.
    """
    graph = model.graph
    kept = _outputs(model, [logits, *state_out, *extra_outputs])[1:]
    _no_control_flow(model)
    graph.input.append(
        helper.make_tensor_value_info(TARGETS_INPUT, TensorProto.INT64, ["batch", "time", 1])
    )
    if adaptive is None or not _built_target_only(model, adaptive):
        log_softmax = f"{logits}/log_softmax"
        graph.node.extend(
            [
                # log p over the vocabulary, then the target's: the logits never leave
                # onnxruntime.
                helper.make_node("LogSoftmax", [logits], [log_softmax], axis=-1),
                helper.make_node(
                    "GatherElements", [log_softmax, TARGETS_INPUT], [LOGPROB_OUTPUT], axis=-1
                ),
            ]
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


HEAD_OUTPUT = f"{_PREFIX}/head_logprob"  # (batch, time, head words + clusters) float32


def tail_input(k: int) -> str:
    """The tail graph's input for cluster k (1-based): hidden vectors (n, hidden)."""
    return f"{_PREFIX}/tail{k}_x"


def tail_output(k: int) -> str:
    """The tail graph's output for cluster k: log p(word | cluster k) (n, cluster size)."""
    return f"{_PREFIX}/tail{k}_logprob"


def sampling_graphs(
    model: onnx.ModelProto,
    state_out: Sequence[str],
    adaptive: AdaptiveSoftmax,
    extra_outputs: Sequence[str] = (),
) -> tuple[bytes, bytes]:
    """Two graphs that sample an adaptive softmax in two levels (built in `model`, which it
    changes): the head graph, the network up to the head,

        tokens, state -> HEAD_OUTPUT (batch, time, head words + clusters), state[, extras]

    and the tail graph, each cluster's words given the hidden vectors whose draw fell in it,

        tail_input(k) (n_k, hidden) for every k -> tail_output(k) (n_k, cluster size)

    (feed 0 rows for a cluster not wanted). A step then reads the head's part of the
    projection, and a tail's part only when the head's draw lands in that cluster.

    Raises:
        ScoringGraphError: the graph is not built the way this expects, or lacks an output.
    """
    kept = _outputs(model, [*state_out, *extra_outputs])
    _no_control_flow(model)
    cut = _cut_projection(model, adaptive)
    graph = model.graph
    outputs = []
    for k, part in enumerate(adaptive.tails, start=1):
        renamed = {adaptive.hidden: tail_input(k), **cut.weights[part]}
        graph.node.extend(_clone(cut.nodes, renamed, f"tail{k}"))
        graph.node.append(helper.make_node("LogSoftmax", [renamed[cut.scores]], [tail_output(k)],
                                           name=tail_output(k), axis=-1))  # fmt: skip
        outputs.append(tail_output(k))
    tails = _standalone(model, [tail_input(k) for k in range(1, len(outputs) + 1)], outputs)
    graph.node.append(helper.make_node("Identity", [cut.head_logprob], [HEAD_OUTPUT],
                                       name=HEAD_OUTPUT))  # fmt: skip
    head_info = helper.make_tensor_value_info(HEAD_OUTPUT, TensorProto.FLOAT,
                                              ["batch", "time", adaptive.head_width])  # fmt: skip
    _set_outputs(model, [head_info, *kept])
    names = [HEAD_OUTPUT, *state_out, *extra_outputs]
    return _serialised(model, _ancestors(graph, names), "head"), tails


def _standalone(model: onnx.ModelProto, inputs: Sequence[str], outputs: Sequence[str]) -> bytes:
    """A new model of the nodes of `model` that compute `outputs` from `inputs` (float32
    (rows, features) each) and initializers, serialised; `model` is left as it is."""
    graph = model.graph
    keep = _ancestors(graph, outputs)
    nodes = [graph.node[i] for i in sorted(keep)]
    read = {n for node in nodes for n in node.input}
    sub = helper.make_graph(
        nodes,
        "tails",
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["rows", "features"]) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["rows", "words"]) for n in outputs],
        [t for t in graph.initializer if t.name in read],
    )
    standalone = helper.make_model(sub, opset_imports=list(model.opset_import))
    standalone.ir_version = model.ir_version
    return standalone.SerializeToString()
