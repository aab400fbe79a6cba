"""One shape for every pass, and the registry that orders them.

A pass is a class with a ``name``, an ``order`` and three methods, registered with ``@register``:

* ``wanted(ctx)``: whether the options ask for it;
* ``check(ctx)``: every check the pass needs, raising ``SpinQuantError``; it changes neither the graph nor
  the plan, and returns what ``apply`` needs (the sites it found, the rotations it chose);
* ``apply(ctx, checked)``: plan tensor operations into ``ctx.plan`` and/or insert nodes, and record what
  was done in ``ctx.done`` / ``ctx.online`` for the report.

``run_passes`` calls ``check`` on every wanted pass first, in order, and only then ``apply`` on each: a
refusal from any pass comes before the first node goes in. The registry finds passes by importing every
module of this package, so adding a pass is adding one file (see README, "How to add a pass").
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

from spinquant_onnx.match.analysis import Analysis
from spinquant_onnx.rewrite.plan import TensorPlan
from spinquant_onnx.rotation.kinds import Rotation
from spinquant_onnx.rotation.learned_file import LearnedRotations


class PassOptions(Protocol):
    """The options a pass may read (``core.options.Options`` has them all)."""

    rotation: str
    seed: int
    block_size: int | None
    entries: str
    exits: str
    r2: bool
    r3: bool
    r4: bool


@dataclass
class PassContext:
    """What the passes share: the analysis, the plan they fill, and what they did (for the report)."""

    analysis: Analysis
    plan: TensorPlan
    options: PassOptions
    learned: LearnedRotations | None = None
    rotation: Rotation | None = None  # R1, chosen by the R1 pass's check; every R1 user takes this object
    counts: dict[str, int] = field(default_factory=dict)  # norms_fused, weights_rotated
    online: list[dict[str, str]] = field(default_factory=list)  # online nodes, in insertion order
    done: dict[str, Any] = field(default_factory=dict)  # per-pass report entries (r2, r3, r4)
    row_scales: dict[str, Any] = field(default_factory=dict)  # weight -> input-row scales --smooth planned

    @property
    def uses_r2(self) -> bool:
        return bool(self.options.r2 or (self.learned is not None and self.learned.has_r2))


class Pass(Protocol):
    name: ClassVar[str]
    order: ClassVar[int]

    def wanted(self, ctx: PassContext) -> bool: ...

    def check(self, ctx: PassContext) -> Any: ...

    def apply(self, ctx: PassContext, checked: Any) -> None: ...


_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: add a pass to the registry (its ``order`` places it among the others)."""
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"two passes named {cls.name!r}")
    _REGISTRY[cls.name] = cls
    return cls


def registered() -> list[Pass]:
    """Every pass of this package, by ``order`` (norm fusion, smoothing, R1, R1 online, R2, R3, float channels, R4)."""
    package = importlib.import_module(__package__)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{__package__}.{module.name}")
    return [cls() for cls in sorted(_REGISTRY.values(), key=lambda c: c.order)]


def run_passes(ctx: PassContext, passes: list[Pass] | None = None) -> None:
    """Check every wanted pass, then apply them in order."""
    chosen = [p for p in (registered() if passes is None else passes) if p.wanted(ctx)]
    checked = [(p, p.check(ctx)) for p in chosen]
    for pass_, result in checked:
        pass_.apply(ctx, result)
