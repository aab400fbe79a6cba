"""``apply_spinquant``: the one in-memory entry point, which picks the integration a call needs."""

from __future__ import annotations

import dataclasses
from typing import Any

from spinquant_onnx.core.options import Options
from spinquant_onnx.core.pipeline import apply_model
from spinquant_onnx.core.report import Report
from spinquant_onnx.errors import SpinQuantError
from spinquant_onnx.integrations.aimet import RESET_OPTION, apply_to_sim, is_quantsim
from spinquant_onnx.integrations.vlm import VlmReport, apply_vlm

# Other spellings of ``visual=`` (AIMET's ``visual_sim``, a peer tool's ``visual_model``).
VISUAL_ALIASES = ("visual_sim", "visual_model")
KNOWN_OPTIONS = frozenset(f.name for f in dataclasses.fields(Options)) | {RESET_OPTION}


def apply_spinquant(model: Any, visual: Any = None, embedding: Any = None, **options: Any) -> Report | VlmReport:
    """Rewrite ``model`` (an ``onnx.ModelProto`` with its weights loaded) in place; returns the report.

    With ``visual`` (the VLM's visual encoder) or ``embedding`` (its [vocab, hidden] table, numpy or
    torch), all pieces are rotated consistently by ``vlm.apply_vlm``, which returns a ``vlm.VlmReport``.

    Nothing is changed unless every step succeeds: the plan is computed first, every new tensor is
    computed next, and only then are the initializers overwritten. ``model`` may also be an AIMET
    ``QuantizationSimModel`` (anything with a ModelProto at ``.model.model``): see ``aimet.apply_to_sim``
    for what is checked, ``reset_encodings=True``, and the session rebuild.
    """
    for alias in VISUAL_ALIASES:
        value = options.pop(alias, None)
        if value is None:
            continue
        if visual is not None:
            raise SpinQuantError(f"pass the visual encoder once: visual= or {alias}=, not both")
        visual = value
    unknown = sorted(set(options) - KNOWN_OPTIONS)
    if unknown:
        raise SpinQuantError(
            f"apply_spinquant: unknown keyword {unknown[0]}=; valid: visual= (or {'=, '.join(VISUAL_ALIASES)}=), "
            f"embedding=, {'=, '.join(sorted(KNOWN_OPTIONS))}="
        )
    if visual is not None or embedding is not None:
        return apply_vlm(model, visual=visual, embedding=embedding, **options)
    if is_quantsim(model):
        return apply_to_sim(model, apply_model, **options)
    return apply_model(model, **options)
