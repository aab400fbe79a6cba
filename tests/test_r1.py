"""R1 with norm fusion on real TorchScript and dynamo exports: exact, really rotated, outliers reduced."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import FIXTURES, manifest
from onnx import helper, numpy_helper

import spinquant_onnx
from spinquant_onnx.core.equivalence import compare_models
from spinquant_onnx.core.pipeline import convert
from spinquant_onnx.integrations.dispatch import apply_spinquant
from spinquant_onnx.match.analysis import analyze

ENTRIES = manifest()
EXACT = 1e-5


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_r1_is_exact(entry: dict, tmp_path: Path) -> None:
    source = FIXTURES / entry["file"]
    before = _sha(source)
    out = tmp_path / "rotated.onnx"
    report = convert(source, out)
    result = compare_models(source, out, providers=["cpu"], threshold=EXACT)
    assert result.rel_l2 < EXACT, result.to_dict()
    assert result.argmax_agreement == 1.0
    assert _sha(source) == before, "the input file must never change"
    assert report.hidden == entry["hidden"]
    assert report.blocks == entry["layers"]
    assert report.norms_fused == 2 * entry["layers"] + 1


@pytest.mark.parametrize("kind", ["hadamard", "random-hadamard", "random-orthogonal"])
@pytest.mark.parametrize("name", ["smollm_dynamo.onnx", "llama_h320_ts.onnx", "phi3_ts.onnx"])
def test_rotation_kinds_are_exact(kind: str, name: str, tmp_path: Path) -> None:
    out = tmp_path / "r.onnx"
    convert(FIXTURES / name, out, rotation=kind, seed=7)
    result = compare_models(FIXTURES / name, out, providers=["cpu"], threshold=EXACT)
    assert result.passed and result.rel_l2 < EXACT


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_weights_really_change_and_gammas_become_ones(tmp_path: Path) -> None:
    source = FIXTURES / "llama_ts.onnx"
    out = tmp_path / "r.onnx"
    convert(source, out)
    before, after = _initializers(source), _initializers(out)
    analysis = analyze(onnx.load(str(source)), FIXTURES)
    for event in analysis.stream.norms:
        assert not np.allclose(before[event.norm.gamma], 1.0)
        assert np.array_equal(after[event.norm.gamma], np.ones_like(before[event.norm.gamma]))
        for linear in event.readers:
            assert before[linear.weight].shape == after[linear.weight].shape
            assert np.abs(before[linear.weight] - after[linear.weight]).max() > 1e-3
    for event in analysis.stream.writers:
        assert np.abs(before[event.writer.weight] - after[event.writer.weight]).max() > 1e-3
    emb = analysis.stream.embedding.table
    assert np.abs(before[emb] - after[emb]).max() > 1e-3


def test_tied_shared_table_is_untied(tmp_path: Path) -> None:
    """smollm_dynamo has one [V,H] table read by the Gather and by Transpose->MatMul (lm_head)."""
    source = FIXTURES / "smollm_dynamo.onnx"
    model = onnx.load(str(source))
    analysis = analyze(model, FIXTURES)
    table = analysis.stream.embedding.table
    assert any(entry.linear.weight == table for entry in analysis.roles.final.readers), "fixture must be tied"
    out = tmp_path / "r.onnx"
    report = convert(source, out)
    clones = [t for t in report.tensors_rewritten if t["source"] == table]
    assert len(clones) == 2, clones  # one copy per use: embedding rows and lm_head columns differ
    result = compare_models(source, out, providers=["cpu"], threshold=EXACT)
    assert result.passed


def test_opaque_names_give_the_same_result(tmp_path: Path) -> None:
    """Structure, not names: rename every initializer and node, and the rewritten weights are the same."""
    source = FIXTURES / "qwen2_dynamo.onnx"
    model = onnx.load(str(source))
    mapping = {t.name: f"t{i}" for i, t in enumerate(model.graph.initializer)}
    for tensor in model.graph.initializer:
        tensor.name = mapping[tensor.name]
    for number, node in enumerate(model.graph.node):
        node.name = f"n{number}"
        del node.metadata_props[:]
        for slot, name in enumerate(node.input):
            if name in mapping:
                node.input[slot] = mapping[name]
    opaque = tmp_path / "opaque.onnx"
    onnx.save(model, str(opaque))
    convert(source, tmp_path / "a.onnx")
    convert(opaque, tmp_path / "b.onnx")
    named, renamed = _initializers(tmp_path / "a.onnx"), _initializers(tmp_path / "b.onnx")
    for old, new in mapping.items():
        np.testing.assert_array_equal(named[old], renamed[new])
    assert compare_models(opaque, tmp_path / "b.onnx", providers=["cpu"], threshold=EXACT).passed


def _stream_activations(path: Path, tensors: list[str], ids: np.ndarray) -> np.ndarray:
    model = onnx.load(str(path))
    for name in tensors:
        model.graph.output.append(helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outputs = session.run(tensors, {"input_ids": ids, "attention_mask": np.ones_like(ids)})
    return np.stack([np.abs(o).reshape(-1, o.shape[-1]).max(axis=0) for o in outputs])


@pytest.mark.parametrize("name", ["llama_outlier_ts.onnx", "llama_outlier_dynamo.onnx"])
def test_outlier_channel_is_spread(name: str, tmp_path: Path) -> None:
    entry = next(e for e in ENTRIES if e["file"] == name)
    source = FIXTURES / name
    out = tmp_path / "r.onnx"
    convert(source, out)
    analysis = analyze(onnx.load(str(source)), FIXTURES)
    residual = sorted(t for t in analysis.stream.tensors if analysis.index.producer[t].op_type == "Add")
    ids = np.random.default_rng(0).integers(0, entry["vocab"], size=(2, 16), dtype=np.int64)
    before = _stream_activations(source, residual, ids)
    after = _stream_activations(out, residual, ids)
    assert int(before.max(axis=0).argmax()) == entry["outlier_channel"]
    # The largest per-channel magnitude of the residual stream falls by a large factor.
    assert after.max() < 0.5 * before.max(), (after.max(), before.max())


def test_external_data_round_trip_keeps_ir_and_opsets(tmp_path: Path) -> None:
    model = onnx.load(str(FIXTURES / "mistral_ts.onnx"))
    folder = tmp_path / "in"
    folder.mkdir()
    onnx.save(model, str(folder / "m.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
              location="m.onnx.data", size_threshold=0)
    out = tmp_path / "out" / "r.onnx"
    convert(folder / "m.onnx", out)
    assert (out.parent / "r.onnx.data").is_file()
    written = onnx.load(str(out), load_external_data=False)
    large = [t for t in written.graph.initializer if np.prod(t.dims) * 4 >= 1024]
    assert large and all(t.data_location == onnx.TensorProto.EXTERNAL for t in large)
    assert written.ir_version == model.ir_version
    assert [(o.domain, o.version) for o in written.opset_import] == [(o.domain, o.version) for o in model.opset_import]
    assert compare_models(folder / "m.onnx", out, providers=["cpu"], threshold=EXACT).passed
    assert not list(out.parent.glob(".*partial*")), "no staging leftovers"


def _with_low_precision_weights(model: onnx.ModelProto, elem_type: int) -> onnx.ModelProto:
    """Store every MatMul weight in fp16/bf16 behind a Cast to float, as weight-compressed exports do."""
    inits = {t.name: t for t in model.graph.initializer}
    casts = []
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            tensor = inits[node.input[1]]
            values = numpy_helper.to_array(tensor).astype(helper.tensor_dtype_to_np_dtype(elem_type))
            low = numpy_helper.from_array(values, tensor.name + ".low")
            model.graph.initializer.append(low)
            cast_out = tensor.name + ".f32"
            casts.append(helper.make_node("Cast", [low.name], [cast_out], to=onnx.TensorProto.FLOAT))
            node.input[1] = cast_out
    for cast in casts:
        model.graph.node.insert(0, cast)
    return model


@pytest.mark.parametrize("elem_type", [onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16])
def test_low_precision_weights_keep_their_dtype(elem_type: int, tmp_path: Path) -> None:
    model = _with_low_precision_weights(onnx.load(str(FIXTURES / "llama_ts.onnx")), elem_type)
    source = tmp_path / "low.onnx"
    onnx.save(model, str(source))
    convert(source, tmp_path / "r.onnx")
    written = {t.name: t for t in onnx.load(str(tmp_path / "r.onnx")).graph.initializer}
    low = [t for name, t in written.items() if name.endswith(".low")]
    assert low and all(t.data_type == elem_type for t in low)
    result = compare_models(source, tmp_path / "r.onnx", providers=["cpu"], threshold=1.0)
    # Rounding the rotated weights to 16 bits costs precision, not correctness.
    assert result.rel_l2 < (5e-3 if elem_type == onnx.TensorProto.FLOAT16 else 3e-2), result.rel_l2


def test_apply_spinquant_in_memory_matches_convert(tmp_path: Path) -> None:
    source = FIXTURES / "qwen3_ts.onnx"
    model = onnx.load(str(source))
    report = apply_spinquant(model, rotation="random-hadamard", seed=3)
    assert report.norms_fused == 5
    onnx.save(model, str(tmp_path / "mem.onnx"))
    convert(source, tmp_path / "file.onnx", rotation="random-hadamard", seed=3)
    a, b = _initializers(tmp_path / "mem.onnx"), _initializers(tmp_path / "file.onnx")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_roles_are_read_from_structure(entry: dict) -> None:
    analysis = analyze(onnx.load(str(FIXTURES / entry["file"])), FIXTURES)
    fused = entry["family"] == "phi3"
    attention = ["qkv", "o"] if fused else ["q", "k", "v", "o"]
    mlp = ["gate_up", "down"] if fused else ["gate", "up", "down"]
    assert len(analysis.roles.blocks) == entry["layers"]
    for block in analysis.roles.blocks:
        kinds = [part.kind for part in block.parts]
        assert kinds == ["attention", "mlp"]
        roles = [[e.role for e in part.readers] + [part.writer.role] for part in block.parts]
        assert roles == [attention, mlp]
    assert [e.role for e in analysis.roles.final.readers] == ["lm_head"]
    assert analysis.stream.embedding is not None


def test_apply_spinquant_leaves_model_untouched_on_refusal() -> None:
    """A refusal late in the pipeline (here: NaN in a weight) must not leave a half-rewritten graph."""
    model = onnx.load(str(FIXTURES / "phi3_ts.onnx"))
    analysis = analyze(model)
    weight = analysis.stream.writers[-1].writer.weight
    tensor = next(t for t in model.graph.initializer if t.name == weight)
    values = numpy_helper.to_array(tensor).copy()
    values[0, 0] = np.nan
    tensor.CopyFrom(numpy_helper.from_array(values, weight))
    before = model.SerializeToString()
    with pytest.raises(spinquant_onnx.SpinQuantError, match=weight):
        apply_spinquant(model, r4=True)
    assert model.SerializeToString() == before
