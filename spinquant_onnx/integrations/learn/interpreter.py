"""The ONNX graph itself, evaluated in torch: a table of op functions, so gradients flow through it.

Learning rotations needs the model's loss as a differentiable function of its weights. Rather than
converting the graph to modules (one more dependency, and one more place where an exporter's pattern may
be misread), every node is run by a small torch function with ONNX semantics. Whatever the exporter
produced (TorchScript's shape arithmetic, dynamo's ``val_N`` chains, Kronecker online Hadamards) runs
as written; an op not in ``OPS`` is refused by name before anything runs.

``hooks`` let a caller change a node's inputs (fake quantizers on a linear's activation and weight) or
its outputs (the embedding's R1, applied to gathered rows instead of the whole table).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper

from spinquant_onnx.errors import UnsupportedGraphError
from spinquant_onnx.graph.index import node_label

Attrs = dict[str, Any]
OpFn = Callable[..., Any]
InputHook = Callable[[list[Any]], list[Any]]
OutputHook = Callable[[list[Any]], list[Any]]

_DTYPES = {
    onnx.TensorProto.FLOAT: torch.float32,
    onnx.TensorProto.DOUBLE: torch.float64,
    onnx.TensorProto.FLOAT16: torch.float16,
    onnx.TensorProto.BFLOAT16: torch.bfloat16,
    onnx.TensorProto.INT64: torch.int64,
    onnx.TensorProto.INT32: torch.int32,
    onnx.TensorProto.INT16: torch.int16,
    onnx.TensorProto.INT8: torch.int8,
    onnx.TensorProto.UINT8: torch.uint8,
    onnx.TensorProto.BOOL: torch.bool,
}
_INT64_MAX = np.iinfo(np.int64).max


def to_torch(array: np.ndarray) -> torch.Tensor:
    """A tensor owning a copy of ``array`` (float types kept; bfloat16 from ml_dtypes goes through float32)."""
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(np.asarray(array, dtype=np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.array(array, copy=True))


def _ints(value: Any) -> list[int]:
    return [int(v) for v in (value.reshape(-1).tolist() if isinstance(value, torch.Tensor) else value)]


def _axes(attrs: Attrs, inputs: Sequence[Any], slot: int) -> list[int] | None:
    """Axes given as an attribute (older opsets) or as input ``slot`` (newer)."""
    if len(inputs) > slot and inputs[slot] is not None:
        return _ints(inputs[slot])
    return list(attrs["axes"]) if "axes" in attrs else None


# ------------------------------------------------------------------------------------------------ ops


def _reshape(attrs: Attrs, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    dims = _ints(shape)
    if not attrs.get("allowzero", 0):
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


def _slice(attrs: Attrs, x: torch.Tensor, starts, ends, axes=None, steps=None) -> torch.Tensor:
    starts, ends = _ints(starts), _ints(ends)
    axes = _ints(axes) if axes is not None else list(range(len(starts)))
    steps = _ints(steps) if steps is not None else [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=True):
        size = x.shape[axis]
        if step > 0:
            start, end = (max(0, min(size, v + size if v < 0 else v)) for v in (start, end))
            x = x.narrow(axis, start, max(0, end - start))
            x = x[(slice(None),) * (axis % x.ndim) + (slice(None, None, step),)]
        else:
            start = max(-1, min(size - 1, start + size if start < 0 else start))
            end = max(-1, min(size - 1, end + size if end < 0 else end)) if end > -_INT64_MAX else -1
            index = torch.arange(start, end, step, dtype=torch.int64)
            x = x.index_select(axis, index)
    return x


def _gather(attrs: Attrs, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    axis = attrs.get("axis", 0) % x.ndim
    idx = torch.where(indices < 0, indices + x.shape[axis], indices).to(torch.int64)
    out = x.index_select(axis, idx.reshape(-1))
    return out.reshape((*x.shape[:axis], *idx.shape, *x.shape[axis + 1 :]))


def _gather_nd(attrs: Attrs, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    if attrs.get("batch_dims", 0) != 0:
        raise UnsupportedGraphError("GatherND with batch_dims != 0 is not supported by the learn interpreter")
    k = indices.shape[-1]
    idx = indices.to(torch.int64)
    parts = tuple(torch.where(idx[..., i] < 0, idx[..., i] + x.shape[i], idx[..., i]) for i in range(k))
    return x[parts]


def _unsqueeze(attrs: Attrs, x: torch.Tensor, axes=None) -> torch.Tensor:
    found = _axes(attrs, [x, axes], 1)
    rank = x.ndim + len(found)
    for axis in sorted(a % rank for a in found):
        x = x.unsqueeze(axis)
    return x


def _squeeze(attrs: Attrs, x: torch.Tensor, axes=None) -> torch.Tensor:
    found = _axes(attrs, [x, axes], 1)
    if found is None:
        return x.squeeze()
    for axis in sorted((a % x.ndim for a in found), reverse=True):
        x = x.squeeze(axis)
    return x


def _split(attrs: Attrs, x: torch.Tensor, split=None, *, outputs: int) -> list[torch.Tensor]:
    axis = attrs.get("axis", 0)
    sizes = _ints(split) if split is not None else attrs.get("split")
    if sizes is None:
        count = attrs.get("num_outputs", outputs)
        chunk = -(-x.shape[axis] // count)
        sizes = [min(chunk, x.shape[axis] - i * chunk) for i in range(count)]
    return list(torch.split(x, list(sizes), dim=axis))


def _reduce(fn: Callable[..., torch.Tensor]) -> OpFn:
    def run(attrs: Attrs, x: torch.Tensor, axes=None) -> torch.Tensor:
        found = _axes(attrs, [x, axes], 1)
        keep = bool(attrs.get("keepdims", 1))
        if not found:
            if attrs.get("noop_with_empty_axes", 0):
                return x
            found = list(range(x.ndim))
        return fn(x, dim=[a % x.ndim for a in found], keepdim=keep)

    return run


def _expand(attrs: Attrs, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_ints(shape))))


def _constant(attrs: Attrs) -> torch.Tensor:
    if "value" in attrs:
        return to_torch(numpy_helper.to_array(attrs["value"]))
    for key, dtype in (("value_float", torch.float32), ("value_int", torch.int64)):
        if key in attrs:
            return torch.tensor(attrs[key], dtype=dtype)
    for key, dtype in (("value_floats", torch.float32), ("value_ints", torch.int64)):
        if key in attrs:
            return torch.tensor(list(attrs[key]), dtype=dtype)
    raise UnsupportedGraphError(f"Constant with attributes {sorted(attrs)} is not supported by the learn interpreter")


def _constant_of_shape(attrs: Attrs, shape: torch.Tensor) -> torch.Tensor:
    value = to_torch(numpy_helper.to_array(attrs["value"])) if "value" in attrs else torch.zeros(1)
    return torch.full(_ints(shape), value.reshape(-1)[0].item(), dtype=value.dtype)


def _div(attrs: Attrs, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    if a.dtype.is_floating_point:
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _gemm(attrs: Attrs, a: torch.Tensor, b: torch.Tensor, c=None) -> torch.Tensor:
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    out = attrs.get("alpha", 1.0) * (a @ b)
    return out if c is None else out + attrs.get("beta", 1.0) * c


def _softmax(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    return torch.softmax(x, dim=attrs.get("axis", -1))


def _transpose(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    perm = attrs.get("perm")
    return x.permute(*(perm if perm is not None else reversed(range(x.ndim))))


def _shape(attrs: Attrs, x: torch.Tensor) -> torch.Tensor:
    dims = list(x.shape)[attrs.get("start", 0) : attrs.get("end", None)]
    return torch.tensor(dims, dtype=torch.int64)


def _trilu(attrs: Attrs, x: torch.Tensor, k=None) -> torch.Tensor:
    diagonal = int(k.item()) if k is not None else 0
    return torch.triu(x, diagonal) if attrs.get("upper", 1) else torch.tril(x, diagonal)


def _layer_norm(attrs: Attrs, x: torch.Tensor, scale: torch.Tensor, bias=None) -> torch.Tensor:
    axis = attrs.get("axis", -1) % x.ndim
    dims = tuple(x.shape[axis:])
    return torch.nn.functional.layer_norm(x, dims, scale, bias, attrs.get("epsilon", 1e-5))


def _topk(attrs: Attrs, x: torch.Tensor, k: torch.Tensor, *, outputs: int) -> list[torch.Tensor]:
    found = torch.topk(
        x,
        int(k.reshape(-1)[0]),
        dim=attrs.get("axis", -1),
        largest=bool(attrs.get("largest", 1)),
        sorted=bool(attrs.get("sorted", 1)),
    )
    return [found.values, found.indices.to(torch.int64)]


def _one_hot(attrs: Attrs, indices: torch.Tensor, depth: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    size = int(depth.reshape(-1)[0])
    idx = torch.where(indices < 0, indices + size, indices).to(torch.int64)
    hot = torch.nn.functional.one_hot(idx, size).movedim(-1, attrs.get("axis", -1))
    return torch.where(hot.bool(), values[1], values[0])


def _positive(index: torch.Tensor, size: int) -> torch.Tensor:
    return torch.where(index < 0, index + size, index).to(torch.int64)


def _gather_elements(attrs: Attrs, x: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    axis = attrs.get("axis", 0) % x.ndim
    return torch.gather(x, axis, _positive(indices, x.shape[axis]))


def _no_reduction(attrs: Attrs, op: str) -> None:
    if attrs.get("reduction", b"none") not in (b"none", "none"):
        raise UnsupportedGraphError(
            f"{op} with reduction={attrs['reduction']!r} is not supported by the learn interpreter"
        )


def _scatter_elements(attrs: Attrs, x: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    _no_reduction(attrs, "ScatterElements")
    axis = attrs.get("axis", 0) % x.ndim
    return x.scatter(axis, _positive(indices, x.shape[axis]), updates)


def _scatter_nd(attrs: Attrs, x: torch.Tensor, indices: torch.Tensor, updates: torch.Tensor) -> torch.Tensor:
    _no_reduction(attrs, "ScatterND")
    out = x.clone()
    k = indices.shape[-1]
    out[tuple(_positive(indices[..., i], x.shape[i]) for i in range(k))] = updates
    return out


def _variadic(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    def run(attrs: Attrs, *xs: torch.Tensor) -> torch.Tensor:
        out = xs[0]
        for x in xs[1:]:
            out = fn(out, x)
        return out

    return run


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> OpFn:
    return lambda attrs, x: fn(x)


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> OpFn:
    return lambda attrs, a, b: fn(a, b)


OPS: dict[str, OpFn] = {
    "Add": _binary(torch.add),
    "Sub": _binary(torch.sub),
    "Mul": _binary(torch.mul),
    "Div": _div,
    "Pow": _binary(torch.pow),
    "MatMul": _binary(torch.matmul),
    "Gemm": _gemm,
    "Max": _variadic(torch.maximum),
    "Min": _variadic(torch.minimum),
    "Equal": _binary(torch.eq),
    "Less": _binary(torch.lt),
    "LessOrEqual": _binary(torch.le),
    "Greater": _binary(torch.gt),
    "GreaterOrEqual": _binary(torch.ge),
    "And": _binary(torch.logical_and),
    "Or": _binary(torch.logical_or),
    "Not": _unary(torch.logical_not),
    "Where": lambda attrs, c, a, b: torch.where(c, a, b),
    "Neg": _unary(torch.neg),
    "Abs": _unary(torch.abs),
    "Sqrt": _unary(torch.sqrt),
    "Reciprocal": _unary(torch.reciprocal),
    "Exp": _unary(torch.exp),
    "Log": _unary(torch.log),
    "Sigmoid": _unary(torch.sigmoid),
    "Tanh": _unary(torch.tanh),
    "Erf": _unary(torch.erf),
    "Relu": _unary(torch.relu),
    "Cos": _unary(torch.cos),
    "Sin": _unary(torch.sin),
    "Identity": _unary(lambda x: x),
    "Softmax": _softmax,
    "ReduceMean": _reduce(torch.mean),
    "ReduceSum": _reduce(torch.sum),
    "ReduceMax": _reduce(torch.amax),
    "Transpose": _transpose,
    "Reshape": _reshape,
    "Flatten": lambda attrs, x: x.reshape(int(np.prod(x.shape[: attrs.get("axis", 1)])), -1),
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Concat": lambda attrs, *xs: torch.cat(xs, dim=attrs["axis"]),
    "Split": _split,
    "Slice": _slice,
    "Gather": _gather,
    "GatherND": _gather_nd,
    "Cast": lambda attrs, x: x.to(_DTYPES[attrs["to"]]),
    "Shape": _shape,
    "Size": lambda attrs, x: torch.tensor(x.numel(), dtype=torch.int64),
    "Expand": _expand,
    "Tile": lambda attrs, x, repeats: x.repeat(*_ints(repeats)),
    "Range": lambda attrs, start, limit, delta: torch.arange(
        start.item(), limit.item(), delta.item(), dtype=start.dtype
    ),
    "Constant": _constant,
    "ConstantOfShape": _constant_of_shape,
    "Trilu": _trilu,
    "IsNaN": _unary(torch.isnan),
    "IsInf": _unary(torch.isinf),
    "CastLike": lambda attrs, x, like: x.to(like.dtype),
    "LayerNormalization": _layer_norm,
    "TopK": _topk,
    "OneHot": _one_hot,
    "GatherElements": _gather_elements,
    "ScatterElements": _scatter_elements,
    "ScatterND": _scatter_nd,
}
_MULTI_OUTPUT = {"Split", "TopK"}


def _attrs(node: onnx.NodeProto) -> Attrs:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


class TorchGraph:
    """One ONNX graph as a torch function of its inputs and of (some of) its initializers.

    ``constants`` holds every initializer's value; ``run`` takes ``overrides`` for the ones that change
    each step (the rotated weights), so only those are recomputed.
    """

    def __init__(self, graph: onnx.GraphProto, constants: dict[str, torch.Tensor], outputs: Sequence[str]):
        unknown = sorted({n.op_type for n in graph.node if n.op_type not in OPS or n.domain not in ("", "ai.onnx")})
        if unknown:
            raise UnsupportedGraphError(
                f"learn: the graph uses op(s) {', '.join(unknown)}, which the torch interpreter does not implement"
            )
        self.outputs = list(outputs)
        self.constants = constants
        self.nodes = self._needed(graph)
        self.attrs = [_attrs(n) for n in self.nodes]
        last_use: dict[str, int] = {}
        for position, node in enumerate(self.nodes):
            for name in node.input:
                last_use[name] = position
        self._frees = [[] for _ in self.nodes]
        for name, position in last_use.items():
            if name not in self.outputs:
                self._frees[position].append(name)

    def _needed(self, graph: onnx.GraphProto) -> list[onnx.NodeProto]:
        """The nodes the requested outputs depend on, in graph order."""
        wanted, kept = set(self.outputs), []
        for node in reversed(graph.node):
            if any(out in wanted for out in node.output):
                kept.append(node)
                wanted.update(name for name in node.input if name)
        return kept[::-1]

    def run(
        self,
        feeds: dict[str, torch.Tensor],
        overrides: dict[str, torch.Tensor] | None = None,
        input_hooks: dict[int, InputHook] | None = None,
        output_hooks: dict[int, OutputHook] | None = None,
    ) -> list[torch.Tensor]:
        """The requested outputs; hooks are keyed by ``id(node)``."""
        env: dict[str, Any] = {**feeds}
        overrides = overrides or {}
        input_hooks, output_hooks = input_hooks or {}, output_hooks or {}
        for position, node in enumerate(self.nodes):
            args = [self._value(env, overrides, name) if name else None for name in node.input]
            hook = input_hooks.get(id(node))
            if hook is not None:
                args = hook(args)
            fn = OPS[node.op_type]
            try:
                if node.op_type in _MULTI_OUTPUT:
                    result = fn(self.attrs[position], *args, outputs=len(node.output))
                else:
                    result = [fn(self.attrs[position], *args)]
            except UnsupportedGraphError:
                raise
            except Exception as exc:  # a shape or dtype the op table got wrong: say where
                raise UnsupportedGraphError(f"learn interpreter failed at node {node_label(node)}: {exc}") from exc
            hook = output_hooks.get(id(node))
            if hook is not None:
                result = hook(result)
            for name, value in zip(node.output, result, strict=False):
                env[name] = value
            for name in self._frees[position]:
                env.pop(name, None)
        return [env[name] for name in self.outputs]

    def _value(self, env: dict[str, Any], overrides: dict[str, torch.Tensor], name: str) -> Any:
        if name in env:
            return env[name]
        if name in overrides:
            return overrides[name]
        if name in self.constants:
            return self.constants[name]
        raise UnsupportedGraphError(f"learn interpreter: tensor '{name}' has no value (not an input or initializer)")
