"""R4: an online Hadamard on down_proj's input, its inverse absorbed into down_proj's weight.

The inserted node computes ``x' = x H`` (orthonormal H of order intermediate); down_proj then needs
``W' = H^T W`` so that ``x' W' = x W``. That is ``Rotation.apply`` on W's input axis, the same operation R1
does on a reader. The node goes in front of the quantizer an AIMET sim puts on the activation (if any),
so the quantizer sees the rotated activation it is meant to.
"""

from __future__ import annotations

from typing import Any

from spinquant_onnx.errors import UnsupportedGraphError, UnsupportedSizeError
from spinquant_onnx.graph.index import GraphIndex
from spinquant_onnx.graph.shapes import tensor_elem_type
from spinquant_onnx.match.linears import Linear
from spinquant_onnx.match.roles import Roles
from spinquant_onnx.rewrite.base import PassContext, register
from spinquant_onnx.rewrite.fast_hadamard_nodes import insert_online_hadamard
from spinquant_onnx.rewrite.plan import TensorPlan, rotate
from spinquant_onnx.rotation.hadamard import decompose, largest_supported_divisor
from spinquant_onnx.rotation.kinds import make_rotation


def prepare_r4(roles: Roles) -> list[tuple[int, Linear]]:
    """Every (block, down_proj) to rotate, checked before the graph is touched."""
    downs = [
        (block.number, part.writer.linear)
        for block in roles.blocks
        for part in block.parts
        if part.kind == "mlp" and part.writer is not None
    ]
    if not downs:
        raise UnsupportedGraphError(
            "R4: no MLP down projection found (a parallel attention+MLP block, as in Phi-2 or Cohere, is not "
            "split into its sub-blocks yet); drop --r4"
        )
    for block in roles.blocks:
        for part in block.parts:
            if part.kind == "mlp" and part.experts:
                raise UnsupportedGraphError(
                    f"R4: block {block.number}'s MLP is a mixture of {part.experts} experts, whose down "
                    "projections take tokens gathered per expert; an online Hadamard there is not supported: "
                    "drop --r4 (R1, R2 and R3 stay exact)"
                )
    for number, down in downs:
        if decompose(down.in_features) is None:
            d = largest_supported_divisor(down.in_features)
            raise UnsupportedSizeError(
                f"R4: no Hadamard matrix of order {down.in_features} (the input of down_proj {down.label}, "
                f"block {number}); the largest order dividing it that has one is {d}; drop --r4"
            )
    return downs


def insert_r4(index: GraphIndex, downs: list[tuple[int, Linear]], plan: TensorPlan) -> list[dict[str, Any]]:
    """Insert the online Hadamard before each down_proj and plan ``W' = H^T W``; returns report entries."""
    report = []
    for number, down in downs:
        hadamard = make_rotation("hadamard", down.in_features)
        plan.add(down.weight, down.weight_use, [rotate(down.in_axis, hadamard, "R4")], "R4 down")
        edge = index.source_edge(down.node, 0)
        inserted = insert_online_hadamard(
            index,
            edge.node.input[edge.index],
            down.in_features,
            elem_type=tensor_elem_type(index, edge.node.input[edge.index]),  # #13: the tensor it reads
            reason=f"R4 down_proj input, block {number}",
            readers=[(edge.node, edge.index)],
        )
        report.append({"block": number, "down": down.label, "order": down.in_features, **inserted.describe()})
    return report


@register
class R4:
    """An online Hadamard before each down_proj, its inverse planned into the weight (nodes and plan)."""

    name, order = "r4", 60

    def wanted(self, ctx: PassContext) -> bool:
        return bool(ctx.options.r4)

    def check(self, ctx: PassContext) -> list[tuple[int, Linear]]:
        return prepare_r4(ctx.analysis.roles)

    def apply(self, ctx: PassContext, checked: list[tuple[int, Linear]]) -> None:
        ctx.done["r4"] = insert_r4(ctx.analysis.index, checked, ctx.plan)
        ctx.online += ctx.done["r4"]
