"""What a run is asked to do: one ``Options`` for every entry point, checked when it is made."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from spinquant_onnx.errors import SpinQuantError
from spinquant_onnx.rotation.kinds import KINDS

PRECISIONS = {"float64": np.float64, "float32": np.float32}


@dataclass
class Options:
    """What to do. Defaults are what a user who asked for nothing in particular should get."""

    rotation: str = "hadamard"
    seed: int = 0
    block_size: int | None = None
    validate: bool = False
    providers: list[str] | None = None
    threshold: float = 1e-4
    in_place: bool = False
    roles: Any = None
    trust_roles: bool = False
    precision: str = "float64"
    # Stream entries that are graph inputs (inputs_embeds): rotate them "online" (a MatMul node), or leave
    # them to the caller, who rotates what feeds them ("external": the VLM path rotates the table itself).
    entries: str = "online"
    # Stream tensors that are graph outputs (a layer slice): rotate them back "online" (R^T before the
    # output, so the part alone computes what it did), or leave them "rotated" for the next part (rotate-parts).
    exits: str = "online"
    r2: bool = False
    r3: bool = False
    r4: bool = False
    rotation_file: str | os.PathLike | None = None
    force: bool = False  # rotate a model this tool already rotated (#13: refused by default)
    smooth: Any = None  # rewrite.smooth.Smoothing: channel smoothing of o/down inputs before R2/R4
    float_channels: int = 0  # down_proj input channels (the K largest) computed on a float side path
    activation_maxima: dict | None = None  # per-channel max |x| of o/down inputs (integrations.activation_stats)

    def __post_init__(self) -> None:
        if self.rotation not in KINDS:
            raise SpinQuantError(f"unknown rotation '{self.rotation}': choose one of {', '.join(KINDS)}")
        if self.block_size is not None and (isinstance(self.block_size, bool) or self.block_size < 1):
            raise SpinQuantError(f"block size must be a positive integer, got {self.block_size}")
        if self.precision not in PRECISIONS:
            raise SpinQuantError(f"unknown precision '{self.precision}': choose float64 or float32")
