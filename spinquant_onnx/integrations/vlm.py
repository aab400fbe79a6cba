"""Vision-language models: one R1 across the backbone, its embedding table and the visual encoder.

A VLM ships as separate pieces: a text backbone exported with ``inputs_embeds`` (no embedding Gather), a
visual encoder whose merger projection(s) produce the image embeddings, and the token embedding table
(``embedding.pth``). The backbone's residual stream starts at its graph inputs (``Stream.entries``:
``inputs_embeds``, and for Qwen3-VL the deepstack features added after the first text layers), so
whatever produces those values writes into the stream and must be rotated with the same R1:

* offline (an embedding table is given): the table becomes ``E @ R1`` and the visual encoder's output
  projections (the linears whose outputs reach its graph outputs through row-preserving ops only) have
  their output axis and bias rotated, so merged text+image embeddings arrive already rotated;
* online (no table): a ``MatMul(x, R1)`` node is inserted on every entry, and the visual encoder is left
  alone (rotating it too would apply R1 twice).

A backbone that gathers its own embeddings and is also given an external table is refused: the table would
be rotated twice. The backbone itself is planned by the core (``core.pipeline.plan_model``: the passes,
with stream entries left to this module), and every piece goes through the core's pipeline steps.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from spinquant_onnx.core import gate, metadata
from spinquant_onnx.core import preflight as checks
from spinquant_onnx.core.memory import check_load_memory
from spinquant_onnx.core.options import Options
from spinquant_onnx.core.pipeline import (
    Output,
    as_model_proto,
    commit_in_memory,
    model_output,
    plan_model,
    restored_on_failure,
    write_outputs,
)
from spinquant_onnx.core.report import Report
from spinquant_onnx.errors import InputError, SpinQuantError, UnsupportedGraphError, ValidationFailedError
from spinquant_onnx.graph.index import GraphIndex, node_label
from spinquant_onnx.graph.ops import ROW_OPS, TRANSPARENT_OPS
from spinquant_onnx.io.model_file import external_files, load_model, uses_external_data
from spinquant_onnx.io.tensor_store import TensorStore
from spinquant_onnx.io.torch_pickle import load_torch, save_torch
from spinquant_onnx.match.analysis import Analysis, analyze
from spinquant_onnx.match.entry_route import Route, entry_route
from spinquant_onnx.match.linears import Linear, linear_writing
from spinquant_onnx.rewrite.online import OnlineRotation, insert_online_rotation
from spinquant_onnx.rewrite.plan import TensorPlan, rotate, run_ops
from spinquant_onnx.rotation.kinds import Rotation

_SMALL_INT_BYTES = 1 << 16  # int64 initializers up to this size are copied for shape inference


@dataclass
class VisualWriter:
    """A linear of the visual encoder whose output becomes (part of) an image-embedding output."""

    linear: Linear
    outputs: list[str]

    def describe(self) -> dict[str, Any]:
        return {
            "linear": self.linear.label,
            "weight": self.linear.weight,
            "bias": self.linear.bias,
            "outputs": self.outputs,
        }


@dataclass
class VisualPart:
    model: onnx.ModelProto
    store: TensorStore
    index: GraphIndex
    writers: list[VisualWriter] = field(default_factory=list)
    unchanged_outputs: list[str] = field(default_factory=list)
    plan: TensorPlan | None = None


@dataclass
class VlmPlan:
    """Everything decided before any tensor is computed or written."""

    analysis: Analysis
    plan: TensorPlan
    report: Report
    rotation: Rotation
    mode: str  # "offline" (table and visual rotated) | "online" (MatMul on each entry) | "core" (no entries)
    entries: list[str]
    visual: VisualPart | None


@dataclass
class VlmReport:
    """The core report of the backbone plus what was done to the embedding table and the visual encoder."""

    backbone: Report
    mode: str
    entries: list[str]
    embedding: dict[str, Any] | None = None
    visual: dict[str, Any] | None = None
    online_rotations: list[dict[str, str]] = field(default_factory=list)
    outputs: dict[str, str] = field(default_factory=dict)
    validation: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data = self.backbone.to_dict()
        data["vlm"] = {
            "mode": self.mode,
            "entries": self.entries,
            "embedding": self.embedding,
            "visual": self.visual,
            "online_rotations": self.online_rotations,
            "outputs": self.outputs,
            "validation": self.validation,
            "timings_s": self.timings,
        }
        return data


# ------------------------------------------------------------------------------------------- planning


def plan_vlm(
    analysis: Analysis, visual: VisualPart | None, table_shape: tuple[int, ...] | None, opts: Options
) -> VlmPlan:
    """Decide the mode, check the pieces fit together, and plan the backbone (core) and the visual writers."""
    stream = analysis.stream
    if table_shape is not None and stream.embedding is not None:
        raise UnsupportedGraphError(
            f"the backbone gathers its own embeddings from '{stream.embedding.table}' and an external embedding "
            "table was given too: it would be rotated twice; drop the external table, or export the backbone "
            "with inputs_embeds"
        )
    if table_shape is not None and (len(table_shape) != 2 or table_shape[1] != stream.hidden):
        raise InputError(
            f"embedding table has shape {list(table_shape)}; expected [vocab, {stream.hidden}] for this backbone"
        )
    entries = list(dict.fromkeys(stream.entries))
    if visual is not None and not entries:
        raise UnsupportedGraphError(
            "the backbone has no inputs_embeds-style input, so the visual encoder's embeddings cannot enter it; "
            "rotate it alone with `spinquant-onnx rotate`"
        )
    routes = stream_routes(analysis)
    _check_entry_readers(analysis, entries, routes)
    if visual is not None:
        check_pair(analysis, visual, routes)
    # This module rotates the entries itself (the table, or online below); the caller's options stay as given.
    plan, report, ctx = plan_model(analysis, dataclasses.replace(opts, entries="external"))
    rotation = ctx.rotation  # the R1 the core planned with (generated or learned): every piece uses it
    mode = "core" if not entries else ("offline" if table_shape is not None else "online")
    if visual is not None and mode == "offline":
        _plan_visual(visual, rotation, stream.hidden, plan.work)
    return VlmPlan(analysis, plan, report, rotation, mode, entries, visual)


def stream_routes(analysis: Analysis) -> list[Route]:
    """The stream Adds fed by graph inputs after the first norm (Qwen3-VL's deepstack), with their routes."""
    index, stream = analysis.index, analysis.stream
    routes = []
    for node in index.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        # a graph input the stream tracer took in as an entry is still what this Add brings in from outside
        inside = [name in stream.tensors and name not in index.graph_inputs for name in node.input]
        if sum(inside) != 1:
            continue
        route = entry_route(index, node.input[inside.index(False)], node, stream.hidden)
        if route is not None:
            routes.append(route)
    return routes


def check_pair(analysis: Analysis, visual: VisualPart, routes: list[Route]) -> None:
    """Refuse a visual encoder from another model: its hidden-width outputs are the merged image embeddings
    plus one per deepstack layer, and the backbone adds exactly that many deepstack features into its stream."""
    hidden = analysis.stream.hidden
    wide = []
    for output in visual.index.graph.output:
        shape = visual.index.static_shape(output.name)
        if shape and shape[-1] == hidden:
            wide.append(output.name)
    if not wide:
        widths = sorted({str((visual.index.static_shape(o.name) or [None])[-1]) for o in visual.index.graph.output})
        raise UnsupportedGraphError(
            f"the visual encoder has no output of width {hidden} (the backbone's hidden size; its outputs have "
            f"width {', '.join(widths)}): these pieces are not from the same model"
        )
    if len(wide) - 1 != len(routes):
        raise UnsupportedGraphError(
            f"the visual encoder has {len(wide)} output(s) of width {hidden} ({', '.join(wide)}), i.e. "
            f"{len(wide) - 1} deepstack feature(s), but the backbone adds {len(routes)} deepstack input(s) into "
            "its residual stream: these pieces are not from the same model (e.g. a Qwen3-VL backbone with a "
            "Qwen2.5-VL encoder)"
        )


def _check_entry_readers(analysis: Analysis, entries: list[str], routes: list[Route]) -> None:
    """Each entry may only be read by the stream (a norm or a residual Add) or its routing: anything else
    would see R1."""
    index, stream = analysis.index, analysis.stream
    norm_nodes = {id(node) for event in stream.norms for node in event.norm.nodes}
    route_nodes = {id(node) for route in routes for node in route.nodes}
    for entry in entries:
        for use in index.value_users(entry):
            if id(use.node) in norm_nodes | route_nodes or any(out in stream.tensors for out in use.node.output):
                continue
            raise UnsupportedGraphError(
                f"backbone input '{entry}' feeds the residual stream and is also read by node "
                f"{node_label(use.node)}, which would see the rotated values"
            )


def _plan_visual(visual: VisualPart, rotation: Rotation, hidden: int, work: type) -> None:
    visual.writers, visual.unchanged_outputs = find_visual_writers(visual.index, hidden)
    plan = TensorPlan(work=work)
    for writer in visual.writers:
        linear = writer.linear
        plan.add(linear.weight, linear.weight_use, [rotate(linear.out_axis, rotation, "R1")], "visual writer")
        if linear.bias is not None:
            plan.add(linear.bias, linear.bias_use, [rotate(linear.bias_axis, rotation, "R1")], "visual writer bias")
    plan.finalize(visual.index)
    visual.plan = plan


# ------------------------------------------------------------------------------------ visual writers


def find_visual_writers(index: GraphIndex, hidden: int) -> tuple[list[VisualWriter], list[str]]:
    """The linears producing the visual outputs of width ``hidden``, and the outputs left unchanged.

    Each such output must come from linear layers through row-moving ops only, and those linears' outputs
    must reach nothing but such outputs; otherwise rotating them would change something else, and the
    encoder is refused.
    """
    ranks = _Ranks(index)
    writers: dict[int, VisualWriter] = {}
    path: set[int] = set()
    unchanged: list[str] = []
    for output in index.graph.output:
        shape = index.static_shape(output.name)
        if shape and shape[-1] is not None and shape[-1] != hidden:
            unchanged.append(output.name)
            continue
        _walk_to_writers(index, output.name, hidden, ranks, writers, path)
    if not writers:
        raise UnsupportedGraphError(f"no visual encoder output of width {hidden} (the backbone's hidden size)")
    for writer in writers.values():
        _check_closed(index, writer, path)
    return list(writers.values()), unchanged


def _walk_to_writers(
    index: GraphIndex,
    output: str,
    hidden: int,
    ranks: _Ranks,
    writers: dict[int, VisualWriter],
    path: set[int],
) -> None:
    stack = [output]
    while stack:
        name = stack.pop()
        linear = linear_writing(index, name)
        if linear is not None:
            if linear.out_features != hidden:
                raise UnsupportedGraphError(
                    f"visual linear {linear.label} writes {linear.out_features} features into output '{output}'; "
                    f"the backbone's residual stream has {hidden}"
                )
            found = writers.setdefault(id(linear.node), VisualWriter(linear, []))
            if output not in found.outputs:
                found.outputs.append(output)
            continue
        node = index.producer.get(name)
        if node is None:
            what = "initializer" if index.is_initializer(name) else "graph input"
            raise UnsupportedGraphError(
                f"visual output '{output}' takes values from {what} '{name}' without a linear layer in between; "
                "it cannot be rotated exactly"
            )
        if node.op_type not in TRANSPARENT_OPS and not _moves_rows(index, node, hidden, ranks):
            raise UnsupportedGraphError(
                f"visual output '{output}' comes through node {node_label(node)}, which is neither a linear layer "
                "nor an op that keeps the hidden axis whole, so R1 cannot be absorbed before it"
            )
        path.add(id(node))
        stack.extend(node.input if node.op_type == "Concat" else node.input[:1])


def _moves_rows(index: GraphIndex, node: onnx.NodeProto, hidden: int, ranks: _Ranks) -> bool:
    """True when ``node`` only selects, stacks or reshapes rows, leaving the last (hidden) axis intact."""
    op = node.op_type
    if op not in ROW_OPS:
        return False
    if op == "Reshape":
        shape = index.constant(node.input[1])
        return shape is not None and shape.size > 0 and int(shape.reshape(-1)[-1]) == hidden
    if op == "Transpose":
        perm = index.attr(node, "perm")
        return perm is not None and perm[-1] == len(perm) - 1
    if op == "Gather":
        rank = ranks.get(node.input[0])
        return rank is not None and index.attr(node, "axis", 0) % rank != rank - 1
    if op == "Concat":
        rank = ranks.get(node.output[0])
        return rank is not None and index.attr(node, "axis") % rank != rank - 1
    axes = index.attr(node, "axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        value = index.constant(node.input[1])
        axes = None if value is None else [int(a) for a in value.reshape(-1)]
    rank = ranks.get(node.output[0] if op == "Unsqueeze" else node.input[0])
    return axes is not None and rank is not None and all(a % rank != rank - 1 for a in axes)


def _check_closed(index: GraphIndex, writer: VisualWriter, path: set[int]) -> None:
    """The writer's output may flow only along the checked path to the outputs: nothing else may read it."""
    frontier, seen = [writer.linear.output], set()
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        for use in index.value_users(name):
            data_slot = use.index == 0 or use.node.op_type == "Concat"
            if id(use.node) in path and data_slot:
                frontier.extend(use.node.output[:1])
                continue
            raise UnsupportedGraphError(
                f"visual linear {writer.linear.label} feeds output(s) {writer.outputs} and is also read by node "
                f"{node_label(use.node)}; rotating its output would change that reader"
            )


class _Ranks:
    """Tensor ranks from ONNX shape inference on a weightless copy of the graph (computed on first use)."""

    def __init__(self, index: GraphIndex) -> None:
        self.index = index
        self.ranks: dict[str, int] | None = None

    def get(self, name: str) -> int | None:
        if self.ranks is None:
            self.ranks = _infer_ranks(self.index)
        return self.ranks.get(name)


def _infer_ranks(index: GraphIndex) -> dict[str, int]:
    model = index.model
    graph = helper.make_graph(list(model.graph.node), "ranks", list(index.graph_inputs.values()), model.graph.output)
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.INT64 and index.store.nbytes(tensor.name) <= _SMALL_INT_BYTES:
            graph.initializer.append(numpy_helper.from_array(np.asarray(index.store.array(tensor.name)), tensor.name))
        else:
            graph.input.append(helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims)))
    skeleton = helper.make_model(graph, opset_imports=list(model.opset_import), ir_version=model.ir_version)
    skeleton.functions.extend(model.functions)
    try:
        skeleton = onnx.shape_inference.infer_shapes(skeleton)
    except Exception:  # noqa: BLE001 - inference is best effort; unknown ranks make _moves_rows refuse
        pass
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    for info in chain(skeleton.graph.value_info, skeleton.graph.input, skeleton.graph.output):
        if info.type.tensor_type.HasField("shape"):
            ranks.setdefault(info.name, len(info.type.tensor_type.shape.dim))
    return ranks


# ----------------------------------------------------------------------------------------- embedding


class _Table:
    """The embedding table the caller passed: a numpy array or a torch tensor, rewritten in place."""

    def __init__(self, value: Any) -> None:
        self.value = value
        self.is_torch = type(value).__module__.startswith("torch")
        if not self.is_torch and not isinstance(value, np.ndarray):
            raise InputError(
                f"embedding must be a numpy array or a torch tensor, got {type(value).__name__}; "
                "for files use spinquant_onnx.integrations.vlm.convert_vlm"
            )
        if not self.is_torch and not value.flags.writeable:
            raise InputError("embedding array is read-only; pass a writable copy (it is rotated in place)")

    def read(self) -> np.ndarray:
        if not self.is_torch:
            return self.value
        torch = sys.modules["torch"]
        tensor = self.value.detach().cpu()
        if tensor.dtype == torch.bfloat16:
            return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return tensor.numpy()

    def write(self, values: np.ndarray) -> None:
        if not self.is_torch:
            self.value[...] = values
            return
        torch = sys.modules["torch"]
        if values.dtype == np.dtype(ml_dtypes.bfloat16):
            source = torch.from_numpy(values.view(np.int16)).view(torch.bfloat16)
        else:
            source = torch.from_numpy(np.ascontiguousarray(values))
        with torch.no_grad():
            self.value.copy_(source.to(self.value.device))


def rotate_table(table: np.ndarray, rotation: Rotation, work: type = np.float64) -> np.ndarray:
    """``E @ R1`` row by row (chunked), in ``work`` precision, cast back to the table's dtype."""
    result = run_ops(np.asarray(table), (rotate(1, rotation, "R1"),), table.dtype, work)
    checks.require_finite(result, "embedding", "embedding table")
    return result


def _single_table(value: np.ndarray | dict[str, np.ndarray], path: Path) -> tuple[str | None, np.ndarray]:
    """The one 2-D float tensor of an embedding file (a tensor, or a dict holding exactly one)."""
    if isinstance(value, np.ndarray):
        candidates = [(None, value)]
    else:
        candidates = [(k, v) for k, v in value.items() if v.ndim == 2]
    if len(candidates) != 1:
        raise InputError(
            f"{path}: expected one [vocab, hidden] tensor, found {len(candidates)} 2-D tensors "
            f"({', '.join(str(k) for k, _ in candidates[:4])})"
        )
    key, table = candidates[0]
    _check_float(table, str(path))
    return key, table


def _check_float(table: np.ndarray, where: str) -> None:
    if table.dtype.kind != "f" and table.dtype != np.dtype(ml_dtypes.bfloat16):
        raise InputError(f"{where}: embedding table has dtype {table.dtype}; expected a float type")


# ------------------------------------------------------------------------------------------- entries


def apply_vlm(backbone: Any, visual: Any = None, embedding: Any = None, **options: Any) -> VlmReport:
    """Rotate a VLM in memory: the backbone (ModelProto or QuantizationSimModel) and, consistently, the
    visual encoder and the embedding table (numpy array or torch tensor), all in place.

    Nothing is changed unless every step succeeds: all new tensors are computed before any is written.
    """
    opts = Options(**options)
    if opts.validate:
        raise SpinQuantError("validate=True needs the original models; use convert_vlm() (rotate-vlm --validate)")
    started = time.perf_counter()
    proto = as_model_proto(backbone)
    visual_proto = as_model_proto(visual) if visual is not None else None
    for which, model in (("backbone", proto), ("visual", visual_proto)):
        if model is not None and uses_external_data(model):
            raise InputError(
                f"{which} model has external data that is not loaded; load it with onnx.load(path) first "
                "or use spinquant_onnx.integrations.vlm.convert_vlm"
            )
    table = _Table(embedding) if embedding is not None else None
    original = table.read() if table is not None else None
    if original is not None:
        _check_float(original, "embedding")
    metadata.refuse_rotated(proto, "backbone", opts.force)  # #13: never rotate a rotated model silently
    baseline = gate.input_baseline(proto)  # the inputs' structure, for the output gate
    visual_baseline = gate.input_baseline(visual_proto) if visual_proto is not None else None
    with restored_on_failure(proto.graph):
        analysis = analyze(proto, roles=opts.roles)
        part = _visual_part(visual_proto) if visual_proto is not None else None
        vp = plan_vlm(analysis, part, original.shape if original is not None else None, opts)
        online = _insert_online(vp) if vp.mode == "online" else []
        gate.check_output(proto, baseline)
        if part is not None and visual_baseline is not None:
            gate.check_output(part.model, visual_baseline)
        backbone_values = {name: vp.plan.materialize(analysis.store, name) for name in vp.plan.targets}
        visual_values = _visual_values(vp)
        rotated_table = rotate_table(original, vp.rotation, vp.plan.work) if vp.mode == "offline" else None

    commit_in_memory(analysis.store, backbone_values)  # every value computed above: now the one commit
    if part is not None:
        commit_in_memory(part.store, visual_values)
    if rotated_table is not None:
        table.write(rotated_table)
    for target in (backbone, visual):
        rebuild = getattr(target, "_rebuild_session", None)
        if callable(rebuild):
            rebuild()  # an AIMET sim built its ORT session from the old weights
    report = _report(vp, original, online)
    metadata.stamp(proto, report.backbone.to_dict())  # #13: record what was done in metadata_props
    report.timings["total"] = round(time.perf_counter() - started, 4)
    return report


def _visual_part(model: onnx.ModelProto, base_dir: Path | None = None) -> VisualPart:
    store = TensorStore(model, base_dir)
    return VisualPart(model, store, GraphIndex(model, store))


def _visual_values(vp: VlmPlan) -> dict[str, np.ndarray]:
    part = vp.visual
    if part is None or part.plan is None:
        return {}
    return {name: part.plan.materialize(part.store, name) for name in part.plan.targets}


def _insert_online(vp: VlmPlan) -> list[OnlineRotation]:
    index = vp.analysis.index
    inserted = []
    for entry in vp.entries:
        elem_type = index.graph_inputs[entry].type.tensor_type.elem_type
        inserted.append(
            insert_online_rotation(
                index,
                entry,
                vp.rotation,
                transpose=False,
                elem_type=elem_type,
                reason="R1 on a residual-stream input (no embedding table given)",
            )
        )
    return inserted


def _report(vp: VlmPlan, table: np.ndarray | None, online: list[OnlineRotation]) -> VlmReport:
    report = VlmReport(backbone=vp.report, mode=vp.mode, entries=vp.entries)
    report.online_rotations = [o.describe() for o in online]
    if table is not None:
        report.embedding = {
            "shape": list(table.shape),
            "dtype": str(table.dtype),
            "rotated": vp.mode == "offline",
        }
    if vp.visual is not None:
        rotated = vp.visual.plan is not None
        report.visual = {
            "rotated": rotated,
            "writers": [w.describe() for w in vp.visual.writers],
            "unchanged_outputs": vp.visual.unchanged_outputs,
            "note": None if rotated else "left unchanged: R1 is applied online on the backbone's inputs",
        }
    return report


# ------------------------------------------------------------------------------------------ files


def convert_vlm(
    backbone_path: str | os.PathLike,
    visual_path: str | os.PathLike | None,
    embedding_path: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    visual_feeds: Mapping[str, np.ndarray] | str | os.PathLike | None = None,
    **options: Any,
) -> VlmReport:
    """Rotate the pieces of a VLM from files into ``out_dir`` (same file names), atomically.

    ``visual_feeds`` (a mapping or an .npz path) are inputs for the visual encoder used by ``validate``;
    without them its inputs are synthesized when all are float with static shapes, else its check is skipped.
    """
    opts = Options(**options)
    started = time.perf_counter()
    paths = _Paths(backbone_path, visual_path, embedding_path, out_dir)
    check_load_memory(paths.backbone)
    model = load_model(paths.backbone)
    metadata.refuse_rotated(model, str(paths.backbone), opts.force)  # #13: never rotate a rotated model silently
    baseline = gate.input_baseline(model)  # the inputs' structure, for the output gate
    analysis = analyze(model, paths.backbone.parent, roles=opts.roles)
    part = None
    if paths.visual is not None:
        check_load_memory(paths.visual)
        part = _visual_part(load_model(paths.visual), paths.visual.parent)
        visual_baseline = gate.input_baseline(part.model)
    key, table, contents = None, None, None
    if paths.embedding is not None:
        contents = load_torch(paths.embedding)
        key, table = _single_table(contents, paths.embedding)
    vp = plan_vlm(analysis, part, table.shape if table is not None else None, opts)
    checks.preflight(model, analysis.store, vp.plan, paths.backbone.stat().st_size, validate=opts.validate)
    if part is not None and part.plan is not None:
        checks.preflight(part.model, part.store, part.plan, paths.visual.stat().st_size, validate=opts.validate)
    feeds = _load_feeds(visual_feeds)
    if opts.validate and part is not None and part.plan is not None:
        feeds = visual_check_inputs(part, feeds)
    online = _insert_online(vp) if vp.mode == "online" else []
    report = _report(vp, table, online)
    metadata.stamp(model, report.backbone.to_dict())  # #13: record what was done in metadata_props
    report.timings["plan"] = round(time.perf_counter() - started, 4)

    outputs = [model_output(model, analysis.store, vp.plan, paths.out(paths.backbone), baseline)]
    if part is not None:
        outputs.append(
            model_output(part.model, part.store, part.plan or TensorPlan(), paths.out(paths.visual), visual_baseline)
        )
    if table is not None:
        values = rotate_table(table, vp.rotation, vp.plan.work) if vp.mode == "offline" else table
        written = values if key is None else {**contents, key: values}  # other entries kept as they were
        name = paths.embedding.name
        outputs.append(Output(paths.out(paths.embedding), lambda staging: [save_torch(staging / name, written)]))

    def validate(staged: dict[Path, list[Path]]) -> None:
        report.timings["rotate_and_write"] = round(time.perf_counter() - started - report.timings["plan"], 4)
        if opts.validate:
            mark = time.perf_counter()
            pieces = [(files, o.path) for o in outputs if o.model is not None for files in [staged[o.path]]]
            report.validation = validate_vlm(paths, pieces, vp, feeds, opts)
            report.timings["validate"] = round(time.perf_counter() - mark, 4)

    write_outputs(outputs, protect=paths.inputs, validate=validate)  # staged together, committed together
    report.outputs = {"backbone": str(paths.out(paths.backbone))}
    if paths.visual is not None:
        report.outputs["visual"] = str(paths.out(paths.visual))
    if paths.embedding is not None:
        report.outputs["embedding"] = str(paths.out(paths.embedding))
    report.backbone.input, report.backbone.output = str(paths.backbone), report.outputs["backbone"]
    report.timings["total"] = round(time.perf_counter() - started, 4)
    return report


class _Paths:
    """Inputs and their places in ``out_dir``; refuses outputs that would overwrite an input."""

    def __init__(self, backbone: Any, visual: Any, embedding: Any, out_dir: Any) -> None:
        self.backbone = Path(backbone)
        self.visual = Path(visual) if visual is not None else None
        self.embedding = Path(embedding) if embedding is not None else None
        self.out_dir = Path(out_dir)
        given = [p for p in (self.backbone, self.visual, self.embedding) if p is not None]
        for path in given:
            if not path.is_file():
                raise InputError(f"{path}: no such file")
        names = [p.name for p in given]
        if len(set(names)) != len(names):
            raise InputError(f"the pieces must have distinct file names to share {self.out_dir}: {names}")
        if self.out_dir.exists() and not self.out_dir.is_dir():
            raise InputError(f"{self.out_dir}: --out-dir is an existing file")
        self.inputs = {p.resolve() for p in given}
        for path in (self.backbone, self.visual):
            if path is not None:
                self.inputs |= external_files(load_model(path), path.parent)
        for path in given:
            target = self.out(path).resolve()
            if target in self.inputs:
                raise InputError(f"{self.out(path)}: output would overwrite an input; choose another --out-dir")

    def out(self, path: Path) -> Path:
        return self.out_dir / path.name


# ------------------------------------------------------------------------------------------ validation


def _load_feeds(feeds: Mapping[str, np.ndarray] | str | os.PathLike | None) -> dict[str, np.ndarray] | None:
    if feeds is None or isinstance(feeds, Mapping):
        return dict(feeds) if feeds is not None else None
    try:
        with np.load(Path(feeds), allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise InputError(f"{feeds}: cannot read visual inputs ({exc})") from exc


def validate_vlm(
    paths: _Paths,
    staged: list[tuple[list[Path], Path]],
    vp: VlmPlan,
    visual_feeds: dict[str, np.ndarray] | None,
    opts: Options,
) -> dict[str, Any]:
    """Check each rotated piece against its original, feeding the rotated backbone rotated entry values.

    backbone(x) == backbone'(x R) (offline) or backbone'(x) (online); visual'(p) == visual(p) R; E' == E R.
    Together these are the end-to-end identity image -> visual -> merge -> backbone.
    """
    from spinquant_onnx.core.equivalence import argmax_agreement, run_model, synthesize_inputs

    rotated = {out_path: files[0] for files, out_path in staged}
    graph = load_model(paths.backbone)
    feeds = synthesize_inputs(graph, batch=1, seq=8)
    rotated_feeds = dict(feeds)
    if vp.mode == "offline":
        for entry in vp.entries:
            rotated_feeds[entry] = vp.rotation.apply(feeds[entry], -1).astype(feeds[entry].dtype)
    expected, provider = run_model(paths.backbone, feeds, opts.providers)
    actual, _ = run_model(rotated[paths.out(paths.backbone)], rotated_feeds, opts.providers)
    name = "logits" if "logits" in expected else next(iter(expected))
    result: dict[str, Any] = {"provider": provider, "threshold": opts.threshold}
    result["backbone"] = {
        "rel_l2": _rel_l2(expected[name], actual[name]),
        "argmax_agreement": argmax_agreement(expected[name], actual[name]),
    }
    passed = result["backbone"]["rel_l2"] <= opts.threshold and result["backbone"]["argmax_agreement"] == 1.0
    if paths.visual is not None and vp.visual is not None and vp.visual.plan is not None:
        feeds = visual_check_inputs(vp.visual, visual_feeds)
        result["visual"] = _validate_visual(paths.visual, rotated[paths.out(paths.visual)], vp, feeds, opts)
        passed &= result["visual"]["rel_l2"] <= opts.threshold
    elif paths.visual is not None:
        result["visual"] = {"checked": False, "why": "not rotated (R1 is applied online on the backbone's inputs): "
                            "its weights are written unchanged, so there is nothing to compare"}
    result["passed"] = bool(passed)
    if not passed:
        raise ValidationFailedError(f"validation failed: {result}; no output written")
    return result


def _validate_visual(
    original: Path, rotated: Path, vp: VlmPlan, feeds: dict[str, np.ndarray] | None, opts: Options
) -> dict[str, Any]:
    from spinquant_onnx.core.equivalence import run_model

    inputs = {name: {"shape": list(v.shape), **({"values": v.tolist()} if v.dtype.kind == "i" else {})}
              for name, v in feeds.items()}
    expected, _ = run_model(original, feeds, opts.providers)
    actual, _ = run_model(rotated, feeds, opts.providers)
    rotated_outputs = {o for w in vp.visual.writers for o in w.outputs}
    worst = 0.0
    for name, value in expected.items():
        reference = vp.rotation.apply(value, -1) if name in rotated_outputs else value
        worst = max(worst, _rel_l2(reference, actual[name]))
    return {"rel_l2": worst, "outputs_rotated": sorted(rotated_outputs), "inputs": inputs}


def _synthesize_visual(model: onnx.ModelProto) -> tuple[dict[str, np.ndarray] | None, str]:
    """Random float inputs of static shape, and Qwen-VL's ``grid_thw`` made consistent with them; else why not."""
    initializers = {t.name for t in model.graph.initializer}
    rng = np.random.default_rng(0)
    feeds: dict[str, np.ndarray] = {}
    grids = []
    for info in model.graph.input:
        if info.name in initializers:
            continue
        tensor_type = info.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
        if None in dims:
            return None, f"input '{info.name}' has a dynamic shape {dims}"
        if tensor_type.elem_type in (TensorProto.FLOAT, TensorProto.FLOAT16):
            feeds[info.name] = rng.standard_normal(dims).astype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        elif "grid" in info.name.lower() and len(dims) == 2 and dims[1] == 3:
            grids.append((info, dims))
        else:
            return None, f"input '{info.name}' is neither a float tensor nor a [images, 3] grid_thw"
    for info, dims in grids:
        grid = _grid_for(feeds, dims[0])
        if grid is None:
            return None, f"no grid_thw for {dims[0]} image(s) matches the pixel input's rows"
        feeds[info.name] = grid.astype(helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type))
    return feeds, ""


def _grid_for(feeds: dict[str, np.ndarray], images: int) -> np.ndarray | None:
    """``[[1, h, w]] * images`` with ``h * w`` the patch rows per image (h, w even: the 2x2 patch merger)."""
    pixels = [v for v in feeds.values() if v.ndim == 2]
    if len(pixels) != 1 or images < 1 or pixels[0].shape[0] % images:
        return None
    rows = pixels[0].shape[0] // images
    sides = [h for h in range(2, int(np.sqrt(rows)) + 1, 2) if rows % h == 0 and (rows // h) % 2 == 0]
    if not sides:
        return None
    return np.array([[1, sides[-1], rows // sides[-1]]] * images, dtype=np.int64)


def visual_check_inputs(part: VisualPart, feeds: dict[str, np.ndarray] | None) -> dict[str, np.ndarray]:
    """The inputs the visual encoder's check will run on; refuses (before any work) when there are none, so a
    check the user asked for never silently does not run."""
    if feeds is not None:
        return feeds
    synthesized, reason = _synthesize_visual(part.model)
    if synthesized is None:
        raise InputError(
            f"--validate cannot check the rotated visual encoder: {reason}; pass its inputs with "
            "--visual-inputs FEEDS.npz (arrays named as the encoder's inputs), or drop --validate"
        )
    return synthesized


def _rel_l2(expected: np.ndarray, actual: np.ndarray) -> float:
    a, b = np.asarray(expected, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if a.shape != b.shape:
        return float("inf")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), np.finfo(np.float64).tiny))
