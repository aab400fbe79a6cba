"""Rotations learned elsewhere (``--rotation-file``): SpinQuant's ``R.bin`` or an ``.npz``.

SpinQuant saves its Cayley-optimized rotations with ``torch.save`` as a dict: ``"R1"`` [hidden, hidden] and
``"model.layers.N.self_attn.R2"`` [head_dim, head_dim] per layer. That file is read with the restricted
reader in ``torch_pickle`` (no pickle code runs). An ``.npz`` may use the same keys, or ``"R2"`` for one
matrix shared by every layer. Both use SpinQuant's convention ``x -> x @ R``, which is ours.

Every matrix is checked: square, finite, orthogonal. Matrices trained in float32 are orthogonal only to
about 1e-6; anything within ``PROJECT_TOLERANCE`` is replaced by its nearest orthogonal matrix (the polar
factor), so the rotated model stays exactly equivalent; anything further off is refused.
"""

from __future__ import annotations

import os
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from spinquant_onnx.errors import InputError, SpinQuantError, UnsupportedGraphError, UnsupportedSizeError
from spinquant_onnx.rotation.kinds import Rotation, from_matrix

EXACT_TOLERANCE = 1e-6
PROJECT_TOLERANCE = 1e-4
_LAYER_R2 = re.compile(r"^(?:model\.)?layers\.(\d+)\.(?:self_attn\.)?R2$")


@dataclass
class LearnedRotations:
    """R1 and per-layer R2 matrices from a file, already checked orthogonal."""

    path: str
    r1: Rotation | None = None
    r2_layers: dict[int, Rotation] = field(default_factory=dict)
    r2_shared: Rotation | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def has_r2(self) -> bool:
        return bool(self.r2_layers) or self.r2_shared is not None

    def r1_for(self, hidden: int) -> Rotation:
        if self.r1 is None:
            raise SpinQuantError(f"{self.path}: has no R1")
        if self.r1.n != hidden:
            raise UnsupportedSizeError(
                f"{self.path}: R1 is {self.r1.n}x{self.r1.n} but the model's hidden size is {hidden}"
            )
        return self.r1

    def r2_for(self, layer: int, head_dim: int) -> Rotation:
        rotation = self.r2_layers.get(layer, self.r2_shared)
        if rotation is None:
            raise UnsupportedGraphError(
                f"{self.path}: no R2 for layer {layer} (has layers {sorted(self.r2_layers)}); "
                "give every layer one, or a shared 'R2'"
            )
        if rotation.n != head_dim:
            raise UnsupportedSizeError(
                f"{self.path}: R2 of layer {layer} is {rotation.n}x{rotation.n} but the model's head_dim is {head_dim}"
            )
        return rotation

    def check_layers(self, layers: list[int]) -> None:
        """Refuse per-layer R2 entries for layers the model does not have (a file for another model)."""
        extra = sorted(set(self.r2_layers) - set(layers))
        if extra:
            have = f"{min(layers)}..{max(layers)}" if layers else "none"
            raise UnsupportedGraphError(
                f"{self.path}: has R2 for layers {extra} but the model's attention layers are {have}"
            )

    def describe(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "r1": None if self.r1 is None else self.r1.n,
            "r2_layers": sorted(self.r2_layers),
            "r2_shared": None if self.r2_shared is None else self.r2_shared.n,
            "notes": self.notes,
        }


def _read_entries(path: Path) -> dict[str, np.ndarray]:
    if not path.is_file():
        raise InputError(f"{path}: no such rotation file")
    if path.suffix == ".npz":
        try:
            with np.load(path, allow_pickle=False) as data:
                return {key: np.asarray(data[key]) for key in data.files}
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise InputError(f"{path}: cannot read .npz rotation file ({exc})") from None
    from spinquant_onnx.io.torch_pickle import load_torch

    value = load_torch(path)
    if not isinstance(value, dict):
        raise InputError(f"{path}: holds one tensor; expected a dict with 'R1' and/or 'model.layers.N.self_attn.R2'")
    return value


def checked_rotation(matrix: np.ndarray, what: str, notes: list[str]) -> Rotation:
    """A Rotation from a learned matrix: square, finite, orthogonal (re-orthogonalized within tolerance)."""
    m = np.asarray(matrix)
    if m.dtype.kind not in "fc" and m.dtype.name != "bfloat16":
        raise InputError(f"{what}: expected a float matrix, got {m.dtype}")
    m = m.astype(np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        raise UnsupportedSizeError(f"{what}: a rotation must be a square matrix, got shape {list(m.shape)}")
    if not np.all(np.isfinite(m)):
        raise InputError(f"{what}: has NaN or infinite entries")
    deviation = float(np.abs(m @ m.T - np.eye(m.shape[0])).max())
    if deviation > PROJECT_TOLERANCE:
        raise SpinQuantError(
            f"{what}: not orthogonal (max |R R^T - I| = {deviation:.3g} > {PROJECT_TOLERANCE:g}); "
            "a learned rotation must be orthogonal"
        )
    if deviation > EXACT_TOLERANCE:
        u, _, vt = np.linalg.svd(m)
        m = u @ vt
        notes.append(f"{what}: re-orthogonalized (max |R R^T - I| was {deviation:.2g})")
    return from_matrix(m, atol=EXACT_TOLERANCE)


def load_rotation_file(path: str | os.PathLike) -> LearnedRotations:
    """Read and check every rotation in ``path`` (.npz, or a torch.save file such as SpinQuant's R.bin)."""
    path = Path(path)
    entries = _read_entries(path)
    learned = LearnedRotations(str(path))
    for key, matrix in entries.items():
        what = f"{path.name}['{key}']"
        if key == "R1":
            learned.r1 = checked_rotation(matrix, what, learned.notes)
        elif key == "R2":
            learned.r2_shared = checked_rotation(matrix, what, learned.notes)
        elif (found := _LAYER_R2.match(key)) is not None:
            learned.r2_layers[int(found.group(1))] = checked_rotation(matrix, what, learned.notes)
        else:
            raise InputError(f"{path}: unknown entry '{key}'; expected 'R1', 'R2' or 'model.layers.N.self_attn.R2'")
    if learned.r1 is None and not learned.has_r2:
        raise InputError(f"{path}: holds no rotations")
    return learned
