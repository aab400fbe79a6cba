"""The command line as a user runs it: output, report, exit codes, one-line errors, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import FIXTURES


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "spinquant_onnx.cli", *args], capture_output=True, text=True)


def test_rotate_validate_and_report(tmp_path: Path) -> None:
    out, report = tmp_path / "r.onnx", tmp_path / "report.json"
    done = run("rotate", str(FIXTURES / "qwen2_ts.onnx"), str(out), "--validate", "--report", str(report),
               "--providers", "cpu")
    assert done.returncode == 0, done.stderr
    assert "validated on CPUExecutionProvider" in done.stdout
    data = json.loads(report.read_text())
    assert data["rotation"]["kind"] == "hadamard" and data["rotation"]["n"] == 64
    assert data["validation"]["passed"] and data["validation"]["rel_l2"] < 1e-5
    assert data["validation"]["argmax_agreement"] == 1.0
    assert {"analyze", "rotate_and_write", "validate", "total"} <= set(data["timings_s"])
    assert out.is_file()


def test_inspect_prints_roles_with_names_and_shapes() -> None:
    done = run("inspect", str(FIXTURES / "phi3_dynamo.onnx"))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("hidden size 64, 2 blocks")
    table = "\n".join(lines[1:])
    for role in ("embedding", "attention norm", "qkv", " o ", "mlp norm", "gate_up", "down", "final norm", "lm_head"):
        assert role in table, role
    assert "64x128" in table  # the fused qkv weight's shape


def test_bad_block_size_is_one_line_exit_2(tmp_path: Path) -> None:
    out = tmp_path / "r.onnx"
    done = run("rotate", str(FIXTURES / "llama_ts.onnx"), str(out), "--block-size", "7")
    assert done.returncode == 2
    assert len(done.stderr.strip().splitlines()) == 1 and "7" in done.stderr
    assert not out.exists() and not list(tmp_path.iterdir())


def test_non_decoder_is_refused(tmp_path: Path) -> None:
    from onnx import TensorProto, helper, save

    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"], name="relu")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    path = tmp_path / "relu.onnx"
    save(helper.make_model(graph), str(path))
    done = run("rotate", str(path), str(tmp_path / "out.onnx"))
    assert done.returncode == 2
    assert "no decoder found" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_output_equal_to_input_needs_in_place(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes((FIXTURES / "llama_ts.onnx").read_bytes())
    before = path.read_bytes()
    done = run("rotate", str(path), str(path))
    assert done.returncode == 2 and "--in-place" in done.stderr
    assert path.read_bytes() == before
    done = run("rotate", str(path), str(path), "--in-place")
    assert done.returncode == 0, done.stderr
    assert path.read_bytes() != before


def test_progress_bar_only_on_a_terminal(tmp_path: Path, monkeypatch, capsys) -> None:
    import spinquant_onnx.core.pipeline as api

    monkeypatch.setattr(api, "PROGRESS_MIN_BYTES", 0)
    api.convert(FIXTURES / "llama_ts.onnx", tmp_path / "a.onnx")  # pytest's stderr is not a terminal
    assert "rotating" not in capsys.readouterr().err
    monkeypatch.setattr(api.sys.stderr, "isatty", lambda: True, raising=False)
    api.convert(FIXTURES / "llama_ts.onnx", tmp_path / "b.onnx")
    assert "rotating llama_ts.onnx" in capsys.readouterr().err
