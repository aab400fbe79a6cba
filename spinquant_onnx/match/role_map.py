"""Role maps: what the matcher found, as editable JSON, and a checked way to use a map instead of matching.

Every entry names graph objects by tensor names (a node by its first output, which ONNX keeps unique),
so a map written by ``inspect --json`` and read back by ``rotate --roles`` rebuilds exactly the same
stream, and therefore the same output bytes. A hand-written map is checked before anything is rewritten:
every tensor and node must exist with the shape its role needs, and each residual segment must be
consistent (every writer's Add reads the stream and the writer; every norm reads the stream). A map can
still assert something false about an op the matcher does not know, so a run with a map always
validates the result in ONNX Runtime unless the caller explicitly trusts it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spinquant_onnx.errors import InputError, UnsupportedGraphError
from spinquant_onnx.graph.index import GraphIndex
from spinquant_onnx.graph.ops import SCALAR_OPS, TRANSPARENT_OPS
from spinquant_onnx.match.linears import Linear, behind_rows, expert_linear_at, linear_at, weight_behind
from spinquant_onnx.match.norms import NormMatch, find_norms
from spinquant_onnx.match.residual import Embedding, Residual, Stream, stream_centered
from spinquant_onnx.match.roles import Roles, assign_roles
from spinquant_onnx.match.routing import routed_writers

SCHEMA = "spinquant-onnx/roles"
VERSION = 1


def _layout(linear: Linear) -> str:
    if linear.experts:
        return "[E,in,out]" if linear.in_axis == 1 else "[E,out,in]"
    return "[in,out]" if linear.in_axis == 0 else "[out,in]"


def _linear_entry(role: str, linear: Linear) -> dict[str, Any]:
    return {
        "role": role,
        "node": linear.node.name,
        "node_output": linear.node.output[0],
        "op": linear.node.op_type,
        "weight": linear.weight,
        "layout": _layout(linear),
        "in_features": linear.in_features,
        "out_features": linear.out_features,
        "bias": linear.bias,
        "output": linear.output,
        **({"experts": linear.experts} if linear.experts else {}),
    }


def _norm_entry(norm: NormMatch, store) -> dict[str, Any]:
    return {
        "kind": norm.kind,
        "inputs": list(norm.inputs),
        "output": norm.output,
        "gamma": norm.gamma,
        "gamma_offset": norm.gamma_offset,
        "sum_output": norm.sum_output,
        "bias": norm.bias,
        "shape": [norm.width] if norm.width is not None else list(store.shape(norm.gamma)),
        # A LayerNorm: the stream is centred, the norm becomes an RMSNorm, beta ("shift") goes into the readers' biases.
        **({"centered": True, "shift": norm.shift, "eps": norm.eps} if norm.centered else {}),
    }


def export_roles(index: GraphIndex, stream: Stream, roles: Roles) -> dict[str, Any]:
    """The documented, versioned JSON form of a matched stream (see README, "Role maps")."""
    role_of = {id(entry.linear): entry.role for entry in roles.all_linears()}
    residual: list[dict[str, Any]] = []
    for event in stream.events:
        if event.kind == "norm":
            residual.append({
                "kind": "norm",
                "norm": _norm_entry(event.norm, index.store),
                "readers": [_linear_entry(role_of.get(id(lin), "reader"), lin) for lin in event.readers],
            })
        elif event.kind == "read":
            residual.append({
                "kind": "read",
                "input": event.input,
                "readers": [_linear_entry(role_of.get(id(lin), "reader"), lin) for lin in event.readers],
            })
        elif event.online is not None:
            residual.append({
                "kind": "write",
                "online": event.online,
                "post_norm": _norm_entry(event.online_norm, index.store),
                "add_output": event.add.output[0],
            })
        elif event.table is not None:  # learned position embeddings: a table row added into the stream
            residual.append({
                "kind": "write",
                "table": {"gather_output": event.table.output, "table": event.table.table},
                "add_output": event.add.output[0],
            })
        else:
            residual.append({
                "kind": "write",
                "writer": _linear_entry(role_of.get(id(event.writer), "writer"), event.writer),
                "add_output": event.add.output[0],
            })
    embedding = None
    if stream.embedding is not None:
        emb = stream.embedding
        embedding = {
            "gather_output": emb.output,
            "table": emb.table,
            "layout": "[V,H]" if emb.hidden_axis == 1 else "[H,V]",
            "shape": list(index.store.shape(emb.table)),
        }
    lm_head = [e.linear.weight for e in roles.final.readers] if roles.final else []
    return {
        "schema": SCHEMA,
        "version": VERSION,
        "hidden_size": stream.hidden,
        "embedding": embedding,
        "tied": bool(embedding and embedding["table"] in lm_head),
        "entries": list(stream.entries),
        "residual": residual,
        "blocks": [
            {"number": block.number, "parts": [part.kind for part in block.parts]} for block in roles.blocks
        ],
    }


def write_roles(data: dict[str, Any], path: str | Path) -> None:
    target = Path(path)
    tmp = target.with_name(f".{target.name}.partial")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(target)


def read_roles(source: str | Path | dict[str, Any]) -> dict[str, Any]:
    if isinstance(source, dict):
        data = source
    else:
        try:
            data = json.loads(Path(source).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"role map {source}: cannot read JSON ({exc})") from exc
    if data.get("schema") != SCHEMA or data.get("version") != VERSION:
        raise InputError(
            f"role map: expected schema '{SCHEMA}' version {VERSION}, got '{data.get('schema')}' "
            f"version {data.get('version')}"
        )
    return data


class _Checker:
    """Resolves map entries against the graph; every failure names the entry it came from."""

    def __init__(self, index: GraphIndex, hidden: int) -> None:
        self.index = index
        self.hidden = hidden
        self.norms = {norm.output: norm for norm in find_norms(index)}

    def fail(self, where: str, what: str) -> InputError:
        return InputError(f"role map entry {where}: {what}")

    def linear(self, entry: dict[str, Any], where: str, reader: bool) -> Linear:
        node = self.index.producer.get(entry.get("node_output", ""))
        if node is None:
            raise self.fail(where, f"no node produces '{entry.get('node_output')}'")
        found = linear_at(self.index, node) if not entry.get("experts") else expert_linear_at(self.index, node)
        if found is None:
            raise self.fail(where, f"node '{node.name or node.output[0]}' is not a MatMul/Gemm with a constant weight"
                            + (" gathered per expert" if entry.get("experts") else ""))
        if entry.get("weight") != found.weight:
            raise self.fail(where, f"weight is '{found.weight}' in the graph, not '{entry.get('weight')}'")
        if entry.get("layout", _layout(found)) != _layout(found):
            raise self.fail(where, f"weight '{found.weight}' has layout {_layout(found)}, not {entry.get('layout')}")
        features = found.in_features if reader else found.out_features
        if features != self.hidden:
            side = "input" if reader else "output"
            raise self.fail(where, f"weight '{found.weight}' has {features} {side} features, hidden size is "
                            f"{self.hidden}")
        return found

    def norm(self, entry: dict[str, Any], where: str) -> NormMatch:
        known = self.norms.get(entry.get("output", ""))
        if known is not None:
            if known.gamma != entry.get("gamma"):
                raise self.fail(where, f"norm output '{known.output}' is scaled by '{known.gamma}', not "
                                f"'{entry.get('gamma')}'")
            return known
        gamma = entry.get("gamma", "")
        if not self.index.is_initializer(gamma):
            raise self.fail(where, f"gamma '{gamma}' is not an initializer")
        if self.index.store.shape(gamma) != (self.hidden,):
            raise self.fail(where, f"gamma '{gamma}' has shape {list(self.index.store.shape(gamma))}, "
                            f"expected [{self.hidden}]")
        uses = self.index.users(gamma)
        if len(uses) != 1:
            raise self.fail(where, f"gamma '{gamma}' is read by {len(uses)} nodes; a user-declared norm needs one")
        output = entry.get("output", "")
        producer = self.index.producer.get(output)
        if producer is None:
            raise self.fail(where, f"no node produces norm output '{output}'")
        inputs = tuple(entry.get("inputs", []))
        for name in inputs:
            if name not in self.index.producer and name not in self.index.graph_inputs:
                raise self.fail(where, f"norm input '{name}' does not exist")
        return NormMatch(kind="user-declared", inputs=inputs, output=output, gamma=gamma, gamma_use=uses[0],
                         gamma_offset=float(entry.get("gamma_offset", 0.0)), nodes=[producer])

    def embedding(self, entry: dict[str, Any]) -> Embedding:
        node = self.index.producer.get(entry.get("gather_output", ""))
        if node is None or node.op_type != "Gather":
            raise self.fail("embedding", f"'{entry.get('gather_output')}' is not produced by a Gather")
        ref = weight_behind(self.index, node, 0)
        if ref is None or ref.name != entry.get("table"):
            raise self.fail("embedding", f"the Gather reads '{ref.name if ref else '?'}', not '{entry.get('table')}'")
        hidden_axis = 0 if ref.transposed else 1
        if self.index.store.shape(ref.name)[hidden_axis] != self.hidden:
            raise self.fail("embedding", f"table '{ref.name}' does not have {self.hidden} hidden features")
        return Embedding(node, ref.name, ref.use, hidden_axis, node.output[0])


def _aliases(index: GraphIndex, names: set[str]) -> set[str]:
    """Tensors equal to a stream tensor up to a Cast/Identity/quantizer or a scalar scale (Gemma's sqrt(H))."""
    result, frontier = set(names), list(names)
    while frontier:
        for use in index.users(frontier.pop()):
            scalar = use.node.op_type in SCALAR_OPS and index.scalar(use.node.input[1]) is not None
            if (use.node.op_type in TRANSPARENT_OPS or scalar) and use.index == 0:
                for out in use.node.output[:1]:
                    if out not in result:
                        result.add(out)
                        frontier.append(out)
    return result


def import_roles(index: GraphIndex, data: dict[str, Any]) -> tuple[Stream, Roles]:
    """Rebuild the stream a map describes, checking it against the graph before any rewrite."""
    data = read_roles(data)
    hidden = data.get("hidden_size")
    if isinstance(hidden, bool) or not isinstance(hidden, int) or hidden <= 0:
        raise InputError(f"role map entry hidden_size: must be a positive integer, got {json.dumps(hidden)}")
    check = _Checker(index, hidden)
    embedding = check.embedding(data["embedding"]) if data.get("embedding") else None
    entries = list(data.get("entries", []))
    for name in entries:
        if name not in index.graph_inputs:
            raise check.fail("entries", f"'{name}' is not a graph input")
    if embedding is None and not entries:
        raise check.fail("embedding", "a map needs an embedding or at least one entry (inputs_embeds)")
    stream = _aliases(index, {embedding.output} if embedding else set(entries))
    events: list[Residual] = []
    given: dict[str, str] = {}
    for number, item in enumerate(data.get("residual", [])):
        where = f"residual[{number}]"
        if item.get("kind") == "norm":
            events.append(_norm_event(index, check, item, where, stream, given))
        elif item.get("kind") == "read":
            events.append(_read_event(check, item, where, stream, given))
        elif item.get("kind") == "write":
            events.append(_write_event(index, check, item, where, stream, given))
        else:
            raise check.fail(where, f"kind must be 'norm', 'read' or 'write', not {item.get('kind')!r}")
    result = Stream(hidden, embedding, entries, events, stream, stream_centered(events))
    return result, assign_roles(index, result, given)



def _norm_event(
    index: GraphIndex, check: _Checker, item: dict[str, Any], where: str, stream: set[str], given: dict[str, str]
) -> Residual:
    """A map's norm entry, checked; its readers' roles go to ``given``, a Skip norm's sum joins ``stream``."""
    norm = check.norm(item.get("norm", {}), where)
    if not any(name in stream for name in norm.inputs):
        raise check.fail(where, f"norm '{norm.output}' does not read the residual stream "
                         f"(inputs {list(norm.inputs)})")
    readers = []
    for slot, reader in enumerate(item.get("readers", [])):
        found = check.linear(reader, f"{where}.readers[{slot}]", reader=True)
        given[found.node.output[0]] = reader.get("role", "reader")
        readers.append(found)
    if norm.sum_output:
        stream |= _aliases(index, {norm.sum_output})
    return Residual("norm", norm=norm, readers=readers)


def _routed_or_none(index: GraphIndex, tensor: str, add, hidden: int) -> list[Linear]:
    try:
        return routed_writers(index, tensor, add, hidden)
    except UnsupportedGraphError:
        return []


def _read_event(
    check: _Checker, item: dict[str, Any], where: str, stream: set[str], given: dict[str, str]
) -> Residual:
    """A map's raw-stream read (lm_head with no final norm): linears taking a stream tensor as it is."""
    tensor = item.get("input", "")
    if tensor not in stream:
        raise check.fail(where, f"'{tensor}' is not a residual stream tensor")
    readers = []
    for slot, reader in enumerate(item.get("readers", [])):
        found = check.linear(reader, f"{where}.readers[{slot}]", reader=True)
        given[found.node.output[0]] = reader.get("role", "reader")
        readers.append(found)
    return Residual("read", readers=readers, input=tensor)


def _write_event(
    index: GraphIndex, check: _Checker, item: dict[str, Any], where: str, stream: set[str], given: dict[str, str]
) -> Residual:
    """A map's write entry (a writer linear, or an online write after a sandwich norm), checked."""
    add = index.producer.get(item.get("add_output", ""))
    if add is None:
        raise check.fail(where, f"no node produces '{item.get('add_output')}'")
    operands = [index.see_through_back(name) for name in add.input[:2]]
    if not any(name in stream for name in add.input[:2]):
        raise check.fail(where, f"Add '{add.output[0]}' does not read the residual stream")
    if "table" in item:
        table = check.embedding(item["table"])
        if table.output not in operands:
            raise check.fail(where, f"Add '{add.output[0]}' does not read table rows '{table.output}'")
        event = Residual("write", add=add, table=table)
    elif "online" in item:
        online = item["online"]
        post = check.norms.get(item.get("post_norm", {}).get("output", online))
        if index.see_through_back(online) not in operands or post is None:
            raise check.fail(where, f"Add '{add.output[0]}' does not read a norm output '{online}'")
        event = Residual("write", add=add, online=online, online_norm=post)
    else:
        writer = check.linear(item.get("writer", {}), f"{where}.writer", reader=False)
        given[writer.node.output[0]] = item["writer"].get("role", "writer")
        behind = {behind_rows(index, name, check.hidden) for name in add.input[:2]}  # GPT-2's Gemm + Reshape
        if writer.output not in operands and index.see_through_back(writer.output) not in {*operands, *behind}:
            routed = {lin.node.output[0]: lin for name in add.input[:2] if name not in stream
                      for lin in _routed_or_none(index, name, add, check.hidden)}
            if writer.node.output[0] not in routed:  # MoE: the writer reaches the Add through token routing
                raise check.fail(where, f"Add '{add.output[0]}' does not read writer output '{writer.output}'")
            writer = routed[writer.node.output[0]]  # with a gathered expert bias, if any
        event = Residual("write", writer=writer, add=add)
    if add.op_type == "Add":
        stream |= _aliases(index, {add.output[0]})
    return event
