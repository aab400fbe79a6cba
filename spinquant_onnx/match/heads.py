"""Attention head geometry (num_heads, num_kv_heads, head_dim) read off the graph, per attention block.

R2 rotates V's columns and O's rows in head_dim blocks, and R3 rotates Q and K along head_dim, so a wrong
head_dim silently mixes heads. It is therefore taken from every place the graph states it and all of them
must agree: the shape constant of the Reshape that splits q/k/v into heads, the gamma of a per-head norm
(Qwen3's q_norm/k_norm), the attributes of a fused attention op (GroupQueryAttention, Attention,
MultiHeadAttention) and the last dim of the KV-cache inputs. Nothing is read off names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from spinquant_onnx.errors import UnsupportedGraphError
from spinquant_onnx.graph.index import GraphIndex, node_label
from spinquant_onnx.graph.ops import (
    FUSED_ATTENTION,
    RANK_KEEPING_OPS,
    SCALAR_SHAPE_OPS,
    SHAPE_CARRY_OPS,
    TRANSPARENT_OPS,
)
from spinquant_onnx.graph.probe import shape_of
from spinquant_onnx.match.linears import Linear
from spinquant_onnx.match.norms import NormMatch, find_norms
from spinquant_onnx.match.roles import Roles, SubBlock

SEARCH_LIMIT = 40


@dataclass
class HeadGeometry:
    num_heads: int
    num_kv_heads: int
    head_dim: int  # of queries and keys (R3)
    evidence: list[str] = field(default_factory=list)
    value_head_dim: int | None = None  # of values and o_proj's input when it differs (MLA), else head_dim

    @property
    def v_head_dim(self) -> int:
        """The head size R2 turns: V's and o_proj's (DeepSeek's MLA has q/k heads of another size)."""
        return self.value_head_dim or self.head_dim

    def describe(self) -> dict[str, object]:
        found: dict[str, object] = {
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "evidence": self.evidence,
        }
        if self.value_head_dim is not None:
            found["v_head_dim"] = self.value_head_dim
        return found


@dataclass
class Projection:
    """Where q, k or v comes from: a linear's output, or a column range of a fused qkv linear's output."""

    role: str
    linear: Linear
    tensor: str  # the tensor holding exactly this projection (the linear output or its Slice/Split output)
    start: int
    stop: int
    head_dim: int | None = None  # stated by a packed qkv Reshape [.., 3, heads, head_dim] (#13)

    @property
    def width(self) -> int:
        return self.stop - self.start


@dataclass
class AttentionSite:
    """One attention sub-block with the facts R2 and R3 need."""

    block: int
    part: SubBlock
    q: Projection | None
    k: Projection | None
    v: Projection | None
    o: Linear
    geometry: HeadGeometry
    fused_op: onnx.NodeProto | None = None


# ------------------------------------------------------------------------------------- constant shapes


def partial_values(index: GraphIndex, name: str, depth: int = 0) -> list[int | None] | None:
    """The elements of a 1-D int tensor where they are constant (None where they depend on inputs)."""
    value = index.constant(name)
    if value is not None:
        return [int(v) for v in np.asarray(value).reshape(-1)]
    node = index.producer.get(name)
    if node is None or depth > 8:
        return None
    if node.op_type in TRANSPARENT_OPS:
        return partial_values(index, node.input[0], depth + 1)
    if node.op_type == "Concat":
        parts = [partial_values(index, part, depth + 1) for part in node.input]
        if any(p is None for p in parts):
            return None
        return [v for p in parts for v in p]
    target = index.constant(node.input[1]) if node.op_type == "Reshape" else None
    if target is not None and target.reshape(-1).tolist() == [-1]:  # flattened (dynamo's optimize=False)
        return partial_values(index, node.input[0], depth + 1)
    if node.op_type == "Unsqueeze" or (target is not None and target.reshape(-1).tolist() == [1]):
        # a scalar made 1-D: one element, constant or not
        inner = partial_values(index, node.input[0], depth + 1)
        return inner if inner is not None and len(inner) == 1 else [None]
    if node.op_type == "Shape":
        return _shape_values(index, node)
    if node.op_type in SCALAR_SHAPE_OPS and _is_scalar_like(index, name):
        return [None]
    shape = index.static_shape(name)  # any other 1-D int tensor of known length: values unknown
    return [None] * shape[0] if shape is not None and len(shape) == 1 and shape[0] is not None else None


def _shape_values(index: GraphIndex, node: onnx.NodeProto) -> list[int | None] | None:
    """Shape(x)[start:end]: x's static dims where known."""
    dims = index.static_shape(node.input[0])
    start, end = index.attr(node, "start", 0), index.attr(node, "end")
    if dims is None:
        if start >= 0 and end is not None and end > start:
            return [None] * (end - start)
        return None
    return list(dims[start:end])


def _is_scalar_like(index: GraphIndex, name: str) -> bool:
    shape = index.static_shape(name)
    if shape is not None:
        return len(shape) <= 1 and (not shape or shape[0] == 1)
    node = index.producer.get(name)
    if node is not None and node.op_type == "Gather":  # Gather(Shape(x), scalar index)
        index_value = index.constant(node.input[1])
        return index_value is not None and index_value.size == 1
    return False


def op_axes(index: GraphIndex, node: onnx.NodeProto) -> list[int] | None:
    """The constant axes a Concat, Slice, Squeeze or Unsqueeze works on (attribute or input), else None."""
    if node.op_type == "Concat":
        return [index.attr(node, "axis", 0)]
    if node.op_type == "Slice":
        if len(node.input) < 4 or not node.input[3]:
            return None
        value = index.constant(node.input[3])
        return None if value is None else [int(v) for v in value.reshape(-1)]
    attr = index.attr(node, "axes")
    if attr is not None:
        return list(attr)
    if len(node.input) > 1 and node.input[1]:
        value = index.constant(node.input[1])
        return None if value is None else [int(v) for v in value.reshape(-1)]
    return None


def tensor_rank(index: GraphIndex, name: str, depth: int = 0) -> int | None:
    """A tensor's rank from value_info, or from the op that makes it (Transpose perm, Reshape shape...)."""
    shape = index.static_shape(name)
    if shape is not None:
        return len(shape)
    node = index.producer.get(name)
    if node is None or depth > 12:
        return None
    if node.op_type == "Transpose" and index.attr(node, "perm") is not None:
        return len(index.attr(node, "perm"))
    if node.op_type == "Reshape":
        target = partial_values(index, node.input[1])
        return len(target) if target is not None else None
    if node.op_type in ("Unsqueeze", "Squeeze"):
        axes, inner = op_axes(index, node), tensor_rank(index, node.input[0], depth + 1)
        if axes is None or inner is None:
            return None
        return inner + len(axes) if node.op_type == "Unsqueeze" else inner - len(axes)
    if node.op_type == "Expand":
        target = partial_values(index, node.input[1])
        inner = tensor_rank(index, node.input[0], depth + 1)
        return None if target is None or inner is None else max(len(target), inner)
    if node.op_type in RANK_KEEPING_OPS:
        return tensor_rank(index, node.input[0], depth + 1)
    return None


def _last_dim_source(index: GraphIndex, shape_tensor: str) -> tuple[str, int] | None:
    """(T, axis) when the last element of a shape tensor is ``T.shape[axis]`` read at run time."""
    node = index.producer.get(shape_tensor)
    while node is not None and node.op_type in SHAPE_CARRY_OPS:
        node = index.producer.get(node.input[-1] if node.op_type == "Concat" else node.input[0])
    if node is None:
        return None
    if node.op_type == "Gather" and index.attr(node, "axis", 0) == 0:
        shape_node = index.producer.get(node.input[0])
        position = index.constant(node.input[1])
        if shape_node is None or shape_node.op_type != "Shape" or position is None or position.size != 1:
            return None
        start = index.attr(shape_node, "start", 0)
        return shape_node.input[0], int(position.reshape(())) + start
    if node.op_type == "Shape":
        start, end = index.attr(node, "start", 0), index.attr(node, "end")
        if end is not None and (end - start == 1 or end == 0 and start == -1):
            return node.input[0], start
    return None


def _same_last_dim(index: GraphIndex, name: str, limit: int = 12) -> set[str]:
    """Tensors upstream of ``name`` whose last dim is certainly the same as its own."""
    found = {name}
    for _ in range(limit):
        node = index.producer.get(name)
        if node is None:
            break
        op = node.op_type
        if op == "Transpose":
            perm = index.attr(node, "perm")
            if perm is None or list(perm)[-1] != len(perm) - 1:
                break
        elif op in ("Unsqueeze", "Squeeze"):
            axes = op_axes(index, node)
            if axes is None or -1 in axes:
                break
        elif op not in ("Expand", "Cast", "Identity", "QcQuantizeOp", "Neg", "Mul", "Div"):
            break
        name = node.input[0]
        found.add(name)
    return found


def reshape_last_dim(index: GraphIndex, node: onnx.NodeProto) -> int | str | None:
    """What a Reshape's output last dim is: an int, "-1", "same" (its input's last dim), or None (unknown)."""
    shape = partial_values(index, node.input[1])
    if shape and shape[-1] is not None:
        if shape[-1] == 0 and not index.attr(node, "allowzero", 0):
            return "same" if len(shape) == tensor_rank(index, node.input[0]) else None
        return "-1" if shape[-1] == -1 else shape[-1]
    source = _last_dim_source(index, node.input[1])
    if source is None:
        return None
    tensor, axis = source
    rank = tensor_rank(index, tensor)
    if rank is None or axis not in (-1, rank - 1):
        return None
    return "same" if tensor in _same_last_dim(index, node.input[0]) else None


# ------------------------------------------------------------------------------------------ projections


def _slice_range(index: GraphIndex, node: onnx.NodeProto, width: int) -> tuple[int, int] | None:
    """Column range [start, stop) a Slice takes along the last axis of a width-wide tensor, else None."""
    if len(node.input) < 3:
        return None
    starts, ends = index.constant(node.input[1]), index.constant(node.input[2])
    axes = index.constant(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    steps = index.constant(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if starts is None or ends is None or starts.size != 1:
        return None
    rank = _rank(index, node.input[0])
    axis = int(axes.reshape(-1)[0]) if axes is not None else 0
    if axis not in (-1, rank - 1) or (steps is not None and int(steps.reshape(-1)[0]) != 1):
        return None
    start, stop = (int(v.reshape(-1)[0]) for v in (starts, ends))
    start, stop = (v + width if v < 0 else v for v in (start, stop))
    return max(0, min(start, width)), max(0, min(stop, width))


def _rank(index: GraphIndex, name: str) -> int:
    shape = index.static_shape(name)
    return len(shape) if shape is not None else 3  # activations of a decoder's linears are [batch, seq, features]


def _split_ranges(index: GraphIndex, node: onnx.NodeProto, width: int) -> list[tuple[int, int]] | None:
    axis = index.attr(node, "axis", 0)
    if axis not in (-1, _rank(index, node.input[0]) - 1):
        return None
    sizes = index.constant(node.input[1]) if len(node.input) > 1 and node.input[1] else None
    sizes = list(index.attr(node, "split", [])) if sizes is None else [int(s) for s in sizes.reshape(-1)]
    if not sizes:
        count = len(node.output)
        if width % count:
            return None
        sizes = [width // count] * count
    if sum(sizes) != width:
        return None
    bounds = np.cumsum([0, *sizes])
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def packed_projections(index: GraphIndex, linear: Linear) -> list[Projection] | None:
    """q, k, v of a qkv output reshaped to ``[.., 3, heads, head_dim]`` and cut by Gathers on the "3" axis.

    The layout is proven from the Reshape's constant target (3 * heads * head_dim == width, so column
    ``i * heads * head_dim + h * head_dim + d`` is part i, head h, entry d) and the Gathers' constant axis and
    scalar index; anything else is not this layout (#13: R2 on a packed qkv turns exactly the v columns).
    """
    width = linear.out_features
    users = index.value_users(linear.output)
    if len(users) != 1 or users[0].node.op_type != "Reshape" or users[0].index != 0:
        return None
    reshape = users[0].node
    target = partial_values(index, reshape.input[1])
    if not target or len(target) < 3 or any(v is None or v <= 0 for v in target[-3:]):
        return None
    three, heads, head_dim = target[-3:]
    if three != 3 or 3 * heads * head_dim != width:
        return None
    rank, parts = len(target), {}
    for use in index.value_users(reshape.output[0]):
        node, picked = use.node, index.constant(use.node.input[1]) if len(use.node.input) > 1 else None
        axis = index.attr(node, "axis", 0)
        if node.op_type != "Gather" or use.index != 0 or picked is None or picked.size != 1 or picked.ndim != 0:
            return None
        if axis not in (rank - 3, -3) or int(picked) in parts or not 0 <= int(picked) < 3:
            return None
        parts[int(picked)] = node.output[0]
    if sorted(parts) != [0, 1, 2]:
        return None
    step = heads * head_dim
    return [Projection(role, linear, parts[i], i * step, (i + 1) * step, head_dim) for i, role in enumerate("qkv")]


def split_projections(index: GraphIndex, linear: Linear) -> list[Projection] | None:
    """q, k, v column ranges of a fused qkv linear, from the Slice or Split nodes that cut its output."""
    packed = packed_projections(index, linear)
    if packed is not None:
        return packed
    width = linear.out_features
    pieces: list[tuple[int, int, str]] = []
    for use in index.value_users(linear.output):
        node = use.node
        if node.op_type == "Slice" and use.index == 0:
            found = _slice_range(index, node, width)
            if found is None:
                return None
            pieces.append((*found, node.output[0]))
        elif node.op_type == "Split" and use.index == 0:
            ranges = _split_ranges(index, node, width)
            if ranges is None:
                return None
            pieces.extend((a, b, out) for (a, b), out in zip(ranges, node.output, strict=True))
        elif node.op_type in FUSED_ATTENTION:
            return None  # packed qkv handed to a fused op: the op's attributes say where v is
        else:
            return None
    pieces.sort()
    if len(pieces) != 3 or pieces[0][0] != 0 or pieces[-1][1] != width:
        return None
    if any(a[1] != b[0] for a, b in zip(pieces, pieces[1:], strict=False)):
        return None
    return [Projection(role, linear, out, a, b) for role, (a, b, out) in zip("qkv", pieces, strict=True)]


def _projections(index: GraphIndex, part: SubBlock) -> dict[str, Projection]:
    found: dict[str, Projection] = {}
    for entry in part.readers:
        lin = entry.linear
        if entry.role in ("q", "k", "v"):
            found[entry.role] = Projection(entry.role, lin, lin.output, 0, lin.out_features)
        elif entry.role == "qkv":
            pieces = split_projections(index, lin)
            if pieces is not None:
                found.update({p.role: p for p in pieces})
            else:
                found["qkv"] = Projection("qkv", lin, lin.output, 0, lin.out_features)
    return found


# -------------------------------------------------------------------------------------------- evidence


def _first_reshape(index: GraphIndex, tensor: str) -> onnx.NodeProto | None:
    """The Reshape that splits a projection into heads (its first value reader, behind transparent ops)."""
    for use in index.value_users(tensor):
        if use.node.op_type == "Reshape" and use.index == 0:
            return use.node
    return None


def _forward_ops(index: GraphIndex, tensor: str, limit: int = SEARCH_LIMIT):
    """Where a projection's output goes, not past the attention core (Softmax or a fused attention op)."""
    def inside_head(node: onnx.NodeProto) -> bool:
        return node.op_type not in FUSED_ATTENTION and node.op_type != "Softmax"

    for node, slot, _ in index.walk_forward(tensor, limit=limit, follow=inside_head):
        yield node, slot


class _Evidence:
    """head_dim and head counts as stated by different parts of the graph."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.head_dim: dict[str, int] = {}
        self.heads: dict[str, int] = {}
        self.kv_heads: dict[str, int] = {}

    def add(self, kind: str, source: str, value: int | None) -> None:
        if value is not None and value > 0:
            getattr(self, kind)[source] = int(value)

    def agreed(self, kind: str) -> int | None:
        values = set(getattr(self, kind).values())
        if len(values) > 1:
            detail = ", ".join(f"{k} says {v}" for k, v in getattr(self, kind).items())
            raise UnsupportedGraphError(f"{self.where}: the graph disagrees about {kind.replace('_', ' ')} ({detail})")
        return values.pop() if values else None

    def lines(self) -> list[str]:
        return [
            f"{kind} {value} from {source}"
            for kind in ("head_dim", "heads", "kv_heads")
            for source, value in getattr(self, kind).items()
        ]


def _reshape_evidence(index: GraphIndex, proj: Projection, ev: _Evidence, count_kind: str) -> str | None:
    reshape = _first_reshape(index, proj.tensor)
    if reshape is None:
        return None
    shape = partial_values(index, reshape.input[1])
    if not shape or len(shape) < 2:
        return None
    label = f"{proj.role} Reshape {node_label(reshape)}"
    last, before = shape[-1], shape[-2]
    if last is not None and last > 0 and proj.width % last == 0:
        ev.add("head_dim", label, last)
        if before is not None and before > 0:
            ev.add(count_kind, label, before)
    elif last == -1 and before is not None and before > 0 and proj.width % before == 0:
        ev.add(count_kind, label, before)
        ev.add("head_dim", label, proj.width // before)
    probed = shape_of(index, reshape.output[0])  # the shape it really produced (graph/probe.py)
    if probed is not None and len(probed) >= 3 and probed[-1] * probed[-2] == proj.width:
        ev.add("head_dim", f"{label}, probed shape {list(probed)}", probed[-1])
        ev.add(count_kind, f"{label}, probed shape {list(probed)}", probed[-2])
    return reshape.output[0]


def _norm_evidence(
    index: GraphIndex, norms_by_input: dict[str, NormMatch], head_tensor: str | None, role: str, ev: _Evidence
) -> None:
    """A per-head RMSNorm (Qwen3 q_norm/k_norm) right after the head split: its gamma has head_dim entries."""
    norm = norms_by_input.get(head_tensor) if head_tensor is not None else None
    if norm is not None:
        ev.add("head_dim", f"{role}_norm gamma '{norm.gamma}'", index.store.shape(norm.gamma)[-1])


def _fused_op(index: GraphIndex, projections: dict[str, Projection]) -> onnx.NodeProto | None:
    for proj in projections.values():
        for node, _ in _forward_ops(index, proj.tensor, limit=12):
            if node.op_type in FUSED_ATTENTION:
                return node
    return None


def _fused_evidence(index: GraphIndex, op: onnx.NodeProto, ev: _Evidence) -> None:
    label = f"{op.op_type} {node_label(op)}"
    heads = index.attr(op, "num_heads")
    ev.add("heads", label, heads)
    if op.op_type == "Attention" and op.domain in ("", "ai.onnx"):  # ONNX opset-23 Attention
        ev.add("heads", label, index.attr(op, "q_num_heads"))
        ev.add("kv_heads", label, index.attr(op, "kv_num_heads"))
    if op.op_type == "GroupQueryAttention":
        ev.add("kv_heads", label, index.attr(op, "kv_num_heads"))
        for name in op.input[3:5]:  # past_key / past_value: [batch, kv_heads, past, head_dim]
            shape = index.static_shape(name) if name else None
            if shape is not None and len(shape) == 4:
                ev.add("head_dim", f"cache input '{name}'", shape[3])
                ev.add("kv_heads", f"cache input '{name}'", shape[1])
    elif heads and op.op_type != "Attention":  # the ONNX Attention op takes separate q/kv head counts
        ev.add("kv_heads", label, heads)


def _mark_packed(index: GraphIndex, projections: dict[str, Projection]) -> onnx.NodeProto | None:
    """The fused attention op; a lone projection it reads as packed q|k|v (inputs 1, 2 empty) becomes "qkv"."""
    fused = _fused_op(index, projections)
    if fused is None or len(projections) != 1:
        return fused
    packed = len(fused.input) < 3 or not (fused.input[1] or fused.input[2])
    ((role, proj),) = projections.items()
    if packed and role != "qkv":
        projections.pop(role)
        projections["qkv"] = Projection("qkv", proj.linear, proj.tensor, proj.start, proj.stop)
    return fused


def _cache_evidence(index: GraphIndex, projections: dict[str, Projection], ev: _Evidence) -> None:
    """KV-cache inputs concatenated with this block's k/v: [batch, kv_heads, past, head_dim]."""
    for role in ("k", "v"):
        proj = projections.get(role)
        if proj is None:
            continue
        for node, _ in _forward_ops(index, proj.tensor, limit=16):
            if node.op_type not in ("Concat", *FUSED_ATTENTION):
                continue
            for name in node.input:
                if name in index.graph_inputs:
                    shape = index.static_shape(name)
                    if shape is not None and len(shape) == 4:
                        ev.add("head_dim", f"cache input '{name}'", shape[3])
                        ev.add("kv_heads", f"cache input '{name}'", shape[1])


def _projection_evidence(
    index: GraphIndex, projections: dict[str, Projection], norms_by_input: dict[str, NormMatch], ev: _Evidence
) -> None:
    """What q, k and v's own Reshapes (and per-head norms) say about head_dim and the head counts."""
    for role, count_kind in (("q", "heads"), ("k", "kv_heads"), ("v", "kv_heads")):
        proj = projections.get(role)
        if proj is None:
            continue
        if proj.head_dim is not None:  # a packed qkv Reshape states it (#13)
            ev.add("head_dim", f"{role} of packed qkv {proj.linear.label}", proj.head_dim)
            ev.add(count_kind, f"{role} of packed qkv {proj.linear.label}", proj.width // proj.head_dim)
        heads_tensor = _reshape_evidence(index, proj, ev, count_kind)
        if role in ("q", "k"):
            _norm_evidence(index, norms_by_input, heads_tensor, role, ev)


def head_geometry(
    index: GraphIndex,
    part: SubBlock,
    projections: dict[str, Projection],
    o: Linear,
    norms_by_input: dict[str, NormMatch],
    where: str,
) -> tuple[HeadGeometry, onnx.NodeProto | None]:
    """num_heads, num_kv_heads and head_dim of one attention block; refuses when unknown or contradictory."""
    ev = _Evidence(where)
    _projection_evidence(index, projections, norms_by_input, ev)
    fused = _mark_packed(index, projections)
    if fused is not None:
        _fused_evidence(index, fused, ev)
    _cache_evidence(index, projections, ev)
    head_dim = ev.agreed("head_dim")
    heads = ev.agreed("heads")
    q_width = projections["q"].width if "q" in projections else o.in_features
    if head_dim is None and heads:
        head_dim = q_width // heads if q_width % heads == 0 else None
    if head_dim is None:
        raise UnsupportedGraphError(
            f"{where}: cannot tell head_dim from the graph (no head-splitting Reshape with a constant last dim, "
            "no per-head norm, no fused attention op or cache input states it)"
        )
    v_width = projections["v"].width if "v" in projections else None
    if o.in_features % head_dim or q_width % head_dim or (v_width is not None and v_width % head_dim):
        raise UnsupportedGraphError(
            f"{where}: head_dim {head_dim} does not divide the projections (q {q_width}, "
            f"v {v_width}, o input {o.in_features})"
        )
    ev.add("heads", f"o_proj {o.label} input width", o.in_features // head_dim)
    if v_width is not None:
        ev.add("kv_heads", "v width", v_width // head_dim)
    if "k" in projections:
        ev.add("kv_heads", "k width", projections["k"].width // head_dim)
    heads, kv_heads = ev.agreed("heads"), ev.agreed("kv_heads")
    if kv_heads is None and fused is not None and "qkv" in projections:
        rest = projections["qkv"].width - heads * head_dim
        kv_heads = rest // (2 * head_dim) if rest > 0 and rest % (2 * head_dim) == 0 else None
    if kv_heads is None or heads % kv_heads:
        raise UnsupportedGraphError(
            f"{where}: cannot tell the number of KV heads ({heads} query heads of dim {head_dim}, kv {kv_heads})"
        )
    return HeadGeometry(heads, kv_heads, head_dim, ev.lines()), fused


def _packed_projections(projections: dict[str, Projection], geometry: HeadGeometry) -> None:
    """q, k, v ranges of a packed qkv that a fused attention op splits itself (layout q | k | v)."""
    packed = projections.pop("qkv", None)
    if packed is None:
        return
    q_end = geometry.num_heads * geometry.head_dim
    kv = geometry.num_kv_heads * geometry.head_dim
    if packed.width != q_end + 2 * kv:
        raise UnsupportedGraphError(
            f"fused qkv {packed.linear.label}: width {packed.width} is not q {q_end} + k {kv} + v {kv}"
        )
    for role, (a, b) in zip("qkv", ((0, q_end), (q_end, q_end + kv), (q_end + kv, q_end + 2 * kv)), strict=True):
        projections[role] = Projection(role, packed.linear, packed.tensor, a, b)


# Ops between MLA's down-projection and its up-projection: the latent RMSNorm and the rope/nope Split.
LATENT_NORM_OPS = frozenset(
    {"Cast", "Pow", "ReduceMean", "Add", "Sqrt", "Div", "Reciprocal", "Mul", "Split", "Slice", "Identity"}
)


def _in_latent_norm(node: onnx.NodeProto) -> bool:
    return node.op_type in LATENT_NORM_OPS


def refuse_latent_attention(index: GraphIndex, part: SubBlock, where: str) -> None:
    """Refuse multi-head latent attention: a reader whose output feeds another projection before attention.

    DeepSeek-V2/V3's MLA makes q from ``q_b(norm(q_a(x)))`` and k_nope and v from ``kv_b(norm(kv_a(x)))``,
    with q/k heads of qk_nope + qk_rope entries and v heads of v_head_dim: v's columns live inside kv_b,
    which reads no residual stream, and neither R2's nor R3's proof covers that layout.
    """
    for entry in part.readers:
        for node, _, _ in index.walk_forward(entry.linear.output, limit=24, follow=_in_latent_norm):
            if node.op_type in ("MatMul", "Gemm") and index.is_initializer(index.see_through_back(node.input[1])):
                raise UnsupportedGraphError(
                    f"{where}: multi-head latent attention (MLA, as in DeepSeek-V3): {entry.linear.label} feeds "
                    f"another projection {node_label(node)} before attention, so q/k heads and v heads differ in "
                    "size and v is made inside that second projection; R2 and R3 are not supported on MLA "
                    "(R1 and R4 are exact): drop --r2/--r3"
                )


def attention_sites(index: GraphIndex, roles: Roles) -> list[AttentionSite]:
    """Every attention sub-block with its q/k/v/o and head geometry, in layer order."""
    norms_by_input: dict[str, NormMatch] = {}
    for norm in find_norms(index):
        for name in norm.inputs:
            norms_by_input[index.see_through_back(name)] = norm
            norms_by_input[name] = norm
    sites = []
    for number, part in roles.parts_of("attention"):
        where = f"attention block {number}"
        if part.writer is None:
            raise UnsupportedGraphError(
                f"{where}: no o_proj writer found (a parallel attention+MLP block, as in GPT-NeoX, adds both "
                "sub-blocks at once and is not split yet); drop --r2/--r3"
            )
        refuse_latent_attention(index, part, where)
        projections = _projections(index, part)
        geometry, fused = head_geometry(index, part, projections, part.writer.linear, norms_by_input, where)
        if "qkv" in projections and fused is not None:
            _packed_projections(projections, geometry)
        sites.append(
            AttentionSite(
                number,
                part,
                projections.get("q"),
                projections.get("k"),
                projections.get("v"),
                part.writer.linear,
                geometry,
                fused,
            )
        )
    return sites
