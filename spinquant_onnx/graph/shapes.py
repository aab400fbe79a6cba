"""Element types and shapes of activations, for nodes a rewrite inserts (they must match the tensor they read).

Declared types first, else ONNX type inference on a weightless view (#13: TorchScript fp16 and dynamo
exports without value_info declare none), else the producer chain; never an assumed float32.
"""

from __future__ import annotations

import onnx

from spinquant_onnx.errors import UnsupportedGraphError
from spinquant_onnx.graph.index import GraphIndex, weightless_view
from spinquant_onnx.graph.ops import KEEPS_TYPE_OPS, TRANSPARENT_OPS

_SAME_TYPE_DEPTH = 64


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
        if producer.op_type not in KEEPS_TYPE_OPS and producer.op_type not in TRANSPARENT_OPS:
            break
        name = producer.input[2 if producer.op_type == "Where" else 0]
    raise UnsupportedGraphError(f"cannot tell the element type of '{tensor}' (no declared or inferable type)")


def activation_type(index: GraphIndex, node: onnx.NodeProto) -> int:
    """Element type of a MatMul/Gemm's activations (its first input): declared, else inferred (#13)."""
    return tensor_elem_type(index, node.input[0])


def tensor_type(index: GraphIndex, tensor: str) -> int:
    """Element type value_info declares for ``tensor``; float32 when it declares none."""
    info = index.value_info.get(tensor)
    if info is not None and info.type.tensor_type.elem_type:
        return info.type.tensor_type.elem_type
    return onnx.TensorProto.FLOAT


def shape_of(index: GraphIndex, name: str) -> tuple[int | None, ...] | None:
    """The declared shape of ``name``, else the inferred one, else None (rank unknown)."""
    return inferred_shape(index, name)
