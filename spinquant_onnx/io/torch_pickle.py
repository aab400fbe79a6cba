"""PyTorch checkpoints (``torch.save`` zip format) read and written without torch and without running pickles.

A ``.pth`` file is a zip: ``<name>/data.pkl`` (a pickle that rebuilds tensors), ``<name>/data/<key>``
(one raw storage per key), ``<name>/byteorder`` and ``<name>/version``. Unpickling runs whatever
callables the pickle names, so a hostile file can execute code; the reader here only resolves the few
globals a tensor checkpoint needs (``torch._utils._rebuild_tensor_v2``, the typed storage classes,
``collections.OrderedDict``) to local stand-ins that build numpy arrays, and refuses every other global
by name before anything is called. Strides and offsets are bounds-checked against the storage, so a
crafted file cannot make numpy read outside the bytes it holds.

The writer emits the same format (pickle opcodes written by hand, records aligned to 64 bytes as torch
does) so that ``torch.load(path, weights_only=True)`` loads it.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import re
import struct
import sys
import tempfile
import zipfile
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from spinquant_onnx.errors import InputError

__all__ = ["load_torch", "save_torch"]

# torch storage class name -> numpy dtype (``torch.<name>`` in the pickle).
STORAGE_DTYPES: dict[str, np.dtype] = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}
DTYPE_STORAGES = {dtype: name for name, dtype in STORAGE_DTYPES.items()}
ALIGN = 64
# Entries at least this large are memory-mapped instead of read (they must be stored, not deflated).
MMAP_BYTES = 1 << 24
# A stride-0 (expanded) tensor is materialized; a crafted one could ask for any size, so cap it.
MAX_EXPANDED_BYTES = 1 << 30
_PICKLE_MAGIC = 0x1950A86A20F9469CFC6C  # first object of the legacy (pre-1.6) torch.save format


@dataclass(frozen=True, slots=True)
class _StorageType:
    """Stand-in for ``torch.FloatStorage`` & co: only its element type matters."""

    name: str
    dtype: np.dtype


@dataclass(frozen=True, slots=True)
class _Storage:
    """One ``data/<key>`` record as a flat array of its element type.

    Frozen with slots (as are the other stand-ins), so a pickle's BUILD opcode cannot alter it.
    """

    key: str
    dtype: np.dtype
    values: np.ndarray


@dataclass(frozen=True, slots=True)
class _Tensor:
    """What ``_rebuild_tensor_v2`` returns: an array the pickle can hold but neither read nor change."""

    array: np.ndarray


class _Reader(pickle.Unpickler):
    """An unpickler that resolves only tensor-checkpoint globals, to local functions that call nothing else."""

    def __init__(self, data: bytes, archive: _Archive) -> None:
        super().__init__(io.BytesIO(data))
        self.archive = archive

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return self._rebuild_parameter
        if module == "collections" and name == "OrderedDict":
            return collections.OrderedDict
        if module == "torch" and name in STORAGE_DTYPES:
            return _StorageType(name, STORAGE_DTYPES[name])
        if module in ("torch", "torch.storage") and name == "UntypedStorage":
            return _StorageType(name, np.dtype(np.uint8))
        raise InputError(
            f"{self.archive.path}: refusing to unpickle global '{module}.{name}': only tensor storages are "
            "allowed in a checkpoint (the file may carry code; it was not run)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise InputError(f"{self.archive.path}: unsupported persistent id {str(pid)[:80]!r} in data.pkl")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not _is_count(numel):
            raise InputError(f"{self.archive.path}: malformed storage reference {str(pid)[:80]!r} in data.pkl")
        return self.archive.storage(key, storage_type.dtype, numel)

    def _rebuild_tensor(
        self,
        storage: Any,
        offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any = False,
        hooks: Any = None,
        metadata: Any = None,
    ) -> _Tensor:
        del requires_grad, hooks, metadata  # autograd state has no meaning for the values
        if not isinstance(storage, _Storage):
            raise InputError(f"{self.archive.path}: tensor rebuilt from {type(storage).__name__}, not a storage")
        return _Tensor(_view(storage, offset, size, stride, self.archive.path))

    def _rebuild_parameter(self, data: Any, requires_grad: Any = False, hooks: Any = None) -> _Tensor:
        del requires_grad, hooks
        if not isinstance(data, _Tensor):
            raise InputError(f"{self.archive.path}: parameter rebuilt from {type(data).__name__}, not a tensor")
        return data


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _view(storage: _Storage, offset: Any, size: Any, stride: Any, path: Path) -> np.ndarray:
    """The strided view torch would make, after checking it stays inside the storage."""
    ok = (
        _is_count(offset)
        and isinstance(size, tuple)
        and isinstance(stride, tuple)
        and len(size) == len(stride)
        and all(_is_count(v) for v in size + stride)
    )
    if not ok:
        raise InputError(
            f"{path}: tensor on storage '{storage.key}' has malformed offset/size/stride "
            f"({str(offset)[:20]}, {str(size)[:40]}, {str(stride)[:40]})"
        )
    numel = int(np.prod(size, dtype=object))
    last = offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if numel else offset - 1
    if last >= storage.values.size:
        raise InputError(
            f"{path}: tensor of size {list(size)} (offset {offset}, stride {list(stride)}) reaches element "
            f"{last} of storage '{storage.key}', which holds {storage.values.size}"
        )
    if numel > storage.values.size and numel * storage.dtype.itemsize > MAX_EXPANDED_BYTES:
        raise InputError(
            f"{path}: tensor of size {list(size)} repeats storage '{storage.key}' ({storage.values.size} "
            f"elements) through zero strides into more than {MAX_EXPANDED_BYTES} bytes; refusing to expand it"
        )
    if numel == 0:
        return np.zeros(size, dtype=storage.dtype)
    itemsize = storage.dtype.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage.values[offset:], shape=size, strides=tuple(s * itemsize for s in stride), writeable=False
    )
    if view.flags.c_contiguous:
        return view
    return np.ascontiguousarray(view)


class _Archive:
    """The zip and its storage records, read lazily by key."""

    def __init__(self, path: Path, zf: zipfile.ZipFile, prefix: str) -> None:
        self.path, self.zf, self.prefix = path, zf, prefix
        self.storages: dict[str, _Storage] = {}
        order = self._read_text("byteorder", "little")
        if order not in ("little", "big"):
            raise InputError(f"{path}: unknown byteorder '{order[:20]}'")
        self.big_endian = order == "big"

    def _read_text(self, name: str, default: str) -> str:
        try:
            return self.zf.read(f"{self.prefix}/{name}").decode("ascii", "replace").strip()
        except KeyError:
            return default

    def storage(self, key: str, dtype: np.dtype, numel: int) -> _Storage:
        found = self.storages.get(key)
        if found is not None:
            if found.dtype != dtype:
                raise InputError(f"{self.path}: storage '{key}' is referenced as {found.dtype} and {dtype}")
            return found
        name = f"{self.prefix}/data/{key}"
        try:
            info = self.zf.getinfo(name)
        except KeyError:
            raise InputError(f"{self.path}: data.pkl names storage '{key}' but the archive has no '{name}'") from None
        need = numel * dtype.itemsize
        if info.file_size < need:
            raise InputError(
                f"{self.path}: storage '{key}' holds {info.file_size} bytes, {need} expected for {numel} "
                f"{dtype} elements"
            )
        raw = self._bytes(info, need)
        values = raw.view(dtype) if not self.big_endian else _from_big_endian(raw, dtype)
        storage = _Storage(key, dtype, values)
        self.storages[key] = storage
        return storage

    def _bytes(self, info: zipfile.ZipInfo, count: int) -> np.ndarray:
        """The first ``count`` bytes of a record: memory-mapped when large and stored, else read (CRC-checked)."""
        if count >= MMAP_BYTES and info.compress_type == zipfile.ZIP_STORED:
            offset = _data_offset(self.path, info)
            if offset + info.file_size > self.path.stat().st_size:
                raise InputError(f"{self.path}: record '{info.filename}' is truncated")
            return np.memmap(self.path, dtype=np.uint8, mode="r", offset=offset, shape=(count,))
        return np.frombuffer(self.zf.read(info), dtype=np.uint8)[:count]


def _from_big_endian(raw: np.ndarray, dtype: np.dtype) -> np.ndarray:
    if dtype.itemsize == 1:
        return raw.view(dtype)
    swapped = raw.view(np.dtype(f">u{dtype.itemsize}")).astype(np.dtype(f"<u{dtype.itemsize}"))
    return swapped.view(dtype)


def _data_offset(path: Path, info: zipfile.ZipInfo) -> int:
    """Where a stored record's bytes start: after its local header, whose extra field may differ."""
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    if len(header) != 30 or header[:4] != b"PK\x03\x04":
        raise InputError(f"{path}: bad local header for '{info.filename}' (corrupt zip)")
    name_len, extra_len = struct.unpack("<HH", header[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _prefix(path: Path, names: list[str]) -> str:
    pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(pickles) != 1:
        if any(n.endswith("/constants.pkl") for n in names):
            raise InputError(f"{path}: a TorchScript archive, not a tensor checkpoint saved with torch.save")
        raise InputError(f"{path}: not a torch.save checkpoint: expected one '<name>/data.pkl', found {len(pickles)}")
    return pickles[0].split("/", 1)[0]


def _legacy_hint(path: Path) -> str:
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head[:2] == b"\x80\x02" and _PICKLE_MAGIC.to_bytes(10, "little") in head:
        return "it is in the legacy (pre-1.6) torch.save format; re-save it with a current torch.save"
    return "it is not a zip archive (truncated or corrupt?)"


def load_torch(path: str | os.PathLike) -> np.ndarray | dict[str, np.ndarray]:
    """A tensor, or a flat dict of named tensors, from a ``torch.save`` file, as numpy arrays (read-only).

    bfloat16 comes back as ``ml_dtypes.bfloat16``. Anything other than tensors (modules, optimizers,
    nested containers, arbitrary objects) is refused with an InputError naming what was found.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise InputError(f"{path}: cannot read checkpoint: {_legacy_hint(path)}") from None
    with zf:
        archive = _Archive(path, zf, _prefix(path, zf.namelist()))
        try:
            data = zf.read(f"{archive.prefix}/data.pkl")
            value = _Reader(data, archive).load()
        except InputError:
            raise
        except (zipfile.BadZipFile, EOFError, OSError, zlib.error) as exc:
            raise InputError(f"{path}: corrupt checkpoint ({type(exc).__name__}: {exc})") from None
        except Exception as exc:  # noqa: BLE001 - a malformed pickle raises many unrelated types
            raise InputError(f"{path}: cannot decode data.pkl ({type(exc).__name__}: {str(exc)[:120]})") from None
    return _plain(value, path)


def _plain(value: Any, path: Path) -> np.ndarray | dict[str, np.ndarray]:
    if isinstance(value, _Tensor):
        return value.array
    if isinstance(value, dict):
        out: dict[str, np.ndarray] = {}
        for key, item in value.items():
            if not isinstance(key, str) or not isinstance(item, _Tensor):
                raise InputError(
                    f"{path}: entry {str(key)[:60]!r} is a {type(item).__name__}; only a tensor or a flat dict "
                    "of named tensors is supported"
                )
            out[key] = item.array
        return out
    what = "bare storage" if isinstance(value, _Storage) else type(value).__name__
    raise InputError(f"{path}: holds a {what}; expected a tensor or a dict of named tensors")


# ----------------------------------------------------------------------------------------------- writer


class _Pickle:
    """Protocol-2 pickle opcodes for exactly the objects torch writes for tensors."""

    def __init__(self) -> None:
        self.out = bytearray(b"\x80\x02")

    def global_(self, module: str, name: str) -> None:
        self.out += b"c" + module.encode() + b"\n" + name.encode() + b"\n"

    def string(self, text: str) -> None:
        raw = text.encode("utf-8")
        self.out += b"X" + struct.pack("<I", len(raw)) + raw

    def integer(self, value: int) -> None:
        if 0 <= value < 256:
            self.out += b"K" + struct.pack("<B", value)
        elif 0 <= value < 65536:
            self.out += b"M" + struct.pack("<H", value)
        elif -(2**31) <= value < 2**31:
            self.out += b"J" + struct.pack("<i", value)
        else:
            raw = value.to_bytes((value.bit_length() + 8) // 8, "little", signed=True)
            self.out += b"\x8a" + struct.pack("<B", len(raw)) + raw

    def int_tuple(self, values: tuple[int, ...]) -> None:
        self.out += b"("
        for v in values:
            self.integer(int(v))
        self.out += b"t"

    def tensor(self, key: str, array: np.ndarray) -> None:
        """``_rebuild_tensor_v2(storage(key), 0, shape, contiguous strides, False, OrderedDict())``."""
        self.global_("torch._utils", "_rebuild_tensor_v2")
        self.out += b"(("
        self.string("storage")
        self.global_("torch", DTYPE_STORAGES[array.dtype])
        self.string(key)
        self.string("cpu")
        self.integer(int(array.size))
        self.out += b"tQ"  # TUPLE, BINPERSID
        self.integer(0)
        self.int_tuple(array.shape)
        self.int_tuple(_contiguous_strides(array.shape))
        self.out += b"\x89"  # NEWFALSE: requires_grad
        self.global_("collections", "OrderedDict")
        self.out += b")R"  # OrderedDict(): backward hooks
        self.out += b"tR"  # args tuple, REDUCE

    def finish(self) -> bytes:
        return bytes(self.out + b".")


def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(int(n), 1)
    return tuple(reversed(strides))


def _checked(name: Any, array: Any) -> np.ndarray:
    """A C-contiguous little-endian copy (or view) of ``array``, whose dtype must have a torch storage."""
    if not isinstance(name, str):
        raise InputError(f"cannot save key {name!r}: keys must be strings")
    if isinstance(array, np.generic):
        array = np.asarray(array)
    if not isinstance(array, np.ndarray):
        raise InputError(f"cannot save {name!r}: a {type(array).__name__}, expected a numpy array")
    native = array.dtype.newbyteorder("=")
    if native not in DTYPE_STORAGES:
        raise InputError(f"cannot save {name!r}: dtype {array.dtype} has no torch storage type here")
    if sys.byteorder != "little":
        raise InputError("writing torch checkpoints is only supported on little-endian machines")
    return np.asarray(array, dtype=native, order="C")  # (ascontiguousarray would make 0-d arrays 1-d)


def _archive_name(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9_]", "_", path.stem)
    return stem or "archive"


def _aligned_info(zf: zipfile.ZipFile, name: str, size: int) -> tuple[zipfile.ZipInfo, bool]:
    """A stored ZipInfo whose data will start on a 64-byte boundary (torch's 'FB' padding extra field)."""
    info = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.file_size = size
    zip64 = size * 1.05 > zipfile.ZIP64_LIMIT  # zipfile's own rule; it then appends a 20-byte zip64 extra
    start = zf.fp.tell() + 30 + len(name.encode()) + 4 + (20 if zip64 else 0)
    info.extra = b"FB" + struct.pack("<H", (-start) % ALIGN) + b"\0" * ((-start) % ALIGN)
    return info, zip64


def _write_record(zf: zipfile.ZipFile, name: str, payload: bytes | np.ndarray) -> None:
    view = memoryview(payload if isinstance(payload, bytes) else payload.reshape(-1).view(np.uint8))
    info, zip64 = _aligned_info(zf, name, view.nbytes)
    with zf.open(info, "w", force_zip64=zip64) as dest:
        step = 1 << 26
        for start in range(0, view.nbytes, step):
            dest.write(view[start : start + step])


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def save_torch(path: str | os.PathLike, value: np.ndarray | Mapping[str, np.ndarray]) -> Path:
    """Write a tensor or a dict of named tensors as ``torch.save`` would; atomic (temp file, then rename)."""
    path = Path(path)
    if isinstance(value, Mapping):
        items = [(k, _checked(k, v)) for k, v in value.items()]
    else:
        items = [("", _checked("tensor", value))]
    writer = _Pickle()
    if isinstance(value, Mapping):
        writer.out += b"}"
        if items:
            writer.out += b"("
            for number, (key, array) in enumerate(items):
                writer.string(key)
                writer.tensor(str(number), array)
            writer.out += b"u"
    else:
        writer.tensor("0", items[0][1])
    root = _archive_name(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    os.chmod(tmp_name, 0o666 & ~_umask())  # mkstemp makes it private; give it a normal file's mode
    try:
        with zipfile.ZipFile(tmp_name, "w", zipfile.ZIP_STORED) as zf:
            _write_record(zf, f"{root}/data.pkl", writer.finish())
            _write_record(zf, f"{root}/.format_version", b"1")
            _write_record(zf, f"{root}/.storage_alignment", str(ALIGN).encode())
            _write_record(zf, f"{root}/byteorder", b"little")
            for number, (_, array) in enumerate(items):
                _write_record(zf, f"{root}/data/{number}", array)
            _write_record(zf, f"{root}/version", b"3\n")
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return path
