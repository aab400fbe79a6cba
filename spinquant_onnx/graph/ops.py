"""Op-type tables: every set of ONNX op types a matcher or rewrite treats alike, named once, here.

A new exporter's variant of an op is usually one entry in one of these tables.
"""

from __future__ import annotations

# Ops that pass a tensor through unchanged in value (for our purposes): a matcher looks through them.
# QcQuantizeOp is AIMET's quantizer node; with quantizers disabled or not yet calibrated it is an identity.
TRANSPARENT_OPS = frozenset({"Identity", "Cast", "QcQuantizeOp"})
# What the declarative pattern matcher (match/pattern.py) steps through between two pattern nodes.
PASS_THROUGH = frozenset({"QcQuantizeOp", "Identity"})
# Ops folded when every input is a constant (dynamo's optimize=False graphs compute axes and exponents
# with them): ``GraphIndex.constant`` sees through them.
FOLDABLE_OPS = frozenset({"Reshape", "Cast", "CastLike", "Identity", "Squeeze", "Unsqueeze"})
# Ops whose output does not depend on the values of their input.
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})

# Linear layers: x @ W (+ b).
LINEAR_OPS = frozenset({"MatMul", "Gemm"})
# Elementwise ops that commute with a rotation of the last axis when the other operand is a scalar.
SCALAR_OPS = frozenset({"Mul", "Div"})
# Ops that mean the model is already quantized: rotate the float export instead.
QUANTIZED_OPS = frozenset(
    {
        "MatMulNBits",
        "GatherBlockQuantized",
        "DequantizeLinear",
        "QuantizeLinear",
        "MatMulInteger",
        "QLinearMatMul",
        "DynamicQuantizeLinear",
    }
)

# Fused attention ops, with the input slots of their query, key and value.
ATTENTION_OPS = {"Attention": (0, 1, 2), "GroupQueryAttention": (0, 1, 2), "MultiHeadAttention": (0, 1, 2)}
FUSED_ATTENTION = frozenset(ATTENTION_OPS)
# MLP activations (their input is gate_proj's output, or up_proj's in the ungated form).
ACTIVATION_OPS = frozenset(
    {"Sigmoid", "Gelu", "FastGelu", "QuickGelu", "Tanh", "Erf", "Relu", "Softplus", "BiasGelu"}
)

# Ops that move whole head vectors around without looking inside one (R2's value path).
LAYOUT_OPS = frozenset({"Reshape", "Transpose", "Unsqueeze", "Squeeze", "Expand", "Tile", "Concat", "Slice"})
# Layout ops between a key's rotary output and the scores MatMul (R3's key path).
KEY_LAYOUT_OPS = frozenset({"Transpose", "Reshape", "Expand", "Unsqueeze", "Squeeze", "Tile", "Concat"})
# Ops between the scores MatMul and the probabilities that do not mix the head axis (Tanh: Gemma2's soft-capping).
# Concat and Sub: gpt-oss appends its attention sinks to the scores and subtracts their row max.
SCORE_OPS = frozenset({"Mul", "Div", "Add", "Sub", "Where", "Cast", "Softmax", "Concat", "Tanh"})
# Ops between a VLM merger projection and a visual output that move whole rows of the hidden axis around
# (window un-permutation, stacking, reshapes) and so commute with ``x -> x @ R`` on that axis.
ROW_OPS = frozenset({"Gather", "Concat", "Reshape", "Unsqueeze", "Squeeze", "Transpose"})

# Head-geometry look-ups (match/heads.py): ops a scalar shape value is computed with,
SCALAR_SHAPE_OPS = ("Gather", "Squeeze", "ReduceProd", "Mul", "Add", "Div", "Sub")
# ops whose output has their first input's rank,
RANK_KEEPING_OPS = ("Concat", "Add", "Mul", "Sub", "Div", "Neg", "Cast", "Identity", "QcQuantizeOp", "Slice")
# and ops a shape tensor's last element is carried through.
SHAPE_CARRY_OPS = ("Concat", "Cast", "Unsqueeze")

# Ops whose (first) output has the element type of their first input.
KEEPS_TYPE_OPS = frozenset(
    {"Identity", "QcQuantizeOp", "Add", "Sub", "Mul", "Div", "Neg", "MatMul", "Gemm", "Transpose", "Reshape",
     "Expand", "Unsqueeze", "Squeeze", "Concat", "Slice", "Split", "Tile", "Softmax", "Sigmoid", "Tanh", "Relu",
     "Sqrt", "Reciprocal", "Pow", "Where", "SimplifiedLayerNormalization", "RMSNormalization",
     "SkipSimplifiedLayerNormalization", "LayerNormalization", "Gather", "Erf", "Exp", "Abs", "Max", "Min",
     # onnxruntime contrib ops (no ONNX type inference for them), activations typed as their first input
     "QuickGelu", "FastGelu", "Gelu", "BiasGelu", "SkipLayerNormalization", "RotaryEmbedding",
     "GroupQueryAttention", "MultiHeadAttention", "Attention", "MatMulNBits"}
)  # fmt: skip
