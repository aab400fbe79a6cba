"""Orthonormal rotations R (n x n) applied as x -> x @ R along one axis of any array, always in float64.

Hadamard kinds are applied with the fast transform and never materialize R; dense kinds (random-orthogonal,
user matrices) use one GEMM. A block size B gives R = diag(R_B, ..., R_B), applied by viewing the axis as
[n / B, B], which is how sizes without a Hadamard construction can still get Hadamard-like rotations.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from spinquant_onnx.errors import SpinQuantError, UnsupportedSizeError
from spinquant_onnx.rotation.hadamard import as_3d, contract, decompose, norm_axis, transform3, unsupported

__all__ = ["KINDS", "Rotation", "from_matrix", "make_rotation"]

KINDS = ("hadamard", "random-hadamard", "random-orthogonal")
_HADAMARD_KINDS = ("hadamard", "random-hadamard")


@dataclass(frozen=True, eq=False)
class Rotation:
    """An orthonormal n x n matrix R, applied as x -> x @ R along one axis (contracting R's first index).

    `kind` is "block-diagonal" when a block size splits R into n / block_size equal blocks of `block_kind`;
    otherwise kind == block_kind. Build with make_rotation or from_matrix.
    """

    n: int
    kind: str
    block_kind: str
    seed: int | None = None
    block_size: int | None = None
    signs: np.ndarray | None = None  # random-hadamard: the +-1 diagonal D of R_B = D H / sqrt(B)
    dense: np.ndarray | None = None  # random-orthogonal / matrix: R_B itself

    @property
    def block(self) -> int:
        """Order of one diagonal block (n when unblocked)."""
        return self.block_size or self.n

    def apply(self, x: np.ndarray, axis: int, dtype: type = np.float64, overwrite: bool = False) -> np.ndarray:
        """y = x @ R along `axis`, computed in `dtype` (float64 unless the user asked for float32).

        ``overwrite=True`` lets a caller that owns a C-contiguous array of ``dtype`` have it transformed in
        place, saving a copy of a tensor that may be gigabytes.
        """
        return self._apply(x, axis, transpose=False, dtype=dtype, overwrite=overwrite)

    def apply_transpose(
        self, x: np.ndarray, axis: int, dtype: type = np.float64, overwrite: bool = False
    ) -> np.ndarray:
        """y = x @ R^T along `axis`: the inverse of apply."""
        return self._apply(x, axis, transpose=True, dtype=dtype, overwrite=overwrite)

    def _apply(
        self, x: np.ndarray, axis: int, transpose: bool, dtype: type = np.float64, overwrite: bool = False
    ) -> np.ndarray:
        reuse = overwrite and x.dtype == dtype and x.flags.c_contiguous and x.flags.writeable
        y = x if reuse else np.array(x, dtype=dtype, order="C")  # the one copy we own and may overwrite
        axis = norm_axis(y, axis)
        if y.shape[axis] != self.n:
            raise SpinQuantError(
                f"cannot rotate axis {axis} of shape {tuple(y.shape)}: "
                f"length {y.shape[axis]}, rotation is {self.n}"
            )
        pre, n, post = as_3d(y, axis).shape
        y3 = y.reshape(pre * (n // self.block), self.block, post)
        return self._apply_blocks(y3, transpose).reshape(y.shape)

    def _apply_blocks(self, y3: np.ndarray, transpose: bool) -> np.ndarray:
        """R_B (or R_B^T) along axis 1 of an owned C-contiguous float64 (pre, B, post) array."""
        if self.dense is not None:
            return contract(y3, (self.dense.T if transpose else self.dense).astype(y3.dtype, copy=False))
        d = None if self.signs is None else self.signs[:, None]
        if d is not None and not transpose:
            y3 *= d  # x @ (D H) = (x * d) @ H
        out = transform3(y3, normalize=True, transpose=transpose)
        if d is not None and transpose:
            out *= d  # x @ (D H)^T = (x @ H^T) * d
        return out

    def block_matrix(self) -> np.ndarray:
        """Dense float64 R_B (one diagonal block)."""
        if self.dense is not None:
            return self.dense.copy()
        return self._apply_blocks(np.eye(self.block)[:, :, None], transpose=False)[:, :, 0]  # rows of I @ R_B

    def matrix(self) -> np.ndarray:
        """Dense float64 n x n R (for tests and small sizes: it is n**2 floats)."""
        rb = self.block_matrix()
        return rb if self.block == self.n else np.kron(np.eye(self.n // self.block), rb)

    def describe(self) -> dict[str, Any]:
        """JSON-able summary for reports: what was applied and how it can be rebuilt."""
        mk = decompose(self.block) if self.block_kind in _HADAMARD_KINDS else None
        return {
            "kind": self.kind,
            "block_kind": self.block_kind,
            "n": self.n,
            "seed": self.seed,
            "block_size": self.block_size,
            "num_blocks": self.n // self.block,
            "base_order": mk[0] if mk else None,
            "power_of_two": mk[1] if mk else None,
        }


def _haar_orthogonal(b: int, seed: int) -> np.ndarray:
    """Haar-distributed orthogonal matrix: QR of a Gaussian with R's diagonal signs folded into Q."""
    import scipy.linalg  # lazy: only this kind needs it; its QR is ~3x faster than numpy's here

    g = np.random.default_rng(seed).standard_normal((b, b))
    q, r = scipy.linalg.qr(g, mode="economic", overwrite_a=True, check_finite=False)
    s = np.sign(np.diag(r))
    s[s == 0] = 1.0
    q *= s
    q.flags.writeable = False
    return q


def make_rotation(kind: str, n: int, seed: int = 0, block_size: int | None = None) -> Rotation:
    """Build a rotation of order n; raises UnsupportedSizeError when the kind has no matrix of that size."""
    if kind not in KINDS:
        hint = " (user matrices go through from_matrix)" if kind == "matrix" else ""
        raise SpinQuantError(f"unknown rotation kind {kind!r}; expected one of {', '.join(KINDS)}{hint}")
    if n < 1:
        raise UnsupportedSizeError(f"cannot build a rotation of size {n}")
    if block_size is not None:
        if block_size < 1 or n % block_size:
            raise UnsupportedSizeError(f"block size {block_size} does not divide rotation size {n}")
        if block_size == n:
            block_size = None
    b = block_size or n
    outer = "block-diagonal" if block_size else kind
    if kind == "random-orthogonal":
        return Rotation(n, outer, kind, seed, block_size, dense=_haar_orthogonal(b, seed))
    if decompose(b) is None:
        raise unsupported(b)
    if kind == "hadamard":
        return Rotation(n, outer, kind, None, block_size)
    signs = np.random.default_rng(seed).integers(0, 2, size=b) * 2.0 - 1.0
    signs.flags.writeable = False
    return Rotation(n, outer, kind, seed, block_size, signs=signs)


def from_matrix(m: np.ndarray, atol: float = 1e-6) -> Rotation:
    """Wrap a user-supplied rotation after checking it is square and orthogonal to within atol."""
    r = np.array(m, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] != r.shape[1] or r.shape[0] == 0:
        raise UnsupportedSizeError(f"rotation matrix must be square, got shape {tuple(r.shape)}")
    if not np.all(np.isfinite(r)):
        raise SpinQuantError("rotation matrix has non-finite entries")
    dev = float(np.abs(r @ r.T - np.eye(r.shape[0])).max()) if r.size else 0.0
    if dev > atol:
        raise SpinQuantError(
            f"rotation matrix is not orthogonal: max |R R^T - I| = {dev:.3g} > atol {atol:g}"
        )
    r.flags.writeable = False
    return Rotation(r.shape[0], "matrix", "matrix", dense=r)
