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
from spinquant_onnx.graph.ops import SCORE_OPS, SHAPE_ONLY_OPS
from spinquant_onnx.graph.probe import shape_of
from spinquant_onnx.graph.shapes import tensor_elem_type
from spinquant_onnx.match.head_paths import RULES, Step, next_axis
from spinquant_onnx.match.heads import AttentionSite
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


def downstream(index: GraphIndex, tensor: str, limit: int = 400) -> set[str]:
    """Tensors computed from ``tensor`` (bounded): tells the fresh keys from the cache in a Concat."""
    found, frontier = {tensor}, [tensor]
    while frontier and len(found) < limit:
        for use in index.users(frontier.pop()):
            for out in use.node.output:
                if out and out not in found and use.node.op_type not in SHAPE_ONLY_OPS:
                    found.add(out)
                    frontier.append(out)
    return found


def _last_dim(index: GraphIndex, name: str) -> int | None:
    shape = shape_of(index, name)
    return shape[-1] if shape else None


def _step_back(
    index: GraphIndex, node: onnx.NodeProto, axis: int, fresh: set[str], head_dim: int
) -> tuple[str, int] | None:
    """(input, axis) the keys' head_dim axis came from through ``node``, or None where the keys are made.

    A step back is taken only where the forward rule (``RULES``) maps that input axis onto the tracked one
    and the input axis is exactly one head (so the walk stops at the head split, at the rotary Add, at a
    per-channel scale such as k_norm's gamma, and at a Concat along head_dim such as Phi3's partial rotary).
    """
    if node.op_type not in RULES:
        return None
    ours = [(slot, name) for slot, name in enumerate(node.input) if name in fresh]
    if len(ours) != 1:
        return None
    slot, name = ours[0]
    shape = shape_of(index, name)
    if shape is None:
        return None
    found = [
        a
        for a in range(len(shape))
        if shape[a] == head_dim and next_axis(index, Step(node, slot, a), head_dim, RULES) == axis
    ]
    return (name, found[0]) if len(found) == 1 else None


def key_insertion_point(
    index: GraphIndex, site: AttentionSite, score: onnx.NodeProto, head_dim: int, where: str
) -> str:
    """The tensor holding the new keys, per head with head_dim last: where the last non-movement op made them."""
    fresh = downstream(index, site.k.tensor)
    name = score.input[1]
    shape = shape_of(index, name)
    if name not in fresh or shape is None:
        raise UnsupportedGraphError(f"{where}: the keys of {node_label(score)} do not come from {site.k.linear.label}")
    axis = len(shape) - 2  # K^T: head_dim is contracted on the second-to-last axis
    for _ in range(SEARCH_LIMIT):
        node = index.producer.get(name)
        back = None if node is None else _step_back(index, node, axis, fresh, head_dim)
        if back is None:
            break
        name, axis = back
    shape = shape_of(index, name)
    if shape is None or axis != len(shape) - 1 or shape[-1] != head_dim:
        raise UnsupportedGraphError(
            f"{where}: the keys '{name}' do not have head_dim {head_dim} last (shape {shape}); cannot place R3"
        )
    return name


def check_key_path(
    index: GraphIndex, tensor: str, score: onnx.NodeProto, head_dim: int, where: str
) -> tuple[list, list]:
    """Prove every reader of the rotated keys keeps head_dim blocks and ends at the score MatMul's K^T.

    Returns (graph outputs reached, cache tensors joined on the way). Refuses naming the first op that
    is not proven block-preserving (``match/head_paths.RULES``).
    """
    frontier, seen, outputs, caches, reached = [(tensor, len(shape_of(index, tensor)) - 1)], set(), [], [], False
    while frontier:
        name, axis = frontier.pop()
        if name in seen:
            continue
        seen.add(name)
        if name in index.graph_outputs:
            outputs.append(name)
        for use in index.users(name):
            node = use.node
            if node.op_type in SHAPE_ONLY_OPS:
                continue
            if node is score and use.index == 1:
                if axis != len(shape_of(index, name)) - 2:
                    raise UnsupportedGraphError(
                        f"{where}: the keys reach {node_label(score)} with head_dim not contracted"
                    )
                reached = True
                continue
            moved = next_axis(index, Step(node, use.index, axis), head_dim, RULES)
            if moved is None:
                raise UnsupportedGraphError(
                    f"{where}: the keys after the rotary embedding are also read by {node_label(node)} "
                    f"({node.op_type}, input {use.index}), which is not proven to keep head_dim blocks; cannot place R3"
                )
            if node.op_type == "Concat":
                caches += [index.see_through_back(i) for i in node.input if i and i != name]
            frontier.extend((out, moved) for out in node.output if out)
    if not reached:
        raise UnsupportedGraphError(f"{where}: the keys from '{tensor}' never reach {node_label(score)}")
    return sorted(set(outputs)), caches


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
        if _last_dim(index, score.input[0]) != head_dim:
            raise UnsupportedGraphError(
                f"{where}: the queries reach {node_label(score)} with shape {shape_of(index, score.input[0])}, "
                f"not head_dim {head_dim} last; cannot place R3"
            )
        key_tensor = key_insertion_point(index, site, score, head_dim, where)
        outputs, caches = check_key_path(index, key_tensor, score, head_dim, where)
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
