"""A small declarative matcher for op chains, in the spirit of onnxscript's rewriter.

A pattern is data: ``Op`` nodes with input patterns, ``Var`` captures that must bind consistently,
``Const`` for small constants with a predicate, ``Init`` for initializers, and ``AnyOf`` alternatives.
Matching walks *backwards* from an anchor tensor through producers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import onnx

from spinquant_onnx.graph.index import GraphIndex
from spinquant_onnx.graph.ops import FOLDABLE_OPS, PASS_THROUGH, TRANSPARENT_OPS

# Nodes a chain may carry on any edge without changing its meaning.


@dataclass(frozen=True)
class Var:
    """Any tensor; every occurrence of the same name must be the same tensor."""

    name: str


@dataclass(frozen=True)
class Const:
    """A small constant (initializer or Constant node) whose value satisfies ``test``."""

    name: str | None = None
    test: Callable[[np.ndarray], bool] | None = None


@dataclass(frozen=True)
class Init:
    """An initializer, possibly behind transparent ops (Cast, Identity, QcQuantizeOp)."""

    name: str


@dataclass(frozen=True)
class Op:
    """A node of one of ``types`` whose leading inputs match ``inputs``; ``check`` vets the node itself."""

    types: tuple[str, ...]
    inputs: tuple[Pattern, ...] = ()
    commutative: bool = False
    name: str | None = None
    check: Callable[[GraphIndex, onnx.NodeProto], bool] | None = None


@dataclass(frozen=True)
class AnyOf:
    options: tuple[Pattern, ...]


Pattern = Var | Const | Init | Op | AnyOf


def optional(op_type: str, inner: Pattern) -> AnyOf:
    """``op_type(inner)`` or just ``inner``: for Casts that some exporters insert and others do not."""
    return AnyOf((Op((op_type,), (inner,)), inner))


def broadcast_scalar(array: np.ndarray) -> bool:
    """One value, of any rank (``[]``, ``[1]``, ``[1, 1, 1]``): what a norm's eps must be (#13)."""
    return array.size == 1 and bool(np.isfinite(array).all())


def scalar_equals(value: float) -> Callable[[np.ndarray], bool]:
    return lambda array: array.size == 1 and abs(float(array.reshape(())) - value) < 1e-6


@dataclass
class Match:
    tensors: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, onnx.NodeProto] = field(default_factory=dict)
    matched: list[onnx.NodeProto] = field(default_factory=list)
    values: dict[str, np.ndarray] = field(default_factory=dict)

    def copy(self) -> Match:
        return Match(dict(self.tensors), dict(self.nodes), list(self.matched), dict(self.values))


# One branch per pattern kind; split into per-kind functions once the parallel norm work has landed (#18).
def match(index: GraphIndex, pattern: Pattern, tensor: str, state: Match | None = None) -> Match | None:  # noqa: C901
    """Match ``pattern`` against the producer chain of ``tensor``; a new Match or None."""
    state = Match() if state is None else state
    if isinstance(pattern, Var):
        bound = state.tensors.get(pattern.name)
        if bound is not None:
            return state if bound == tensor else None
        result = state.copy()
        result.tensors[pattern.name] = tensor
        return result
    if isinstance(pattern, Const):
        tensor = index.see_through_back(tensor)  # AIMET's sim quantizes Constant outputs too
        value = index.constant(tensor)
        if (
            value is None
            or index.producer.get(tensor) is not None
            and index.producer[tensor].op_type not in ("Constant", *FOLDABLE_OPS)
        ):
            return None
        if pattern.test is not None and not pattern.test(value):
            return None
        result = state.copy()
        if pattern.name:
            result.tensors[pattern.name] = tensor
            result.values[pattern.name] = value
        return result
    if isinstance(pattern, Init):
        source = index.see_through_back(tensor)
        if not index.is_initializer(source):
            return None
        result = state.copy()
        result.tensors[pattern.name] = source
        result.tensors[pattern.name + ".use"] = tensor
        node = index.producer.get(tensor)
        while node is not None and node.op_type in TRANSPARENT_OPS:
            result.matched.append(node)
            node = index.producer.get(node.input[0])
        return result
    if isinstance(pattern, AnyOf):
        for option in pattern.options:
            found = match(index, option, tensor, state)
            if found is not None:
                return found
        return None
    node = index.producer.get(tensor)
    skipped = []
    while node is not None and node.op_type in PASS_THROUGH and node.op_type not in pattern.types:
        skipped.append(node)  # AIMET puts a quantizer after nearly every op; it does not change the chain
        node = index.producer.get(node.input[0])
    if node is None or node.op_type not in pattern.types or len(node.input) < len(pattern.inputs):
        return None
    if pattern.check is not None and not pattern.check(index, node):
        return None
    orders = [list(range(len(pattern.inputs)))]
    if pattern.commutative and len(pattern.inputs) == 2:
        orders.append([1, 0])
    for order in orders:
        result: Match | None = state.copy()
        result.matched.extend([*skipped, node])
        if pattern.name:
            result.nodes[pattern.name] = node
        for slot, sub in zip(order, pattern.inputs, strict=True):
            result = match(index, sub, node.input[slot], result)
            if result is None:
                break
        if result is not None:
            return result
    return None
