"""Element types of activations, for nodes a rewrite inserts (they must match the tensor they read)."""

from __future__ import annotations

import onnx

from spinquant_onnx.graph.index import GraphIndex


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
