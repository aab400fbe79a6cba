"""spinquant-onnx: SpinQuant rotations applied to exported ONNX decoders, exactly or not at all."""

from spinquant_onnx.core.pipeline import convert
from spinquant_onnx.errors import SpinQuantError
from spinquant_onnx.integrations.dispatch import apply_spinquant
from spinquant_onnx.integrations.quantize import keep_float
from spinquant_onnx.match.analysis import analyze

__all__ = ["SpinQuantError", "analyze", "apply_spinquant", "convert", "keep_float"]
__version__ = "0.1.0"
