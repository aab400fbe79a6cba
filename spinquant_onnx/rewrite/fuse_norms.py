"""Norm fusion: move each residual-stream RMSNorm's gamma into the linears that read it.

After fusion the norm computes ``x / rms(x)`` only, which commutes with any orthogonal rotation of x.
Gemma-style norms scale by ``(1 + w)``; when the exporter left that Add in the graph, the effective
gamma is ``w + 1`` and ``w`` becomes 0 rather than 1.
"""

from __future__ import annotations

import numpy as np

from spinquant_onnx.io.tensor_store import TensorStore
from spinquant_onnx.match.residual import Stream
from spinquant_onnx.rewrite import layernorm
from spinquant_onnx.rewrite.base import PassContext, register
from spinquant_onnx.rewrite.plan import TensorPlan, fill, scale


def effective_gamma(store: TensorStore, gamma: str, offset: float) -> np.ndarray:
    return np.asarray(store.array(gamma), dtype=np.float64) + offset


def plan_norm_fusion(stream: Stream, store: TensorStore, plan: TensorPlan) -> int:
    """Scale every reader's input axis by gamma and set gamma to the identity; returns norms fused."""
    for event in stream.norms:
        norm = event.norm
        if norm.centered or norm.gamma is None:
            continue  # LayerNorms: rewrite/layernorm.py; linears reading the raw stream: nothing to fuse
        gamma = effective_gamma(store, norm.gamma, norm.gamma_offset)
        for linear in event.readers:
            plan.add(linear.weight, linear.weight_use, [scale(linear.in_axis, gamma, "norm gamma")], "reader")
        plan.add(norm.gamma, norm.gamma_use, [fill(1.0 - norm.gamma_offset, "fused")], "norm")
    return sum(1 for event in stream.norms if event.norm.gamma is not None or event.norm.centered)


@register
class FuseNorms:
    """Norm gammas into their readers, so that R1 commutes with every residual-stream norm."""

    name, order = "fuse_norms", 10

    def wanted(self, ctx: PassContext) -> bool:
        return True

    def check(self, ctx: PassContext) -> None:
        return None

    def apply(self, ctx: PassContext, checked: None) -> None:
        stream, index = ctx.analysis.stream, ctx.analysis.index
        ctx.counts["norms_fused"] = plan_norm_fusion(stream, ctx.analysis.store, ctx.plan)
        if stream.centered:  # LayerNorms become RMSNorms; gamma and beta move into the readers
            biases = [b for event in stream.norms for b in layernorm.plan_layernorm(index, event, ctx.plan)]
            for linear, vector in biases:
                layernorm.add_reader_bias(index, linear, vector)
            for event in stream.norms:
                layernorm.replace_with_rmsnorm(index, event.norm)
            index.refresh()
            ctx.done["layernorm"] = {"norms_replaced": len(stream.norms), "biases_added": len(biases)}
