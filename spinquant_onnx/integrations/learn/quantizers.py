"""Simulated quantizers with the target scheme's arithmetic, and straight-through rounding.

They mirror what ``eval`` deploys: ``quantize_static`` W8A8 (per-tensor asymmetric uint8 activations from
min/max, zero included; per-output-channel symmetric int8 weights, scale = max|w| / 127) and
``MatMulNBits`` RTN (symmetric blocks along the input axis; the element of largest magnitude maps to -8,
as onnxruntime's blockwise quantizer does). Rounding passes gradients straight through; scales stay in
the graph, so the loss also sees how a rotation changes each tensor's range (as in SpinQuant).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from spinquant_onnx.errors import InputError
from spinquant_onnx.integrations.learn.config import SCHEMES

EPS = 1e-12


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.round(x) - x).detach()


def activation_range(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """onnxruntime MinMax's range of one tensor: (min, max), widened to include 0."""
    return torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)


def activation_u8(x: torch.Tensor, static: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Per-tensor asymmetric uint8 over this batch's range, or over a ``static`` calibrated one (what
    ``quantize_static`` deploys: values outside it saturate)."""
    low, high = activation_range(x) if static is None else static
    scale = torch.clamp((high - low) / 255.0, min=EPS)
    zero = torch.round(-low / scale).detach()
    q = torch.clamp(round_ste(x / scale) + zero, 0.0, 255.0)
    return (q - zero) * scale


def weight_i8(w: torch.Tensor, in_axis: int = 0) -> torch.Tensor:
    """Per-output-channel symmetric int8 (scale = max|w| over the input axis / 127)."""
    scale = torch.clamp(w.abs().amax(dim=in_axis, keepdim=True) / 127.0, min=EPS)
    return torch.clamp(round_ste(w / scale), -127.0, 127.0) * scale


def weight_i4_blocks(w: torch.Tensor, block: int, in_axis: int = 0) -> torch.Tensor:
    """Symmetric 4-bit in blocks of ``block`` inputs per output column: scale = (signed max-magnitude) / -8."""
    x = w.movedim(in_axis, -1)
    k = x.shape[-1]
    pad = (-k) % block
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    blocks = x.reshape(*x.shape[:-1], -1, block)
    index = blocks.abs().argmax(dim=-1, keepdim=True)
    signed_max = blocks.gather(-1, index)
    scale = signed_max / -8.0
    scale = torch.where(scale.abs() < EPS, torch.full_like(scale, EPS), scale)
    q = torch.clamp(round_ste(blocks / scale), -8.0, 7.0) * scale
    return q.reshape(*x.shape[:-1], -1)[..., :k].movedim(-1, in_axis)


@dataclass(frozen=True)
class Scheme:
    """Which quantizers a linear gets: activation bits (8 or None) and weight bits (8 or 4)."""

    name: str
    activations: bool
    weight_bits: int
    block: int = 128

    def activation(self, x: torch.Tensor, static: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
        return activation_u8(x, static) if self.activations else x

    def weight(self, w: torch.Tensor) -> torch.Tensor:
        return weight_i8(w) if self.weight_bits == 8 else weight_i4_blocks(w, self.block)



def scheme(name: str, block: int = 128) -> Scheme:
    if name == "w8a8":
        return Scheme(name, True, 8)
    if name == "w4a8":
        return Scheme(name, True, 4, block)
    if name == "w4a16":
        return Scheme(name, False, 4, block)
    raise InputError(f"unknown --bits '{name}': choose from {', '.join(SCHEMES)}")
