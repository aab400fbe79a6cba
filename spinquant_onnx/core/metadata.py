"""Rotated models carry what was done to them in ``metadata_props`` (#13), and are not rotated twice.

A Hadamard is its own inverse, so rotating a rotated model again quietly *undoes* R1 (and validation
passes, since the function is unchanged): without a mark, nothing says which file is which. Every
output therefore records the tool version, the rotation (kind, seed, order, block size), R2/R3/R4,
smoothing's alpha, the float-channel count and the names of every online node; ``rotate`` refuses a
marked model unless ``force`` is given, and ``inspect`` shows the record.
"""

from __future__ import annotations

import json
from typing import Any

import onnx

from spinquant_onnx.errors import InputError

PREFIX = "spinquant_onnx."
INSERTED_PREFIX = "spinquant/"


def _version() -> str:
    from spinquant_onnx import __version__

    return __version__


def record(model: onnx.ModelProto, report: dict[str, Any]) -> dict[str, str]:
    """The metadata entries for a model rewritten as ``report`` (``Report.to_dict()``) says."""
    rotation = report.get("rotation", {})
    online = [node.name for node in model.graph.node if node.name.startswith(INSERTED_PREFIX)]
    split = rotation.get("float_channels") or []
    entries = {
        "version": _version(),
        "rotation": str(rotation.get("kind")),
        "seed": "none" if rotation.get("seed") is None else str(rotation.get("seed")),  # plain Hadamard: unseeded
        "order": str(rotation.get("n")),
        "block_size": str(rotation.get("block_size")),
        "precision": str(rotation.get("precision")),
        "r2": json.dumps(bool(rotation.get("r2"))),
        "r3": json.dumps(bool(rotation.get("r3"))),
        "r4": json.dumps(bool(rotation.get("r4"))),
        "rotation_file": json.dumps(rotation.get("rotation_file")),
        "smooth": json.dumps(rotation["smooth"]["alpha"] if rotation.get("smooth") else None),
        "float_channels": json.dumps(len(split[0]["channels"]) if split else 0),
        "online_nodes": json.dumps(online),
    }
    return {PREFIX + key: value for key, value in entries.items()}


def stamp(model: onnx.ModelProto, report: dict[str, Any]) -> None:
    """Write (or replace, under ``force``) the rotation record into ``model.metadata_props``."""
    entries = record(model, report)
    kept = [p for p in model.metadata_props if not p.key.startswith(PREFIX)]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in entries.items():
        model.metadata_props.add(key=key, value=value)


def read(model: onnx.ModelProto) -> dict[str, Any] | None:
    """The rotation record of a model rotated by this tool, or None."""
    found = {p.key[len(PREFIX):]: p.value for p in model.metadata_props if p.key.startswith(PREFIX)}
    if not found:
        return None
    for key in ("r2", "r3", "r4", "online_nodes", "rotation_file", "smooth", "float_channels"):
        if key in found:
            try:
                found[key] = json.loads(found[key])
            except ValueError:
                pass
    return found


def refuse_rotated(model: onnx.ModelProto, where: str, force: bool) -> None:
    """Refuse (exit 2) a model this tool already rotated, unless ``force``."""
    if force:
        return
    done = read(model)
    online = [n.name for n in model.graph.node if n.name.startswith(INSERTED_PREFIX)]
    if done is None and not online:
        return
    what = (
        f"rotated by spinquant-onnx {done.get('version', '?')} ({done.get('rotation', '?')} R1 of order "
        f"{done.get('order', '?')}, seed {done.get('seed', '?')})"
        if done is not None
        else f"holds {len(online)} online rotation node(s) of spinquant-onnx (e.g. '{online[0]}')"
    )
    raise InputError(
        f"{where}: this model was already {what}; rotating it again would undo or compound that rotation: "
        "rotate the original export, or pass --force (force=True) to rotate it anyway"
    )


def describe(done: dict[str, Any]) -> str:
    """One line for ``inspect``."""
    extras = [name for name in ("r2", "r3", "r4") if done.get(name) is True]
    online = done.get("online_nodes") or []
    return (
        f"rotated by spinquant-onnx {done.get('version', '?')}: R1 {done.get('rotation', '?')} "
        f"(order {done.get('order', '?')}, seed {done.get('seed', '?')}, block size {done.get('block_size', '?')})"
        + (f", {'/'.join(e.upper() for e in extras)}" if extras else "")
        + f", {len(online)} online node(s)"
    )
