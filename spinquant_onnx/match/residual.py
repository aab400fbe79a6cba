"""Trace the residual stream: every tensor R1 rotates, who writes into it and who reads from it.

Exactness comes from closure, not from recognizing a family: starting at the embedding, every consumer
of every stream tensor must be a norm, a residual Add, a pass-through or a shape op, and every Add must
take its other operand from a linear whose weight can absorb R1. Anything else is refused by name, so an
unfamiliar graph is never rotated into a silently wrong model.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from spinquant_onnx.errors import UnsupportedGraphError
from spinquant_onnx.graph.index import GraphIndex, Use, node_label
from spinquant_onnx.graph.ops import LINEAR_OPS, QUANTIZED_OPS, SCALAR_OPS, SHAPE_ONLY_OPS, TRANSPARENT_OPS
from spinquant_onnx.match.entry_route import Route, check_routes_closed, entry_route
from spinquant_onnx.match.linears import Linear, behind_rows, linear_at, linear_writing, row_users, weight_behind
from spinquant_onnx.match.norms import NormMatch, find_norms, norm_width


@dataclass
class Embedding:
    node: onnx.NodeProto
    table: str
    table_use: Use
    hidden_axis: int
    output: str


@dataclass
class Residual:
    """A norm and the linears reading it, or a linear writing into the stream: one event on the stream."""

    kind: str  # "norm" | "write"
    norm: NormMatch | None = None
    readers: list[Linear] = field(default_factory=list)
    writer: Linear | None = None
    add: onnx.NodeProto | None = None
    # A write no weight can absorb (a norm's output, as Gemma's sandwich norms): rotated online instead.
    online: str | None = None
    online_norm: NormMatch | None = None
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
        if _raw_reader(index, node, stream, hidden):
            _open_raw(index, node.input[0], node, _Walk(stream, hidden, events, seen_norms, norm_outputs))
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


def _raw_reader(index: GraphIndex, node: onnx.NodeProto, stream: set[str], hidden: int) -> bool:
    """A linear reading the stream itself (post-norm models: Olmo2, Exaone4 have no norm before q/k/v)."""
    return (
        node.op_type in LINEAR_OPS
        and node.input[0] in stream
        and not any(name in stream for name in node.input[1:])
        and linear_at(index, node) is not None
    )


def _open_raw(index: GraphIndex, tensor: str, node: onnx.NodeProto, walk: _Walk) -> None:
    """Every linear reading ``tensor`` directly, as one identity "norm" event (nothing to fuse, R1 on inputs)."""
    key = hash(("raw", tensor))
    if key in walk.seen_norms:
        return
    walk.seen_norms.add(key)
    norm = NormMatch(
        kind="none (linears read the stream directly)",
        inputs=(tensor,),
        output=tensor,
        gamma=None,
        gamma_use=None,
        gamma_offset=0.0,
        nodes=[node],
        width=walk.hidden,
    )
    readers = []
    for use in index.users(tensor):
        if use.node.op_type in SHAPE_ONLY_OPS or not _raw_reader(index, use.node, walk.stream, walk.hidden):
            continue
        readers.append(_checked_reader(index, norm, use, walk.hidden))
    walk.events.append(Residual("norm", norm=norm, readers=readers))


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
    """The linears reading a norm's output; anything else would see the rotation and is refused."""
    exit_name = index.exits_graph(norm.output)
    if exit_name:
        raise UnsupportedGraphError(
            f"norm {norm.label} output reaches graph output '{exit_name}'; its gamma cannot be fused"
        )
    return [_checked_reader(index, norm, use, hidden) for use in row_users(index, norm.output, hidden)]


def _checked_reader(index: GraphIndex, norm: NormMatch, use: Use, hidden: int) -> Linear:
    found = linear_at(index, use.node) if use.index == 0 and use.node.op_type in LINEAR_OPS else None
    if found is None:
        raise UnsupportedGraphError(
            f"norm {norm.label} output is read by node {node_label(use.node)}, which is not a linear layer "
            "with a constant weight; its gamma cannot be fused"
        )
    if found.in_features != hidden:
        raise UnsupportedGraphError(
            f"linear {found.label}: weight '{found.weight}' has {found.in_features} input features, "
            f"the residual stream has {hidden}"
        )
    return found


def _write_event(
    index: GraphIndex, tensor: str, add: onnx.NodeProto, hidden: int, norm_outputs: dict[str, NormMatch]
) -> list[Residual]:
    """A write into the stream: absorbed by a linear, or, after a sandwich norm, an online rotation."""
    source = index.see_through_back(tensor)
    norm = norm_outputs.get(source)
    producer = index.producer.get(source)
    if (
        producer is not None
        and producer.op_type == "Add"
        and linear_writing(index, source) is None
        and all(use.node is add for use in index.value_users(source))
        and not index.exits_graph(source)
    ):
        # Parallel blocks add their sub-blocks first (NeoX: mlp + attn, then + residual): each is a write.
        return [w for name in producer.input for w in _write_event(index, name, producer, hidden, norm_outputs)]
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
    return [Residual("write", writer=_writer_of(index, tensor, add, hidden), add=add)]


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


def _writer_of(index: GraphIndex, tensor: str, add: onnx.NodeProto, hidden: int) -> Linear:
    """The linear whose output is added into the stream by ``add``; it must write nowhere else."""
    writer = linear_writing(index, behind_rows(index, tensor, hidden))
    if writer is None:
        producer = index.producer.get(index.see_through_back(tensor))
        what = f"node {node_label(producer)}" if producer is not None else f"input '{tensor}'"
        raise UnsupportedGraphError(
            f"residual Add {node_label(add)} adds '{tensor}' from {what}, which is not a linear layer with a "
            "constant weight, so R1 cannot be absorbed there"
        )
    if writer.out_features != hidden:
        raise UnsupportedGraphError(
            f"linear {writer.label}: weight '{writer.weight}' writes {writer.out_features} features into a "
            f"residual stream of {hidden}"
        )
    readers = row_users(index, writer.output, hidden)
    if index.exits_graph(writer.output) or any(u.node is not add for u in readers):
        other = next((u.node for u in readers if u.node is not add), None)
        where = node_label(other) if other is not None else "a graph output"
        raise UnsupportedGraphError(
            f"linear {writer.label} writes into the residual stream and is also read by {where}; rotating its "
            "output would change that reader"
        )
    return writer


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
