"""R2, R3, R4 on the committed TorchScript and dynamo exports: exact, really applied, refused when unsafe."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import FIXTURES, manifest
from onnx import TensorProto, helper, numpy_helper

from spinquant_onnx.core.equivalence import compare_models, synthesize_inputs
from spinquant_onnx.core.pipeline import convert
from spinquant_onnx.errors import UnsupportedGraphError, UnsupportedSizeError
from spinquant_onnx.graph.index import GraphIndex
from spinquant_onnx.integrations.dispatch import apply_spinquant
from spinquant_onnx.io.tensor_store import TensorStore
from spinquant_onnx.match.analysis import analyze
from spinquant_onnx.match.heads import attention_sites
from spinquant_onnx.rewrite.fast_hadamard_nodes import METHODS, hadamard_nodes, insert_online_hadamard
from spinquant_onnx.rotation.kinds import make_rotation

ENTRIES = manifest()
EXACT = 1e-5
COMBOS = {"r1": {}, "r2": {"r2": True}, "r3": {"r3": True}, "r4": {"r4": True}, "all": dict(r2=True, r3=True, r4=True)}
# Every single rotation on one export of each family shape; everything at once on every fixture.
SINGLES = [
    "llama_ts.onnx",
    "llama_dynamo.onnx",
    "phi3_ts.onnx",
    "qwen3_dynamo.onnx",
    "smollm_ts.onnx",
    "llama_h320_dynamo.onnx",
]
CASES = [(e["file"], "all") for e in ENTRIES] + [(f, c) for f in SINGLES for c in ("r1", "r2", "r3", "r4")]


def _rotated(name: str, **options) -> tuple[onnx.ModelProto, onnx.ModelProto, dict]:
    original = onnx.load(str(FIXTURES / name))
    model = onnx.load(str(FIXTURES / name))
    report = apply_spinquant(model, **options)
    return original, model, report.to_dict()


@pytest.mark.parametrize(("name", "combo"), CASES, ids=[f"{n}-{c}" for n, c in CASES])
def test_combination_is_exact(name: str, combo: str) -> None:
    original, rotated, report = _rotated(name, **COMBOS[combo])
    onnx.checker.check_model(rotated)
    result = compare_models(original, rotated, providers=["cpu"], threshold=EXACT)
    assert result.rel_l2 < EXACT, result.to_dict()
    assert result.argmax_agreement == 1.0
    entry = next(e for e in ENTRIES if e["file"] == name)
    if "r2" in COMBOS[combo]:
        assert [r["head_dim"] for r in report["rotation"]["r2"]] == [entry["head_dim"]] * entry["layers"]
    if "r3" in COMBOS[combo]:
        assert len(report["rotation"]["r3"]) == entry["layers"]
    if "r4" in COMBOS[combo]:
        assert [r["order"] for r in report["rotation"]["r4"]] == [entry["intermediate"]] * entry["layers"]


@pytest.mark.parametrize("entry", ENTRIES, ids=[e["file"] for e in ENTRIES])
def test_head_geometry_matches_the_config(entry: dict) -> None:
    analysis = analyze(onnx.load(str(FIXTURES / entry["file"]), load_external_data=False), FIXTURES)
    sites = attention_sites(analysis.index, analysis.roles)
    assert len(sites) == entry["layers"]
    for site in sites:
        geometry = site.geometry
        assert (geometry.num_heads, geometry.num_kv_heads, geometry.head_dim) == (
            entry["num_heads"],
            entry["num_kv_heads"],
            entry["head_dim"],
        ), geometry.evidence
        assert site.v is not None and site.v.width == entry["num_kv_heads"] * entry["head_dim"]


def _outputs(model: onnx.ModelProto, names: list[str]) -> dict[str, np.ndarray]:
    """Run with extra graph outputs exposed (intermediate tensors by name)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = synthesize_inputs(model, seq=6, vocab_size=64)
    return dict(zip(names, session.run(names, feeds), strict=True))


def test_r2_rotates_each_value_head() -> None:
    """The v_proj output of the R2 model is the R1-only model's, times R2 in each head_dim block."""
    name = "qwen2_ts.onnx"  # q/k/v with bias: the bias turns too
    _, plain, _ = _rotated(name)
    _, rotated, report = _rotated(name, r2=True)
    v_output = next(n.output[0] for n in plain.graph.node if "v_proj" in n.name and n.op_type == "Add")
    before, after = _outputs(plain, [v_output])[v_output], _outputs(rotated, [v_output])[v_output]
    r2 = make_rotation("hadamard", 16)
    expected = r2.apply(before.reshape(*before.shape[:-1], 2, 16), -1).reshape(before.shape)
    np.testing.assert_allclose(after, expected, atol=1e-5)
    assert not np.allclose(after, before, atol=1e-3)
    assert report["rotation"]["r2"][0]["num_kv_heads"] == 2


def test_r2_on_fused_qkv_turns_only_the_v_columns() -> None:
    _, plain, _ = _rotated("phi3_dynamo.onnx")
    _, rotated, report = _rotated("phi3_dynamo.onnx", r2=True)
    assert report["rotation"]["r2"][0]["v_columns"] == [96, 128]
    qkv = next(n for n in plain.graph.node if n.op_type == "MatMul").output[0]
    before, after = _outputs(plain, [qkv])[qkv], _outputs(rotated, [qkv])[qkv]
    np.testing.assert_allclose(after[..., :96], before[..., :96], atol=1e-5)
    assert not np.allclose(after[..., 96:], before[..., 96:], atol=1e-3)


def test_r3_and_r4_insert_online_nodes_that_rotate() -> None:
    _, rotated, report = _rotated("llama_dynamo.onnx", r3=True, r4=True)
    online = report["online_rotations"]
    assert len(online) == 3 * 2  # queries, keys, down_proj input per layer
    assert {o["order"] for o in online} == {16, 96}
    down = next(o for o in online if o["order"] == 96)
    values = _outputs(rotated, [down["input"], down["output"]])
    x, y = values[down["input"]], values[down["output"]]
    np.testing.assert_allclose(y, make_rotation("hadamard", 96).apply(x, -1), atol=1e-5)


def _with_node_on_value_path(name: str) -> onnx.ModelProto:
    """The fixture with a Relu between v_proj and its head split: R2 cannot pass it."""
    model = onnx.load(str(FIXTURES / name))
    analysis = analyze(model)
    v = attention_sites(analysis.index, analysis.roles)[0].v
    reshape = next(u.node for u in analysis.index.users(v.tensor) if u.node.op_type == "Reshape")
    relu = helper.make_node("Relu", [v.tensor], [v.tensor + ".relu"], name="inserted_relu")
    reshape.input[0] = relu.output[0]
    position = list(model.graph.node).index(reshape)
    model.graph.node.insert(position, relu)
    return model


def test_r2_refuses_a_value_path_it_cannot_pass() -> None:
    model = _with_node_on_value_path("llama_dynamo.onnx")
    before = model.SerializeToString()
    with pytest.raises(UnsupportedGraphError, match="inserted_relu"):
        apply_spinquant(model, r2=True, r3=True, r4=True)
    assert model.SerializeToString() == before, "a refused rotation must leave the model untouched"


def _with_intermediate(name: str, width: int) -> onnx.ModelProto:
    """The fixture with its MLPs cut to ``width`` channels (gate/up columns, down rows): still a valid model."""
    model = onnx.load(str(FIXTURES / name))
    analysis = analyze(model)
    del model.graph.value_info[:]
    for block in analysis.roles.blocks:
        for part in block.parts:
            if part.kind != "mlp":
                continue
            linears = [(e.linear, e.linear.out_axis) for e in part.readers] + [(part.writer.linear, None)]
            for linear, out_axis in linears:
                tensor = analysis.store.tensors[linear.weight]
                axis = linear.in_axis if out_axis is None else out_axis
                values = np.take(numpy_helper.to_array(tensor), np.arange(width), axis=axis)
                tensor.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(values), tensor.name))
    return model


def test_r4_refuses_an_intermediate_without_hadamard() -> None:
    model = _with_intermediate("llama_dynamo.onnx", 90)
    with pytest.raises(UnsupportedSizeError, match="order 90"):
        apply_spinquant(model, r4=True)


def test_r4_on_a_paley_intermediate_is_exact() -> None:
    original = _with_intermediate("llama_ts.onnx", 44)  # 44 = 43 + 1: Paley I
    rotated = onnx.ModelProto()
    rotated.CopyFrom(original)
    report = apply_spinquant(rotated, r4=True).to_dict()
    assert report["rotation"]["r4"][0]["order"] == 44
    result = compare_models(original, rotated, providers=["cpu"], threshold=EXACT)
    assert result.rel_l2 < EXACT and result.argmax_agreement == 1.0


def test_r4_on_a_williamson_intermediate_is_exact() -> None:
    original = _with_intermediate("llama_ts.onnx", 92)  # 92 = 4 * 23: Williamson quadruple (hadamard_sequences)
    rotated = onnx.ModelProto()
    rotated.CopyFrom(original)
    report = apply_spinquant(rotated, r4=True).to_dict()
    assert report["rotation"]["r4"][0]["order"] == 92
    result = compare_models(original, rotated, providers=["cpu"], threshold=EXACT)
    assert result.rel_l2 < EXACT and result.argmax_agreement == 1.0


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [2, 12, 16, 20, 92, 96, 128, 576, 856])
@pytest.mark.parametrize("elem_type", [TensorProto.FLOAT, TensorProto.FLOAT16])
def test_online_hadamard_forms_match_the_rotation(method: str, n: int, elem_type: int) -> None:
    built = hadamard_nodes("x", n, elem_type, prefix="h", opset=17, method=method, out="y")
    graph = helper.make_graph(
        built.nodes,
        "h",
        [helper.make_tensor_value_info("x", elem_type, [None, None, n])],
        [helper.make_tensor_value_info("y", elem_type, [None, None, n])],
        built.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    x = np.random.default_rng(n).standard_normal((2, 3, n)).astype(dtype)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = session.run(None, {"x": x})[0]
    assert y.dtype == dtype and y.shape == x.shape
    tolerance = 1e-5 if elem_type == TensorProto.FLOAT else 1e-2 * np.sqrt(np.log2(n) + 1)
    np.testing.assert_allclose(y, make_rotation("hadamard", n).apply(x, -1), atol=tolerance)


def test_online_hadamard_on_a_graph_output_renames_its_producer() -> None:
    """Rotating a tensor that is also a graph output: readers and the output both see the rotated value."""
    nodes = [helper.make_node("Relu", ["x"], ["k"]), helper.make_node("Neg", ["k"], ["z"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [3, 8]) for n in ("k", "z")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    index = GraphIndex(model, TensorStore(model))
    inserted = insert_online_hadamard(index, "k", 8, elem_type=TensorProto.FLOAT, reason="test", method="butterfly")
    assert inserted.output == "k"
    onnx.checker.check_model(model)
    x = np.random.default_rng(0).standard_normal((3, 8)).astype(np.float32)
    k, z = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    expected = make_rotation("hadamard", 8).apply(np.maximum(x, 0), -1)
    np.testing.assert_allclose(k, expected, atol=1e-5)
    np.testing.assert_allclose(z, -expected, atol=1e-5)


# ------------------------------------------------------------------------------------ KV-cache exports

def _has_past(path: Path) -> bool:
    graph = onnx.load(str(path), load_external_data=False)
    return any("past" in i.name for i in graph.graph.input)


EXPORTS = FIXTURES / "exporters"
KV_MODELS = sorted(p for p in EXPORTS.rglob("*.onnx") if "int4" not in str(p) and _has_past(p))


@pytest.mark.skipif(not KV_MODELS, reason="no KV-cache exports under fixtures/exporters")
@pytest.mark.parametrize("path", KV_MODELS, ids=[str(p.relative_to(FIXTURES)) for p in KV_MODELS])
def test_kv_cache_exports_decode_identically(path: Path, tmp_path: Path) -> None:
    """Prefill, then decode steps with each model fed its own (differently rotated) cache."""
    graph = onnx.load(str(path), load_external_data=False)
    fused = any(n.op_type in ("GroupQueryAttention", "Attention") for n in graph.graph.node)
    # R3 must follow the rotary embedding, which a fused attention op applies inside itself: refused there.
    options = {"r2": True, "r3": not fused, "r4": True}
    report = convert(path, tmp_path / "r.onnx", validate=True, threshold=EXACT, **options).to_dict()
    assert report["rotation"]["r2"] and report["rotation"]["r4"]
    result = report["validation"]
    assert result["passed"] and result["rel_l2"] < EXACT, result
    assert any("decode" in case for case in result["cases"])


# ------------------------------------------------------------------- head paths from probed shapes (#14)

FAMILIES = FIXTURES / "families"


def _family(name: str) -> Path:
    path = FAMILIES / name
    if not path.is_file():
        pytest.skip(f"{name} not in fixtures/families")
    return path


@pytest.mark.parametrize(
    ("name", "geometry"),
    [
        ("llama_sdpa_tf5_ts17.onnx", (4, 2, 16)),  # repeat_kv Reshape with a run-time shape (was refused)
        ("llama_mqa_sdpa_tf5_dy18.onnx", (4, 1, 16)),  # MQA, sdpa decomposed by dynamo (was refused)
        ("gemma2_eager_tf5_ts17.onnx", (4, 2, 16)),  # soft-capped scores: Div, Tanh, Mul before the mask
        ("phi3_sdpa_tf5_dy18.onnx", None),  # partial rotary: R3 after the Concat along head_dim
        ("llama_kv_ts17.onnx", None),  # KV cache: new keys told from the cache by dataflow, not by name
    ],
)
def test_r2_r3_r4_exact_where_local_patterns_refused(name: str, geometry: tuple | None, tmp_path: Path) -> None:
    path = _family(name)
    report = convert(path, tmp_path / "r.onnx", validate=True, threshold=EXACT, r2=True, r3=True, r4=True).to_dict()
    validation = report["validation"]
    assert validation["passed"] and validation["rel_l2"] < EXACT and validation["argmax_agreement"] == 1.0
    assert report["rotation"]["r2"] and report["rotation"]["r3"] and report["rotation"]["r4"]
    if geometry is not None:
        r2 = report["rotation"]["r2"][0]
        assert (r2["num_heads"], r2["num_kv_heads"], r2["head_dim"]) == geometry


@pytest.mark.parametrize("name", ["deepseek_v3_mla_ts17.onnx", "deepseek_v3_mla_dy18.onnx"])
def test_mla_is_refused_by_name_and_r4_is_exact(name: str, tmp_path: Path) -> None:
    path = _family(name)
    for flag in ("r2", "r3"):
        with pytest.raises(UnsupportedGraphError, match="multi-head latent attention"):
            convert(path, tmp_path / f"{flag}.onnx", **{flag: True})
        assert not (tmp_path / f"{flag}.onnx").exists()
    report = convert(path, tmp_path / "r4.onnx", validate=True, threshold=EXACT, r4=True).to_dict()
    assert report["validation"]["rel_l2"] < EXACT


def test_probe_records_distinct_sizes() -> None:
    """Batch 2, sequence 3: the head split's output shows heads and head_dim as themselves."""
    from spinquant_onnx.graph.probe import graph_shapes

    analysis = analyze(onnx.load(str(FIXTURES / "llama_ts.onnx")), FIXTURES)
    site = attention_sites(analysis.index, analysis.roles)[0]
    shapes = graph_shapes(analysis.index)
    reshape = next(u.node for u in analysis.index.users(site.v.tensor) if u.node.op_type == "Reshape")
    assert shapes[site.v.tensor] == (2, 3, 32)
    assert shapes[reshape.output[0]] == (2, 3, 2, 16)
    assert any("probed shape" in line for line in site.geometry.evidence)


def test_head_path_rules_prove_and_refuse() -> None:
    """The rule table on concrete shapes: a head split keeps blocks, a Reshape cutting head_dim does not."""
    from spinquant_onnx.match.head_paths import RULES, Step, next_axis

    def index_for(shape_in: list[int], shape_out: list[int]) -> tuple[GraphIndex, onnx.NodeProto]:
        node = helper.make_node("Reshape", ["x", "s"], ["y"])
        graph = helper.make_graph(
            [node],
            "g",
            [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape_in)],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape_out)],
            [numpy_helper.from_array(np.array(shape_out, np.int64), "s")],
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        return GraphIndex(model, TensorStore(model)), node

    index, node = index_for([2, 3, 32], [2, 3, 2, 16])
    assert next_axis(index, Step(node, 0, 2), 16, RULES) == 3
    index, node = index_for([2, 3, 32], [2, 3, 4, 8])  # head_dim 16 cut in halves
    assert next_axis(index, Step(node, 0, 2), 16, RULES) is None
    index, node = index_for([2, 4, 3, 16], [8, 3, 16])  # sdpa's [batch * heads, seq, head_dim]
    assert next_axis(index, Step(node, 0, 3), 16, RULES) == 2


def test_concat_rule_passes_the_cache_but_not_a_constant() -> None:
    """Keys joined with a graph input (the cache) along the sequence keep blocks; with a constant, refused."""
    from spinquant_onnx.match.head_paths import RULES, Step, next_axis

    def concat_with(other: str, initializers: list) -> tuple[GraphIndex, onnx.NodeProto]:
        node = helper.make_node("Concat", [other, "k"], ["y"], axis=2)
        inputs = [helper.make_tensor_value_info("k", TensorProto.FLOAT, [2, 2, 3, 16])]
        if not initializers:
            inputs.append(helper.make_tensor_value_info(other, TensorProto.FLOAT, [2, 2, 5, 16]))
        graph = helper.make_graph(
            [node], "g", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 2, 8, 16])], initializers
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
        return GraphIndex(model, TensorStore(model)), node

    index, node = concat_with("past", [])
    assert next_axis(index, Step(node, 1, 3), 16, RULES) == 3
    sink = numpy_helper.from_array(np.ones((2, 2, 5, 16), np.float32), "sink")
    index, node = concat_with("sink", [sink])
    assert next_axis(index, Step(node, 1, 3), 16, RULES) is None
