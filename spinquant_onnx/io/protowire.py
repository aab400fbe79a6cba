"""The protobuf wire format by hand, for embedded models: read without parsing the weights, write streaming.

An .onnx file with embedded weights is one protobuf message; ``onnx.load`` parses all of it (the file's
bytes plus a parsed copy: 2x its size), and ``SerializeToString`` builds the whole output in memory again.
Here the file is memory-mapped and scanned field by field: each large initializer's ``raw_data`` is left
in the file and the tensor is marked as external data pointing *into the .onnx itself* (at the payload's
offset), so the rest of the tool streams it exactly like external data. On output the model is laid out
field by field in protobuf's own order (field numbers ascending) and each initializer's payload is computed
straight into its place in the file: the bytes are exactly those of ``SerializeToString``
(``tests/test_protowire.py``), with no copy of the model in memory.
"""

from __future__ import annotations

import functools
import mmap
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto

from spinquant_onnx.io.output_map import MappedOutput, TensorFill, TensorSource, copy_fill, fill_tensor
from spinquant_onnx.io.tensor_data import np_dtype, raw_bytes, set_tensor_data, storage_nbytes

# Initializers with at least this many bytes of raw_data are left in the file when reading.
LAZY_MIN_BYTES = 4096
_LEN = 2  # wire type of length-delimited fields
# Field numbers (onnx.proto): ModelProto.graph, GraphProto.initializer, TensorProto.raw_data.
MODEL_GRAPH, GRAPH_INITIALIZER, TENSOR_RAW_DATA = 7, 5, 9
# ModelProto fields numbered below graph (serialized before it).
_MODEL_HEAD = ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string")


class WireError(ValueError):
    """The bytes are not the protobuf this scanner expects; callers fall back to onnx.load."""


def varint(value: int) -> bytes:
    out = bytearray()
    while True:
        bits = value & 0x7F
        value >>= 7
        if value:
            out.append(bits | 0x80)
        else:
            out.append(bits)
            return bytes(out)


def _read_varint(buf: mmap.mmap | bytes, pos: int, end: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def fields(buf: mmap.mmap | bytes, start: int, end: int) -> Iterator[tuple[int, int, int, int, int]]:
    """(field number, wire type, field start, value start, value end) of every field in buf[start:end]."""
    pos = start
    while pos < end:
        begin = pos
        key, pos = _read_varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, after = _read_varint(buf, pos, end)
        elif wire == 1:
            after = pos + 8
        elif wire == 5:
            after = pos + 4
        elif wire == _LEN:
            length, pos = _read_varint(buf, pos, end)
            after = pos + length
        else:
            raise WireError(f"unsupported wire type {wire}")
        if number == 0 or after > end:
            raise WireError("truncated or corrupt message")
        yield number, wire, begin, pos, after
        pos = after


def _field(number: int, payload_length: int) -> bytes:
    """Key and length prefix of a length-delimited field."""
    return varint(number << 3 | _LEN) + varint(payload_length)


# ----------------------------------------------------------------------------------------------- reading


def lazy_load(path: Path) -> onnx.ModelProto:
    """Parse ``path`` leaving each large initializer's payload in the file (marked as external data into it).

    Raises WireError when the file is not laid out as expected; the caller then parses it with onnx.
    """
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size == 0:
            raise WireError("empty file")
        with mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return onnx.ModelProto.FromString(_strip(buf, size, path.name))


def _strip(buf: mmap.mmap, size: int, location: str) -> bytes:
    """The model's bytes with large initializer payloads replaced by external_data entries (into ``location``)."""
    pieces: list[bytes] = []
    graphs = 0
    for number, wire, begin, start, end in fields(buf, 0, size):
        if number != MODEL_GRAPH or wire != _LEN:
            pieces.append(buf[begin:end])
            continue
        graphs += 1
        graph = _strip_graph(buf, start, end, location)
        pieces.append(_field(MODEL_GRAPH, len(graph)) + graph)
    if graphs != 1:
        raise WireError("expected one graph")
    return b"".join(pieces)


def _strip_graph(buf: mmap.mmap, start: int, end: int, location: str) -> bytes:
    pieces = []
    for number, wire, begin, value_start, value_end in fields(buf, start, end):
        tensor = None
        if number == GRAPH_INITIALIZER and wire == _LEN:
            tensor = _strip_tensor(buf, value_start, value_end, location)
        if tensor is None:
            pieces.append(buf[begin:value_end])
        else:
            pieces.append(_field(GRAPH_INITIALIZER, len(tensor)) + tensor)
    return b"".join(pieces)


def _strip_tensor(buf: mmap.mmap, start: int, end: int, location: str) -> bytes | None:
    """The tensor without its raw_data, pointing at it in the file; None to keep it as it is."""
    rest, payload = [], None
    for number, wire, begin, value_start, value_end in fields(buf, start, end):
        if number == TENSOR_RAW_DATA and wire == _LEN and payload is None:
            payload = (value_start, value_end - value_start)
        else:
            rest.append(buf[begin:value_end])
    if payload is None or payload[1] < LAZY_MIN_BYTES:
        return None
    tensor = TensorProto.FromString(b"".join(rest))
    if tensor.data_location == TensorProto.EXTERNAL or tensor.HasField("segment") or tensor.external_data:
        return None
    try:
        expected = storage_nbytes(tensor.data_type, tensor.dims)
    except Exception:  # noqa: BLE001 - unknown type: leave it inline, load_model's checks name it
        return None
    if tensor.data_type == TensorProto.STRING or expected != payload[1]:
        return None  # load_model reports the mismatch with the tensor's name
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", str(payload[0])), ("length", str(payload[1]))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor.SerializeToString()


def reads_own_file(model: onnx.ModelProto, path: Path) -> bool:
    """Whether every external tensor of ``model`` lives in the .onnx file itself (a lazily read embedded model)."""
    locations = {
        next((e.value for e in t.external_data if e.key == "location"), "")
        for t in model.graph.initializer
        if t.data_location == TensorProto.EXTERNAL
    }
    return bool(locations) and locations == {path.name}


# ----------------------------------------------------------------------------------------------- writing


@functools.lru_cache(maxsize=64)
def _raw_layout(elem_type: int) -> bool:
    """Whether onnx stores this element type as dims, data_type, name, raw_data (checked on a probe tensor)."""
    try:
        dtype = np_dtype(elem_type)
    except Exception:  # noqa: BLE001
        return False
    if dtype.kind == "O":
        return False
    probe = TensorProto(name="probe", data_type=elem_type, dims=[2, 3])
    values = np.zeros((2, 3), dtype=dtype)
    set_tensor_data(probe, values)
    return probe.SerializeToString() == _tensor_bytes("probe", elem_type, [2, 3], bytes(raw_bytes(values, elem_type)))


def _tensor_head(name: str, elem_type: int, dims: list[int], raw_length: int) -> bytes:
    """A TensorProto's bytes up to its raw_data payload (fields 1-8 and the raw_data key and length)."""
    head = TensorProto(name=name, data_type=elem_type, dims=dims).SerializeToString()
    return head + _field(TENSOR_RAW_DATA, raw_length)


def _tensor_bytes(name: str, elem_type: int, dims: list[int], raw: bytes) -> bytes:
    return _tensor_head(name, elem_type, dims, len(raw)) + raw


def _split_model(header: onnx.ModelProto) -> tuple[bytes, bytes, bytes, bytes] | None:
    """(model fields before graph, graph fields before initializers, graph fields after, model fields after).

    None if this protobuf runtime does not serialize in field order (then the caller uses SerializeToString).
    """
    graph = header.graph
    model_rest = onnx.ModelProto()
    model_rest.CopyFrom(header)
    model_rest.ClearField("graph")
    model_head = onnx.ModelProto()
    for name in _MODEL_HEAD:
        if header.HasField(name):
            setattr(model_head, name, getattr(header, name))
    graph_rest = model_rest.graph  # an empty sub-message to fill without touching header
    graph_rest.CopyFrom(graph)
    del graph_rest.initializer[:]
    graph_head = onnx.GraphProto(name=graph.name)
    graph_head.node.extend(graph.node)
    if not graph.HasField("name"):
        graph_head.ClearField("name")
    rest_bytes = graph_rest.SerializeToString()
    head_bytes = graph_head.SerializeToString()
    model_rest.ClearField("graph")
    model_rest_bytes = model_rest.SerializeToString()
    model_head_bytes = model_head.SerializeToString()
    if not (rest_bytes.startswith(head_bytes) and model_rest_bytes.startswith(model_head_bytes)):
        return None
    return model_head_bytes, head_bytes, rest_bytes[len(head_bytes) :], model_rest_bytes[len(model_head_bytes) :]


def write_embedded(
    header: onnx.ModelProto,
    path: Path,
    tensor_values: TensorSource,
    fill: TensorFill | None = None,
    progress: Callable[[int], None] | None = None,
) -> bool:
    """Write ``header`` with every initializer's values to ``path``, the bytes ``SerializeToString`` would give.

    The file's layout is computed first (every length is known from shapes), then each payload is filled
    in place (``io.output_map``: ``fill(name, out)``, or a copy of ``tensor_values(name)``), in graph order;
    element types with no raw layout (strings) are asked for first: their serialized size depends on their
    values. Returns False, having written nothing, when the field-order check fails.
    """
    parts = _split_model(header)
    if parts is None:
        return False
    fill = fill or copy_fill(tensor_values)
    model_head, graph_head, graph_tail, model_tail = parts
    initializers = list(header.graph.initializer)
    eager: dict[int, bytes] = {}
    lengths = []
    for position, tensor in enumerate(initializers):
        if _raw_layout(tensor.data_type):
            nbytes = storage_nbytes(tensor.data_type, tensor.dims)
            body = len(_tensor_head(tensor.name, tensor.data_type, list(tensor.dims), nbytes)) + nbytes
        else:
            scratch = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=list(tensor.dims))
            set_tensor_data(scratch, tensor_values(tensor.name))
            eager[position] = scratch.SerializeToString()
            body = len(eager[position])
        lengths.append(body)
    graph_length = len(graph_head) + len(graph_tail)
    graph_length += sum(len(_field(GRAPH_INITIALIZER, n)) + n for n in lengths)
    graph_key = _field(MODEL_GRAPH, graph_length)
    with MappedOutput(path, len(model_head) + len(graph_key) + graph_length + len(model_tail)) as out:
        pos = 0
        for piece in (model_head, graph_key, graph_head):
            out.put(pos, piece)
            pos += len(piece)
        for position, (tensor, length) in enumerate(zip(initializers, lengths, strict=True)):
            key = _field(GRAPH_INITIALIZER, length)
            out.put(pos, key)
            pos += len(key)
            if position in eager:
                out.put(pos, eager[position])
                pos += length
                continue
            nbytes = storage_nbytes(tensor.data_type, tensor.dims)
            head = _tensor_head(tensor.name, tensor.data_type, list(tensor.dims), nbytes)
            out.put(pos, head)
            pos += len(head)
            written = fill_tensor(out, pos, tensor, tensor_values, fill)
            pos += written
            if progress:
                progress(written)
        for piece in (graph_tail, model_tail):
            out.put(pos, piece)
            pos += len(piece)
    return True
