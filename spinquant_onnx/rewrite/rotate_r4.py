"""R4: an online Hadamard on down_proj's input, its inverse absorbed into down_proj's weight.

MoE experts' down stacks ``[E, H, I]`` take the same rotation on their I axis, for every expert at once;
the Hadamard goes on the gathered tokens' activations just before they are made columns.

The inserted node computes ``x' = x H`` (orthonormal H of order intermediate); down_proj then needs
``W' = H^T W`` so that ``x' W' = x W``. That is ``Rotation.apply`` on W's input axis, the same operation R1
does on a reader. The node goes in front of the quantizer an AIMET sim puts on the activation (if any),
so the quantizer sees the rotated activation it is meant to.
"""

from __future__ import annotations

from typing import Any

import onnx

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


def prepare_r4(roles: Roles, index: GraphIndex) -> list[tuple[int, Linear]]:
    """Every (block, down_proj) to rotate, MoE experts' and shared experts' included, checked first."""
    downs = [(number, entry.linear) for number, part in roles.parts_of("mlp") for entry in part.writers]
    if not downs:
        raise UnsupportedGraphError(
            "R4: no MLP down projection found (a parallel attention+MLP block, as in Phi-2 or Cohere, is not "
            "split into its sub-blocks yet); drop --r4"
        )
    for number, down in downs:
        if decompose(down.in_features) is None:
            d = largest_supported_divisor(down.in_features)
            raise UnsupportedSizeError(
                f"R4: no Hadamard matrix of order {down.in_features} (the input of down_proj {down.label}, "
                f"block {number}); the largest order dividing it that has one is {d}; drop --r4"
            )
        if down.experts and down.activation_slot == 1 and _column_unsqueeze(index, down) is None:
            raise UnsupportedGraphError(
                f"R4: the experts' down projection {down.label} (block {number}) does not take its input as an "
                "Unsqueeze of the activations, so there is no place for the online Hadamard: drop --r4"
            )
    return downs


def _activation_edge(index: GraphIndex, down: Linear) -> tuple[onnx.NodeProto, int]:
    """Where the online Hadamard goes: down_proj's activation edge, or, for column-form experts
    (``W[idx] @ x[..., None]``), the edge into that Unsqueeze, where x still has I on its last axis."""
    column = _column_unsqueeze(index, down)
    if column is not None:
        return column, 0
    edge = index.source_edge(down.node, down.activation_slot)
    return edge.node, edge.index


def _column_unsqueeze(index: GraphIndex, down: Linear) -> onnx.NodeProto | None:
    """The Unsqueeze turning an expert's [.., I] activations into the [.., I, 1] column it multiplies."""
    if not down.experts or down.activation_slot != 1:
        return None
    node = index.producer.get(index.see_through_back(down.node.input[1]))
    if node is None or node.op_type != "Unsqueeze" or len(index.value_users(node.output[0])) != 1:
        return None
    return node


def insert_r4(index: GraphIndex, downs: list[tuple[int, Linear]], plan: TensorPlan) -> list[dict[str, Any]]:
    """Insert the online Hadamard before each down_proj and plan ``W' = H^T W``; returns report entries."""
    report = []
    for number, down in downs:
        hadamard = make_rotation("hadamard", down.in_features)
        plan.add(down.weight, down.weight_use, [rotate(down.in_axis, hadamard, "R4")], "R4 down")
        node, slot = _activation_edge(index, down)
        inserted = insert_online_hadamard(
            index,
            node.input[slot],
            down.in_features,
            elem_type=tensor_elem_type(index, node.input[slot]),  # #13: the tensor it reads
            reason=f"R4 down_proj input, block {number}",
            readers=[(node, slot)],
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
        return prepare_r4(ctx.analysis.roles, ctx.analysis.index)

    def apply(self, ctx: PassContext, checked: list[tuple[int, Linear]]) -> None:
        ctx.done["r4"] = insert_r4(ctx.analysis.index, checked, ctx.plan)
        ctx.online += ctx.done["r4"]
