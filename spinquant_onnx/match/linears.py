"""Where linear layers are recognized: MatMul and Gemm with a constant weight, in any of its layouts.

A weight reaches its MatMul as an [in, out] initializer, behind a Transpose of an [out, in] one, behind
AIMET's QcQuantizeOp or a Cast, or as Gemm's B with transB either way. What a rotation needs to know is
which axis of the *initializer* meets the input features and which the output features.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from spinquant_onnx.graph.index import GraphIndex, Use, node_label
from spinquant_onnx.graph.ops import LINEAR_OPS, TRANSPARENT_OPS


@dataclass(frozen=True)
class WeightRef:
    """An initializer as one node input sees it: ``use`` is the edge where it is read."""

    name: str
    use: Use
    transposed: bool


@dataclass
class Linear:
    node: onnx.NodeProto
    weight: str
    weight_use: Use
    in_axis: int
    out_axis: int
    in_features: int
    out_features: int
    output: str
    bias: str | None = None
    bias_use: Use | None = None
    bias_axis: int = 0
    experts: int = 0  # > 0: a stack of per-expert weights [E, ., .], gathered per token by the router
    activation_slot: int = 0  # the MatMul input the activation arrives on (1 for column-form experts)

    @property
    def label(self) -> str:
        return node_label(self.node)


def weight_behind(index: GraphIndex, node: onnx.NodeProto, slot: int) -> WeightRef | None:
    """The initializer feeding ``node.input[slot]`` through transparent ops and 2-D Transposes."""
    current, current_slot = node, slot
    name = node.input[slot]
    transposed = False
    while not index.is_initializer(name):
        producer = index.producer.get(name)
        if producer is None:
            return None
        if producer.op_type == "Transpose":
            perm = index.attr(producer, "perm")
            if perm is not None and list(perm) != [1, 0]:
                return None
            transposed = not transposed
        elif producer.op_type not in TRANSPARENT_OPS:
            return None
        current, current_slot = producer, 0
        name = producer.input[0]
    return WeightRef(name, Use(current, current_slot), transposed)


def _bias_after(index: GraphIndex, tensor: str, width: int) -> tuple[str, Use, str] | None:
    """An Add of a 1-D constant right after a MatMul: (bias initializer, its edge, Add output)."""
    users = [u for u in index.users(tensor) if u.node.op_type not in ("Shape",)]
    if len(users) != 1 or users[0].node.op_type != "Add" or tensor in index.graph_outputs:
        return None
    add = users[0].node
    other = 1 - users[0].index
    ref = weight_behind(index, add, other)
    if ref is None or index.store.shape(ref.name) != (width,):
        return None
    return ref.name, ref.use, add.output[0]


def linear_at(index: GraphIndex, node: onnx.NodeProto, with_bias: bool = True) -> Linear | None:
    """Describe ``node`` as a linear layer whose input 0 is the activation, or None if it is not one."""
    if node.op_type not in LINEAR_OPS:
        return None
    ref = weight_behind(index, node, 1)
    if ref is None or index.is_initializer(index.see_through_back(node.input[0])):
        return None
    shape = index.store.shape(ref.name)
    if len(shape) != 2:
        return None
    transposed = ref.transposed
    bias = bias_use = None
    output = node.output[0]
    if node.op_type == "Gemm":
        if index.attr(node, "transA", 0):
            return None
        transposed ^= bool(index.attr(node, "transB", 0))
    in_axis, out_axis = (1, 0) if transposed else (0, 1)
    out_features = shape[out_axis]
    if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2]:
        cref = weight_behind(index, node, 2)
        if cref is None or index.store.shape(cref.name) not in ((out_features,), (1, out_features)):
            return None
        bias, bias_use = cref.name, cref.use
    elif with_bias:
        found = _bias_after(index, output, out_features)
        if found is not None:
            bias, bias_use, output = found
    return Linear(
        node=node,
        weight=ref.name,
        weight_use=ref.use,
        in_axis=in_axis,
        out_axis=out_axis,
        in_features=shape[in_axis],
        out_features=out_features,
        output=output,
        bias=bias,
        bias_use=bias_use,
        bias_axis=len(index.store.shape(bias)) - 1 if bias is not None else 0,
    )


# Ops that pick experts' weights by index from an [E, ., .] stack: (op, the stack's slot).
EXPERT_GATHERS = {"Gather": 0, "GatherND": 0}


def gathered_stack(index: GraphIndex, tensor: str, rank: int = 3) -> tuple[WeightRef, onnx.NodeProto] | None:
    """The initializer (of ``rank``) ``tensor`` is gathered from along axis 0 (the expert axis), with the gather."""
    node = index.producer.get(index.see_through_back(tensor))
    if node is None or node.op_type not in EXPERT_GATHERS or node.output[0] != index.see_through_back(tensor):
        return None
    if node.op_type == "Gather" and index.attr(node, "axis", 0) != 0:
        return None
    if node.op_type == "GatherND" and index.attr(node, "batch_dims", 0) != 0:
        return None
    ref = weight_behind(index, node, EXPERT_GATHERS[node.op_type])
    if ref is None or ref.transposed or len(index.store.shape(ref.name)) != rank:
        return None
    return ref, node


def expert_linear_at(index: GraphIndex, node: onnx.NodeProto) -> Linear | None:
    """A MatMul of per-token expert weights (gathered from an [E, ., .] stack) with the activation.

    Column form (HF's batched_mm): ``W[idx] @ x[..., :, None]`` with the stack as [E, out, in]; row form:
    ``x[..., None, :] @ W[idx]`` with [E, in, out]. The stack's in/out axes absorb rotations like a
    dense weight's, for every expert at once.
    """
    if node.op_type != "MatMul" or len(node.input) != 2:
        return None
    for weight_slot, in_axis, out_axis in ((0, 2, 1), (1, 1, 2)):
        found = gathered_stack(index, node.input[weight_slot])
        if found is None:
            continue
        ref, _ = found
        shape = index.store.shape(ref.name)
        return Linear(
            node=node,
            weight=ref.name,
            weight_use=ref.use,
            in_axis=in_axis,
            out_axis=out_axis,
            in_features=shape[in_axis],
            out_features=shape[out_axis],
            output=node.output[0],
            experts=shape[0],
            activation_slot=1 - weight_slot,
        )
    return None


def linear_writing(index: GraphIndex, tensor: str) -> Linear | None:
    """The linear layer (with its bias) whose output is ``tensor``, looking back through transparent ops."""
    name = index.see_through_back(tensor)
    node = index.producer.get(name)
    if node is None:
        return None
    if node.op_type == "Add":
        for slot in (0, 1):
            producer = index.producer.get(node.input[slot])
            if producer is not None and producer.op_type in LINEAR_OPS:
                found = linear_at(index, producer)
                if found is not None and found.output == name:
                    return found
        return None
    found = linear_at(index, node)
    if found is not None and found.output == name:
        return found
    return None


# Ops whose outputs have their first input's shape (a norm's sum output included).
SAME_SHAPE_OPS = frozenset({
    "Cast", "Identity", "Relu", "Neg", "LayerNormalization", "SkipLayerNormalization",
    "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization",
})


def _last_dim_is(index: GraphIndex, name: str, data: str, width: int, depth: int = 0) -> bool:
    """True when ``name``'s last dim is certainly ``width``: ``data`` itself, a declared shape, a table row,
    or an elementwise op one of whose inputs has it (broadcasting keeps a dim above 1)."""
    if index.see_through_back(name) == index.see_through_back(data):
        return True
    shape = index.static_shape(name)
    if shape and shape[-1] is not None:
        return shape[-1] == width
    node = index.producer.get(name)
    if node is None or depth > 6 or width <= 1:
        return False
    if node.op_type == "Gather" and index.is_initializer(node.input[0]):
        table = index.store.shape(node.input[0])
        return len(table) == 2 and table[1] == width and index.attr(node, "axis", 0) == 0
    if node.op_type in ("Add", "Sub", "Mul", "Div"):
        return any(_last_dim_is(index, i, data, width, depth + 1) for i in node.input)
    if node.op_type in SAME_SHAPE_OPS:
        return _last_dim_is(index, node.input[0], data, width, depth + 1)
    return False


def _is_last_dim_of(index: GraphIndex, shape_tensor: str, data: str, width: int) -> bool:
    """True when the last element of a Reshape's target shape is certainly ``width`` (= ``data``'s last dim)."""
    name = shape_tensor
    for _ in range(8):
        value = index.constant(name)
        if value is not None:
            return value.size > 0 and int(value.reshape(-1)[-1]) == width
        node = index.producer.get(name)
        if node is None:
            return False
        if node.op_type == "Concat":
            name = node.input[-1]
        elif node.op_type in ("Unsqueeze", "Squeeze", "Cast", "Identity"):
            name = node.input[0]
        elif node.op_type in ("Gather", "Slice") and index.producer.get(node.input[0]) is not None:
            shape = index.producer[node.input[0]]
            start = index.constant(node.input[1]) if len(node.input) > 1 else None
            return (
                shape.op_type == "Shape"
                and not index.attr(shape, "start", 0)
                and _last_dim_is(index, shape.input[0], data, width)
                and start is not None
                and start.size == 1
                and int(start.reshape(())) == -1
            )
        elif node.op_type == "Shape":
            return _last_dim_is(index, node.input[0], data, width) and index.attr(node, "start", 0) == -1
        else:
            return False
    return False


def keeps_rows(index: GraphIndex, node: onnx.NodeProto, width: int) -> bool:
    """A Reshape whose input and output both end in ``width``: it regroups whole rows, so it commutes
    with any transform of the last axis (GPT-2's Conv1D flattens to [-1, hidden] around its Gemm)."""
    if node.op_type != "Reshape" or len(node.input) < 2:
        return False
    shape = index.static_shape(node.output[0])
    if shape and shape[-1] == width:
        return True
    return _is_last_dim_of(index, node.input[1], node.input[0], width)


def row_users(index: GraphIndex, name: str, width: int) -> list[Use]:
    """``value_users`` of ``name``, looking through row-keeping Reshapes as well."""
    found = []
    for use in index.value_users(name):
        if use.index == 0 and keeps_rows(index, use.node, width):
            found.extend(row_users(index, use.node.output[0], width))
        else:
            found.append(use)
    return found


def behind_rows(index: GraphIndex, tensor: str, width: int) -> str:
    """``tensor`` looked back through transparent ops and row-keeping Reshapes read by nothing else."""
    name = index.see_through_back(tensor)
    node = index.producer.get(name)
    while node is not None and keeps_rows(index, node, width) and len(index.value_users(node.input[0])) == 1:
        name = index.see_through_back(node.input[0])
        node = index.producer.get(name)
    return name
