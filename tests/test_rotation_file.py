"""--rotation-file: learned R1/R2 from SpinQuant's torch-saved R.bin or an .npz, checked and applied exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FIXTURES
from onnx import numpy_helper

from spinquant_onnx.cli import main
from spinquant_onnx.core.equivalence import compare_models
from spinquant_onnx.core.pipeline import convert
from spinquant_onnx.errors import InputError, SpinQuantError, UnsupportedGraphError, UnsupportedSizeError
from spinquant_onnx.integrations.dispatch import apply_spinquant
from spinquant_onnx.io.torch_pickle import save_torch
from spinquant_onnx.rotation.learned_file import load_rotation_file

EXACT = 1e-5
HIDDEN, HEAD_DIM, LAYERS = 64, 16, 2  # llama_dynamo.onnx / qwen2_ts.onnx / phi3_ts.onnx


def _orthogonal(n: int, seed: int, dtype=np.float64) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return (q * np.sign(np.diag(r))).astype(dtype)


def _spinquant_dict(dtype=np.float32) -> dict[str, np.ndarray]:
    """What SpinQuant's optimize_rotation.py saves: R1 and one R2 per layer, in float32."""
    entries = {"R1": _orthogonal(HIDDEN, 1, dtype)}
    for layer in range(LAYERS):
        entries[f"model.layers.{layer}.self_attn.R2"] = _orthogonal(HEAD_DIM, 10 + layer, dtype)
    return entries


def _embedding(path: Path, name: str = "model.embed_tokens.weight") -> np.ndarray:
    model = onnx.load(str(path))
    return numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


@pytest.mark.parametrize("fixture", ["llama_dynamo.onnx", "qwen2_ts.onnx", "phi3_ts.onnx"])
def test_npz_rotations_are_exact_and_used(fixture: str, tmp_path: Path) -> None:
    entries = _spinquant_dict(np.float64)
    np.savez(tmp_path / "r.npz", **entries)
    out = tmp_path / "out.onnx"
    report = convert(FIXTURES / fixture, out, rotation_file=tmp_path / "r.npz").to_dict()
    result = compare_models(FIXTURES / fixture, out, providers=["cpu"], threshold=EXACT)
    assert result.rel_l2 < EXACT and result.argmax_agreement == 1.0
    assert report["rotation"]["kind"] == "matrix"
    assert report["rotation"]["rotation_file"]["r2_layers"] == [0, 1]
    assert [r["rotation"]["kind"] for r in report["rotation"]["r2"]] == ["matrix", "matrix"]
    if fixture == "llama_dynamo.onnx":  # the embedding is a writer: E' = E R1, the learned R1
        expected = _embedding(FIXTURES / fixture) @ entries["R1"]
        np.testing.assert_allclose(_embedding(out), expected, atol=1e-5)


def test_torch_saved_r_bin_with_r3_r4(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    entries = _spinquant_dict(np.float32)
    torch.save({k: torch.from_numpy(v) for k, v in entries.items()}, tmp_path / "R.bin")
    learned = load_rotation_file(tmp_path / "R.bin")
    assert learned.r1 is not None and learned.r1.n == HIDDEN and sorted(learned.r2_layers) == [0, 1]
    out = tmp_path / "out.onnx"
    code = main(
        [
            "rotate",
            str(FIXTURES / "llama_ts.onnx"),
            str(out),
            "--rotation-file",
            str(tmp_path / "R.bin"),
            "--r3",
            "--r4",
            "--validate",
        ]
    )
    assert code == 0
    result = compare_models(FIXTURES / "llama_ts.onnx", out, providers=["cpu"], threshold=EXACT)
    assert result.rel_l2 < EXACT and result.argmax_agreement == 1.0


def test_float32_matrices_are_reorthogonalized(tmp_path: Path) -> None:
    """A float32 R is orthogonal to ~1e-7; slightly more drift is projected back, and noted in the report."""
    r1 = _orthogonal(HIDDEN, 1) + 2e-6 * np.random.default_rng(3).standard_normal((HIDDEN, HIDDEN))
    save_torch(tmp_path / "R.bin", {"R1": r1.astype(np.float32)})
    learned = load_rotation_file(tmp_path / "R.bin")
    matrix = learned.r1.matrix()
    assert np.abs(matrix @ matrix.T - np.eye(HIDDEN)).max() < 1e-12
    assert any("re-orthogonalized" in note for note in learned.notes)
    model = onnx.load(str(FIXTURES / "smollm_ts.onnx"))
    before = model.SerializeToString()
    with pytest.raises(UnsupportedSizeError, match="hidden size is 576"):
        apply_spinquant(model, rotation_file=str(tmp_path / "R.bin"))
    assert model.SerializeToString() == before


def test_shared_r2_for_every_layer(tmp_path: Path) -> None:
    np.savez(tmp_path / "r2.npz", R2=_orthogonal(8, 5))
    out = tmp_path / "out.onnx"
    report = convert(FIXTURES / "llama_h320_ts.onnx", out, rotation_file=tmp_path / "r2.npz").to_dict()
    assert report["rotation"]["kind"] == "hadamard"  # no R1 in the file: the usual one
    assert len(report["rotation"]["r2"]) == 2
    result = compare_models(FIXTURES / "llama_h320_ts.onnx", out, providers=["cpu"], threshold=EXACT)
    assert result.rel_l2 < EXACT and result.argmax_agreement == 1.0


@pytest.mark.parametrize(
    ("entries", "error", "message"),
    [
        ({"R1": np.ones((HIDDEN, HIDDEN))}, SpinQuantError, "not orthogonal"),
        ({"R1": np.eye(HIDDEN)[:, :32]}, UnsupportedSizeError, "square"),
        ({"R1": np.full((4, 4), np.nan)}, InputError, "NaN"),
        ({"R3": np.eye(4)}, InputError, "unknown entry 'R3'"),
        ({}, InputError, "no rotations"),
    ],
    ids=["not-orthogonal", "not-square", "nan", "unknown-key", "empty"],
)
def test_bad_files_are_refused(entries: dict, error: type, message: str, tmp_path: Path) -> None:
    np.savez(tmp_path / "bad.npz", **entries)
    with pytest.raises(error, match=message):
        load_rotation_file(tmp_path / "bad.npz")


@pytest.mark.parametrize(
    ("entries", "error", "message"),
    [
        ({"R1": _orthogonal(32, 0)}, UnsupportedSizeError, "hidden size is 64"),
        ({"model.layers.0.self_attn.R2": _orthogonal(16, 0)}, UnsupportedGraphError, "no R2 for layer 1"),
        ({"model.layers.7.self_attn.R2": _orthogonal(16, 0)}, UnsupportedGraphError, r"layers \[7\]"),
        ({"R2": _orthogonal(8, 0)}, UnsupportedSizeError, "head_dim is 16"),
    ],
    ids=["r1-size", "r2-missing-layer", "r2-extra-layer", "r2-size"],
)
def test_files_for_another_model_are_refused(entries: dict, error: type, message: str, tmp_path: Path) -> None:
    np.savez(tmp_path / "other.npz", **entries)
    out = tmp_path / "out.onnx"
    with pytest.raises(error, match=message):
        convert(FIXTURES / "llama_dynamo.onnx", out, rotation_file=tmp_path / "other.npz")
    assert not out.exists()


def test_missing_and_non_dict_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="no such rotation file"):
        load_rotation_file(tmp_path / "absent.bin")
    save_torch(tmp_path / "one.bin", np.eye(4, dtype=np.float32))
    with pytest.raises(InputError, match="holds one tensor"):
        load_rotation_file(tmp_path / "one.bin")
