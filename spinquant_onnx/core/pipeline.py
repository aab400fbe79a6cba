"""The one pipeline every entry point runs: preflight, plan, gate, staged write, validation, one commit.

``convert`` (file to file) and ``apply_spinquant`` (a model in memory, or an AIMET sim) are here; the VLM
entry points (``integrations.vlm``) use the same steps for their three pieces. In memory, "staged write"
is computing every new tensor before the first initializer is overwritten, and "commit" is that overwrite.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx

from spinquant_onnx.core import gate, metadata
from spinquant_onnx.core import preflight as checks
from spinquant_onnx.core.memory import check_load_memory
from spinquant_onnx.core.options import PRECISIONS, Options
from spinquant_onnx.core.report import Report, rewritten_tensors
from spinquant_onnx.errors import InputError, SpinQuantError, ValidationFailedError
from spinquant_onnx.io.model_file import external_files, load_model, save_model, set_tensor_data, uses_external_data
from spinquant_onnx.io.protowire import reads_own_file
from spinquant_onnx.io.staging import Staged, commit_all, discard_output, output_data_name, staging_dir
from spinquant_onnx.io.tensor_store import TensorStore
from spinquant_onnx.match.analysis import Analysis, analyze
from spinquant_onnx.rewrite.base import PassContext, run_passes
from spinquant_onnx.rewrite.plan import TensorPlan
from spinquant_onnx.rotation.learned_file import load_rotation_file

__all__ = ["Analysis", "Options", "Report", "analyze", "apply_model", "convert", "plan_model"]


# ----------------------------------------------------------------------------------------------- plan


def plan_model(analysis: Analysis, options: Options) -> tuple[TensorPlan, Report, PassContext]:
    """Run every registered pass (all checks, then plan and insert); the plan, the report, and the context."""
    learned = load_rotation_file(options.rotation_file) if options.rotation_file is not None else None
    ctx = PassContext(analysis, TensorPlan(work=PRECISIONS[options.precision]), options, learned)
    run_passes(ctx)
    ctx.plan.finalize(analysis.index)
    report = Report(
        input=None,
        output=None,
        hidden=analysis.stream.hidden,
        rotation={**ctx.rotation.describe(), "precision": options.precision},
        norms_fused=ctx.counts["norms_fused"],
        weights_rotated=ctx.counts["weights_rotated"],
        tensors_rewritten=rewritten_tensors(ctx.plan),
        blocks=len(analysis.roles.blocks),
        online_rotations=ctx.online,
    )
    report.rotation.update(ctx.done)
    if learned is not None:  # whatever it held (R1 only, R2 only, both): the report says which file was used
        report.rotation["rotation_file"] = learned.describe()
    return ctx.plan, report, ctx


def input_dim_hints(analysis: Analysis) -> dict[str, int]:
    """Sizes of symbolic KV-cache dims that their names do not explain (genai's ``kv_cache_dim``).

    The head size comes from the matched attention geometry; a model where none is found needs no hint.
    """
    try:
        sites = analysis.sites
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


def as_model_proto(target: Any) -> onnx.ModelProto:
    """A ModelProto, or an object carrying one as AIMET's QuantizationSimModel does (``.model.model``)."""
    if isinstance(target, onnx.ModelProto):
        return target
    inner = getattr(getattr(target, "model", None), "model", None)
    if isinstance(inner, onnx.ModelProto):
        return inner
    raise SpinQuantError(
        f"apply_spinquant expects an onnx.ModelProto or a QuantizationSimModel, got {type(target).__name__}"
    )


# ------------------------------------------------------------------------------------------ in memory


def check_in_memory(proto: onnx.ModelProto, opts: Options) -> None:
    """Preflight of an in-memory run (after ``validate=True`` was refused): a checked role map, weights loaded."""
    if opts.roles is not None and not opts.trust_roles:
        raise SpinQuantError(
            "a role map in memory cannot be validated here; use convert(..., roles=...) or pass trust_roles=True"
        )
    if uses_external_data(proto):
        raise InputError(
            "model has external data that is not loaded; load it with onnx.load(path) first "
            "or use spinquant_onnx.convert(in_path, out_path)"
        )


@contextlib.contextmanager
def restored_on_failure(graph: onnx.GraphProto) -> Iterator[None]:
    """On any exception, drop inserted nodes and initializers and restore the original nodes *in place*.

    Planning edits nodes (untied copies, online rotations); holders such as an AIMET sim keep references
    to these node objects, so they are restored rather than replaced.
    """
    originals = list(graph.node)
    saved_nodes = [onnx.NodeProto.FromString(node.SerializeToString()) for node in originals]
    initializer_count = len(graph.initializer)
    try:
        yield
    except BaseException:
        kept = {id(node) for node in originals}
        for position in reversed(range(len(graph.node))):
            if id(graph.node[position]) not in kept:
                del graph.node[position]
        for node, saved in zip(originals, saved_nodes, strict=True):
            node.CopyFrom(saved)
        del graph.initializer[initializer_count:]
        raise


def stage_in_memory(
    proto: onnx.ModelProto, store: TensorStore, plan: TensorPlan, baseline: gate.Baseline
) -> dict[str, Any]:
    """Gate, then every new tensor computed and checked (nothing overwritten yet): the in-memory staged write.

    ``baseline`` is ``gate.input_baseline(proto)`` taken before any pass edited the graph.
    """
    gate.check_output(proto, baseline)
    checks.check_plan(proto, store, plan)
    checks.check_small_sources_finite(store, plan)
    compute = checks.checked_values(plan, store)
    return {name: compute(name) for name in plan.targets}


def commit_in_memory(store: TensorStore, values: dict[str, Any]) -> None:
    """The in-memory commit: overwrite the initializers with the staged values."""
    for name, array in values.items():
        set_tensor_data(store.tensors[name], array)


def apply_model(model: Any, *, analysis: Analysis | None = None, **options: Any) -> Report:
    """Rewrite a ModelProto (weights loaded) in place; the core of ``apply_spinquant``.

    Nothing is changed unless every step succeeds: the plan is computed first, every new tensor is
    computed next, and only then are the initializers overwritten. ``analysis`` reuses a matcher run.
    """
    opts = Options(**options)
    if opts.validate:
        raise SpinQuantError("validate=True needs the original model; use convert() or validate.compare_models")
    proto = as_model_proto(model)
    check_in_memory(proto, opts)
    metadata.refuse_rotated(proto, "model", opts.force)  # #13: never rotate a rotated model silently
    started = time.perf_counter()
    baseline = gate.input_baseline(proto)  # the input's structure, for the output gate
    with restored_on_failure(proto.graph):
        analysis = analysis if analysis is not None else analyze(proto, roles=opts.roles)
        plan, report, _ = plan_model(analysis, opts)
        values = stage_in_memory(proto, analysis.store, plan, baseline)
    commit_in_memory(analysis.store, values)
    metadata.stamp(proto, report.to_dict())  # #13: record what was done in metadata_props
    report.timings["total"] = round(time.perf_counter() - started, 4)
    return report


# ----------------------------------------------------------------------------------------------- files

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


@dataclass
class Output:
    """One file a run writes: ``write(staging_folder)`` returns the staged files, the main one first.

    ``model`` is the ONNX graph written (gated against ``baseline``, the same graph's ``gate.input_baseline``
    taken before any rewrite, before anything is written); both None for a plain file.
    """

    path: Path
    write: Callable[[Path], list[Path]]
    model: onnx.ModelProto | None = None
    baseline: gate.Baseline | None = None


def model_output(
    model: onnx.ModelProto,
    store: TensorStore,
    plan: TensorPlan,
    out_path: Path,
    baseline: gate.Baseline,
    progress_label: str | None = None,
    embedded_input: bool = False,
) -> Output:
    """An ``Output`` that streams ``model`` with the plan's checked values into the staging folder.

    External data in gives external data out, unless ``embedded_input`` (a lazily read embedded model,
    whose "external" tensors live in the .onnx itself): then the output is embedded too while it fits.
    """

    def write(staging: Path) -> list[Path]:
        label = progress_label or f"rotating {out_path.name}"
        with _progress_bar(model, store, label) as progress:
            values = checks.checked_values(plan, store)
            return save_model(
                model,
                staging / out_path.name,
                values,
                fill=values,
                external=True if uses_external_data(model) and not embedded_input else None,
                data_name=output_data_name(out_path),
                progress=progress,
            )

    return Output(out_path, write, model, baseline)


def write_outputs(
    outputs: list[Output],
    protect: set[Path] | tuple[()] = (),
    validate: Callable[[dict[Path, list[Path]]], None] | None = None,
) -> None:
    """Gate every model, stage every output, validate them (``validate(staged)``), then commit them together.

    A failure anywhere leaves no output and no staging folder behind.
    """
    for output in outputs:
        if output.model is not None:
            if output.baseline is None:
                raise SpinQuantError(f"internal: no gate baseline for {output.path}")
            gate.check_output(output.model, output.baseline)
    stagings: list[Path] = []
    try:
        staged: dict[Path, list[Path]] = {}
        for output in outputs:
            stagings.append(staging_dir(output.path))
            staged[output.path] = output.write(stagings[-1])
        if validate is not None:
            validate(staged)
        commit_all([Staged(files, path, model=_is_model(outputs, path)) for path, files in staged.items()], protect)
    finally:
        for staging in stagings:
            discard_output(staging)


def _is_model(outputs: list[Output], path: Path) -> bool:
    return next(o for o in outputs if o.path == path).model is not None


def convert(in_path: str | os.PathLike, out_path: str | os.PathLike, **options: Any) -> Report:
    """Read ``in_path``, rotate, optionally validate, and write ``out_path`` atomically.

    The input is never modified. Output goes to a staging folder beside ``out_path`` and is moved into
    place only after writing (and validation, if asked) succeeded, so a failure leaves no partial file.
    """
    opts = Options(**options)
    in_path, out_path = Path(in_path), Path(out_path)
    checks.check_output_path(in_path, out_path, in_place=opts.in_place)
    check_load_memory(in_path)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    model = load_model(in_path, lazy=True)
    embedded = reads_own_file(model, in_path)
    metadata.refuse_rotated(model, str(in_path), opts.force)  # #13: never rotate a rotated model silently
    input_files = {in_path.resolve(), *external_files(model, in_path.parent)}
    checks.check_output_path(in_path, out_path, input_files - {in_path.resolve()}, in_place=opts.in_place)
    baseline = gate.input_baseline(model)  # the input's structure, for the output gate
    analysis = analyze(model, in_path.parent, roles=opts.roles)
    if opts.roles is not None and not opts.trust_roles:
        opts.validate = True  # a hand-edited map may assert what the graph does not do: check the result
    plan, report, _ = plan_model(analysis, opts)
    metadata.stamp(model, report.to_dict())  # #13: record what was done in metadata_props
    protobuf_bytes = model.ByteSize() if embedded else in_path.stat().st_size
    checks.preflight(model, analysis.store, plan, protobuf_bytes, validate=opts.validate, embedded=embedded)
    timings["analyze"] = round(time.perf_counter() - started, 4)
    mark = time.perf_counter()

    def validate(staged: dict[Path, list[Path]]) -> None:
        timings["rotate_and_write"] = round(time.perf_counter() - mark, 4)
        if opts.validate:
            report.validation = _validate(in_path, staged[out_path][0], analysis, opts, timings)

    write_outputs(
        [model_output(model, analysis.store, plan, out_path, baseline, f"rotating {in_path.name}", embedded)],
        protect=() if opts.in_place else input_files,
        validate=validate,
    )
    timings["total"] = round(time.perf_counter() - started, 4)
    report.input, report.output, report.timings = str(in_path), str(out_path), timings
    return report


def _validate(in_path: Path, staged: Path, analysis: Analysis, opts: Options, timings: dict[str, float]
              ) -> dict[str, Any]:
    from spinquant_onnx.core.equivalence import compare_models

    mark = time.perf_counter()
    result = compare_models(in_path, staged, providers=opts.providers, threshold=opts.threshold,
                            own_cache=bool(opts.r2 or opts.r3 or opts.rotation_file),
                            dims=input_dim_hints(analysis))
    timings["validate"] = round(time.perf_counter() - mark, 4)
    if not result.passed:
        raise ValidationFailedError(
            f"validation failed: logits relative L2 {result.rel_l2:.3g} "
            f"(threshold {result.threshold:g}"
            + (f", from rounding noise {result.rounding_noise:.3g}" if result.rounding_noise else "")
            + "), "
            f"argmax agreement {result.argmax_agreement:.4f}; no output written"
        )
    return result.to_dict()
