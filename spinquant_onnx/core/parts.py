"""A model split into parts (layer slices for an NPU): one R1 for all of them, committed together.

Part i's residual-stream graph outputs feed part i+1's stream graph inputs. Every part is planned by the
same passes with the same R1 (made from the same options, so the same matrix); between parts the stream
stays rotated (no online node: the first part's entries and the last part's exits are the only ones
rotated online, where the chain meets the outside world). On a LayerNorm stream the first part centres
what it writes, so later parts receive a centred, rotated stream, which is what their RMSNorms expect.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from spinquant_onnx.core import gate, metadata
from spinquant_onnx.core import preflight as checks
from spinquant_onnx.core.memory import check_load_memory
from spinquant_onnx.core.options import Options
from spinquant_onnx.core.pipeline import model_output, plan_model, write_outputs
from spinquant_onnx.core.report import Report
from spinquant_onnx.errors import InputError, UnsupportedGraphError, ValidationFailedError
from spinquant_onnx.io.model_file import external_files, load_model
from spinquant_onnx.match.analysis import analyze


def part_options(opts: Options, number: int, count: int) -> Options:
    """Entries rotated online only in the first part, exits only in the last; in between they stay rotated."""
    return dataclasses.replace(
        opts,
        entries="online" if number == 0 else "external",
        exits="online" if number == count - 1 else "rotated",
    )


def convert_parts(inputs: Sequence[str | os.PathLike], out_dir: str | os.PathLike, **options: Any) -> list[Report]:
    """Rotate every part with one R1 and write ``out_dir/<part name>`` for each, all or nothing."""
    opts = Options(**options)
    paths = [Path(p) for p in inputs]
    if len(paths) < 2:
        raise InputError("rotate-parts needs at least two parts, in chain order")
    if len({p.name for p in paths}) != len(paths):
        raise InputError("two parts have the same file name; they would overwrite each other in the output folder")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out}: is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    outputs, reports, protect, hidden = [], [], set(), None
    for number, path in enumerate(paths):
        target = out / path.name
        checks.check_output_path(path, target, in_place=False)
        check_load_memory(path)
        model = load_model(path)
        metadata.refuse_rotated(model, str(path), opts.force)  # #13: never rotate a rotated part silently
        protect |= {path.resolve(), *external_files(model, path.parent)}
        baseline = gate.input_baseline(model)  # the part's structure, for the output gate (#13)
        analysis = analyze(model, path.parent, roles=opts.roles)
        if hidden is not None and analysis.stream.hidden != hidden:
            raise UnsupportedGraphError(
                f"{path.name}: residual stream of {analysis.stream.hidden} features, the earlier parts have "
                f"{hidden}; these are not parts of one model"
            )
        hidden = analysis.stream.hidden
        plan, report, _ = plan_model(analysis, part_options(opts, number, len(paths)))
        metadata.stamp(model, report.to_dict())
        checks.preflight(model, analysis.store, plan, path.stat().st_size, validate=opts.validate)
        outputs.append(model_output(model, analysis.store, plan, target, baseline, f"rotating {path.name}"))
        report.input, report.output = str(path), str(target)
        reports.append(report)

    def validate(staged: dict[Path, list[Path]]) -> None:
        if opts.validate:
            rotated = [staged[out / p.name][0] for p in paths]
            result = compare_chains(paths, rotated, opts.providers)
            if result["rel_l2"] > opts.threshold or result["argmax_agreement"] < 1.0:
                raise ValidationFailedError(
                    f"validation failed: chained logits relative L2 {result['rel_l2']:.3g} (threshold "
                    f"{opts.threshold:g}), argmax agreement {result['argmax_agreement']:.4f}; no output written"
                )
            for report in reports:
                report.validation = result

    write_outputs(outputs, protect=protect, validate=validate)
    total = round(time.perf_counter() - started, 4)
    for report in reports:
        report.timings["total"] = total
    return reports


def run_chain(parts: Sequence[str | os.PathLike], providers: Sequence[str] | None = None, seed: int = 0,
              feeds: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Run the parts in order in ONNX Runtime, each fed the earlier parts' outputs (by name) and shared inputs
    (``feeds``, else synthesized; ids drawn from the vocab of the last part, which holds lm_head)."""
    import onnx

    from spinquant_onnx.core.equivalence import infer_vocab_size, run_model, synthesize_inputs

    values: dict[str, np.ndarray] = dict(feeds or {})
    vocab = infer_vocab_size(onnx.load(str(parts[-1]), load_external_data=False))
    for path in parts:
        model = onnx.load(str(path), load_external_data=False)
        wanted = {i.name for i in model.graph.input} - {t.name for t in model.graph.initializer}
        missing = {i.name for i in model.graph.input if i.name in wanted and i.name not in values}
        if missing:
            fresh = synthesize_inputs(model, seed=seed, vocab_size=vocab)
            values.update({k: v for k, v in fresh.items() if k in missing})
        outputs, _ = run_model(str(path), {k: values[k] for k in wanted}, providers)
        values.update(outputs)
    return outputs


def compare_chains(originals: Sequence[Path], rotated: Sequence[Path], providers: Sequence[str] | None = None
                   ) -> dict[str, Any]:
    """The last part's outputs of the original chain against the rotated chain's (relative L2, argmax)."""
    from spinquant_onnx.core.equivalence import _errors, argmax_agreement

    expected, actual = run_chain(originals, providers), run_chain(rotated, providers)
    name = "logits" if "logits" in expected else next(iter(expected))
    max_abs, rel = _errors(expected[name], actual[name])
    return {"output": name, "max_abs": max_abs, "rel_l2": rel,
            "argmax_agreement": argmax_agreement(expected[name], actual[name]), "parts": len(originals)}
