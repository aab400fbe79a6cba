"""Role maps: inspect --json round trip, hand-written maps, checked refusals; block size and precision."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FIXTURES
from onnx import helper

from spinquant_onnx.core.equivalence import compare_models
from spinquant_onnx.core.pipeline import convert
from spinquant_onnx.errors import InputError, UnsupportedGraphError
from spinquant_onnx.match.analysis import analyze
from spinquant_onnx.match.role_map import export_roles


def _roles(path: Path) -> dict:
    analysis = analyze(onnx.load(str(path)), path.parent)
    return json.loads(json.dumps(export_roles(analysis.index, analysis.stream, analysis.roles)))


@pytest.mark.parametrize("name", ["phi3_ts.onnx", "smollm_dynamo.onnx", "qwen2_dynamo.onnx"])
def test_round_trip_gives_identical_bytes(name: str, tmp_path: Path) -> None:
    roles = tmp_path / "roles.json"
    roles.write_text(json.dumps(_roles(FIXTURES / name)))
    convert(FIXTURES / name, tmp_path / "auto.onnx")
    report = convert(FIXTURES / name, tmp_path / "mapped.onnx", roles=roles)
    assert (tmp_path / "auto.onnx").read_bytes() == (tmp_path / "mapped.onnx").read_bytes()
    assert report.validation is not None and report.validation["passed"]  # a map always validates


def test_schema_is_documented_and_versioned() -> None:
    data = _roles(FIXTURES / "llama_tied_ts.onnx")
    assert data["schema"] == "spinquant-onnx/roles" and data["version"] == 1
    assert data["hidden_size"] == 64 and data["embedding"]["layout"] == "[V,H]"
    norm = data["residual"][0]
    assert norm["kind"] == "norm" and [r["role"] for r in norm["readers"]] == ["q", "k", "v"]
    assert data["residual"][1]["kind"] == "write" and data["residual"][1]["writer"]["role"] == "o"
    assert all(r["layout"] == "[in,out]" for r in norm["readers"])


def _with_unknown_final_norm(source: Path, target: Path) -> None:
    """Rewrite the final RMSNorm's Sqrt -> Div(1, .) as Pow(., -0.5): same function, a form no table lists."""
    model = onnx.load(str(source))
    nodes = list(model.graph.node)
    sqrt = [n for n in nodes if n.op_type == "Sqrt"][-1]
    div = next(n for n in nodes if n.op_type == "Div" and sqrt.output[0] in n.input)
    exponent = helper.make_tensor("minus_half", onnx.TensorProto.FLOAT, [], [-0.5])
    model.graph.initializer.append(exponent)
    pow_node = helper.make_node("Pow", [sqrt.input[0], "minus_half"], [div.output[0]], name="custom_rsqrt")
    position = nodes.index(sqrt)
    model.graph.node.remove(div)
    model.graph.node.remove(sqrt)
    model.graph.node.insert(position, pow_node)
    onnx.save(model, str(target))


def test_hand_written_map_rotates_a_graph_the_matcher_refuses(tmp_path: Path) -> None:
    source = tmp_path / "custom.onnx"
    _with_unknown_final_norm(FIXTURES / "llama_ts.onnx", source)
    with pytest.raises(UnsupportedGraphError, match="Pow"):
        convert(source, tmp_path / "auto.onnx")
    # The user describes the last norm by hand: its input, output and gamma (from the original's map).
    roles = _roles(FIXTURES / "llama_ts.onnx")
    final = roles["residual"][-1]
    assert final["kind"] == "norm" and final["readers"][0]["role"] == "lm_head"
    final["norm"] = {k: final["norm"][k] for k in ("inputs", "output", "gamma")}
    out = tmp_path / "mapped.onnx"
    report = convert(source, out, roles=roles)
    assert report.validation["passed"] and report.validation["rel_l2"] < 1e-5
    assert compare_models(source, out, providers=["cpu"], threshold=1e-5).passed


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r["residual"][0]["readers"][1].update(weight="nope"), r"residual\[0\]\.readers\[1\].*nope"),
        (lambda r: r["residual"][1]["writer"].update(node_output="missing"), r"residual\[1\]\.writer.*missing"),
        (lambda r: r["residual"][3]["writer"].update(layout="[out,in]"), r"residual\[3\]\.writer.*layout"),
        (lambda r: r["residual"][0]["norm"].update(gamma="model.norm.weight"), r"residual\[0\].*scaled by"),
        (lambda r: r.update(version=9), "version"),
        (lambda r: r["residual"][1].update(add_output=r["residual"][3]["add_output"]), r"residual\[1\].*does not read"),
    ],
)
def test_wrong_maps_are_refused_by_entry(edit, message: str, tmp_path: Path) -> None:
    roles = copy.deepcopy(_roles(FIXTURES / "llama_ts.onnx"))
    edit(roles)
    with pytest.raises(InputError, match=message):
        convert(FIXTURES / "llama_ts.onnx", tmp_path / "r.onnx", roles=roles)
    assert not (tmp_path / "r.onnx").exists()


@pytest.mark.parametrize("block", [16, 64, 192])
def test_block_diagonal_r1_is_exact(block: int, tmp_path: Path) -> None:
    report = convert(FIXTURES / "smollm_ts.onnx", tmp_path / "r.onnx", block_size=block, validate=True)
    assert report.rotation["block_size"] == block and report.rotation["kind"] == "block-diagonal"
    assert report.validation["rel_l2"] < 1e-5


def test_block_size_must_divide_hidden(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="100"):
        convert(FIXTURES / "smollm_ts.onnx", tmp_path / "r.onnx", block_size=100)


def test_float32_precision_is_reported_and_close(tmp_path: Path) -> None:
    a = convert(FIXTURES / "llama_ts.onnx", tmp_path / "a.onnx", precision="float32", validate=True)
    convert(FIXTURES / "llama_ts.onnx", tmp_path / "b.onnx")
    assert a.rotation["precision"] == "float32" and a.validation["rel_l2"] < 1e-5
    wa = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "a.onnx")).graph.initializer}
    wb = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(tmp_path / "b.onnx")).graph.initializer}
    assert any(not np.array_equal(wa[k], wb[k]) for k in wa)  # really computed differently
    assert all(np.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
