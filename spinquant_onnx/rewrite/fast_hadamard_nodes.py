"""Online Hadamard rotations as plain ONNX nodes: ``y = x @ H_n / sqrt(n)`` along x's last axis.

R3 and R4 cannot be absorbed into weights, so the rotated model computes them at run time. Three forms
compute the same product (H_n is ``hadamard.hadamard_matrix(n)``, i.e. ``make_rotation("hadamard", n)``):

- ``matmul``: one MatMul with the dense n x n constant; O(n^2) work and n^2 constant floats.
- ``kron``: H_n = H_A (x) H_B with A * B = n, so on x viewed as [.., A, B] the product is H_A^T X H_B:
  two small MatMuls, O(n (A + B)) work and A^2 + B^2 constant floats.
- ``butterfly``: the Walsh-Hadamard butterflies (Reshape, Split, Add, Sub, Concat per stage) on the 2^k part,
  then one m x m MatMul for the base order m; O(n log n) work, no large constant.

Which is fastest depends on n and on how onnxruntime schedules many small nodes; ``scripts/
bench_online_hadamard.py`` measures it, and ``choose_method`` encodes the outcome.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from spinquant_onnx.graph.index import GraphIndex, Use
from spinquant_onnx.rewrite.online import ONLINE_PREFIX
from spinquant_onnx.rotation.hadamard import base_matrix, decompose, sylvester

METHODS = ("matmul", "kron", "butterfly")
# Dense constants above this order cost more memory than any speed they could buy (n^2 floats per node).
MATMUL_MAX_ORDER = 1024
# Measured with scripts/bench_online_hadamard.py (onnxruntime 1.31 CPU, 1 to 1024 tokens): one dense MatMul is
# fastest up to order 64; from 128 on the two Kronecker MatMuls win (2-3x at 256, 8-16x at 1536-2048, and
# dense stops being an option past ~4096). The butterflies never win on ORT: log2(n) stages of five small
# nodes, each a full pass over memory with strided Split/Concat, cost more than the FLOPs they save.
MATMUL_BEST_UP_TO = 64


def choose_method(n: int) -> str:
    """The form onnxruntime runs fastest for order ``n`` (see MATMUL_BEST_UP_TO)."""
    return "matmul" if n <= MATMUL_BEST_UP_TO else "kron"


@dataclass
class HadamardNodes:
    """Nodes and constants computing ``output = input @ H_n / sqrt(n)`` along the last axis."""

    input: str
    output: str
    n: int
    method: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[TensorProto] = field(default_factory=list)


class _Builder:
    """Collects nodes and constants under one name prefix."""

    def __init__(self, prefix: str, elem_type: int, opset: int) -> None:
        self.prefix, self.elem_type, self.opset = prefix, elem_type, opset
        self.np_type = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.count = 0

    def name(self, what: str) -> str:
        self.count += 1
        return f"{self.prefix}/{what}_{self.count}"

    def const(self, what: str, values: np.ndarray, float_values: bool = True) -> str:
        name = self.name(what)
        array = np.ascontiguousarray(values.astype(self.np_type) if float_values else values)
        self.initializers.append(numpy_helper.from_array(array, name))
        return name

    def node(self, op: str, inputs: list[str], outputs: int = 1, out: str | None = None, **attrs) -> list[str]:
        names = [out] if out is not None and outputs == 1 else [self.name(f"{op}_out") for _ in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, names, name=self.name(op), **attrs))
        return names

    def reshape(self, x: str, shape: list[int], out: str | None = None) -> str:
        return self.node("Reshape", [x, self.const("shape", np.array(shape, np.int64), False)], out=out)[0]

    def split_halves(self, x: str, axis: int) -> list[str]:
        if self.opset >= 13:
            sizes = self.const("split", np.array([1, 1], np.int64), False)
            return self.node("Split", [x, sizes], outputs=2, axis=axis)
        return self.node("Split", [x], outputs=2, axis=axis, split=[1, 1])


def _kron_split(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(H_A, H_B), unnormalized, with kron(H_A, H_B) == hadamard_matrix(n) and A, B near sqrt(n)."""
    m, p2 = decompose(n)
    k = p2.bit_length() - 1
    # H_n = kron(base_m, S_2^j, S_2^(k-j)); put base_m and 2^j in A, choosing j so that A is close to sqrt(n).
    j = min(range(k + 1), key=lambda jj: abs(math.log(m * 2**jj) - math.log(n) / 2))
    return np.kron(base_matrix(m), sylvester(2**j)), sylvester(2 ** (k - j))


def hadamard_nodes(
    x: str, n: int, elem_type: int, *, prefix: str, opset: int, method: str | None = None, out: str | None = None
) -> HadamardNodes:
    """Nodes computing ``x @ H_n / sqrt(n)`` on the last axis of ``x`` (which must have length n).

    The result keeps x's shape and dtype. ``out`` names the final tensor (a fresh name when None).
    Raises UnsupportedSizeError (from hadamard.decompose users) when no Hadamard matrix of order n is known.
    """
    from spinquant_onnx.rotation.hadamard import unsupported

    mk = decompose(n)
    if mk is None:
        raise unsupported(n)
    method = method or choose_method(n)
    if method not in METHODS:
        raise ValueError(f"unknown online Hadamard method {method!r}")
    b = _Builder(prefix, elem_type, opset)
    scale = 1.0 / math.sqrt(n)
    if method == "matmul" or n == 1:
        from spinquant_onnx.rotation.hadamard import hadamard_matrix

        result = b.node("MatMul", [x, b.const("H", hadamard_matrix(n) * scale)], out=out)[0]
        return HadamardNodes(x, result, n, "matmul", b.nodes, b.initializers)
    shape = b.node("Shape", [x])[0]
    if method == "kron":
        h_a, h_b = _kron_split(n)
        view = b.reshape(x, [-1, h_a.shape[0], h_b.shape[0]])
        right = b.node("MatMul", [view, b.const("H_B", h_b)])[0]
        left = b.node("MatMul", [b.const("H_A_T", h_a.T * scale), right])[0]
    else:
        left = _butterfly(b, x, n, scale)
    result = b.node("Reshape", [left, shape], out=out)[0]
    return HadamardNodes(x, result, n, method, b.nodes, b.initializers)


def _butterfly(b: _Builder, x: str, n: int, scale: float) -> str:
    """Sylvester butterflies on the 2^k part of the index, then the base m x m product; returns [.., m, 2^k]."""
    m, p2 = decompose(n)
    current = x
    if m == 1:
        current = b.node("Mul", [x, b.const("scale", np.array(scale))])[0]
    half = 1
    while half < p2:
        view = b.reshape(current, [-1, 2, half])  # index = (block, bit, inner): pairs i and i + half
        low, high = b.split_halves(view, axis=1)
        total = b.node("Add", [low, high])[0]
        diff = b.node("Sub", [low, high])[0]
        current = b.node("Concat", [total, diff], axis=1)[0]
        half *= 2
    if m == 1:
        return current
    view = b.reshape(current, [-1, m, p2])
    return b.node("MatMul", [b.const("base_T", base_matrix(m).T * scale), view])[0]


# ------------------------------------------------------------------------------------------ insertion


@dataclass
class OnlineHadamard:
    """An online rotation inserted in a graph, for the report."""

    tensor: str
    output: str
    n: int
    method: str
    nodes: list[str]
    reason: str

    def describe(self) -> dict[str, object]:
        return {
            "input": self.tensor,
            "output": self.output,
            "order": self.n,
            "method": self.method,
            "nodes": len(self.nodes),
            "first_node": self.nodes[0] if self.nodes else None,
            "reason": self.reason,
        }


def model_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    return 1


def _taken_names(index: GraphIndex) -> set[str]:
    names = set(index.store.tensors) | set(index.producer) | set(index.graph_inputs)
    names |= {node.name for node in index.graph.node}
    return names


def _fresh(base: str, taken: set[str]) -> str:
    name, number = base, 1
    while name in taken:
        number += 1
        name = f"{base}.{number}"
    taken.add(name)
    return name


def insert_online_hadamard(
    index: GraphIndex,
    tensor: str,
    n: int,
    *,
    elem_type: int,
    reason: str,
    readers: list[tuple[onnx.NodeProto, int]] | None = None,
    method: str | None = None,
) -> OnlineHadamard:
    """Insert ``y = x @ H_n / sqrt(n)`` (last axis) after ``tensor``; ``readers`` (or all of them) read y.

    With ``readers=None`` every reader, graph outputs included, sees the rotated value: the producer's
    output is renamed and the last inserted node takes over the original name. Nodes are placed right
    after the producer so the graph stays topologically sorted.
    """
    graph = index.graph
    taken = _taken_names(index)
    stem = tensor.replace("/", "_").strip("_")
    producer = index.producer.get(tensor)
    rename_producer = readers is None and producer is not None
    if rename_producer:
        source = _fresh(f"{tensor}.pre_hadamard", taken)
        built = hadamard_nodes(
            source,
            n,
            elem_type,
            prefix=_fresh(f"{ONLINE_PREFIX}{stem}", taken),
            opset=model_opset(index.model),
            method=method,
            out=tensor,
        )
    else:
        source = tensor
        if readers is None:
            if tensor in index.graph_outputs:
                raise ValueError(f"cannot rotate graph input '{tensor}' that is also a graph output")
            readers = [(u.node, u.index) for u in index.users(tensor)]
        built = hadamard_nodes(
            tensor,
            n,
            elem_type,
            prefix=_fresh(f"{ONLINE_PREFIX}{stem}", taken),
            opset=model_opset(index.model),
            method=method,
            out=_fresh(f"{tensor}.hadamard", taken),
        )
    for init in built.initializers:
        graph.initializer.append(init)
        index.store.tensors[init.name] = graph.initializer[-1]
    position = 0 if producer is None else list(graph.node).index(producer) + 1
    if rename_producer:
        for slot, name in enumerate(producer.output):
            if name == tensor:
                producer.output[slot] = source
        index.producer[source] = producer
    else:
        moved = {(id(node), slot) for node, slot in readers}
        index.consumers[tensor] = [u for u in index.users(tensor) if (id(u.node), u.index) not in moved]
        for reader, slot in readers:
            reader.input[slot] = built.output
            index.consumers[built.output].append(Use(reader, slot))
    for offset, node in enumerate(built.nodes):
        graph.node.insert(position + offset, node)
        _register(index, graph.node[position + offset])
    return OnlineHadamard(tensor, built.output, n, built.method, [nd.name for nd in built.nodes], reason)


def _register(index: GraphIndex, node: onnx.NodeProto) -> None:
    """Keep the index's producer/consumer maps current for a node just added to the graph."""
    for name in node.output:
        index.producer[name] = node
    for slot, name in enumerate(node.input):
        if name:
            index.consumers[name].append(Use(node, slot))
