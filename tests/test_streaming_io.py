"""The streaming reader and writers (#17): lazy embedded reads, the hand-written protobuf, the mapped output
file, threads."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spinquant_onnx import convert
from spinquant_onnx.errors import InputError
from spinquant_onnx.io import protowire
from spinquant_onnx.io.model_file import load_model, save_model, set_tensor_data
from spinquant_onnx.io.output_map import MappedOutput
from spinquant_onnx.io.tensor_store import TensorStore
from spinquant_onnx.rewrite import plan as plan_module
from spinquant_onnx.rotation.kinds import make_rotation

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def _serialized_the_old_way(model: onnx.ModelProto, store: TensorStore) -> bytes:
    """What the writer did before #17: every initializer set in a copy, then SerializeToString."""
    header = onnx.ModelProto()
    header.CopyFrom(model)
    for tensor in header.graph.initializer:
        set_tensor_data(tensor, store.array(tensor.name))
    return header.SerializeToString()


@pytest.mark.parametrize("name", ["llama_ts.onnx", "qwen3_dynamo.onnx", "smollm_ts.onnx"])
def test_lazy_load_points_into_the_file_and_reads_the_same_values(name: str) -> None:
    path = FIXTURES / name
    lazy, full = load_model(path, lazy=True), onnx.load(str(path))
    assert protowire.reads_own_file(lazy, path)
    assert lazy.ByteSize() < path.stat().st_size / 2  # the weights stayed in the file
    store = TensorStore(lazy, path.parent)
    stripped = [t for t in lazy.graph.initializer if t.data_location == TensorProto.EXTERNAL]
    assert stripped and all(store.nbytes(t.name) >= protowire.LAZY_MIN_BYTES for t in stripped)
    for tensor in full.graph.initializer:
        np.testing.assert_array_equal(store.array(tensor.name), numpy_helper.to_array(tensor))
    plain = load_model(path)
    assert _serialized_the_old_way(lazy, store) == _serialized_the_old_way(plain, TensorStore(plain, path.parent))


@pytest.mark.parametrize("name", ["llama_ts.onnx", "phi3_dynamo.onnx"])
def test_hand_written_protobuf_is_serialize_to_string(name: str, tmp_path: Path) -> None:
    path = FIXTURES / name
    model = load_model(path, lazy=True)
    store = TensorStore(model, path.parent)
    out = tmp_path / "out.onnx"
    assert protowire.write_embedded(model, out, store.array)
    assert out.read_bytes() == _serialized_the_old_way(model, store)
    loaded = onnx.load(str(out))
    onnx.checker.check_model(loaded)
    assert loaded == onnx.load(str(path)) or len(loaded.graph.initializer) == len(model.graph.initializer)


def _every_dtype_model() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    tensors = []
    for number, elem_type in enumerate(sorted(TensorProto.DataType.values())):
        if elem_type in (TensorProto.UNDEFINED,):
            continue
        try:
            dtype = np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
        except (KeyError, ValueError, TypeError):
            continue
        for shape in ((), (0,), (3, 5), (70, 70)):
            name = f"t{number}_{len(shape)}_{sum(shape)}"
            if dtype.kind == "O":
                values = np.array([f"s{i}" for i in range(int(np.prod(shape)))], dtype=object).reshape(shape)
            else:
                values = rng.integers(0, 2, size=shape).astype(dtype)
            tensor = TensorProto(name=name, data_type=elem_type, dims=list(shape))
            set_tensor_data(tensor, values)
            tensors.append(tensor)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=tensors,
        doc_string="graph doc",
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], doc_string="model doc")
    helper.set_model_props(model, {"key": "value"})
    return model


def test_every_element_type_round_trips_byte_for_byte(tmp_path: Path) -> None:
    model = _every_dtype_model()
    path = tmp_path / "m.onnx"
    path.write_bytes(model.SerializeToString())
    lazy = load_model(path, lazy=True)
    store = TensorStore(lazy, path.parent)
    out = tmp_path / "out.onnx"
    assert save_model(lazy, out, store.array, external=False) == [out]
    plain = load_model(path)
    assert out.read_bytes() == _serialized_the_old_way(plain, TensorStore(plain, path.parent))
    assert onnx.load(str(out)) == model


def test_convert_of_an_embedded_model_stays_embedded(tmp_path: Path) -> None:
    out = tmp_path / "out.onnx"
    convert(FIXTURES / "llama_ts.onnx", out, validate=True)
    assert [p.name for p in tmp_path.iterdir()] == ["out.onnx"]
    rotated = onnx.load(str(out))
    assert not any(t.data_location == TensorProto.EXTERNAL for t in rotated.graph.initializer)


def test_a_corrupt_embedded_model_still_gets_onnx_s_message(tmp_path: Path) -> None:
    data = (FIXTURES / "llama_ts.onnx").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(InputError, match="not a valid ONNX model|truncated"):
        load_model(path, lazy=True)


def test_external_models_are_not_read_lazily_twice(tmp_path: Path) -> None:
    """An external-data model keeps its own data files; nothing points into the .onnx."""
    source = FIXTURES / "llama_ts.onnx"
    model = onnx.load(str(source))
    onnx.save(model, str(tmp_path / "ext.onnx"), save_as_external_data=True, location="ext.data", size_threshold=0)
    lazy = load_model(tmp_path / "ext.onnx", lazy=True)
    assert not protowire.reads_own_file(lazy, tmp_path / "ext.onnx")
    out = tmp_path / "out" / "o.onnx"
    convert(tmp_path / "ext.onnx", out)
    assert sorted(p.name for p in out.parent.iterdir()) == ["o.onnx", "o.onnx.data"]
    shutil.rmtree(out.parent)


# ------------------------------------------------------------------------------------------- mapped output


def test_mapped_output_places_bytes_and_views_and_refuses_writes_outside(tmp_path: Path) -> None:
    path = tmp_path / "f.bin"
    values = np.arange(12, dtype=np.float32).reshape(3, 4)
    with MappedOutput(path, 100) as out:
        out.put(0, b"head")
        view = out.array(8, np.float32, (3, 4))
        view[:, 1:3] = values[:, 1:3]  # strided writes land in place
        view[:, [0, 3]] = values[:, [0, 3]]
        del view
        out.release(8, 48)  # dropping the pages from the mapping keeps their contents
        with pytest.raises(ValueError, match="outside"):
            out.put(98, b"toolong")
    data = path.read_bytes()
    assert len(data) == 100 and data[:4] == b"head"
    np.testing.assert_array_equal(np.frombuffer(data, np.float32, 12, 8).reshape(3, 4), values)


def test_writer_refuses_values_of_the_wrong_shape_and_leaves_nothing_half_written(tmp_path: Path) -> None:
    path = FIXTURES / "llama_ts.onnx"
    model = load_model(path, lazy=True)
    store = TensorStore(model, path.parent)
    big = next(t.name for t in model.graph.initializer if store.nbytes(t.name) > 4096)

    def values(name: str) -> np.ndarray:
        array = store.array(name)
        return array.reshape(-1) if name == big else array  # same bytes, wrong shape: must not be broadcast

    with pytest.raises(ValueError, match=f"tensor '{big}': values of shape"):
        save_model(model, tmp_path / "out.onnx", values, external=True)


# ------------------------------------------------------------------------------------------------ threads


def test_threaded_chunks_are_bitwise_the_single_threaded_result(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(1)
    rotation = make_rotation("random-hadamard", 256, seed=2)
    for axis, shape in ((1, (3000, 256)), (0, (256, 3000))):
        values = rng.standard_normal(shape, dtype=np.float32)
        ops = (plan_module.scale(axis, rng.uniform(0.5, 2, 256)), plan_module.rotate(axis, rotation))
        monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", 1 << 16)
        monkeypatch.setenv(plan_module.THREADS_ENV, "1")
        one = plan_module.run_ops(values, ops, np.dtype(np.float32))
        monkeypatch.setenv(plan_module.THREADS_ENV, "3")
        three = plan_module.run_ops(values, ops, np.dtype(np.float32))
        assert one.tobytes() == three.tobytes()
        monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", 1 << 30)
        whole = plan_module.run_ops(values, ops, np.dtype(np.float32))
        np.testing.assert_allclose(whole, one, rtol=0, atol=1e-6)


def test_chunked_finite_checks_still_name_the_bad_value(monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN in a source and overflow in a result are found inside the chunks, then reported as before."""
    from spinquant_onnx.core.preflight import checked_values

    monkeypatch.setattr(plan_module, "CHUNK_ELEMENTS", 1 << 12)
    monkeypatch.setattr(plan_module, "SPLIT_ELEMENTS", 1 << 10)
    rotation = make_rotation("hadamard", 64)
    for values, message in (
        (np.ones((512, 64), np.float32), None),
        (np.where(np.arange(512 * 64).reshape(512, 64) == 7000, np.nan, 1.0).astype(np.float32), "contains nan"),
        (np.full((512, 64), 3e38, np.float32), "overflow"),
    ):
        graph = helper.make_graph(
            [helper.make_node("Identity", ["w"], ["y"])], "g", [],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [512, 64])],
            initializer=[numpy_helper.from_array(values, "w")],
        )
        store = TensorStore(helper.make_model(graph))
        tensor_plan = plan_module.TensorPlan()
        ops = (plan_module.scale(1, np.full(64, 4.0)), plan_module.rotate(1, rotation))
        tensor_plan.targets["w"] = plan_module.Target("w", "w", ops, "test")
        compute = checked_values(tensor_plan, store)
        if message is None:
            np.testing.assert_allclose(compute("w")[0, 0], 4.0 * 64 / 8, rtol=1e-6)
        else:
            with pytest.raises(InputError, match=message):
                compute("w")
