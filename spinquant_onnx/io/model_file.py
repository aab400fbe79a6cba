"""Reading and writing ONNX models without holding every weight in memory.

Initializers stored as external data are memory-mapped and read one at a time; the writer lays the output
file out up front and each rewritten tensor is computed straight into its bytes (``io.output_map``), so peak
memory stays near the largest single tensor rather than the model's size. Output is written to a hidden
staging folder beside the destination and renamed into place at the end (see ``io.staging``), so a failed
or killed run leaves either the previous output or none, never a partial one. Every problem with the input
file surfaces as one ``InputError``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import onnx
from onnx import TensorProto

from spinquant_onnx.errors import InputError, SpinQuantError
from spinquant_onnx.io.output_map import MappedOutput, TensorFill, TensorSource, copy_fill, fill_tensor
from spinquant_onnx.io.protowire import WireError, lazy_load, write_embedded
from spinquant_onnx.io.tensor_data import (  # noqa: F401 - re-exported: callers import them from here
    SUB_BYTE_BITS,
    np_dtype,
    raw_bytes,
    set_tensor_data,
    storage_nbytes,
    type_name,
)

PROTOBUF_LIMIT = 2**31 - 1
# Leave headroom for the graph itself when deciding whether weights fit inside one protobuf.
EMBED_LIMIT = 1_800_000_000
ALIGN = 64
INLINE_BYTES = 1024
# More elements than any real tensor: guards the size arithmetic against hostile dims.
MAX_ELEMENTS = 1 << 48


def one_line(text: object) -> str:
    """A message squeezed onto one line (library errors often span several)."""
    return " ".join(str(text).split())


# ----------------------------------------------------------------------------------------------- reading


def load_model(path: str | os.PathLike, *, lazy: bool = False) -> onnx.ModelProto:
    """Parse the graph only (weights stay on disk) and check it is a whole, well-formed model.

    ``lazy`` leaves an embedded model's large payloads in the file too (``io.protowire``): they appear as
    external data pointing into the .onnx itself (``protowire.reads_own_file``), read like any other.

    Checks what a later step would otherwise trip over mid-write: a graph that is not topologically
    sorted or reads a tensor nothing produces (truncated or edited files), initializers whose bytes do not
    match their shape, and external data that is missing or lies outside the model's folder.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file")
    if path.is_dir():
        raise InputError(f"{path}: is a folder; pass the .onnx file inside it")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise InputError(f"{path}: empty file, not an ONNX model")
    if path.suffix == ".data":
        raise InputError(_data_file_message(path))
    if size > PROTOBUF_LIMIT:
        raise InputError(
            f"{path}: {size / 2**30:.1f} GiB is over protobuf's 2 GiB limit, so it cannot be one ONNX model; "
            "a model this large must keep its weights in external data files"
        )
    try:
        model = _parse(path, lazy)
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({one_line(exc.strerror or exc)})") from exc
    except Exception as exc:  # protobuf and onnx raise several unrelated types for malformed files
        raise InputError(f"{path}: not a valid ONNX model (truncated or corrupt file?): {one_line(exc)}") from exc
    check_model_structure(model, path)
    check_initializers(model, path.parent)
    return model


def _parse(path: Path, lazy: bool) -> onnx.ModelProto:
    if lazy:
        try:
            return lazy_load(path)
        except (WireError, Exception):  # noqa: BLE001 - odd layout or corrupt: onnx's parser then says which
            pass
    return onnx.load(str(path), load_external_data=False)


def _data_file_message(path: Path) -> str:
    """What to say when the external data file was passed instead of its model: name the model if it is found."""
    stem = path.name.split(".onnx", 1)[0]
    beside = sorted(path.parent.glob("*.onnx"), key=lambda p: (p.name.split(".onnx", 1)[0] != stem, p.name))
    for candidate in beside[:32]:
        try:
            model = onnx.load(str(candidate), load_external_data=False)
        except Exception:  # noqa: BLE001 - any unreadable neighbour is simply not the owner
            continue
        locations = {
            entry.value
            for tensor in model.graph.initializer
            if tensor.data_location == TensorProto.EXTERNAL
            for entry in tensor.external_data
            if entry.key == "location"
        }
        if path.name in locations:
            return f"{path}: this is the external data file of {candidate}; pass {candidate.name} instead"
    return (
        f"{path}: looks like an external data file (raw tensor bytes), not an ONNX model; "
        "pass the .onnx file that uses it"
    )


def check_model_structure(model: onnx.ModelProto, path: Path) -> None:
    """Refuse files that parsed as a protobuf but are not a complete, topologically sorted ONNX graph."""
    if not model.HasField("graph") or not model.graph.node:
        raise InputError(f"{path}: not an ONNX model (no graph nodes; truncated or not an .onnx file?)")
    if not any(o.domain in ("", "ai.onnx") for o in model.opset_import):
        raise InputError(f"{path}: the model imports no ONNX opset (truncated or corrupt file?)")
    _check_text(model, path)
    graph = model.graph
    names = [t.name for t in graph.initializer]
    if len(set(names)) != len(names):
        twice = next(n for n in names if names.count(n) > 1)
        raise InputError(f"{path}: initializer '{twice}' is defined twice; the graph is corrupt")
    known = {i.name for i in graph.input} | set(names)
    known |= {t.values.name for t in graph.sparse_initializer}
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    for node in graph.node:
        _check_arity(node, opset, path)
        for name in node.input:
            if name and name not in known:
                raise InputError(
                    f"{path}: node {_label(node)} reads '{name}', which no earlier node, initializer or graph "
                    "input produces (graph truncated, edited or not topologically sorted)"
                )
        for name in node.output:
            if not name:
                continue
            if name in known:
                raise InputError(
                    f"{path}: tensor '{name}' is produced twice (again by node {_label(node)}); the graph is corrupt"
                )
            known.add(name)
    for output in graph.output:
        if output.name not in known:
            raise InputError(f"{path}: graph output '{output.name}' is produced by no node (truncated graph?)")


def _check_text(model: onnx.ModelProto, path: Path) -> None:
    """Names must be valid UTF-8: protobuf hands back bytes for corrupt ones, which nothing downstream expects."""
    graph = model.graph
    texts: list[object] = [o.domain for o in model.opset_import]
    for node in graph.node:
        texts += [node.name, node.op_type, node.domain, *node.input, *node.output, *(a.name for a in node.attribute)]
    for tensor in graph.initializer:
        texts += [tensor.name, *(e.key for e in tensor.external_data), *(e.value for e in tensor.external_data)]
    texts += [v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info)]
    bad = next((t for t in texts if not isinstance(t, str)), None)
    if bad is not None:
        raise InputError(f"{path}: the graph holds a name that is not valid UTF-8 ({bad[:40]!r}); the file is corrupt")


def _check_arity(node: onnx.NodeProto, opset: int, path: Path) -> None:
    """Standard ops must have as many inputs and outputs as their schema allows (matchers index them)."""
    if node.domain not in ("", "ai.onnx"):
        return
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except Exception:  # noqa: BLE001 - unknown op or not in this opset: onnxruntime will say so
        return
    for what, count, low, high in (
        ("inputs", len(node.input), schema.min_input, schema.max_input),
        ("outputs", len(node.output), schema.min_output, schema.max_output),
    ):
        if not low <= count <= high:
            allowed = str(low) if low == high else f"{low} to {high}"
            raise InputError(
                f"{path}: node {_label(node)} has {count} {what}, {node.op_type} takes {allowed} "
                "(corrupt or edited graph)"
            )


def _label(node: onnx.NodeProto) -> str:
    first = node.output[0] if node.output else ""
    return f"'{node.name}' ({node.op_type})" if node.name else f"{node.op_type} -> '{first}'"


def check_initializers(model: onnx.ModelProto, base_dir: Path | None) -> None:
    """Every initializer has a known type, sane dims and exactly the bytes its shape needs, on disk or inline."""
    for tensor in model.graph.initializer:
        dims = list(tensor.dims)
        if any(d < 0 for d in dims) or math.prod(max(d, 0) for d in dims) > MAX_ELEMENTS:
            raise InputError(f"initializer '{tensor.name}': invalid shape {dims}")
        if tensor.data_type == TensorProto.UNDEFINED:
            raise InputError(f"initializer '{tensor.name}': element type is undefined (corrupt file?)")
        try:
            np_dtype(tensor.data_type)
        except InputError as exc:
            raise InputError(f"initializer '{tensor.name}': {exc} (corrupt file?)") from exc
        if tensor.data_location == TensorProto.EXTERNAL:
            external_span(tensor, base_dir)
        elif tensor.HasField("raw_data") and tensor.data_type != TensorProto.STRING:
            expected = storage_nbytes(tensor.data_type, dims)
            if len(tensor.raw_data) != expected:
                raise InputError(
                    f"initializer '{tensor.name}': {len(tensor.raw_data)} bytes of data for shape {dims} "
                    f"({type_name(tensor.data_type)}, {expected} bytes expected); the file is corrupt"
                )
    for tensor, where in _other_tensors(model.graph):
        if tensor.data_location == TensorProto.EXTERNAL:
            raise InputError(
                f"tensor '{tensor.name}' in {where} uses external data, which is only supported for initializers "
                "of the main graph; re-save the model with onnx.save(..., save_as_external_data=True)"
            )


def _other_tensors(graph: onnx.GraphProto, top: bool = True) -> Iterator[tuple[TensorProto, str]]:
    """Tensors outside the main graph's initializer list: node attributes, subgraphs, sparse initializers."""
    if not top:
        for tensor in graph.initializer:
            yield tensor, f"a subgraph of '{graph.name}'"
    for sparse in graph.sparse_initializer:
        yield sparse.values, "a sparse initializer"
        yield sparse.indices, "a sparse initializer"
    for node in graph.node:
        for attr in node.attribute:
            where = f"attribute '{attr.name}' of node {_label(node)}"
            if attr.HasField("t"):
                yield attr.t, where
            for tensor in attr.tensors:
                yield tensor, where
            if attr.HasField("sparse_tensor"):
                yield attr.sparse_tensor.values, where
            subgraphs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            for subgraph in subgraphs:
                yield from _other_tensors(subgraph, top=False)


def _external_info(tensor: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


def resolve_location(tensor: TensorProto, base_dir: Path | None) -> Path:
    """The file holding an external tensor, refusing anything outside ``base_dir`` (``..``, absolute, links)."""
    location = _external_info(tensor).get("location", "")
    where = f"initializer '{tensor.name}': external data path {location!r}"
    if base_dir is None:
        raise InputError(f"{where} but the model's folder is unknown; pass a file path")
    if not location or "\0" in location or os.path.isabs(location) or ".." in Path(location).parts:
        raise InputError(f"{where} points outside the model's folder; refusing to read it")
    base = base_dir.resolve()
    path = (base / location).resolve()
    if base not in path.parents:
        raise InputError(f"{where} points outside the model's folder (through a link); refusing to read it")
    if not path.exists():
        raise InputError(f"{where}: file is missing; copy it beside the model")
    if not path.is_file():
        raise InputError(f"{where} is not a regular file")
    return path


def external_span(tensor: TensorProto, base_dir: Path | None) -> tuple[Path, int, int]:
    """(file, offset, length) of an external tensor, checked against its shape and the file's size."""
    info = _external_info(tensor)
    path = resolve_location(tensor, base_dir)
    expected = storage_nbytes(tensor.data_type, tensor.dims)
    try:
        offset = int(info.get("offset", "0") or 0)
        length = int(info.get("length", str(expected)) or expected)
    except ValueError as exc:
        raise InputError(f"initializer '{tensor.name}': external data offset/length is not a number") from exc
    size = path.stat().st_size
    if offset < 0 or length != expected or offset + expected > size:
        raise InputError(
            f"initializer '{tensor.name}': external data file '{info.get('location')}' ({size} bytes) does not hold "
            f"{expected} bytes at offset {offset} for shape {list(tensor.dims)} ({type_name(tensor.data_type)}); "
            "the data file is truncated or belongs to another model"
        )
    return path, offset, expected


def external_files(model: onnx.ModelProto, base_dir: Path) -> set[Path]:
    """The resolved data files a model's initializers live in."""
    return {resolve_location(t, base_dir) for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL}


# ----------------------------------------------------------------------------------------------- writing


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    tensor_values: TensorSource,
    *,
    fill: TensorFill | None = None,
    external: bool | None = None,
    data_name: str | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write ``model`` to ``path`` (in a staging folder), each initializer's values computed into place.

    ``fill(name, out)`` writes an initializer's final values into ``out``, a view of the output file's
    bytes (``io.output_map``), so a caller can compute rewritten tensors lazily, in chunks, straight into
    the file; without it, ``tensor_values(name)`` arrays are copied there. Both are called once per
    initializer, in graph order (``tensor_values`` alone for strings, packed types and small tensors kept
    inline). With external data, every tensor of 1 KB or more (strings excepted) goes to ``data_name``
    (default ``<name>.data``) beside the model; with none that large, no data file is written. Files are
    synced to disk before returning. Returns the files written, the model first.
    """
    path = Path(path)
    try:
        return _save_model(
            model,
            path,
            tensor_values,
            fill or copy_fill(tensor_values),
            external,
            data_name or path.name + ".data",
            progress,
        )
    except OSError as exc:
        raise SpinQuantError(f"{path.parent}: writing the output failed ({one_line(exc.strerror or exc)})") from exc


def _save_model(
    model: onnx.ModelProto,
    path: Path,
    tensor_values: TensorSource,
    fill: TensorFill,
    external: bool | None,
    data_name: str,
    progress: Callable[[int], None] | None,
) -> list[Path]:
    if external is None:
        external = sum(storage_nbytes(t.data_type, t.dims) for t in model.graph.initializer) > EMBED_LIMIT
    if not external and write_embedded(model, path, tensor_values, fill, progress):
        return [path]
    header = onnx.ModelProto()
    header.CopyFrom(model)
    if external:
        written = [path, *_write_external(header, path.parent / data_name, tensor_values, fill, progress)]
    else:  # this protobuf runtime does not serialize in field order: the slow way
        for tensor in header.graph.initializer:
            set_tensor_data(tensor, tensor_values(tensor.name))
        written = [path]
    with open(path, "wb") as handle:
        handle.write(header.SerializeToString())
        handle.flush()
        os.fsync(handle.fileno())
    return written


def _inline(tensor: TensorProto) -> bool:
    """Strings (no raw layout) and small tensors (shapes, axes, scalars) stay inline as onnx.save does:
    onnxruntime's shape inference cannot read a Reshape shape from a file."""
    if tensor.data_type == TensorProto.STRING:
        return True
    return math.prod(tensor.dims) * np_dtype(tensor.data_type).itemsize < INLINE_BYTES


def _write_external(
    header: onnx.ModelProto,
    data_path: Path,
    tensor_values: TensorSource,
    fill: TensorFill,
    progress: Callable[[int], None] | None,
) -> list[Path]:
    """Lay out every tensor of 1 KB or more in ``data_path`` (64-byte aligned), fill them in place, and point
    ``header``'s initializers at them."""
    placed: list[tuple[TensorProto, int]] = []
    end = 0
    for tensor in header.graph.initializer:
        if _inline(tensor):
            set_tensor_data(tensor, tensor_values(tensor.name))
            continue
        end += (-end) % ALIGN
        placed.append((tensor, end))
        end += storage_nbytes(tensor.data_type, tensor.dims)
    if not placed:  # every tensor was small enough to stay inline: no data file to ship
        return []
    with MappedOutput(data_path, end) as out:
        for tensor, offset in placed:
            length = fill_tensor(out, offset, tensor, tensor_values, fill)
            dims, data_type, name = list(tensor.dims), tensor.data_type, tensor.name
            tensor.Clear()
            tensor.name, tensor.data_type = name, data_type
            tensor.dims.extend(dims)
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", data_path.name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            if progress:
                progress(length)
    return [data_path]
