"""Sanity checks for the committed ONNX decoder fixtures (fixtures/manifest.json).

The fixtures are produced by ``scripts/make_fixtures.py``; these tests only
need onnx and onnxruntime (no torch).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import MANIFEST_KEYS
from onnx import numpy_helper

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
MANIFEST = FIXTURES / "manifest.json"

KEYS = MANIFEST_KEYS


def _manifest() -> list[dict]:
    return json.loads(MANIFEST.read_text())


ENTRIES = _manifest() if MANIFEST.exists() else []


def _id(entry: dict) -> str:
    return entry["file"]


def test_manifest_present_and_well_formed():
    assert MANIFEST.exists(), "run: python scripts/make_fixtures.py"
    entries = _manifest()
    assert entries, "empty manifest"
    files = [e["file"] for e in entries]
    assert len(files) == len(set(files)), "duplicate files in manifest"
    for e in entries:
        for key, typ in KEYS.items():
            assert isinstance(e.get(key), typ), (e.get("file"), key, e.get(key))
        assert e["exporter"] in ("torchscript", "dynamo")
        assert e["opset"] == (17 if e["exporter"] == "torchscript" else 18)
        assert e["outlier_channel"] is None or 0 <= e["outlier_channel"] < e["hidden"]
    # Every model is exported by both exporters.
    pairs = {(e["file"].rsplit("_", 1)[0], e["exporter"]) for e in entries}
    for stem in {s for s, _ in pairs}:
        assert {(stem, "torchscript"), (stem, "dynamo")} <= pairs, stem


def test_no_stray_files():
    listed = {e["file"] for e in _manifest()}
    onnx_files = {p.name for p in FIXTURES.glob("*.onnx")}
    assert onnx_files == listed
    # Weights are embedded: no external-data side files.
    sidecars = [p.name for p in FIXTURES.iterdir() if p.suffix in (".data", ".onnx_data", ".bin")]
    assert not sidecars


@pytest.mark.parametrize("entry", ENTRIES, ids=_id)
def test_fixture_loads_and_checks(entry):
    path = FIXTURES / entry["file"]
    assert path.is_file()
    model = onnx.load(str(path), load_external_data=False)
    onnx.checker.check_model(model, full_check=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer), "external data"
    opsets = {o.domain: o.version for o in model.opset_import}
    assert opsets.get("", opsets.get("ai.onnx")) == entry["opset"]
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in model.graph.output] == ["logits"]


@pytest.mark.parametrize("entry", ENTRIES, ids=_id)
def test_fixture_runs_on_cpu(entry):
    path = FIXTURES / entry["file"]
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    batch, seq = 2, 5
    if "STATIC" in entry["notes"]:  # exported with fixed shapes
        shape = sess.get_inputs()[0].shape
        batch, seq = int(shape[0]), int(shape[1])
    rng = np.random.default_rng(0)
    ids = rng.integers(0, entry["vocab"], size=(batch, seq), dtype=np.int64)
    mask = np.ones_like(ids)
    (logits,) = sess.run(["logits"], {"input_ids": ids, "attention_mask": mask})
    assert logits.shape == (batch, seq, entry["vocab"])
    assert logits.dtype == np.float32
    assert np.isfinite(logits).all()
    # Not degenerate: the logits have real spread over the vocabulary.
    assert float(logits.std(axis=-1).mean()) > 0.5


@pytest.mark.parametrize("entry", ENTRIES, ids=_id)
def test_norm_weights_are_not_ones(entry):
    model = onnx.load(str(FIXTURES / entry["file"]))
    hidden = entry["hidden"]
    gammas = [
        numpy_helper.to_array(t)
        for t in model.graph.initializer
        if list(t.dims) == [hidden] and t.data_type == onnx.TensorProto.FLOAT
    ]
    # input/post-attention norm per layer + final norm, all kept as initializers
    assert len(gammas) >= 2 * entry["layers"] + 1, len(gammas)
    assert any(not np.allclose(g, 1.0) for g in gammas)
    assert all(not np.allclose(g, 1.0) for g in gammas), "some RMSNorm weight is still all-ones"


@pytest.mark.parametrize("entry", [e for e in ENTRIES if e["outlier_channel"] is not None], ids=_id)
def test_outlier_channel_in_embedding(entry):
    model = onnx.load(str(FIXTURES / entry["file"]))
    inits = {t.name: t for t in model.graph.initializer}
    (gather,) = [
        n
        for n in model.graph.node
        if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2
    ]
    emb = numpy_helper.to_array(inits[gather.input[0]])
    assert emb.shape == (entry["vocab"], entry["hidden"])
    col_max = np.abs(emb).max(axis=0)
    assert int(col_max.argmax()) == entry["outlier_channel"]
