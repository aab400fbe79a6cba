"""R3: an online Hadamard of order head_dim on Q and K after the rotary embedding.

Scores are ``Q K^T = (Q H)(K H)^T`` for orthonormal H, so rotating both sides leaves attention unchanged
while making Q and K (and the cached keys) easier to quantize. The rotary embedding mixes pairs of
head_dim entries, so H must come after it; Qwen3's q_norm/k_norm come before it and are untouched.

Q is rotated on the score MatMul's own input edge. K is rotated where the freshly computed keys leave the
last op that is not pure layout (normally the rotary Add), i.e. before they are concatenated with the past
keys and written to ``present.N.key``: the cache then holds rotated keys, and a rotated past fed back at
the next step stays consistent. Every reader of the rotated keys is checked to lead only to the score
MatMul or to graph outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import onnx

from spinquant_onnx.errors import UnsupportedGraphError, UnsupportedSizeError
from spinquant_onnx.graph.index import GraphIndex, Use, node_label
from spinquant_onnx.graph.ops import KEY_LAYOUT_OPS, SCALAR_OPS, SCORE_OPS, SHAPE_ONLY_OPS, TRANSPARENT_OPS
from spinquant_onnx.graph.shapes import inferred_shape, tensor_elem_type
from spinquant_onnx.match.heads import AttentionSite, op_axes, reshape_last_dim
from spinquant_onnx.rewrite.base import PassContext, register
from spinquant_onnx.rewrite.fast_hadamard_nodes import insert_online_hadamard
from spinquant_onnx.rotation.hadamard import decompose

# Ops that only move key entries around (the repeat_kv and transpose between the cache and the score MatMul).
SEARCH_LIMIT = 80


def _is_score(index: GraphIndex, node: onnx.NodeProto) -> bool:
    """A MatMul of two activations whose result reaches a Softmax through elementwise score ops."""
    if node.op_type != "MatMul" or any(index.is_initializer(index.see_through_back(i)) for i in node.input):
        return False
    frontier = [node.output[0]]
    for _ in range(6):
        nxt = []
        for name in frontier:
            for use in index.value_users(name):
                if use.node.op_type == "Softmax":
                    return True
                if use.node.op_type in SCORE_OPS:
                    nxt.extend(use.node.output)
        frontier = nxt
    return False


def score_matmul(index: GraphIndex, tensor: str, where: str) -> tuple[onnx.NodeProto, int]:
    """The attention score MatMul ``tensor`` flows into, and the input slot it arrives at."""
    frontier, seen, found = [tensor], set(), []
    while frontier and len(seen) < SEARCH_LIMIT:
        name = frontier.pop(0)
        for use in index.value_users(name):
            if id(use.node) in seen:
                continue
            seen.add(id(use.node))
            if _is_score(index, use.node):
                found.append((use.node, use.index))
            elif use.node.op_type not in ("MatMul", "Gemm", "Softmax"):
                frontier.extend(use.node.output)
    nodes = {id(n) for n, _ in found}
    if len(nodes) != 1:
        raise UnsupportedGraphError(f"{where}: expected one attention score MatMul, found {len(nodes)}")
    return found[0]


def _scalar_operand(index: GraphIndex, node: onnx.NodeProto, slot: int) -> bool:
    other = node.input[1 - slot]
    value = index.constant(other)
    return value is not None and value.size == 1


def _input_rank(index: GraphIndex, node: onnx.NodeProto, rank: int | None) -> int | None:
    """Rank of a layout op's data input, given its output's rank (None when unknown)."""
    shape = index.static_shape(node.input[0])
    if shape is not None:
        return len(shape)
    if node.op_type in ("Unsqueeze", "Squeeze") and rank is not None:
        axes = op_axes(index, node)
        if axes is not None:
            return rank - len(axes) if node.op_type == "Unsqueeze" else rank + len(axes)
    return rank if node.op_type in ("Transpose", "Tile") else None


def _tracked_axis(index: GraphIndex, node: onnx.NodeProto, axis: int, head_dim: int) -> int | None:
    """Where the tracked output axis (counted from the end) sits in a layout op's input, None if it moves."""
    if node.op_type == "Transpose":
        perm = index.attr(node, "perm")
        return None if perm is None else list(perm)[len(perm) + axis] - len(perm)
    if axis != -1:
        return None
    if node.op_type == "Reshape":
        last = reshape_last_dim(index, node)
        return -1 if last == "same" or (isinstance(last, int) and last == head_dim) else None
    if node.op_type in ("Unsqueeze", "Squeeze"):
        axes = op_axes(index, node)
        return -1 if axes is not None and -1 not in axes else None
    return -1 if node.op_type in ("Expand", "Tile") else None


def _concat_axis(index: GraphIndex, node: onnx.NodeProto, rank: int | None) -> int | None:
    axis = index.attr(node, "axis", 0)
    if axis < 0:
        return axis
    ranks = [len(s) for s in (index.static_shape(i) for i in node.input) if s is not None]
    rank = ranks[0] if ranks else rank
    return None if rank is None else axis - rank


def key_insertion_point(index: GraphIndex, score: onnx.NodeProto, head_dim: int, where: str) -> tuple[str, list[str]]:
    """The tensor holding the new keys with head_dim last, and the cache inputs met on the way."""
    name, axis, rank, caches = score.input[1], -2, None, []
    for _ in range(SEARCH_LIMIT):
        node = index.producer.get(name)
        if node is None:
            raise UnsupportedGraphError(f"{where}: the keys of {node_label(score)} come from graph input '{name}'")
        op = node.op_type
        if op in TRANSPARENT_OPS or (op in ("Mul", "Div") and _scalar_operand(index, node, 0)):
            name = node.input[0]
            continue
        if op == "Mul" and _scalar_operand(index, node, 1):
            name = node.input[1]
            continue
        if op == "Concat":
            fresh = _new_keys_of_concat(index, node, axis, rank, caches, where)
            if fresh is None:
                break  # e.g. Phi3's partial rotary puts the rotated and pass-through parts back together
            name = fresh
            continue
        if op in KEY_LAYOUT_OPS:
            moved = _tracked_axis(index, node, axis, head_dim)
            if moved is None:
                raise UnsupportedGraphError(
                    f"{where}: {node_label(node)} reshapes the keys across head_dim; cannot place R3"
                )
            if op == "Reshape" and not _last_dim_is(index, node.input[0], head_dim):
                # #13: the head-split Reshape ([.., heads * head_dim] -> [.., heads, head_dim]), or one whose
                # input's last dim is not proven to be head_dim: the keys are per head only from its output
                # on, so R3 goes there (a head_dim Hadamard before it would mix heads or not even fit).
                name = node.output[0]
                break
            axis, rank = moved, _input_rank(index, node, rank)
            name = node.input[0]
            continue
        break
    if axis != -1:
        raise UnsupportedGraphError(f"{where}: the keys reach {node_label(score)} with head_dim not last")
    return name, caches


def _new_keys_of_concat(
    index: GraphIndex, node: onnx.NodeProto, axis: int, rank: int | None, caches: list[str], where: str
) -> str | None:
    """The new keys a cache Concat appends (the cache inputs go to ``caches``); None when it joins on ``axis``."""
    concat_axis = _concat_axis(index, node, rank)
    if concat_axis is None:
        raise UnsupportedGraphError(f"{where}: cannot tell which axis {node_label(node)} joins")
    if concat_axis == axis:
        return None
    fresh = [i for i in node.input if index.see_through_back(i) not in index.graph_inputs]
    caches += [index.see_through_back(i) for i in node.input if i not in fresh]
    if len(fresh) != 1:
        raise UnsupportedGraphError(f"{where}: cannot tell the new keys in {node_label(node)}")
    return fresh[0]


def _last_dim_is(index: GraphIndex, name: str, size: int) -> bool:
    """Whether ``name``'s last dim is provably ``size`` (declared or inferred shape); unknown is False."""
    shape = inferred_shape(index, name)
    return bool(shape) and shape[-1] == size


def _check_key_readers(index: GraphIndex, tensor: str, score: onnx.NodeProto, where: str) -> list[str]:
    """Every reader of the rotated keys must lead to the score MatMul's keys or to graph outputs."""
    frontier, seen, outputs = [tensor], set(), []
    while frontier:
        name = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in index.graph_outputs:
            outputs.append(name)
        for use in index.users(name):
            node = use.node
            if node.op_type in SHAPE_ONLY_OPS or (node is score and use.index == 1):
                continue
            if node.op_type in KEY_LAYOUT_OPS or node.op_type in TRANSPARENT_OPS or node.op_type in SCALAR_OPS:
                frontier.extend(node.output)
                continue
            raise UnsupportedGraphError(
                f"{where}: the keys after the rotary embedding are also read by {node_label(node)}; cannot place R3"
            )
    return outputs


@dataclass
class R3Site:
    """Where one block's R3 goes, found and checked before anything is inserted."""

    block: int
    head_dim: int
    score: onnx.NodeProto
    query_edge: Use
    key_tensor: str
    elem_type: int  # of the queries' edge tensor
    caches: list[str]
    outputs: list[str]
    key_elem_type: int = 0  # of the key tensor (each side typed from the tensor it reads, #13)


def prepare_r3(index: GraphIndex, sites: list[AttentionSite]) -> list[R3Site]:
    """Find and check every block's insertion points; raises before the graph is touched."""
    prepared = []
    for site in sites:
        where = f"R3, attention block {site.block}"
        if site.fused_op is not None:
            raise UnsupportedGraphError(
                f"{where}: {node_label(site.fused_op)} applies attention (and possibly rotary) inside one op, "
                "so Q and K after the rotary embedding are not in the graph; drop --r3"
            )
        if site.q is None or site.k is None:
            raise UnsupportedGraphError(f"{where}: q and k projections not found")
        head_dim = site.geometry.head_dim
        if decompose(head_dim) is None:
            raise UnsupportedSizeError(f"{where}: no Hadamard matrix of order head_dim = {head_dim}; drop --r3")
        score, slot = score_matmul(index, site.q.tensor, where)
        if slot != 0:
            raise UnsupportedGraphError(f"{where}: queries reach {node_label(score)} as input {slot}, not 0")
        key_tensor, caches = key_insertion_point(index, score, head_dim, where)
        outputs = _check_key_readers(index, key_tensor, score, where)
        prepared.append(
            R3Site(
                site.block,
                head_dim,
                score,
                index.source_edge(score, 0),
                key_tensor,
                tensor_elem_type(index, score.input[0]),
                caches,
                sorted(set(outputs)),
                tensor_elem_type(index, key_tensor),
            )
        )
    return prepared


def insert_r3(index: GraphIndex, prepared: list[R3Site]) -> list[dict[str, Any]]:
    """Insert the online Hadamards found by ``prepare_r3``; returns report entries."""
    report = []
    for site in prepared:
        edge = site.query_edge
        queries = insert_online_hadamard(
            index,
            edge.node.input[edge.index],
            site.head_dim,
            elem_type=site.elem_type,
            reason=f"R3 queries, block {site.block}",
            readers=[(edge.node, edge.index)],
        )
        keys = insert_online_hadamard(
            index,
            site.key_tensor,
            site.head_dim,
            elem_type=site.key_elem_type or site.elem_type,
            reason=f"R3 keys, block {site.block}",
        )
        report.append(
            {
                "block": site.block,
                "head_dim": site.head_dim,
                "score_matmul": node_label(site.score),
                "queries": queries.describe(),
                "keys": keys.describe(),
                "cache_inputs_expected_rotated": site.caches,
                "cache_outputs_rotated": site.outputs,
            }
        )
    return report


@register
class R3:
    """Online Hadamards on Q and K after the rotary embedding (nodes)."""

    name, order = "r3", 50

    def wanted(self, ctx: PassContext) -> bool:
        return bool(ctx.options.r3)

    def check(self, ctx: PassContext) -> list[R3Site]:
        return prepare_r3(ctx.analysis.index, ctx.analysis.sites_for("--r3"))

    def apply(self, ctx: PassContext, checked: list[R3Site]) -> None:
        ctx.done["r3"] = insert_r3(ctx.analysis.index, checked)
        ctx.online += [entry[side] for entry in ctx.done["r3"] for side in ("queries", "keys")]
