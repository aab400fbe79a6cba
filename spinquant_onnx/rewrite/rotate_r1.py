"""R1: rotate the residual stream by an orthonormal R, absorbed into the weights around it.

Writers (embedding table, o_proj, down_proj, their biases, a Skip norm's bias) produce ``x R``;
readers (q/k/v, gate/up, lm_head; gammas already fused) take ``W' = R^T W`` so that ``(x R) W' = x W``.
Both are the same operation on the weight, ``x -> x @ R`` along one axis: the output axis of a writer,
the input axis of a reader.
"""

from __future__ import annotations

import numpy as np

from spinquant_onnx.errors import UnsupportedGraphError
from spinquant_onnx.graph.index import GraphIndex
from spinquant_onnx.graph.shapes import tensor_elem_type
from spinquant_onnx.match.residual import Stream
from spinquant_onnx.rewrite.base import PassContext, register
from spinquant_onnx.rewrite.online import OnlineRotation, insert_online_rotation
from spinquant_onnx.rewrite.plan import TensorPlan, center, rotate
from spinquant_onnx.rotation.kinds import Rotation, make_rotation


def insert_online_writes(index: GraphIndex, stream: Stream, rotation: Rotation) -> list[OnlineRotation]:
    """Rotate online the writes no weight can absorb: a sandwich norm's output, just before its Add.

    ``norm(o) * g`` does not commute with R, so neither o_proj nor the norm can carry it; one MatMul by R
    on that tensor, read only by the residual Add, is the smallest exact fix.
    """
    inserted = []
    for event in stream.writers:
        if event.online is None:
            continue
        source = index.see_through_back(event.online)
        slot = next(i for i, name in enumerate(event.add.input) if index.see_through_back(name) == source)
        tensor = event.add.input[slot]
        inserted.append(
            insert_online_rotation(
                index,
                tensor,
                rotation,
                transpose=False,
                elem_type=tensor_elem_type(index, tensor),
                reason=f"R1 after norm {event.online_norm.label} (sandwich norm before a residual Add)",
                readers=[(event.add, slot)],
            )
        )
    return inserted


class CenteredRotation:
    """``(I - 11^T/n) R``: what a LayerNorm stream's entry needs (centre, as every writer is, then rotate)."""

    def __init__(self, rotation: Rotation) -> None:
        self.rotation = rotation

    def matrix(self) -> np.ndarray:
        dense = np.asarray(self.rotation.matrix(), dtype=np.float64)
        return dense - dense.mean(axis=0, keepdims=True)


def insert_online_entries(index: GraphIndex, stream: Stream, rotation: Rotation) -> list[OnlineRotation]:
    """R1 on each graph input that feeds the stream (``inputs_embeds``): nothing upstream can absorb it here."""
    return [
        insert_online_rotation(
            index,
            entry,
            CenteredRotation(rotation) if stream.centered else rotation,
            transpose=False,
            elem_type=tensor_elem_type(index, entry),
            reason="R1 on a residual-stream graph input (no embedding table in this graph)",
        )
        for entry in stream.entries
    ]


def insert_online_exits(index: GraphIndex, stream: Stream, rotation: Rotation) -> list[OnlineRotation]:
    """R1^T before each stream graph output (a layer slice), so the part alone computes what it did."""
    inserted = []
    for name in stream.exits:
        producer = index.producer[name]
        inner = f"{name}.spinquant.rotated"
        producer.output[list(producer.output).index(name)] = inner
        for use in index.users(name):
            use.node.input[use.index] = inner
        index.producer[inner] = producer
        index.consumers[inner] = index.consumers.pop(name, [])
        del index.producer[name]
        online = insert_online_rotation(
            index, inner, rotation, transpose=True, elem_type=tensor_elem_type(index, name),
            reason="R1^T on a residual-stream graph output (the next part expects the original basis)",
            readers=[],
        )
        online.node.output[0] = name
        index.graph.node[list(index.graph.node).index(producer) + 1].output[0] = name
        inserted.append(online)
    return inserted


def check_stream_ends(stream: Stream, options) -> None:
    """A LayerNorm stream cannot leave the graph unrotated: its centring changed it (by a per-token constant)."""
    if stream.exits and stream.centered and options.exits == "online":
        raise UnsupportedGraphError(
            f"residual stream tensor '{stream.exits[0]}' is a graph output of a LayerNorm model: centring the "
            "stream changes it; rotate all parts of the model together with `spinquant-onnx rotate-parts`"
        )


def plan_r1(stream: Stream, rotation: Rotation, plan: TensorPlan) -> int:
    """Add R1's operations to ``plan``; returns how many weight uses were rotated."""
    count = 0

    def write(axis: int) -> list:  # a LayerNorm stream's writers are centred first (rewrite/layernorm.py)
        return [center(axis, "LayerNorm centring")] * stream.centered + [rotate(axis, rotation, "R1")]

    tables = [stream.embedding] if stream.embedding is not None else []
    tables += [event.table for event in stream.writers if event.table is not None]
    for emb in tables:
        plan.add(emb.table, emb.table_use, write(emb.hidden_axis), "embedding")
        count += 1
    for event in stream.writers:
        if event.online is not None or event.table is not None:
            continue
        writer = event.writer
        plan.add(writer.weight, writer.weight_use, write(writer.out_axis), "writer")
        if writer.bias is not None:
            plan.add(writer.bias, writer.bias_use, write(writer.bias_axis), "writer bias")
        count += 1
    for event in stream.reading:
        norm = event.norm
        if norm is not None and norm.bias is not None:
            plan.add(norm.bias, norm.bias_use, [rotate(0, rotation, "R1")], "skip-norm bias")
        for linear in event.readers:
            plan.add(linear.weight, linear.weight_use, [rotate(linear.in_axis, rotation, "R1")], "reader")
            count += 1
    return count


def choose_r1(ctx: PassContext) -> Rotation:
    """The learned R1 when the rotation file has one, else the kind the options ask for."""
    hidden = ctx.analysis.stream.hidden
    if ctx.learned is not None and ctx.learned.r1 is not None:
        return ctx.learned.r1_for(hidden)
    options = ctx.options
    return make_rotation(options.rotation, hidden, options.seed, options.block_size)


@register
class R1:
    """R1 absorbed into the weights around the residual stream (planned)."""

    name, order = "r1", 20

    def wanted(self, ctx: PassContext) -> bool:
        return True

    def check(self, ctx: PassContext) -> None:
        check_stream_ends(ctx.analysis.stream, ctx.options)
        ctx.rotation = choose_r1(ctx)

    def apply(self, ctx: PassContext, checked: None) -> None:
        ctx.counts["weights_rotated"] = plan_r1(ctx.analysis.stream, ctx.rotation, ctx.plan)


@register
class R1Online:
    """R1 where no weight can absorb it: sandwich-norm writes, and stream entries that are graph inputs.

    Entries are left to the caller when ``options.entries == "external"`` (the VLM rotates what feeds them).
    """

    name, order = "r1_online", 30

    def wanted(self, ctx: PassContext) -> bool:
        return True

    def check(self, ctx: PassContext) -> None:
        return None

    def apply(self, ctx: PassContext, checked: None) -> None:
        index, stream = ctx.analysis.index, ctx.analysis.stream
        online = insert_online_writes(index, stream, ctx.rotation)
        if ctx.options.entries == "online":
            online += insert_online_entries(index, stream, ctx.rotation)
        if getattr(ctx.options, "exits", "online") == "online":
            online += insert_online_exits(index, stream, ctx.rotation)
        ctx.online += [o.describe() for o in online]
