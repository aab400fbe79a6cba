"""Where W8A8 loses: the full QDQ model's quantizers put back one site family at a time.

``eval --sensitivity`` quantizes the model once (``quantize_w8a8``, the same calibration as the W8A8 row)
and then builds, from the float model, one copy per family that holds only that family's quantizers:

* ``weights``: every weight's int8 DequantizeLinear, activations float;
* ``qkv`` / ``o`` / ``gate_up`` / ``down``: the activation Q/DQ pair on the input of those linears only
  (weights float), the families taken from the matched roles, not from node names;
* ``outputs``: the pairs ``quantize_static`` also puts on the matched linears' outputs;
* ``other``: every other activation pair (attention's two activation-activation MatMuls, whose operands
  and outputs ORT's QDQ MatMul quantizes too, and anything the roles do not name);
* ``linear``: weights and the four linear-input families together, i.e. W8A8 as SmoothQuant / SpinQuant
  define it (linear inputs and weights), without the extra output and attention quantizers ORT adds.

Each copy reuses the full model's scales and zero points, so the rows differ from W8A8 only in which
quantizers are present; together they are the W8A8 model, and a family whose row stays near float is one
that can be quantized freely.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import onnx

from spinquant_onnx.errors import InputError, SpinQuantError
from spinquant_onnx.integrations.quantize import _load_full
from spinquant_onnx.match.analysis import Analysis

# Row name -> label; families in the order a decoder block runs them.
FAMILIES = {
    "weights": "weights only (all linears)",
    "qkv": "q/k/v input only",
    "o": "o_proj input only",
    "gate_up": "gate/up input only",
    "down": "down_proj input only",
    "outputs": "linear outputs only",
    "other": "other activations only",
    "linear": "weights and linear inputs only",
}
LINEAR_FAMILIES = ("qkv", "o", "gate_up", "down")
# (sub-block kind, readers or writers) -> family
PART_FAMILIES = {
    ("attention", "readers"): "qkv",
    ("attention", "writers"): "o",
    ("mlp", "readers"): "gate_up",
    ("mlp", "writers"): "down",
}
GROUPS = {"linear": ("weights", *LINEAR_FAMILIES)}  # rows that put several families back at once
PREFIX = "w8a8:"


@dataclass
class Families:
    """Linear node name -> its family, and the input slot its activation arrives on."""

    family: dict[str, str] = field(default_factory=dict)
    activation_slot: dict[str, int] = field(default_factory=dict)

    def of_edge(self, node: str, slot: int, producer: str | None) -> str:
        """The family of an activation quantizer read on input ``slot`` of ``node``, on a tensor ``producer`` made."""
        if node in self.family and slot == self.activation_slot[node]:
            return self.family[node]
        return "outputs" if producer in self.family else "other"


def families(get_analysis: Callable[[], Analysis], where: str) -> Families:
    """Each matched linear's family from the roles; refuses a model whose blocks were not matched."""
    try:
        roles = get_analysis().roles
    except SpinQuantError as exc:
        raise InputError(f"eval --sensitivity: {where}: the decoder blocks were not matched ({exc})") from None
    found = Families()
    for block in roles.blocks:
        for part in block.parts:
            for side, entries in (("readers", part.readers), ("writers", part.writers)):
                family = PART_FAMILIES.get((part.kind, side))
                for entry in entries if family else ():
                    found.family[entry.linear.node.name] = family
                    found.activation_slot[entry.linear.node.name] = entry.linear.activation_slot
    missing = [f for f in LINEAR_FAMILIES if f not in found.family.values()]
    if missing:
        raise InputError(
            f"eval --sensitivity: {where}: no {', '.join(missing)} linears matched among "
            f"{len(roles.blocks)} block(s); the site families need attention and MLP sub-blocks with their roles"
        )
    return found


# --------------------------------------------------------------------------------------- QDQ assembly


@dataclass
class _Quantizers:
    """The full QDQ model's quantizers, by the float-model edge each one feeds."""

    model: onnx.ModelProto
    nodes: dict[str, list[onnx.NodeProto]]  # float tensor (or weight initializer) -> its Q/DQ (or DQ) nodes
    edges: dict[str, list[tuple[str, int, str]]]  # family -> (consumer node, slot, the DQ output it reads)


def _scan(quantized: onnx.ModelProto, fams: Families) -> _Quantizers:
    """Pair each DequantizeLinear with what it stands for (an activation tensor or a weight)."""
    producer = {out: node for node in quantized.graph.node for out in node.output}
    initializers = {t.name for t in quantized.graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in quantized.graph.node:
        for slot, name in enumerate(node.input):
            consumers[name].append((node, slot))
    nodes: dict[str, list[onnx.NodeProto]] = {}
    edges: dict[str, list[tuple[str, int, str]]] = defaultdict(list)
    for dq in quantized.graph.node:
        if dq.op_type != "DequantizeLinear":
            continue
        q = producer.get(dq.input[0])
        if q is not None and q.op_type == "QuantizeLinear":
            chain = [q, dq]
            made_by = producer.get(q.input[0])
        elif dq.input[0] in initializers:
            chain, made_by = [dq], None  # a weight: the consumer's float input is replaced by the int8 copy
        else:
            continue
        nodes[dq.output[0]] = chain
        for node, slot in consumers[dq.output[0]]:
            family = "weights" if len(chain) == 1 else fams.of_edge(node.name, slot, made_by and made_by.name)
            edges[family].append((node.name, slot, dq.output[0]))
    return _Quantizers(quantized, nodes, dict(edges))


def _assemble(float_model: onnx.ModelProto, found: _Quantizers, chosen: tuple[str, ...]) -> onnx.ModelProto:
    """The float model with only the ``chosen`` families' quantizers inserted (nodes in topological order)."""
    model = onnx.ModelProto()
    model.CopyFrom(float_model)
    by_name = {node.name: node for node in model.graph.node}
    wanted: dict[str, list[onnx.NodeProto]] = {}
    expanded = [member for family in chosen for member in GROUPS.get(family, (family,))]
    edges = [edge for family in expanded for edge in found.edges.get(family, [])]
    for node_name, slot, dq_out in edges:
        node = by_name.get(node_name)
        if node is None:
            raise InputError(f"eval --sensitivity: quantized node {node_name} has no float counterpart")
        node.input[slot] = dq_out
        wanted[dq_out] = found.nodes[dq_out]
    needed = {name for chain in wanted.values() for n in chain for name in n.input}
    model.graph.initializer.extend(t for t in found.model.graph.initializer if t.name in needed)
    _insert_before_first_reader(model, [n for chain in wanted.values() for n in chain])
    _drop_unused_initializers(model)
    return model


def _insert_before_first_reader(model: onnx.ModelProto, added: list[onnx.NodeProto]) -> None:
    """Put each Q/DQ chain just before the first node that reads its output (inputs exist earlier)."""
    chains: dict[str, list[onnx.NodeProto]] = {}
    for node in added:
        if node.op_type == "DequantizeLinear":
            chains[node.output[0]] = [n for n in added if n.output[0] == node.input[0]] + [node]
    ordered: list[onnx.NodeProto] = []
    placed: set[str] = set()
    for node in model.graph.node:
        for name in node.input:
            if name in chains and name not in placed:
                ordered.extend(chains[name])
                placed.add(name)
        ordered.append(node)
    del model.graph.node[:]
    model.graph.node.extend(ordered)


def _drop_unused_initializers(model: onnx.ModelProto) -> None:
    """Float weights no node reads any more (replaced by their int8 copies): not carried into the session."""
    read = {name for node in model.graph.node for name in node.input} | {o.name for o in model.graph.output}
    dropped = {t.name for t in model.graph.initializer if t.name not in read}
    if dropped:
        kept = [t for t in model.graph.initializer if t.name not in dropped]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
        inputs = [i for i in model.graph.input if i.name not in dropped]
        del model.graph.input[:]
        model.graph.input.extend(inputs)


class Variants:
    """Builds the per-family models of one source from its full W8A8 QDQ file (each loaded once)."""

    def __init__(self, source: Path, quantized: Path, fams: Families) -> None:
        self.float_model = _load_full(source)
        self.found = _scan(onnx.load(str(quantized), load_external_data=True), fams)

    def counts(self) -> dict[str, int]:
        """Quantized edges per family (a family with none would score exactly float)."""
        return {family: len(self.found.edges.get(family, [])) for family in FAMILIES if family not in GROUPS}

    def model(self, *chosen: str) -> onnx.ModelProto:
        """The float model holding the quantizers of the ``chosen`` families only (all of them: the W8A8 model)."""
        unknown = [f for f in chosen if f not in FAMILIES]
        if unknown:
            raise InputError(f"unknown sensitivity family '{unknown[0]}': choose from {', '.join(FAMILIES)}")
        return _assemble(self.float_model, self.found, chosen)
