"""R2: one head_dim rotation per layer between V and O, absorbed into both weights.

Each head's value vector v_h becomes v_h R2, so ``W_v' = W_v (I_kv (x) R2)`` (and its bias); attention mixes
whole value vectors, so every query head h reading KV group g(h) gets ``out_h R2``, and
``W_o' = (I_heads (x) R2^T) W_o`` undoes it. One R2 for all heads of a layer keeps GQA exact however the
KV heads are repeated. With a fused qkv weight only its v columns turn. Before planning, the path from v to
o is walked to make sure nothing on it looks inside a head (only layout ops, the probs @ V MatMul, a
fused attention op, and cache outputs): anything else is refused rather than rotated wrongly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from spinquant_onnx.errors import UnsupportedGraphError, UnsupportedSizeError
from spinquant_onnx.graph.index import GraphIndex, Use, node_label
from spinquant_onnx.graph.ops import FUSED_ATTENTION, SHAPE_ONLY_OPS
from spinquant_onnx.graph.probe import shape_of
from spinquant_onnx.match.head_paths import VALUE_RULES, Step, last_axis, next_axis
from spinquant_onnx.match.heads import AttentionSite, tensor_rank
from spinquant_onnx.rewrite.base import PassContext, register
from spinquant_onnx.rewrite.plan import TensorPlan, rotate
from spinquant_onnx.rotation.kinds import Rotation, make_rotation


def tile_rotation(rotation: Rotation, count: int) -> Rotation:
    """diag(R, ..., R) with ``count`` copies: R applied to each consecutive block of R.n entries."""
    if count == 1:
        return rotation
    return dataclasses.replace(rotation, n=rotation.n * count, kind="block-diagonal", block_size=rotation.block)


@dataclass(frozen=True, eq=False)
class RangeRotation:
    """``inner`` on entries [start, start + inner.n) of an axis of length n, identity elsewhere.

    Duck-types the part of Rotation that TensorPlan uses (apply, apply_transpose, n, describe): a fused qkv
    weight needs R2 on its v columns only.
    """

    n: int
    start: int
    inner: Rotation

    def _window(self, ndim: int, axis: int) -> tuple[slice, ...]:
        window = [slice(None)] * ndim
        window[axis] = slice(self.start, self.start + self.inner.n)
        return tuple(window)

    def apply(self, x: np.ndarray, axis: int, dtype: type = np.float64, overwrite: bool = False) -> np.ndarray:
        return self._apply(x, axis, dtype, overwrite, transpose=False)

    def apply_transpose(
        self, x: np.ndarray, axis: int, dtype: type = np.float64, overwrite: bool = False
    ) -> np.ndarray:
        return self._apply(x, axis, dtype, overwrite, transpose=True)

    def _apply(self, x: np.ndarray, axis: int, dtype: type, overwrite: bool, transpose: bool) -> np.ndarray:
        y = x if overwrite and x.dtype == dtype and x.flags.writeable else np.array(x, dtype=dtype)
        window = self._window(y.ndim, axis % y.ndim)
        turn = self.inner.apply_transpose if transpose else self.inner.apply
        y[window] = turn(y[window], axis, dtype=dtype)
        return y

    def describe(self) -> dict[str, Any]:
        return {**self.inner.describe(), "range": [self.start, self.start + self.inner.n], "axis_length": self.n}


# ------------------------------------------------------------------------------------- value path check


def _from_softmax(index: GraphIndex, tensor: str, hops: int = 6) -> bool:
    name = tensor
    for _ in range(hops):
        producer = index.producer.get(name)
        if producer is None:
            return False
        if producer.op_type == "Softmax":
            return True
        if not producer.input:  # a Constant or other input-less node
            return False
        name = producer.input[0]
    return False


LAST = -1  # the head axis is the last one (after a fused attention op, whose output rank need not be known)


def _step(index: GraphIndex, use: Use, axis: int, head_dim: int, where: str) -> int:
    """The head axis in the node's outputs (``match/head_paths.VALUE_RULES``), or a refusal naming the node."""
    node = use.node
    if node.op_type == "MatMul" and (use.index != 1 or not _from_softmax(index, node.input[0])):
        raise UnsupportedGraphError(
            f"{where}: {node_label(node)} reads the attention values in a way R2 cannot pass "
            f"(input {use.index}); drop --r2"
        )
    moved = next_axis(index, Step(node, use.index, axis), head_dim, VALUE_RULES)
    if moved is None:
        known = node.op_type in VALUE_RULES
        what = "may split or mix head_dim blocks" if known else "reads the attention values in a way R2 cannot pass"
        raise UnsupportedGraphError(
            f"{where}: {node_label(node)} on the value path {what} (input {use.index}, "
            f"shape {shape_of(index, node.input[use.index])}, head_dim {head_dim}); cannot apply R2 exactly "
            "(drop --r2)"
        )
    return moved


def value_path(index: GraphIndex, site: AttentionSite) -> list[str]:
    """Walk from v to o's input proving each op keeps head_dim blocks; returns the graph outputs reached."""
    where = f"R2, attention block {site.block}"
    head_dim, v, o = site.geometry.v_head_dim, site.v, site.o
    start = last_axis(index, v.tensor)  # probed; else the rank the graph states (a fused op needs no more)
    if start is None and tensor_rank(index, v.tensor) is not None:
        start = tensor_rank(index, v.tensor) - 1
    if start is None:
        raise UnsupportedGraphError(f"{where}: the shape of the values '{v.tensor}' is unknown (onnxruntime probe)")
    frontier, seen, outputs, reached = [(v.tensor, start)], set(), [], False
    while frontier:
        name, axis = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in index.graph_outputs:
            outputs.append(name)
        for use in index.users(name):
            node = use.node
            if node.op_type in SHAPE_ONLY_OPS:
                continue
            if node is o.node and use.index == 0:
                if axis not in (LAST, last_axis(index, name)):
                    raise UnsupportedGraphError(f"{where}: the values reach o_proj {o.label} with head_dim not last")
                reached = True
            elif node.op_type in FUSED_ATTENTION and (use.index == 2 or (use.index == 0 and v.start > 0)):
                frontier.append((node.output[0], LAST))  # the op's output is [.., heads * head_dim]
                outputs.extend(out for out in node.output[1:] if out in index.graph_outputs)
            else:
                known = last_axis(index, name) if axis == LAST else axis
                moved = _step(index, use, LAST if known is None else known, head_dim, where)
                frontier.extend((out, moved) for out in node.output if out)
    if not reached:
        raise UnsupportedGraphError(f"{where}: the values from {v.linear.label} never reach o_proj {o.label}")
    return sorted(set(outputs))


# ------------------------------------------------------------------------------------------------ plan


@dataclass
class R2Site:
    """One layer's R2, checked: the site, its rotation, and the cache outputs it turns."""

    site: AttentionSite
    rotation: Rotation
    cache_outputs: list[str]


def prepare_r2(
    index: GraphIndex, sites: list[AttentionSite], rotation_for: Callable[[int, int], Rotation]
) -> list[R2Site]:
    """Check every layer and choose its R2 (``rotation_for(block, head_dim)``); raises before anything is planned."""
    prepared = []
    for site in sites:
        if site.v is None:
            raise UnsupportedGraphError(f"R2, attention block {site.block}: no v projection found")
        geometry = site.geometry
        r2 = rotation_for(site.block, geometry.v_head_dim)
        if r2.n != geometry.v_head_dim:
            raise UnsupportedGraphError(
                f"R2 for layer {site.block} is {r2.n}x{r2.n} but the graph's value head_dim is {geometry.v_head_dim}"
            )
        prepared.append(R2Site(site, r2, value_path(index, site)))
    return prepared


def plan_r2(prepared: list[R2Site], plan: TensorPlan) -> list[dict[str, Any]]:
    """Add R2's weight operations for every checked layer; returns report entries."""
    report = []
    for checked in prepared:
        site, r2, cache_outputs = checked.site, checked.rotation, checked.cache_outputs
        geometry = site.geometry
        v, o = site.v, site.o
        v_rotation: Any = tile_rotation(r2, geometry.num_kv_heads)
        if v.start != 0 or v.stop != v.linear.out_features:
            v_rotation = RangeRotation(v.linear.out_features, v.start, v_rotation)
        plan.add(v.linear.weight, v.linear.weight_use, [rotate(v.linear.out_axis, v_rotation, "R2")], "R2 v")
        if v.linear.bias is not None:
            plan.add(v.linear.bias, v.linear.bias_use, [rotate(v.linear.bias_axis, v_rotation, "R2")], "R2 v bias")
        o_rotation = tile_rotation(r2, geometry.num_heads)
        plan.add(o.weight, o.weight_use, [rotate(o.in_axis, o_rotation, "R2")], "R2 o")
        report.append(
            {
                "block": site.block,
                "v": v.linear.label,
                "v_columns": [v.start, v.stop],
                "o": o.label,
                "head_dim": geometry.v_head_dim,
                "num_heads": geometry.num_heads,
                "num_kv_heads": geometry.num_kv_heads,
                "rotation": r2.describe(),
                "cache_outputs_rotated": cache_outputs,
            }
        )
    return report


def generated_r2(kind: str, seed: int) -> Callable[[int, int], Rotation]:
    """``rotation_for`` of a generated R2: the R1 kind and seed at order head_dim."""

    def rotation_for(block: int, head_dim: int) -> Rotation:
        try:
            return make_rotation(kind, head_dim, seed)
        except UnsupportedSizeError as exc:
            raise UnsupportedSizeError(f"R2 (order head_dim = {head_dim}): {exc}") from None

    return rotation_for


@register
class R2:
    """One head_dim rotation per layer between V and O, absorbed into both weights (planned)."""

    name, order = "r2", 40

    def wanted(self, ctx: PassContext) -> bool:
        return ctx.uses_r2

    def check(self, ctx: PassContext) -> list[R2Site]:
        sites, learned = ctx.analysis.sites_for("--r2"), ctx.learned
        if learned is not None and learned.has_r2:
            learned.check_layers([site.block for site in sites])
            rotation_for = learned.r2_for
        else:
            rotation_for = generated_r2(ctx.options.rotation, ctx.options.seed)
        return prepare_r2(ctx.analysis.index, sites, rotation_for)

    def apply(self, ctx: PassContext, checked: list[R2Site]) -> None:
        ctx.done["r2"] = plan_r2(checked, ctx.plan)
