"""Hadamard matrices of every order reachable from Sylvester, Paley I/II and Kronecker products, then (only
where those miss) from the sequence constructions of hadamard_sequences (Williamson, Goethals-Seidel with
T-sequences or difference sets, Cooper-Wallis, Miyamoto) and their Kronecker products; and a fast
transform that never builds the dense matrix.

An order n is handled as n = m * 2**k: the 2**k part is a Sylvester factor applied with O(n log n)
butterflies, the (small) base order m is a Paley matrix, a sequence construction or a Kronecker product of
those, applied as one dense m x m product. The dense matrix is H_n = kron(base_matrix(m), sylvester(2**k)),
i.e. the index is i = i_m * 2**k + i_2.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Sequence

import numpy as np

from spinquant_onnx.errors import UnsupportedSizeError
from spinquant_onnx.rotation import hadamard_sequences

__all__ = [
    "base_matrix",
    "decompose",
    "fwht",
    "hadamard_matrix",
    "hadamard_transform",
    "largest_supported_divisor",
]

# Chunked temporaries (Jacobsthal rows, fused-GEMM rows) are capped at about this many elements.
_CHUNK_ELEMS = 1 << 20
# contract() moves the axis last for one GEMM when the rest of each slice is below this many elements.
_SMALL_REST = 256


# ----------------------------------------------------------------------------------------------------------
# Number theory


def _prime_power(q: int) -> tuple[int, int] | None:
    """(p, k) with q = p**k for a prime p, or None: Paley constructions need a finite field of order q."""
    if q < 2:
        return None
    p = next((d for d in range(2, math.isqrt(q) + 1) if q % d == 0), q)
    k = 0
    while q % p == 0:
        q //= p
        k += 1
    return (p, k) if q == 1 else None


def _is_power_of_two(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def _paley_kind(m: int) -> int | None:
    """1 or 2 if a Paley I / Paley II matrix of order m exists (Paley I preferred), else None."""
    q1 = _prime_power(m - 1)
    if q1 is not None and (m - 1) % 4 == 3:
        return 1
    if m % 2 == 0:
        q2 = _prime_power(m // 2 - 1)
        if q2 is not None and (m // 2 - 1) % 4 == 1:
            return 2
    return None


@functools.lru_cache(maxsize=4096)
def _split(m: int, extended: bool = False) -> tuple[int, int] | None:
    """(a, m // a), the Kronecker split with the smallest constructible a > 1, or None if m has no split;
    `extended` lets the factors use the sequence constructions too."""
    ok = _reachable if extended else _constructible
    for a in range(2, math.isqrt(m) + 1):
        if m % a == 0 and ok(a) and ok(m // a):
            return a, m // a
    return None


@functools.lru_cache(maxsize=4096)
def _constructible(m: int) -> bool:
    return _is_power_of_two(m) or _paley_kind(m) is not None or _split(m) is not None


@functools.lru_cache(maxsize=4096)
def _reachable(m: int) -> bool:
    """Constructible, or built from sequences, or a Kronecker product involving those. Used only where the
    classic constructions miss, so every order they reach keeps the matrix it always had."""
    return _constructible(m) or hadamard_sequences.recipe(m, _reachable) is not None or _split(m, True) is not None


def decompose(n: int) -> tuple[int, int] | None:
    """(m, 2**k) with n = m * 2**k and m the smallest constructible base order, so the fast butterfly part is
    as large as possible; None when no construction reaches n. Sylvester/Paley/Kronecker bases come first
    (the matrices of those orders stay as they were), the sequence constructions only where those miss."""
    if n < 1:
        return None
    k = (n & -n).bit_length() - 1
    for ok in (_constructible, _reachable):
        for j in range(k, -1, -1):
            m = n >> j
            if ok(m):  # m is odd or a non-power of two here, except m == 1
                return m, 1 << j
    return None


def largest_supported_divisor(n: int) -> int:
    """The largest d | n with a Hadamard construction (1 at worst): the natural block size to suggest."""
    divisors = {d for i in range(1, math.isqrt(n) + 1) if n % i == 0 for d in (i, n // i)}
    return max(d for d in divisors if decompose(d) is not None)


def unsupported(n: int) -> UnsupportedSizeError:
    if n > 2 and n % 4:
        why = "Hadamard orders above 2 are multiples of 4"
    else:
        why = "no Sylvester, Paley, Williamson, T-sequence, difference-set, Miyamoto or Kronecker construction"
    d = largest_supported_divisor(n) if n >= 1 else 1
    block = f" or a block size that divides {n} (e.g. {d})" if d > 1 else ""
    return UnsupportedSizeError(
        f"no Hadamard matrix of order {n} ({why}); use --rotation random-orthogonal (seeded, any size){block}"
    )


# ----------------------------------------------------------------------------------------------------------
# GF(p**k): elements are ints 0..q-1 whose base-p digits are polynomial coefficients (digit i <-> x**i).


def _poly_mod(a: list[int], f: list[int], p: int) -> list[int]:
    """a mod f over GF(p); coefficient lists low-to-high, f monic."""
    a = a[:]
    df = len(f) - 1
    for d in range(len(a) - 1, df - 1, -1):
        c = a[d] % p
        if c:
            for i in range(df + 1):
                a[d - df + i] = (a[d - df + i] - c * f[i]) % p
    return [c % p for c in a[:df]]


def _irreducible(p: int, k: int) -> list[int]:
    """The first monic irreducible polynomial of degree k over GF(p), found by trial division."""
    if k == 1:
        return [0, 1]
    for low in itertools.product(range(p), repeat=k):
        f = [*low, 1]
        if f[0] == 0:
            continue
        divisible = False
        for d in range(1, k // 2 + 1):
            for g_low in itertools.product(range(p), repeat=d):
                if not any(_poly_mod(f, [*g_low, 1], p)):
                    divisible = True
                    break
            if divisible:
                break
        if not divisible:
            return f
    raise AssertionError(f"no irreducible polynomial of degree {k} over GF({p})")  # impossible


class _GF:
    """GF(p**k) with vectorized subtraction and multiplication on int arrays of encoded elements."""

    def __init__(self, p: int, k: int) -> None:
        self.p, self.k, self.q = p, k, p**k
        self.modulus = _irreducible(p, k)
        self.weights = p ** np.arange(k, dtype=np.int64)

    def digits(self, a: np.ndarray) -> np.ndarray:
        return (a[..., None] // self.weights) % self.p

    def encode(self, d: np.ndarray) -> np.ndarray:
        return (d % self.p) @ self.weights

    def sub(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return self.encode(self.digits(a) - self.digits(b))

    def mul(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        p, k, f = self.p, self.k, self.modulus
        da, db = (self.digits(v) for v in np.broadcast_arrays(a, b))
        prod = np.zeros((*da.shape[:-1], 2 * k - 1), dtype=np.int64)
        for i in range(k):
            for j in range(k):
                prod[..., i + j] += da[..., i] * db[..., j]
        prod %= p
        for d in range(2 * k - 2, k - 1, -1):  # x**k = -(f_0 + ... + f_{k-1} x**(k-1))
            c = prod[..., d].copy()
            for i in range(k):
                prod[..., d - k + i] -= c * f[i]
            prod %= p
        return self.encode(prod[..., :k])

    def quadratic_character(self) -> np.ndarray:
        """chi[a] = 0, 1, -1 for a zero, a nonzero square, a non-square."""
        a = np.arange(1, self.q, dtype=np.int64)
        chi = np.full(self.q, -1, dtype=np.int8)
        chi[self.mul(a, a)] = 1
        chi[0] = 0
        return chi

    def jacobsthal(self) -> np.ndarray:
        """Q[a, b] = chi(a - b), built in row chunks to bound temporaries."""
        chi = self.quadratic_character()
        q = self.q
        out = np.empty((q, q), dtype=np.int8)
        cols = np.arange(q, dtype=np.int64)
        step = max(1, _CHUNK_ELEMS // (q * self.k))
        for r0 in range(0, q, step):
            rows = np.arange(r0, min(q, r0 + step), dtype=np.int64)
            out[r0 : r0 + len(rows)] = chi[self.sub(rows[:, None], cols[None, :])]
        return out


# ----------------------------------------------------------------------------------------------------------
# Dense constructions


def sylvester(n: int) -> np.ndarray:
    h = np.ones((1, 1))
    while h.shape[0] < n:
        h = np.block([[h, h], [h, -h]])
    return h


def _paley(m: int, kind: int) -> np.ndarray:
    q = m - 1 if kind == 1 else m // 2 - 1
    pk = _prime_power(q)
    assert pk is not None
    jac = _GF(*pk).jacobsthal().astype(np.float64)
    c = np.zeros((q + 1, q + 1))
    c[1:, 1:] = jac
    if kind == 1:  # q = 3 mod 4: Q antisymmetric, S = [[0, 1], [-1, Q]] skew with S S^T = qI, H = I + S
        c[0, 1:] = 1.0
        c[1:, 0] = -1.0
        return c + np.eye(q + 1)
    # q = 1 mod 4: symmetric conference matrix C, H = C (x) [[1, 1], [1, -1]] + I (x) [[1, -1], [-1, -1]]
    c[0, 1:] = 1.0
    c[1:, 0] = 1.0
    return np.kron(c, [[1.0, 1.0], [1.0, -1.0]]) + np.kron(np.eye(q + 1), [[1.0, -1.0], [-1.0, -1.0]])


@functools.lru_cache(maxsize=32)
def base_matrix(m: int) -> np.ndarray:
    """The +-1 float64 Hadamard matrix of base order m (read-only, cached): Sylvester if m is a power of two,
    else Paley I/II, else the Kronecker product of the smallest constructible split, else (orders those miss)
    a sequence construction or a Kronecker split using one."""
    if _is_power_of_two(m):
        h = sylvester(m)
    elif (kind := _paley_kind(m)) is not None:
        h = _paley(m, kind)
    elif (ab := _split(m)) is not None:
        h = np.kron(base_matrix(ab[0]), base_matrix(ab[1]))
    elif hadamard_sequences.recipe(m, _reachable) is not None:  # verified when built
        h = hadamard_sequences.build(m, hadamard_matrix, _reachable)
    elif (ab := _split(m, True)) is not None:
        h = np.kron(base_matrix(ab[0]), base_matrix(ab[1]))
    else:
        raise unsupported(m)
    h.flags.writeable = False
    return h


def hadamard_matrix(n: int) -> np.ndarray:
    """Dense +-1 float64 H_n with H H^T = n I, in the ordering hadamard_transform uses."""
    mk = decompose(n)
    if mk is None:
        raise unsupported(n)
    m, p2 = mk
    return np.kron(base_matrix(m), sylvester(p2))


# ----------------------------------------------------------------------------------------------------------
# Fast transforms


def _sylvester_factors(p2: int) -> tuple[int, ...]:
    """How H_P is applied: one GEMM up to order 64, else H_P = H_f1 (x) H_f2 (x) ... with factors of at most
    16 (as few and as even as possible). Small factors cost fewer flops (2 * sum(f) per element rather than
    2 * P); measured with BLAS on one core, 8 x 16 x 16 runs 2048 in ~0.65x the time of 32 x 64, 16^3 runs
    4096 in ~0.5x that of 64 x 64."""
    if p2 <= 64:
        return (p2,)
    k = p2.bit_length() - 1
    parts = -(-k // 4)
    base, extra = divmod(k, parts)
    return tuple(1 << (base + (1 if i >= parts - extra else 0)) for i in range(parts))


def _kron_apply(x: np.ndarray, sizes: tuple[int, ...], mats: Sequence[np.ndarray], post: int) -> None:
    """x <- x @ kron(mats) along the P = prod(sizes) axis of a C-contiguous (..., P, post) array, in place:
    one GEMM per factor on its own axis (Kronecker factors on different axes commute). The GEMMs write
    into a second buffer and back (``out=``), so no factor pays for a temporary and a copy; an odd count
    of factors ends with one copy into x."""
    if not x.flags.c_contiguous:
        raise ValueError("internal: _kron_apply needs a C-contiguous array")
    lead = x.size // (math.prod(sizes) * post)
    src, dst = x, np.empty_like(x)
    for j, (f, mat) in enumerate(zip(sizes, mats, strict=True)):
        outer, inner = lead * math.prod(sizes[:j]), math.prod(sizes[j + 1 :]) * post
        if inner == 1:
            np.matmul(src.reshape(outer, f), mat, out=dst.reshape(outer, f))
        else:  # Sylvester factors are symmetric: mat.T == mat
            np.matmul(mat, src.reshape(outer, f, inner), out=dst.reshape(outer, f, inner))
        src, dst = dst, src
    if src is not x:
        np.copyto(x, src)


@functools.lru_cache(maxsize=64)
def _factor_matrices(sizes: tuple[int, ...], scale: float, dtype: str) -> tuple[np.ndarray, ...]:
    """The Sylvester factors' matrices in ``dtype``, ``scale`` folded into the first (read-only, cached and
    shared by the worker threads: rotate asks once per chunk, and building them costs ~0.25 ms, 15-20% of a
    256K-element chunk)."""
    mats = [sylvester(f) for f in sizes]
    mats[0] = mats[0] * scale
    mats = [m.astype(dtype, copy=False) for m in mats]
    for m in mats:
        m.flags.writeable = False
    return tuple(mats)


def _butterflies(y: np.ndarray, scale: float = 1.0) -> None:
    """In-place unnormalized Sylvester WHT along axis 1 of a C-contiguous (pre, P, post) array, times ``scale``.

    One GEMM per Sylvester factor (``_sylvester_factors``) on cache-sized chunks of about 8 MB instead of
    log2(P) strided passes: more flops than butterflies, but BLAS runs them several times faster than
    numpy's element-wise passes, with the same result to rounding. ``scale`` is folded into a factor.
    """
    pre, p2, post = y.shape
    if p2 < 2:
        if scale != 1.0:
            y *= y.dtype.type(scale)
        return
    sizes = _sylvester_factors(p2)
    mats = _factor_matrices(sizes, scale, y.dtype.str)
    if post == 1:
        flat = y.reshape(pre, p2)
        rows = max(1, _CHUNK_ELEMS // p2)
        for r0 in range(0, pre, rows):
            _kron_apply(flat[r0 : r0 + rows], sizes, mats, 1)
        return
    cols = max(1, _CHUNK_ELEMS // p2)
    for i in range(pre):
        if cols >= post:
            _kron_apply(y[i], sizes, mats, post)
            continue
        for c0 in range(0, post, cols):
            block = np.ascontiguousarray(y[i][:, c0 : c0 + cols])
            _kron_apply(block, sizes, mats, block.shape[1])
            y[i][:, c0 : c0 + cols] = block


def as_3d(y: np.ndarray, axis: int) -> np.ndarray:
    n = y.shape[axis]
    pre = math.prod(y.shape[:axis])
    return y.reshape(pre, n, y.size // max(1, pre * n))


def norm_axis(x: np.ndarray, axis: int) -> int:
    if not -x.ndim <= axis < x.ndim:
        raise np.exceptions.AxisError(axis, x.ndim)
    return axis % x.ndim


def fwht(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Unnormalized Walsh-Hadamard transform (Sylvester ordering) along a power-of-two axis, float64."""
    y = np.array(x, dtype=np.float64, order="C")
    axis = norm_axis(y, axis)
    if not _is_power_of_two(y.shape[axis]):
        raise UnsupportedSizeError(f"fwht needs a power-of-two length, got {y.shape[axis]}")
    _butterflies(as_3d(y, axis))
    return y


def contract(y: np.ndarray, a: np.ndarray) -> np.ndarray:
    """out[p, j, r] = sum_i y[p, i, r] a[i, j] for a (pre, m, post) array: x @ a along the middle axis."""
    pre, m, post = y.shape
    if post == 1:  # one GEMM instead of `pre` batched mat-vecs
        return (y.reshape(pre, m) @ a).reshape(pre, -1, 1)
    if pre > 1 and post < _SMALL_REST:  # `pre` tiny matmuls loop in numpy: one transposed GEMM instead
        moved = np.ascontiguousarray(y.transpose(0, 2, 1)).reshape(-1, m) @ a
        return moved.reshape(pre, post, -1).transpose(0, 2, 1)
    return np.matmul(a.T, y)


def transform3(y: np.ndarray, normalize: bool, transpose: bool) -> np.ndarray:
    """hadamard_transform along axis 1 of a C-contiguous float64 (pre, n, post) array, overwritten in the
    process (callers hand over a copy they own: this is what keeps the memory at about two copies of x)."""
    pre, n, post = y.shape
    mk = decompose(n)
    if mk is None:
        raise unsupported(n)
    m, p2 = mk
    scale = 1.0 / math.sqrt(n)
    if m == 1:
        _butterflies(y, scale if normalize else 1.0)
        return y
    _butterflies(y.reshape(pre * m, p2, post))
    a = base_matrix(m).T if transpose else base_matrix(m)
    if normalize:
        a = a * scale
    a = a.astype(y.dtype, copy=False)
    return contract(y.reshape(pre, m, p2 * post), a).reshape(y.shape)


def hadamard_transform(
    x: np.ndarray, axis: int = -1, normalize: bool = True, transpose: bool = False
) -> np.ndarray:
    """x @ H_n along `axis` (x @ H_n^T if transpose), divided by sqrt(n) if normalize; float64 result.

    Butterflies on the 2**k part, one dense m x m product on the base part; about two float64 copies of x.
    """
    y = np.array(x, dtype=np.float64, order="C")
    axis = norm_axis(y, axis)
    return transform3(as_3d(y, axis), normalize, transpose).reshape(y.shape)
