"""Bad inputs, hostile files and killed runs.

Every refusal is one line on stderr, exit 2 (no traceback unless --debug); the input folder is byte for
byte unchanged after every run; no output, and no staging folder, is left behind by a failed run; a run
killed at any moment leaves the previous output complete or no output at all.
"""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from spinquant_onnx.cli import main

# ------------------------------------------------------------------------------------------ model builders


def decoder(
    hidden: int = 64,
    ffn: int = 128,
    layers: int = 2,
    vocab: int = 128,
    seed: int = 0,
    weight_type: int = TensorProto.FLOAT,
) -> onnx.ModelProto:
    """A minimal decoder the matcher accepts: embedding, (RMSNorm, MLP, residual Add) x layers, norm, lm_head.

    With a ``weight_type`` other than float, weights are stored in that type behind a Cast to float, as
    weight-compressed exports do.
    """
    rng = np.random.default_rng(seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[TensorProto] = []

    def init(name: str, values: np.ndarray) -> str:
        inits.append(numpy_helper.from_array(np.asarray(values), name))
        return name

    def weight(name: str, shape: tuple[int, int], scale: float) -> str:
        values = rng.standard_normal(shape) * scale
        if weight_type == TensorProto.FLOAT:
            return init(name, values.astype(np.float32))
        stored = values.astype(helper.tensor_dtype_to_np_dtype(weight_type))
        init(name, stored)
        nodes.append(helper.make_node("Cast", [name], [name + ".f32"], to=TensorProto.FLOAT))
        return name + ".f32"

    def norm(x: str, tag: str) -> str:
        gamma = init(f"{tag}.gamma", (1 + 0.1 * rng.standard_normal(hidden)).astype(np.float32))
        nodes.extend(
            [
                helper.make_node("Pow", [x, "two"], [f"{tag}.sq"]),
                helper.make_node("ReduceMean", [f"{tag}.sq"], [f"{tag}.ms"], axes=[-1], keepdims=1),
                helper.make_node("Add", [f"{tag}.ms", "eps"], [f"{tag}.mse"]),
                helper.make_node("Sqrt", [f"{tag}.mse"], [f"{tag}.rms"]),
                helper.make_node("Reciprocal", [f"{tag}.rms"], [f"{tag}.inv"]),
                helper.make_node("Mul", [x, f"{tag}.inv"], [f"{tag}.n"]),
                helper.make_node("Mul", [f"{tag}.n", gamma], [f"{tag}.out"]),
            ]
        )
        return f"{tag}.out"

    init("two", np.array(2.0, np.float32))
    init("eps", np.array(1e-6, np.float32))
    table = weight("embed", (vocab, hidden), 1.0)
    nodes.append(helper.make_node("Gather", [table, "input_ids"], ["x0"]))
    x = "x0"
    for i in range(layers):
        h = norm(x, f"l{i}.norm")
        up = weight(f"l{i}.up", (hidden, ffn), hidden**-0.5)
        down = weight(f"l{i}.down", (ffn, hidden), ffn**-0.5)
        nodes += [
            helper.make_node("MatMul", [h, up], [f"l{i}.u"]),
            helper.make_node("Relu", [f"l{i}.u"], [f"l{i}.a"]),
            helper.make_node("MatMul", [f"l{i}.a", down], [f"l{i}.d"]),
            helper.make_node("Add", [x, f"l{i}.d"], [f"x{i + 1}"]),
        ]
        x = f"x{i + 1}"
    head = weight("lm_head", (hidden, vocab), hidden**-0.5)
    nodes.append(helper.make_node("MatMul", [norm(x, "final"), head], ["logits"]))
    graph = helper.make_graph(
        nodes,
        "synthetic_decoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", vocab])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def mlp() -> onnx.ModelProto:
    """A plain two-layer MLP: no embedding, no norm, no residual stream."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])],
        [w1, w2],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def initializer(model: onnx.ModelProto, name: str) -> TensorProto:
    return next(t for t in model.graph.initializer if t.name == name)


def with_value(model: onnx.ModelProto, name: str, index: tuple[int, ...], value: float) -> onnx.ModelProto:
    tensor = initializer(model, name)
    values = numpy_helper.to_array(tensor).copy()
    values[index] = value
    tensor.CopyFrom(numpy_helper.from_array(values, name))
    return model


def save_external(model: onnx.ModelProto, path: Path, location: str = "m.onnx.data") -> Path:
    onnx.save(model, str(path), save_as_external_data=True, location=location, size_threshold=0)
    return path


def set_location(path: Path, location: str) -> None:
    """Point every external initializer of the model at ``path`` to ``location`` (offsets unchanged)."""
    model = onnx.load(str(path), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(model, str(path))


def snapshot(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` (links are hashed as their target path)."""
    digest = {}
    for path in sorted(folder.rglob("*")):
        key = str(path.relative_to(folder))
        if path.is_symlink():
            digest[key] = "link:" + os.readlink(path)
        elif path.is_file():
            digest[key] = _file_digest(path)
    return digest


def _file_digest(path: Path, whole: int = 1 << 28) -> str:
    """sha256 of the file; for huge (sparse) files, of its size, mtime and first and last MiB."""
    stat = path.stat()
    if stat.st_size <= whole:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    with open(path, "rb") as handle:
        head = handle.read(1 << 20)
        handle.seek(-(1 << 20), os.SEEK_END)
        tail = handle.read()
    return hashlib.sha256(f"{stat.st_size}:{stat.st_mtime_ns}".encode() + head + tail).hexdigest()


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


# ------------------------------------------------------------------------------------------ refusal cases


@dataclass
class Case:
    """A bad input: ``make(tmp)`` writes it and returns (input path, output path, extra CLI args)."""

    id: str
    make: Callable[[Path], tuple[Path, Path, list[str]]]
    expect: str
    code: int = 2


def _in(tmp: Path) -> Path:
    folder = tmp / "in"
    folder.mkdir(exist_ok=True)
    return folder


def _out(tmp: Path) -> Path:
    return tmp / "out" / "r.onnx"


def _bytes(data: bytes) -> Callable[[Path], tuple[Path, Path, list[str]]]:
    def make(tmp: Path) -> tuple[Path, Path, list[str]]:
        path = _in(tmp) / "m.onnx"
        path.write_bytes(data)
        return path, _out(tmp), []

    return make


def _model(build: Callable[[], onnx.ModelProto], *args: str) -> Callable[[Path], tuple[Path, Path, list[str]]]:
    def make(tmp: Path) -> tuple[Path, Path, list[str]]:
        path = _in(tmp) / "m.onnx"
        onnx.save(build(), str(path))
        return path, _out(tmp), list(args)

    return make


def _external(edit: Callable[[Path], None]) -> Callable[[Path], tuple[Path, Path, list[str]]]:
    """A decoder saved with external data, then ``edit(model_path)``."""

    def make(tmp: Path) -> tuple[Path, Path, list[str]]:
        path = save_external(decoder(), _in(tmp) / "m.onnx")
        edit(path)
        return path, _out(tmp), []

    return make


def _serialized() -> bytes:
    return decoder().SerializeToString()


def _outside_copy(path: Path) -> Path:
    """A copy of the model's data file outside its folder (valid bytes, forbidden place)."""
    outside = path.parent.parent / "elsewhere.bin"
    outside.write_bytes((path.parent / "m.onnx.data").read_bytes())
    return outside


def _dotdot(path: Path) -> None:
    _outside_copy(path)
    set_location(path, "../elsewhere.bin")


def _absolute(path: Path) -> None:
    set_location(path, str(_outside_copy(path)))


def _symlink_out(path: Path) -> None:
    outside = _outside_copy(path)
    (path.parent / "m.onnx.data").unlink()
    (path.parent / "m.onnx.data").symlink_to(outside)


def _truncate_data(path: Path) -> None:
    data = path.parent / "m.onnx.data"
    os.truncate(data, data.stat().st_size - 100)


def _junk_offset(path: Path) -> None:
    model = onnx.load(str(path), load_external_data=False)
    for entry in initializer(model, "l0.up").external_data:
        if entry.key == "offset":
            entry.value = "12abc"
    onnx.save(model, str(path))


def _short_raw() -> onnx.ModelProto:
    model = decoder()
    tensor = initializer(model, "l0.up")
    tensor.raw_data = tensor.raw_data[:-4]
    return model


def _reshaped() -> onnx.ModelProto:
    """Same bytes, other shape: l0.down [128, 64] claims [64, 128], so it no longer writes 64 features."""
    model = decoder()
    tensor = initializer(model, "l0.down")
    del tensor.dims[:]
    tensor.dims.extend([64, 128])
    return model


def _bad_declared_shape() -> onnx.ModelProto:
    model = decoder()
    model.graph.input.append(helper.make_tensor_value_info("l0.up", TensorProto.FLOAT, [64, 96]))
    return model


def _type(elem_type: int) -> Callable[[], onnx.ModelProto]:
    def build() -> onnx.ModelProto:
        model = decoder()
        initializer(model, "lm_head").data_type = elem_type
        return model

    return build


def _negative_dims() -> onnx.ModelProto:
    model = decoder()
    tensor = initializer(model, "lm_head")
    tensor.dims[0] = -64
    return model


def _unsorted() -> onnx.ModelProto:
    model = decoder()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    return model


def _dangling() -> onnx.ModelProto:
    model = decoder()
    model.graph.node[5].input[0] = "nowhere"
    return model


def _produced_twice() -> onnx.ModelProto:
    model = decoder()
    model.graph.node[3].output[0] = model.graph.node[1].output[0]
    return model


def _constant_external() -> onnx.ModelProto:
    model = decoder()
    tensor = TensorProto(name="c", data_type=TensorProto.FLOAT, dims=[4], data_location=TensorProto.EXTERNAL)
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "/etc/hostname"
    model.graph.node.insert(0, helper.make_node("Constant", [], ["c"], value=tensor))
    return model


def _no_opset() -> onnx.ModelProto:
    model = decoder()
    del model.opset_import[:]
    return model


def _fp16_overflow() -> onnx.ModelProto:
    model = decoder(weight_type=TensorProto.FLOAT16)
    gamma = initializer(model, "l1.norm.gamma")
    gamma.CopyFrom(numpy_helper.from_array(np.full(64, 1e6, np.float32), gamma.name))
    return model


def _fails_at_run() -> onnx.ModelProto:
    """Token ids shifted past the vocabulary: onnxruntime fails inside Gather, only when it runs."""
    model = decoder()
    gather = next(n for n in model.graph.node if n.op_type == "Gather")
    gather.input[1] = "ids_shifted"
    model.graph.initializer.append(numpy_helper.from_array(np.array(1000, np.int64), "shift"))
    model.graph.node.insert(0, helper.make_node("Add", ["input_ids", "shift"], ["ids_shifted"]))
    return model


def _same_as_input(tmp: Path) -> tuple[Path, Path, list[str]]:
    path = _in(tmp) / "m.onnx"
    onnx.save(decoder(), str(path))
    return path, path, []


def _link_to_input(tmp: Path) -> tuple[Path, Path, list[str]]:
    path = _in(tmp) / "m.onnx"
    onnx.save(decoder(), str(path))
    (tmp / "out").mkdir()
    (tmp / "out" / "r.onnx").symlink_to(path)
    return path, tmp / "out" / "r.onnx", []


def _hardlink_to_input(tmp: Path) -> tuple[Path, Path, list[str]]:
    path = _in(tmp) / "m.onnx"
    onnx.save(decoder(), str(path))
    (tmp / "out").mkdir()
    os.link(path, tmp / "out" / "r.onnx")
    return path, tmp / "out" / "r.onnx", []


def _onto_input_data(tmp: Path) -> tuple[Path, Path, list[str]]:
    path = save_external(decoder(), _in(tmp) / "m.onnx")
    return path, path.parent / "m.onnx.data", ["--in-place"]


def _out_is_folder(tmp: Path) -> tuple[Path, Path, list[str]]:
    path = _in(tmp) / "m.onnx"
    onnx.save(decoder(), str(path))
    (tmp / "out").mkdir()
    return path, tmp / "out", []


def _out_under_file(tmp: Path) -> tuple[Path, Path, list[str]]:
    path = _in(tmp) / "m.onnx"
    onnx.save(decoder(), str(path))
    (tmp / "out").write_text("a file, not a folder")
    return path, tmp / "out" / "r.onnx", []


def _out_read_only_fs(tmp: Path) -> tuple[Path, Path, list[str]]:
    path = _in(tmp) / "m.onnx"
    onnx.save(decoder(), str(path))
    return path, Path("/sys/kernel/spinquant-r.onnx"), []


def _missing(tmp: Path) -> tuple[Path, Path, list[str]]:
    return _in(tmp) / "absent.onnx", _out(tmp), []


def _folder_input(tmp: Path) -> tuple[Path, Path, list[str]]:
    return _in(tmp), _out(tmp), []


def _over_2gib(tmp: Path) -> tuple[Path, Path, list[str]]:
    path = _in(tmp) / "m.onnx"
    with open(path, "wb") as handle:
        handle.truncate(2**31 + 4096)  # sparse: no disk used
    return path, _out(tmp), []


def _huge_tensor(tmp: Path) -> tuple[Path, Path, list[str]]:
    """An embedding of 2**31 x 64 float32 (512 GiB) in a sparse data file: refused before anything is read."""
    path = save_external(decoder(), _in(tmp) / "m.onnx")
    model = onnx.load(str(path), load_external_data=False)
    data = path.parent / "m.onnx.data"
    offset = (data.stat().st_size + 63) // 64 * 64
    rows = 2**31
    table = initializer(model, "embed")
    table.dims[0] = rows
    for entry in table.external_data:
        if entry.key == "offset":
            entry.value = str(offset)
        if entry.key == "length":
            entry.value = str(rows * 64 * 4)
    os.truncate(data, offset + rows * 64 * 4)
    onnx.save(model, str(path))
    return path, _out(tmp), []


CASES = [
    Case("missing file", _missing, "no such file"),
    Case("folder instead of file", _folder_input, "is a folder"),
    Case("empty file", _bytes(b""), "empty file"),
    Case("random bytes", _bytes(np.random.default_rng(0).bytes(4096)), "not a valid ONNX model"),
    Case("truncated protobuf (half)", _bytes(_serialized()[: len(_serialized()) // 2]), "truncated or corrupt"),
    Case("truncated protobuf (last 100 bytes cut)", _bytes(_serialized()[:-100]), "truncated"),
    Case(
        "names that are not valid UTF-8", _bytes(_serialized().replace(b"lm_head", b"lm_\xe4\xffad")), "not valid UTF-8"
    ),
    Case("file over 2 GiB (not external data)", _over_2gib, "over protobuf's 2 GiB limit"),
    Case("no opset import", _model(_no_opset), "imports no ONNX opset"),
    Case("graph not topologically sorted", _model(_unsorted), "not topologically sorted"),
    Case("node reads a missing tensor", _model(_dangling), "reads 'nowhere'"),
    Case("tensor produced by two nodes", _model(_produced_twice), "produced twice"),
    Case("external data file missing", _external(lambda p: (p.parent / "m.onnx.data").unlink()), "is missing"),
    Case("external data path with ../", _external(_dotdot), "points outside the model's folder"),
    Case("external data absolute path", _external(_absolute), "points outside the model's folder"),
    Case("external data symlink out of the folder", _external(_symlink_out), "through a link"),
    Case("external data file truncated", _external(_truncate_data), "does not hold"),
    Case("external data offset not a number", _external(_junk_offset), "not a number"),
    Case("Constant node with external data", _model(_constant_external), "only supported for initializers"),
    Case("initializer raw data 4 bytes short", _model(_short_raw), "bytes of data for shape"),
    Case("initializer dims disagree with the graph", _model(_reshaped), "writes 128 features"),
    Case("initializer shape differs from declared shape", _model(_bad_declared_shape), "graph declares"),
    Case("initializer with undefined element type", _model(_type(TensorProto.UNDEFINED)), "undefined"),
    Case("initializer with unknown element type", _model(_type(999)), "'lm_head': unsupported tensor element type"),
    Case("initializer with negative dims", _model(_negative_dims), "invalid shape"),
    Case(
        "NaN in a weight",
        _model(lambda: with_value(decoder(), "l1.up", (3, 5), np.nan)),
        "'l1.up' (reader) contains nan",
    ),
    Case(
        "Inf in the embedding",
        _model(lambda: with_value(decoder(), "embed", (7, 1), np.inf)),
        "'embed' (embedding) contains inf",
    ),
    Case(
        "NaN in a norm scale",
        _model(lambda: with_value(decoder(), "l0.norm.gamma", (2,), np.nan)),
        "'l0.norm.gamma' (norm) contains nan",
    ),
    Case("int8 weights (behind Cast)", _model(lambda: decoder(weight_type=TensorProto.INT8)), "is int8"),
    Case("uint8 weights (behind Cast)", _model(lambda: decoder(weight_type=TensorProto.UINT8)), "is uint8"),
    Case("float16 weights overflow after norm fusion", _model(_fp16_overflow), "overflow float16"),
    Case("no decoder block (plain MLP)", _model(mlp), "no decoder found"),
    Case(
        "--validate: onnxruntime fails running the original",
        _model(_fails_at_run, "--validate", "--providers", "cpu"),
        "onnxruntime failed to run",
    ),
    Case("OUT == IN without --in-place", _same_as_input, "pass --in-place"),
    Case("OUT is a symlink to IN", _link_to_input, "pass --in-place"),
    Case("OUT is a hard link to IN", _hardlink_to_input, "pass --in-place"),
    Case("OUT is the input's external data file (even with --in-place)", _onto_input_data, "external data file"),
    Case("OUT is an existing folder", _out_is_folder, "existing folder"),
    Case("OUT's folder is a file", _out_under_file, "is a file, not a folder"),
    Case("OUT on a read-only file system (/sys)", _out_read_only_fs, "cannot write the output there"),
    Case("needs more memory than available (512 GiB tensor)", _huge_tensor, "not enough memory"),
]


def run_cli(argv: list[str], capfd: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capfd.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_is_one_line_and_leaves_everything_as_it_was(
    case: Case, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    in_path, out_path, args = case.make(tmp_path)
    before = snapshot(tmp_path)
    code, _, err = run_cli(["rotate", str(in_path), str(out_path), *args], capfd)
    assert code == case.code, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spinquant-onnx: error: "), err
    assert case.expect in lines[0], lines[0]
    assert "Traceback" not in err
    assert snapshot(tmp_path) == before, "input or output folder changed"
    assert not any(name.endswith(".partial") for name in leftovers(out_path.parent))


def test_subprocess_refusal_has_no_traceback_unless_debug(tmp_path: Path) -> None:
    in_path, out_path, _ = CASES[4].make(tmp_path)  # truncated protobuf
    command = [sys.executable, "-m", "spinquant_onnx.cli"]
    plain = subprocess.run([*command, "rotate", str(in_path), str(out_path)], capture_output=True, text=True)
    assert plain.returncode == 2
    assert len(plain.stderr.strip().splitlines()) == 1 and "Traceback" not in plain.stderr
    debug = subprocess.run([*command, "--debug", "rotate", str(in_path), str(out_path)], capture_output=True, text=True)
    assert debug.returncode == 2
    assert "Traceback" in debug.stderr and "InputError" in debug.stderr
    assert not out_path.exists()


def test_inspect_refuses_the_same_way(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    in_path, _, _ = _external(_symlink_out)(tmp_path)
    code, _, err = run_cli(["inspect", str(in_path)], capfd)
    assert code == 2 and "through a link" in err and len(err.strip().splitlines()) == 1


# ------------------------------------------------------------------------------------------ output safety


def test_in_place_with_external_data_replaces_model_and_data(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = save_external(decoder(), tmp_path / "m.onnx")
    reference = tmp_path / "ref" / "r.onnx"
    assert run_cli(["rotate", str(path), str(reference)], capfd)[0] == 0
    code, _, err = run_cli(["rotate", str(path), str(path), "--in-place"], capfd)
    assert code == 0, err
    written = onnx.load(str(path))  # loads its external data: the model names a file that exists
    expected = onnx.load(str(reference))
    for a, b in zip(written.graph.initializer, expected.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))
    data = [p.name for p in tmp_path.iterdir() if p.name.endswith(".data")]
    assert len(data) == 1 and data[0] != "m.onnx.data", "the old data file is replaced by a fresh name"


def test_overwriting_an_output_keeps_one_data_file(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    path = save_external(decoder(), _in(tmp_path) / "m.onnx")
    out = tmp_path / "out" / "r.onnx"
    for seed in ("1", "2", "3"):
        code, _, err = run_cli(["rotate", str(path), str(out), "--rotation", "random-hadamard", "--seed", seed], capfd)
        assert code == 0, err
        onnx.load(str(out))  # complete: every external tensor's bytes are there
        assert sorted(p.name for p in out.parent.iterdir()) == ["r.onnx", *_locations(out)]


def _locations(path: Path) -> list[str]:
    """The external-data files a model names."""
    model = onnx.load(str(path), load_external_data=False)
    return sorted({e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"})


def test_stale_staging_of_dead_runs_is_removed(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.onnx"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".r.onnx.{dead.stdout.strip()}-0a1b2c3d.partial"
    live = tmp_path / f".r.onnx.{os.getpid()}-0a1b2c3d.partial"
    other = tmp_path / f".other.onnx.{dead.stdout.strip()}-0a1b2c3d.partial"
    for folder in (stale, live, other):
        folder.mkdir()
        (folder / "r.onnx").write_bytes(b"half")
    path = tmp_path / "m.onnx"
    onnx.save(decoder(), str(path))
    assert run_cli(["rotate", str(path), str(out)], capfd)[0] == 0
    assert not stale.exists(), "a killed run's staging folder is cleaned by the next run"
    assert live.exists() and other.exists(), "staging of a live process or another output is left alone"


def _digest(path: Path) -> str:
    """Content of a complete model: graph and every initializer's values (external data loaded by onnx)."""
    model = onnx.load(str(path))
    digest = hashlib.sha256(model.graph.node[0].SerializeToString())
    for tensor in model.graph.initializer:
        digest.update(tensor.name.encode())
        digest.update(numpy_helper.to_array(tensor).tobytes())
    return digest.hexdigest()


def test_sigterm_after_the_command_finished_exits_with_its_status(tmp_path: Path) -> None:
    """A SIGTERM that lands after the command is done (output published, interpreter shutting down) ends
    the program with the command's own status, not as killed by the signal (-15)."""
    fixture = Path(__file__).resolve().parent.parent / "fixtures" / "llama_dynamo.onnx"
    script = (
        "import os, signal, sys, time\n"
        f"sys.argv = ['spinquant-onnx', 'inspect', {str(fixture)!r}]\n"
        "from spinquant_onnx.cli import main\n"
        "code = main()\n"
        "print('finished', code, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(0.5)\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert "finished 0" in done.stdout, done.stderr
    assert done.returncode == 0, (done.returncode, done.stderr)


def test_killed_rotate_leaves_previous_output_or_none(tmp_path: Path) -> None:
    """SIGKILL at random moments of a ~135 MB run: OUT stays the previous complete version (or the new one).

    A final SIGTERM mid-write unwinds cleanly: exit 130, one line, no staging folder left.
    """
    path = save_external(decoder(hidden=1024, ffn=4096, layers=4, vocab=256), _in(tmp_path) / "m.onnx")
    before = snapshot(tmp_path / "in")
    out = tmp_path / "out" / "r.onnx"
    command = [
        sys.executable,
        "-m",
        "spinquant_onnx.cli",
        "rotate",
        str(path),
        str(out),
        "--rotation",
        "random-hadamard",
    ]
    started = time.monotonic()
    first = subprocess.run([*command, "--seed", "1"], capture_output=True, text=True)
    duration = time.monotonic() - started
    assert first.returncode == 0, first.stderr
    previous = _digest(out)
    rng = random.Random()
    plan = [(signal.SIGKILL, None), *((signal.SIGKILL, rng.uniform(0.3, 1.1) * duration) for _ in range(3))]
    states = []
    for sig, delay in [*plan, (signal.SIGTERM, None)]:
        proc = subprocess.Popen([*command, "--seed", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        if delay is None:  # as soon as this run's staging folder exists, plus a little
            mine = f".r.onnx.{proc.pid}-"
            while proc.poll() is None and not any(p.name.startswith(mine) for p in out.parent.iterdir()):
                time.sleep(0.01)
            delay = rng.uniform(0.0, 0.3 * duration)
        time.sleep(delay)
        proc.send_signal(sig)
        _, err = proc.communicate()
        states.append((sig.name, delay, _digest(out) if out.exists() else None))
        assert snapshot(tmp_path / "in") == before, "the input changed"
    assert proc.returncode in (0, 130), err
    if proc.returncode == 130:  # SIGTERM unwinds: one line, and this run's (and dead runs') staging is gone
        assert len(err.strip().splitlines()) == 1 and "interrupted" in err, err
        assert not [p.name for p in out.parent.iterdir() if p.name.endswith(".partial")]
    final = subprocess.run([*command, "--seed", "2"], capture_output=True, text=True)
    assert final.returncode == 0, final.stderr
    new = _digest(out)
    for sig, delay, state in states:
        assert state in (previous, new), f"{sig} after {delay:.2f}s: output is neither the old nor the new model"
    names = sorted(p.name for p in out.parent.iterdir())
    assert names == ["r.onnx", *_locations(out)], f"leftovers after a clean run: {names}"


def test_disk_full_is_one_line_and_keeps_the_previous_output(tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    """ENOSPC half-way through writing (a 300 KiB tmpfs; needs permission to mount, else skipped)."""
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        small = _in(tmp_path) / "small.onnx"
        onnx.save(decoder(), str(small))
        out = disk / "r.onnx"
        assert run_cli(["rotate", str(small), str(out)], capfd)[0] == 0
        previous = out.read_bytes()
        big = save_external(decoder(layers=6), _in(tmp_path) / "m.onnx")
        before = snapshot(tmp_path / "in")
        code, _, err = run_cli(["rotate", str(big), str(out)], capfd)
        assert code == 2 and "No space left on device" in err and len(err.strip().splitlines()) == 1, err
        assert out.read_bytes() == previous and leftovers(disk) == ["r.onnx"]
        assert snapshot(tmp_path / "in") == before
    finally:
        subprocess.run(["umount", str(disk)], check=False)
