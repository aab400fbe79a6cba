"""Python entry points: ``convert`` (file to file), ``apply_spinquant`` (a model in memory), ``analyze``."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from spinquant_onnx import checks
from spinquant_onnx.core import gate, metadata
from spinquant_onnx.errors import (
    InputError,
    SpinQuantError,
    UnsupportedGraphError,
    UnsupportedSizeError,
    ValidationFailedError,
)
from spinquant_onnx.graph_index import GraphIndex
from spinquant_onnx.graph_io import (
    TensorStore,
    commit_output,
    discard_output,
    external_files,
    load_model,
    output_data_name,
    save_model,
    set_tensor_data,
    staging_dir,
    uses_external_data,
)
from spinquant_onnx.match.heads import attention_sites
from spinquant_onnx.match.residual import Stream, trace_stream
from spinquant_onnx.match.role_map import import_roles
from spinquant_onnx.match.roles import Roles, assign_roles
from spinquant_onnx.rewrite.fuse_norms import plan_norm_fusion
from spinquant_onnx.rewrite.plan import TensorPlan
from spinquant_onnx.rewrite.rotate_r1 import insert_online_entries, insert_online_writes, plan_r1
from spinquant_onnx.rewrite.rotate_r2 import plan_r2
from spinquant_onnx.rewrite.rotate_r3 import insert_r3, prepare_r3
from spinquant_onnx.rewrite.rotate_r4 import insert_r4, prepare_r4
from spinquant_onnx.rotation_file import LearnedRotations, load_rotation_file
from spinquant_onnx.rotations import KINDS, Rotation, make_rotation

PRECISIONS = {"float64": np.float64, "float32": np.float32}


@dataclass
class Options:
    """What to do. Defaults are what a user who asked for nothing in particular should get."""

    rotation: str = "hadamard"
    seed: int = 0
    block_size: int | None = None
    validate: bool = False
    providers: list[str] | None = None
    threshold: float = 1e-4
    in_place: bool = False
    roles: Any = None
    trust_roles: bool = False
    precision: str = "float64"
    # Stream entries that are graph inputs (inputs_embeds): rotate them "online" (a MatMul node), or leave
    # them to the caller, who rotates what feeds them ("external": the VLM path rotates the table itself).
    entries: str = "online"
    r2: bool = False
    r3: bool = False
    r4: bool = False
    rotation_file: str | os.PathLike | None = None
    force: bool = False  # rotate a model this tool already rotated (#13: refused by default)

    def __post_init__(self) -> None:
        if self.rotation not in KINDS:
            raise SpinQuantError(f"unknown rotation '{self.rotation}': choose one of {', '.join(KINDS)}")
        if self.precision not in PRECISIONS:
            raise SpinQuantError(f"unknown precision '{self.precision}': choose float64 or float32")


@dataclass
class Analysis:
    """What the matcher found in a model."""

    model: onnx.ModelProto
    store: TensorStore
    index: GraphIndex
    stream: Stream
    roles: Roles


@dataclass
class Report:
    """What a run did, in a form that serializes to the JSON report."""

    input: str | None
    output: str | None
    hidden: int
    rotation: dict[str, Any]
    norms_fused: int
    weights_rotated: int
    tensors_rewritten: list[dict[str, str]]
    blocks: int
    validation: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    online_rotations: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": "spinquant-onnx",
            "input": self.input,
            "output": self.output,
            "hidden_size": self.hidden,
            "rotation": self.rotation,
            "blocks": self.blocks,
            "norms_fused": self.norms_fused,
            "weight_uses_rotated": self.weights_rotated,
            "tensors_rewritten": self.tensors_rewritten,
            "online_rotations": self.online_rotations,
            "validation": self.validation,
            "timings_s": self.timings,
        }


def analyze(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None, roles: Any = None) -> Analysis:
    """Run the matcher: the residual stream, its norms, readers and writers, and each weight's role.

    ``roles`` (a role-map dict or JSON path, see ``inspect --json``) replaces matching with a checked map.
    """
    store = TensorStore(model, base_dir)
    index = GraphIndex(model, store)
    if roles is not None:
        stream, found = import_roles(index, roles)
        return Analysis(model, store, index, stream, found)
    stream = trace_stream(index)
    return Analysis(model, store, index, stream, assign_roles(index, stream))


def _plan(analysis: Analysis, options: Options) -> tuple[TensorPlan, Report]:
    learned = load_rotation_file(options.rotation_file) if options.rotation_file is not None else None
    if learned is not None and learned.r1 is not None:
        rotation = learned.r1_for(analysis.stream.hidden)
    else:
        rotation = make_rotation(options.rotation, analysis.stream.hidden, options.seed, options.block_size)
    plan = TensorPlan(work=PRECISIONS[options.precision])
    fused = plan_norm_fusion(analysis.stream, analysis.store, plan)
    rotated = plan_r1(analysis.stream, rotation, plan)
    online = insert_online_writes(analysis.index, analysis.stream, rotation)
    if options.entries == "online":
        online += insert_online_entries(analysis.index, analysis.stream, rotation)
    extra = plan_r2_r3_r4(analysis.index, analysis.roles, plan, options, learned)
    plan.finalize(analysis.index)
    rewritten = [
        {
            "tensor": t.name,
            "source": t.source,
            "role": t.role,
            "ops": " then ".join(
                f"{op.kind}(axis {op.axis})" if op.kind != "fill" else f"fill({op.value:g})" for op in t.ops
            ),
        }
        for t in plan.targets.values()
    ]
    report = Report(
        input=None,
        output=None,
        hidden=analysis.stream.hidden,
        rotation={**rotation.describe(), "precision": options.precision},
        norms_fused=fused,
        weights_rotated=rotated,
        tensors_rewritten=rewritten,
        blocks=len(analysis.roles.blocks),
        online_rotations=[o.describe() for o in online] + extra.pop("online"),
    )
    report.rotation.update(extra)
    return plan, report


def plan_r2_r3_r4(
    index: GraphIndex, roles: Roles, plan: TensorPlan, options: Options, learned: LearnedRotations | None
) -> dict[str, Any]:
    """R2 (weights), R3 and R4 (online nodes) as asked; what was done, for the report."""
    done: dict[str, Any] = {"online": []}
    use_r2 = options.r2 or (learned is not None and learned.has_r2)
    if not (use_r2 or options.r3 or options.r4):
        return done
    sites = attention_sites(index, roles) if use_r2 or options.r3 else []
    if (use_r2 or options.r3) and not sites:  # #13: a requested rotation that finds nothing is refused
        asked = " and ".join(name for name, on in (("--r2", use_r2), ("--r3", options.r3)) if on)
        raise UnsupportedGraphError(
            f"{asked}: no attention block with its q/k/v and o projections was found in the "
            f"{len(roles.blocks)} matched block(s), so there is nothing to rotate; drop {asked}"
        )
    if use_r2:
        if learned is not None and learned.has_r2:
            learned.check_layers([site.block for site in sites])
            rotation_for = learned.r2_for
        else:
            rotation_for = functools.partial(_generated_r2, options)
        done["r2"] = plan_r2(index, sites, rotation_for, plan)
    r3 = prepare_r3(index, sites) if options.r3 else None  # every check before the first node goes in
    r4 = prepare_r4(roles) if options.r4 else None
    if r3 is not None:
        done["r3"] = insert_r3(index, r3)
        done["online"] += [entry[side] for entry in done["r3"] for side in ("queries", "keys")]
    if r4 is not None:
        done["r4"] = insert_r4(index, r4, plan)
        done["online"] += done["r4"]
    if learned is not None:
        done["rotation_file"] = learned.describe()
    return done


def _generated_r2(options: Options, block: int, head_dim: int) -> Rotation:
    try:
        return make_rotation(options.rotation, head_dim, options.seed)
    except UnsupportedSizeError as exc:
        raise UnsupportedSizeError(f"R2 (order head_dim = {head_dim}): {exc}") from None


def input_dim_hints(analysis: Analysis) -> dict[str, int]:
    """Sizes of symbolic KV-cache dims that their names do not explain (genai's ``kv_cache_dim``).

    The head size comes from the matched attention geometry; a model where none is found needs no hint.
    """
    try:
        sites = attention_sites(analysis.index, analysis.roles)
    except SpinQuantError:
        return {}
    if not sites:
        return {}
    hints = {}
    for name, info in analysis.index.graph_inputs.items():
        dims = info.type.tensor_type.shape.dim
        if "past" in name and len(dims) == 4 and dims[3].dim_param:
            hints[dims[3].dim_param] = sites[0].geometry.head_dim
    return hints


def _as_model_proto(target: Any) -> onnx.ModelProto:
    """A ModelProto, or an object carrying one as AIMET's QuantizationSimModel does (``.model.model``)."""
    if isinstance(target, onnx.ModelProto):
        return target
    inner = getattr(getattr(target, "model", None), "model", None)
    if isinstance(inner, onnx.ModelProto):
        return inner
    raise SpinQuantError(
        f"apply_spinquant expects an onnx.ModelProto or a QuantizationSimModel, got {type(target).__name__}"
    )


def apply_spinquant(
    model: Any, visual: Any = None, embedding: Any = None, *, visual_sim: Any = None, **options: Any
) -> Report:
    """Rewrite ``model`` (an ``onnx.ModelProto`` with its weights loaded) in place; returns the report.

    With ``visual`` (the VLM's visual encoder) or ``embedding`` (its [vocab, hidden] table, numpy or
    torch), all pieces are rotated consistently by ``vlm.apply_vlm``, which returns a ``vlm.VlmReport``.

    Nothing is changed unless every step succeeds: the plan is computed first, every new tensor is
    computed next, and only then are the initializers overwritten. ``model`` may also be an AIMET
    ``QuantizationSimModel`` (anything with a ModelProto at ``.model.model``): see ``quantsim.apply_to_sim``
    for what is checked, ``reset_encodings=True``, and the session rebuild.
    """
    if visual_sim is not None:  # AIMET's spelling of the same argument
        if visual is not None:
            raise SpinQuantError("pass the visual encoder once: visual= or visual_sim=, not both")
        visual = visual_sim
    if visual is not None or embedding is not None:
        from spinquant_onnx.vlm import apply_vlm

        return apply_vlm(model, visual=visual, embedding=embedding, **options)
    from spinquant_onnx.quantsim import apply_to_sim, is_quantsim

    if is_quantsim(model):
        return apply_to_sim(model, apply_spinquant, **options)
    opts = Options(**options)
    if opts.validate:
        raise SpinQuantError("validate=True needs the original model; use convert() or validate.compare_models")
    proto = _as_model_proto(model)
    if opts.roles is not None and not opts.trust_roles:
        raise SpinQuantError(
            "a role map in memory cannot be validated here; use convert(..., roles=...) or pass trust_roles=True"
        )
    if uses_external_data(proto):
        raise InputError(
            "model has external data that is not loaded; load it with onnx.load(path) first "
            "or use spinquant_onnx.convert(in_path, out_path)"
        )
    metadata.refuse_rotated(proto, "model", opts.force)  # #13 hook: never rotate a rotated model silently
    started = time.perf_counter()
    graph = proto.graph
    # Planning edits nodes (untied copies, online rotations): keep the node list to restore on any failure.
    # Initializer values are only overwritten after every new value has been computed and checked.
    originals = list(graph.node)
    saved_nodes = [onnx.NodeProto.FromString(node.SerializeToString()) for node in originals]
    initializer_count = len(graph.initializer)
    baseline = gate.input_baseline(proto)  # #13 hook: the input's structure, for the output gate
    try:
        analysis = analyze(proto, roles=opts.roles)
        plan, report = _plan(analysis, opts)
        checks.check_plan(proto, analysis.store, plan)
        checks.check_small_sources_finite(analysis.store, plan)
        compute = checks.checked_values(plan, analysis.store)
        values = {name: compute(name) for name in plan.targets}
        gate.check_output(proto, baseline)  # #13 hook: structural output gate before anything is committed
    except BaseException:
        # Drop inserted nodes and restore the original ones *in place*: holders such as an AIMET sim keep
        # references to these node objects.
        kept = {id(node) for node in originals}
        for position in reversed(range(len(graph.node))):
            if id(graph.node[position]) not in kept:
                del graph.node[position]
        for node, saved in zip(originals, saved_nodes, strict=True):
            node.CopyFrom(saved)
        del graph.initializer[initializer_count:]
        raise
    for name, array in values.items():
        set_tensor_data(analysis.store.tensors[name], array)
    metadata.stamp(proto, report.to_dict())  # #13 hook: record what was done in metadata_props
    report.timings["total"] = round(time.perf_counter() - started, 4)
    return report


PROGRESS_MIN_BYTES = 256 << 20


@contextlib.contextmanager
def _progress_bar(model: onnx.ModelProto, store: TensorStore, label: str) -> Iterator[Callable[[int], None] | None]:
    """A tqdm bar over bytes written, only on a terminal and only for runs long enough to want one."""
    total = sum(store.nbytes(t.name) for t in model.graph.initializer if t.name in store)
    if total < PROGRESS_MIN_BYTES or not sys.stderr.isatty():
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=total, unit="B", unit_scale=True, desc=label, file=sys.stderr, leave=False) as bar:
        yield bar.update


def convert(in_path: str | os.PathLike, out_path: str | os.PathLike, **options: Any) -> Report:
    """Read ``in_path``, rotate, optionally validate, and write ``out_path`` atomically.

    The input is never modified. Output goes to a staging folder beside ``out_path`` and is moved into
    place only after writing (and validation, if asked) succeeded, so a failure leaves no partial file.
    """
    opts = Options(**options)
    in_path, out_path = Path(in_path), Path(out_path)
    checks.check_output_path(in_path, out_path, in_place=opts.in_place)
    checks.check_load_memory(in_path)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    model = load_model(in_path)
    metadata.refuse_rotated(model, str(in_path), opts.force)  # #13 hook: never rotate a rotated model silently
    input_files = {in_path.resolve(), *external_files(model, in_path.parent)}
    checks.check_output_path(in_path, out_path, input_files - {in_path.resolve()}, in_place=opts.in_place)
    baseline = gate.input_baseline(model)  # #13 hook: the input's structure, for the output gate
    analysis = analyze(model, in_path.parent, roles=opts.roles)
    if opts.roles is not None and not opts.trust_roles:
        opts.validate = True  # a hand-edited map may assert what the graph does not do: check the result
    plan, report = _plan(analysis, opts)
    metadata.stamp(model, report.to_dict())  # #13 hook: record what was done in metadata_props
    gate.check_output(model, baseline)  # #13 hook: structural output gate, before anything is written
    checks.preflight(model, analysis.store, plan, in_path.stat().st_size, validate=opts.validate)
    timings["analyze"] = round(time.perf_counter() - started, 4)
    staging = staging_dir(out_path)
    try:
        mark = time.perf_counter()
        with _progress_bar(model, analysis.store, f"rotating {in_path.name}") as progress:
            staged = save_model(
                model,
                staging / out_path.name,
                checks.checked_values(plan, analysis.store),
                external=True if uses_external_data(model) else None,
                data_name=output_data_name(out_path),
                progress=progress,
            )
        timings["rotate_and_write"] = round(time.perf_counter() - mark, 4)
        if opts.validate:
            from spinquant_onnx.validate import compare_models

            mark = time.perf_counter()
            result = compare_models(in_path, staged[0], providers=opts.providers, threshold=opts.threshold,
                                    own_cache=bool(opts.r2 or opts.r3 or opts.rotation_file),
                                    dims=input_dim_hints(analysis))
            timings["validate"] = round(time.perf_counter() - mark, 4)
            report.validation = result.to_dict()
            if not result.passed:
                raise ValidationFailedError(
                    f"validation failed: logits relative L2 {result.rel_l2:.3g} "
                    f"(threshold {result.threshold:g}"
                    + (f", from rounding noise {result.rounding_noise:.3g}" if result.rounding_noise else "")
                    + "), "
                    f"argmax agreement {result.argmax_agreement:.4f}; no output written"
                )
        commit_output(staged, out_path, protect=() if opts.in_place else input_files)
    except BaseException:
        discard_output(staging)
        raise
    timings["total"] = round(time.perf_counter() - started, 4)
    report.input, report.output, report.timings = str(in_path), str(out_path), timings
    return report
