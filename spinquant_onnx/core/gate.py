"""The structural output gate (#13): the written graph must load, and every rewritten edge must still fit.

Run before an output is committed, on a *weightless view* of the graph: large initializers become typed
graph inputs of the same shape, small ones (shapes, axes, scalars) keep their values so Reshape targets
propagate. The gate then runs ``onnx.checker`` and strict full shape inference (``check_type``,
``strict_mode``, ``data_prop``) and compares the result with the same view of the input:

- every inserted node (named ``spinquant/...``) has one floating element type on all its float edges;
- every tensor present in both graphs keeps its element type and its concrete dims;
- every reader the rewrite redirected reads a tensor of the same type and shape as before;
- graph inputs, outputs and initializers keep their types and dims.

A failure means the rewrite built a graph that onnxruntime would refuse (or that computes on the wrong
axis): it is a bug in this tool, raised as ``OutputGateError`` (exit 3), and nothing is written.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
from onnx import TensorProto

from spinquant_onnx.errors import OutputGateError
from spinquant_onnx.graph.index import weightless_view

INSERTED_PREFIX = "spinquant/"
_FLOATS = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE}


@dataclass
class _Typed:
    elem: int
    dims: tuple[int | str | None, ...] | None


def _types(model: onnx.ModelProto) -> dict[str, _Typed]:
    found: dict[str, _Typed] = {}
    graph = model.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if not info.type.HasField("tensor_type"):
            continue
        tensor_type = info.type.tensor_type
        dims = None
        if tensor_type.HasField("shape"):
            dims = tuple(
                d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim
            )
        found[info.name] = _Typed(tensor_type.elem_type, dims)
    for tensor in graph.initializer:
        found[tensor.name] = _Typed(tensor.data_type, tuple(tensor.dims))
    return found


# Inference modes, strongest first: strict with type checks, type checks only, plain propagation.
MODES = ({"strict_mode": True, "check_type": True}, {"strict_mode": False, "check_type": True}, {})


def _infer(view: onnx.ModelProto, mode: int) -> onnx.ModelProto:
    return onnx.shape_inference.infer_shapes(view, data_prop=True, **MODES[mode])


@dataclass
class Baseline:
    """The input's weightless view and inferred types, and which checks the input itself passes."""

    view: onnx.ModelProto
    types: dict[str, _Typed]
    checker: bool
    mode: int  # the strongest of MODES the input itself passes (len(MODES) when none does)


def input_baseline(model: onnx.ModelProto) -> Baseline:
    """Taken before any rewrite (the rewrites edit the node list in place).

    An input that already fails a check (ORT's SimplifiedLayerNormalization registered in the ONNX
    domain fails ``onnx.checker``; an exporter's own inconsistent value_info fails strict inference) is
    gated with the strongest check it passes itself, plus the type and edge comparisons.
    """
    view = weightless_view(model)  # a copy of the node list: later edits do not reach it
    try:
        onnx.checker.check_model(view)
        checker = True
    except Exception:  # noqa: BLE001 - onnx raises ValidationError or RuntimeError
        checker = False
    for mode in range(len(MODES)):
        try:
            return Baseline(view, _types(_infer(view, mode)), checker, mode)
        except Exception:  # noqa: BLE001 - onnx raises InferenceError, ValidationError or RuntimeError
            continue
    return Baseline(view, _types(view), checker, len(MODES))


def _compatible(a: _Typed, b: _Typed) -> bool:
    if a.elem and b.elem and a.elem != b.elem:
        return False
    if a.dims is None or b.dims is None:
        return True
    if len(a.dims) != len(b.dims):
        return False
    return all(not (isinstance(x, int) and isinstance(y, int)) or x == y for x, y in zip(a.dims, b.dims, strict=True))


def _describe(typed: _Typed) -> str:
    name = TensorProto.DataType.Name(typed.elem) if typed.elem else "?"
    dims = "?" if typed.dims is None else "[" + ",".join("?" if d is None else str(d) for d in typed.dims) + "]"
    return f"{name}{dims}"


def _fail(what: str) -> OutputGateError:
    return OutputGateError(f"output gate: {what}; nothing written (a bug in spinquant-onnx: please report it)")


def check_output(model: onnx.ModelProto, baseline: Baseline) -> None:
    """Refuse (``OutputGateError``) a rewritten ``model`` whose graph would not load or no longer fits.

    ``baseline`` is ``input_baseline`` of the same model before the rewrite. Costs no weight bytes.
    """
    before_view, before = baseline.view, baseline.types
    view = weightless_view(model)
    try:
        if baseline.checker:
            onnx.checker.check_model(view)
        inferred = _infer(view, baseline.mode) if baseline.mode < len(MODES) else view
    except Exception as exc:  # noqa: BLE001 - checker and inference raise several types
        raise _fail(f"the rotated graph fails onnx.checker / strict shape inference: {exc}") from None
    after = _types(inferred)
    _check_inserted(inferred, after)
    for name, old in before.items():
        new = after.get(name)
        if new is not None and not _compatible(old, new):
            raise _fail(f"tensor '{name}' was {_describe(old)} and is now {_describe(new)}")
    _check_redirected(before_view, inferred, before, after)
    _check_io(before_view, model)


def _check_inserted(inferred: onnx.ModelProto, after: dict[str, _Typed]) -> None:
    """Every inserted node has one floating element type on all its float edges."""
    for node in inferred.graph.node:
        if not node.name.startswith(INSERTED_PREFIX):
            continue
        elems = {after[n].elem for n in [*node.input, *node.output] if n in after and after[n].elem in _FLOATS}
        if len(elems) > 1:
            names = ", ".join(TensorProto.DataType.Name(e) for e in sorted(elems))
            raise _fail(f"inserted node '{node.name}' ({node.op_type}) mixes element types {names}")


def _check_redirected(
    before_view: onnx.ModelProto, inferred: onnx.ModelProto, before: dict[str, _Typed], after: dict[str, _Typed]
) -> None:
    """Every reader the rewrite redirected reads a tensor of the same type and shape as before."""
    originals = {tuple(n.output): n for n in before_view.graph.node}
    for node in inferred.graph.node:
        old_node = originals.get(tuple(node.output))
        if old_node is None or old_node.op_type != node.op_type:
            continue
        for slot, (old_name, new_name) in enumerate(zip(old_node.input, node.input, strict=False)):
            if old_name == new_name or old_name not in before or new_name not in after:
                continue
            if not _compatible(before[old_name], after[new_name]):
                raise _fail(
                    f"node '{node.name or node.output[0]}' ({node.op_type}) input {slot} now reads '{new_name}' "
                    f"({_describe(after[new_name])}) instead of '{old_name}' ({_describe(before[old_name])})"
                )


def _check_io(before_view: onnx.ModelProto, model: onnx.ModelProto) -> None:
    """Graph inputs and outputs keep their declared types."""
    old_io = [(i.name, i.type.SerializeToString()) for i in [*before_view.graph.input, *before_view.graph.output]]
    declared = {i.name: i.type.SerializeToString() for i in [*model.graph.input, *model.graph.output]}
    for name, kind in old_io:
        if name in declared and declared[name] != kind:
            raise _fail(f"graph input/output '{name}' changed its declared type")
