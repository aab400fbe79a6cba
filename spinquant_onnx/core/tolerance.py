"""Dtype-aware validation thresholds (#13): judge a rotation against the model's own rounding noise.

A float16/bfloat16 model differs from the same function in float32 by its rounding alone, and a rotated
fp16 model rounds differently from the original (other weights, other sums), so a fixed 1e-4 fails every
correct fp16 rotation while saying nothing about a wrong one. The noise is measured, not assumed: the
original runs once as exported and once upcast to float32 (every float16/bfloat16 weight, constant, Cast
target and graph I/O made float32) on the same inputs; the relative L2 between the two is the model's
rounding noise, and the rotated model must sit within ``NOISE_MULTIPLE`` times that (never below the fixed
threshold). A wrong rotation (a head mixed, a norm mis-fused) is orders of magnitude above it. Likewise an
argmax may differ only where the original's top two logits are within ``NOISE_MULTIPLE`` times its largest
absolute logit rounding error: a tie that rounding alone decides.
float32 models keep the fixed threshold.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

NOISE_MULTIPLE = 4.0
"""How far above its own rounding noise a correct rotation may sit (rotating re-rounds every weight once
and every activation sum differently: measured 1.7-1.9x the noise on the fp16 Gemma3 fixture)."""
LOW_PRECISION = (TensorProto.FLOAT16, TensorProto.BFLOAT16)
_FLOATS = (TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.BFLOAT16, TensorProto.DOUBLE)


def weight_float_type(model: onnx.ModelProto) -> int:
    """The float element type holding most weight elements (FLOAT when the model has no float weights)."""
    counts: Counter[int] = Counter()
    for tensor in model.graph.initializer:
        if tensor.data_type in _FLOATS:
            counts[tensor.data_type] += int(np.prod(tensor.dims)) if tensor.dims else 1
    return counts.most_common(1)[0][0] if counts else TensorProto.FLOAT


def is_low_precision(model: onnx.ModelProto) -> bool:
    return weight_float_type(model) in LOW_PRECISION


def _upcast_tensor(tensor: TensorProto) -> None:
    if tensor.data_type in LOW_PRECISION:
        values = numpy_helper.to_array(tensor).astype(np.float32)
        tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))


def upcast_to_float32(model: onnx.ModelProto) -> onnx.ModelProto:
    """A float32 copy of a float16/bfloat16 model (weights loaded): the same function without its rounding."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for tensor in copy.graph.initializer:
        _upcast_tensor(tensor)
    for node in copy.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                _upcast_tensor(attr.t)
            elif node.op_type == "Cast" and attr.name == "to" and attr.i in LOW_PRECISION:
                attr.i = TensorProto.FLOAT
    for info in [*copy.graph.input, *copy.graph.output, *copy.graph.value_info]:
        if info.type.tensor_type.elem_type in LOW_PRECISION:
            info.type.tensor_type.elem_type = TensorProto.FLOAT
    return copy


def upcast_feeds(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float32) if v.dtype == np.float16 else v for k, v in feeds.items()}


def noise_threshold(base: float, noise: float) -> float:
    """The threshold a rotation of a model with this rounding noise must meet."""
    return max(base, NOISE_MULTIPLE * noise)


def flips_within(expected: np.ndarray, actual: np.ndarray, margin: float) -> bool:
    """Whether every position whose argmax changed was a tie in ``expected``: its top two logits within
    ``margin`` (a multiple of the model's own absolute rounding noise on the logits)."""
    if expected.shape != actual.shape:
        return False
    flipped = np.argmax(expected, axis=-1) != np.argmax(actual, axis=-1)
    if not flipped.any():
        return True
    top2 = np.sort(expected.astype(np.float64), axis=-1)[..., -2:]
    gaps = (top2[..., 1] - top2[..., 0])[flipped]
    return bool(np.all(gaps <= margin))
