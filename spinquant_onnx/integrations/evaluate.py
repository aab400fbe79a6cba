"""Does rotating help quantization? Perplexity of a model and its rotated twin, float and quantized.

Everything runs through onnxruntime and its own quantizers, so the numbers are what a user deploying
the rotated model would get: W8A8 is ``quantize_static`` (QDQ, per-channel int8 weights, per-tensor
8-bit activations, MinMax calibration on windows held out from scoring), W4 is ``MatMulNBitsQuantizer``
(round-to-nearest, symmetric, blockwise). lm_head stays float unless asked, and online-rotation nodes
stay float under every scheme, because that is how they are deployed. Token ids come from a file (the
export script writes ``tokens.npy``), so this module needs neither torch nor a tokenizer.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from spinquant_onnx.errors import InputError
from spinquant_onnx.io.model_file import load_model
from spinquant_onnx.match.analysis import Analysis, analyze

ROWS = ("float", "w8a8", "w8a8-int", "w4-128", "w4-32")
DEFAULT_ROWS = ("float", "w8a8", "w4-128", "w4-32")
ROW_LABELS = {
    "float": "float",
    "w8a8": "W8A8 (static QDQ, MinMax)",
    "w8a8-int": "W8A8, ORT int8 kernels",
    "w4-128": "W4 RTN block 128",
    "w4-32": "W4 RTN block 32",
}
ONLINE_PREFIX = "spinquant/online/"
PROTOBUF_LIMIT = 1_800_000_000
Log = Callable[[str], None]


@dataclass
class EvalConfig:
    """How to score: which windows of the token array, which quantized rows, where to run."""

    windows: int = 4
    window_len: int = 256
    calibration_windows: int = 2
    rows: tuple[str, ...] = DEFAULT_ROWS
    providers: list[str] | None = None
    activations: bool = True
    quantize_lm_head: bool = False

    def __post_init__(self) -> None:
        unknown = [r for r in self.rows if r not in ROWS]
        if unknown:
            raise InputError(f"unknown eval row '{unknown[0]}': choose from {', '.join(ROWS)}")
        if self.windows < 1 or self.window_len < 2 or self.calibration_windows < 1:
            raise InputError("need at least 1 window of 2 tokens and 1 calibration window")


@dataclass
class ModelResult:
    """Perplexity per row, and the residual stream's per-channel max |x| under the float model."""

    path: str
    perplexity: dict[str, float] = field(default_factory=dict)
    nll: dict[str, float] = field(default_factory=dict)
    residual_absmax: np.ndarray | None = None  # [points, hidden]
    residual_points: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "path": self.path,
            "perplexity": {k: _round(v) for k, v in self.perplexity.items()},
            "mean_nll": {k: _round(v) for k, v in self.nll.items()},
            "timings_s": self.timings,
        }
        if self.residual_absmax is not None:
            per_channel = self.residual_absmax.max(axis=0)
            data["residual_stream"] = {
                "points": len(self.residual_points),
                "max_abs": _round(float(per_channel.max())),
                "median_channel_max_abs": _round(float(np.median(per_channel))),
                "max_over_median": _round(float(per_channel.max() / max(np.median(per_channel), 1e-30))),
                "per_channel_max_abs": [_round(float(v)) for v in per_channel],
            }
        return data


def _round(value: float) -> float:
    return float(f"{value:.6g}") if math.isfinite(value) else value


# ------------------------------------------------------------------------------------------------ tokens


def load_tokens(path: str | Path) -> np.ndarray:
    """A 1-D integer array of token ids from ``.npy`` (written by scripts/export_smollm2.py)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: token file not found (scripts/export_smollm2.py writes tokens.npy)")
    try:
        tokens = np.load(path, allow_pickle=False)
    except Exception as exc:  # numpy raises several types for a bad file
        raise InputError(f"{path}: not a .npy array ({exc})") from exc
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise InputError(f"{path}: expected a 1-D integer array of token ids, got {tokens.dtype} {tokens.shape}")
    return tokens.astype(np.int64)


def split_windows(tokens: np.ndarray, config: EvalConfig) -> tuple[np.ndarray, np.ndarray]:
    """Scored windows from the start of the text, calibration windows right after them (never scored)."""
    length, scored, held = config.window_len, config.windows, config.calibration_windows
    needed = (scored + held) * length
    if tokens.size < needed:
        raise InputError(f"token array has {tokens.size} ids; {scored} + {held} windows of {length} need {needed}")
    windows = tokens[:needed].reshape(scored + held, length)
    return windows[:scored], windows[scored:]


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


# ------------------------------------------------------------------------------------------ perplexity


def window_nll(logits: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of tokens 1..L-1 given their prefix, in float64."""
    scores = np.asarray(logits, dtype=np.float64).reshape(window.size, -1)[:-1]
    if int(window.max()) >= scores.shape[1]:
        raise InputError(f"token id {int(window.max())} is outside the model's vocabulary of {scores.shape[1]}")
    top = scores.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(scores - top).sum(axis=1)) + top[:, 0]
    return log_norm - scores[np.arange(window.size - 1), window[1:]]


@dataclass
class Scored:
    nll: float
    absmax: np.ndarray | None


def score(
    session: Any, windows: np.ndarray, extra_outputs: Sequence[str] = (), hints: dict[str, int] | None = None
) -> Scored:
    """Mean NLL over all windows; with ``extra_outputs``, also their per-channel max |x| (last axis)."""
    outputs_named = [o.name for o in session.get_outputs()]
    logits_name = "logits" if "logits" in outputs_named else outputs_named[0]
    names = [logits_name, *extra_outputs]
    inputs = session_inputs(session)
    total, count = 0.0, 0
    absmax: np.ndarray | None = None
    for window in windows:
        outputs = session.run(names, _feeds(inputs, window, hints))
        nll = window_nll(outputs[0], window)
        total, count = total + float(nll.sum()), count + nll.size
        if extra_outputs:
            stats = np.stack([np.abs(o.reshape(-1, o.shape[-1])).max(axis=0) for o in outputs[1:]])
            absmax = stats if absmax is None else np.maximum(absmax, stats)
    return Scored(total / count, absmax)


# -------------------------------------------------------------------------------------- graph helpers


def residual_points(analysis: Analysis) -> list[str]:
    """The residual stream after the embedding and after every residual Add, in graph order."""
    stream = analysis.stream
    points = [stream.embedding.output] if stream.embedding is not None else list(stream.entries)
    points += [e.add.output[0] for e in stream.writers if e.add is not None and e.add.op_type == "Add"]
    return points


def lm_head_nodes(analysis: Analysis) -> list[str]:
    """Names of the lm_head linears (readers of the final norm)."""
    roles = analysis.roles
    return [entry.linear.node.name for entry in roles.final.readers] if roles.final is not None else []


def online_nodes(model: onnx.ModelProto) -> list[str]:
    return [n.name for n in model.graph.node if n.name.startswith(ONLINE_PREFIX)]


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


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Expose intermediate tensors as graph outputs (type float; shape left to the runtime)."""
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return model


def _load_full(path: Path) -> onnx.ModelProto:
    load_model(path)  # one-line errors for a missing or corrupt file
    model = onnx.load(str(path), load_external_data=True)
    name_nodes(model)
    return model


def _too_big(model: onnx.ModelProto) -> bool:
    return model.ByteSize() > PROTOBUF_LIMIT


@contextlib.contextmanager
def _session(model: onnx.ModelProto | Path, providers: list[str] | None, reference_qdq: bool = False):
    """An ORT session; ``reference_qdq`` runs QDQ pairs as written (dequantize, then the float op).

    That is the ONNX meaning of a QDQ model. Without it ORT fuses QDQ into integer kernels, whose u8 x s8
    products saturate int16 on x86 CPUs without VNNI (ORT's own docs say to use reduce_range there),
    which turns a sound quantization into garbage on such machines.
    """
    import onnxruntime as ort

    from spinquant_onnx.core.equivalence import resolve_providers

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if reference_qdq:
        options.add_session_config_entry("session.disable_quant_qdq", "1")
    with tempfile.TemporaryDirectory(prefix="spinquant_eval_session_") as tmp:
        if isinstance(model, onnx.ModelProto):
            if _too_big(model):
                path = Path(tmp) / "model.onnx"
                onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
                source: str | bytes = str(path)
            else:
                source = model.SerializeToString()
        else:
            source = str(model)
        try:
            yield ort.InferenceSession(source, options, providers=resolve_providers(providers or ["cpu"]))
        except InputError:
            raise
        except Exception as exc:  # ORT raises several unrelated types
            raise InputError(f"onnxruntime cannot load or run the model: {exc}") from exc


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
    """Static W8A8 QDQ on linears (MatMul with a constant weight): int8 per-channel weights, uint8 activations."""
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


# ------------------------------------------------------------------------------------------------ driver


def evaluate_model(
    path: str | Path,
    tokens: np.ndarray,
    config: EvalConfig,
    log: Log | None = None,
    label: str = "model",
) -> ModelResult:
    """Perplexity of one model for each row in ``config.rows`` (quantized copies live in a temp dir)."""
    path = Path(path)
    say = log or (lambda _: None)
    scored, calibration = split_windows(tokens, config)
    result = ModelResult(str(path))
    graph = load_model(path)
    _check_vocab(graph, path, tokens[: scored.size + calibration.size])
    name_nodes(graph)
    analysis = functools.cache(lambda: analyze(graph, path.parent))  # matched once, only if a row needs it
    keep_float = online_nodes(graph)
    if not config.quantize_lm_head:
        keep_float += lm_head_nodes(analysis())
    hints = cache_hints(graph, analysis)
    with tempfile.TemporaryDirectory(prefix="spinquant_eval_") as tmp:
        for row in config.rows:
            started = time.perf_counter()
            say(f"[{label}] {ROW_LABELS[row]} ...")
            if row == "float":
                result.nll[row] = _score_float(path, scored, config, result, analysis, hints)
            else:
                quantized = _quantized(row, path, Path(tmp), calibration, keep_float, hints)
                with _session(quantized, config.providers, reference_qdq=row == "w8a8") as session:
                    result.nll[row] = score(session, scored, hints=hints).nll
            result.perplexity[row] = math.exp(result.nll[row])
            result.timings[row] = round(time.perf_counter() - started, 2)
            say(f"[{label}] {ROW_LABELS[row]}: perplexity {result.perplexity[row]:.3f}")
    return result


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


def _check_vocab(graph: onnx.ModelProto, path: Path, used: np.ndarray) -> None:
    from spinquant_onnx.core.equivalence import infer_vocab_size

    vocab = infer_vocab_size(graph)
    if vocab is not None and (int(used.max()) >= vocab or int(used.min()) < 0):
        raise InputError(
            f"token id {int(used.max())} is outside the model's vocabulary of {vocab} ({path}); "
            "were the tokens made with this model's tokenizer?"
        )


def _score_float(
    path: Path,
    scored: np.ndarray,
    config: EvalConfig,
    result: ModelResult,
    analysis: Callable[[], Analysis],
    hints: dict[str, int],
) -> float:
    """Float NLL; with ``config.activations``, the residual stream's per-channel max |x| in the same pass."""
    if not config.activations:
        with _session(path, config.providers) as session:
            return score(session, scored, hints=hints).nll
    model = _load_full(path)
    points = residual_points(analysis())  # tensor names: the same in the full model as in ``graph``
    with _session(with_outputs(model, points), config.providers) as session:
        outcome = score(session, scored, points, hints)
    result.residual_absmax, result.residual_points = outcome.absmax, points
    return outcome.nll


def _quantized(
    row: str, path: Path, tmp: Path, calibration: np.ndarray, keep_float: list[str], hints: dict[str, int]
) -> Path:
    """The quantized copy for ``row``; both W8A8 rows share one file (only the kernels differ)."""
    if row.startswith("w8a8"):
        target = tmp / "w8a8.onnx"
        return target if target.is_file() else quantize_w8a8(path, target, calibration, keep_float, hints)
    return quantize_w4(path, tmp / f"{row}.onnx", int(row.split("-")[1]), keep_float)


def evaluate(
    model: str | Path,
    tokens: np.ndarray,
    config: EvalConfig,
    rotated: str | Path | None = None,
    log: Log | None = None,
) -> dict[str, ModelResult]:
    """Results for the original model and, when given, its rotated twin (same windows, same rows)."""
    first = "original" if rotated is not None else "model"
    results = {first: evaluate_model(model, tokens, config, log, first)}
    if rotated is not None:
        results["rotated"] = evaluate_model(rotated, tokens, config, log, "rotated")
    return results


# ------------------------------------------------------------------------------------------------ output


def schemes(config: EvalConfig) -> dict[str, str]:
    head = "lm_head quantized too" if config.quantize_lm_head else "lm_head float"
    w4 = f"onnxruntime MatMulNBitsQuantizer DEFAULT (round to nearest), 4-bit symmetric, {head}, online rotations float"
    return {
        "w8a8": "onnxruntime quantize_static: QDQ on MatMuls with a constant weight, per-channel int8 weights, "
        f"per-tensor uint8 activations, MinMax calibration on the held-out windows; {head}, online rotations "
        "float; run with QDQ fusion off (session.disable_quant_qdq), i.e. exactly dequantize-then-float",
        "w8a8-int": "the same W8A8 model run by onnxruntime's fused int8 kernels (u8s8; saturates without VNNI)",
        "w4-128": f"{w4}, block 128",
        "w4-32": f"{w4}, block 32",
    }


def to_json(results: dict[str, ModelResult], config: EvalConfig, tokens_source: str, tokens: int) -> dict:
    return {
        "tool": "spinquant-onnx eval",
        "tokens": {"source": tokens_source, "count": tokens},
        "windows": config.windows,
        "window_len": config.window_len,
        "calibration_windows": config.calibration_windows,
        "scored_tokens": config.windows * (config.window_len - 1),
        "schemes": {row: text for row, text in schemes(config).items() if row in config.rows},
        "models": {name: r.to_dict() for name, r in results.items()},
    }


def table(results: dict[str, ModelResult]) -> str:
    """Rows = schemes, columns = models with each one's ratio to its own float perplexity."""
    names = list(results)
    rows = [r for r in ROWS if any(r in res.perplexity for res in results.values())]
    lines = [["scheme", *[f"{n} ppl" for n in names], *[f"{n} / float" for n in names]]]
    for row in rows:
        cells = [ROW_LABELS[row]]
        cells += [f"{results[n].perplexity[row]:.3f}" if row in results[n].perplexity else "-" for n in names]
        for n in names:
            base, value = results[n].perplexity.get("float"), results[n].perplexity.get(row)
            cells.append(f"{value / base:.3f}x" if base and value else "-")
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    text = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(line)).rstrip() for line in lines]
    for n in names:
        stats = results[n].to_dict().get("residual_stream")
        if stats:
            text.append(
                f"{n}: residual stream max |x| {stats['max_abs']:.4g}, largest channel max / median channel max "
                f"{stats['max_over_median']:.3g} ({stats['points']} points)"
            )
    return "\n".join(text)


def plot(results: dict[str, ModelResult], out: str | Path) -> None:
    """Residual per-channel max |x| (one panel per model, same scale) above perplexity bars per scheme."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    with_act = [n for n in names if results[n].residual_absmax is not None]
    fig, axes = plt.subplots(len(with_act) + 1, 1, figsize=(10, 3.2 * (len(with_act) + 1)), squeeze=False)
    top = max((float(results[n].residual_absmax.max()) for n in with_act), default=1.0)
    for ax, name in zip(axes[:, 0], with_act, strict=False):
        per_point = results[name].residual_absmax
        channels = np.arange(per_point.shape[1])
        ax.plot(channels, np.median(per_point, axis=0), lw=0.8, color="tab:orange", label="median over residual points")
        ax.plot(channels, per_point.max(axis=0), lw=0.8, color="tab:blue", label="max over residual points")
        ax.set_yscale("log")
        ax.set_ylim(top=top * 2)
        ax.set_title(f"{name}: residual stream per-channel max |x| ({per_point.shape[0]} points)")
        ax.set_xlabel("channel")
        ax.legend(loc="upper right", fontsize=8)
    _bars(axes[-1, 0], results)
    fig.tight_layout()
    fig.savefig(str(out), dpi=120)
    plt.close(fig)


def _bars(ax: Any, results: dict[str, ModelResult]) -> None:
    names = list(results)
    rows = [r for r in ROWS if any(r in res.perplexity for res in results.values())]
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [results[name].perplexity.get(r, np.nan) for r in rows]
        drawn = ax.bar(np.arange(len(rows)) + i * width, values, width, label=name)
        ax.bar_label(drawn, fmt="%.1f", fontsize=8)
    ax.set_xticks(np.arange(len(rows)) + width * (len(names) - 1) / 2, [ROW_LABELS[r] for r in rows], fontsize=8)
    ax.set_ylabel("perplexity")
    finite = [v for res in results.values() for v in res.perplexity.values() if math.isfinite(v)]
    if finite and max(finite) > 20 * min(finite):
        ax.set_yscale("log")
    ax.legend()
