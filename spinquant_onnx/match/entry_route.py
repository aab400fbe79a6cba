"""Stream entries through routing: a graph input moved into place by ops that never mix the hidden axis.

Qwen3-VL adds its deepstack features after the first text layers as ``h[mask] += v``, which the TorchScript
exporter draws as ``Add(h, Where(visual_pos_masks, Gather(deepstack_embeds[k], idx), 0))``. Every op on that
path selects, scatters, stacks or reshapes whole hidden vectors (or fills zeros), so it commutes with
``x -> x @ R1`` on the last axis: rotating the graph input rotates the value added into the stream, exactly
as for ``inputs_embeds``. ``ROUTE_OPS`` says, per op, which input slots carry the routed value and what
must hold of the rest; anything outside the table, or any axis argument that touches the hidden axis, is
not a route (the caller then refuses the Add as it would any unknown writer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from spinquant_onnx.errors import UnsupportedGraphError
from spinquant_onnx.graph.index import GraphIndex, node_label
from spinquant_onnx.graph.ops import TRANSPARENT_OPS

DEPTH_LIMIT = 24
# Ops whose output rank is the largest input rank (elementwise, broadcasting) or the first input's.
_RANK_KEEPING = frozenset(
    {"Add", "Sub", "Mul", "Div", "Neg", "Abs", "Cast", "Identity", "CumSum", "Clip", "Not", "Equal", "Less",
     "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Max", "Min", "Where", "Slice", "ScatterND"}
)


@dataclass
class Route:
    """The graph inputs feeding one stream Add through routing ops, and those ops' nodes."""

    add: onnx.NodeProto
    inputs: list[str] = field(default_factory=list)
    nodes: list[onnx.NodeProto] = field(default_factory=list)


def rank(index: GraphIndex, name: str, depth: int = 0) -> int | None:
    """A tensor's rank from its declared shape, its constant value, or the op that makes it."""
    shape = index.static_shape(name)
    if shape is not None:
        return len(shape)
    info = index.graph_inputs.get(name)
    if info is not None and info.type.tensor_type.HasField("shape"):
        return len(info.type.tensor_type.shape.dim)
    value = index.constant(name)
    if value is not None:
        return value.ndim
    node = index.producer.get(name)
    if node is None or depth > DEPTH_LIMIT:
        return None
    ranks = [rank(index, i, depth + 1) for i in node.input if i]
    op = node.op_type
    if op in _RANK_KEEPING:
        known = [r for r in ranks if r is not None]
        return max(known) if known and (op not in ("Slice", "ScatterND") or ranks[0] is not None) else None
    if op == "Gather" and None not in ranks[:2]:
        return ranks[0] + ranks[1] - 1
    if op == "Reshape":
        target = index.constant(node.input[1])
        return None if target is None else int(target.size)
    if op in ("Unsqueeze", "Squeeze"):
        axes = _axes(index, node)
        if axes is None or ranks[0] is None:
            return None
        return ranks[0] + len(axes) if op == "Unsqueeze" else ranks[0] - len(axes)
    if op == "Concat":
        return ranks[0]
    if op == "ConstantOfShape":
        return _shape_length(index, node.input[0])
    return None


def _shape_length(index: GraphIndex, shape_tensor: str) -> int | None:
    value = index.constant(shape_tensor)
    if value is not None:
        return int(value.size)
    shape = index.static_shape(shape_tensor)
    return shape[0] if shape and len(shape) == 1 else None


def _axes(index: GraphIndex, node: onnx.NodeProto) -> list[int] | None:
    axes = index.attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = index.constant(node.input[1])
        axes = None if value is None else [int(a) for a in value.reshape(-1)]
    return None if axes is None else list(axes)


def _not_last(axis: int, rank_: int | None) -> bool:
    """True when ``axis`` is surely not the last axis (negative axes need no rank)."""
    if axis < 0:
        return axis != -1
    return rank_ is not None and axis != rank_ - 1


def is_zero(index: GraphIndex, name: str) -> bool:
    """A constant that is all zeros (a scalar 0, a zeros tensor, or ConstantOfShape with value 0)."""
    name = index.see_through_back(name)
    value = index.constant(name)
    if value is not None:
        return value.size > 0 and not np.any(value)
    node = index.producer.get(name)
    if node is not None and node.op_type == "ConstantOfShape":
        fill = index.attr(node, "value")
        return fill is None or not np.any(onnx.numpy_helper.to_array(fill))
    return False


# Each checker gets the node and the hidden size; it returns the input slots that carry the routed value,
# or None when the op as used here could mix (or drop part of) the hidden axis.
Checker = Callable[[GraphIndex, onnx.NodeProto, int], "list[int] | None"]


def _gather(index: GraphIndex, node: onnx.NodeProto, hidden: int) -> list[int] | None:
    return [0] if _not_last(index.attr(node, "axis", 0), rank(index, node.input[0])) else None


def _where(index: GraphIndex, node: onnx.NodeProto, hidden: int) -> list[int] | None:
    """``Where(mask, x, 0)`` (or ``Where(mask, 0, x)``) with a mask that is constant along the hidden axis."""
    out_rank = rank(index, node.output[0])
    mask_shape = index.static_shape(node.input[0])
    mask_rank = rank(index, node.input[0])
    flat_mask = (mask_shape is not None and len(mask_shape) > 0 and mask_shape[-1] == 1) or (
        mask_rank is not None and out_rank is not None and mask_rank < out_rank
    )
    mask = index.producer.get(node.input[0])
    if mask is not None and mask.op_type == "Unsqueeze":
        axes = _axes(index, mask)
        flat_mask = flat_mask or bool(axes and any(a == -1 or (out_rank and a == out_rank - 1) for a in axes))
    if not flat_mask:
        return None
    if is_zero(index, node.input[2]):
        return [1]
    if is_zero(index, node.input[1]):
        return [2]
    return None


def _scatter_nd(index: GraphIndex, node: onnx.NodeProto, hidden: int) -> list[int] | None:
    """Whole hidden vectors scattered: the index tuples stop before the last axis."""
    indices = index.static_shape(node.input[1])
    data_rank = rank(index, node.input[0])
    if not indices or indices[-1] is None or data_rank is None or indices[-1] >= data_rank:
        return None
    return [2] if is_zero(index, node.input[0]) else [0, 2]


def _reshape(index: GraphIndex, node: onnx.NodeProto, hidden: int) -> list[int] | None:
    target = index.constant(node.input[1])
    return [0] if target is not None and target.size > 0 and int(target.reshape(-1)[-1]) == hidden else None


def _expand(index: GraphIndex, node: onnx.NodeProto, hidden: int) -> list[int] | None:
    target = index.constant(node.input[1])
    source = index.static_shape(node.input[0])
    if target is not None and target.size > 0 and int(target.reshape(-1)[-1]) in (1, hidden):
        return [0]
    out = index.static_shape(node.output[0])
    return [0] if out and out[-1] == hidden and source and source[-1] == hidden else None


def _slice(index: GraphIndex, node: onnx.NodeProto, hidden: int) -> list[int] | None:
    data_rank = rank(index, node.input[0])
    if len(node.input) < 4 or not node.input[3]:
        starts = index.constant(node.input[1])
        return [0] if starts is not None and data_rank is not None and starts.size < data_rank else None
    axes = index.constant(node.input[3])
    if axes is None or not all(_not_last(int(a), data_rank) for a in axes.reshape(-1)):
        return None
    return [0]


def _concat(index: GraphIndex, node: onnx.NodeProto, hidden: int) -> list[int] | None:
    if not _not_last(index.attr(node, "axis"), rank(index, node.output[0])):
        return None
    return [slot for slot, name in enumerate(node.input) if not is_zero(index, name)]


def _unsqueeze(index: GraphIndex, node: onnx.NodeProto, hidden: int) -> list[int] | None:
    axes, out_rank = _axes(index, node), rank(index, node.output[0])
    return [0] if axes is not None and all(_not_last(a, out_rank) for a in axes) else None


def _squeeze(index: GraphIndex, node: onnx.NodeProto, hidden: int) -> list[int] | None:
    axes, in_rank = _axes(index, node), rank(index, node.input[0])
    return [0] if axes is not None and all(_not_last(a, in_rank) for a in axes) else None


ROUTE_OPS: dict[str, Checker] = {
    "Gather": _gather,
    "Where": _where,
    "ScatterND": _scatter_nd,
    "Reshape": _reshape,
    "Expand": _expand,
    "Slice": _slice,
    "Concat": _concat,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    **{op: (lambda index, node, hidden: [0]) for op in TRANSPARENT_OPS},
}


def entry_route(index: GraphIndex, tensor: str, add: onnx.NodeProto, hidden: int) -> Route | None:
    """The route from graph inputs of width ``hidden`` to ``tensor`` (an operand of the stream Add ``add``)."""
    route = Route(add)
    if not _walk(index, tensor, hidden, route, 0):
        return None
    return route if route.inputs else None


def _walk(index: GraphIndex, name: str, hidden: int, route: Route, depth: int) -> bool:
    if name in index.graph_inputs:
        shape = index.static_shape(name)
        if shape and shape[-1] == hidden:
            route.inputs.append(name)
            return True
        return False
    node = index.producer.get(name)
    checker = ROUTE_OPS.get(node.op_type) if node is not None else None
    if checker is None or depth > DEPTH_LIMIT:
        return False
    slots = checker(index, node, hidden)
    if slots is None:
        return False
    route.nodes.append(node)
    return all(_walk(index, node.input[slot], hidden, route, depth + 1) for slot in slots)


def check_routes_closed(index: GraphIndex, routes: list[Route]) -> None:
    """Every value on a route, the routed inputs included, may be read by route nodes only (and shape ops):
    any other reader would see the rotated values."""
    on_route = {id(node) for route in routes for node in [route.add, *route.nodes]}
    for route in routes:
        tensors = [*route.inputs, *(node.output[0] for node in route.nodes[1:])]
        for name in tensors:
            exit_name = index.exits_graph(name)
            if exit_name:
                raise UnsupportedGraphError(
                    f"'{name}' enters the residual stream (routed from graph input '{route.inputs[0]}') and "
                    f"reaches graph output '{exit_name}', which would hold the rotated values"
                )
            for use in index.value_users(name):
                if id(use.node) not in on_route:
                    raise UnsupportedGraphError(
                        f"'{name}' enters the residual stream (routed from graph input "
                        f"'{route.inputs[0]}') and is also read by node {node_label(use.node)}, which would "
                        "see the rotated values"
                    )
