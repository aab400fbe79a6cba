"""VLM rotation end to end on the committed Qwen2.5-VL / Qwen3-VL fixtures (scripts/make_vlm_fixtures.py).

The pipeline is the deployed one: pixels -> visual.onnx -> image embeddings written at the image-token
positions of the token embeddings looked up in embedding.pth (numpy) -> backbone.onnx -> logits; Qwen3-VL's
deepstack features are scattered the same way into their own backbone inputs.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper

from spinquant_onnx.cli import main
from spinquant_onnx.errors import UnsupportedGraphError
from spinquant_onnx.integrations.dispatch import apply_spinquant
from spinquant_onnx.integrations.vlm import apply_vlm, convert_vlm
from spinquant_onnx.io.torch_pickle import load_torch

ROOT = Path(__file__).resolve().parents[1]
VLM = ROOT / "fixtures" / "vlm"
MANIFEST = {m["family"]: m for m in json.loads((VLM / "manifest.json").read_text())["models"]}
FAMILIES = sorted(MANIFEST)
SAMPLE = json.loads((VLM / "manifest.json").read_text())["sample"]
TOLERANCE = 1e-5


def _session(model: onnx.ModelProto | Path) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def _sample(family: str, seed: int = 0) -> dict[str, np.ndarray]:
    info = MANIFEST[family]
    rng = np.random.default_rng(seed)
    batch, seq, start = SAMPLE["batch"], SAMPLE["seq"], SAMPLE["image_start"]
    tokens, image_id = info["image_tokens_per_image"], info["image_token_id"]
    ids = rng.integers(1, image_id, size=(batch, seq), dtype=np.int64)
    ids[:, start : start + tokens] = image_id
    patches, width = info["pixel_values_shape_per_image"]
    return {
        "input_ids": ids,
        "pixel_values": rng.standard_normal((info["images"] * patches, width)).astype(np.float32),
        "grid_thw": np.array([info["grid_thw"]] * info["images"], dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (3, batch, seq)).copy(),
    }


def visual_outputs(visual: onnx.ModelProto | Path, sample: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = _session(visual)
    return session.run(None, {i.name: sample[i.name] for i in session.get_inputs()})


def logits(
    visual: onnx.ModelProto | Path, backbone: onnx.ModelProto | Path, table: np.ndarray, sample: dict, family: str
) -> np.ndarray:
    """pixels -> visual -> merge with the table (numpy) -> backbone logits."""
    image_id = MANIFEST[family]["image_token_id"]
    ids = sample["input_ids"]
    mask = ids == image_id
    image, *deepstack = visual_outputs(visual, sample)
    embeds = np.asarray(table, dtype=np.float32)[ids]
    embeds[mask] = image
    feeds = {
        "inputs_embeds": embeds,
        "attention_mask": np.ones(ids.shape, np.int64),
        "position_ids": sample["position_ids"],
    }
    for number, feature in enumerate(deepstack):
        scattered = np.zeros(embeds.shape, dtype=np.float32)
        scattered[mask] = feature
        feeds[f"deepstack_embeds_{number}"] = scattered
    return _session(backbone).run(["logits"], feeds)[0]


def _pieces(family: str) -> tuple[onnx.ModelProto, onnx.ModelProto, np.ndarray]:
    folder = VLM / family
    table = np.array(load_torch(folder / "embedding.pth"))  # writable copy
    return onnx.load(str(folder / "visual.onnx")), onnx.load(str(folder / "backbone.onnx")), table


def _rel_l2(expected: np.ndarray, actual: np.ndarray) -> float:
    return float(np.linalg.norm(actual.astype(np.float64) - expected) / np.linalg.norm(expected))


def _weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


@pytest.fixture(scope="module", params=FAMILIES)
def reference(request) -> tuple[str, dict, np.ndarray]:
    family = request.param
    sample = _sample(family)
    visual, backbone, table = _pieces(family)
    return family, sample, logits(visual, backbone, table, sample, family)


def test_offline_rotation_preserves_the_pipeline(reference) -> None:
    family, sample, expected = reference
    visual, backbone, table = _pieces(family)
    original_visual, original_table = _weights(visual), table.copy()
    report = apply_vlm(backbone, visual=visual, embedding=table, rotation="random-hadamard", seed=5)

    got = logits(visual, backbone, table, sample, family)
    assert _rel_l2(expected, got) < TOLERANCE
    assert np.array_equal(expected.argmax(-1), got.argmax(-1))

    assert report.mode == "offline"
    rotated = report.visual["writers"]
    assert len(rotated) == 1 + MANIFEST[family]["deepstack_inputs"]
    assert [w["weight"].split("visual.")[-1].rsplit(".", 1)[0] for w in rotated] == MANIFEST[family]["visual_writers"]
    assert report.entries[0] == "inputs_embeds" and len(report.entries) == 1 + MANIFEST[family]["deepstack_inputs"]
    assert not np.allclose(table, original_table)  # the table really is E @ R1 now

    # Every visual writer matters: putting any one projection back breaks the pipeline.
    for writer in rotated:
        undone = onnx.ModelProto()
        undone.CopyFrom(visual)
        target = next(t for t in undone.graph.initializer if t.name == writer["weight"])
        target.CopyFrom(onnx.numpy_helper.from_array(original_visual[writer["weight"]], writer["weight"]))
        assert _rel_l2(expected, logits(undone, backbone, table, sample, family)) > 1e-3, writer["weight"]


def test_online_rotation_leaves_visual_and_table_alone(reference) -> None:
    family, sample, expected = reference
    visual, backbone, table = _pieces(family)
    before = _weights(visual)
    report = apply_vlm(backbone, visual=visual)

    got = logits(visual, backbone, table, sample, family)
    assert _rel_l2(expected, got) < TOLERANCE
    assert np.array_equal(expected.argmax(-1), got.argmax(-1))
    assert report.mode == "online" and report.visual["rotated"] is False
    after = _weights(visual)
    assert all(np.array_equal(before[name], after[name]) for name in before)
    online = [n for n in backbone.graph.node if n.name.startswith("spinquant/online/")]
    assert sorted(n.input[0] for n in online) == sorted(report.entries)


def test_apply_spinquant_delegates_to_vlm(reference) -> None:
    family, sample, expected = reference
    visual, backbone, table = _pieces(family)
    torch = pytest.importorskip("torch")
    tensor = torch.from_numpy(table.copy())
    report = apply_spinquant(backbone, visual=visual, embedding=tensor)
    assert report.mode == "offline"
    got = logits(visual, backbone, tensor.numpy(), sample, family)
    assert _rel_l2(expected, got) < TOLERANCE


def test_convert_and_cli_write_loadable_pieces(reference, tmp_path: Path) -> None:
    family, sample, expected = reference
    torch = pytest.importorskip("torch")
    folder = VLM / family
    out = tmp_path / "out"
    feeds = tmp_path / "visual_inputs.npz"
    np.savez(feeds, **{name: sample[name] for name in MANIFEST[family]["visual_inputs"]})
    code = main([
        "rotate-vlm", "--backbone", str(folder / "backbone.onnx"), "--visual", str(folder / "visual.onnx"),
        "--embedding", str(folder / "embedding.pth"), "--out-dir", str(out), "--validate",
        "--visual-inputs", str(feeds), "--report", str(tmp_path / "report.json"),
    ])  # fmt: skip
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["backbone.onnx", "embedding.pth", "visual.onnx"]
    report = json.loads((tmp_path / "report.json").read_text())["vlm"]
    assert report["validation"]["passed"] and report["validation"]["visual"]["rel_l2"] < TOLERANCE
    assert report["validation"]["backbone"]["rel_l2"] < TOLERANCE

    table = torch.load(out / "embedding.pth", weights_only=True)
    assert isinstance(table, torch.Tensor) and table.dtype == torch.float32
    got = logits(out / "visual.onnx", out / "backbone.onnx", table.numpy(), sample, family)
    assert _rel_l2(expected, got) < TOLERANCE
    assert np.array_equal(expected.argmax(-1), got.argmax(-1))


def test_convert_without_embedding_is_online(reference, tmp_path: Path) -> None:
    family, sample, expected = reference
    folder = VLM / family
    report = convert_vlm(folder / "backbone.onnx", folder / "visual.onnx", None, tmp_path, validate=True)
    assert report.mode == "online" and len(report.online_rotations) == len(report.entries)
    table = np.array(load_torch(folder / "embedding.pth"))
    got = logits(tmp_path / "visual.onnx", tmp_path / "backbone.onnx", table, sample, family)
    assert _rel_l2(expected, got) < TOLERANCE


def test_backbone_with_its_own_embedding_refuses_a_table(tmp_path: Path) -> None:
    backbone = onnx.load(str(ROOT / "fixtures" / "llama_ts.onnx"))
    before = backbone.SerializeToString()
    table = np.zeros((128, 64), dtype=np.float32)
    with pytest.raises(UnsupportedGraphError, match="rotated twice"):
        apply_vlm(backbone, embedding=table)
    assert backbone.SerializeToString() == before and not table.any()
    visual = onnx.load(str(VLM / "qwen2_5_vl" / "visual.onnx"))
    with pytest.raises(UnsupportedGraphError, match="no inputs_embeds-style input"):
        apply_vlm(backbone, visual=visual)
    assert (
        main(
            [
                "rotate-vlm",
                "--backbone",
                str(ROOT / "fixtures" / "llama_ts.onnx"),
                "--embedding",
                str(VLM / "qwen2_5_vl" / "embedding.pth"),
                "--out-dir",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert not list(tmp_path.iterdir())


def test_visual_writer_read_elsewhere_is_refused() -> None:
    visual, backbone, table = _pieces("qwen3_vl")
    gemm = next(n for n in visual.graph.node if n.name == "/visual/merger/linear_fc2/Gemm")
    visual.graph.node.append(helper.make_node("Relu", [gemm.output[0]], ["leak"], name="leak"))
    visual.graph.output.append(helper.make_tensor_value_info("leak", onnx.TensorProto.FLOAT, None))
    with pytest.raises(UnsupportedGraphError, match="'leak' \\(Relu\\)"):
        apply_vlm(backbone, visual=visual, embedding=table)


def test_backbone_input_read_outside_the_stream_is_refused() -> None:
    visual, backbone, table = _pieces("qwen2_5_vl")
    backbone.graph.node.append(helper.make_node("ReduceMax", ["inputs_embeds"], ["peek"], name="peek", keepdims=0))
    backbone.graph.output.append(helper.make_tensor_value_info("peek", onnx.TensorProto.FLOAT, None))
    with pytest.raises(UnsupportedGraphError, match="'inputs_embeds'.*'peek' \\(ReduceMax\\)"):
        apply_vlm(backbone, visual=visual, embedding=table)


def test_embedding_dict_keeps_its_other_entries(tmp_path: Path) -> None:
    from spinquant_onnx.io.torch_pickle import save_torch
    from spinquant_onnx.rotation.kinds import make_rotation

    folder = VLM / "qwen2_5_vl"
    table = np.array(load_torch(folder / "embedding.pth"))
    extra = np.arange(5, dtype=np.int64)
    save_torch(tmp_path / "embed.pth", {"model.embed_tokens.weight": table, "step": extra})
    report = convert_vlm(folder / "backbone.onnx", None, tmp_path / "embed.pth", tmp_path / "out", validate=True)
    assert report.mode == "offline" and report.visual is None
    written = load_torch(tmp_path / "out" / "embed.pth")
    assert list(written) == ["model.embed_tokens.weight", "step"] and np.array_equal(written["step"], extra)
    expected = make_rotation("hadamard", table.shape[1]).apply(table, 1).astype(np.float32)
    assert np.array_equal(written["model.embed_tokens.weight"], expected)
