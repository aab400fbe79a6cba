"""`rotate --float-channels K`: the K largest down_proj input channels on a float side path, exactly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FIXTURES

from spinquant_onnx.core.equivalence import compare_models
from spinquant_onnx.core.pipeline import convert
from spinquant_onnx.errors import InputError
from spinquant_onnx.integrations.activation_stats import collect_maxima
from spinquant_onnx.integrations.dispatch import apply_spinquant
from spinquant_onnx.integrations.evaluate import _session, with_outputs
from spinquant_onnx.integrations.quantize import _feeds, keep_float, session_inputs
from spinquant_onnx.rewrite.smooth import Smoothing

EXACT = 1e-5
WINDOWS = dict(windows=2, window_len=32, offset=64)
CASES = ["llama_ts.onnx", "llama_dynamo.onnx", "qwen2_ts.onnx", "phi3_dynamo.onnx", "llama_outlier_ts.onnx"]
COMBOS = {"alone": {}, "r2-r4": {"r2": True, "r4": True}, "smooth-r2-r4": {"r2": True, "r4": True, "smooth": 0.5}}


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(5).integers(0, 128, size=512).astype(np.int64)


def _maxima(name: str, tokens: np.ndarray) -> dict[str, np.ndarray]:
    return collect_maxima(FIXTURES / name, tokens, **WINDOWS)


@pytest.mark.parametrize("combo", list(COMBOS))
@pytest.mark.parametrize("name", CASES)
def test_float_channels_are_exact(name: str, combo: str, tokens: np.ndarray) -> None:
    maxima, options = _maxima(name, tokens), dict(COMBOS[combo])
    if "smooth" in options:
        options["smooth"] = Smoothing(maxima, options["smooth"])
    original, model = onnx.load(str(FIXTURES / name)), onnx.load(str(FIXTURES / name))
    report = apply_spinquant(model, float_channels=3, activation_maxima=maxima, **options).to_dict()
    result = compare_models(original, model, providers=["cpu"], threshold=EXACT)
    assert result.rel_l2 < EXACT, result.to_dict()
    assert result.argmax_agreement == 1.0
    sites = report["rotation"]["float_channels"]
    assert len(sites) == 2 and all(len(site["channels"]) == 3 for site in sites)
    side = [n.name for n in model.graph.node if n.name.endswith("/matmul") and "/float_channels/" in n.name]
    assert len(side) == 2 and set(side) <= set(keep_float(model))  # quantizers leave the side path float


def test_the_largest_channels_leave_down_proj(tokens: np.ndarray, tmp_path: Path) -> None:
    """down_proj's quantized input keeps every channel's values but the K largest, which are exactly zero."""
    name = "llama_outlier_ts.onnx"
    maxima = _maxima(name, tokens)
    out = tmp_path / "split.onnx"
    report = convert(FIXTURES / name, out, float_channels=4, activation_maxima=maxima).to_dict()
    model = onnx.load(str(out))
    downs = {site["block"]: site for site in report["rotation"]["float_channels"]}
    readers = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[0].endswith("/xm")]
    assert len(readers) == len(downs) == 2
    names = [n.input[0] for n in readers]
    window = tokens[WINDOWS["offset"] : WINDOWS["offset"] + WINDOWS["window_len"]]
    with _session(with_outputs(model, names), None) as session:
        values = session.run(names, _feeds(session_inputs(session), window))
    down_maxima = list(collect_maxima(FIXTURES / name, tokens, sites=("down",), **WINDOWS).values())  # block order
    for site, value, original in zip(downs.values(), values, down_maxima, strict=True):
        assert site["channels"] == sorted(np.argsort(-original)[:4].tolist())  # the K largest, by the statistics
        seen = np.abs(value.reshape(-1, value.shape[-1])).max(axis=0)
        assert np.all(seen[site["channels"]] == 0.0)
        rest = np.delete(seen, site["channels"])
        assert rest.max() <= site["largest_kept_max_abs"] * (1 + 1e-5)
        assert site["peak_max_abs"] > rest.max()


def test_float_channels_without_statistics_are_refused() -> None:
    model = onnx.load(str(FIXTURES / "llama_ts.onnx"))
    with pytest.raises(InputError, match="--float-channels needs activation statistics"):
        apply_spinquant(model, float_channels=2)


def test_eval_sees_the_same_residual_points_after_the_split(tokens: np.ndarray, tmp_path: Path) -> None:
    """The side path's Add is a second writer of the block's residual Add, not a new stream point."""
    from spinquant_onnx.integrations import evaluate as ev

    out = tmp_path / "split.onnx"
    convert(FIXTURES / "llama_ts.onnx", out, float_channels=2, activation_maxima=_maxima("llama_ts.onnx", tokens))
    config = ev.EvalConfig(windows=2, window_len=16, calibration_windows=1, rows=("float",))
    before = ev.evaluate_model(FIXTURES / "llama_ts.onnx", tokens, config)
    after = ev.evaluate_model(out, tokens, config)
    assert after.residual_absmax.shape == before.residual_absmax.shape == (1 + 2 * 2, 64)
    assert after.perplexity["float"] == pytest.approx(before.perplexity["float"], rel=1e-5)
