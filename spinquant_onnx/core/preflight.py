"""Sanity checks on what a run is about to do, made before (or while) anything is written.

The matcher decides *which* tensors a rotation touches; these checks make sure those tensors can be
rewritten exactly and that the run can finish: float element types only, shapes that agree with the
rotation and with what the graph declares, finite values (a NaN or Inf would spread through a whole
rotated row), outputs that still fit their type, an output path that cannot clobber the input, and
enough memory — refusing early with a clear line is better than being killed by the OS half-way.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from spinquant_onnx.core.memory import check_memory, estimate_memory
from spinquant_onnx.errors import InputError, SpinQuantError
from spinquant_onnx.io.model_file import type_name
from spinquant_onnx.io.tensor_store import TensorStore
from spinquant_onnx.rewrite.plan import TensorPlan

ROTATABLE_TYPES = frozenset({TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16})
# Elements scanned per step by the finiteness check (bounds its temporary boolean array).
FINITE_CHUNK = 1 << 22
# Tensors up to this size are checked for NaN/Inf before writing starts; larger ones as they are written.
EARLY_FINITE_BYTES = 1 << 20


# ------------------------------------------------------------------------------------------------- paths


def check_output_path(
    in_path: Path, out_path: Path, input_files: Iterable[Path] = (), *, in_place: bool = False
) -> None:
    """OUT must not be IN (unless --in-place), nor one of IN's external-data files, nor a folder."""
    if out_path.is_dir():
        raise SpinQuantError(f"{out_path}: output is an existing folder; give a file name such as model.onnx")
    if _same_file(in_path, out_path) and not in_place:
        raise InputError(f"{out_path}: output is the input file; pass --in-place to overwrite it")
    for data in input_files:
        if _same_file(data, out_path):
            raise InputError(
                f"{out_path}: output would overwrite the input's external data file '{data.name}'; "
                "choose another output name"
            )


def _same_file(a: Path, b: Path) -> bool:
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# ------------------------------------------------------------------------------------ planned tensors


def check_plan(model: onnx.ModelProto, store: TensorStore, plan: TensorPlan) -> None:
    """Every tensor the plan rewrites is a float weight whose shape fits each of its operations."""
    declared = _declared_shapes(model)
    for target in plan.targets.values():
        source, role = target.source, target.role
        tensor = store.tensors[source]
        if tensor.data_type not in ROTATABLE_TYPES:
            raise InputError(
                f"initializer '{source}' ({role}) is {type_name(tensor.data_type)}; a rotation rewrites it in floating "
                "point, so it must be float32, float16 or bfloat16: rotate the float export, then quantize"
            )
        shape = store.shape(source)
        graph_shape = declared.get(source)
        if graph_shape is not None and not _shapes_agree(shape, graph_shape):
            raise InputError(
                f"initializer '{source}' ({role}) has shape {list(shape)} but the graph declares "
                f"{[d if d is not None else '?' for d in graph_shape]}; the file is inconsistent"
            )
        for op in target.ops:
            if op.kind in ("fill", "center"):
                continue
            width = op.rotation.n if op.rotation is not None else int(np.size(op.vector))
            if not -len(shape) <= op.axis < len(shape) or shape[op.axis] != width:
                raise InputError(
                    f"initializer '{source}' ({role}) has shape {list(shape)}, but its axis {op.axis} should match "
                    f"the {width}-wide residual stream; the weights and the graph disagree"
                )


def _declared_shapes(model: onnx.ModelProto) -> dict[str, tuple[int | None, ...]]:
    """Static shapes the graph states for its tensors (graph inputs and value_info)."""
    shapes = {}
    for info in list(model.graph.input) + list(model.graph.value_info):
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            shapes[info.name] = tuple(
                d.dim_value if d.HasField("dim_value") else None for d in info.type.tensor_type.shape.dim
            )
    return shapes


def _shapes_agree(actual: tuple[int, ...], declared: tuple[int | None, ...]) -> bool:
    return len(actual) == len(declared) and all(d is None or d == a for a, d in zip(actual, declared, strict=True))


def first_non_finite(values: np.ndarray) -> tuple[tuple[int, ...], float] | None:
    """Index and value of the first NaN/Inf, scanning in chunks so a memory map is never copied whole."""
    values = np.asarray(values)
    if values.dtype.kind not in "fcV" or values.size == 0:
        return None
    flat = values.reshape(-1)
    for start in range(0, flat.size, FINITE_CHUNK):
        bad = ~np.isfinite(flat[start : start + FINITE_CHUNK])
        if bad.any():
            position = start + int(np.argmax(bad))
            index = tuple(int(i) for i in np.unravel_index(position, values.shape))
            return index, float(flat[position])
    return None


def require_finite(values: np.ndarray, name: str, role: str) -> None:
    found = first_non_finite(values)
    if found is not None:
        index, value = found
        raise InputError(
            f"initializer '{name}' ({role}) contains {value} at index {list(index)}; a rotation would spread it "
            "over a whole row: fix or re-export the weights"
        )


def check_small_sources_finite(store: TensorStore, plan: TensorPlan) -> None:
    """NaN/Inf in norm scales and biases, before any weight is written (they are folded into others)."""
    for source, role in _sources(plan).items():
        if store.nbytes(source) <= EARLY_FINITE_BYTES:
            require_finite(store.array(source), source, role)


def _sources(plan: TensorPlan) -> dict[str, str]:
    sources: dict[str, str] = {}
    for target in plan.targets.values():
        sources.setdefault(target.source, target.role)
    return sources


def checked_values(plan: TensorPlan, store: TensorStore) -> Callable[[str, np.ndarray | None], np.ndarray]:
    """``plan.materialize`` that refuses NaN/Inf in a source and values that overflow their type; it serves
    ``save_model`` both as its ``tensor_values(name)`` and as its ``fill(name, out)``."""
    checked: set[str] = set()

    def values(name: str, out: np.ndarray | None = None) -> np.ndarray:
        target = plan.targets.get(name)
        if target is None:
            return plan.materialize(store, name, out=out)
        flags: list[bool] = []
        with np.errstate(over="ignore", invalid="ignore"):  # an overflow is reported below, with the tensor's name
            result = plan.materialize(store, name, flags, out)
        if flags and all(flags):  # chunked: source and result were checked chunk by chunk, all finite
            checked.add(target.source)
            return result
        if target.source not in checked:
            require_finite(store.array(target.source), target.source, target.role)
            checked.add(target.source)
        found = first_non_finite(result)
        if found is not None:
            kind = type_name(store.tensors[target.source].data_type)
            raise InputError(
                f"initializer '{name}' ({target.role}): rewritten values overflow {kind} (first at index "
                f"{list(found[0])}); the fused norm scales are too large for {kind}: rotate a float32 export"
            )
        return result

    return values


def preflight(
    model: onnx.ModelProto,
    store: TensorStore,
    plan: TensorPlan,
    protobuf_bytes: int,
    *,
    validate: bool,
    embedded: bool = False,
) -> None:
    """All checks that need no weight bytes, then NaN/Inf in the small tensors folded into others."""
    check_plan(model, store, plan)
    hints = "run without --validate, " if validate else ""
    if not embedded and not any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer):
        hints += "save the model with external data so weights are streamed from disk, "
    check_memory(estimate_memory(model, store, plan, protobuf_bytes, validate=validate), hints=hints)
    check_small_sources_finite(store, plan)
