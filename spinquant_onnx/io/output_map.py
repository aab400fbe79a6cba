"""An output file written in place through a memory map: every tensor is computed straight into its bytes.

Why a map rather than ``write`` calls: the worker threads that rotate a tensor's chunks cast each result
directly into the file's pages, so there is no output buffer per tensor, no single writer thread the
compute must wait for (or that must wait for the compute), and strided results (a rotation along a
tensor's first axis, computed in column chunks) land in place like contiguous ones. The kernel writes the
dirty pages back in the background; ``close`` syncs them.

The file's size is known before anything is written (every tensor's shape and type are), so its blocks
are reserved first: a full disk then fails at the start with ENOSPC, not as a SIGBUS on a page mid-write.
Pages a tensor has finished with are dropped from this process's mapping (their data stays in the page
cache), so resident memory is bounded by the tensors in flight, not by the model.
"""

from __future__ import annotations

import errno
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from onnx import TensorProto

from spinquant_onnx.io.tensor_data import SUB_BYTE_BITS, np_dtype, raw_bytes, storage_nbytes

_PAGE = mmap.PAGESIZE


class MappedOutput:
    """A new file of exactly ``size`` bytes, filled through ``put`` (bytes) and ``array`` (typed views)."""

    def __init__(self, path: str | os.PathLike, size: int) -> None:
        self.path = Path(path)
        self.size = size
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        self.map: mmap.mmap | None = None
        try:
            if size:
                _reserve(self.fd, size)
                self.map = mmap.mmap(self.fd, size, access=mmap.ACCESS_WRITE)
        except BaseException:
            os.close(self.fd)
            raise

    def put(self, pos: int, data: bytes | memoryview) -> None:
        """Copy ``data`` to ``pos``."""
        end = pos + len(data)
        self._check(pos, end)
        self.map[pos:end] = data

    def array(self, pos: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
        """A writable C-order view of ``shape`` x ``dtype`` at ``pos`` (drop it before ``close``)."""
        dtype = np.dtype(dtype)
        self._check(pos, pos + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize)
        return np.ndarray(shape, dtype=dtype, buffer=self.map, offset=pos)

    def release(self, pos: int, length: int) -> None:
        """Unmap the pages of ``[pos, pos + length)`` from this process; their contents stay in the page cache
        (a shared file mapping keeps dirty data there), so this only lowers resident memory."""
        if self.map is None or length <= 0 or not hasattr(self.map, "madvise"):
            return
        start = pos - pos % _PAGE
        end = min(self.size, pos + length)
        self.map.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self, sync: bool = True) -> None:
        """Unmap, then (``sync``) flush the file to disk."""
        try:
            if self.map is not None:
                if sync:
                    self.map.flush()
                self.map.close()
                self.map = None
            if sync:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)

    def __enter__(self) -> MappedOutput:
        return self

    def __exit__(self, kind: object, *exc: object) -> None:
        try:
            self.close(sync=kind is None)
        except BufferError:  # a view still alive while an exception unwinds: the map goes with it
            if kind is None:
                raise

    def _check(self, start: int, end: int) -> None:
        if not 0 <= start <= end <= self.size:
            raise ValueError(f"{self.path.name}: write of [{start}, {end}) outside the file's {self.size} bytes")


def _reserve(fd: int, size: int) -> None:
    """Allocate the file's blocks (sparse files would fault in pages on a full disk as SIGBUS)."""
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
            raise
        os.ftruncate(fd, size)  # a filesystem without fallocate: sized, not reserved
    except AttributeError:  # no posix_fallocate on this platform
        os.ftruncate(fd, size)


TensorSource = Callable[[str], np.ndarray]
TensorFill = Callable[[str, np.ndarray], None]  # write tensor ``name``'s final values into ``out``


def copy_fill(tensor_values: TensorSource) -> TensorFill:
    """A fill for sources that only hand out arrays: copy the array into place (shape checked, never broadcast)."""

    def fill(name: str, out: np.ndarray) -> None:
        values = np.asarray(tensor_values(name))
        if values.shape != out.shape:
            raise ValueError(
                f"tensor '{name}': values of shape {list(values.shape)}, its initializer says {list(out.shape)}"
            )
        np.copyto(out, values)

    return fill


def fill_tensor(out: MappedOutput, pos: int, tensor: TensorProto, tensor_values: TensorSource, fill: TensorFill) -> int:
    """Write ``tensor``'s payload (its ``raw_data`` bytes) at ``pos``; returns its length.

    Plain element types are filled in place through a typed view; packed sub-byte types go through bytes.
    """
    nbytes = storage_nbytes(tensor.data_type, tensor.dims)
    dtype = np_dtype(tensor.data_type)
    if tensor.data_type in SUB_BYTE_BITS or dtype.kind == "O":
        raw = raw_bytes(tensor_values(tensor.name), tensor.data_type)
        if len(raw) != nbytes:
            raise ValueError(f"tensor '{tensor.name}': {len(raw)} bytes of values, its initializer says {nbytes}")
        out.put(pos, raw)
    else:
        view = out.array(pos, dtype, tuple(int(d) for d in tensor.dims))
        fill(tensor.name, view)
        del view
    out.release(pos, nbytes)
    return nbytes
