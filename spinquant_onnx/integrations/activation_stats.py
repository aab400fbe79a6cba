"""The statistics ``rotate --smooth`` and ``--float-channels`` need: o_proj's and down_proj's input max |x|
per channel, measured.

The original (unrotated) model runs in onnxruntime on calibration windows of a token file, with those
inputs exposed as extra outputs; the per-channel maxima over every token are what ``rewrite.smooth`` turns
into SmoothQuant scales and ``rewrite.float_channels`` ranks. Windows start at ``offset`` (default: past
the text ``eval`` scores and calibrates on), so nothing is fit to the text it is judged on.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from spinquant_onnx.errors import InputError, SpinQuantError
from spinquant_onnx.integrations.evaluate import _session, load_tokens, with_outputs
from spinquant_onnx.integrations.quantize import _feeds, _load_full, cache_hints, session_inputs
from spinquant_onnx.match.analysis import Analysis, analyze
from spinquant_onnx.rewrite.smooth import SITES, Smoothing

DEFAULT_WINDOWS, DEFAULT_WINDOW_LEN, DEFAULT_OFFSET = 4, 256, 4096


def site_inputs(analysis: Analysis, sites: tuple[str, ...]) -> list[str]:
    """The activation input tensors of every o_proj (``o``) and down_proj (``down``), in block order."""
    kinds = {"o": "attention", "down": "mlp"}
    wanted = {kinds[s] for s in sites}
    names = [
        entry.linear.node.input[entry.linear.activation_slot]
        for block in analysis.roles.blocks
        for part in block.parts
        if part.kind in wanted
        for entry in part.writers
    ]
    if not names:
        raise InputError(f"--calibration: no {' or '.join(sites)} projection found in the matched blocks")
    return names


def collect_maxima(
    model_path: str | Path,
    tokens: np.ndarray,
    *,
    sites: tuple[str, ...] = SITES,
    windows: int = DEFAULT_WINDOWS,
    window_len: int = DEFAULT_WINDOW_LEN,
    offset: int = DEFAULT_OFFSET,
    providers: list[str] | None = None,
    asked_by: str = "--calibration",
    advice: str = "lower --calibration-offset or --calibration-windows",
) -> dict[str, np.ndarray]:
    """Per-channel max |x| of each smoothed linear's input (float64), keyed by the input tensor's name.
    ``asked_by`` and ``advice`` word a refusal for the option that needs the statistics."""
    path = Path(model_path)
    needed = offset + windows * window_len
    if windows < 1 or window_len < 2 or offset < 0:
        raise InputError(f"{asked_by}: need at least 1 window of 2 tokens and a non-negative offset")
    if tokens.size < needed:
        raise InputError(
            f"{asked_by}: the token file has {tokens.size} ids; {windows} windows of {window_len} from offset "
            f"{offset} need {needed} ({advice})"
        )
    model = _load_full(path)
    try:
        analysis = analyze(model, path.parent)
        names = site_inputs(analysis, sites)
    except SpinQuantError as exc:
        raise InputError(f"--calibration: {path}: {exc}") from None
    hints = cache_hints(model, lambda: analysis)
    calibration = tokens[offset:needed].reshape(windows, window_len)
    maxima: dict[str, np.ndarray] = {}
    with _session(with_outputs(model, names), providers) as session:
        inputs = session_inputs(session)
        for window in calibration:
            for name, value in zip(names, session.run(names, _feeds(inputs, window, hints)), strict=True):
                found = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0).astype(np.float64)
                maxima[name] = found if name not in maxima else np.maximum(maxima[name], found)
    return maxima


def calibrate(
    model_path: str | Path,
    tokens_path: str | Path,
    *,
    sites: tuple[str, ...] = SITES,
    windows: int = DEFAULT_WINDOWS,
    window_len: int = DEFAULT_WINDOW_LEN,
    offset: int = DEFAULT_OFFSET,
    providers: list[str] | None = None,
) -> tuple[dict[str, np.ndarray], str]:
    """The maxima from a token file, and a line saying where they came from (for the report)."""
    tokens = load_tokens(tokens_path)
    maxima = collect_maxima(
        model_path, tokens, sites=sites, windows=windows, window_len=window_len, offset=offset, providers=providers
    )
    return maxima, f"{tokens_path}: {windows} windows of {window_len} tokens from offset {offset}"


def smoothing_from_tokens(
    model_path: str | Path,
    tokens_path: str | Path,
    *,
    alpha: float = 0.5,
    sites: tuple[str, ...] = SITES,
    **calibration: Any,
) -> Smoothing:
    """``Smoothing`` for ``convert(..., smooth=...)``: options checked first, then the maxima measured."""
    Smoothing({}, alpha, sites)  # refuses a bad alpha or site list before the model runs
    maxima, source = calibrate(model_path, tokens_path, sites=sites, **calibration)
    return Smoothing(maxima, alpha, sites, source)
