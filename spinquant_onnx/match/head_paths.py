"""Proofs that an op keeps head_dim blocks intact, from the graph's probed shapes (``graph/probe.py``).

R2 turns each head's value vector, R3 each head's query and key, so every op between the rotation and
where it is undone (o_proj) or cancels (the score MatMul) must move whole head_dim blocks, never look
inside one. A tensor on such a path carries one *head axis*: an axis whose entries are consecutive
head_dim-wide blocks (``index = head * head_dim + d``; a lone head when the axis is exactly head_dim).
Each op type has one rule (``RULES``) that says where that axis is in the op's output, or that the op is not
provably block-preserving (None); the walk refuses on None, naming the node. The rules read concrete
shapes, so repeat_kv through Expand + Reshape, sdpa's flattened ``[batch * heads, seq, head_dim]`` views and
shapes computed at run time are proven the same way as constant Reshapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from spinquant_onnx.graph.index import GraphIndex
from spinquant_onnx.graph.probe import shape_of


@dataclass(frozen=True)
class Step:
    """One op on a head path: the node, which input carries the head axis, and where that axis is."""

    node: onnx.NodeProto
    slot: int
    axis: int  # non-negative, in the input's shape


Rule = Callable[[GraphIndex, Step, int], int | None]


def _shapes(index: GraphIndex, step: Step) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    shape_in, shape_out = shape_of(index, step.node.input[step.slot]), shape_of(index, step.node.output[0])
    return None if shape_in is None or shape_out is None else (shape_in, shape_out)


def _inner(shape: tuple[int, ...], axis: int) -> int:
    return int(np.prod(shape[axis + 1 :], dtype=np.int64))


def same_axis(index: GraphIndex, step: Step, head_dim: int) -> int | None:
    """Elementwise on one tensor (Identity, Cast, Neg, an AIMET quantizer): nothing moves."""
    return step.axis


def regroup(index: GraphIndex, step: Step, head_dim: int) -> int | None:
    """Reshape / Squeeze / Unsqueeze / Flatten keep row-major order, so ``d`` is where the stride matches.

    Entry ``d`` of a block sits at flat stride ``inner`` (the product of the dims after the head axis); an
    output axis with the same inner product and a length divisible by head_dim holds the same blocks.
    """
    shapes = _shapes(index, step)
    if shapes is None:
        return None
    shape_in, shape_out = shapes
    inner = _inner(shape_in, step.axis)
    found = [b for b in range(len(shape_out)) if _inner(shape_out, b) == inner and shape_out[b] % head_dim == 0]
    return found[0] if len(found) == 1 else None


def transpose(index: GraphIndex, step: Step, head_dim: int) -> int | None:
    perm = index.attr(step.node, "perm")
    shapes = _shapes(index, step)
    if perm is None:  # default: reverse the axes
        if shapes is None:
            return None
        perm = list(reversed(range(len(shapes[0]))))
    return list(perm).index(step.axis)


def broadcast(index: GraphIndex, step: Step, head_dim: int) -> int | None:
    """Expand / Tile: the head axis must keep its length (no repeats along it); leading axes may appear."""
    shapes = _shapes(index, step)
    if shapes is None:
        return None
    shape_in, shape_out = shapes
    out_axis = step.axis + len(shape_out) - len(shape_in)
    return out_axis if shape_out[out_axis] == shape_in[step.axis] else None


def _other_is_flat(index: GraphIndex, step: Step, others: list[str]) -> int | None:
    """Output axis when every other operand has length 1 along the head axis (it scales whole blocks)."""
    shapes = _shapes(index, step)
    if shapes is None:
        return None
    shape_in, shape_out = shapes
    out_axis = step.axis + len(shape_out) - len(shape_in)
    for name in others:
        shape = shape_of(index, name)
        if shape is None:
            return None
        axis = out_axis - (len(shape_out) - len(shape))
        if axis >= 0 and shape[axis] != 1:
            return None
    return out_axis


def scale(index: GraphIndex, step: Step, head_dim: int) -> int | None:
    """Mul by (or Div of the path by) a tensor that is constant along the head axis: commutes with R."""
    if step.node.op_type == "Div" and step.slot != 0:
        return None
    return _other_is_flat(index, step, [n for i, n in enumerate(step.node.input) if i != step.slot])


def select(index: GraphIndex, step: Step, head_dim: int) -> int | None:
    """Where(cond, x, 0): a condition flat along the head axis and a zero other branch commute with R."""
    if step.slot == 0:
        return None
    other = index.constant(step.node.input[3 - step.slot])
    if other is None or np.any(other):
        return None
    return _other_is_flat(index, step, [step.node.input[0], step.node.input[3 - step.slot]])


def _normal(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


def join(index: GraphIndex, step: Step, head_dim: int) -> int | None:
    """Concat along another axis (the KV cache along the sequence): blocks untouched.

    The other inputs are the cache, which holds rotated entries (written by the previous step); a constant
    joined in would not be rotated, so only an all-zero one passes.
    """
    shapes = _shapes(index, step)
    if shapes is None:
        return None
    for slot, name in enumerate(step.node.input):
        value = index.constant(name) if slot != step.slot else None
        if value is not None and np.any(value):
            return None
    rank = len(shapes[0])
    return step.axis if _normal(index.attr(step.node, "axis", 0), rank) != step.axis else None


def cut(index: GraphIndex, step: Step, head_dim: int) -> int | None:
    """Slice / Split along another axis; the head axis keeps its full length."""
    shapes = _shapes(index, step)
    if shapes is None:
        return None
    shape_in, shape_out = shapes
    return step.axis if len(shape_in) == len(shape_out) and shape_in[step.axis] == shape_out[step.axis] else None


def values_matmul(index: GraphIndex, step: Step, head_dim: int) -> int | None:
    """probs @ V: V's head axis is its last (the N axis of the product), so the output's last axis."""
    shapes = _shapes(index, step)
    if shapes is None or step.slot != 1:
        return None
    shape_in, shape_out = shapes
    return len(shape_out) - 1 if step.axis == len(shape_in) - 1 else None


# Which op types move whole head_dim blocks, and under which condition (the rule says).
RULES: dict[str, Rule] = {
    "Identity": same_axis,
    "Cast": same_axis,
    "QcQuantizeOp": same_axis,
    "Neg": same_axis,
    "Reshape": regroup,
    "Squeeze": regroup,
    "Unsqueeze": regroup,
    "Flatten": regroup,
    "Transpose": transpose,
    "Expand": broadcast,
    "Tile": broadcast,
    "Mul": scale,
    "Div": scale,
    "Where": select,
    "Concat": join,
    "Slice": cut,
    "Split": cut,
}
# The value path may also pass the probs @ V product (R2); the key path ends at the score MatMul instead.
VALUE_RULES: dict[str, Rule] = {**RULES, "MatMul": values_matmul}


def next_axis(index: GraphIndex, step: Step, head_dim: int, rules: dict[str, Rule]) -> int | None:
    """Where the head axis is in ``step.node``'s outputs, or None when the op is not proven to keep blocks."""
    rule = rules.get(step.node.op_type)
    if rule is None:
        return None
    shape = shape_of(index, step.node.input[step.slot])
    if shape is None or not 0 <= step.axis < len(shape) or shape[step.axis] % head_dim:
        return None
    return rule(index, step, head_dim)


def last_axis(index: GraphIndex, name: str) -> int | None:
    shape = shape_of(index, name)
    return None if shape is None else len(shape) - 1
