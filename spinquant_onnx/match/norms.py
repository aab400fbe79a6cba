"""Where RMSNorms are recognized: the decomposed op chains and the fused ops, as a table of patterns.

RMSNorm commutes with an orthogonal rotation of its input (``rms(x R) == rms(x)``) once its gamma is
moved into the linears that read it; that is the whole basis of R1. LayerNorm (mean-centred) does not,
so only RMS forms are listed here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import onnx

from spinquant_onnx.graph.index import GraphIndex, Use, node_label, per_graph_state
from spinquant_onnx.graph.ops import SHAPE_ONLY_OPS, TRANSPARENT_OPS
from spinquant_onnx.match.pattern import AnyOf, Const, Init, Match, Op, Var, match, optional, scalar_equals


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
# The eps Add is optional: Helium's export (and any eps = 0 norm) takes the root of the mean itself.
_EPS_ADDED = AnyOf((Op(("Add",), (_MEAN, Const("eps")), commutative=True), _MEAN))
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


@dataclass(frozen=True)
class FusedNorm:
    """A single-op RMSNorm: which input slot holds what, and which output is the residual sum."""

    op_type: str
    data: int
    gamma: int
    skip: int | None = None
    bias: int | None = None
    sum_output: int | None = None


FUSED_NORMS = (
    FusedNorm("SimplifiedLayerNormalization", data=0, gamma=1),
    FusedNorm("RMSNormalization", data=0, gamma=1),
    FusedNorm("SkipSimplifiedLayerNormalization", data=0, skip=1, gamma=2, bias=3, sum_output=3),
)


@dataclass
class NormMatch:
    """One RMSNorm instance. ``inputs`` are the tensors it normalizes (two for Skip norms, which add them)."""

    kind: str
    inputs: tuple[str, ...]
    output: str
    gamma: str
    gamma_use: Use
    gamma_offset: float
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    sum_output: str | None = None
    bias: str | None = None
    bias_use: Use | None = None

    @property
    def anchor(self) -> onnx.NodeProto:
        return self.nodes[0]

    @property
    def label(self) -> str:
        return node_label(self.anchor)


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


def _fused(index: GraphIndex, node: onnx.NodeProto, spec: FusedNorm) -> NormMatch | None:
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
            found = _decomposed(index, node)
        if found is not None:
            norms.append(found)
    return norms
