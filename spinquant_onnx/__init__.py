"""spinquant-onnx: SpinQuant rotations applied to exported ONNX decoders."""

from spinquant_onnx.errors import SpinQuantError

__all__ = ["SpinQuantError"]
__version__ = "0.1.0"
