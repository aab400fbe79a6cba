"""Tests for spinquant_onnx.core.equivalence on tiny hand-built decoders (CPU only)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spinquant_onnx.core import equivalence as validate
from spinquant_onnx.core.equivalence import (
    compare_models,
    infer_vocab_size,
    resolve_providers,
    run_model,
    synthesize_inputs,
)
from spinquant_onnx.errors import InputError, SpinQuantError, ValidationFailedError

VOCAB, HIDDEN, KV_HEADS, HEAD_DIM = 32, 8, 2, 4
CPU = "CPUExecutionProvider"


def _model(nodes, inputs, outputs, initializers) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "toy", inputs, outputs, initializer=initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    onnx.checker.check_model(model)
    return model


def _weights(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    shapes = {
        "embed": (VOCAB, HIDDEN),
        "lm_head": (HIDDEN, VOCAB),
        "wk": (HIDDEN, KV_HEADS * HEAD_DIM),
        "wv": (HIDDEN, KV_HEADS * HEAD_DIM),
    }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


def toy_decoder(weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """input_ids -> Gather(embed) -> MatMul(lm_head) -> logits."""
    w = weights or _weights()
    return _model(
        [
            helper.make_node("Gather", ["embed", "input_ids"], ["x"]),
            helper.make_node("MatMul", ["x", "lm_head"], ["logits"]),
        ],
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])],
        [
            helper.make_tensor_value_info(
                "logits", TensorProto.FLOAT, ["batch_size", "sequence_length", VOCAB]
            )
        ],
        [numpy_helper.from_array(w[n], n) for n in ("embed", "lm_head")],
    )


def kv_decoder(weights: dict[str, np.ndarray] | None = None) -> onnx.ModelProto:
    """A decoder with past_key_values inputs and present outputs; logits depend on the whole cache."""
    w = weights or _weights()
    kv_shape = ["batch_size", KV_HEADS, "past_sequence_length", HEAD_DIM]
    present_shape = ["batch_size", KV_HEADS, "total_sequence_length", HEAD_DIM]
    consts = [
        numpy_helper.from_array(np.array([0, 0, KV_HEADS, HEAD_DIM], dtype=np.int64), "heads_shape"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "last_axis"),
        numpy_helper.from_array(np.array([1, 2, 3], dtype=np.int64), "cache_axes"),
        numpy_helper.from_array(np.array([1, 2], dtype=np.int64), "bcast_axes"),
        numpy_helper.from_array(np.array(0.01, dtype=np.float32), "pos_scale"),
    ]
    nodes = [
        helper.make_node("Gather", ["embed", "input_ids"], ["tok"]),
        helper.make_node("Cast", ["position_ids"], ["pos_f"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["pos_f", "pos_scale"], ["pos_s"]),
        helper.make_node("Unsqueeze", ["pos_s", "last_axis"], ["pos_u"]),
        helper.make_node("Add", ["tok", "pos_u"], ["x"]),
    ]
    for kind in ("key", "value"):
        weight = "wk" if kind == "key" else "wv"
        nodes += [
            helper.make_node("MatMul", ["x", weight], [f"{kind}_flat"]),
            helper.make_node("Reshape", [f"{kind}_flat", "heads_shape"], [f"{kind}_heads"]),
            helper.make_node("Transpose", [f"{kind}_heads"], [f"{kind}_new"], perm=[0, 2, 1, 3]),
            helper.make_node(
                "Concat", [f"past_key_values.0.{kind}", f"{kind}_new"], [f"present.0.{kind}"], axis=2
            ),
            helper.make_node("ReduceMean", [f"present.0.{kind}", "cache_axes"], [f"{kind}_mean"], keepdims=0),
            helper.make_node("Unsqueeze", [f"{kind}_mean", "bcast_axes"], [f"{kind}_bias"]),
        ]
    nodes += [
        helper.make_node("MatMul", ["x", "lm_head"], ["raw_logits"]),
        helper.make_node("Add", ["raw_logits", "key_bias"], ["biased"]),
        helper.make_node("Add", ["biased", "value_bias"], ["logits"]),
    ]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info(
            "attention_mask", TensorProto.INT64, ["batch_size", "past_sequence_length + 1"]
        ),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("past_key_values.0.key", TensorProto.FLOAT, kv_shape),
        helper.make_tensor_value_info("past_key_values.0.value", TensorProto.FLOAT, kv_shape),
    ]
    outputs = [
        helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", VOCAB]),
        helper.make_tensor_value_info("present.0.key", TensorProto.FLOAT, present_shape),
        helper.make_tensor_value_info("present.0.value", TensorProto.FLOAT, present_shape),
    ]
    initializers = [numpy_helper.from_array(array, name) for name, array in w.items()]
    return _model(nodes, inputs, outputs, initializers + consts)


def _perturbed(name: str, delta: float = 1e-2) -> dict[str, np.ndarray]:
    weights = _weights()
    weights[name] = weights[name].copy()
    weights[name][0, 0] += delta
    return weights


# ----------------------------------------------------------------------------------------- providers


def test_resolve_providers_cpu() -> None:
    assert resolve_providers(["cpu"]) == [CPU]
    assert resolve_providers([CPU]) == [CPU]
    assert resolve_providers(["CPU"]) == [CPU]


def test_resolve_providers_always_ends_with_cpu() -> None:
    assert resolve_providers()[-1] == CPU
    assert resolve_providers(["cuda"])[-1] == CPU
    assert resolve_providers([])[-1] == CPU


def test_resolve_providers_drops_cuda_that_does_not_load() -> None:
    if validate._provider_loads("CUDAExecutionProvider"):
        pytest.skip("CUDA really works on this machine")
    assert resolve_providers(["cuda", "cpu"]) == [CPU]
    assert resolve_providers(["CUDAExecutionProvider"]) == [CPU]
    assert resolve_providers(None) == [CPU]


def test_resolve_providers_rejects_unknown_name() -> None:
    with pytest.raises(SpinQuantError, match="'vulkan'.*valid names: cpu, cuda"):
        resolve_providers(["vulkan"])
    with pytest.raises(SpinQuantError, match="'cdua'"):
        resolve_providers(["cpu", "cdua"])


# -------------------------------------------------------------------------------------------- inputs


def _inputs_graph() -> onnx.ModelProto:
    """Only inputs matter to synthesize_inputs; covers every dim-naming convention we resolve."""
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "seq_plus_past"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch", "seq"]),
        helper.make_tensor_value_info(
            "past_key_values.3.key", TensorProto.FLOAT16, ["batch_size", 4, "past_sequence_length", 16]
        ),
        helper.make_tensor_value_info("total_thing", TensorProto.FLOAT, ["total_sequence_length"]),
        helper.make_tensor_value_info("all_len", TensorProto.FLOAT, ["all_sequence_length", "mystery"]),
        helper.make_tensor_value_info("cache_position", TensorProto.INT64, ["sequence_length"]),
        helper.make_tensor_value_info("num_logits_to_keep", TensorProto.INT64, []),
        helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1]),
        helper.make_tensor_value_info("embed", TensorProto.FLOAT, [VOCAB, HIDDEN]),
    ]
    init = numpy_helper.from_array(np.zeros((VOCAB, HIDDEN), np.float32), "embed")
    graph = helper.make_graph([], "inputs_only", inputs, [], initializer=[init])
    return helper.make_model(graph)


def test_synthesize_inputs_resolves_dims() -> None:
    feeds = synthesize_inputs(_inputs_graph(), batch=2, seq=3, past=5, vocab_size=10)
    assert "embed" not in feeds  # inputs that are also initializers are not fed
    assert feeds["input_ids"].shape == (2, 3) and feeds["input_ids"].dtype == np.int64
    assert feeds["input_ids"].min() >= 0 and feeds["input_ids"].max() < 10
    np.testing.assert_array_equal(feeds["attention_mask"], np.ones((2, 8), np.int64))
    np.testing.assert_array_equal(feeds["position_ids"], [[5, 6, 7], [5, 6, 7]])
    assert feeds["past_key_values.3.key"].shape == (2, 4, 5, 16)
    assert feeds["past_key_values.3.key"].dtype == np.float16
    assert feeds["total_thing"].shape == (8,)
    assert feeds["all_len"].shape == (8, 3)  # unknown symbolic dim -> seq
    np.testing.assert_array_equal(feeds["cache_position"], [5, 6, 7])
    assert feeds["num_logits_to_keep"].shape == () and feeds["num_logits_to_keep"] == 0
    assert feeds["use_cache_branch"].tolist() == [True]


def test_synthesize_inputs_empty_past() -> None:
    feeds = synthesize_inputs(_inputs_graph())
    assert feeds["input_ids"].shape == (1, 8)
    assert feeds["input_ids"].max() < validate.DEFAULT_VOCAB_SIZE
    assert feeds["past_key_values.3.key"].shape == (1, 4, 0, 16)
    assert feeds["attention_mask"].shape == (1, 8)
    assert feeds["use_cache_branch"].tolist() == [False]


def test_synthesize_inputs_is_deterministic() -> None:
    a = synthesize_inputs(_inputs_graph(), seed=3, past=2)
    b = synthesize_inputs(_inputs_graph(), seed=3, past=2)
    c = synthesize_inputs(_inputs_graph(), seed=4, past=2)
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(a["past_key_values.3.key"], c["past_key_values.3.key"])


def test_attention_mask_expression_dim_is_past_plus_seq() -> None:
    feeds = synthesize_inputs(kv_decoder(), batch=2, seq=3, past=5)
    assert feeds["attention_mask"].shape == (2, 8)  # declared "past_sequence_length + 1"


def test_infer_vocab_size() -> None:
    assert infer_vocab_size(toy_decoder()) == VOCAB
    model = toy_decoder()
    model.graph.output[0].type.tensor_type.shape.dim[-1].dim_param = "vocab"
    assert infer_vocab_size(model) == VOCAB  # from the Gather'd embedding table
    model.graph.node[0].op_type = "Identity"
    assert infer_vocab_size(model) is None


# ---------------------------------------------------------------------------------------- comparison


def test_identical_models_pass() -> None:
    result = compare_models(toy_decoder(), toy_decoder())
    assert result.passed
    assert result.rel_l2 == 0.0 and result.max_abs == 0.0 and result.argmax_agreement == 1.0
    assert result.provider == CPU
    assert result.cases == ["batch=1 seq=8 past=0"]
    assert [o.name for o in result.outputs] == ["logits"]


def test_perturbed_weight_fails() -> None:
    result = compare_models(toy_decoder(), toy_decoder(_perturbed("lm_head")))
    assert not result.passed
    assert result.rel_l2 > result.threshold
    assert result.max_abs > 0


def test_kv_decoder_identical_passes_over_both_cases() -> None:
    result = compare_models(kv_decoder(), kv_decoder(), providers=["cpu"])
    assert result.passed and result.rel_l2 == 0.0 and result.argmax_agreement == 1.0
    assert result.provider == CPU
    assert result.cases == [
        "batch=1 seq=8 past=0",
        "batch=1 seq=3 past=5",
        "batch=2 seq=1 past=6",
        "2 decode steps, each model on its own cache",
    ]
    diffs = {o.name: o for o in result.outputs}
    assert set(diffs) == {"logits", "present.0.key", "present.0.value"}
    assert diffs["logits"].argmax_agreement == 1.0
    assert diffs["present.0.key"].argmax_agreement is None


def test_kv_decoder_perturbed_cache_projection_fails() -> None:
    result = compare_models(kv_decoder(), kv_decoder(_perturbed("wk")))
    diffs = {o.name: o for o in result.outputs}
    assert not result.passed
    assert diffs["present.0.key"].rel_l2 > result.threshold
    assert diffs["present.0.value"].rel_l2 == 0.0


def test_missing_output_is_a_mismatch() -> None:
    rotated = kv_decoder()
    del rotated.graph.output[2]
    with pytest.raises(ValidationFailedError, match=r"missing \['present.0.value'\]"):
        compare_models(kv_decoder(), rotated)


def test_paths_and_external_data(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    # Default threshold: the weight tables go external, the tiny shape constants (which ORT must read
    # during shape inference) stay inline.
    onnx.save_model(kv_decoder(), str(path), save_as_external_data=True, location="model.onnx.data")
    assert (tmp_path / "model.onnx.data").stat().st_size >= 2 * VOCAB * HIDDEN * 4
    result = compare_models(path, str(path))
    assert result.passed and result.rel_l2 == 0.0
    assert compare_models(path, kv_decoder()).passed


def test_unloaded_external_data_proto_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    onnx.save_model(toy_decoder(), str(path), save_as_external_data=True, size_threshold=0)
    shallow = onnx.load(str(path), load_external_data=False)
    with pytest.raises(InputError, match="external data"):
        compare_models(path, shallow)


def test_large_proto_goes_through_a_temp_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(validate, "_PROTOBUF_LIMIT", 0)
    model = toy_decoder()
    result = compare_models(model, toy_decoder())
    assert result.passed
    assert len(model.graph.initializer[0].external_data) == 0  # the caller's proto is untouched


def test_run_model_reports_provider() -> None:
    feeds = synthesize_inputs(toy_decoder(), vocab_size=VOCAB)
    outputs, provider = run_model(toy_decoder(), feeds, ["cpu"])
    assert provider == CPU
    assert outputs["logits"].shape == (1, 8, VOCAB)


def test_missing_file_is_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        compare_models(tmp_path / "nope.onnx", toy_decoder())


def test_to_dict_is_json_serializable() -> None:
    data = compare_models(toy_decoder(), toy_decoder()).to_dict()
    assert data["passed"] is True and data["outputs"][0]["name"] == "logits"
    json.dumps(data)


def test_broken_rotated_model_is_named_in_the_error() -> None:
    weights = _weights()
    weights["embed"] = np.zeros((VOCAB, HIDDEN + 1), np.float32)  # no longer matches lm_head
    graph = toy_decoder().graph
    graph.initializer[0].CopyFrom(numpy_helper.from_array(weights["embed"], "embed"))
    broken = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=8)
    with pytest.raises(InputError, match="^rotated model: onnxruntime"):
        compare_models(toy_decoder(), broken)
