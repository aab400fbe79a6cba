"""Lazy, read-only access to a model's initializers (external data memory-mapped, one tensor at a time)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from spinquant_onnx.errors import InputError
from spinquant_onnx.io.model_file import (
    SUB_BYTE_BITS,
    external_span,
    np_dtype,
    one_line,
    resolve_location,
    storage_nbytes,
)


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
        return storage_nbytes(self.tensors[name].data_type, self.shape(name))

    def array(self, name: str) -> np.ndarray:
        """The tensor's values; a read-only memory map for external data."""
        tensor = self.tensors[name]
        if tensor.data_location == TensorProto.EXTERNAL:
            return self._read_external(tensor)
        dtype = self.dtype(name)
        shape = self.shape(name)
        if tensor.HasField("raw_data") and tensor.data_type not in SUB_BYTE_BITS and dtype.kind != "O":
            expected = storage_nbytes(tensor.data_type, shape)
            if len(tensor.raw_data) != expected:
                raise InputError(
                    f"initializer '{name}': {len(tensor.raw_data)} bytes of data for shape {list(shape)} "
                    f"({expected} expected)"
                )
            return np.frombuffer(tensor.raw_data, dtype=dtype).reshape(shape)
        try:
            return numpy_helper.to_array(tensor)
        except Exception as exc:  # numpy_helper raises ValueError, TypeError, ... for malformed fields
            raise InputError(f"initializer '{name}': cannot decode its data ({one_line(exc)})") from exc

    def resolve_location(self, tensor: TensorProto) -> Path:
        return resolve_location(tensor, self.base_dir)

    def _read_external(self, tensor: TensorProto) -> np.ndarray:
        path, offset, length = external_span(tensor, self.base_dir)
        dtype = np_dtype(tensor.data_type)
        shape = tuple(int(d) for d in tensor.dims)
        if tensor.data_type in SUB_BYTE_BITS:
            with open(path, "rb") as handle:
                handle.seek(offset)
                packed = TensorProto(name=tensor.name, data_type=tensor.data_type, dims=shape)
                packed.raw_data = handle.read(length)
            return numpy_helper.to_array(packed)
        if length == 0:
            return np.zeros(shape, dtype=dtype)
        return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)
