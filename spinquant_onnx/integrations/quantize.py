"""Quantize a (rotated) model with ONNX Runtime's quantizers, online rotations kept in float.

One implementation for ``spinquant-onnx quantize`` and ``eval``'s quantized rows: W8A8 is ``quantize_static``
(QDQ, per-channel int8 weights, per-tensor uint8 activations, MinMax calibration), W4 is
``MatMulNBitsQuantizer`` (round-to-nearest, symmetric, blockwise). The online Hadamards (R3, R4, online R1)
must stay float: quantizing their input before the rotation turns the rotation's benefit into a loss
(SmolLM2 W8A8 with R1 + R4: perplexity 36.9 with the R4 node quantized, 21.4 kept float). ``keep_float``
names them, for ``nodes_to_exclude`` here or in any other quantizer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper

from spinquant_onnx.errors import InputError, SpinQuantError
from spinquant_onnx.io.model_file import load_model
from spinquant_onnx.match.analysis import Analysis
from spinquant_onnx.rewrite.online import online_node_names

PROTOBUF_LIMIT = 1_800_000_000
SCHEMES = ("w8a8", "w4")


def keep_float(model: onnx.ModelProto) -> list[str]:
    """Names of the nodes a quantizer must leave in float: every online rotation node of a rotated model.

    ``quantize_static(..., nodes_to_exclude=spinquant_onnx.keep_float(model))``. The names come from the
    model's rotation record when it has one, else from the one prefix every online node is named under.
    """
    return online_node_names(model)


@dataclass(frozen=True)
class InputSpec:
    """A graph input as eval needs it: its name, its dims (int, or a symbolic name / None) and element type."""

    name: str
    dims: tuple[int | str | None, ...]
    dtype: np.dtype


_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}


def session_inputs(session: Any) -> list[InputSpec]:
    return [
        InputSpec(i.name, tuple(i.shape), np.dtype(_ORT_TYPES.get(i.type, np.float32))) for i in session.get_inputs()
    ]


def model_inputs(model: onnx.ModelProto) -> list[InputSpec]:
    initializers = {t.name for t in model.graph.initializer}
    specs = []
    for info in model.graph.input:
        if info.name in initializers:
            continue
        tensor_type = info.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim)
        specs.append(InputSpec(info.name, dims, np.dtype(helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))))
    return specs


def _is_cache(spec: InputSpec) -> bool:
    return "past" in spec.name.lower() and len(spec.dims) >= 3 and spec.dtype.kind == "f"


def empty_cache(spec: InputSpec, hints: dict[str, int]) -> np.ndarray:
    """A zero-length past for a KV-cache input: batch 1, the past axis 0, every other dim fixed or hinted."""
    shape = []
    for dim in spec.dims:
        if isinstance(dim, int) and dim > 0:
            shape.append(dim)
        elif isinstance(dim, str) and dim in hints:
            shape.append(hints[dim])
        elif isinstance(dim, str) and "past" in dim.lower():
            shape.append(0)
        elif isinstance(dim, str) and "batch" in dim.lower():
            shape.append(1)
        else:
            raise InputError(
                f"model input '{spec.name}': cannot size its dim {dim!r} for an empty KV cache "
                "(expected batch / past-sequence names or fixed sizes)"
            )
    return np.zeros(shape, dtype=spec.dtype)


def _feeds(inputs: Sequence[InputSpec], window: np.ndarray, hints: dict[str, int] | None = None
           ) -> dict[str, np.ndarray]:
    """One window as a batch of 1 with a full attention mask, and an empty past for KV-cache exports."""
    ids = window.reshape(1, -1).astype(np.int64)
    feeds = {}
    for spec in inputs:
        name = spec.name
        if name == "input_ids":
            feeds[name] = ids.astype(spec.dtype) if spec.dtype.kind == "i" else ids
        elif name == "attention_mask":
            feeds[name] = np.ones_like(ids, dtype=spec.dtype if spec.dtype.kind == "i" else np.int64)
        elif name == "position_ids":
            feeds[name] = np.arange(ids.shape[1], dtype=np.int64).reshape(1, -1)
        elif _is_cache(spec):
            feeds[name] = empty_cache(spec, hints or {})
        else:
            raise InputError(
                f"model input '{name}' is not input_ids / attention_mask / position_ids or a past key/value; "
                "eval cannot feed it"
            )
    return feeds


def lm_head_nodes(analysis: Analysis) -> list[str]:
    """Names of the lm_head linears (readers of the final norm)."""
    roles = analysis.roles
    return [entry.linear.node.name for entry in roles.final.readers] if roles.final is not None else []


def name_nodes(model: onnx.ModelProto) -> None:
    """Give unnamed nodes a name: the quantizers select and exclude nodes by name."""
    taken = {n.name for n in model.graph.node if n.name}
    for number, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{number}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _load_full(path: Path) -> onnx.ModelProto:
    load_model(path)  # one-line errors for a missing or corrupt file
    model = onnx.load(str(path), load_external_data=True)
    name_nodes(model)
    return model


def _too_big(model: onnx.ModelProto) -> bool:
    return model.ByteSize() > PROTOBUF_LIMIT


@contextlib.contextmanager
def _quiet_quantizers() -> Iterator[None]:
    """onnxruntime.quantization logs every node at INFO (it configures the root logger on import)."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# ------------------------------------------------------------------------------------------ quantizers


class _Reader:
    """onnxruntime CalibrationDataReader over fixed windows."""

    def __init__(self, windows: np.ndarray, inputs: Sequence[InputSpec], hints: dict[str, int]) -> None:
        self._feeds = iter([_feeds(inputs, w, hints) for w in windows])

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._feeds, None)


def quantize_w8a8(
    source: Path, target: Path, calibration: np.ndarray, exclude: Sequence[str], hints: dict[str, int] | None = None
) -> Path:
    """Static W8A8 QDQ on MatMuls: int8 per-channel weights, uint8 activations.

    In QDQ format onnxruntime's MatMul quantizer ignores ``MatMulConstBOnly`` (only the QOperator path reads
    it): every MatMul's inputs and output get a Q/DQ pair, the linears' outputs and attention's score and
    probs @ V MatMuls included (``eval --sensitivity`` measures each of these families on its own).
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

    model = _load_full(source)
    with _quiet_quantizers():
        quantize_static(
            model,
            str(target),
            _Reader(calibration, model_inputs(model), hints or {}),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul"],
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=list(exclude),
            use_external_data_format=_too_big(model),
            calibrate_method=CalibrationMethod.MinMax,
            extra_options={"MatMulConstBOnly": True},
        )
    return target


def quantize_w4(source: Path, target: Path, block_size: int, exclude: Sequence[str]) -> Path:
    """Weight-only int4 (MatMulNBits), symmetric round-to-nearest per block of ``block_size`` inputs."""
    with _quiet_quantizers():
        from onnxruntime.quantization.matmul_nbits_quantizer import (
            DefaultWeightOnlyQuantConfig,
            MatMulNBitsQuantizer,
        )

        model = _load_full(source)
        config = DefaultWeightOnlyQuantConfig(block_size=block_size, is_symmetric=True)
        quantizer = MatMulNBitsQuantizer(
            model, block_size=block_size, is_symmetric=True, nodes_to_exclude=list(exclude), algo_config=config
        )
        quantizer.process()
        quantizer.model.save_model_to_file(str(target), use_external_data_format=_too_big(quantizer.model.model))
    return target


def int4_blocks(weight: np.ndarray, block: int) -> np.ndarray:
    """MatMulNBits' symmetric RTN, dequantized: blocks of ``block`` inputs (axis 0 of a MatMul's B) per output
    column, scale = the block's signed largest-magnitude value / -8, codes clipped to [-8, 7]."""
    k = weight.shape[0]
    w = np.asarray(weight, dtype=np.float32)
    padded = np.pad(w, ((0, (-k) % block), (0, 0))).reshape(-1, block, w.shape[1])
    index = np.abs(padded).argmax(axis=1)[:, None, :]
    scale = np.take_along_axis(padded, index, axis=1) / np.float32(-8.0)
    scale = np.where(scale == 0, np.float32(1.0), scale)
    codes = np.clip(np.rint(padded / scale), -8, 7)
    return (codes * scale).reshape(-1, w.shape[1])[:k].astype(weight.dtype)


def quantize_w4a8(source: Path, w8a8: Path, target: Path, block_size: int) -> Path:
    """W4A8: the W8A8 QDQ model (``w8a8``: its activation quantizers and scales) with every weight
    DequantizeLinear replaced by the float model's weight at MatMulNBits' int4 grid (``int4_blocks``).

    A weight's DequantizeLinear reads ``<weight>_quantized`` (onnxruntime's name for it), which names the
    float weight; one that names no 2-D float weight is refused rather than left at int8."""
    from onnxruntime.quantization.quant_utils import TENSOR_NAME_QUANT_SUFFIX

    weights = {t.name: t for t in _load_full(source).graph.initializer}
    model = _load_full(w8a8)
    graph = model.graph
    stored = {t.name for t in graph.initializer}
    dequantized = {n.output[0]: n for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in stored}
    dropped: set[str] = set()
    for node in graph.node:
        dq = dequantized.get(node.input[1]) if node.op_type == "MatMul" and len(node.input) > 1 else None
        if dq is None:
            continue
        original = weights.get(dq.input[0].removesuffix(TENSOR_NAME_QUANT_SUFFIX))
        if original is None or len(original.dims) != 2:
            raise SpinQuantError(f"W4A8: {node.name}'s weight '{dq.input[0]}' names no 2-D float weight of {source}")
        name = f"{original.name}_int4_b{block_size}"
        value = int4_blocks(onnx.numpy_helper.to_array(original), block_size)
        graph.initializer.append(onnx.numpy_helper.from_array(value, name))
        node.input[1] = name
        dropped.add(dq.output[0])
    kept = [n for n in graph.node if not (n.op_type == "DequantizeLinear" and n.output[0] in dropped)]
    del graph.node[:]
    graph.node.extend(kept)
    read = {name for n in graph.node for name in n.input}
    unused = [t for t in graph.initializer if t.name not in read]
    for tensor in unused:
        graph.initializer.remove(tensor)
    onnx.save(model, str(target), save_as_external_data=_too_big(model))
    return target


def cache_hints(graph: onnx.ModelProto, analysis: Callable[[], Analysis]) -> dict[str, int]:
    """Sizes of KV-cache dims their names do not explain (genai's ``kv_cache_dim``), from the head geometry."""
    named = {
        dim
        for spec in model_inputs(graph)
        if _is_cache(spec)
        for dim in spec.dims
        if isinstance(dim, str) and "past" not in dim.lower() and "batch" not in dim.lower()
    }
    if not named:
        return {}
    from spinquant_onnx.core.pipeline import input_dim_hints

    return input_dim_hints(analysis())


def calibration_windows(tokens: np.ndarray, count: int, length: int) -> np.ndarray:
    """The first ``count`` windows of ``length`` tokens (the text the caller set aside for calibration)."""
    if count < 1 or length < 2:
        raise InputError("need at least 1 calibration window of 2 tokens")
    if tokens.size < count * length:
        raise InputError(f"token array has {tokens.size} ids; {count} windows of {length} need {count * length}")
    return tokens[: count * length].reshape(count, length)


def excluded_nodes(model: onnx.ModelProto, analysis: Analysis | None, quantize_lm_head: bool) -> list[str]:
    """What stays float: the online rotations always, lm_head unless asked (``analysis`` finds it)."""
    names = keep_float(model)
    if not quantize_lm_head and analysis is not None:
        names += lm_head_nodes(analysis)
    return names


def quantize_model(
    source: str | Path,
    target: str | Path,
    scheme: str,
    *,
    tokens: np.ndarray | None = None,
    windows: int = 2,
    window_len: int = 256,
    block_size: int = 128,
    quantize_lm_head: bool = False,
) -> dict[str, object]:
    """Quantize ``source`` into ``target`` with ``scheme`` (w8a8: calibrated on ``tokens``; w4: RTN).

    Returns what was done (scheme, nodes kept float), for the command's report.
    """
    from spinquant_onnx.match.analysis import analyze

    source, target = Path(source), Path(target)
    if scheme not in SCHEMES:
        raise InputError(f"unknown scheme '{scheme}': choose from {', '.join(SCHEMES)}")
    if target.resolve() == source.resolve():
        raise InputError(f"{target}: output is the input file; choose another name")
    graph = load_model(source)
    name_nodes(graph)
    matched = functools.cache(lambda: analyze(graph, source.parent))  # only if lm_head or a cache needs it
    exclude = excluded_nodes(graph, None if quantize_lm_head else matched(), quantize_lm_head)
    target.parent.mkdir(parents=True, exist_ok=True)
    if scheme == "w8a8":
        if tokens is None:
            raise InputError("w8a8 needs calibration tokens (--tokens T.npy)")
        calibration = calibration_windows(tokens, windows, window_len)
        quantize_w8a8(source, target, calibration, exclude, cache_hints(graph, matched))
    else:
        quantize_w4(source, target, block_size, exclude)
    return {"scheme": scheme, "output": str(target), "kept_float": exclude, "online_nodes": keep_float(graph)}
