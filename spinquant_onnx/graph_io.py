"""Reading and writing ONNX models without holding every weight in memory.

Initializers stored as external data are memory-mapped and read one at a time; the writer streams each
rewritten tensor to disk as it is produced, so peak memory stays near the largest single tensor rather
than the model's size. Output always goes to a temporary file in the destination folder and is renamed
at the end, so a failed or killed run leaves no partial model behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from spinquant_onnx.errors import InputError

PROTOBUF_LIMIT = 2**31 - 1
# Leave headroom for the graph itself when deciding whether weights fit inside one protobuf.
EMBED_LIMIT = 1_800_000_000
ALIGN = 64


def np_dtype(elem_type: int) -> np.dtype:
    """numpy dtype of an ONNX element type (bfloat16 through ml_dtypes)."""
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"unsupported tensor element type {elem_type}") from exc


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse the graph only; weights stay on disk until asked for."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        return onnx.load(str(path), load_external_data=False)
    except DecodeError as exc:
        raise InputError(f"{path}: not a valid ONNX protobuf (truncated or corrupt file?)") from exc
    except Exception as exc:  # onnx raises several unrelated types for malformed files
        raise InputError(f"{path}: cannot parse ONNX model ({type(exc).__name__}: {exc})") from exc


def _external_info(tensor: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def uses_external_data(model: onnx.ModelProto) -> bool:
    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer)


class TensorStore:
    """Lazy, read-only access to a model's initializers by name.

    External tensors are memory-mapped from files inside ``base_dir``; a location that escapes that
    folder (``..``, absolute paths, symlinks out) is refused so a hostile model cannot read other files.
    """

    def __init__(self, model: onnx.ModelProto, base_dir: str | os.PathLike | None = None) -> None:
        self.model = model
        self.base_dir = Path(base_dir).resolve() if base_dir is not None else None
        self.tensors: dict[str, TensorProto] = {t.name: t for t in model.graph.initializer}

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(int(d) for d in self.tensors[name].dims)

    def dtype(self, name: str) -> np.dtype:
        return np_dtype(self.tensors[name].data_type)

    def nbytes(self, name: str) -> int:
        return int(np.prod(self.shape(name), dtype=np.int64)) * self.dtype(name).itemsize

    def array(self, name: str) -> np.ndarray:
        """The tensor's values; a read-only memory map for external data."""
        tensor = self.tensors[name]
        if tensor.data_location == TensorProto.EXTERNAL:
            return self._read_external(tensor)
        dtype = self.dtype(name)
        shape = self.shape(name)
        if tensor.HasField("raw_data"):
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if len(tensor.raw_data) != expected:
                raise InputError(
                    f"initializer '{name}': {len(tensor.raw_data)} bytes of data for shape {list(shape)} "
                    f"({expected} expected)"
                )
            return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(shape)
        try:
            return numpy_helper.to_array(tensor)
        except Exception as exc:
            raise InputError(f"initializer '{name}': cannot decode ({exc})") from exc

    def resolve_location(self, tensor: TensorProto) -> Path:
        info = _external_info(tensor)
        location = info.get("location", "")
        if self.base_dir is None:
            raise InputError(f"initializer '{tensor.name}': external data '{location}' but no model folder")
        if not location or os.path.isabs(location) or ".." in Path(location).parts:
            raise InputError(
                f"initializer '{tensor.name}': external data path '{location}' points outside the model's folder"
            )
        path = (self.base_dir / location).resolve()
        if self.base_dir not in path.parents:
            raise InputError(
                f"initializer '{tensor.name}': external data path '{location}' points outside the model's folder"
            )
        if not path.is_file():
            raise InputError(f"initializer '{tensor.name}': external data file '{location}' is missing")
        return path

    def _read_external(self, tensor: TensorProto) -> np.ndarray:
        info = _external_info(tensor)
        path = self.resolve_location(tensor)
        dtype = np_dtype(tensor.data_type)
        shape = tuple(int(d) for d in tensor.dims)
        offset = int(info.get("offset", 0))
        expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        length = int(info.get("length", expected))
        if length != expected or offset + expected > path.stat().st_size:
            raise InputError(
                f"initializer '{tensor.name}': external data in '{info.get('location')}' does not hold "
                f"{expected} bytes at offset {offset} for shape {list(shape)}"
            )
        if expected == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def set_tensor_data(tensor: TensorProto, values: np.ndarray) -> None:
    """Replace a TensorProto's values in place, keeping its name and element type."""
    dtype = np_dtype(tensor.data_type)
    values = np.ascontiguousarray(values, dtype=dtype)
    name = tensor.name
    new = numpy_helper.from_array(values, name)
    new.data_type = tensor.data_type
    tensor.Clear()
    tensor.CopyFrom(new)
    tensor.name = name


TensorSource = Callable[[str], np.ndarray]


def staging_dir(out_path: str | os.PathLike) -> Path:
    """A fresh hidden folder beside ``out_path``: outputs are written and checked there, then moved."""
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out_path.name}.", suffix=".partial", dir=out_path.parent))


def save_model(
    model: onnx.ModelProto,
    path: str | os.PathLike,
    tensor_values: TensorSource,
    *,
    external: bool | None = None,
    progress: Callable[[int], None] | None = None,
) -> list[Path]:
    """Write ``model`` to ``path`` (in a staging folder), pulling each initializer from ``tensor_values``.

    ``tensor_values(name)`` is called once per initializer, in graph order, so a caller can compute
    rewritten tensors lazily and only one is in memory at a time. With external data, all tensors go
    to ``<name>.data`` beside the model. Returns the files written.
    """
    path = Path(path)
    total = sum(
        int(np.prod(t.dims, dtype=np.int64)) * np_dtype(t.data_type).itemsize for t in model.graph.initializer
    )
    if external is None:
        external = total > EMBED_LIMIT
    header = onnx.ModelProto()
    header.CopyFrom(model)
    written = [path]
    if external:
        data_name = path.name + ".data"
        written.append(path.parent / data_name)
        with open(path.parent / data_name, "wb") as data_file:
            offset = 0
            for tensor in header.graph.initializer:
                values = np.ascontiguousarray(tensor_values(tensor.name), dtype=np_dtype(tensor.data_type))
                pad = (-offset) % ALIGN
                if pad:
                    data_file.write(b"\0" * pad)
                    offset += pad
                raw = values.tobytes()
                data_file.write(raw)
                dims, data_type, name = list(tensor.dims), tensor.data_type, tensor.name
                tensor.Clear()
                tensor.name, tensor.data_type = name, data_type
                tensor.dims.extend(dims)
                tensor.data_location = TensorProto.EXTERNAL
                for key, value in (
                    ("location", data_name),
                    ("offset", str(offset)),
                    ("length", str(len(raw))),
                ):
                    entry = tensor.external_data.add()
                    entry.key, entry.value = key, value
                offset += len(raw)
                if progress:
                    progress(len(raw))
                del values, raw
    else:
        for tensor in header.graph.initializer:
            values = tensor_values(tensor.name)
            set_tensor_data(tensor, values)
            if progress:
                progress(values.nbytes)
    with open(path, "wb") as handle:
        handle.write(header.SerializeToString())
    return written


def commit_output(staged: list[Path], out_path: str | os.PathLike) -> None:
    """Move staged files into place (data first, so a model file never names missing data)."""
    out_path = Path(out_path)
    model_file, *data_files = staged
    for data in data_files:
        os.replace(data, out_path.parent / (out_path.name + ".data"))
    os.replace(model_file, out_path)
    shutil.rmtree(model_file.parent, ignore_errors=True)


def discard_output(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
