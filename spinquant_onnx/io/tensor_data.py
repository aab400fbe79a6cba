"""Element types, byte sizes and raw layouts of TensorProtos (the bottom of io: no other io imports)."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from spinquant_onnx.errors import InputError

# Element types stored several to a byte (raw data is packed; numpy_helper packs and unpacks them).
SUB_BYTE_BITS = {
    getattr(TensorProto, name): bits
    for name, bits in (
        ("INT4", 4),
        ("UINT4", 4),
        ("FLOAT4E2M1", 4),
        ("INT2", 2),
        ("UINT2", 2),
        ("FLOAT6E2M3", 6),
        ("FLOAT6E3M2", 6),
    )
    if hasattr(TensorProto, name)
}


def np_dtype(elem_type: int) -> np.dtype:
    """numpy dtype of an ONNX element type (bfloat16 through ml_dtypes)."""
    try:
        return np.dtype(helper.tensor_dtype_to_np_dtype(elem_type))
    except (KeyError, ValueError, TypeError) as exc:
        raise InputError(f"unsupported tensor element type {elem_type}") from exc


def type_name(elem_type: int) -> str:
    try:
        return TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"type {elem_type}"


def storage_nbytes(elem_type: int, shape: Iterable[int]) -> int:
    """Bytes a tensor of this type and shape takes in raw_data / external data (sub-byte types packed)."""
    count = int(np.prod(list(shape), dtype=np.int64))
    bits = SUB_BYTE_BITS.get(elem_type)
    if bits is not None:
        return (count * bits + 7) // 8
    return count * np_dtype(elem_type).itemsize


def set_tensor_data(tensor: TensorProto, values: np.ndarray) -> None:
    """Replace a TensorProto's values in place, keeping its name and element type."""
    dtype = np_dtype(tensor.data_type)
    # np.asarray, not np.ascontiguousarray: the latter turns a 0-d scalar into shape (1,).
    values = np.asarray(values, dtype=dtype, order="C") if dtype.kind != "O" else np.asarray(values)
    name = tensor.name
    new = numpy_helper.from_array(values, name)
    new.data_type = tensor.data_type
    tensor.Clear()
    tensor.CopyFrom(new)
    tensor.name = name


def raw_bytes(values: np.ndarray, elem_type: int) -> bytes | memoryview:
    values = np.ascontiguousarray(values, dtype=np_dtype(elem_type))
    if elem_type in SUB_BYTE_BITS:
        return numpy_helper.from_array(values).raw_data  # packs two (or four) values per byte
    # Written as is, no bytes copy of a tensor that may be gigabytes; viewed as uint8 first because
    # memoryview refuses ml_dtypes' types (bfloat16, float8).
    return memoryview(values.reshape(-1).view(np.uint8))
