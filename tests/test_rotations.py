"""Rotation kinds: orthonormality, apply/apply_transpose against the dense matrix, seeding, blocks."""

from __future__ import annotations

import json

import numpy as np
import pytest

from spinquant_onnx.errors import SpinQuantError, UnsupportedSizeError
from spinquant_onnx.rotation.hadamard import hadamard_matrix
from spinquant_onnx.rotation.kinds import Rotation, from_matrix, make_rotation

CASES = [
    ("hadamard", 64, None),
    ("hadamard", 576, None),
    ("hadamard", 640, None),  # 20 * 32, Paley I: not symmetric, so transposes matter
    ("hadamard", 640, 128),
    ("hadamard", 96, 24),
    ("hadamard", 856, None),  # 428 * 2: T-sequences from Turyn-type sequences (hadamard_sequences)
    ("random-hadamard", 128, None),
    ("random-hadamard", 576, None),
    ("random-hadamard", 96, 12),
    ("random-orthogonal", 92, None),
    ("random-orthogonal", 96, 24),
]


def _rot(kind: str, n: int, block: int | None, seed: int = 0) -> Rotation:
    return make_rotation(kind, n, seed=seed, block_size=block)


@pytest.mark.parametrize(("kind", "n", "block"), CASES)
def test_orthonormal(kind: str, n: int, block: int | None) -> None:
    r = _rot(kind, n, block).matrix()
    assert r.shape == (n, n) and r.dtype == np.float64
    np.testing.assert_allclose(r @ r.T, np.eye(n), atol=1e-12)


@pytest.mark.parametrize(("kind", "n", "block"), CASES)
def test_apply_matches_matrix_on_every_axis(kind: str, n: int, block: int | None) -> None:
    rot = _rot(kind, n, block, seed=3)
    r = rot.matrix()
    rng = np.random.default_rng(n)
    for shape, axis in [((n,), 0), ((7, n), 1), ((n, 5), 0), ((2, n, 3), 1), ((2, 3, n), -1)]:
        x = rng.standard_normal(shape)
        ref = np.moveaxis(np.tensordot(x, r, axes=([axis], [0])), -1, axis)
        y = rot.apply(x, axis)
        assert y.dtype == np.float64 and y.shape == x.shape
        np.testing.assert_allclose(y, ref, rtol=0, atol=1e-12 * np.abs(ref).max())
        np.testing.assert_allclose(rot.apply_transpose(y, axis), x, rtol=0, atol=1e-12 * np.abs(x).max())


def test_apply_equals_x_at_matrix_2d() -> None:
    rot = make_rotation("random-hadamard", 576, seed=5)
    x = np.random.default_rng(0).standard_normal((9, 576))
    np.testing.assert_allclose(rot.apply(x, 1), x @ rot.matrix(), atol=1e-12)
    np.testing.assert_allclose(rot.apply_transpose(x, 1), x @ rot.matrix().T, atol=1e-12)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_low_precision_inputs_compute_in_float64(dtype: type) -> None:
    rot = make_rotation("hadamard", 128)
    x = np.random.default_rng(0).standard_normal((4, 128)).astype(dtype)
    y = rot.apply(x, 1)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, x.astype(np.float64) @ rot.matrix(), atol=1e-12)


def test_bfloat16_input() -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    rot = make_rotation("random-hadamard", 64, seed=1)
    x = np.random.default_rng(0).standard_normal((3, 64)).astype(ml_dtypes.bfloat16)
    y = rot.apply(x, 1)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, x.astype(np.float64) @ rot.matrix(), atol=1e-12)


def test_input_not_modified() -> None:
    x = np.random.default_rng(0).standard_normal((4, 96))
    before = x.copy()
    for kind in ("hadamard", "random-hadamard", "random-orthogonal"):
        make_rotation(kind, 96, block_size=12).apply(x, 1)
        np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize("kind", ["random-hadamard", "random-orthogonal"])
def test_seeding(kind: str) -> None:
    a = make_rotation(kind, 64, seed=7).matrix()
    np.testing.assert_array_equal(a, make_rotation(kind, 64, seed=7).matrix())
    assert not np.allclose(a, make_rotation(kind, 64, seed=8).matrix())


def test_hadamard_is_scaled_hadamard() -> None:
    for n in (12, 640):
        ref = hadamard_matrix(n) / np.sqrt(n)
        np.testing.assert_allclose(make_rotation("hadamard", n).matrix(), ref, atol=1e-15)
    d = make_rotation("random-hadamard", 20, seed=3).matrix() @ hadamard_matrix(20).T / np.sqrt(20)  # = D
    np.testing.assert_allclose(np.abs(d), np.eye(20), atol=1e-12)
    assert set(np.round(np.diag(d))) == {-1.0, 1.0}


def test_block_diagonal_structure() -> None:
    rot = make_rotation("random-orthogonal", 96, seed=2, block_size=32)
    assert rot.kind == "block-diagonal" and rot.block_kind == "random-orthogonal"
    r = rot.matrix()
    rb = r[:32, :32]
    for i in range(3):
        for j in range(3):
            blk = r[32 * i : 32 * i + 32, 32 * j : 32 * j + 32]
            np.testing.assert_array_equal(blk, rb if i == j else np.zeros((32, 32)))
    np.testing.assert_array_equal(rb, make_rotation("random-orthogonal", 32, seed=2).matrix())


def test_block_size_must_divide() -> None:
    with pytest.raises(UnsupportedSizeError, match=r"block size 48 .* 100"):
        make_rotation("hadamard", 100, block_size=48)
    assert make_rotation("hadamard", 64, block_size=64).kind == "hadamard"


def test_unsupported_hadamard_size() -> None:
    for kind in ("hadamard", "random-hadamard"):
        with pytest.raises(UnsupportedSizeError, match="random-orthogonal"):
            make_rotation(kind, 668)
    make_rotation("random-orthogonal", 668)
    make_rotation("hadamard", 668, block_size=4)


def test_unknown_kind_and_axis_mismatch() -> None:
    with pytest.raises(SpinQuantError, match="from_matrix"):
        make_rotation("matrix", 8)
    with pytest.raises(SpinQuantError, match="length 7"):
        make_rotation("hadamard", 8).apply(np.zeros((8, 7)), 1)


def test_describe_is_json() -> None:
    d = make_rotation("random-hadamard", 1152, seed=4, block_size=576).describe()
    assert json.loads(json.dumps(d)) == d
    assert d["kind"] == "block-diagonal" and d["block_kind"] == "random-hadamard"
    assert (d["n"], d["seed"], d["block_size"], d["base_order"], d["power_of_two"]) == (1152, 4, 576, 36, 16)
    assert make_rotation("random-orthogonal", 10).describe()["base_order"] is None


def test_from_matrix() -> None:
    q = make_rotation("random-orthogonal", 16, seed=1).matrix()
    rot = from_matrix(q)
    assert rot.kind == "matrix" and rot.n == 16
    x = np.random.default_rng(0).standard_normal((16, 3))
    np.testing.assert_allclose(rot.apply(x, 0), q.T @ x, atol=1e-12)
    np.testing.assert_allclose(rot.apply_transpose(rot.apply(x, 0), 0), x, atol=1e-12)
    with pytest.raises(SpinQuantError, match="not orthogonal") as info:
        from_matrix(q * 1.01)
    assert "0.0201" in str(info.value)
    with pytest.raises(UnsupportedSizeError, match="square"):
        from_matrix(np.eye(4)[:3])
    from_matrix(q + 1e-8)
