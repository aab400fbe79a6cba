"""Massive channels of down_proj's input computed on a float side path (exact; LLM.int8's decomposition, static).

A few intermediate channels of some layers' down_proj input carry values thousands of times the rest on
a few tokens (the "massive activations" / super weights of Sun et al. and Yu et al.; SmolLM2-135M: 2908 vs
a median channel max of 0.67 in layer 11, on the first token). Their product with down_proj's weight is
the residual stream's massive activation, so under per-tensor activation scales they set the range of
down_proj's input *and* of its output, and every other token is quantized to a handful of levels. No
rotation or scale fixes that: the outlier is a token, and rotating a token only spreads it.

This pass splits ``x W`` into ``(x * m) W_m + x[:, J] W[J]``: J = the K channels with the largest max |x|
(measured, as for ``--smooth``), m zero on J, and ``W_m`` W with rows J zeroed. The first term is the
quantized down_proj (its input and output no longer see the massive channels); the second is a float
``Gather`` + ``MatMul`` of K x hidden (kept float like the online rotations, named under their prefix),
added back to down_proj's output. Exact in float up to the summation order. With ``--r4`` the Hadamard
rotates ``x * m``; with ``--smooth`` the side weight takes the same row scales as down_proj.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import helper, numpy_helper

from spinquant_onnx.errors import InputError, UnsupportedGraphError
from spinquant_onnx.graph.index import GraphIndex, Use, fresh_name
from spinquant_onnx.graph.shapes import tensor_elem_type
from spinquant_onnx.match.linears import Linear
from spinquant_onnx.match.roles import Roles
from spinquant_onnx.rewrite.base import PassContext, register
from spinquant_onnx.rewrite.online import ONLINE_PREFIX
from spinquant_onnx.rewrite.plan import center, rotate, scale


@dataclass
class FloatSite:
    block: int
    down: Linear
    channels: np.ndarray  # int64, sorted
    peak: float  # the largest channel max |x| taken out
    rest: float  # the largest channel max |x| left in


def prepare(roles: Roles, index: GraphIndex, maxima: dict[str, np.ndarray], count: int) -> list[FloatSite]:
    """The K largest channels of every down_proj input (checked: dense, 2-D weight, statistics present)."""
    sites = []
    for number, part in roles.parts_of("mlp"):
        where = f"--float-channels, block {number}"
        down = part.dense_writer(f"{where}: mixture-of-experts MLPs are not split")
        name = down.node.input[down.activation_slot]
        found = maxima.get(name)
        if found is None or found.shape != (down.in_features,):
            raise InputError(f"{where}: no activation statistics for down_proj's input '{name}'")
        if down.output in index.graph_outputs or count >= down.in_features:
            raise UnsupportedGraphError(f"{where}: down_proj's output is a graph output or K >= its inputs")
        order = np.argsort(-found, kind="stable")
        sites.append(
            FloatSite(
                number,
                down,
                np.sort(order[:count]).astype(np.int64),
                float(found[order[0]]),
                float(found[order[count]]),
            )
        )
    if not sites:
        raise UnsupportedGraphError("--float-channels: no MLP down projection found")
    return sites


def _insert(index: GraphIndex, site: FloatSite, ctx: PassContext) -> dict[str, Any]:
    """Mask node before down_proj, Gather + MatMul side path, Add after it; plans W_m and the side weight."""
    down, channels = site.down, site.channels
    graph, taken = index.graph, set()
    x = down.node.input[down.activation_slot]
    elem = tensor_elem_type(index, x)
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    stem = f"{ONLINE_PREFIX}float_channels/block{site.block}"
    mask = np.ones(down.in_features, dtype=np.float64)
    mask[channels] = 0.0
    names = {k: fresh_name(index, f"{stem}/{k}", taken) for k in ("mask", "idx", "rows", "xm", "xj", "yj", "y")}
    weight = np.asarray(index.store.array(down.weight), dtype=np.float64)
    rows = np.take(weight, channels, axis=down.in_axis)
    if down.in_axis == 1:
        rows = rows.T  # the side MatMul takes [K, out]
    row_scale = ctx.row_scales.get(down.weight)
    if row_scale is not None:  # --smooth scaled down_proj's rows: x here is x / s, so the side rows take s
        rows = rows * row_scale[channels][:, None]
    for name, values in (
        (names["mask"], mask.astype(dtype)),
        (names["idx"], channels),
        (names["rows"], rows.astype(index.store.dtype(down.weight))),
    ):
        graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(values), name))
        index.store.tensors[name] = graph.initializer[-1]
    nodes = [
        helper.make_node("Mul", [x, names["mask"]], [names["xm"]], name=f"{stem}/mask_mul"),
        helper.make_node("Gather", [x, names["idx"]], [names["xj"]], name=f"{stem}/gather", axis=-1),
        helper.make_node("MatMul", [names["xj"], names["rows"]], [names["yj"]], name=f"{stem}/matmul"),
    ]
    add = helper.make_node("Add", [down.output, names["yj"]], [names["y"]], name=f"{stem}/add")
    readers = [(u.node, u.index) for u in index.users(down.output)]
    for reader, slot in readers:
        reader.input[slot] = names["y"]
    down.node.input[down.activation_slot] = names["xm"]
    position = list(graph.node).index(down.node)
    for offset, node in enumerate(nodes):
        graph.node.insert(position + offset, node)
    producer = index.producer[down.output]
    graph.node.insert(list(graph.node).index(producer) + 1, add)
    index.refresh()
    side = next(n for n in graph.node if n.name == f"{stem}/matmul")
    plan = ctx.plan
    plan.add(down.weight, down.weight_use, [scale(down.in_axis, mask, "float channels")], "float channels")
    stream = ctx.analysis.stream
    if any(event.writer is down and event.online is None for event in stream.writers):  # R1 absorbed here
        ops = [center(1, "LayerNorm centring")] * stream.centered + [rotate(1, ctx.rotation, "R1")]
        plan.add(names["rows"], Use(side, 1), ops, "float channels side")
    return {
        "block": site.block,
        "down": down.label,
        "channels": channels.tolist(),
        "peak_max_abs": site.peak,
        "largest_kept_max_abs": site.rest,
        "first_node": nodes[0].name,
    }


@register
class FloatChannels:
    """The K largest down_proj input channels on a float side path (nodes + plan), before R4."""

    name, order = "float_channels", 55

    def wanted(self, ctx: PassContext) -> bool:
        return bool(getattr(ctx.options, "float_channels", 0))

    def check(self, ctx: PassContext) -> list[FloatSite]:
        maxima = getattr(ctx.options, "activation_maxima", None)
        if not maxima:
            raise InputError("--float-channels needs activation statistics (--calibration TOKENS.npy)")
        return prepare(ctx.analysis.roles, ctx.analysis.index, maxima, ctx.options.float_channels)

    def apply(self, ctx: PassContext, checked: list[FloatSite]) -> None:
        ctx.done["float_channels"] = [_insert(ctx.analysis.index, site, ctx) for site in checked]
