"""What a run did, in the form the JSON report (``--report``) and the command line print."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from spinquant_onnx.rewrite.plan import TensorPlan


@dataclass
class Report:
    """What a run did, in a form that serializes to the JSON report."""

    input: str | None
    output: str | None
    hidden: int
    rotation: dict[str, Any]
    norms_fused: int
    weights_rotated: int
    tensors_rewritten: list[dict[str, str]]
    blocks: int
    validation: dict[str, Any] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    online_rotations: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "tool": "spinquant-onnx",
            "input": self.input,
            "output": self.output,
            "hidden_size": self.hidden,
            "rotation": self.rotation,
            "blocks": self.blocks,
            "norms_fused": self.norms_fused,
            "weight_uses_rotated": self.weights_rotated,
            "tensors_rewritten": self.tensors_rewritten,
            "online_rotations": self.online_rotations,
            "validation": self.validation,
            "timings_s": self.timings,
        }


def rewritten_tensors(plan: TensorPlan) -> list[dict[str, str]]:
    """One entry per planned tensor: its name, source, role and operations, in plan order."""
    return [
        {
            "tensor": t.name,
            "source": t.source,
            "role": t.role,
            "ops": " then ".join(
                f"{op.kind}(axis {op.axis})" if op.kind != "fill" else f"fill({op.value:g})" for op in t.ops
            ),
        }
        for t in plan.targets.values()
    ]
