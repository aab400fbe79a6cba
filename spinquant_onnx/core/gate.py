"""Structural gate on a rotated model, run after planning and before anything is written (#13).

The placeholder accepts every model; the real gate (another branch) raises ``SpinQuantError`` here. Every
entry point calls it through the pipeline, once per output model.
"""

from __future__ import annotations

import onnx


def check_output(model: onnx.ModelProto) -> None:
    """Refuse a rotated graph that breaks a structural invariant (placeholder: accepts all)."""
    return None
