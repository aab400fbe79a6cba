"""Trace the residual stream: every tensor R1 rotates, who writes into it and who reads from it.

Exactness comes from closure, not from recognizing a family: starting at the embedding, every consumer
of every stream tensor must be a norm, a residual Add, a pass-through or a shape op, and every Add must
take its other operand from a linear whose weight can absorb R1. Between the two, token routing (MoE
dispatch and combine, ``routing.py``) may move whole hidden vectors around. Anything else is refused by
name, so an unfamiliar graph is never rotated into a silently wrong model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from spinquant_onnx.errors import UnsupportedGraphError
from spinquant_onnx.graph.index import GraphIndex, Use, node_label
from spinquant_onnx.graph.ops import LINEAR_OPS, QUANTIZED_OPS, SCALAR_OPS, SHAPE_ONLY_OPS, TRANSPARENT_OPS
from spinquant_onnx.match.entry_route import Route, check_routes_closed, entry_route
from spinquant_onnx.match.linears import (
    Linear,
    behind_rows,
    expert_linear_at,
    linear_at,
    linear_writing,
    row_users,
    weight_behind,
)
from spinquant_onnx.match.norms import NormMatch, find_norms, norm_width
from spinquant_onnx.match.routing import READ_ROUTING, routed_readers, routed_writers


@dataclass
class Embedding:
    node: onnx.NodeProto
    table: str
    table_use: Use
    hidden_axis: int
    output: str


@dataclass
class Residual:
    """A norm and the linears reading it, linears reading the raw stream, or a linear writing into it."""

    kind: str  # "norm" | "read" (no norm: lm_head of a model without a final norm) | "write"
    norm: NormMatch | None = None
    readers: list[Linear] = field(default_factory=list)
    writer: Linear | None = None
    add: onnx.NodeProto | None = None
    # A write no weight can absorb (a norm's output, as Gemma's sandwich norms): rotated online instead.
    online: str | None = None
    online_norm: NormMatch | None = None
    input: str | None = None  # the stream tensor a "read" event's linears take
    # A write that is a row of a table (GPT-2's learned position embeddings): rotated like the embedding.
    table: Embedding | None = None


@dataclass
class Stream:
    hidden: int
    embedding: Embedding | None
    entries: list[str]
    events: list[Residual]
    tensors: set[str]
    # LayerNorm stream: every writer is centred (mean over hidden removed) so each LayerNorm is an RMSNorm.
    centered: bool = False
    # Stream tensors that are graph outputs (a layer slice handing the stream to the next part).
    exits: list[str] = field(default_factory=list)

    @property
    def norms(self) -> list[Residual]:
        return [e for e in self.events if e.kind == "norm"]

    @property
    def reading(self) -> list[Residual]:
        """Every event with readers: norms (gamma fused into them) and raw-stream reads."""
        return [e for e in self.events if e.kind in ("norm", "read")]

    @property
    def writers(self) -> list[Residual]:
        return [e for e in self.events if e.kind == "write"]


def _refuse_quantized(index: GraphIndex) -> None:
    for node in index.graph.node:
        if node.op_type in QUANTIZED_OPS:
            raise UnsupportedGraphError(
                f"node {node_label(node)} is already quantized ({node.op_type}); rotate the float "
                "(fp32/fp16) export first, then quantize the rotated model"
            )


def _find_embedding(index: GraphIndex, norm_inputs: dict[str, NormMatch]) -> Embedding | None:
    """The Gather on a [vocab, hidden] table whose rows reach a norm through the stream."""
    found = []
    for node in index.graph.node:
        if node.op_type != "Gather" or index.attr(node, "axis", 0) != 0:
            continue
        ref = weight_behind(index, node, 0)
        if ref is None or len(index.store.shape(ref.name)) != 2:
            continue
        hidden_axis = 0 if ref.transposed else 1
        hidden = index.store.shape(ref.name)[hidden_axis]
        if _reaches_norm(index, node.output[0], norm_inputs, hidden):
            found.append(Embedding(node, ref.name, ref.use, hidden_axis, node.output[0]))
    # Token embedding before position embedding (GPT-2 adds both): the one that looks up a graph input.
    found.sort(key=lambda emb: not _reads_graph_input(index, emb.node.input[1]))
    return found[0] if found else None


def _reads_graph_input(index: GraphIndex, name: str) -> bool:
    for _ in range(4):
        name = index.see_through_back(name)
        if name in index.graph_inputs:
            return True
        node = index.producer.get(name)
        if node is None or node.op_type not in ("Reshape", "Unsqueeze", "Squeeze"):
            return False
        name = node.input[0]
    return False


def _reaches_norm(index: GraphIndex, tensor: str, norm_inputs: dict[str, NormMatch], hidden: int) -> bool:
    """True when ``tensor`` feeds (through pass-throughs) a norm over ``hidden`` features."""
    frontier, seen = [tensor], set()
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        norm = norm_inputs.get(name)
        if norm is not None and norm_width(index, norm) == hidden:
            return True
        for use in index.users(name):
            if use.node.op_type in TRANSPARENT_OPS or use.node.op_type in SCALAR_OPS or use.node.op_type == "Add":
                frontier.extend(use.node.output[:1])
    return False


def _float_input_entries(index: GraphIndex, norm_inputs: dict[str, NormMatch]) -> list[tuple[str, int]]:
    """Graph inputs that feed the stream directly (``inputs_embeds``), with their hidden size."""
    found = []
    for name in index.graph_inputs:
        shape = index.static_shape(name)
        if shape and len(shape) == 3 and shape[-1] and _reaches_norm(index, name, norm_inputs, shape[-1]):
            found.append((name, int(shape[-1])))
    return found


def trace_stream(index: GraphIndex) -> Stream:
    """Walk the graph in topological order, growing the set of residual-stream tensors."""
    _refuse_quantized(index)
    norms = find_norms(index)
    norm_inputs: dict[str, NormMatch] = {}
    for norm in norms:
        for name in norm.inputs:
            norm_inputs.setdefault(name, norm)
    embedding, entries, hidden = _stream_start(index, norms, norm_inputs)
    stream = {embedding.output} if embedding is not None else set(entries)
    internal = {id(node): norm for norm in norms for node in norm.nodes}
    norm_outputs = {norm.output: norm for norm in norms}
    events: list[Residual] = []
    seen_norms: set[int] = set()
    routes: list[Route] = []
    raw_read: set[str] = set()

    for node in index.graph.node:
        stream_inputs = [name for name in node.input if name in stream]
        if not stream_inputs:
            continue
        norm = internal.get(id(node))
        if norm is not None and any(name in stream for name in norm.inputs):
            _enter_norm(index, node, norm, _Walk(stream, hidden, events, seen_norms, norm_outputs))
            continue
        if node.op_type in SHAPE_ONLY_OPS:
            continue
        if _passes_value(index, node, stream):
            stream.update(node.output[:1])
            continue
        if node.op_type == "Add" and len(node.input) == 2:
            for other in (name for name in node.input if name not in stream):
                route = entry_route(index, other, node, hidden) if embedding is None else None
                if route is not None:  # Qwen3-VL deepstack features, added directly or routed (entry_route.py)
                    entries.extend(name for name in dict.fromkeys(route.inputs) if name not in entries)
                    routes.append(route)
                else:
                    events.extend(_write_event(index, other, node, hidden, norm_outputs))
            stream.add(node.output[0])
            continue
        if _reads_raw(index, node, stream_inputs[0]):
            _raw_read(index, stream_inputs[0], hidden, events, raw_read)
            continue
        raise UnsupportedGraphError(
            f"residual stream tensor '{stream_inputs[0]}' is read by node {node_label(node)}, which is not an "
            "RMSNorm, a residual Add or a shape op, so R1 cannot be absorbed exactly"
        )
    exits = _check_stream_closed(index, stream, events)
    check_routes_closed(index, routes)
    return Stream(hidden, embedding, entries, events, stream, stream_centered(events), exits)


@dataclass
class _Walk:
    """The state ``trace_stream`` grows as it walks the graph."""

    stream: set[str]
    hidden: int
    events: list[Residual]
    seen_norms: set[int]
    norm_outputs: dict[str, NormMatch]


def _enter_norm(index: GraphIndex, node: onnx.NodeProto, norm: NormMatch, walk: _Walk) -> None:
    """A node inside ``norm`` reads the stream: record the norm (a Skip norm's sum is a residual write too)."""
    if len(norm.inputs) > 1 and id(norm) not in walk.seen_norms:
        # A Skip norm adds before normalizing: that sum is a residual Add, writer included,
        # whether or not its sum output (the next residual) is used.
        _check_skip_writer(index, norm, walk.stream, walk.hidden, walk.events, walk.norm_outputs)
        if norm.sum_output is not None:
            walk.stream.add(norm.sum_output)
    _open_norm(index, norm, walk.hidden, walk.events, walk.seen_norms)
    if node.op_type in TRANSPARENT_OPS:
        walk.stream.update(node.output[:1])


def _open_norm(
    index: GraphIndex, norm: NormMatch, hidden: int, events: list[Residual], seen_norms: set[int]
) -> None:
    """The first time the stream reaches ``norm``: check its gamma and record it with its readers."""
    if id(norm) in seen_norms:
        return
    seen_norms.add(id(norm))
    if norm_width(index, norm) != hidden:
        raise UnsupportedGraphError(
            f"norm {norm.label} on the residual stream normalizes {norm_width(index, norm)} features "
            f"(gamma '{norm.gamma}'), expected {hidden}"
        )
    events.append(Residual("norm", norm=norm, readers=_readers_of(index, norm, hidden)))


def _stream_start(
    index: GraphIndex, norms: list[NormMatch], norm_inputs: dict[str, NormMatch]
) -> tuple[Embedding | None, list[str], int]:
    """Where the stream starts: the embedding Gather, else the float graph inputs that reach a norm."""
    embedding = _find_embedding(index, norm_inputs)
    if embedding is not None:
        return embedding, [], index.store.shape(embedding.table)[embedding.hidden_axis]
    inputs = _float_input_entries(index, norm_inputs)
    if not inputs:
        raise UnsupportedGraphError(
            "no decoder found: no embedding Gather or inputs_embeds input leads to an RMSNorm "
            f"(found {len(norms)} RMSNorm(s) in {len(index.graph.node)} nodes)"
        )
    return None, [name for name, _ in inputs], inputs[0][1]


def _reads_raw(index: GraphIndex, node: onnx.NodeProto, tensor: str) -> bool:
    """A linear (or token routing in front of linears) reading the stream itself, as lm_head without a final norm."""
    if node.op_type in LINEAR_OPS and node.input[0] == tensor and linear_at(index, node) is not None:
        return True
    if node.op_type == "MatMul" and expert_linear_at(index, node) is not None:
        return True
    return node.op_type in READ_ROUTING and node.input[0] == tensor


def _raw_read(index: GraphIndex, tensor: str, hidden: int, events: list[Residual], done: set[str]) -> None:
    """Every linear reading stream tensor ``tensor`` is one read event (post-norm models: q, k, v together)."""
    if tensor in done:
        return
    done.add(tensor)
    uses = [u for u in index.value_users(tensor) if _reads_raw(index, u.node, tensor)]
    readers = routed_readers(index, tensor, hidden, f"residual stream tensor '{tensor}'", uses=uses)
    events.append(Residual("read", readers=readers, input=tensor))


def _passes_value(index: GraphIndex, node: onnx.NodeProto, stream: set[str]) -> bool:
    """A transparent op, or a multiply/divide by a scalar, on a stream tensor: its output is the stream too."""
    if node.op_type in TRANSPARENT_OPS and node.input[0] in stream:
        return True
    return (
        node.op_type in SCALAR_OPS
        and node.input[0] in stream
        and index.scalar(index.see_through_back(node.input[1])) is not None  # AIMET quantizes constants
    )


def _check_stream_closed(index: GraphIndex, stream: set[str], events: list[Residual]) -> list[str]:
    """The stream's graph outputs (a layer slice; the R1 passes decide what they get); refuse a stream no norm reads."""
    if not any(e.kind == "norm" for e in events):
        raise UnsupportedGraphError("no RMSNorm reads the residual stream; nothing to fuse or rotate")
    return sorted(name for name in stream if name in index.graph_outputs)


def stream_centered(events: list[Residual]) -> bool:
    """True on a LayerNorm stream; one stream read by both LayerNorms and RMSNorms cannot be centred."""
    kinds = {e.norm.centered for e in events if e.kind == "norm"} | {
        e.online_norm.centered for e in events if e.online_norm is not None
    }
    if len(kinds) > 1:
        raise UnsupportedGraphError(
            "the residual stream is read by both LayerNorms and RMSNorms; centring it for the LayerNorms "
            "would change the RMSNorms (no way out: this mix is not supported)"
        )
    return kinds == {True}


def _readers_of(index: GraphIndex, norm: NormMatch, hidden: int) -> list[Linear]:
    """The linears reading a norm's output (through token routing); anything else sees the rotation: refused."""
    exit_name = index.exits_graph(norm.output)
    if exit_name:
        raise UnsupportedGraphError(
            f"norm {norm.label} output reaches graph output '{exit_name}'; its gamma cannot be fused"
        )
    return routed_readers(index, norm.output, hidden, f"norm {norm.label} output")


def _write_event(
    index: GraphIndex, tensor: str, add: onnx.NodeProto, hidden: int, norm_outputs: dict[str, NormMatch]
) -> list[Residual]:
    """A write into the stream: absorbed by its linears (several for MoE), or, after a sandwich norm, online."""
    source = index.see_through_back(tensor)
    norm = norm_outputs.get(source)
    table = _table_write(index, source, add, hidden)
    if table is not None:
        return [Residual("write", add=add, table=table)]
    if norm is not None and norm_width(index, norm) == hidden:
        readers = index.value_users(source)
        if index.exits_graph(source) or any(use.node is not add for use in readers):
            raise UnsupportedGraphError(
                f"norm {norm.label} writes into the residual stream and is also read elsewhere; cannot rotate it"
            )
        return [Residual("write", add=add, online=tensor, online_norm=norm)]
    try:
        writers = routed_writers(index, tensor, add, hidden)
    except UnsupportedGraphError:
        row_writer = linear_writing(index, behind_rows(index, tensor, hidden))  # Gemm + row-keeping Reshape
        if row_writer is not None and row_writer.out_features == hidden and all(
            u.node is add for u in row_users(index, row_writer.output, hidden)
        ) and not index.exits_graph(row_writer.output):
            return [Residual("write", writer=row_writer, add=add)]
        producer = index.producer.get(source)
        if not (
            producer is not None
            and producer.op_type == "Add"
            and linear_writing(index, source) is None
            and all(use.node is add for use in index.value_users(source))
            and not index.exits_graph(source)
        ):
            raise
        # Parallel blocks add their sub-blocks first (NeoX: mlp + attn, then + residual): each is a write.
        return [w for name in producer.input for w in _write_event(index, name, producer, hidden, norm_outputs)]
    return [Residual("write", writer=writer, add=add) for writer in writers]


def _table_write(index: GraphIndex, source: str, add: onnx.NodeProto, hidden: int) -> Embedding | None:
    """A Gather of rows of a [N, hidden] initializer added into the stream (learned position embeddings)."""
    node = index.producer.get(source)
    if node is None or node.op_type != "Gather" or index.attr(node, "axis", 0) != 0:
        return None
    ref = weight_behind(index, node, 0)
    if ref is None or len(index.store.shape(ref.name)) != 2 or index.store.shape(ref.name)[1] != hidden:
        return None
    if any(use.node is not add for use in index.value_users(source)) or index.exits_graph(source):
        return None
    return Embedding(node, ref.name, ref.use, 1, source)



def _check_skip_writer(
    index: GraphIndex,
    norm: NormMatch,
    stream: set[str],
    hidden: int,
    events: list[Residual],
    norm_outputs: dict[str, NormMatch],
) -> None:
    """A SkipSimplifiedLayerNormalization adds its two inputs: the one not in the stream is a writer."""
    node = norm.anchor
    for name in norm.inputs:
        if name not in stream:
            events.extend(_write_event(index, name, node, hidden, norm_outputs))
