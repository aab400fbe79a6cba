"""Online rotations: a node that multiplies an activation by R (or R^T) at run time.

Used where a rotation cannot be absorbed into a constant weight: a stream entry that is a graph input
(``inputs_embeds``), a writer whose output passes a norm before the residual Add (Gemma's sandwich
norms), and R3/R4. The node is ``MatMul(x, M)`` with ``M`` a constant of x's dtype, placed right after
x's producer so the graph stays topologically sorted; every former reader of x reads the rotated copy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper

from spinquant_onnx.graph.index import GraphIndex, fresh_name
from spinquant_onnx.rotation.kinds import Rotation

# Every node a rewrite inserts to rotate at run time is named under this prefix (R1 online, R3, R4), so a
# quantizer can find and exclude them (``keep_float``); the model's rotation record lists them too.
ONLINE_PREFIX = "spinquant/online/"
# The rotation record's entry listing them (core/metadata.py writes it, as JSON).
ONLINE_NODES_KEY = "spinquant_onnx.online_nodes"


def online_node_names(model: onnx.ModelProto) -> list[str]:
    """The online rotation nodes of a rotated model: from its rotation record, else by the prefix.

    The one place the list comes from (``keep_float``, the AIMET helper, ``quantize``, ``eval``).
    """
    present = {node.name for node in model.graph.node}
    for prop in model.metadata_props:
        if prop.key == ONLINE_NODES_KEY:
            try:
                listed = json.loads(prop.value)
            except ValueError:
                break
            if isinstance(listed, list):
                return [name for name in listed if name in present]
    return [node.name for node in model.graph.node if node.name.startswith(ONLINE_PREFIX)]


@dataclass
class OnlineRotation:
    tensor: str
    output: str
    matrix: str
    node: onnx.NodeProto
    reason: str

    def describe(self) -> dict[str, str]:
        return {"node": self.node.name, "input": self.tensor, "matrix": self.matrix, "reason": self.reason}



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
    matrix_name = fresh_name(index, f"spinquant.online.{stem}.R{'T' if transpose else ''}", taken)
    output = fresh_name(index, f"{tensor}.rotated", taken)
    node = helper.make_node(
        "MatMul", [tensor, matrix_name], [output], name=fresh_name(index, f"{ONLINE_PREFIX}{stem}", taken)
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
