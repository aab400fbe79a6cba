"""Channel smoothing before the rotations (SmoothQuant's scales, placed as SmoothRot does): exact, planned.

Per-tensor activation quantization loses most where a few channels of a linear's input are far larger
than the rest. SmoothQuant moves that range into the weight: ``x W = (x / s)(diag(s) W)`` with
``s_j = max|x_j|^a / max|W_j|^(1-a)``. Applied to an *input* it needs a float op or a norm to absorb
``1/s``; here it is applied where the producing linear absorbs it exactly, before R2 / R4 mix the
channels (SmoothRot: smoothing first, then the Hadamard spreads what is left):

* ``down``: down_proj's input is ``f(gate) * up``, linear in up, so up_proj's output columns (and bias)
  take ``1/s`` and down_proj's input rows take ``s`` (a fused gate_up: only the up columns). A
  non-gated MLP (``act(x W1) W2``) is refused: the activation does not commute with a scale.
* ``o``: o_proj's input is the attention-weighted values, linear in v, so v_proj's output columns take
  ``1/s`` and o_proj's input rows ``s``. Query heads of one GQA group read the same values, so the scale
  is per (KV head, channel), shared by the group (query head h reads KV head ``h // (heads / kv_heads)``,
  repeat_kv's and GroupQueryAttention's layout); the value path is checked as R2 checks it.

``max|x_j|`` comes from running the original model on calibration tokens (``Smoothing.maxima``, keyed by
the linear's input tensor; ``integrations.activation_stats`` collects it). The pass only scales weights, so the
float model is unchanged up to rounding; R2 and R4 then rotate the smoothed weights as usual.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from spinquant_onnx.errors import InputError, UnsupportedGraphError
from spinquant_onnx.graph.index import GraphIndex, node_label
from spinquant_onnx.graph.probe import shape_of
from spinquant_onnx.match.heads import AttentionSite, _slice_range, _split_ranges
from spinquant_onnx.match.linears import Linear
from spinquant_onnx.match.roles import Roles, SubBlock
from spinquant_onnx.rewrite.base import PassContext, register
from spinquant_onnx.rewrite.plan import scale
from spinquant_onnx.rewrite.rotate_r2 import value_path

SITES = ("down", "o")
ANCESTRY_LIMIT = 64  # nodes walked back from the gate side of the product to prove it does not read up


@dataclass
class Smoothing:
    """What ``--smooth`` asks for: the migration strength, the sites, and each site input's max |x| per channel."""

    maxima: dict[str, np.ndarray]
    alpha: float = 0.5
    sites: tuple[str, ...] = SITES
    source: str = ""  # where the maxima came from (for the report)

    def __post_init__(self) -> None:
        if not 0.0 <= self.alpha <= 1.0:
            raise InputError(f"--smooth-alpha must be in [0, 1], got {self.alpha}")
        unknown = [s for s in self.sites if s not in SITES]
        if unknown or not self.sites:
            raise InputError(f"--smooth-sites: choose from {', '.join(SITES)} (got {','.join(self.sites) or 'none'})")


@dataclass
class SmoothSite:
    """One checked site: the producer columns that take 1/s, the consumer rows that take s."""

    block: int
    kind: str  # "down" | "o"
    producer: Linear  # up (or gate_up) / v (or qkv)
    columns: tuple[int, int]  # the producer's output columns the scale applies to
    consumer: Linear  # down / o
    scales: np.ndarray  # per producer column in ``columns``
    consumer_scales: np.ndarray  # per consumer input row
    notes: dict[str, Any] = field(default_factory=dict)


def smoothing_scales(x_max: np.ndarray, w_max: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's ``s = max|x|^a / max|W|^(1-a)``, 1 where either side is zero (nothing to migrate)."""
    x_max, w_max = np.asarray(x_max, np.float64), np.asarray(w_max, np.float64)
    usable = (x_max > 0) & (w_max > 0) & np.isfinite(x_max) & np.isfinite(w_max)
    s = np.ones_like(x_max)
    s[usable] = x_max[usable] ** alpha / w_max[usable] ** (1.0 - alpha)
    return s


def _row_max(index: GraphIndex, linear: Linear) -> np.ndarray:
    """max |W| over each input row of a linear (the per-input-channel range the consumer's weight has)."""
    weight = np.abs(np.asarray(index.store.array(linear.weight), dtype=np.float64))
    return weight.max(axis=linear.out_axis)


def _input_max(smoothing: Smoothing, linear: Linear, where: str) -> np.ndarray:
    name = linear.node.input[linear.activation_slot]
    found = smoothing.maxima.get(name)
    if found is None:
        raise InputError(
            f"--smooth: no activation statistics for {where}'s input '{name}'; they must be collected on this "
            "same model (spinquant_onnx.integrations.activation_stats.collect_maxima)"
        )
    if found.shape != (linear.in_features,):
        raise InputError(
            f"--smooth: statistics for '{name}' have {found.shape} channels, {where} reads {linear.in_features}"
        )
    return found


# -------------------------------------------------------------------------------------------- MLP site


def _up_source(index: GraphIndex, part: SubBlock, down: Linear, where: str) -> tuple[Linear, tuple[int, int]]:
    """up_proj (or the up columns of a fused gate_up) whose output enters down's input only linearly."""
    product = index.producer.get(index.see_through_back(down.node.input[down.activation_slot]))
    not_gated = (
        f"{where}: the MLP is not gated (down_proj {down.label} reads {_what(product)}, not act(gate) * up), so "
        "scaling its input is not exact through the activation; use --smooth-sites o"
    )
    if product is None or product.op_type != "Mul" or len(product.input) != 2:
        raise UnsupportedGraphError(not_gated)
    sources = [index.see_through_back(name) for name in product.input]
    for slot, tensor in enumerate(sources):
        found = _reader_columns(index, part, tensor)
        if found is None:
            continue
        stop = {name for entry in part.readers for name in (entry.linear.output, entry.linear.node.output[0])}
        if _reads(index, sources[1 - slot], tensor, stop) or len(index.value_users(tensor)) != 1:
            raise UnsupportedGraphError(not_gated)
        return found
    raise UnsupportedGraphError(not_gated)


def _what(node: Any) -> str:
    return "a graph input" if node is None else f"{node.op_type} {node_label(node)}"


def _reader_columns(index: GraphIndex, part: SubBlock, tensor: str) -> tuple[Linear, tuple[int, int]] | None:
    """The MLP reader (and its output columns) that ``tensor`` is: a whole output, or one Slice/Split piece."""
    producer = index.producer.get(tensor)
    for entry in part.readers:
        linear = entry.linear
        if tensor in (linear.output, index.see_through_back(linear.output)):
            return linear, (0, linear.out_features)
        if producer is None or not producer.input or producer.op_type not in ("Slice", "Split"):
            continue
        if index.see_through_back(producer.input[0]) != index.see_through_back(linear.output):
            continue
        if producer.op_type == "Slice":
            found = _slice_range(index, producer, linear.out_features) or _chained_slice(index, linear, producer)
        else:
            ranges = _split_ranges(index, producer, linear.out_features)
            found = None if ranges is None else ranges[list(producer.output).index(tensor)]
        if found is None:
            raise UnsupportedGraphError(
                f"--smooth: the up columns of the fused {linear.label} are cut by {_what(producer)} with bounds "
                "that are not constants, so which columns to scale is unknown; use --smooth-sites o"
            )
        return linear, found
    return None


def _chained_slice(index: GraphIndex, linear: Linear, piece: onnx.NodeProto) -> tuple[int, int] | None:
    """Columns of one of two Slices that halve a fused output with computed bounds (Phi-3's ``chunk(2)``):
    the order from the bound tensor they share (one's end is the other's start), the widths from the probe."""
    cuts = [use.node for use in index.value_users(linear.output)]
    if len(cuts) != 2 or any(c.op_type != "Slice" or len(c.input) < 4 or len(c.input) > 4 and c.input[4] for c in cuts):
        return None
    if any(index.constant(c.input[3]) is None or int(index.constant(c.input[3]).reshape(-1)[0]) != -1 for c in cuts):
        return None
    other = cuts[1] if cuts[0] is piece else cuts[0]
    widths = [shape_of(index, c.output[0]) for c in (piece, other)]
    if any(not w or w[-1] is None for w in widths) or widths[0][-1] + widths[1][-1] != linear.out_features:
        return None
    width = widths[0][-1]
    if piece.input[1] == other.input[2]:
        return linear.out_features - width, linear.out_features
    if piece.input[2] == other.input[1]:
        return 0, width
    return None


def _reads(index: GraphIndex, tensor: str, target: str, stop: set[str]) -> bool:
    """Whether ``tensor`` is computed from ``target``, walking back to the MLP's own readers (``stop``: what
    they compute from is the block's input, which up cannot reach) and at most ANCESTRY_LIMIT tensors."""
    frontier, seen = [tensor], set()
    while frontier and len(seen) < ANCESTRY_LIMIT:
        name = frontier.pop()
        if name == target:
            return True
        if name in seen or name in stop:
            continue
        seen.add(name)
        producer = index.producer.get(name)
        if producer is not None:
            frontier.extend(i for i in producer.input if i and not index.is_initializer(i))
    return bool(frontier)  # undecided within the limit: treat as reading it (refuse rather than guess)


def prepare_down(index: GraphIndex, roles: Roles, smoothing: Smoothing) -> list[SmoothSite]:
    sites = []
    for number, part in roles.parts_of("mlp"):
        where = f"--smooth, block {number}"
        down = part.dense_writer(f"{where}: mixture-of-experts MLPs are not smoothed; use --smooth-sites o")
        up, columns = _up_source(index, part, down, where)
        s = smoothing_scales(
            _input_max(smoothing, down, f"down_proj {down.label}"), _row_max(index, down), smoothing.alpha
        )
        sites.append(SmoothSite(number, "down", up, columns, down, s, s, {"up": up.label}))
    if not sites:
        raise UnsupportedGraphError("--smooth: no MLP sub-block found to smooth; use --smooth-sites o")
    return sites


# ------------------------------------------------------------------------------------- attention site


def prepare_o(index: GraphIndex, sites: list[AttentionSite], smoothing: Smoothing) -> list[SmoothSite]:
    prepared = []
    for site in sites:
        where = f"--smooth, attention block {site.block}"
        if site.v is None:
            raise UnsupportedGraphError(f"{where}: no v projection found; use --smooth-sites down")
        value_path(index, site)  # nothing on the way from v to o looks inside a head (as R2 requires)
        geometry = site.geometry
        heads, kv_heads, head_dim = geometry.num_heads, geometry.num_kv_heads, geometry.v_head_dim
        o = site.o
        if heads % kv_heads or o.in_features != heads * head_dim or site.v.width != kv_heads * head_dim:
            raise UnsupportedGraphError(
                f"{where}: o_proj reads {o.in_features} channels and v has {site.v.width}, not {heads} x {head_dim} "
                f"and {kv_heads} x {head_dim}"
            )
        group = heads // kv_heads  # query head h reads KV head h // group
        x_max = _input_max(smoothing, o, f"o_proj {o.label}").reshape(kv_heads, group, head_dim).max(axis=1)
        w_max = _row_max(index, o).reshape(kv_heads, group, head_dim).max(axis=1)
        s = smoothing_scales(x_max, w_max, smoothing.alpha)  # [kv_heads, head_dim]
        consumer = np.repeat(s[:, None, :], group, axis=1).reshape(-1)
        prepared.append(
            SmoothSite(
                site.block,
                "o",
                site.v.linear,
                (site.v.start, site.v.stop),
                o,
                s.reshape(-1),
                consumer,
                {"v": site.v.linear.label, "gqa_group": group},
            )
        )
    return prepared


# ------------------------------------------------------------------------------------------------ plan


def plan_smoothing(prepared: list[SmoothSite], plan: Any, row_scales: dict[str, Any]) -> list[dict[str, Any]]:
    """``1/s`` on the producer's columns (and bias), ``s`` on the consumer's input rows (also recorded in
    ``row_scales``, for passes that read the consumer's rows later); report entries."""
    report = []
    for site in prepared:
        row_scales[site.consumer.weight] = site.consumer_scales
        producer, consumer = site.producer, site.consumer
        inverse = np.ones(producer.out_features)
        inverse[site.columns[0] : site.columns[1]] = 1.0 / site.scales
        label = f"smooth {site.kind}"
        plan.add(producer.weight, producer.weight_use, [scale(producer.out_axis, inverse, label)], label)
        if producer.bias is not None:
            plan.add(producer.bias, producer.bias_use, [scale(producer.bias_axis, inverse, label)], f"{label} bias")
        plan.add(consumer.weight, consumer.weight_use, [scale(consumer.in_axis, site.consumer_scales, label)], label)
        report.append(
            {
                "block": site.block,
                "site": site.kind,
                "producer": producer.label,
                "columns": list(site.columns),
                "consumer": consumer.label,
                "scale_min": float(site.scales.min()),
                "scale_max": float(site.scales.max()),
                **site.notes,
            }
        )
    return report


@register
class Smooth:
    """SmoothQuant scales moved from down_proj's / o_proj's input into up / v (planned, before R2 and R4)."""

    name, order = "smooth", 15

    def wanted(self, ctx: PassContext) -> bool:
        return getattr(ctx.options, "smooth", None) is not None

    def check(self, ctx: PassContext) -> list[SmoothSite]:
        smoothing: Smoothing = ctx.options.smooth
        index, found = ctx.analysis.index, []
        if "down" in smoothing.sites:
            found += prepare_down(index, ctx.analysis.roles, smoothing)
        if "o" in smoothing.sites:
            found += prepare_o(index, ctx.analysis.sites_for("--smooth"), smoothing)
        return found

    def apply(self, ctx: PassContext, checked: list[SmoothSite]) -> None:
        smoothing: Smoothing = ctx.options.smooth
        ctx.done["smooth"] = {
            "alpha": smoothing.alpha,
            "sites": list(smoothing.sites),
            "statistics": smoothing.source,
            "layers": plan_smoothing(checked, ctx.plan, ctx.row_scales),
        }
