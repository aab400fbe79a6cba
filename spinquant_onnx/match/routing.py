"""Token routing: the ops between the residual stream and its linears that move whole hidden vectors.

R1 rotates the hidden (last) axis alone, so an op that selects, copies, regroups, scales or sums whole
hidden vectors (tokens) commutes with it. A mixture-of-experts layer is made of such ops: the router
sends each token's normed vector to its top-k experts (Reshape, Unsqueeze, Expand/Tile, Gather), each
expert's output comes back weighted by its router probability and summed (Squeeze, Mul by a per-token
weight, ReduceSum over the top-k axis, Add of a shared expert). They are *routing*, not readers: R1 passes
through them to the linears behind (router, experts' gate/up, shared experts) and in front (experts'
down). The tables below say, per op type, when an op provably keeps the hidden axis whole; anything else
is refused by name, so the closure argument of ``residual.py`` still holds.

An op's effect on the hidden axis is one of: ``KEEP`` (output's last axis is the input's), ``RELAYOUT``
(a row-major re-layout or replication: whole rows survive exactly when the output's last axis has the
hidden size, shown by declared/inferred shapes or forced by the linear that contracts it), ``COLUMN``
(``[..., H] -> [..., H, 1]``, the activation of a column-form expert MatMul) and ``ROW`` (back again).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from spinquant_onnx.errors import UnsupportedGraphError
from spinquant_onnx.graph.index import GraphIndex, Use, node_label
from spinquant_onnx.graph.ops import LINEAR_OPS
from spinquant_onnx.graph.shapes import shape_of
from spinquant_onnx.match.linears import Linear, expert_linear_at, gathered_stack, linear_at, linear_writing

KEEP, RELAYOUT, COLUMN, ROW = "keep", "relayout", "column", "row"


def _rank(index: GraphIndex, name: str) -> int | None:
    shape = shape_of(index, name)
    return None if shape is None else len(shape)


def _last(index: GraphIndex, name: str) -> int | None:
    shape = shape_of(index, name)
    return shape[-1] if shape else None


def _axes(index: GraphIndex, node: onnx.NodeProto, slot: int = 1) -> list[int] | None:
    """Constant axes of a node (attribute before opset 13/18, else input ``slot``)."""
    axes = index.attr(node, "axes")
    if axes is None and len(node.input) > slot and node.input[slot]:
        value = index.constant(node.input[slot])
        axes = None if value is None else value.reshape(-1).tolist()
    return None if axes is None else [int(a) for a in axes]


def _touches_last(axes: list[int] | None, rank: int | None) -> bool | None:
    """Whether ``axes`` include the last axis of a rank-``rank`` tensor (None: cannot tell)."""
    if axes is None:
        return None
    if any(a == -1 for a in axes):
        return True
    if rank is None:
        return None if any(a >= 0 for a in axes) else False
    return any(a % rank == rank - 1 for a in axes)


# --- per-op rules: (index, node, slot the routed tensor arrives on, its form) -> effect, or None to refuse


def _reshape(index, node, slot, form):
    return RELAYOUT if slot == 0 and form == "row" else None


def _flatten(index, node, slot, form):
    rank = _rank(index, node.input[0])
    if slot != 0 or form != "row":
        return None
    return KEEP if rank is not None and index.attr(node, "axis", 1) % rank == rank - 1 else RELAYOUT


def _squeeze(index, node, slot, form):
    if slot != 0:
        return None
    rank, axes = _rank(index, node.input[0]), _axes(index, node)
    if form == "column":
        return ROW if axes is not None and rank is not None and [a % rank for a in axes] == [rank - 1] else None
    return KEEP if _touches_last(axes, rank) is False else RELAYOUT


def _unsqueeze(index, node, slot, form):
    axes, rank = _axes(index, node), _rank(index, node.input[0])
    if slot != 0 or form != "row" or axes is None or rank is None:
        return None
    out_rank = rank + len(axes)
    placed = sorted(a % out_rank for a in axes)
    if out_rank - 1 not in placed:
        return KEEP
    return COLUMN if placed == [out_rank - 1] else None


def _expand(index, node, slot, form):
    # Expand only broadcasts size-1 axes; the hidden axis (size > 1) stays as it is.
    return KEEP if slot == 0 and form == "row" else None


def _tile(index, node, slot, form):
    return RELAYOUT if slot == 0 and form == "row" else None


def _gather(index, node, slot, form):
    rank = _rank(index, node.input[0])
    if slot != 0 or form != "row":
        return None
    return KEEP if _touches_last([index.attr(node, "axis", 0)], rank) is False else None


def _gather_nd(index, node, slot, form):
    indices, rank = shape_of(index, node.input[1]), _rank(index, node.input[0])
    if slot != 0 or form != "row" or index.attr(node, "batch_dims", 0) or not indices or rank is None:
        return None
    return KEEP if indices[-1] is not None and indices[-1] < rank else None


def _slice(index, node, slot, form):
    if slot != 0 or form != "row" or len(node.input) < 4 or not node.input[3]:
        return None
    return KEEP if _touches_last(_axes(index, node, 3), _rank(index, node.input[0])) is False else None


def _transpose(index, node, slot, form):
    perm = index.attr(node, "perm")
    return KEEP if slot == 0 and form == "row" and perm and perm[-1] == len(perm) - 1 else None


def _reduce_sum(index, node, slot, form):
    axes = _axes(index, node)
    if slot != 0 or form != "row" or not axes:
        return None
    return KEEP if _touches_last(axes, _rank(index, node.input[0])) is False else None


def _per_token(index: GraphIndex, name: str) -> bool:
    """A scalar constant, or a tensor whose last axis has size 1 (one factor per token): commutes with R."""
    if index.scalar(index.see_through_back(name)) is not None:
        return True
    shape = shape_of(index, name)
    return bool(shape) and shape[-1] == 1


def _mul(index, node, slot, form):
    return KEEP if form == "row" and _per_token(index, node.input[1 - slot]) else None


def _div(index, node, slot, form):
    return KEEP if form == "row" and slot == 0 and _per_token(index, node.input[1]) else None


def _add(index, node, slot, form):
    return KEEP if form == "row" else None  # both operands must be routed writes (checked by the caller)


Rule = Callable[[GraphIndex, onnx.NodeProto, int, str], str | None]

# Between a norm (or the raw stream) and the linears reading it: tokens dispatched to experts.
READ_ROUTING: dict[str, Rule] = {
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Expand": _expand,
    "Tile": _tile,
    "Gather": _gather,
    "GatherND": _gather_nd,
    "Slice": _slice,
    "Transpose": _transpose,
    "Mul": _mul,  # by a scalar (MiniCPM-style scaling before lm_head) or a per-token factor
    "Div": _div,
}
# Between the linears writing into the stream and the residual Add: expert outputs weighted and combined.
WRITE_ROUTING: dict[str, Rule] = {
    "Reshape": _reshape,
    "Flatten": _flatten,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "ReduceSum": _reduce_sum,
    "Mul": _mul,
    "Div": _div,
    "Add": _add,
    "Cast": lambda index, node, slot, form: KEEP,
    "Identity": lambda index, node, slot, form: KEEP,
}


@dataclass
class _ReadWalk:
    index: GraphIndex
    hidden: int
    readers: list[Linear] = field(default_factory=list)
    relayouts: list[onnx.NodeProto] = field(default_factory=list)
    forms: dict[str, str] = field(default_factory=dict)
    contracting: dict[str, list[str]] = field(default_factory=dict)  # tensor -> what its readers force


def routed_readers(
    index: GraphIndex, tensor: str, hidden: int, what: str, uses: list[Use] | None = None
) -> list[Linear]:
    """The linears reading ``tensor`` (a norm output or the raw stream), through token-routing ops.

    ``uses`` limits the walk to some edges out of ``tensor``; ``what`` names it in refusals.
    """
    walk = _ReadWalk(index, hidden, forms={tensor: "row"})
    frontier = [(use, tensor) for use in (uses if uses is not None else index.value_users(tensor))]
    seen: set[tuple[int, int]] = set()
    while frontier:
        use, name = frontier.pop(0)
        if (id(use.node), use.index) in seen:
            continue
        seen.add((id(use.node), use.index))
        out = _read_step(walk, use, name, what)
        if out is not None:
            frontier.extend((next_use, out) for next_use in index.value_users(out))
    for node in walk.relayouts:
        if not _forced(walk, node.output[0]):
            raise UnsupportedGraphError(
                f"{what} is re-laid out by node {node_label(node)} into a shape whose last axis is not shown "
                f"to be the hidden size {hidden}; R1 cannot be passed through it"
            )
    return walk.readers


def _read_step(walk: _ReadWalk, use: Use, name: str, what: str) -> str | None:
    """One edge of the read walk: a reader (None), a routing op (its output), or a refusal."""
    index, node, form = walk.index, use.node, walk.forms[name]
    found = None
    if node.op_type in LINEAR_OPS and use.index == 0 and form == "row":
        found = linear_at(index, node)
    if found is None and node.op_type == "MatMul":
        found = expert_linear_at(index, node)
        if found is not None and (use.index != found.activation_slot or (form == "column") != (use.index == 1)):
            found = None
    if found is not None:
        if found.in_features != walk.hidden:
            raise UnsupportedGraphError(
                f"linear {found.label}: weight '{found.weight}' has {found.in_features} input features, "
                f"the residual stream has {walk.hidden}"
            )
        walk.readers.append(found)
        walk.contracting.setdefault(name, []).append("linear")
        return None
    rule = READ_ROUTING.get(node.op_type)
    effect = rule(index, node, use.index, form) if rule is not None else None
    if effect is None:
        raise UnsupportedGraphError(
            f"{what} is read by node {node_label(node)}, which is neither a linear layer with a constant weight "
            "nor a token-routing op that keeps the hidden axis whole (match/routing.py), so R1 cannot be "
            "absorbed exactly; describe the readers with --roles"
        )
    out = node.output[0]
    walk.forms[out] = "column" if effect == COLUMN else "row"
    if effect == RELAYOUT:
        walk.relayouts.append(node)
    else:
        walk.contracting.setdefault(name, []).append(out)
    return out


def _forced(walk: _ReadWalk, tensor: str, depth: int = 0) -> bool:
    """The last axis of ``tensor`` has the hidden size: declared/inferred, or forced by its readers.

    Forced: every value reader of it contracts that axis with a weight of ``hidden`` input features,
    directly or through ops that keep the axis (a MatMul whose sizes disagree cannot run).
    """
    shape = shape_of(walk.index, tensor)
    column = walk.forms.get(tensor) == "column"
    known = None if not shape or len(shape) < 1 + column else shape[-1 - column]
    if known is not None:
        return known == walk.hidden
    targets = walk.contracting.get(tensor, [])
    users = walk.index.value_users(tensor)
    if depth > 64 or not users or len(targets) != len(users):
        return False
    return all(t == "linear" or _forced(walk, t, depth + 1) for t in targets)


@dataclass
class _WriteWalk:
    index: GraphIndex
    hidden: int
    add: onnx.NodeProto
    writers: list[Linear] = field(default_factory=list)
    nodes: set[int] = field(default_factory=set)
    tensors: list[str] = field(default_factory=list)


def routed_writers(index: GraphIndex, tensor: str, add: onnx.NodeProto, hidden: int) -> list[Linear]:
    """The linears whose outputs reach residual Add ``add`` as ``tensor``, through routing ops (MoE).

    Every tensor on the way must be read only on the way, or rotating the writers would change a reader.
    """
    walk = _WriteWalk(index, hidden, add, nodes={id(add)})
    _write_back(walk, tensor, "row")
    for name in walk.tensors:
        for use in index.value_users(name):
            if id(use.node) not in walk.nodes:
                raise UnsupportedGraphError(
                    f"'{name}' flows into the residual stream at {node_label(add)} and is also read by "
                    f"{node_label(use.node)}; rotating what writes it would change that reader"
                )
        if name in index.graph_outputs:
            raise UnsupportedGraphError(f"'{name}' flows into the residual stream and is a graph output")
    return walk.writers


def _write_back(walk: _WriteWalk, tensor: str, form: str) -> None:
    index = walk.index
    walk.tensors.append(tensor)
    source = index.see_through_back(tensor)
    node = index.producer.get(source)
    writer = linear_writing(index, tensor) if form == "row" else None
    if writer is None and node is not None:
        writer = expert_linear_at(index, node)
        if writer is not None and (form == "column") != (writer.activation_slot == 1):
            writer = None
    if writer is not None:
        _add_writer(walk, writer)
        return
    rule = WRITE_ROUTING.get(node.op_type) if node is not None else None
    if node is None or rule is None:
        what = f"node {node_label(node)}" if node is not None else f"input '{tensor}'"
        raise UnsupportedGraphError(
            f"residual Add {node_label(walk.add)} adds '{tensor}' from {what}, which is not a linear layer with "
            "a constant weight (or a token-routing op in front of one), so R1 cannot be absorbed there; "
            "describe the writers with --roles"
        )
    walk.nodes.add(id(node))
    walk.tensors.append(node.output[0])
    if node.op_type == "Add" and _expert_bias_add(walk, node):
        return
    inputs = _routed_inputs(walk, node, form)
    for name, input_form in inputs:
        _write_back(walk, name, input_form)


def _expert_bias_add(walk: _WriteWalk, node: onnx.NodeProto) -> bool:
    """``experts' output + bias[idx]`` (gpt-oss): the gathered [E, H] bias stack joins that expert writer."""
    for slot in (0, 1):
        found = gathered_stack(walk.index, node.input[slot], rank=2)
        if found is None or walk.index.store.shape(found[0].name)[1] != walk.hidden:
            continue
        before = len(walk.writers)
        _write_back(walk, node.input[1 - slot], "row")
        added = walk.writers[before:]
        if len(added) != 1 or not added[0].experts or added[0].bias is not None:
            raise UnsupportedGraphError(
                f"node {node_label(node)} adds a gathered bias to something other than one expert projection"
            )
        ref = found[0]
        added[0].bias, added[0].bias_use, added[0].bias_axis = ref.name, ref.use, 1
        return True
    return False


def _routed_inputs(walk: _WriteWalk, node: onnx.NodeProto, form: str) -> list[tuple[str, str]]:
    """Which inputs of a write-side routing op carry the routed value, and in which form; else refuse."""
    index = walk.index
    if node.op_type == "Add":
        return [(name, "row") for name in node.input[:2]]
    # A Squeeze whose output is a row may come from a column ([.., H, 1]); try the column form first.
    for slot in ((0,) if node.op_type not in ("Mul",) else (0, 1)):
        for input_form in (("column", "row") if node.op_type == "Squeeze" else ("row",)):
            effect = WRITE_ROUTING[node.op_type](index, node, slot, input_form)
            if effect is None or (effect == ROW) != (input_form == "column"):
                continue
            if effect == RELAYOUT and _last(index, node.output[0]) != walk.hidden:
                continue
            if input_form == "column" and not _is_column_writer(index, node.input[0]):
                continue
            return [(node.input[slot], input_form)]
    raise UnsupportedGraphError(
        f"node {node_label(node)} between a linear and residual Add {node_label(walk.add)} is not shown to keep "
        f"the hidden axis ({walk.hidden}) whole (match/routing.py), so R1 cannot be passed through it; "
        "describe the writers with --roles"
    )


def _is_column_writer(index: GraphIndex, tensor: str) -> bool:
    node = index.producer.get(index.see_through_back(tensor))
    found = expert_linear_at(index, node) if node is not None else None
    return found is not None and found.activation_slot == 1


def _add_writer(walk: _WriteWalk, writer: Linear) -> None:
    if writer.out_features != walk.hidden:
        raise UnsupportedGraphError(
            f"linear {writer.label}: weight '{writer.weight}' writes {writer.out_features} features into a "
            f"residual stream of {walk.hidden}"
        )
    walk.writers.append(writer)
    walk.nodes.add(id(writer.node))
    if writer.bias_use is not None:
        walk.nodes.add(id(_output_node(walk.index, writer)))


def _output_node(index: GraphIndex, writer: Linear) -> onnx.NodeProto:
    """The node that produces a linear's final output (its bias Add, or the linear itself)."""
    return index.producer.get(writer.output, writer.node)
