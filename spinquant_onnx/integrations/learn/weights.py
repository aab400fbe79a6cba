"""The model's weights as differentiable functions of the rotations, exactly as the rewrite plans them.

The same passes that ``rotate`` runs (norm fusion, R1, R2, float channels, R4) fill a ``TensorPlan``; R1
and each layer's R2 are *markers* (dense matrices whose identity we know), so every planned operation that uses one is
replayed in torch with the current learned matrix, and every other one (gamma scales, the fixed R4
Hadamard) is computed once in float64. Ops on different axes commute, so fixed ops are moved ahead of
learned ones wherever no learned op on the same axis precedes them: ``W_down' = R1-part(H4^T W)`` costs
one small GEMM per step instead of two.

Two uses are cheaper on the activation side, where the result is the same function: an embedding table
read by one Gather (rotate the gathered rows, not the whole table) and a linear whose weight is not
quantized (lm_head: ``x @ (R^T W) = (x R^T) @ W``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from spinquant_onnx.errors import UnsupportedGraphError, UnsupportedSizeError
from spinquant_onnx.match.analysis import Analysis
from spinquant_onnx.rewrite.base import PassContext, registered, run_passes
from spinquant_onnx.rewrite.plan import TensorOp, TensorPlan, run_ops
from spinquant_onnx.rewrite.rotate_r2 import RangeRotation
from spinquant_onnx.rotation.kinds import Rotation, from_matrix, make_rotation
from spinquant_onnx.rotation.learned_file import LearnedRotations

R1_KEY = "R1"


def r2_key(layer: int) -> str:
    """The rotation-file key of a layer's R2 (SpinQuant's name, which ``--rotation-file`` reads)."""
    return f"model.layers.{layer}.self_attn.R2"


def start_matrix(n: int, seed: int) -> tuple[np.ndarray, str]:
    """Where learning starts: the Hadamard of order n, else a seeded random orthogonal matrix."""
    try:
        return make_rotation("hadamard", n).matrix(), "hadamard"
    except UnsupportedSizeError:
        return make_rotation("random-orthogonal", n, seed).matrix(), "random-orthogonal"


@dataclass
class _Options:
    """The subset of ``core.options.Options`` the planning passes read (rewrite must not import core)."""

    r2: bool
    r4: bool
    rotation: str = "hadamard"
    seed: int = 0
    block_size: int | None = None
    entries: str = "online"
    r3: bool = False
    float_channels: int = 0
    activation_maxima: dict[str, np.ndarray] | None = None


PLANNED = {"fuse_norms", "r1", "r2", "float_channels", "r4"}  # the passes whose result learning replays


@dataclass
class LearningPlan:
    """The planned rewrite with learnable markers: ``starts`` maps each file key to its starting matrix."""

    plan: TensorPlan
    starts: dict[str, np.ndarray]
    markers: dict[int, str]  # id(marker dense matrix) -> file key
    start_kinds: dict[str, str] = field(default_factory=dict)


def plan_learning(
    analysis: Analysis,
    learn_r2: bool,
    r4: bool,
    seed: int,
    float_channels: int = 0,
    maxima: dict[str, np.ndarray] | None = None,
) -> LearningPlan:
    """Plan norm fusion, R1 (a marker), per-layer R2 (markers), the float channels' side paths (nodes
    inserted into the analysed graph) and the fixed R4, as ``rotate`` would."""
    stream = analysis.stream
    if stream.entries or any(event.online is not None for event in stream.writers):
        raise UnsupportedGraphError(
            "learn: this model needs R1 applied online (sandwich norms or an inputs_embeds entry), which "
            "learning does not support yet; use a fixed --rotation with rotate"
        )
    starts, kinds = {}, {}
    starts[R1_KEY], kinds[R1_KEY] = start_matrix(stream.hidden, seed)
    markers = LearnedRotations("learn", r1=from_matrix(starts[R1_KEY]))
    if learn_r2:
        for site in analysis.sites:
            key = r2_key(site.block)
            starts[key], kinds[key] = start_matrix(site.geometry.head_dim, seed)
            markers.r2_layers[site.block] = from_matrix(starts[key])
    options = _Options(r2=learn_r2, r4=r4, float_channels=float_channels, activation_maxima=maxima)
    ctx = PassContext(analysis, TensorPlan(), options, markers)
    run_passes(ctx, [p for p in registered() if p.name in PLANNED])
    ctx.plan.finalize(analysis.index)
    ids = {id(markers.r1.dense): R1_KEY}
    ids.update({id(rot.dense): r2_key(layer) for layer, rot in markers.r2_layers.items()})
    return LearningPlan(ctx.plan, starts, ids, kinds)


# ------------------------------------------------------------------------------------ rotations in torch

Matrices = dict[str, torch.Tensor]


class Resolver:
    """How a planned rotation acts in torch: through a learned matrix (by key), or a fixed one."""

    def __init__(self, markers: dict[int, str]):
        self.markers = markers
        self._fixed: dict[int, torch.Tensor] = {}

    def key(self, rotation: object) -> str | None:
        if isinstance(rotation, RangeRotation):
            return self.key(rotation.inner)
        dense = getattr(rotation, "dense", None)
        return self.markers.get(id(dense)) if dense is not None else None

    def learned(self, op: TensorOp) -> bool:
        return op.kind in ("rotate", "rotate_t") and self.key(op.rotation) is not None

    def block(self, rotation: Rotation, matrices: Matrices) -> torch.Tensor:
        key = self.key(rotation)
        if key is not None:
            return matrices[key]
        found = self._fixed.get(id(rotation))
        if found is None:
            found = torch.from_numpy(rotation.block_matrix().astype(np.float32))
            self._fixed[id(rotation)] = found
        return found

    def rotate(self, x: torch.Tensor, axis: int, rotation: object, transpose: bool, matrices: Matrices) -> torch.Tensor:
        """``x @ R`` (``x @ R^T`` with ``transpose``) along ``axis``, R block-diagonal or on a range."""
        if isinstance(rotation, RangeRotation):
            axis = axis % x.ndim
            start, stop = rotation.start, rotation.start + rotation.inner.n
            parts = x.split([start, stop - start, x.shape[axis] - stop], dim=axis)
            middle = self.rotate(parts[1], axis, rotation.inner, transpose, matrices)
            return torch.cat([parts[0], middle, parts[2]], dim=axis)
        block = self.block(rotation, matrices)
        matrix = block.T if transpose else block
        if x.ndim == 2 and axis % 2 == 0 and matrix.shape[0] == x.shape[0]:
            return matrix.T @ x  # a weight's input axis: one GEMM, no transposed copies
        y = x.movedim(axis, -1)
        shape = y.shape
        y = (y.reshape(*shape[:-1], shape[-1] // matrix.shape[0], matrix.shape[0]) @ matrix).reshape(shape)
        return y.movedim(-1, axis)

    def apply(self, x: torch.Tensor, op: TensorOp, matrices: Matrices) -> torch.Tensor:
        """One planned op on a weight, in torch."""
        if op.kind == "scale":
            shape = [1] * x.ndim
            shape[op.axis] = -1
            return x * torch.from_numpy(op.vector.astype(np.float32)).reshape(shape)
        if op.kind == "fill":
            return torch.full_like(x, op.value)
        return self.rotate(x, op.axis, op.rotation, op.kind == "rotate_t", matrices)

    def apply_to_input(self, x: torch.Tensor, op: TensorOp, matrices: Matrices) -> torch.Tensor:
        """The same op moved onto a linear's input: ``x @ op(W) = op'(x) @ W`` along x's last axis."""
        if op.kind == "scale":
            return x * torch.from_numpy(op.vector.astype(np.float32))
        return self.rotate(x, -1, op.rotation, op.kind == "rotate", matrices)


def split_fixed(ops: tuple[TensorOp, ...], resolver: Resolver) -> tuple[tuple[TensorOp, ...], tuple[TensorOp, ...]]:
    """(fixed ops that can run first, the rest in order): a fixed op moves ahead unless a learned op on its
    axis comes before it (ops on different axes commute)."""
    blocked: set[int] = set()
    fixed, rest = [], []
    for op in ops:
        if resolver.learned(op) or op.axis in blocked or op.kind == "fill" and blocked:
            blocked.add(op.axis)
            rest.append(op)
        else:
            fixed.append(op)
    return tuple(fixed), tuple(rest)


@dataclass
class LearnedTensor:
    """An initializer whose value depends on learned rotations: a fixed part and torch ops after it."""

    name: str
    base: torch.Tensor
    ops: tuple[TensorOp, ...]

    def axes(self) -> set[int]:
        return {op.axis for op in self.ops}


def learned_tensors(
    learning: LearningPlan, source: Callable[[str], np.ndarray], resolver: Resolver
) -> tuple[dict[str, torch.Tensor], dict[str, LearnedTensor]]:
    """(constant planned tensors, computed once; tensors that depend on learned rotations)."""
    constants: dict[str, torch.Tensor] = {}
    learned: dict[str, LearnedTensor] = {}
    for name, target in learning.plan.targets.items():
        fixed, rest = split_fixed(target.ops, resolver)
        values = source(target.source)
        base = run_ops(values, fixed, np.dtype(np.float32)) if fixed else np.asarray(values, dtype=np.float32)
        tensor = torch.from_numpy(np.array(base, dtype=np.float32, order="C", copy=True))
        if rest:
            learned[name] = LearnedTensor(name, tensor, rest)
        else:
            constants[name] = tensor
    return constants, learned
