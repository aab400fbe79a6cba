"""SpinQuant on a quantization simulation: AIMET's ``QuantizationSimModel`` or anything shaped like it.

The sim holds its graph at ``sim.model.model`` (an ``onnx.ModelProto``) with a ``QcQuantizeOp`` between
every weight and its MatMul and after most activations; the weights themselves stay float. Rotating
those float initializers in place (the matcher sees through the quantizer nodes) keeps every quantizer
where it was, so the documented order works: build the sim, apply SpinQuant, then ``compute_encodings``.

Four things are specific to a sim, and are handled here:
- encodings computed (or loaded) before the rotation describe the unrotated weights and activations,
  so they are refused unless the caller asks for them to be reset (``reset_encodings=True``);
- a weight whose quantizer was folded into it (``fold_param_quantizers``) is no longer float: refused;
- online rotation nodes (R3/R4, sandwich-norm writes, ``inputs_embeds`` entries) would sit between a tensor
  and its quantizer: refused, with the float-model route to take instead (R1 and R2 are weights only);
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
from spinquant_onnx.match.analysis import analyze
from spinquant_onnx.match.residual import Stream

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


def _frozen(quantizer: Any) -> bool:
    return bool(getattr(quantizer, "is_encoding_frozen", lambda: False)())


def _has_encodings(quantizer: Any) -> bool:
    """Calibrated or loaded; a float16 quantizer (a plain cast, nothing to calibrate) never counts."""
    get = getattr(quantizer, "get_encodings", None)
    return _frozen(quantizer) or (get is not None and get() is not None)


def _summarize(names: list[str], limit: int = 3, quote: bool = True) -> str:
    shown = ", ".join(f"'{n}'" if quote else n for n in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def check_sim(sim: Any, reset: bool) -> list[str]:
    """Refuse a sim whose state the rotation would make wrong; returns the quantizers to reset."""
    folded = sorted(getattr(sim, "_folded_param_quantizers", None) or {})
    if folded:
        raise SpinQuantError(
            f"the sim's weight quantizers were folded into the weights ({_summarize(folded)}): they are no "
            "longer float; build a new QuantizationSimModel, apply SpinQuant, then compute_encodings"
        )
    quantizers = _quantizers(sim)
    calibrated = sorted(name for name, q in quantizers.items() if _has_encodings(q))
    if calibrated and not reset:
        raise SpinQuantError(
            f"{len(calibrated)} quantizer(s) of the sim already have encodings ({_summarize(calibrated)}); "
            "they describe the unrotated model. Apply SpinQuant before compute_encodings, or pass "
            f"{RESET_OPTION}=True to discard them (then call compute_encodings again)"
        )
    frozen = [name for name in calibrated if _frozen(quantizers[name])]
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


def check_no_online_nodes(stream: Stream, options: dict[str, Any]) -> None:
    """Refuse, before anything changes, a rotation that would insert MatMul nodes into the sim's graph.

    R3/R4, a sandwich norm's write and an ``inputs_embeds`` entry are rotated online; inside a sim the new
    node would land between a tensor and its quantizer, which AIMET then files under the wrong tensor name
    (and its R matrix would be unquantized). Rotating the float model first lets AIMET place every quantizer.
    """
    reasons = [f"{name.upper()} (online by design)" for name in ("r3", "r4") if options.get(name)]
    reasons += [f"the write after sandwich norm {e.online_norm.label}" for e in stream.writers if e.online is not None]
    if options.get("entries", "online") == "online":
        reasons += [f"the residual-stream graph input '{entry}'" for entry in stream.entries]
    if reasons:
        raise SpinQuantError(
            f"this rotation needs online MatMul nodes ({_summarize(reasons, 2, quote=False)}), which a "
            "QuantizationSimModel would not quantize correctly; rotate the float model first "
            "(spinquant_onnx.convert, or apply_spinquant on the ModelProto) and build the sim from the result"
        )


def reset_encodings(sim: Any, names: list[str]) -> None:
    """Forget the encodings and statistics of ``names``; each quantizer goes back to a new sim's mode."""
    params = set(getattr(sim, "param_names", ()) or ())
    for name in names:
        quantizer = sim.qc_quantize_op_dict[name]
        quantizer.reset_encoding_stats()
        modes = type(quantizer.op_mode)  # AIMET's OpMode enum, reached without importing aimet here
        quantizer.op_mode = modes.oneShotQuantizeDequantize if name in params else modes.updateStats


def mask_quantizers(sim: Any, limit: float = 1e30) -> list[str]:
    """Enabled, calibrated quantizers whose range reaches +-``limit``: the additive attention mask's path.

    Decoder exports add ``finfo(float32).min`` (about -3.4e38) to masked attention scores; the mask, and the
    masked scores, then calibrate to a range no 8- or 16-bit grid can share with the real scores, and left
    on they dominate any measurement of quantization error (a deployment feeds a clamped mask instead).
    The limit is far above any real activation, so large but genuine values (massive activations in the
    residual stream, their squares in RMSNorm) stay quantized.
    """
    found = []
    for name, quantizer in _quantizers(sim).items():
        encodings = quantizer.get_encodings() if quantizer.enabled else None
        if encodings and any(max(abs(e.min), abs(e.max)) >= limit for e in encodings):
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
    """Rotate the float weights inside ``sim`` with ``apply`` (``core.pipeline.apply_model``), keep its quantizers.

    ``reset_encodings=True`` allows a sim that already has encodings: they are reset after the rewrite.
    """
    reset = bool(options.pop(RESET_OPTION, False))
    model = model_proto_of(sim)
    to_reset = check_sim(sim, reset)
    analysis = analyze(model, roles=options.get("roles"))  # built once: the rotation below reuses it
    check_no_online_nodes(analysis.stream, options)
    before = quantizer_nodes(model)
    report = apply(model, analysis=analysis, **options)
    after = quantizer_nodes(model)
    if after != before:
        raise SpinQuantError(
            f"internal error: the rewrite changed the sim's quantizer nodes ({len(before)} before, {len(after)} "
            "after); the sim is no longer consistent, rebuild it"
        )
    reset_encodings(sim, to_reset)
    rebuild_session(sim)
    return report


def keep_online_float(sim: Any, bitwidth: int | None = None) -> list[str]:
    """Disable (or, with ``bitwidth=16``, widen) the quantizers on the online rotation nodes' inputs.

    For a sim built from a rotated model: its online Hadamards (``keep_float``) would otherwise see their
    input quantized before the rotation and the weight they rotate by quantized too, turning the rotation's
    benefit into a loss. Returns the names of the quantizers changed; call before ``compute_encodings``.
    """
    from spinquant_onnx.rewrite.online import online_node_names

    model = model_proto_of(sim)
    if model is None:
        raise SpinQuantError("keep_online_float needs a QuantizationSimModel (an object with .model.model)")
    quantizers = _quantizers(sim)
    producer = {out: node for node in model.graph.node for out in node.output}
    online = set(online_node_names(model))
    if not online:
        raise SpinQuantError("the sim's model has no online rotation nodes (build the sim from a rotated model)")
    changed: list[str] = []
    for node in model.graph.node:
        if node.name not in online:
            continue
        for name in node.input:
            key = _input_quantizer(name, producer, quantizers)
            if key is None or key in changed:
                continue
            if bitwidth is None:
                quantizers[key].enabled = False
            else:
                quantizers[key].set_bitwidth(bitwidth)
            changed.append(key)
    return changed


def _input_quantizer(name: str, producer: dict[str, onnx.NodeProto], quantizers: dict[str, Any]) -> str | None:
    """The sim's quantizer on a node input: keyed by the tensor, or by the QcQuantizeOp producing it."""
    node = producer.get(name)
    keys = [name]
    if node is not None and node.op_type == QUANTIZER_OP:
        keys += [node.name, node.input[0]]
    return next((k for k in keys if k in quantizers), None)
