"""apply_spinquant on a real aimet-onnx QuantizationSimModel (no mocks): exact in float, quantizers kept."""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np
import onnx
import pytest
from conftest import FIXTURES
from onnx import numpy_helper

from spinquant_onnx import apply_spinquant, convert
from spinquant_onnx.core.equivalence import infer_vocab_size, synthesize_inputs
from spinquant_onnx.errors import SpinQuantError
from spinquant_onnx.integrations.aimet import mask_quantizers, quantizer_nodes

if os.environ.get("CI"):  # CI installs aimet-onnx (README): a missing install must fail, not skip
    import aimet_onnx.quantsim as quantsim
    from aimet_onnx.utils import duplicate_shared_initializers
else:
    quantsim = pytest.importorskip("aimet_onnx.quantsim", reason="aimet-onnx is not installed")
    duplicate_shared_initializers = pytest.importorskip("aimet_onnx.utils").duplicate_shared_initializers

EXACT = 1e-5


def _sim(name: str, **kwargs) -> quantsim.QuantizationSimModel:
    return quantsim.QuantizationSimModel(onnx.load(str(FIXTURES / name)), **kwargs)


def _batches(sim, count: int = 3) -> list[dict[str, np.ndarray]]:
    model = sim.model.model
    vocab = infer_vocab_size(model)
    return [synthesize_inputs(model, batch=2, seq=9, seed=seed, vocab_size=vocab) for seed in range(count)]


def _run(sim, feeds: dict[str, np.ndarray]) -> np.ndarray:
    return sim.session.run(None, feeds)[0]


def _set_enabled(sim, enabled: bool) -> None:
    for quantizer in sim.qc_quantize_op_dict.values():
        quantizer.enabled = enabled


def _weights(sim) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t).copy() for t in sim.model.model.graph.initializer}


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm((a - b).astype(np.float64)) / np.linalg.norm(a.astype(np.float64)))


@pytest.mark.parametrize("name", ["llama_ts.onnx", "qwen2_ts.onnx", "llama_tied_dynamo.onnx", "phi3_dynamo.onnx"])
def test_float_sim_is_unchanged_and_quantizers_stay(name: str) -> None:
    sim = _sim(name)
    _set_enabled(sim, False)
    feeds = _batches(sim, 1)[0]
    before_logits = _run(sim, feeds)
    before_weights, before_nodes = _weights(sim), quantizer_nodes(sim.model.model)
    before_quantizers = dict(sim.qc_quantize_op_dict)

    report = apply_spinquant(sim)  # no manual session rebuild: apply_spinquant must do it

    after_logits = _run(sim, feeds)
    assert _rel_l2(before_logits, after_logits) < EXACT
    assert np.array_equal(before_logits.argmax(-1), after_logits.argmax(-1))
    assert report.weights_rotated > 0
    after_weights = _weights(sim)
    assert after_weights.keys() == before_weights.keys(), "no initializer added or removed"
    matrices = [p for p in sim.param_names if before_weights[p].ndim == 2]
    assert matrices
    for param in matrices:  # every quantized matrix is a MatMul weight that reads or writes the residual stream
        assert not np.allclose(before_weights[param], after_weights[param]), f"{param} was not rotated"
    assert quantizer_nodes(sim.model.model) == before_nodes
    assert len(before_nodes) > len(sim.param_names) > 0
    assert sim.qc_quantize_op_dict == before_quantizers, "the same quantizer objects, at the same tensors"


def test_one_tied_table_duplicated_as_aimet_asks() -> None:
    model = onnx.load(str(FIXTURES / "smollm_dynamo.onnx"))  # embedding and lm_head read one initializer
    with pytest.raises(Exception, match="duplicate_shared_initializers"):
        quantsim.QuantizationSimModel(model)
    assert duplicate_shared_initializers(model.graph) > 0
    sim = quantsim.QuantizationSimModel(model)
    _set_enabled(sim, False)
    feeds = _batches(sim, 1)[0]
    before = _run(sim, feeds)
    apply_spinquant(sim)
    after = _run(sim, feeds)
    assert _rel_l2(before, after) < EXACT
    assert np.array_equal(before.argmax(-1), after.argmax(-1))


def test_compute_encodings_after_rotation_runs_quantized() -> None:
    sim = _sim("llama_ts.onnx", param_type="int8", activation_type="int16")
    batches = _batches(sim)
    _set_enabled(sim, False)
    float_logits = _run(sim, batches[0])
    _set_enabled(sim, True)
    apply_spinquant(sim)
    sim.compute_encodings(batches)
    assert all(q.is_initialized() for q in sim.qc_quantize_op_dict.values() if q.enabled)
    assert np.isfinite(_run(sim, batches[0])).all()
    mask_path = mask_quantizers(sim)  # finfo.min of the additive mask: no int16 grid carries it
    assert 0 < len(mask_path) < 10
    for name in mask_path:
        sim.qc_quantize_op_dict[name].enabled = False
    error = _rel_l2(float_logits, _run(sim, batches[0]))
    assert 0 < error < 0.2, error  # quantization is really simulated, on the rotated weights, and still works


def test_refuses_after_compute_encodings_unless_reset() -> None:
    sim = _sim("qwen2_ts.onnx")
    batches = _batches(sim)
    sim.compute_encodings(batches)
    weights = _weights(sim)
    with pytest.raises(SpinQuantError, match="compute_encodings.*reset_encodings=True"):
        apply_spinquant(sim)
    assert all(np.array_equal(weights[k], v) for k, v in _weights(sim).items()), "a refusal changes nothing"
    assert all(q.is_initialized() for q in sim.qc_quantize_op_dict.values() if q.enabled)

    apply_spinquant(sim, reset_encodings=True)
    assert not any(q.is_initialized() for q in sim.qc_quantize_op_dict.values())
    _set_enabled(sim, False)
    rotated_float = _run(sim, batches[0])
    _set_enabled(sim, True)
    sim.compute_encodings(batches)
    assert np.isfinite(_run(sim, batches[0])).all()
    reference = _sim("qwen2_ts.onnx")
    _set_enabled(reference, False)
    assert _rel_l2(_run(reference, batches[0]), rotated_float) < EXACT


def test_folded_weights_are_refused() -> None:
    sim = _sim("llama_ts.onnx")
    sim.compute_encodings(_batches(sim, 1))
    sim.fold_param_quantizers()
    with pytest.raises(SpinQuantError, match="folded"):
        apply_spinquant(sim, reset_encodings=True)


def test_any_object_holding_a_model_proto_works() -> None:
    model = onnx.load(str(FIXTURES / "llama_ts.onnx"))
    holder = SimpleNamespace(model=SimpleNamespace(model=model))
    before = {t.name: numpy_helper.to_array(t).copy() for t in model.graph.initializer}
    report = apply_spinquant(holder)
    assert report.weights_rotated > 0
    changed = [t.name for t in model.graph.initializer if not np.array_equal(before[t.name], numpy_helper.to_array(t))]
    assert changed


@pytest.mark.parametrize(
    ("name", "options", "reason"),
    [
        ("llama_ts.onnx", {"r3": True}, "R3"),
        ("llama_ts.onnx", {"r4": True}, "R4"),
        ("exporters/gemma3_ts.onnx", {}, "sandwich norm"),
    ],
)
def test_online_rotations_are_refused_before_any_change(name: str, options: dict, reason: str) -> None:
    sim = _sim(name)
    before = sim.model.model.SerializeToString()
    with pytest.raises(SpinQuantError, match=f"online MatMul nodes.*{reason}.*rotate the float model first"):
        apply_spinquant(sim, **options)
    assert sim.model.model.SerializeToString() == before


def test_r2_is_weights_only_and_exact_on_a_sim() -> None:
    sim = _sim("llama_ts.onnx")
    _set_enabled(sim, False)
    feeds = _batches(sim, 1)[0]
    before = _run(sim, feeds)
    report = apply_spinquant(sim, r2=True)
    assert report.online_rotations == []
    assert _rel_l2(before, _run(sim, feeds)) < EXACT


def test_float_first_route_for_online_rotations(tmp_path) -> None:
    """What the refusal recommends: rotate the float export, then AIMET quantizes the online nodes too."""
    rotated = tmp_path / "gemma3_r1.onnx"
    report = convert(FIXTURES / "exporters" / "gemma3_ts.onnx", rotated)
    assert report.online_rotations
    reference, sim = _sim("exporters/gemma3_ts.onnx"), quantsim.QuantizationSimModel(onnx.load(str(rotated)))
    _set_enabled(reference, False)
    _set_enabled(sim, False)
    feeds = _batches(sim, 1)[0]
    assert _rel_l2(_run(reference, feeds), _run(sim, feeds)) < EXACT
    matrices = {o["matrix"] for o in report.online_rotations}
    assert matrices <= set(sim.param_names), "AIMET put a weight quantizer on every online rotation matrix"
