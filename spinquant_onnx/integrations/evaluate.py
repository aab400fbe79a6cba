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
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper

from spinquant_onnx.errors import InputError
from spinquant_onnx.integrations.quantize import (
    _feeds,
    _load_full,
    _too_big,
    cache_hints,
    excluded_nodes,
    name_nodes,
    quantize_w4,
    quantize_w4a8,
    quantize_w8a8,
    session_inputs,
)
from spinquant_onnx.integrations.sensitivity import FAMILIES, PREFIX, Variants, families
from spinquant_onnx.io.model_file import load_model
from spinquant_onnx.match.analysis import Analysis, analyze

SENSITIVITY_ROWS = tuple(PREFIX + family for family in FAMILIES)
ROWS = ("float", "w8a8", *SENSITIVITY_ROWS, "w8a8-int", "w4a8-128", "w4a8-32", "w4-128", "w4-32")
DEFAULT_ROWS = ("float", "w8a8", "w4-128", "w4-32")
ROW_LABELS = {
    "float": "float",
    "w8a8": "W8A8 (static QDQ, MinMax)",
    **{PREFIX + family: f"W8A8, {label}" for family, label in FAMILIES.items()},
    "w8a8-int": "W8A8, ORT int8 kernels",
    "w4a8-128": "W4A8 (int4 RTN block 128, W8A8's activations)",
    "w4a8-32": "W4A8 (int4 RTN block 32, W8A8's activations)",
    "w4-128": "W4 RTN block 128",
    "w4-32": "W4 RTN block 32",
}
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
    return list(dict.fromkeys(points))  # one Add with several writers (MoE experts, a float side path) once


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """Expose intermediate tensors as graph outputs (type float; shape left to the runtime)."""
    present = {o.name for o in model.graph.output}
    for name in names:
        if name not in present:
            model.graph.output.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, None))
    return model


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
    keep_float = excluded_nodes(graph, None if config.quantize_lm_head else analysis(), config.quantize_lm_head)
    hints = cache_hints(graph, analysis)
    if any(row.startswith(PREFIX) for row in config.rows):
        sites = families(analysis, str(path))  # refused before any quantization when the roles are not found
    with tempfile.TemporaryDirectory(prefix="spinquant_eval_") as tmp:
        variants = functools.cache(
            lambda: Variants(path, _quantized("w8a8", path, Path(tmp), calibration, keep_float, hints), sites)
        )
        for row in config.rows:
            started = time.perf_counter()
            say(f"[{label}] {ROW_LABELS[row]} ...")
            if row == "float":
                result.nll[row] = _score_float(path, scored, config, result, analysis, hints)
            else:
                family = row.startswith(PREFIX)
                quantized: Path | onnx.ModelProto = (
                    variants().model(row.removeprefix(PREFIX))
                    if family
                    else _quantized(row, path, Path(tmp), calibration, keep_float, hints)
                )
                qdq = row == "w8a8" or family or row.startswith("w4a8")
                with _session(quantized, config.providers, reference_qdq=qdq) as session:
                    result.nll[row] = score(session, scored, hints=hints).nll
            result.perplexity[row] = math.exp(result.nll[row])
            result.timings[row] = round(time.perf_counter() - started, 2)
            say(f"[{label}] {ROW_LABELS[row]}: perplexity {result.perplexity[row]:.3f}")
    return result


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
    if row.startswith(("w8a8", "w4a8")):
        target = tmp / "w8a8.onnx"
        if not target.is_file():
            quantize_w8a8(path, target, calibration, keep_float, hints)
        return quantize_w4a8(path, target, tmp / f"{row}.onnx", _block(row)) if row.startswith("w4a8") else target
    return quantize_w4(path, tmp / f"{row}.onnx", _block(row), keep_float)


def _block(row: str) -> int:
    return int(row.split("-")[1])


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
        "w8a8": "onnxruntime quantize_static: QDQ on MatMuls (in QDQ format ORT quantizes every MatMul's inputs "
        "and output, attention's two activation MatMuls included; MatMulConstBOnly only applies to QOperator), "
        "per-channel int8 weights, per-tensor uint8 activations, MinMax calibration on the held-out windows; "
        f"{head}, online rotations float; run with QDQ fusion off (session.disable_quant_qdq), i.e. exactly "
        "dequantize-then-float",
        **{
            row: f"the W8A8 model's quantizers for {FAMILIES[row.removeprefix(PREFIX)]} (same scales), the rest float"
            for row in SENSITIVITY_ROWS
        },
        "w8a8-int": "the same W8A8 model run by onnxruntime's fused int8 kernels (u8s8; saturates without VNNI)",
        **{
            f"w4a8-{b}": f"the W8A8 model with each weight's DequantizeLinear replaced by the float weight at the "
            f"int4 RTN grid of block {b} (MatMulNBits' symmetric scheme): int4 weights, W8A8's activations"
            for b in (128, 32)
        },
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
