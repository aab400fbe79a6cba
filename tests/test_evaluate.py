"""`spinquant-onnx eval` on a committed fixture: perplexity is exp(mean NLL), quantized rows run, R1 is exact."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from scipy.special import log_softmax

from spinquant_onnx.cli import main
from spinquant_onnx.core.pipeline import convert
from spinquant_onnx.errors import InputError
from spinquant_onnx.integrations import evaluate as ev

VOCAB, HIDDEN, LAYERS = 128, 64, 2
CONFIG = dict(windows=3, window_len=16, calibration_windows=2)


@pytest.fixture(scope="module")
def model(fixtures_dir: Path) -> Path:
    return fixtures_dir / "llama_ts.onnx"


@pytest.fixture(scope="module")
def rotated(model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rotated") / "llama_ts_r1.onnx"
    convert(model, out)
    return out


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(7).integers(0, VOCAB, size=5 * 16 + 3).astype(np.int64)


def independent_nll(path: Path, windows: np.ndarray) -> float:
    """Mean next-token NLL straight from onnxruntime logits and scipy's log_softmax."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    losses = []
    for window in windows:
        ids = window[None, :]
        logits = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})[0][0]
        logp = log_softmax(logits.astype(np.float64), axis=-1)
        losses.extend(-logp[np.arange(window.size - 1), window[1:]])
    return float(np.mean(losses))


def test_float_perplexity_is_exp_mean_nll(model: Path, tokens: np.ndarray) -> None:
    config = ev.EvalConfig(rows=("float",), **CONFIG)
    result = ev.evaluate_model(model, tokens, config)
    scored, _ = ev.split_windows(tokens, config)
    expected = math.exp(independent_nll(model, scored))
    assert math.isfinite(result.perplexity["float"]) and result.perplexity["float"] > 1
    assert result.perplexity["float"] == pytest.approx(expected, rel=1e-6)
    # the residual stream seen under the same pass: embedding + 2 Adds per layer, hidden channels each
    assert result.residual_absmax.shape == (1 + 2 * LAYERS, HIDDEN)
    assert np.all(result.residual_absmax > 0)


def test_quantized_rows_run_and_differ_from_float(model: Path, tokens: np.ndarray) -> None:
    config = ev.EvalConfig(rows=("float", "w8a8", "w8a8-int", "w4-128", "w4-32"), activations=False, **CONFIG)
    result = ev.evaluate_model(model, tokens, config)
    for row in config.rows:
        assert math.isfinite(result.perplexity[row]) and result.perplexity[row] > 1, row
    for row in ("w8a8", "w4-128", "w4-32"):
        assert result.perplexity[row] != pytest.approx(result.perplexity["float"], rel=1e-6), row


def test_rotated_float_perplexity_matches_original(model: Path, rotated: Path, tokens: np.ndarray) -> None:
    config = ev.EvalConfig(rows=("float",), **CONFIG)
    results = ev.evaluate(model, tokens, config, rotated=rotated)
    original, turned = results["original"], results["rotated"]
    assert turned.perplexity["float"] == pytest.approx(original.perplexity["float"], rel=1e-4)
    # same residual points, but the rotation moved the energy between channels
    assert turned.residual_absmax.shape == original.residual_absmax.shape
    assert not np.allclose(turned.residual_absmax, original.residual_absmax, rtol=1e-3)


def test_window_nll_matches_log_softmax() -> None:
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=30.0, size=(1, 9, 11)).astype(np.float32)
    window = rng.integers(0, 11, size=9)
    expected = -log_softmax(logits[0].astype(np.float64), axis=-1)[np.arange(8), window[1:]]
    np.testing.assert_allclose(ev.window_nll(logits, window), expected, rtol=1e-12)


def test_refusals(model: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="windows of 16 need 80"):
        ev.split_windows(np.zeros(50, dtype=np.int64), ev.EvalConfig(**CONFIG))
    too_big = np.full(5 * 16, VOCAB, dtype=np.int64)
    with pytest.raises(InputError, match="outside the model's vocabulary"):
        ev.evaluate_model(model, too_big, ev.EvalConfig(rows=("float",), activations=False, **CONFIG))
    bad = tmp_path / "tokens.npy"
    np.save(bad, np.zeros((2, 3), dtype=np.float32))
    with pytest.raises(InputError, match="1-D integer array"):
        ev.load_tokens(bad)
    with pytest.raises(InputError, match="unknown eval row"):
        ev.EvalConfig(rows=("w3",))


def test_cli_writes_json_and_plot(
    model: Path, rotated: Path, tokens: np.ndarray, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    pytest.importorskip("matplotlib")
    np.save(tmp_path / "tokens.npy", tokens.astype(np.int32))
    out, png = tmp_path / "eval.json", tmp_path / "eval.png"
    argv = [
        "eval",
        str(model),
        "--rotated",
        str(rotated),
        "--tokens",
        str(tmp_path / "tokens.npy"),
        "--windows",
        "3",
        "--window-len",
        "16",
        "--rows",
        "float,w4-32",
        "--json",
        str(out),
        "--plot",
        str(png),
        "--quiet",
    ]
    assert main(argv) == 0
    data = json.loads(out.read_text())
    assert set(data["models"]) == {"original", "rotated"}
    assert set(data["models"]["rotated"]["perplexity"]) == {"float", "w4-32"}
    assert data["scored_tokens"] == 3 * 15
    assert len(data["models"]["original"]["residual_stream"]["per_channel_max_abs"]) == HIDDEN
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "W4 RTN block 32" in capsys.readouterr().out
    assert main(["eval", str(model), "--tokens", str(tmp_path / "missing.npy")]) == 2
