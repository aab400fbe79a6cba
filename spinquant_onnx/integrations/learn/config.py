"""What a ``learn`` run is asked to do, checked, without torch (the CLI reads its defaults from here).

The defaults are the configuration measured on SmolLM2-135M (README, "Learned rotations"): Adam at 2e-4 on
the KL divergence from the float model, 3 windows of 256 tokens a step, 40 steps; SpinQuant's Cayley SGD
(``--optimizer sgd --lr 1.5 --loss ce``) is there too, and did worse on that model's held-out windows.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from spinquant_onnx.errors import InputError

OPTIMIZERS = ("sgd", "adam")
LOSSES = ("ce", "kl")
SCHEMES = ("w8a8", "w4a8", "w4a16")


@dataclass
class LearnConfig:
    """Everything that decides the result (a checkpoint resumes only under the same config, ``steps`` aside)."""

    steps: int = 40
    bits: str = "w8a8"
    block: int = 128
    rotations: tuple[str, ...] = ("r1", "r2")
    r4: bool = True
    float_channels: int = 0  # as `rotate --calibration T.npy --float-channels K` deploys them (same token file)
    seed: int = 0
    lr: float = 2e-4
    optimizer: str = "adam"
    momentum: float = 0.9
    loss: str = "kl"
    batch: int = 3
    window_len: int = 256
    offset: int = 4096
    save_every: int = 10
    eval_every: int = 10
    eval_windows: int = 2
    calibration_windows: int = 2
    keep: str = "best"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.rotations) - {"r1", "r2"})
        if unknown or not self.rotations:
            raise InputError(f"--rotations takes r1 and/or r2, got {','.join(self.rotations) or 'nothing'}")
        if self.steps < 0 or self.batch < 1 or self.window_len < 2 or self.offset < 0 or self.save_every < 1:
            raise InputError("--steps >= 0, --batch >= 1, --window-len >= 2, --offset >= 0 and --save-every >= 1")
        if self.eval_every < 1 or self.eval_windows < 1 or self.calibration_windows < 1:
            raise InputError("--eval-every, --eval-windows and --calibration-windows must be >= 1")
        if self.float_channels < 0:
            raise InputError("--float-channels must be >= 0")
        for value, allowed, option in (
            (self.optimizer, OPTIMIZERS, "--optimizer"),
            (self.loss, LOSSES, "--loss"),
            (self.bits, SCHEMES, "--bits"),
            (self.keep, ("best", "last"), "--keep"),
        ):
            if value not in allowed:
                raise InputError(f"unknown {option} '{value}': choose from {', '.join(allowed)}")
        if not self.lr > 0 or not 0 <= self.momentum < 1:
            raise InputError("--lr must be > 0 and --momentum in [0, 1)")
        if self.block < 1:
            raise InputError("--block must be >= 1")

    def held_out(self) -> int:
        return self.eval_windows + self.calibration_windows


def default(name: str) -> Any:
    """A field's default, for the CLI's ``default=`` and help text (one place states them)."""
    return next(f.default for f in fields(LearnConfig) if f.name == name)
