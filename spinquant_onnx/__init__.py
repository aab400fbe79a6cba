"""spinquant-onnx: SpinQuant rotations applied to exported ONNX decoders, exactly or not at all."""

from spinquant_onnx.core.pipeline import analyze, apply_spinquant, convert
from spinquant_onnx.errors import SpinQuantError

__all__ = ["SpinQuantError", "analyze", "apply_spinquant", "convert"]
__version__ = "0.1.0"
