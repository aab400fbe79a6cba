"""Where each weight's role is decided: blocks, and q/k/v/o/gate/up/down/embedding/lm_head.

R1 itself only needs readers and writers; roles matter for what a user sees (``inspect``), for R2-R4,
and for catching a misread graph. They are read off the dataflow, never off names: a reader whose
output reaches a Softmax through a score MatMul is q (left operand) or k (right operand); one that meets
the Softmax output in a MatMul is v; in an MLP, the reader that passes an activation first is the gate.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import onnx

from spinquant_onnx.errors import UnsupportedGraphError
from spinquant_onnx.graph.index import GraphIndex
from spinquant_onnx.graph.ops import ACTIVATION_OPS, ATTENTION_OPS
from spinquant_onnx.match.linears import Linear, linear_writing
from spinquant_onnx.match.norms import NormMatch
from spinquant_onnx.match.residual import Stream

SEARCH_LIMIT = 200


@dataclass
class RoleEntry:
    role: str
    linear: Linear


@dataclass
class SubBlock:
    kind: str  # "attention" | "mlp" | "final" | "unknown"
    norm: NormMatch | None  # None: the readers take the raw stream (no final norm)
    readers: list[RoleEntry] = field(default_factory=list)
    writer: RoleEntry | None = None
    more_writers: list[RoleEntry] = field(default_factory=list)  # MoE: every expert/shared down after the first
    online_write: str | None = None  # the tensor rotated online where a sandwich norm feeds the Add
    post_norm: NormMatch | None = None

    @property
    def writers(self) -> list[RoleEntry]:
        return ([self.writer] if self.writer else []) + self.more_writers

    @property
    def experts(self) -> int:
        """How many experts this sub-block routes tokens to (0: dense)."""
        return max((entry.linear.experts for entry in self.readers + self.writers), default=0)

    @property
    def closed(self) -> bool:
        return self.writer is not None or self.online_write is not None

    def dense_writer(self, refusal: str) -> Linear:
        """The one writer of a dense sub-block; a mixture of experts (or several writers) raises ``refusal``."""
        if self.experts or len(self.writers) != 1:
            raise UnsupportedGraphError(refusal)
        return self.writers[0].linear


@dataclass
class Block:
    number: int
    parts: list[SubBlock] = field(default_factory=list)


@dataclass
class Roles:
    blocks: list[Block]
    final: SubBlock | None
    embedding: str | None

    def parts_of(self, kind: str) -> Iterator[tuple[int, SubBlock]]:
        """(block number, sub-block) of every sub-block of this kind, in layer order."""
        return ((block.number, part) for block in self.blocks for part in block.parts if part.kind == kind)

    def all_linears(self) -> list[RoleEntry]:
        entries = [r for b in self.blocks for p in b.parts for r in p.readers + p.writers]
        if self.final is not None:
            entries += self.final.readers
        return entries


def _forward(index: GraphIndex, start: str, limit: int = SEARCH_LIMIT, stop: frozenset[str] = frozenset()):
    return index.walk_forward(start, limit=limit, stop=stop)


def _feeds_softmax(index: GraphIndex, node: onnx.NodeProto) -> bool:
    return any(n.op_type == "Softmax" for n, _, _ in _forward(index, node.output[0], limit=8))


def _from_softmax(index: GraphIndex, tensor: str) -> bool:
    name, hops = tensor, 0
    while hops < 6:
        producer = index.producer.get(name)
        if producer is None or not producer.input:  # a graph input, or a Constant / input-less node
            return producer is not None and producer.op_type == "Softmax"
        if producer.op_type == "Softmax":
            return True
        name, hops = producer.input[0], hops + 1
    return False


def attention_role(index: GraphIndex, linear: Linear, stop: frozenset[str]) -> str | None:
    """q, k, v (or qkv when one MatMul serves all three) from where the output enters attention."""
    slots = set()
    for node, slot, _ in _forward(index, linear.output, stop=stop):
        if node.op_type in ATTENTION_OPS:
            order = ATTENTION_OPS[node.op_type]
            packed = slot == order[0] and all(len(node.input) <= i or not node.input[i] for i in order[1:])
            if packed:
                slots.update("qkv")  # one packed input carries q, k and v
            elif slot in order:
                slots.add("qkv"[order.index(slot)])
        elif node.op_type == "MatMul" and len(node.input) == 2 and not index.is_initializer(node.input[1]):
            if _from_softmax(index, node.input[1 - slot]):
                slots.add("v")
            elif _feeds_softmax(index, node):
                slots.add("q" if slot == 0 else "k")
        elif node.op_type == "Softmax":
            continue
    if len(slots) > 1:
        return "qkv" if slots == {"q", "k", "v"} else "".join(sorted(slots, key="qkv".index))
    return slots.pop() if slots else None


def reaches_attention(index: GraphIndex, linear: Linear, stop: frozenset[str]) -> bool:
    found = _forward(index, linear.output, stop=stop)
    return any(n.op_type == "Softmax" or n.op_type in ATTENTION_OPS for n, _, _ in found)


def mlp_role(index: GraphIndex, linear: Linear, siblings: list[Linear], stop: frozenset[str]) -> str:
    """gate, up, or gate_up for a single fused projection.

    Gate and up meet in one Mul: up's output feeds it directly, gate's only through its activation.
    """
    if len(siblings) == 1:
        return "gate_up"
    downstream = set()
    for sibling in siblings:
        if sibling is not linear:
            downstream |= {out for node, _, _ in _forward(index, sibling.output, stop=stop) for out in node.output}
    for use in index.users(linear.output):
        if use.node.op_type == "Mul" and use.node.input[1 - use.index] in downstream:
            return "up"
    for node, _, _ in _forward(index, linear.output, limit=12, stop=stop):
        if node.op_type in ACTIVATION_OPS:
            return "gate"
    return "mlp_in"


def is_router(index: GraphIndex, linear: Linear, stop: frozenset[str]) -> bool:
    """An MoE router: a dense reader whose scores pick experts (a TopK close behind it)."""
    return not linear.experts and any(n.op_type == "TopK" for n, _, _ in _forward(index, linear.output, 24, stop))


def _moe_roles(index: GraphIndex, part: SubBlock, stop: frozenset[str]) -> None:
    """Roles in a mixture-of-experts MLP: router, experts' gate/up/down, shared experts and their gate."""
    experts = [e for e in part.readers if e.linear.experts]
    dense = [e for e in part.readers if not e.linear.experts and e.role != "router"]
    for entry in dense:
        if entry.linear.out_features == 1:
            entry.role = "shared_expert_gate"  # Qwen2-MoE: sigmoid(x W) scales the shared expert's output
    shared = [e for e in dense if e.role != "shared_expert_gate"]
    for group, prefix in ((experts, "expert_"), (shared, "shared_" if experts else "")):
        linears = [e.linear for e in group]
        for entry in group:
            entry.role = prefix + mlp_role(index, entry.linear, linears, stop)
    for entry in part.writers:
        entry.role = "expert_down" if entry.linear.experts else ("shared_down" if experts else "down")


ATTENTION_ROLES = frozenset({"q", "k", "v", "qkv", "qk", "qv", "kv", "attn_in"})


def assign_roles(index: GraphIndex, stream: Stream, given: dict[str, str] | None = None) -> Roles:
    """Pair each norm with the next writer into sub-blocks, and name every linear's role.

    ``given`` (from a user's role map) names roles by each linear's node output; otherwise they are
    inferred from the dataflow.
    """
    parts: list[SubBlock] = []
    current: SubBlock | None = None
    last_add = None
    for event in stream.events:
        if event.kind in ("norm", "read"):
            current = SubBlock("unknown", event.norm, [RoleEntry("reader", lin) for lin in event.readers])
            parts.append(current)
        elif current is not None and current.closed and event.add is last_add and event.writer is not None:
            current.more_writers.append(RoleEntry("writer", event.writer))  # one Add, several writers (MoE)
        elif current is not None and not current.closed:
            if event.online is not None:
                current.online_write, current.post_norm = event.online, event.online_norm
                # The linear feeding a sandwich norm is still this sub-block's o/down (R2 and R4 need it);
                # R1 leaves it alone, since its output is normalized before it reaches the stream.
                inner = linear_writing(index, event.online_norm.inputs[0])
                if inner is not None:
                    current.writer = RoleEntry("writer", inner)
            else:
                current.writer = RoleEntry("writer", event.writer)
            last_add = event.add
    final = parts.pop() if parts and not parts[-1].closed else None
    if given is not None:
        _apply_given(parts, final, given)
    else:
        _infer(index, stream, parts, final)
    blocks: list[Block] = []
    for part in parts:
        if (
            not blocks
            or (part.kind == "attention" and blocks[-1].parts)
            or any(p.kind == part.kind for p in blocks[-1].parts)
        ):
            blocks.append(Block(len(blocks)))
        blocks[-1].parts.append(part)
    return Roles(blocks, final, stream.embedding.table if stream.embedding else None)


def _infer(index: GraphIndex, stream: Stream, parts: list[SubBlock], final: SubBlock | None) -> None:
    # Searches stay inside their sub-block: never through the stream or a stream norm into the next one.
    stop = frozenset(stream.tensors) | {event.norm.output for event in stream.norms}
    for part in parts:
        for entry in part.readers:
            if is_router(index, entry.linear, stop):
                entry.role = "router"
        linears = [entry.linear for entry in part.readers if entry.role != "router"]
        if any(reaches_attention(index, lin, stop) for lin in linears):
            part.kind = "attention"
            for entry in part.readers:
                entry.role = attention_role(index, entry.linear, stop) or "attn_in"
            if part.writer:
                part.writer.role = "o"
        elif part.experts or len(linears) < len(part.readers):
            part.kind = "mlp"
            _moe_roles(index, part, stop)
        else:
            part.kind = "mlp"
            for entry in part.readers:
                entry.role = mlp_role(index, entry.linear, linears, stop)
            if part.writer:
                part.writer.role = "down"
    if final is not None:
        final.kind = "final"
        for entry in final.readers:
            entry.role = "lm_head"


def _apply_given(parts: list[SubBlock], final: SubBlock | None, given: dict[str, str]) -> None:
    for part in [*parts, *([final] if final else [])]:
        for entry in part.readers + part.writers:
            entry.role = given.get(entry.linear.node.output[0], entry.role)
        roles = {entry.role for entry in part.readers}
        part.kind = "attention" if roles & ATTENTION_ROLES else "mlp"
    if final is not None:
        final.kind = "final"
