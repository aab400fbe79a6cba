"""Element types of activations, for nodes a rewrite inserts (they must match the tensor they read)."""

from __future__ import annotations

import onnx

from spinquant_onnx.graph.index import GraphIndex, per_graph_state


def activation_type(index: GraphIndex, node: onnx.NodeProto) -> int:
    """Element type of a MatMul/Gemm's activations: from value_info, else what its weight arrives as."""
    info = index.value_info.get(node.input[0])
    if info is not None and info.type.tensor_type.elem_type:
        return info.type.tensor_type.elem_type
    name = node.input[1]
    while name not in index.store:
        producer = index.producer.get(name)
        if producer is None:
            return onnx.TensorProto.FLOAT
        if producer.op_type == "Cast":
            return index.attr(producer, "to")
        name = producer.input[0]
    return index.store.tensors[name].data_type


def tensor_type(index: GraphIndex, tensor: str) -> int:
    """Element type value_info declares for ``tensor``; float32 when it declares none."""
    info = index.value_info.get(tensor)
    if info is not None and info.type.tensor_type.elem_type:
        return info.type.tensor_type.elem_type
    return onnx.TensorProto.FLOAT


@per_graph_state
def inferred_shapes(index: GraphIndex) -> dict[str, tuple[int | None, ...]]:
    """Shapes ONNX shape inference (with data propagation) finds, on a weightless copy of the graph.

    TorchScript exports declare no intermediate shapes; the token-routing matcher needs the rank and the
    last axis of the tensors between the stream and its linears. Initializers become typed graph inputs,
    so no weight is read or copied.
    """
    graph = index.graph
    inputs = list(graph.input) + [
        onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
        for t in graph.initializer
        if t.name not in index.graph_inputs
    ]
    light = onnx.helper.make_graph(list(graph.node), "shapes", inputs, list(graph.output), value_info=graph.value_info)
    model = onnx.helper.make_model(light, opset_imports=index.model.opset_import, ir_version=index.model.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True)
    except Exception:  # noqa: BLE001 -- inference is a hint; without it shapes stay unknown
        return {}
    found = {}
    for info in inferred.graph.value_info:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            dims = info.type.tensor_type.shape.dim
            found[info.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
    return found


def shape_of(index: GraphIndex, name: str) -> tuple[int | None, ...] | None:
    """The declared shape of ``name``, else the inferred one, else None (rank unknown)."""
    declared = index.static_shape(name)
    if declared is not None:
        return declared
    return inferred_shapes(index).get(name)
