"""Online rotations: a node that multiplies an activation by R (or R^T) at run time.

Used where a rotation cannot be absorbed into a constant weight: a stream entry that is a graph input
(``inputs_embeds``), a writer whose output passes a norm before the residual Add (Gemma's sandwich
norms), and R3/R4. The node is ``MatMul(x, M)`` with ``M`` a constant of x's dtype, placed right after
x's producer so the graph stays topologically sorted; every former reader of x reads the rotated copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from spinquant_onnx.graph_index import TRANSPARENT_OPS, GraphIndex, weightless_view
from spinquant_onnx.rotations import Rotation

_SAME_TYPE_DEPTH = 64
# Ops whose (first) output has the element type of their first input.
_KEEPS_TYPE = frozenset(
    {"Identity", "QcQuantizeOp", "Add", "Sub", "Mul", "Div", "Neg", "MatMul", "Gemm", "Transpose", "Reshape",
     "Expand", "Unsqueeze", "Squeeze", "Concat", "Slice", "Split", "Tile", "Softmax", "Sigmoid", "Tanh", "Relu",
     "Sqrt", "Reciprocal", "Pow", "Where", "SimplifiedLayerNormalization", "RMSNormalization",
     "SkipSimplifiedLayerNormalization", "LayerNormalization", "Gather", "Erf", "Exp", "Abs", "Max", "Min",
     # onnxruntime contrib ops (no ONNX type inference for them), activations typed as their first input
     "QuickGelu", "FastGelu", "Gelu", "BiasGelu", "SkipLayerNormalization", "RotaryEmbedding",
     "GroupQueryAttention", "MultiHeadAttention", "Attention", "MatMulNBits"}
)  # fmt: skip


def _inferred(index: GraphIndex) -> tuple[dict[str, int], dict[str, tuple[int | None, ...]]]:
    """Element types and shapes from ONNX inference on a weightless view, computed once per index (#13).

    Exporters (TorchScript fp16, dynamo without value_info) often declare no type for the tensor an
    online node reads; assuming float32 there makes the inserted MatMul mix types and ORT refuse the model.
    """
    cached = getattr(index, "_spinquant_inferred", None)
    if cached is not None:
        return cached
    types: dict[str, int] = {}
    shapes: dict[str, tuple[int | None, ...]] = {}
    try:
        inferred = onnx.shape_inference.infer_shapes(weightless_view(index.model), strict_mode=False, data_prop=True)
        for info in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]:
            if not info.type.HasField("tensor_type"):
                continue
            tensor_type = info.type.tensor_type
            if tensor_type.elem_type:
                types[info.name] = tensor_type.elem_type
            if tensor_type.HasField("shape"):
                dims = tensor_type.shape.dim
                shapes[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    except Exception:  # noqa: BLE001 - inference is a best effort here; the walk below and the gate remain
        pass
    index._spinquant_inferred = (types, shapes)  # type: ignore[attr-defined]
    return types, shapes


def _inferred_types(index: GraphIndex) -> dict[str, int]:
    return _inferred(index)[0]


def inferred_shape(index: GraphIndex, tensor: str) -> tuple[int | None, ...] | None:
    """A tensor's shape: declared (value_info, initializer), else from shape inference; None if unknown."""
    return index.static_shape(tensor) or _inferred(index)[1].get(tensor)


def tensor_elem_type(index: GraphIndex, tensor: str) -> int:
    """The element type of ``tensor``: declared, else inferred, else followed back through its producers.

    Refuses to guess: a tensor whose type cannot be established raises, rather than defaulting to float32.
    """
    name = tensor
    for _ in range(_SAME_TYPE_DEPTH):
        info = index.value_info.get(name)
        if info is not None and info.type.tensor_type.elem_type:
            return info.type.tensor_type.elem_type
        if name in index.store:
            return index.store.tensors[name].data_type
        inferred = _inferred_types(index).get(name)
        if inferred:
            return inferred
        producer = index.producer.get(name)
        if producer is None or not producer.input:
            break
        if producer.op_type == "Cast":
            return index.attr(producer, "to")
        if producer.op_type not in _KEEPS_TYPE and producer.op_type not in TRANSPARENT_OPS:
            break
        name = producer.input[2 if producer.op_type == "Where" else 0]
    from spinquant_onnx.errors import UnsupportedGraphError

    raise UnsupportedGraphError(f"cannot tell the element type of '{tensor}' (no declared or inferable type)")


@dataclass
class OnlineRotation:
    tensor: str
    output: str
    matrix: str
    node: onnx.NodeProto
    reason: str

    def describe(self) -> dict[str, str]:
        return {"node": self.node.name, "input": self.tensor, "matrix": self.matrix, "reason": self.reason}


def _unique(index: GraphIndex, base: str, taken: set[str]) -> str:
    name, number = base, 1
    while name in taken or name in index.store or name in index.producer or name in index.graph_inputs:
        number += 1
        name = f"{base}.{number}"
    taken.add(name)
    return name


def insert_online_rotation(
    index: GraphIndex,
    tensor: str,
    rotation: Rotation,
    *,
    transpose: bool,
    elem_type: int,
    reason: str,
    readers: list[tuple[onnx.NodeProto, int]] | None = None,
) -> OnlineRotation:
    """Insert ``y = x @ R`` (or ``x @ R^T``) after ``tensor`` and point its readers (or ``readers``) at y."""
    graph = index.graph
    taken: set[str] = set()
    stem = tensor.replace("/", "_").strip("_")
    matrix_name = _unique(index, f"spinquant.online.{stem}.R{'T' if transpose else ''}", taken)
    output = _unique(index, f"{tensor}.rotated", taken)
    node = helper.make_node(
        "MatMul", [tensor, matrix_name], [output], name=_unique(index, f"spinquant/online/{stem}", taken)
    )
    dense = rotation.matrix().T if transpose else rotation.matrix()
    values = dense.astype(helper.tensor_dtype_to_np_dtype(elem_type))
    graph.initializer.append(onnx.numpy_helper.from_array(np.ascontiguousarray(values), matrix_name))
    index.store.tensors[matrix_name] = graph.initializer[-1]
    targets = readers if readers is not None else [(u.node, u.index) for u in index.users(tensor)]
    for reader, slot in targets:
        reader.input[slot] = output
    if tensor in index.graph_outputs:
        raise ValueError("online rotation of a graph output is not supported")
    producer = index.producer.get(tensor)
    position = 0 if producer is None else list(graph.node).index(producer) + 1
    graph.node.insert(position, node)
    return OnlineRotation(tensor, output, matrix_name, node, reason)
