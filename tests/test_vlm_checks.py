"""VLM pieces that do not belong together, the visual check that must run, and routed deepstack entries (#19)."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import FIXTURES
from onnx import helper

from spinquant_onnx.cli import main
from spinquant_onnx.core.pipeline import convert
from spinquant_onnx.errors import UnsupportedGraphError
from spinquant_onnx.integrations.dispatch import apply_spinquant
from spinquant_onnx.integrations.vlm import VlmReport
from spinquant_onnx.io.torch_pickle import load_torch
from spinquant_onnx.match.analysis import analyze

VLM = FIXTURES / "vlm"
ROOT = FIXTURES.parent
ROUTED = VLM / "qwen3_vl_routed" / "backbone.onnx"
_spec = importlib.util.spec_from_file_location("routed_fixture", ROOT / "scripts" / "make_routed_deepstack_fixture.py")
routed_fixture = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(routed_fixture)


def run(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    capfd.readouterr()
    code = main(argv)
    out = capfd.readouterr()
    return code, out.out, out.err


def _logits(model: onnx.ModelProto | Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    source = str(model) if isinstance(model, Path) else model.SerializeToString()
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(["logits"], feeds)[0]


def _rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(a))


# ------------------------------------------------------------------------------------- mismatched pairs


@pytest.mark.parametrize(("backbone", "visual"), [("qwen3_vl", "qwen2_5_vl"), ("qwen2_5_vl", "qwen3_vl")])
def test_mismatched_backbone_and_visual_are_refused(backbone: str, visual: str, tmp_path: Path,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    for extra in (["--embedding", str(VLM / backbone / "embedding.pth")], []):  # offline and online
        code, _, err = run(["rotate-vlm", "--backbone", str(VLM / backbone / "backbone.onnx"), "--visual",
                            str(VLM / visual / "visual.onnx"), "--out-dir", str(out), *extra], capfd)
        assert code == 2
        assert "these pieces are not from the same model" in err and len(err.strip().splitlines()) == 1
        assert not out.exists()


def test_routed_backbone_pairs_with_its_encoder() -> None:
    """The routed backbone adds the same two deepstack features, from one stacked input: it pairs with Qwen3-VL."""
    from spinquant_onnx.integrations.vlm import stream_routes

    routes = stream_routes(analyze(onnx.load(str(ROUTED))))
    assert len(routes) == 2 and {tuple(r.inputs) for r in routes} == {("deepstack_embeds",)}
    assert {n.op_type for r in routes for n in r.nodes} == {"Where", "Gather"}


# ------------------------------------------------------------------------------------- the visual check


def test_validate_synthesizes_a_consistent_grid(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "report.json"
    code, out, err = run(["rotate-vlm", "--backbone", str(VLM / "qwen3_vl" / "backbone.onnx"), "--visual",
                          str(VLM / "qwen3_vl" / "visual.onnx"), "--embedding", str(VLM / "qwen3_vl" / "embedding.pth"),
                          "--out-dir", str(tmp_path / "out"), "--validate", "--providers", "cpu", "--report",
                          str(report)], capfd)
    assert code == 0, err
    visual = json.loads(report.read_text())["vlm"]["validation"]["visual"]
    assert visual["inputs"]["grid_thw"]["values"] == [[1, 8, 8], [1, 8, 8]]  # 128 pixel rows over 2 images
    assert visual["rel_l2"] < 1e-5
    assert "visual rel L2" in out and "grid_thw [[1, 8, 8], [1, 8, 8]]" in out


def test_visual_check_that_cannot_run_refuses_before_any_work(tmp_path: Path, capfd: pytest.CaptureFixture[str]
                                                               ) -> None:
    visual = onnx.load(str(VLM / "qwen3_vl" / "visual.onnx"))
    pixels = next(i for i in visual.graph.input if i.name == "pixel_values")
    pixels.type.tensor_type.shape.dim[0].dim_param = "patches"  # dynamic: no pixel count to build a grid from
    folder = tmp_path / "in"
    folder.mkdir()
    onnx.save(visual, str(folder / "visual.onnx"))
    out = tmp_path / "out"
    args = ["rotate-vlm", "--backbone", str(VLM / "qwen3_vl" / "backbone.onnx"), "--visual",
            str(folder / "visual.onnx"), "--embedding", str(VLM / "qwen3_vl" / "embedding.pth"), "--out-dir", str(out)]
    code, _, err = run([*args, "--validate"], capfd)
    assert code == 2 and not out.exists()
    assert "--validate cannot check the rotated visual encoder: input 'pixel_values' has a dynamic shape" in err
    assert "--visual-inputs" in err
    feeds = tmp_path / "feeds.npz"  # the way out the message names: the encoder's inputs, given
    rng = np.random.default_rng(0)
    np.savez(feeds, pixel_values=rng.standard_normal((128, 96)).astype(np.float32),
             grid_thw=np.array([[1, 8, 8], [1, 8, 8]], dtype=np.int64))
    code, stdout, err = run([*args, "--validate", "--visual-inputs", str(feeds), "--providers", "cpu"], capfd)
    assert code == 0, err
    assert "visual rel L2" in stdout


def test_online_mode_says_the_visual_side_needed_no_check(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(["rotate-vlm", "--backbone", str(VLM / "qwen3_vl" / "backbone.onnx"), "--visual",
                          str(VLM / "qwen3_vl" / "visual.onnx"), "--out-dir", str(tmp_path / "out"), "--validate",
                          "--providers", "cpu"], capfd)
    assert code == 0, err
    assert "visual not checked: not rotated" in out and "visual rel L2" not in out


# --------------------------------------------------------------------------------- routed deepstack


def test_routed_fixture_matches_the_pre_scattered_backbone() -> None:
    plain, routed = routed_fixture.sample()
    want = _logits(VLM / "qwen3_vl" / "backbone.onnx", plain)
    np.testing.assert_allclose(_logits(ROUTED, routed), want, atol=1e-5)
    without = dict(routed, deepstack_embeds=np.zeros_like(routed["deepstack_embeds"]))
    assert _rel_l2(want, _logits(ROUTED, without)) > 1e-3  # the routed features really reach the logits


def test_routed_deepstack_r1_is_exact(tmp_path: Path) -> None:
    out = tmp_path / "r.onnx"
    report = convert(ROUTED, out, validate=True, providers=["cpu"]).to_dict()
    inputs = {o["input"] for o in report["online_rotations"]}
    assert inputs == {"inputs_embeds", "deepstack_embeds"}
    _, feeds = routed_fixture.sample(seed=4)
    want, got = _logits(ROUTED, feeds), _logits(out, feeds)
    assert _rel_l2(want, got) < 1e-5
    assert (want.argmax(-1) == got.argmax(-1)).all()


def test_routed_deepstack_offline_with_table_and_visual_is_exact(tmp_path: Path) -> None:
    """The table and the encoder's writers take R1; the routed backbone, fed their rotated outputs, is unchanged."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("visual.onnx", "embedding.pth"):
        shutil.copy(VLM / "qwen3_vl" / name, folder / name)
    shutil.copy(ROUTED, folder / "backbone.onnx")
    out = tmp_path / "out"
    assert main(["rotate-vlm", "--backbone", str(folder / "backbone.onnx"), "--visual", str(folder / "visual.onnx"),
                 "--embedding", str(folder / "embedding.pth"), "--out-dir", str(out), "--validate",
                 "--providers", "cpu"]) == 0
    rng = np.random.default_rng(1)
    pixels = {"pixel_values": rng.standard_normal((128, 96)).astype(np.float32),
              "grid_thw": np.array([[1, 8, 8], [1, 8, 8]], dtype=np.int64)}

    def pipeline(where: Path) -> np.ndarray:
        table = load_torch(where / "embedding.pth")
        table = table if isinstance(table, np.ndarray) else next(iter(table.values()))
        session = ort.InferenceSession(str(where / "visual.onnx"), providers=["CPUExecutionProvider"])
        image, *deep = session.run(None, pixels)
        _, feeds = routed_fixture.sample()
        ids = np.random.default_rng(2).integers(0, table.shape[0], size=feeds["inputs_embeds"].shape[:2])
        embeds = table[ids].astype(np.float32)
        mask = feeds["visual_pos_masks"]
        embeds[mask] = image[: int(mask.sum())]
        tokens = int(mask[0].sum())
        stacked = np.stack([d[:tokens] for d in deep]).astype(np.float32)
        return _logits(where / "backbone.onnx", dict(feeds, inputs_embeds=embeds, deepstack_embeds=stacked))

    want, got = pipeline(folder), pipeline(out)
    assert _rel_l2(want, got) < 1e-5 and (want.argmax(-1) == got.argmax(-1)).all()


@pytest.mark.parametrize("reader", ["graph output", "node"])
def test_routed_value_read_elsewhere_is_refused(reader: str) -> None:
    model = onnx.load(str(ROUTED))
    if reader == "node":
        model.graph.node.append(helper.make_node("ReduceSum", ["ds.layer0"], ["spy"], keepdims=0, name="spy"))
        model.graph.output.append(helper.make_tensor_value_info("spy", onnx.TensorProto.FLOAT, None))
        message = r"'ds.layer0' enters the residual stream .* read by node 'spy' \(ReduceSum\)"
    else:
        model.graph.output.append(helper.make_tensor_value_info("ds.layer0", onnx.TensorProto.FLOAT, None))
        message = "'ds.layer0' enters the residual stream .* reaches graph output 'ds.layer0'"
    with pytest.raises(UnsupportedGraphError, match=message):
        analyze(model)


def test_where_without_a_zero_branch_is_not_a_route() -> None:
    model = onnx.load(str(ROUTED))
    for tensor in model.graph.initializer:
        if tensor.name == "ds.zero":
            tensor.CopyFrom(onnx.numpy_helper.from_array(np.array(0.5, dtype=np.float32), "ds.zero"))
    with pytest.raises(UnsupportedGraphError, match="not a linear layer"):
        analyze(model)


# ------------------------------------------------------------------------------------- API spellings


def test_visual_model_keyword_is_accepted(tmp_path: Path) -> None:
    backbone = onnx.load(str(VLM / "qwen3_vl" / "backbone.onnx"))
    visual = onnx.load(str(VLM / "qwen3_vl" / "visual.onnx"))
    table = load_torch(VLM / "qwen3_vl" / "embedding.pth")
    table = np.array(table if isinstance(table, np.ndarray) else next(iter(table.values())))
    report = apply_spinquant(backbone, visual_model=visual, embedding=table)
    assert isinstance(report, VlmReport) and report.mode == "offline"
    assert len(report.visual["writers"]) == 3


def test_unknown_keyword_is_one_line() -> None:
    from spinquant_onnx.errors import SpinQuantError

    with pytest.raises(SpinQuantError, match=r"unknown keyword visual_encoder=; valid: visual="):
        apply_spinquant(onnx.load(str(FIXTURES / "llama_ts.onnx")), visual_encoder=None)
