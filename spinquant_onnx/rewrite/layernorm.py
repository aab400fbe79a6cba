"""LayerNorm streams (SliceGPT, arXiv 2401.15024 section 3): centre the stream, then each LayerNorm is an RMSNorm.

``LN(x) = (x - mean(x)) / sqrt(var(x) + eps) * g + b``. LN ignores a per-token shift of x along the ones
vector, so subtracting each writer's mean over the hidden axis (``W <- W (I - 11^T/n)``, embeddings, position
tables, o/down weights and biases alike) changes nothing any LayerNorm sees, and leaves the stream with
mean zero in every token. On such a stream ``LN(x) = x / rms(x) * g + b``. R1 then rotates the stream:
``x R`` still has ``rms(x R) == rms(x)`` but no longer has mean zero, so the LayerNorm node itself must
become an RMSNorm (keeping it would subtract the rotated stream's mean, a real error); its ``g`` moves into
the readers' input rows and its ``b`` into their biases (``b W`` added to the reader's bias, a new bias Add
where it has none), exactly as SliceGPT does.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from spinquant_onnx.graph.index import GraphIndex, Use, fresh_name
from spinquant_onnx.graph.shapes import tensor_type
from spinquant_onnx.match.linears import Linear
from spinquant_onnx.match.norms import NormMatch, norm_vector
from spinquant_onnx.match.residual import Residual
from spinquant_onnx.rewrite.plan import TensorPlan, scale, shift


def reader_shift(index: GraphIndex, linear: Linear, beta: np.ndarray) -> np.ndarray:
    """``beta @ W`` in float64 (as the reader's output sees it, Gemm's alpha included)."""
    weight = np.asarray(index.store.array(linear.weight), dtype=np.float64)
    vector = np.tensordot(beta, weight, axes=([0], [linear.in_axis]))
    if linear.node.op_type == "Gemm":
        vector = vector * float(index.attr(linear.node, "alpha", 1.0))
    return vector


def plan_layernorm(index: GraphIndex, event: Residual, plan: TensorPlan) -> list[tuple[Linear, np.ndarray]]:
    """Gamma into the readers' rows, beta into their biases; returns the readers that need a new bias."""
    norm = event.norm
    gamma, beta = norm_vector(index, norm.gamma), norm_vector(index, norm.shift)
    new_biases = []
    for linear in event.readers:
        if beta is not None and np.any(beta):
            vector = reader_shift(index, linear, beta)
            if linear.bias is None:
                new_biases.append((linear, vector))
            else:
                if linear.node.op_type == "Gemm" and linear.bias_use.node is linear.node:
                    vector = vector / float(index.attr(linear.node, "beta", 1.0))
                plan.add(linear.bias, linear.bias_use, [shift(linear.bias_axis, vector, "LayerNorm beta")],
                         "reader bias")
        if gamma is not None:
            plan.add(linear.weight, linear.weight_use, [scale(linear.in_axis, gamma, "norm gamma")], "reader")
    return new_biases



def _add_initializer(index: GraphIndex, name: str, values: np.ndarray) -> None:
    index.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(values), name))
    index.store.tensors[name] = index.graph.initializer[-1]


def add_reader_bias(index: GraphIndex, linear: Linear, vector: np.ndarray) -> None:
    """A bias Add after a reader that had none; the Linear now carries it, so later passes (R2) see it."""
    taken: set[str] = set()
    output = linear.node.output[0]
    raw = fresh_name(index, f"{output}.spinquant.unbiased", taken)
    bias = fresh_name(index, f"{linear.weight}.spinquant.layernorm_bias", taken)
    dtype = index.store.dtype(linear.weight)
    _add_initializer(index, bias, vector.astype(dtype))
    linear.node.output[0] = raw
    node = helper.make_node("Add", [raw, bias], [output], name=fresh_name(index, f"{raw}/add_bias", taken))
    position = list(index.graph.node).index(linear.node) + 1
    index.graph.node.insert(position, node)  # protobuf inserts a copy: refer to the one in the graph
    linear.bias, linear.bias_use, linear.bias_axis = bias, Use(index.graph.node[position], 1), 0


def _opset(index: GraphIndex) -> int:
    return next((o.version for o in index.model.opset_import if o.domain in ("", "ai.onnx")), 17)


def _rms_nodes(index: GraphIndex, norm: NormMatch, x: str, taken: set[str]) -> list[onnx.NodeProto]:
    """``x / sqrt(mean(x*x) + eps)`` over the last axis, in float32 like LayerNorm's stash type."""
    stem = fresh_name(index, f"{norm.output}.spinquant.rms", taken)
    elem = tensor_type(index, x)
    nodes = []
    work = x
    if elem != onnx.TensorProto.FLOAT:
        work = f"{stem}.x32"
        nodes.append(helper.make_node("Cast", [x], [work], to=onnx.TensorProto.FLOAT, name=f"{stem}/cast_in"))
    eps = f"{stem}.eps"
    _add_initializer(index, eps, np.array(norm.eps, dtype=np.float32))
    mean_inputs = [f"{stem}.sq"]
    mean_attrs: dict = {"keepdims": 1}
    if _opset(index) >= 18:
        axes = f"{stem}.axes"
        _add_initializer(index, axes, np.array([-1], dtype=np.int64))
        mean_inputs.append(axes)
    else:
        mean_attrs["axes"] = [-1]
    out32 = norm.output if work == x else f"{stem}.y32"
    nodes += [
        helper.make_node("Mul", [work, work], [f"{stem}.sq"], name=f"{stem}/square"),
        helper.make_node("ReduceMean", mean_inputs, [f"{stem}.ms"], name=f"{stem}/mean", **mean_attrs),
        helper.make_node("Add", [f"{stem}.ms", eps], [f"{stem}.var"], name=f"{stem}/add_eps"),
        helper.make_node("Sqrt", [f"{stem}.var"], [f"{stem}.rms"], name=f"{stem}/sqrt"),
        helper.make_node("Div", [work, f"{stem}.rms"], [out32], name=f"{stem}/normalize"),
    ]
    if work != x:
        nodes.append(helper.make_node("Cast", [out32], [norm.output], to=elem, name=f"{stem}/cast_out"))
    return nodes


def replace_with_rmsnorm(index: GraphIndex, norm: NormMatch) -> None:
    """Put an RMSNorm (no scale) where the LayerNorm was; its other nodes go when nothing else reads them."""
    taken: set[str] = set()
    nodes: list[onnx.NodeProto] = []
    x = norm.inputs[0]
    if len(norm.inputs) > 1:  # SkipLayerNormalization: the sum is computed first (and may be an output)
        x = norm.sum_output or fresh_name(index, f"{norm.output}.spinquant.sum", taken)
        nodes.append(helper.make_node("Add", list(norm.inputs), [x], name=f"{x}/skip_add"))
    nodes += _rms_nodes(index, norm, x, taken)
    graph = index.graph
    anchor = list(graph.node).index(norm.anchor)
    for offset, node in enumerate(nodes):
        graph.node.insert(anchor + offset, node)
    for node in _removable(index, norm):
        graph.node.remove(node)


def _removable(index: GraphIndex, norm: NormMatch) -> list[onnx.NodeProto]:
    """The LayerNorm's nodes no remaining node reads: the anchor (replaced), then a fixpoint over the rest."""
    removable = {id(n): n for n in norm.nodes}
    changed = True
    while changed:
        changed = False
        for node in list(removable.values()):
            if node is norm.anchor:
                continue
            read = any(
                out in index.graph_outputs or any(id(use.node) not in removable for use in index.users(out))
                for out in node.output
            )
            if read:
                del removable[id(node)]
                changed = True
    return list(removable.values())
