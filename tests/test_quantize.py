"""Online rotations stay float under every quantizer: keep_float, `spinquant-onnx quantize`, the AIMET helper."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FIXTURES

import spinquant_onnx
from spinquant_onnx.cli import main
from spinquant_onnx.core.pipeline import convert
from spinquant_onnx.rewrite.online import ONLINE_NODES_KEY, ONLINE_PREFIX


@pytest.fixture(scope="module")
def rotated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rotated") / "r.onnx"
    convert(FIXTURES / "llama_ts.onnx", out, r3=True, r4=True)
    return out


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "t.npy"
    np.save(path, np.random.default_rng(0).integers(0, 64, size=128).astype(np.int64))
    return path


def test_keep_float_names_every_online_node(rotated: Path) -> None:
    model = onnx.load(str(rotated))
    names = spinquant_onnx.keep_float(model)
    online = [n for n in model.graph.node if n.name.startswith(ONLINE_PREFIX)]
    assert names and names == [n.name for n in online]
    assert {n.op_type for n in online} >= {"MatMul"}
    assert spinquant_onnx.keep_float(onnx.load(str(FIXTURES / "llama_ts.onnx"))) == []


def test_keep_float_prefers_the_rotation_record(rotated: Path) -> None:
    model = onnx.load(str(rotated))
    first = spinquant_onnx.keep_float(model)[:2]
    kept = [p for p in model.metadata_props if p.key != ONLINE_NODES_KEY]  # the stamp #13 wrote
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    model.metadata_props.add(key=ONLINE_NODES_KEY, value=json.dumps([*first, "not/in/graph"]))
    assert spinquant_onnx.keep_float(model) == first


def _quantized_inputs(model: onnx.ModelProto) -> set[str]:
    """Nodes that read a DequantizeLinear output (a quantized activation or weight)."""
    dequantized = {n.output[0] for n in model.graph.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in model.graph.node if any(i in dequantized for i in n.input)}


@pytest.mark.parametrize("scheme", ["w8a8", "w4"])
def test_quantize_command_keeps_online_nodes_float(
    rotated: Path, tokens: Path, tmp_path: Path, scheme: str, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "q.onnx"
    argv = ["quantize", str(rotated), str(out), "--scheme", scheme, "--tokens", str(tokens), "--window-len", "16"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    quantized = onnx.load(str(out))
    online = set(spinquant_onnx.keep_float(onnx.load(str(rotated))))
    assert summary["online_nodes"] == len(online) > 0
    if scheme == "w8a8":
        touched = _quantized_inputs(quantized)
        assert touched, "nothing was quantized"
        assert not touched & online, "an online rotation node reads a quantized tensor"
    else:
        assert any(n.op_type == "MatMulNBits" for n in quantized.graph.node)
        online_matmuls = {
            n.name for n in onnx.load(str(rotated)).graph.node if n.name in online and n.op_type == "MatMul"
        }
        assert online_matmuls <= {n.name for n in quantized.graph.node if n.op_type == "MatMul"}
        assert not any(n.op_type == "MatMulNBits" and n.name.startswith(ONLINE_PREFIX) for n in quantized.graph.node)


def test_quantize_w8a8_without_tokens_is_refused(rotated: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["quantize", str(rotated), str(tmp_path / "q.onnx"), "--scheme", "w8a8"]) == 2
    assert "calibration tokens" in capsys.readouterr().err
    assert not (tmp_path / "q.onnx").exists()


@pytest.mark.parametrize("bitwidth", [None, 16])
def test_aimet_helper_on_a_real_sim(rotated: Path, bitwidth: int | None) -> None:
    quantsim = pytest.importorskip("aimet_onnx.quantsim", reason="aimet-onnx is not installed")
    from spinquant_onnx.integrations.aimet import keep_online_float

    sim = quantsim.QuantizationSimModel(onnx.load(str(rotated)))
    changed = keep_online_float(sim, bitwidth=bitwidth)
    online = spinquant_onnx.keep_float(sim.model.model)
    assert changed and online
    model = sim.model.model
    producer = {o: n for n in model.graph.node for o in n.output}
    for node in model.graph.node:
        if node.name not in online:
            continue
        for name in node.input:
            source = producer.get(name)
            if source is not None and source.op_type == "QcQuantizeOp" and name in sim.qc_quantize_op_dict:
                quantizer = sim.qc_quantize_op_dict[name]
                assert (not quantizer.enabled) if bitwidth is None else quantizer.bitwidth == 16
    for name in changed:
        quantizer = sim.qc_quantize_op_dict[name]
        assert (not quantizer.enabled) if bitwidth is None else quantizer.bitwidth == 16


def _logits(model: Path | onnx.ModelProto, ids: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.add_session_config_entry("session.disable_quant_qdq", "1")
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    session = ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0]


@pytest.mark.parametrize("block", [32, 16])
def test_w4a8_has_matmulnbits_weights_and_w8a8_activations(rotated: Path, tmp_path: Path, block: int) -> None:
    """eval's W4A8 row: the weights are exactly MatMulNBits' int4 grid (the float model with int4_blocks
    weights computes what the MatMulNBits model computes), the activation quantizers are W8A8's."""
    from spinquant_onnx.integrations.quantize import int4_blocks, keep_float, quantize_w4, quantize_w4a8, quantize_w8a8

    exclude = keep_float(onnx.load(str(rotated)))
    ids = np.random.default_rng(1).integers(0, 64, (1, 12))
    nbits = quantize_w4(rotated, tmp_path / "w4.onnx", block, exclude)
    grid = onnx.load(str(rotated))
    weights = {t.name: t for t in grid.graph.initializer}
    for node in grid.graph.node:
        if node.op_type == "MatMul" and node.name not in exclude and node.input[1] in weights:
            tensor = weights[node.input[1]]
            value = int4_blocks(onnx.numpy_helper.to_array(tensor), block)
            tensor.CopyFrom(onnx.numpy_helper.from_array(value, tensor.name))
    reference, on_grid = _logits(nbits, ids), _logits(grid, ids)
    assert np.linalg.norm(on_grid - reference) / np.linalg.norm(reference) < 1e-5
    w8a8 = quantize_w8a8(rotated, tmp_path / "w8a8.onnx", ids, exclude)
    w4a8 = quantize_w4a8(rotated, w8a8, tmp_path / "w4a8.onnx", block)
    quantized, ours = onnx.load(str(w8a8)), onnx.load(str(w4a8))
    count = lambda m, op: sum(n.op_type == op for n in m.graph.node)  # noqa: E731
    assert count(ours, "QuantizeLinear") == count(quantized, "QuantizeLinear") > 0  # the same activation sites
    linears = sum(n.op_type == "MatMul" and n.name not in exclude and n.input[1] in weights for n in grid.graph.node)
    assert count(quantized, "DequantizeLinear") - count(ours, "DequantizeLinear") == linears  # no weight DQ left
    got = _logits(w4a8, ids)
    assert 1e-3 < np.linalg.norm(got - on_grid) / np.linalg.norm(on_grid) < 0.5  # activations really quantized
    assert np.linalg.norm(got - _logits(w8a8, ids)) > 0
