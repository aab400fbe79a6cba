"""Which rotations this graph allows, and why not: each pass's own check, run without applying anything.

``inspect`` shows this, so a user learns before a run that R3 is impossible on a fused attention op
(and why) instead of from a refusal half-way into their pipeline. The answer is the pipeline's: the same
checks ``rotate`` runs, in the same order, on a throw-away context (checks change neither graph nor plan).
"""

from __future__ import annotations

from typing import Any

from spinquant_onnx.core.options import PRECISIONS, Options
from spinquant_onnx.errors import SpinQuantError
from spinquant_onnx.match.analysis import Analysis
from spinquant_onnx.rewrite.base import PassContext, registered
from spinquant_onnx.rewrite.plan import TensorPlan

OPTIONAL = ("r2", "r3", "r4")


def heads(analysis: Analysis) -> dict[str, Any]:
    """Per attention block: heads, kv heads, head_dim (or why the geometry could not be read)."""
    try:
        sites = analysis.sites
    except SpinQuantError as exc:
        return {"blocks": [], "error": str(exc)}
    return {
        "blocks": [
            {"block": s.block, **{k: v for k, v in s.geometry.describe().items() if k != "evidence"}}
            for s in sites
        ],
        "error": None,
    }


def possible(analysis: Analysis) -> dict[str, str | None]:
    """``{"r1": None, "r2": None, "r3": "why not", ...}``: None where the pass's checks all pass."""
    result: dict[str, str | None] = {}
    base = _checks(analysis, Options())
    result["r1"] = base
    for name in OPTIONAL:
        result[name] = base if base is not None else _checks(analysis, Options(**{name: True}), only=name)
    return result


def _checks(analysis: Analysis, options: Options, only: str | None = None) -> str | None:
    ctx = PassContext(analysis, TensorPlan(work=PRECISIONS[options.precision]), options)
    for pass_ in registered():
        if not pass_.wanted(ctx) or (only is not None and pass_.name in OPTIONAL and pass_.name != only):
            continue
        try:
            pass_.check(ctx)
        except SpinQuantError as exc:
            return " ".join(str(exc).split())
    return None
