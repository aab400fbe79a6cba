"""Issue #13: never write a wrong or unloadable model.

The graph-edit fixtures (``scripts/make_edit_fixtures.py``, ``fixtures/edits/``) each reproduce one case that
used to exit 0 with a bad model; each must now be exact or refused. The output gate, the rotated-model
record, the dtype-aware validation and the no-op refusals are tested here too, and a hypothesis fuzz runs
``convert`` *without* validation on mutated fixtures: every output it writes must load in onnxruntime and
match the original, so the gate (not validation) is what stands between a rewrite bug and a written file.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FIXTURES
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper
from test_fuzz_models import APPLY, MUTATIONS

from spinquant_onnx import cli
from spinquant_onnx.core import gate, metadata, tolerance
from spinquant_onnx.core.equivalence import compare_models, infer_vocab_size, run_model, synthesize_inputs
from spinquant_onnx.core.pipeline import convert
from spinquant_onnx.errors import InputError, OutputGateError, SpinQuantError, UnsupportedGraphError
from spinquant_onnx.graph import shapes
from spinquant_onnx.integrations.dispatch import apply_spinquant

EDITS = FIXTURES / "edits"
FAMILIES = FIXTURES / "families"  # torch exports for #13 (scripts/make_family_fixtures.py, branch fixtures)
EXACT = 1e-5
ALL = {"r2": True, "r3": True, "r4": True}


def _exact(name: str, **options) -> dict:
    """Rotate in memory; the result must pass the gate, load in ORT and match the original exactly."""
    original = onnx.load(str(EDITS / name))
    model = onnx.load(str(EDITS / name))
    report = apply_spinquant(model, **options).to_dict()
    result = compare_models(original, model, providers=["cpu"], threshold=EXACT)
    assert result.passed and result.rel_l2 < EXACT, result.to_dict()
    return report


# ------------------------------------------------------------------------------------ the #13 cases


@pytest.mark.parametrize("options", [{}, ALL], ids=["r1", "all"])
def test_per_channel_eps_is_not_an_rmsnorm(options: dict) -> None:
    model = onnx.load(str(EDITS / "per_channel_eps.onnx"))
    with pytest.raises(UnsupportedGraphError, match="RMSNorm"):
        apply_spinquant(model, **options)


def test_validation_sees_the_per_channel_eps() -> None:
    """ORT's extended fusions run a per-channel-eps norm as an RMSNorm with eps[0]; validation must not."""
    result = compare_models(FIXTURES / "llama_ts.onnx", EDITS / "per_channel_eps.onnx", providers=["cpu"])
    assert result.rel_l2 > 0.5 and not result.passed


@pytest.mark.parametrize("name", ["rotary_free_fused_transpose.onnx", "fused_qkv_split.onnx", "fused_qkv_packed.onnx"])
def test_rotary_free_r3_is_exact_per_head(name: str) -> None:
    """Without rotary, R3 goes on the head-split Reshape's output ([.., heads, head_dim]), never on k_proj's."""
    report = _exact(name, r3=True)
    entries = report["rotation"]["r3"]
    assert len(entries) == 2 and {e["head_dim"] for e in entries} == {16}
    model = onnx.load(str(EDITS / name))
    producers = {o: n for n in model.graph.node for o in n.output}
    for entry in entries:
        keys = entry["keys"]["input"]
        assert producers[keys].op_type in ("Reshape", "Gather"), keys  # the head split, not the k projection


def test_fused_transpose_gqa_r3_is_exact() -> None:
    """repeat_kv on K^T (head_dim not last): the probed-shape rules (#14) prove the axis, so R1-R4 are exact."""
    report = _exact("rotary_free_fused_transpose_gqa.onnx", **ALL)
    assert len(report["rotation"]["r2"]) == 2
    assert len(report["rotation"]["r3"]) == 2


@pytest.mark.parametrize("name", ["fused_qkv_split.onnx", "fused_qkv_packed.onnx"])
def test_r2_on_fused_qkv_turns_the_v_columns(name: str) -> None:
    report = _exact(name, **ALL)
    assert [r["v_columns"] for r in report["rotation"]["r2"]] == [[128, 192]] * 2
    assert all(r["num_heads"] == 4 and r["num_kv_heads"] == 4 for r in report["rotation"]["r2"])


@pytest.mark.parametrize("flags", [["--r2"], ["--r3"], ["--r2", "--r3", "--r4"]])
def test_a_rotation_with_nothing_to_do_is_refused(flags: list[str], tmp_path: Path, capfd) -> None:
    out = tmp_path / "r.onnx"
    assert cli.main(["rotate", str(EDITS / "mlp_only.onnx"), str(out), *flags]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no attention block" in err[0] and "nothing to rotate" in err[0]
    assert not out.exists()
    assert cli.main(["rotate", str(EDITS / "mlp_only.onnx"), str(out), "--r4"]) == 0


def test_fp16_without_value_info_types_online_nodes_from_inference(tmp_path: Path) -> None:
    """Gemma3 fp16 (sandwich norms: online R1 nodes) declares no value_info; the inserted nodes must be fp16."""
    report = convert(EDITS / "gemma3_ts_fp16.onnx", tmp_path / "r.onnx", validate=True, providers=["cpu"], **ALL)
    model = onnx.load(str(tmp_path / "r.onnx"))
    inserted = {n.name for n in model.graph.node if n.name.startswith("spinquant/")}
    assert inserted and report.online_rotations
    types = {t.data_type for t in model.graph.initializer if t.name.startswith("spinquant")} - {TensorProto.INT64}
    assert types == {TensorProto.FLOAT16}  # every inserted matrix; int64 are the kron form's shape constants
    validation = report.validation
    assert validation["passed"] and validation["rounding_noise"] > 0
    assert validation["threshold"] == pytest.approx(tolerance.NOISE_MULTIPLE * validation["rounding_noise"])
    assert validation["rel_l2"] < validation["threshold"]


@pytest.mark.parametrize("name", ["smollm3_nope_ts17.onnx", "smollm3_nope_dy18.onnx"])
def test_smollm3_nope_layers_take_r3_per_head(name: str) -> None:
    """SmolLM3's NoPE layer has no rotary: its keys are rotated after the head split, never on k_proj's output."""
    original = onnx.load(str(FAMILIES / name))
    model = onnx.load(str(FAMILIES / name))
    producers = {o: n for n in original.graph.node for o in n.output}
    report = apply_spinquant(model, **ALL).to_dict()
    result = compare_models(original, model, providers=["cpu"], threshold=EXACT)
    assert result.passed and result.rel_l2 < EXACT, result.to_dict()
    entries = report["rotation"]["r3"]
    assert [e["block"] for e in entries] == [0, 1] and {e["head_dim"] for e in entries} == {16}
    for entry in entries:
        source = producers[entry["keys"]["input"].removesuffix(".pre_hadamard")]
        assert source.op_type != "MatMul", (entry["block"], source.name)


@pytest.mark.parametrize("name", ["gemma3_ts17_fp16.onnx", "gemma3_dy18_fp16_novi.onnx", "llama_dy18_fp16_novi.onnx"])
def test_fp16_torch_exports_rotate_and_validate(name: str, tmp_path: Path) -> None:
    """fp16 TorchScript / dynamo exports without value_info: every rewrite loads and passes the noise check."""
    report = convert(FAMILIES / name, tmp_path / "r.onnx", validate=True, providers=["cpu"], **ALL).to_dict()
    validation = report["validation"]
    assert validation["passed"] and validation["rounding_noise"] > 0, validation
    assert validation["rel_l2"] < validation["threshold"]
    model = onnx.load(str(tmp_path / "r.onnx"))
    matrices = {t.data_type for t in model.graph.initializer if t.name.startswith("spinquant")} - {TensorProto.INT64}
    assert matrices == {TensorProto.FLOAT16}


# ------------------------------------------------------------------------------------- dtype-aware check


def test_fp16_threshold_still_catches_a_wrong_rotation() -> None:
    """A correct fp16 rotation sits within the noise multiple; one mixed head is far above it."""
    original = onnx.load(str(EDITS / "gemma3_ts_fp16.onnx"))
    rotated = onnx.load(str(EDITS / "gemma3_ts_fp16.onnx"))
    apply_spinquant(rotated, r2=True)
    good = compare_models(original, rotated, providers=["cpu"])
    assert good.passed and good.rounding_noise is not None
    weights = [t for t in rotated.graph.initializer if t.data_type == TensorProto.FLOAT16 and len(t.dims) == 2]
    target = weights[1]  # a projection weight: swap two of its input rows (a wrong rotation of two entries)
    values = numpy_helper.to_array(target).copy()
    values[[0, 1]] = values[[1, 0]]
    target.CopyFrom(numpy_helper.from_array(values, target.name))
    bad = compare_models(original, rotated, providers=["cpu"])
    assert not bad.passed and bad.rel_l2 > 10 * good.threshold, (bad.rel_l2, good.threshold)


def test_fp32_keeps_the_fixed_threshold() -> None:
    original = onnx.load(str(FIXTURES / "llama_ts.onnx"))
    rotated = onnx.load(str(FIXTURES / "llama_ts.onnx"))
    apply_spinquant(rotated)
    result = compare_models(original, rotated, providers=["cpu"], threshold=1e-4)
    assert result.rounding_noise is None and result.threshold == 1e-4


# --------------------------------------------------------------------------------------------- metadata


def test_rotated_model_is_marked_refused_and_forced(tmp_path: Path, capfd) -> None:
    first, second = tmp_path / "a.onnx", tmp_path / "b.onnx"
    assert cli.main(["rotate", str(FIXTURES / "llama_ts.onnx"), str(first), "--r3", "--r4", "--seed", "3",
                     "--rotation", "random-hadamard"]) == 0
    done = metadata.read(onnx.load(str(first), load_external_data=False))
    assert done["rotation"] == "random-hadamard" and done["seed"] == "3" and done["order"] == "64"
    assert done["r2"] is False and done["r3"] is True and done["r4"] is True
    model = onnx.load(str(first))
    assert set(done["online_nodes"]) == {n.name for n in model.graph.node if n.name.startswith("spinquant/")}
    assert len(done["online_nodes"]) > 0
    capfd.readouterr()
    assert cli.main(["rotate", str(first), str(second)]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already rotated" in err[0] and "--force" in err[0]
    assert not second.exists()
    assert cli.main(["rotate", str(first), str(second), "--force", "--validate", "--providers", "cpu"]) == 0
    assert cli.main(["inspect", str(first)]) == 0
    assert "rotated by spinquant-onnx" in capfd.readouterr().out


def test_apply_spinquant_marks_and_refuses() -> None:
    model = onnx.load(str(FIXTURES / "llama_ts.onnx"))
    apply_spinquant(model)
    assert metadata.read(model)["rotation"] == "hadamard"
    with pytest.raises(InputError, match="already rotated"):
        apply_spinquant(model)
    apply_spinquant(model, force=True)


# -------------------------------------------------------------------------------------------- the gate


def test_gate_refuses_an_inserted_node_of_the_wrong_type(tmp_path: Path, monkeypatch, capfd) -> None:
    """If a rewrite typed an online node wrongly (the old float32 default), the gate stops it: exit 3."""
    monkeypatch.setattr(shapes, "tensor_elem_type", lambda index, tensor: TensorProto.FLOAT)
    import spinquant_onnx.rewrite.rotate_r1 as r1

    monkeypatch.setattr(r1, "tensor_elem_type", lambda index, tensor: TensorProto.FLOAT)
    source = EDITS / "gemma3_ts_fp16.onnx"
    before = source.read_bytes()
    out = tmp_path / "out" / "r.onnx"
    assert cli.main(["rotate", str(source), str(out)]) == 3
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("spinquant-onnx: internal error: output gate:")
    assert not out.exists()
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # no staging left
    assert source.read_bytes() == before
    model = onnx.load(str(source))
    with pytest.raises(OutputGateError):
        apply_spinquant(model)
    assert metadata.read(model) is None  # refused in memory: nothing committed


def test_gate_refuses_a_head_dim_hadamard_on_a_full_projection() -> None:
    """The old R3 bug: a head_dim MatMul on k_proj's [.., kv * head_dim] output is caught without weights."""
    model = onnx.load(str(EDITS / "rotary_free_fused_transpose.onnx"))
    baseline = gate.input_baseline(model)
    k_proj = next(n for n in model.graph.node if n.name == "layers.0/k_proj")
    h = numpy_helper.from_array(np.eye(16, dtype=np.float32), "spinquant.test.H")
    model.graph.initializer.append(h)
    bad = helper.make_node("MatMul", [k_proj.output[0], h.name], ["k.rotated"], name="spinquant/test")
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            if name == k_proj.output[0]:
                node.input[slot] = "k.rotated"
    position = list(model.graph.node).index(k_proj) + 1
    model.graph.node.insert(position, bad)
    with pytest.raises(OutputGateError, match="output gate"):
        gate.check_output(model, baseline)


@pytest.mark.parametrize(
    "path",
    sorted(p for p in [*FIXTURES.glob("*.onnx"), *EDITS.glob("*.onnx")] if "per_channel" not in p.name),
    ids=lambda p: p.name,
)
def test_every_fixture_passes_the_gate_with_everything_on(path: Path) -> None:
    model = onnx.load(str(path))
    try:
        apply_spinquant(model, **ALL)  # the gate runs inside; a refusal must be a typed one
    except OutputGateError:
        raise
    except SpinQuantError:
        pass


# -------------------------------------------------------------------------------------------- the fuzz

FUZZ_NAMES = ["llama_ts.onnx", "qwen3_dynamo.onnx", "phi3_ts.onnx", "edits/fused_qkv_packed.onnx",
              "edits/rotary_free_fused_transpose.onnx", "edits/gemma3_ts_fp16.onnx"]  # fmt: skip
FUZZ_SOURCES = {name: (FIXTURES / name).read_bytes() for name in FUZZ_NAMES}
FUZZ_EXAMPLES = int(os.environ.get("SPINQUANT_GATE_FUZZ_EXAMPLES", "30"))
FLAG_SETS = [{}, {"r2": True}, {"r3": True}, {"r4": True}, ALL]


@st.composite
def _mutated(draw: st.DrawFn) -> tuple[bytes, dict, list[str]]:
    name = draw(st.sampled_from(FUZZ_NAMES))
    model = onnx.load_from_string(FUZZ_SOURCES[name])
    steps = [name]
    has_fp32 = any(t.data_type == TensorProto.FLOAT and np.prod(t.dims) > 0 for t in model.graph.initializer)
    kinds = [k for k in MUTATIONS if has_fp32 or k != "poison value"]  # poisoning picks a float32 weight
    for kind in draw(st.lists(st.sampled_from(kinds), min_size=0, max_size=2)):
        steps.append(APPLY[kind](draw, model))
    options = draw(st.sampled_from(FLAG_SETS))
    return model.SerializeToString(), options, [*steps, str(options)]


def _original_finite(path: Path, seed: int) -> bool:
    graph = onnx.load(str(path))
    feeds = synthesize_inputs(graph, batch=1, seq=8, past=0, seed=seed, vocab_size=infer_vocab_size(graph))
    outputs, _ = run_model(path, feeds, ["cpu"])
    return all(np.isfinite(v).all() for v in outputs.values() if np.issubdtype(v.dtype, np.floating))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=FUZZ_EXAMPLES <= 30,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # fmt: skip
@given(_mutated())
def test_fuzz_every_unvalidated_output_loads_and_matches(case: tuple[bytes, dict, list[str]]) -> None:
    data, options, steps = case
    with tempfile.TemporaryDirectory(prefix="spinquant_gate_fuzz_") as folder:
        source, out = Path(folder) / "m.onnx", Path(folder) / "out" / "r.onnx"
        source.write_bytes(data)
        try:
            report = convert(source, out, **options)  # no validation: the gate alone guards the output
        except OutputGateError as exc:
            raise AssertionError(f"the gate caught a rewrite bug: {exc}: {steps}") from exc
        except SpinQuantError:
            assert not out.exists(), steps
            return
        # A float16 tensor the rotation rewrote is rounded to float16 again: a mutation that retypes a weight
        # (in a float32 model) costs up to a few units of fp16 roundoff, which no rotation can avoid.
        graph = onnx.load(str(source), load_external_data=False)
        types = {t.name: t.data_type for t in graph.graph.initializer}
        rounded = any(types.get(t["tensor"]) in tolerance.LOW_PRECISION for t in report.tensors_rewritten)
        threshold = 4 * 2.0**-11 if rounded else 1e-4
        try:
            result = compare_models(source, out, providers=["cpu"], own_cache=bool(options), threshold=threshold)
        except InputError as exc:  # the original itself does not run (a mutation broke it): not comparable
            if "original model" in str(exc):
                return
            raise AssertionError(f"written output does not run: {exc}: {steps}") from exc
        assert result.passed or not _original_finite(source, seed=0), (result.rel_l2, steps)
