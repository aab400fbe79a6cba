"""The committed exporter fixtures (fixtures/exporters/manifest.json) load, run and are what they claim.

They come from scripts/make_exporter_fixtures.py (optimum-onnx, onnxruntime-genai, torch dynamo opset 23,
Gemma3); here only onnx, onnxruntime and spinquant_onnx.core.equivalence are needed. Each fixture runs on CPU
with inputs from `synthesize_inputs` (a prefill, and with a KV cache a chunk and a decode step after a
non-empty past); every output must be finite and shaped as the manifest says. Whether spinquant-onnx
rotates a fixture exactly or refuses it ("expect") is tested elsewhere.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import MANIFEST_KEYS

from spinquant_onnx.core.equivalence import run_model, synthesize_inputs

ROOT = Path(__file__).resolve().parent.parent / "fixtures" / "exporters"
MANIFEST = ROOT / "manifest.json"
ENTRIES: list[dict] = json.loads(MANIFEST.read_text()) if MANIFEST.exists() else []

KEYS = {**MANIFEST_KEYS, "kv_cache": bool, "expect": str}

# Op types (domain-qualified when not ai.onnx) each group must contain: the reason the fixture exists.
REQUIRED_OPS = {
    "optimum_llama_o2": {"SimplifiedLayerNormalization", "com.microsoft.QuickGelu"},
    "genai_llama_int4": {"com.microsoft.MatMulNBits", "com.microsoft.GroupQueryAttention"},
    "genai": {"SimplifiedLayerNormalization", "com.microsoft.SkipSimplifiedLayerNormalization"},
    "dynamo23_llama_eager": {"RMSNormalization", "RotaryEmbedding", "Softmax"},
    "dynamo23": {"RMSNormalization", "RotaryEmbedding", "Attention"},
    "optimum": {"Pow", "ReduceMean", "Sqrt", "Softmax"},
    "gemma3": {"Pow", "ReduceMean", "Sqrt", "Tanh"},
}

# Cases (batch, seq, past). onnxruntime's CPU GroupQueryAttention takes seq > 1 after a past only at
# batch 1, and the opset-23 RotaryEmbedding of the dynamo fixtures runs only at batch 1.
PREFILL = [(1, 8, 0)]
WITH_PAST = [(1, 8, 0), (1, 3, 5), (2, 1, 5)]

# The genai builder names the head dim symbolically; synthesize_inputs needs it spelled out.
HEAD_DIM_PARAM = "kv_cache_dim"


def _id(entry: dict) -> str:
    return entry["file"]


def _stem(entry: dict) -> str:
    return entry["file"].split("/")[0].removesuffix(".onnx")


def _graph(entry: dict) -> onnx.ModelProto:
    return onnx.load(str(ROOT / entry["file"]), load_external_data=False)


def _op_types(model: onnx.ModelProto) -> set[str]:
    return {f"{n.domain}.{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type for n in model.graph.node}


def test_manifest_well_formed():
    assert ENTRIES, "run: python scripts/make_exporter_fixtures.py"
    files = [e["file"] for e in ENTRIES]
    assert len(files) == len(set(files))
    for e in ENTRIES:
        for key, typ in KEYS.items():
            assert isinstance(e.get(key), typ), (e["file"], key, e.get(key))
        assert e["expect"] in ("exact", "refuse"), e
        assert e["num_heads"] * e["head_dim"] == e["hidden"] or e["family"] == "gemma3", e
    exporters = {e["exporter"] for e in ENTRIES}
    assert {"optimum-onnx", "onnxruntime-genai", "torch.onnx dynamo", "torch.onnx torchscript"} <= exporters
    assert any(e["expect"] == "refuse" for e in ENTRIES)


def test_no_stray_files():
    listed = {ROOT / e["file"] for e in ENTRIES}
    onnx_files = set(ROOT.rglob("*.onnx"))
    assert onnx_files == listed
    # External data only where the genai builder put it: model.onnx.data beside its model.onnx.
    data = {p for p in ROOT.rglob("*") if p.is_file() and p.suffix not in (".onnx", ".json")}
    assert data == {p.with_name(p.name + ".data") for p in listed if p.parent != ROOT}
    total = sum(p.stat().st_size for p in ROOT.rglob("*") if p.is_file())
    assert total < 10 * 1024 * 1024, total


@pytest.mark.parametrize("entry", ENTRIES, ids=_id)
def test_graph_matches_manifest(entry):
    model = _graph(entry)
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset == entry["opset"]
    ops = _op_types(model)
    stem = _stem(entry)
    key = max((k for k in REQUIRED_OPS if stem.startswith(k)), key=len)
    assert REQUIRED_OPS[key] <= ops, (REQUIRED_OPS[key] - ops, sorted(ops))
    inputs = {i.name for i in model.graph.input}
    pasts = {n for n in inputs if n.startswith("past_key_values.")}
    assert bool(pasts) == entry["kv_cache"]
    if entry["kv_cache"]:
        assert len(pasts) == 2 * entry["layers"]
        assert {o.name for o in model.graph.output} >= {n.replace("past_key_values.", "present.") for n in pasts}


@pytest.mark.parametrize("entry", ENTRIES, ids=_id)
def test_runs_with_finite_outputs(entry):
    model = _graph(entry)
    dims = {HEAD_DIM_PARAM: entry["head_dim"]}
    for batch, seq, past in WITH_PAST if entry["kv_cache"] else PREFILL:
        feeds = synthesize_inputs(model, batch=batch, seq=seq, past=past, seed=3, vocab_size=entry["vocab"], dims=dims)
        outputs, provider = run_model(ROOT / entry["file"], feeds, providers=["cpu"])
        assert provider == "CPUExecutionProvider"
        case = f"batch={batch} seq={seq} past={past}"
        assert outputs["logits"].shape == (batch, seq, entry["vocab"]), case
        for name, value in outputs.items():
            assert np.all(np.isfinite(value)), f"{name} not finite ({case})"
            if name.startswith("present."):
                assert value.shape == (batch, entry["num_kv_heads"], past + seq, entry["head_dim"]), (name, case)
        assert float(outputs["logits"].std(axis=-1).mean()) > 0.5, f"near-uniform logits ({case})"
