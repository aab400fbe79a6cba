"""Producer/consumer index over an ONNX graph, and the few value look-ups the matchers need."""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import onnx
from onnx import numpy_helper

from spinquant_onnx.graph.ops import FOLDABLE_OPS, SHAPE_ONLY_OPS, TRANSPARENT_OPS
from spinquant_onnx.io.tensor_store import TensorStore

SMALL_CONSTANT = 4096
T = TypeVar("T")


@dataclass(frozen=True)
class Use:
    """One input slot of one node: the edge a rewrite may need to redirect."""

    node: onnx.NodeProto
    index: int


class GraphIndex:
    def __init__(self, model: onnx.ModelProto, store: TensorStore) -> None:
        self.model = model
        self.graph = model.graph
        self.store = store
        self.producer: dict[str, onnx.NodeProto] = {}
        self.consumers: dict[str, list[Use]] = defaultdict(list)
        self.node_order: dict[int, int] = {}
        for position, node in enumerate(self.graph.node):
            self.node_order[id(node)] = position
            for out in node.output:
                if out:
                    self.producer[out] = node
            for index, name in enumerate(node.input):
                if name:
                    self.consumers[name].append(Use(node, index))
        self.graph_inputs = {i.name: i for i in self.graph.input if i.name not in store}
        self.graph_outputs = {o.name for o in self.graph.output}
        self.value_info = {
            v.name: v for v in list(self.graph.value_info) + list(self.graph.input) + list(self.graph.output)
        }
        self._memo: dict[str, tuple[int, Any]] = {}

    def cached(self, key: str, compute: Callable[[], T]) -> T:
        """``compute()`` once per graph state: recomputed after a rewrite adds or removes nodes."""
        state = len(self.graph.node)
        hit = self._memo.get(key)
        if hit is None or hit[0] != state:
            hit = (state, compute())
            self._memo[key] = hit
        return hit[1]

    def refresh(self) -> None:
        """Re-read the graph in place after a rewrite replaced nodes (holders of this index see the new state)."""
        self.__init__(self.model, self.store)

    def rebuild(self) -> GraphIndex:
        return GraphIndex(self.model, self.store)

    def users(self, name: str) -> list[Use]:
        return self.consumers.get(name, [])

    def is_initializer(self, name: str) -> bool:
        return name in self.store

    def constant(self, name: str) -> np.ndarray | None:
        """Value of a small constant (initializer, Constant node output, or a foldable op of those), else None."""
        if name in self.store:
            if self.store.nbytes(name) > SMALL_CONSTANT * 8:
                return None
            return np.asarray(self.store.array(name))
        node = self.producer.get(name)
        if node is not None and node.op_type in FOLDABLE_OPS:
            return self._folded(node)
        if node is not None and node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_float":
                    return np.array(attr.f, dtype=np.float32)
                if attr.name == "value_floats":
                    return np.array(list(attr.floats), dtype=np.float32)
                if attr.name == "value_int":
                    return np.array(attr.i, dtype=np.int64)
                if attr.name == "value_ints":
                    return np.array(list(attr.ints), dtype=np.int64)
        return None

    def _folded(self, node: onnx.NodeProto) -> np.ndarray | None:
        """A FOLDABLE_OPS node whose inputs are all small constants, evaluated (None otherwise)."""
        values = [self.constant(name) if name else None for name in node.input]
        if not values or values[0] is None or any(v is None and n for v, n in zip(values, node.input, strict=True)):
            return None
        x = values[0]
        if node.op_type in ("Identity",):
            return x
        if node.op_type == "Cast":
            return x.astype(onnx.helper.tensor_dtype_to_np_dtype(self.attr(node, "to")))
        if node.op_type == "CastLike":
            return x.astype(values[1].dtype)
        if node.op_type == "Reshape":
            shape = [int(d) for d in values[1].reshape(-1)]
            shape = [x.shape[i] if d == 0 and not self.attr(node, "allowzero", 0) else d for i, d in enumerate(shape)]
            return x.reshape(shape)
        axes = self.attr(node, "axes")
        axes = [int(a) for a in (values[1].reshape(-1) if axes is None and len(values) > 1 else axes or [])]
        if node.op_type == "Squeeze":
            return np.squeeze(x, axis=tuple(axes)) if axes else np.squeeze(x)
        return np.expand_dims(x, axis=tuple(axes))

    def scalar(self, name: str) -> float | None:
        value = self.constant(name)
        if value is None or value.size != 1:
            return None
        return float(value.reshape(()))

    def static_shape(self, name: str) -> tuple[int | None, ...] | None:
        if name in self.store:
            return self.store.shape(name)
        info = self.value_info.get(name)
        if (
            info is None
            or not info.type.HasField("tensor_type")
            or not info.type.tensor_type.HasField("shape")
        ):
            return None
        return tuple(
            d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim
        )

    def see_through_back(self, name: str) -> str:
        """Follow a tensor back through transparent ops to its source."""
        node = self.producer.get(name)
        while node is not None and node.op_type in TRANSPARENT_OPS and node.input:
            name = node.input[0]
            node = self.producer.get(name)
        return name

    def value_users(self, name: str) -> list[Use]:
        """Consumers of a tensor's value, looking through transparent ops and ignoring shape-only readers."""
        result: list[Use] = []
        for use in self.users(name):
            if use.node.op_type in SHAPE_ONLY_OPS:
                continue
            if use.node.op_type in TRANSPARENT_OPS and use.index == 0:
                for out in use.node.output:
                    result.extend(self.value_users(out))
            else:
                result.append(use)
        return result

    def source_edge(self, node: onnx.NodeProto, slot: int) -> Use:
        """The edge where the tensor feeding ``node.input[slot]`` is first read, behind transparent ops."""
        name = node.input[slot]
        current, current_slot = node, slot
        producer = self.producer.get(name)
        while producer is not None and producer.op_type in TRANSPARENT_OPS:
            current, current_slot = producer, 0
            name = producer.input[0]
            producer = self.producer.get(name)
        return Use(current, current_slot)

    def walk_forward(
        self,
        start: str,
        *,
        limit: int,
        stop: frozenset[str] = frozenset(),
        follow: Callable[[onnx.NodeProto], bool] | None = None,
    ) -> Iterator[tuple[onnx.NodeProto, int, str]]:
        """Breadth-first (node, input slot, tensor) edges reachable from ``start``, at most ``limit`` of them.

        Shape-only readers are skipped; a node's outputs are followed unless they are in ``stop`` or
        ``follow(node)`` says no. Matchers use it to see where a projection's output goes.
        """
        frontier, expanded, edges = [start], {start}, 0
        while frontier and edges < limit:
            name = frontier.pop(0)
            for use in self.users(name):
                if use.node.op_type in SHAPE_ONLY_OPS:
                    continue
                edges += 1
                yield use.node, use.index, name
                if follow is not None and not follow(use.node):
                    continue
                for out in use.node.output:
                    if out and out not in expanded and out not in stop:
                        expanded.add(out)
                        frontier.append(out)

    def exits_graph(self, name: str) -> str | None:
        """The graph output this tensor's value reaches through transparent ops, if any."""
        if name in self.graph_outputs:
            return name
        for use in self.users(name):
            if use.node.op_type in TRANSPARENT_OPS and use.index == 0:
                for out in use.node.output:
                    found = self.exits_graph(out)
                    if found:
                        return found
        return None

    def attr(self, node: onnx.NodeProto, name: str, default=None):
        for attribute in node.attribute:
            if attribute.name == name:
                return onnx.helper.get_attribute_value(attribute)
        return default


def per_graph_state(func: Callable[[GraphIndex], T]) -> Callable[[GraphIndex], T]:
    """Decorate a matcher ``f(index)`` so that its result is computed once per graph state (``GraphIndex.cached``)."""
    key = f"{func.__module__}.{func.__qualname__}"

    @functools.wraps(func)
    def wrapper(index: GraphIndex) -> T:
        return index.cached(key, lambda: func(index))

    return wrapper


def node_label(node: onnx.NodeProto) -> str:
    """How a node is named in messages: its name if it has one, else its op and first output."""
    return f"'{node.name}' ({node.op_type})" if node.name else f"{node.op_type} -> '{node.output[0]}'"


WEIGHTLESS_KEEP = 4096
"""Initializers up to this many elements keep their values in a weightless view (shapes, axes, scalars)."""


def _has_values(tensor: onnx.TensorProto, count: int) -> bool:
    """False for a plan's placeholder clone (rewrite/plan.py), whose values are written only at save time."""
    fields = ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data")
    return count == 0 or any(len(getattr(tensor, field)) for field in fields)


def weightless_view(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model's graph with large initializers replaced by typed graph inputs: no weight bytes copied.

    Small inline initializers keep their values so shape inference can propagate Reshape targets.
    Used for type/shape inference and the output gate (#13), which must not cost the weights.
    """
    view = onnx.ModelProto()
    view.ir_version = model.ir_version
    view.opset_import.extend(model.opset_import)
    view.functions.extend(model.functions)
    source, graph = model.graph, view.graph
    graph.name = source.name
    graph.node.extend(source.node)
    graph.output.extend(source.output)
    graph.value_info.extend(source.value_info)
    graph.input.extend(source.input)
    declared = {i.name for i in source.input}
    for tensor in source.initializer:
        count = int(np.prod(tensor.dims)) if tensor.dims else 1
        inline = count <= WEIGHTLESS_KEEP and tensor.data_location != onnx.TensorProto.EXTERNAL
        if inline and _has_values(tensor, count):
            graph.initializer.append(tensor)
        elif tensor.name not in declared:
            graph.input.append(onnx.helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    return view


def fresh_name(index: GraphIndex, base: str, taken: set[str]) -> str:
    """A tensor/node name free in the graph and in ``taken`` (which it joins): ``base``, else ``base.2``, ..."""
    name, number = base, 1
    while name in taken or name in index.store or name in index.producer or name in index.graph_inputs:
        number += 1
        name = f"{base}.{number}"
    taken.add(name)
    return name
