"""Where RMSNorms are recognized: the decomposed op chains and the fused ops, as a table of patterns.

RMSNorm commutes with an orthogonal rotation of its input (``rms(x R) == rms(x)``) once its gamma is
moved into the linears that read it; that is the whole basis of R1. LayerNorm (mean-centred) does not,
but on a zero-mean stream it *is* an RMSNorm followed by its affine part (SliceGPT, arXiv 2401.15024):
its forms are listed too, marked ``centered``, and the rewrite centres every writer of such a stream and
turns each LayerNorm into an RMSNorm (rewrite/layernorm.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from spinquant_onnx.graph.index import GraphIndex, Use, node_label, per_graph_state
from spinquant_onnx.graph.ops import SHAPE_ONLY_OPS, TRANSPARENT_OPS
from spinquant_onnx.match.pattern import (
    AnyOf,
    Const,
    Init,
    Match,
    Op,
    Pattern,
    Var,
    broadcast_scalar,
    match,
    optional,
    scalar_equals,
)


def _reduces_last_axis(index: GraphIndex, node: onnx.NodeProto) -> bool:
    axes = index.attr(node, "axes")
    if axes is None and len(node.input) > 1:
        value = index.constant(node.input[1])
        axes = None if value is None else [int(a) for a in value.reshape(-1)]
    if axes is None or len(axes) != 1 or not index.attr(node, "keepdims", 1):
        return False
    rank = index.static_shape(node.input[0])
    return axes[0] == -1 or (rank is not None and axes[0] == len(rank) - 1)


_X = optional("Cast", Var("x"))
_SQUARE = AnyOf((Op(("Pow",), (_X, Const(test=scalar_equals(2.0)))), Op(("Mul",), (_X, _X))))
_MEAN = Op(("ReduceMean",), (_SQUARE,), check=_reduces_last_axis)
# eps is one value (a per-channel vector makes x / sqrt(ms + eps_i), which no rotation commutes with, #13);
# the mean is over the last axis only (_reduces_last_axis); gamma's width is checked against the stream.
# The eps Add is optional: Helium's export (and any eps = 0 norm) takes the root of the mean itself.
_EPS_ADDED = AnyOf((Op(("Add",), (_MEAN, Const("eps", broadcast_scalar)), commutative=True), _MEAN))
_DENOM = Op(("Sqrt",), (_EPS_ADDED,))
_INVERSE = AnyOf((Op(("Div",), (Const(test=scalar_equals(1.0)), _DENOM)), Op(("Reciprocal",), (_DENOM,))))
_NORMALIZED = AnyOf((Op(("Mul",), (_X, _INVERSE), commutative=True), Op(("Div",), (_X, _DENOM))))
# Gemma scales by (1 + w); an exporter that does not fold the constant leaves the Add in the graph.
_GAMMA = AnyOf(
    (
        Op(
            ("Add",), (Init("gamma"), Const("offset", scalar_equals(1.0))), commutative=True, name="gamma_add"
        ),
        Init("gamma"),
    )
)
DECOMPOSED_RMSNORM = Op(("Mul",), (optional("Cast", _NORMALIZED), _GAMMA), commutative=True, name="scale")


def _decomposed_norm(x: Pattern) -> Pattern:
    """The RMS chain over ``x``: x / sqrt(mean(x*x) + eps), in any of its spellings."""
    square = AnyOf((Op(("Pow",), (x, Const(test=scalar_equals(2.0)))), Op(("Mul",), (x, x))))
    mean = Op(("ReduceMean",), (square,), check=_reduces_last_axis)
    denom = Op(("Sqrt",), (Op(("Add",), (mean, Const("eps")), commutative=True),))
    inverse = AnyOf((Op(("Div",), (Const(test=scalar_equals(1.0)), denom)), Op(("Reciprocal",), (denom,))))
    return AnyOf((Op(("Mul",), (x, inverse), commutative=True), Op(("Div",), (x, denom))))


# LayerNorm spelled out: (x - mean(x)) / sqrt(mean((x - mean(x))^2) + eps) [* gamma] [+ beta].
_CENTERED = Op(("Sub",), (_X, Op(("ReduceMean",), (_X,), check=_reduces_last_axis)), name="center")
_LN_NORMALIZED = optional("Cast", _decomposed_norm(_CENTERED))
_LN_SCALED = AnyOf((Op(("Mul",), (_LN_NORMALIZED, _GAMMA), commutative=True, name="scale"), _LN_NORMALIZED))
DECOMPOSED_LAYERNORM = AnyOf(
    (Op(("Add",), (_LN_SCALED, Init("beta")), commutative=True, name="shift"), _LN_SCALED)
)


@dataclass(frozen=True)
class FusedNorm:
    """A single-op RMSNorm: which input slot holds what, and which output is the residual sum."""

    op_type: str
    data: int
    gamma: int
    skip: int | None = None
    bias: int | None = None
    sum_output: int | None = None
    shift: int | None = None  # LayerNorm's beta
    centered: bool = False  # a LayerNorm: subtracts the mean first


FUSED_NORMS = (
    FusedNorm("SimplifiedLayerNormalization", data=0, gamma=1),
    FusedNorm("RMSNormalization", data=0, gamma=1),
    FusedNorm("SkipSimplifiedLayerNormalization", data=0, skip=1, gamma=2, bias=3, sum_output=3),
    # opset-17 LayerNormalization and com.microsoft's (same slots); ORT's SkipLayerNormalization.
    FusedNorm("LayerNormalization", data=0, gamma=1, shift=2, centered=True),
    FusedNorm("SkipLayerNormalization", data=0, skip=1, gamma=2, shift=3, bias=4, sum_output=3, centered=True),
)


@dataclass
class NormMatch:
    """One RMSNorm instance. ``inputs`` are the tensors it normalizes (two for Skip norms, which add them).

    A LayerNorm (``centered``) also has an ``eps``, its ``width``, and maybe a ``shift`` (beta); its gamma
    may be a Constant (``gamma_use`` None) or absent (non-parametric LayerNorm: gamma None).
    """

    kind: str
    inputs: tuple[str, ...]
    output: str
    gamma: str | None
    gamma_use: Use | None
    gamma_offset: float
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    sum_output: str | None = None
    bias: str | None = None
    bias_use: Use | None = None
    centered: bool = False
    shift: str | None = None
    eps: float = 1e-5
    width: int | None = None

    @property
    def anchor(self) -> onnx.NodeProto:
        return self.nodes[0]

    @property
    def label(self) -> str:
        return node_label(self.anchor)


def norm_width(index: GraphIndex, norm: NormMatch) -> int | None:
    """How many features the norm normalizes (its gamma's size, or a LayerNorm's matched width)."""
    if norm.width is not None:
        return norm.width
    shape = index.store.shape(norm.gamma) if norm.gamma in index.store else None
    return shape[0] if shape is not None and len(shape) == 1 else None


def norm_vector(index: GraphIndex, name: str | None) -> np.ndarray | None:
    """A norm's gamma or beta in float64 (an initializer or a Constant), None when absent."""
    if name is None:
        return None
    value = index.store.array(name) if name in index.store else index.constant(name)
    return None if value is None else np.asarray(value, dtype=np.float64).reshape(-1)


def _check_private(index: GraphIndex, nodes: list[onnx.NodeProto], output: str, inputs: set[str]) -> bool:
    """A norm's inner tensors must not be read outside the norm, or fusing its gamma would change them."""
    inside = {id(n) for n in nodes}
    aliases = set(inputs)
    for node in nodes:  # a Cast of the input is the input in another dtype: others may read it too
        if node.op_type in TRANSPARENT_OPS and node.input[0] in aliases:
            aliases.update(node.output)
    for node in nodes:
        for out in node.output:
            if out == output or out in aliases:
                continue
            for use in index.users(out):
                if id(use.node) not in inside and use.node.op_type not in SHAPE_ONLY_OPS:
                    return False
            if out in index.graph_outputs:
                return False
    return True


def _decomposed(index: GraphIndex, node: onnx.NodeProto) -> NormMatch | None:
    found: Match | None = match(index, DECOMPOSED_RMSNORM, node.output[0])
    if found is None:
        return None
    x = found.tensors["x"]
    gamma = found.tensors["gamma"]
    if len(index.store.shape(gamma)) != 1:
        return None
    nodes = [found.nodes["scale"]] + [n for n in found.matched if n is not found.nodes["scale"]]
    if not _check_private(index, nodes, node.output[0], {x}):
        return None
    consumer = found.nodes.get("gamma_add", found.nodes["scale"])
    slot = list(consumer.input).index(found.tensors["gamma.use"])
    offset = 1.0 if "offset" in found.values else 0.0
    return NormMatch(
        kind="rmsnorm (decomposed, 1+w scale)" if offset else "rmsnorm (decomposed)",
        inputs=(x,),
        output=node.output[0],
        gamma=gamma,
        gamma_use=index.source_edge(consumer, slot),
        gamma_offset=offset,
        nodes=nodes,
    )


def _width_of(index: GraphIndex, tensors: list[str | None], x: str) -> int | None:
    for name in tensors:
        if name is not None:
            value = norm_vector(index, name)
            if value is not None:
                return value.size
    shape = index.static_shape(x)
    return shape[-1] if shape else None


def _decomposed_layernorm(index: GraphIndex, node: onnx.NodeProto) -> NormMatch | None:
    found: Match | None = match(index, DECOMPOSED_LAYERNORM, node.output[0])
    if found is None:
        return None
    x, gamma, beta = found.tensors["x"], found.tensors.get("gamma"), found.tensors.get("beta")
    if "gamma_add" in found.nodes:
        return None  # (1 + w) LayerNorm left unfolded: not seen in any export
    nodes = list({id(n): n for n in found.matched}.values())
    nodes.sort(key=lambda n: n is not node)
    if not _check_private(index, nodes, node.output[0], {x}):
        return None
    width = _width_of(index, [gamma, beta], x)
    return NormMatch(
        kind="layernorm (decomposed)",
        inputs=(x,),
        output=node.output[0],
        gamma=gamma,
        gamma_use=None,
        gamma_offset=0.0,
        nodes=nodes,
        centered=True,
        shift=beta,
        eps=float(found.values["eps"].reshape(())),
        width=width,
    )


def _fused_layernorm(index: GraphIndex, node: onnx.NodeProto, spec: FusedNorm) -> NormMatch | None:
    """LayerNormalization / SkipLayerNormalization over the last axis, gamma and beta constants."""
    axis = index.attr(node, "axis", -1)
    rank = index.static_shape(node.input[spec.data])
    if axis != -1 and (rank is None or axis != len(rank) - 1):
        return None
    slot = {"gamma": spec.gamma, "shift": spec.shift}
    found: dict[str, str | None] = {}
    for key, at in slot.items():
        name = node.input[at] if len(node.input) > at and node.input[at] else None
        name = None if name is None else index.see_through_back(name)
        if name is not None and norm_vector(index, name) is None:
            return None
        found[key] = name
    if spec.skip is not None and len(node.input) > spec.bias and node.input[spec.bias]:
        return None  # a pre-norm bias on a Skip LayerNorm: not produced by any exporter we know
    inputs = (node.input[spec.data],) if spec.skip is None else (node.input[spec.data], node.input[spec.skip])
    sum_output = None
    if spec.sum_output is not None and len(node.output) > spec.sum_output and node.output[spec.sum_output]:
        sum_output = node.output[spec.sum_output]
    if any(node.output[i] for i in range(1, len(node.output)) if i != spec.sum_output):
        return None  # mean / inv_std outputs are read: they would change
    return NormMatch(
        kind=spec.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{spec.op_type}",
        inputs=inputs,
        output=node.output[0],
        gamma=found["gamma"],
        gamma_use=None,
        gamma_offset=0.0,
        nodes=[node],
        sum_output=sum_output,
        centered=True,
        shift=found["shift"],
        eps=float(index.attr(node, "epsilon", 1e-5)),
        width=_width_of(index, [found["gamma"], found["shift"]], inputs[0]),
    )


def _fused(index: GraphIndex, node: onnx.NodeProto, spec: FusedNorm) -> NormMatch | None:
    if spec.centered:
        return _fused_layernorm(index, node, spec)
    if len(node.input) <= spec.gamma:
        return None
    if spec.op_type == "RMSNormalization" and index.attr(node, "axis", -1) != -1:
        return None
    gamma = index.see_through_back(node.input[spec.gamma])
    if not index.is_initializer(gamma) or len(index.store.shape(gamma)) != 1:
        return None
    inputs = (node.input[spec.data],) if spec.skip is None else (node.input[spec.data], node.input[spec.skip])
    bias = None
    bias_use = None
    if spec.bias is not None and len(node.input) > spec.bias and node.input[spec.bias]:
        bias = index.see_through_back(node.input[spec.bias])
        if not index.is_initializer(bias):
            return None
        bias_use = index.source_edge(node, spec.bias)
    sum_output = None
    if spec.sum_output is not None and len(node.output) > spec.sum_output and node.output[spec.sum_output]:
        sum_output = node.output[spec.sum_output]
    return NormMatch(
        kind=spec.op_type,
        inputs=inputs,
        output=node.output[0],
        gamma=gamma,
        gamma_use=index.source_edge(node, spec.gamma),
        gamma_offset=0.0,
        nodes=[node],
        sum_output=sum_output,
        bias=bias,
        bias_use=bias_use,
    )


@per_graph_state
def find_norms(index: GraphIndex) -> list[NormMatch]:
    """Every RMSNorm in the graph, in graph order, whatever it normalizes."""
    norms: list[NormMatch] = []
    fused = {spec.op_type: spec for spec in FUSED_NORMS}
    for node in index.graph.node:
        found = None
        if node.op_type in fused:
            found = _fused(index, node, fused[node.op_type])
        elif node.op_type == "Mul" and node.output:
            found = _decomposed_layernorm(index, node) or _decomposed(index, node)
        elif node.op_type in ("Add", "Div") and node.output:
            found = _decomposed_layernorm(index, node)
        if found is not None:
            norms.append(found)
    # A LayerNorm's inner Mul matches alone too (no gamma, no beta): keep only the widest match.
    inside = {id(n): norm for norm in norms for n in norm.nodes[1:]}
    return [norm for norm in norms if id(norm.anchor) not in inside]
