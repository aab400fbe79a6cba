"""SpinQuant on a quantization simulation: AIMET's ``QuantizationSimModel`` or anything shaped like it.

The sim holds its graph at ``sim.model.model`` (an ``onnx.ModelProto``) with a ``QcQuantizeOp`` between
every weight and its MatMul and after most activations; the weights themselves stay float. Rotating
those float initializers in place (the matcher sees through the quantizer nodes) keeps every quantizer
where it was, so the documented order works: build the sim, apply SpinQuant, then ``compute_encodings``.

Three things are specific to a sim, and are handled here:
- encodings computed (or loaded) before the rotation describe the unrotated weights and activations,
  so they are refused unless the caller asks for them to be reset (``reset_encodings=True``);
- a weight whose quantizer was folded into it (``fold_param_quantizers``) is no longer float: refused;
- the ONNX Runtime session was built from a copy of the graph, so it is rebuilt after the rewrite.
Everything is checked before the first tensor is written; a reset happens only after the rewrite
succeeded, so a refused or failed call leaves the sim as it was.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import onnx

from spinquant_onnx.errors import SpinQuantError

QUANTIZER_OP = "QcQuantizeOp"
RESET_OPTION = "reset_encodings"


def model_proto_of(target: Any) -> onnx.ModelProto | None:
    """The ModelProto a sim-like object carries at ``.model.model``, or None."""
    inner = getattr(getattr(target, "model", None), "model", None)
    return inner if isinstance(inner, onnx.ModelProto) else None


def is_quantsim(target: Any) -> bool:
    """Duck typing: not a bare ModelProto, but an object whose ``.model.model`` is one."""
    return not isinstance(target, onnx.ModelProto) and model_proto_of(target) is not None


def quantizer_nodes(model: onnx.ModelProto) -> list[tuple[str, str, str]]:
    """Every quantizer node as (name, input, output), in graph order: what must survive a rewrite."""
    return [(n.name, n.input[0], n.output[0]) for n in model.graph.node if n.op_type == QUANTIZER_OP]


def _quantizers(sim: Any) -> dict[str, Any]:
    found = getattr(sim, "qc_quantize_op_dict", None)
    return dict(found) if isinstance(found, dict) else {}


def _has_encodings(quantizer: Any) -> bool:
    """Calibrated or loaded; a float16 quantizer (a plain cast, nothing to calibrate) never counts."""
    if getattr(quantizer, "is_encoding_frozen", lambda: False)():
        return True
    get = getattr(quantizer, "get_encodings", None)
    return get is not None and get() is not None


def _frozen(quantizer: Any) -> bool:
    return bool(getattr(quantizer, "is_encoding_frozen", lambda: False)())


def _summarize(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(f"'{n}'" for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_sim(sim: Any, reset: bool) -> list[str]:
    """Refuse a sim whose state the rotation would make wrong; returns the quantizers to reset."""
    folded = sorted(getattr(sim, "_folded_param_quantizers", None) or {})
    if folded:
        raise SpinQuantError(
            f"the sim's weight quantizers were folded into the weights ({_summarize(folded)}): they are no "
            "longer float; build a new QuantizationSimModel, apply SpinQuant, then compute_encodings"
        )
    calibrated = sorted(name for name, q in _quantizers(sim).items() if _has_encodings(q))
    if calibrated and not reset:
        raise SpinQuantError(
            f"{len(calibrated)} quantizer(s) of the sim already have encodings ({_summarize(calibrated)}); "
            "they describe the unrotated model. Apply SpinQuant before compute_encodings, or pass "
            f"{RESET_OPTION}=True to discard them (then call compute_encodings again)"
        )
    frozen = [name for name in calibrated if _frozen(_quantizers(sim)[name])]
    if frozen:
        raise SpinQuantError(
            f"{len(frozen)} quantizer(s) have frozen encodings ({_summarize(frozen)}) that cannot be reset; "
            "build a new QuantizationSimModel, apply SpinQuant, then load or compute encodings"
        )
    _check_private_weights(model_proto_of(sim))
    return calibrated


def _check_private_weights(model: onnx.ModelProto) -> None:
    """Each quantized initializer must feed only its quantizer (AIMET's own rule), so it is rotated in place.

    A weight read elsewhere too could be cloned by the rewrite, and the clone would bypass the quantizer.
    """
    initializers = {t.name for t in model.graph.initializer}
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            if name in initializers:
                readers[name] = readers.get(name, 0) + 1
    for name, source, _ in quantizer_nodes(model):
        if source in initializers and readers[source] > 1:
            raise SpinQuantError(
                f"initializer '{source}' is read by its quantizer '{name}' and by {readers[source] - 1} other "
                "node(s); call aimet_onnx.utils.duplicate_shared_initializers on the model before building the sim"
            )


def reset_encodings(sim: Any, names: list[str]) -> None:
    """Forget the encodings and statistics of ``names``; each quantizer goes back to a new sim's mode."""
    params = set(getattr(sim, "param_names", ()) or ())
    for name in names:
        quantizer = sim.qc_quantize_op_dict[name]
        quantizer.reset_encoding_stats()
        modes = type(quantizer.op_mode)  # AIMET's OpMode enum, reached without importing aimet here
        quantizer.op_mode = modes.oneShotQuantizeDequantize if name in params else modes.updateStats


def wide_range_quantizers(sim: Any, limit: float = 1e4) -> list[str]:
    """Enabled, calibrated quantizers whose range passes +-``limit``.

    In decoder exports these carry the additive attention mask (``finfo.min``) and the masked scores: no
    8- or 16-bit grid spans both that and the real scores, so a measurement of quantization error
    disables them (a deployment feeds a clamped mask instead).
    """
    found = []
    for name, quantizer in _quantizers(sim).items():
        encodings = quantizer.get_encodings() if quantizer.enabled else None
        if encodings and any(max(abs(e.min), abs(e.max)) > limit for e in encodings):
            found.append(name)
    return found


def rebuild_session(sim: Any) -> bool:
    """Make the sim's next run see the new initializers; False when the object has no session to rebuild."""
    rebuild = getattr(sim, "_rebuild_session", None)
    if callable(rebuild):
        rebuild()
        return True
    if getattr(sim, "session", None) is not None:
        warnings.warn(
            f"{type(sim).__name__} has a session but no _rebuild_session(); rebuild it before the next run "
            "so that it uses the rotated weights",
            stacklevel=3,
        )
    return False


def apply_to_sim(sim: Any, apply: Callable[..., Any], **options: Any) -> Any:
    """Rotate the float weights inside ``sim`` with ``apply`` (the ModelProto entry point), keep its quantizers.

    ``reset_encodings=True`` allows a sim that already has encodings: they are reset after the rewrite.
    """
    reset = bool(options.pop(RESET_OPTION, False))
    model = model_proto_of(sim)
    to_reset = check_sim(sim, reset)
    before = quantizer_nodes(model)
    report = apply(model, **options)
    after = quantizer_nodes(model)
    if after != before:
        raise SpinQuantError(
            f"internal error: the rewrite changed the sim's quantizer nodes ({len(before)} before, {len(after)} "
            "after); the sim is no longer consistent, rebuild it"
        )
    reset_encodings(sim, to_reset)
    rebuild_session(sim)
    return report
