"""Hadamard constructions and the fast transform, checked against dense matrices."""

from __future__ import annotations

import numpy as np
import pytest

from spinquant_onnx.errors import UnsupportedSizeError
from spinquant_onnx.rotation.hadamard import _GF, base_matrix, decompose, fwht, hadamard_matrix, hadamard_transform

REQUIRED = [12, 20, 28, 36, 44, 60, 344, 576, 640, 896, 960, 1152, 1536, 2304, 2560, 3072, 3584]


def _assert_hadamard(h: np.ndarray) -> None:
    n = h.shape[0]
    assert h.shape == (n, n)
    assert np.all(np.abs(h) == 1.0)
    if n <= 2048:
        h32 = h.astype(np.float32)  # integer sums < 2**24: float32 GEMM is exact
        hht = h32 @ h32.T
    else:  # H @ H^T through the fast transform (checked against dense products below): exact integer sums
        hht = hadamard_transform(h, 1, normalize=False, transpose=True)
    np.testing.assert_array_equal(hht, n * np.eye(n))


def _dense_ref(x: np.ndarray, h: np.ndarray, axis: int) -> np.ndarray:
    return np.moveaxis(np.tensordot(x, h, axes=([axis], [0])), -1, axis)


@pytest.mark.parametrize("n", REQUIRED)
def test_required_orders_are_exact_hadamard(n: int) -> None:
    _assert_hadamard(hadamard_matrix(n))


def test_powers_of_two() -> None:
    for k in range(15):
        assert decompose(2**k) == (1, 2**k)
    for k in range(12):
        _assert_hadamard(hadamard_matrix(2**k))


def test_11008_via_gf343() -> None:
    assert decompose(11008) == (344, 32)
    _assert_hadamard(base_matrix(344))


def test_decompose_prefers_largest_power_of_two() -> None:
    assert decompose(576) == (36, 16)
    assert decompose(640) == (20, 32)
    assert decompose(896) == (28, 32)
    assert decompose(1536) == (12, 128)
    assert decompose(12) == (12, 1)
    assert decompose(144) == (36, 4)


def test_kronecker_of_paley_bases() -> None:
    # 1904 = 7 * 17 * 16: no 119 * 2**j is a Paley order, 28 * 68 is the smallest Kronecker split.
    assert decompose(1904) == (1904, 1)
    _assert_hadamard(hadamard_matrix(1904))
    np.testing.assert_array_equal(base_matrix(1904), np.kron(base_matrix(28), base_matrix(68)))


def test_gf_arithmetic_is_a_field() -> None:
    gf = _GF(7, 3)
    a = np.arange(gf.q)
    table = gf.mul(a[:, None], a[None, :])
    assert all(sorted(table[i]) == list(range(gf.q)) for i in range(1, gf.q))  # every nonzero is invertible
    chi = gf.quadratic_character()
    assert (chi == 1).sum() == (chi == -1).sum() == (gf.q - 1) // 2


def test_base_matrix_cached_and_read_only() -> None:
    assert base_matrix(36) is base_matrix(36)
    assert not base_matrix(36).flags.writeable
    np.testing.assert_array_equal(base_matrix(1), [[1.0]])


@pytest.mark.parametrize("n", [716, 668, 11456, 3, 7, 6, 0])
def test_unsupported_sizes(n: int) -> None:
    assert decompose(n) is None
    for fn in (hadamard_matrix, lambda k: hadamard_transform(np.zeros(k))):
        with pytest.raises(UnsupportedSizeError, match="random-orthogonal") as info:
            fn(n)
        assert str(n) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("n", [1, 2, 16, 256, 12, 24, 48, 576, 640, 344 * 2])
@pytest.mark.parametrize("transpose", [False, True])
def test_transform_matches_dense(n: int, transpose: bool) -> None:
    rng = np.random.default_rng(n)
    h = hadamard_matrix(n)
    h = (h.T if transpose else h) / np.sqrt(n)
    for shape, axis in [((n,), 0), ((3, n), 1), ((3, n), -1), ((n, 5), 0), ((2, n, 3), 1), ((2, 3, n), 2)]:
        x = rng.standard_normal(shape)
        ref = _dense_ref(x, h, axis)
        got = hadamard_transform(x, axis, transpose=transpose)
        assert got.dtype == np.float64 and got.shape == x.shape
        assert np.abs(got - ref).max() <= 1e-12 * np.abs(ref).max()


def test_transform_unnormalized_and_input_untouched() -> None:
    x = np.random.default_rng(0).standard_normal((4, 576)).astype(np.float32)
    before = x.copy()
    got = hadamard_transform(x, 1, normalize=False)
    np.testing.assert_array_equal(x, before)
    ref = x.astype(np.float64) @ hadamard_matrix(576)
    assert np.abs(got - ref).max() <= 1e-12 * np.abs(ref).max()


def test_transform_is_orthonormal() -> None:
    x = np.random.default_rng(1).standard_normal((3, 640))
    y = hadamard_transform(hadamard_transform(x, 1), 1, transpose=True)
    np.testing.assert_allclose(y, x, atol=1e-12)


@pytest.mark.parametrize("n", [1, 2, 4, 64, 1024])
def test_fwht_matches_sylvester(n: int) -> None:
    x = np.random.default_rng(n).standard_normal((n, 3))
    ref = hadamard_matrix(n) @ x  # Sylvester is symmetric: x @ H == H @ x along axis 0
    np.testing.assert_allclose(fwht(x, 0), ref, rtol=0, atol=1e-12 * np.abs(ref).max())
    np.testing.assert_allclose(fwht(x.T, -1), ref.T, rtol=0, atol=1e-12 * np.abs(ref).max())


def test_fwht_rejects_non_power_of_two() -> None:
    with pytest.raises(UnsupportedSizeError):
        fwht(np.zeros(12))
