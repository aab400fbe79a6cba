"""Issue #15 families on real transformers 5.x exports (fixtures/families): MoE, stream multipliers, no final
norm, RMSNorm without eps, dynamo optimize=False. Each is exact (R1) or refused with the way out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FIXTURES
from onnx import helper, numpy_helper

from spinquant_onnx.core.equivalence import compare_models
from spinquant_onnx.core.pipeline import convert
from spinquant_onnx.errors import UnsupportedGraphError
from spinquant_onnx.match.analysis import analyze
from spinquant_onnx.match.role_map import export_roles

FAMILIES = FIXTURES / "families"
EXACT = 1e-5
EXACT_R1 = [
    "mixtral_bmm_ts17",
    "mixtral_bmm_dy18",
    "qwen2_moe_bmm_ts17",
    "qwen2_moe_bmm_dy18",
    "qwen3_moe_bmm_ts17",
    "qwen3_moe_bmm_dy18",
    "qwen3_moe_bmm_kv_ts17",  # with a KV cache: prefill, past and decode steps on each model's own cache
    "deepseek_v3_moe_bmm_ts17",
    "gpt_oss_bmm_ts17",
    "gpt_oss_bmm_dy18",
    "granite_ts17",
    "granite_dy18",
    "helium_dy18",
    "llama_nofinalnorm_ts17",
    "llama_nofinalnorm_dy18",
    "llama_dy18_noopt",
]
MOE = [name for name in EXACT_R1 if "_bmm_" in name]


def _rotate(name: str, tmp_path: Path, **options) -> Path:
    out = tmp_path / f"{name}.onnx"
    convert(FAMILIES / f"{name}.onnx", out, **options)
    return out


@pytest.mark.parametrize("name", EXACT_R1)
def test_r1_exact(name: str, tmp_path: Path) -> None:
    out = _rotate(name, tmp_path)
    for seed in (0, 1):  # a second input: the router must pick the same experts on tokens it was not traced on
        result = compare_models(FAMILIES / f"{name}.onnx", out, providers=["cpu"], threshold=EXACT, seed=seed)
        assert result.rel_l2 < EXACT, result.to_dict()
        assert result.argmax_agreement == 1.0


def test_deepseek_dynamo_within_its_router_conditioning(tmp_path: Path) -> None:
    """R1 is exact on the router logits (3e-6 abs); a float32 Sigmoid of logits near -10, renormalized over
    two experts, amplifies that to 1.4e-5 on the logits. The original itself moves 4e-6 when only its
    router weights are re-rounded at float32 precision (README, "MoE")."""
    out = _rotate("deepseek_v3_moe_bmm_dy18", tmp_path)
    result = compare_models(FAMILIES / "deepseek_v3_moe_bmm_dy18.onnx", out, providers=["cpu"], threshold=1e-4)
    assert 1e-6 < result.rel_l2 < 1e-4 and result.argmax_agreement == 1.0


@pytest.mark.parametrize("name", MOE)
def test_moe_r2_r3_r4_exact(name: str, tmp_path: Path) -> None:
    """R4's online Hadamard on every expert's activations (column and row form), its inverse in the stack."""
    wanted = {"r2": True, "r3": True, "r4": True}
    if "deepseek" in name:  # MLA: R2/R3 refused by name (#14, heads.py)
        with pytest.raises(UnsupportedGraphError, match="multi-head latent attention|cannot tell head_dim"):
            _rotate(name, tmp_path, **wanted)
        wanted = {"r4": True}
    out = _rotate(name, tmp_path, **wanted)  # the KV export too: #14 walks the cache Concat's new keys
    result = compare_models(FAMILIES / f"{name}.onnx", out, providers=["cpu"], threshold=EXACT, own_cache=True)
    assert result.rel_l2 < EXACT and result.argmax_agreement == 1.0
    analysis = analyze(onnx.load(out), out.parent)
    assert any(e.linear.experts for e in analysis.roles.all_linears() if e.role == "expert_down")


def _roles(name: str) -> list[str]:
    analysis = analyze(onnx.load(FAMILIES / f"{name}.onnx"), FAMILIES)
    return [entry.role for entry in analysis.roles.all_linears()]


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("mixtral_bmm_ts17", {"router": 2, "expert_gate_up": 2, "expert_down": 2}),
        ("qwen2_moe_bmm_dy18", {"router": 2, "expert_gate_up": 2, "expert_down": 2, "shared_expert_gate": 2,
                                "shared_gate": 2, "shared_up": 2, "shared_down": 2}),
        ("deepseek_v3_moe_bmm_ts17", {"router": 1, "expert_gate_up": 1, "expert_down": 1, "down": 1}),
        ("gpt_oss_bmm_dy18", {"router": 2, "expert_gate_up": 2, "expert_down": 2}),
    ],
)
def test_moe_roles(name: str, expected: dict[str, int]) -> None:
    roles = _roles(name)
    assert {role: roles.count(role) for role in expected} == expected


def test_role_map_names_experts_and_raw_reads() -> None:
    analysis = analyze(onnx.load(FAMILIES / "mixtral_bmm_dy18.onnx"), FAMILIES)
    data = export_roles(analysis.index, analysis.stream, analysis.roles)
    experts = [r for item in data["residual"] for r in item.get("readers", []) + [item.get("writer") or {}]
               if r.get("experts")]
    assert {(e["role"], e["layout"], e["experts"]) for e in experts} == {
        ("expert_gate_up", "[E,out,in]", 4), ("expert_down", "[E,out,in]", 4)
    }
    analysis = analyze(onnx.load(FAMILIES / "llama_nofinalnorm_ts17.onnx"), FAMILIES)
    data = export_roles(analysis.index, analysis.stream, analysis.roles)
    assert data["residual"][-1]["kind"] == "read" and data["residual"][-1]["readers"][0]["role"] == "lm_head"


@pytest.mark.parametrize(
    "name", ["mixtral_bmm_ts17", "qwen2_moe_bmm_dy18", "gpt_oss_bmm_ts17", "llama_nofinalnorm_dy18"]
)
def test_role_map_round_trip_is_byte_identical(name: str, tmp_path: Path) -> None:
    source = FAMILIES / f"{name}.onnx"
    analysis = analyze(onnx.load(source), FAMILIES)
    data = export_roles(analysis.index, analysis.stream, analysis.roles)
    convert(source, tmp_path / "a.onnx")
    convert(source, tmp_path / "b.onnx", roles=data, trust_roles=True)
    assert (tmp_path / "a.onnx").read_bytes() == (tmp_path / "b.onnx").read_bytes()


# --- mutations of real exports that routing must refuse: each keeps every shape, so only the rules catch them


def _save(model: onnx.ModelProto, tmp_path: Path) -> Path:
    path = tmp_path / "mutated.onnx"
    onnx.save(model, path)
    return path


def test_reversing_the_hidden_axis_before_lm_head_is_refused(tmp_path: Path) -> None:
    """x[..., ::-1] keeps the shape but permutes the hidden axis: a Slice on the last axis is not routing."""
    model = onnx.load(FAMILIES / "llama_nofinalnorm_dy18.onnx")
    lm_head = next(n for n in model.graph.node if "logits" in n.output)
    consts = {"rev.starts": [-1], "rev.ends": [-(2**62)], "rev.axes": [-1], "rev.steps": [-1]}
    for name, value in consts.items():
        model.graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.int64), name))
    node = helper.make_node("Slice", [lm_head.input[0], *consts], ["reversed"], name="reverse_hidden")
    model.graph.node.insert(list(model.graph.node).index(lm_head), node)
    lm_head.input[0] = "reversed"
    with pytest.raises(UnsupportedGraphError, match="reverse_hidden.*token-routing op that keeps the hidden axis"):
        convert(_save(model, tmp_path), tmp_path / "out.onnx")
    assert not (tmp_path / "out.onnx").exists()


def test_per_channel_scale_on_expert_outputs_is_refused(tmp_path: Path) -> None:
    """Experts' outputs times a [H] vector (instead of a per-token router weight) does not commute with R1."""
    model = onnx.load(FAMILIES / "mixtral_bmm_dy18.onnx")
    mul = next(n for n in model.graph.node if n.op_type == "Mul" and n.input[0].startswith("squeeze_1"))
    model.graph.initializer.append(numpy_helper.from_array(np.linspace(0.5, 1.5, 64, dtype=np.float32), "per_ch"))
    mul.input[1] = "per_ch"
    with pytest.raises(UnsupportedGraphError, match="not shown to keep the hidden axis"):
        convert(_save(model, tmp_path), tmp_path / "out.onnx")


def test_expert_output_read_elsewhere_is_refused(tmp_path: Path) -> None:
    """A routed expert output that also leaves the graph would change under rotation."""
    model = onnx.load(FAMILIES / "mixtral_bmm_dy18.onnx")
    model.graph.output.append(helper.make_tensor_value_info("squeeze_1", onnx.TensorProto.FLOAT, None))
    with pytest.raises(UnsupportedGraphError, match="squeeze_1"):
        convert(_save(model, tmp_path), tmp_path / "out.onnx")


def test_gpt_oss_expert_bias_is_rotated_with_its_experts() -> None:
    """gpt-oss adds a gathered [E, H] down bias after the experts: it is the expert writer's bias (axis 1)."""
    analysis = analyze(onnx.load(FAMILIES / "gpt_oss_bmm_dy18.onnx"), FAMILIES)
    downs = [e.linear for e in analysis.roles.all_linears() if e.role == "expert_down"]
    assert downs and all(d.bias is not None and d.bias_axis == 1 for d in downs)
    assert all(analysis.store.shape(d.bias) == (4, 64) for d in downs)
