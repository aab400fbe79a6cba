"""Synthetic feeds for a decoder export: every real graph input, shaped and valued by its name.

Shared by the equivalence check (core) and the shape probe (graph/probe.py), so it lives at the bottom layer.
"""

from __future__ import annotations

import zlib

import numpy as np
import onnx
from onnx import TensorProto, helper

from spinquant_onnx.errors import InputError

DEFAULT_VOCAB_SIZE = 64
"""Fallback id range when the vocab cannot be inferred; ids below it are valid for any real embedding."""

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}


def synthesize_inputs(
    model: onnx.ModelProto,
    *,
    batch: int = 1,
    seq: int = 8,
    past: int = 0,
    seed: int = 0,
    vocab_size: int | None = None,
    dims: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Deterministic feeds for every real graph input of a decoder export.

    ``dims`` fixes named symbolic dims the names alone do not explain (the genai builder's
    ``kv_cache_dim`` is the head size, say); the caller knows them from the matched graph.

    Symbolic dims are resolved by name (batch / past / total / sequence; unknown -> seq), the
    attention_mask's last dim is always past+seq. Ids are drawn from [0, vocab_size): pass the real vocab
    (see `infer_vocab_size`) so the whole embedding is exercised; the default of 64 is merely safe.
    Each input gets its own generator seeded from (seed, name), so values do not depend on input order.
    """
    if min(batch, seq) < 1 or past < 0:
        raise InputError(f"need batch >= 1, seq >= 1, past >= 0 (got batch={batch} seq={seq} past={past})")
    vocab = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
    if vocab < 1:
        raise InputError(f"vocab_size must be positive, got {vocab}")
    feeds: dict[str, np.ndarray] = {}
    for value_info in _real_inputs(model):
        shape = _input_shape(value_info, batch=batch, seq=seq, past=past, named=dims or {})
        rng = np.random.default_rng([seed, zlib.crc32(value_info.name.encode())])
        feeds[value_info.name] = _input_value(value_info, shape, rng, seq=seq, past=past, vocab=vocab)
    return feeds


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that need a feed (old exports also list initializers as inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in initializers]


def _input_shape(
    value_info: onnx.ValueInfoProto, *, batch: int, seq: int, past: int, named: dict[str, int]
) -> tuple[int, ...]:
    """Concrete shape: fixed dims as given, symbolic ones by name."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        raise InputError(f"graph input {value_info.name!r} has no shape; cannot synthesize a value for it")
    dims = list(tensor_type.shape.dim)
    shape = []
    for axis, dim in enumerate(dims):
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        elif dim.dim_param in named:
            shape.append(named[dim.dim_param])
        elif _is_attention_mask(value_info.name) and axis == len(dims) - 1:
            shape.append(past + seq)
        else:
            shape.append(_symbolic_dim(dim.dim_param, batch=batch, seq=seq, past=past))
    return tuple(shape)


def _symbolic_dim(param: str, *, batch: int, seq: int, past: int) -> int:
    """Size for a named dim; handles sums like "past_sequence_length + 1"."""
    name = param.strip().lower()
    if "+" in name:
        return sum(_symbolic_dim(part, batch=batch, seq=seq, past=past) for part in name.split("+"))
    if name.isdigit():
        return int(name)
    if "batch" in name:
        return batch
    if "past" in name:
        return past
    if "total" in name or "all" in name:
        return past + seq
    return seq  # "sequence", "seq" and anything unknown


def _is_attention_mask(name: str) -> bool:
    return "attention_mask" in name.lower()


def _input_value(
    value_info: onnx.ValueInfoProto,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    *,
    seq: int,
    past: int,
    vocab: int,
) -> np.ndarray:
    """One input's value, chosen by its name and element type."""
    elem_type = value_info.type.tensor_type.elem_type
    name = value_info.name.lower()
    if elem_type == TensorProto.BFLOAT16 or elem_type not in _NP_TYPES:
        type_name = TensorProto.DataType.Name(elem_type)
        raise InputError(f"graph input {value_info.name!r} has unsupported element type {type_name}")
    dtype = _NP_TYPES[elem_type]
    if elem_type in _FLOAT_TYPES:
        return rng.standard_normal(shape).astype(dtype)
    if elem_type == TensorProto.BOOL:
        if "mask" in name:  # a selection mask (Qwen3-VL's visual_pos_masks): both branches get exercised
            return rng.random(shape) < 0.5
        # Merged decoders (optimum) take `use_cache_branch`: the with-past branch is the one to test.
        return np.full(shape, past > 0 and "cache" in name, dtype=dtype)
    if "input_ids" in name:
        return rng.integers(0, vocab, size=shape).astype(dtype)
    if _is_attention_mask(name):
        return np.ones(shape, dtype=dtype)
    if "position_ids" in name or "cache_position" in name:
        last = shape[-1] if shape else 1
        positions = np.arange(past, past + last, dtype=dtype)
        return np.broadcast_to(positions if shape else positions[0], shape).copy()
    return np.zeros(shape, dtype=dtype)


_NP_TYPES: dict[int, np.dtype] = {
    t: np.dtype(helper.tensor_dtype_to_np_dtype(t))
    for t in (
        TensorProto.FLOAT,
        TensorProto.FLOAT16,
        TensorProto.DOUBLE,
        TensorProto.INT64,
        TensorProto.INT32,
        TensorProto.INT16,
        TensorProto.INT8,
        TensorProto.UINT8,
        TensorProto.BOOL,
    )
}
