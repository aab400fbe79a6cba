"""eval on KV-cache exports (optimum, onnxruntime-genai): an empty past is fed and the windows scored (#19)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import FIXTURES
from scipy.special import log_softmax

from spinquant_onnx.cli import main
from spinquant_onnx.core.pipeline import convert
from spinquant_onnx.integrations import evaluate as ev

EXPORTERS = FIXTURES / "exporters"
CONFIG = dict(windows=2, window_len=12, calibration_windows=1, rows=("float", "w8a8"))


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 64, size=3 * 12 + 1).astype(np.int64)


def explicit_nll(path: Path, windows: np.ndarray, head_dim: int) -> float:
    """Mean NLL straight from onnxruntime, with every past input fed by hand as a [1, kv, 0, head_dim] zero."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    losses = []
    for window in windows:
        ids = window[None, :]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        for spec in session.get_inputs():
            if spec.name == "position_ids":
                feeds[spec.name] = np.arange(ids.shape[1], dtype=np.int64)[None]
            elif spec.name.startswith("past_key_values"):
                feeds[spec.name] = np.zeros((1, spec.shape[1], 0, head_dim), dtype=np.float32)
        logits = session.run(["logits"], feeds)[0][0]
        logp = log_softmax(logits.astype(np.float64), axis=-1)
        losses.extend(-logp[np.arange(window.size - 1), window[1:]])
    return float(np.mean(losses))


@pytest.mark.parametrize("model", ["optimum_llama.onnx", "genai_llama/model.onnx"])
def test_kv_cache_exports_are_scored_with_an_empty_past(model: str, tokens: np.ndarray, tmp_path: Path) -> None:
    path = EXPORTERS / model
    rotated = tmp_path / "rotated.onnx"
    convert(path, rotated)
    config = ev.EvalConfig(**CONFIG)
    results = ev.evaluate(path, tokens, config, rotated=rotated)
    scored, _ = ev.split_windows(tokens, config)
    want = explicit_nll(path, scored, head_dim=16)
    assert results["original"].nll["float"] == pytest.approx(want, rel=1e-6)
    assert results["rotated"].nll["float"] == pytest.approx(want, rel=1e-5)  # R1 keeps the float function
    assert np.isfinite(results["original"].perplexity["w8a8"]) and np.isfinite(results["rotated"].perplexity["w8a8"])
    assert results["original"].residual_absmax is not None


def test_cli_eval_on_optimum_export(tokens: np.ndarray, tmp_path: Path, capfd: pytest.CaptureFixture[str]) -> None:
    np.save(tmp_path / "tokens.npy", tokens)
    out = tmp_path / "eval.json"
    code = main(["eval", str(EXPORTERS / "optimum_qwen2.onnx"), "--tokens", str(tmp_path / "tokens.npy"),
                 "--windows", "2", "--window-len", "12", "--calibration-windows", "1", "--rows", "float",
                 "--json", str(out), "--quiet"])
    assert code == 0, capfd.readouterr().err
    assert json.loads(out.read_text())["models"]["model"]["perplexity"]["float"] > 1


def test_plot_without_matplotlib_fails_before_any_work(tokens: np.ndarray, tmp_path: Path,
                                                        capfd: pytest.CaptureFixture[str],
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    called = []
    monkeypatch.setattr(ev, "evaluate", lambda *a, **k: called.append(a))
    np.save(tmp_path / "tokens.npy", tokens)
    code = main(["eval", str(FIXTURES / "llama_ts.onnx"), "--tokens", str(tmp_path / "tokens.npy"),
                 "--json", str(tmp_path / "out.json"), "--plot", str(tmp_path / "p.png")])
    err = capfd.readouterr().err
    assert code == 2 and not called
    assert err.strip() == ("spinquant-onnx: error: --plot needs matplotlib, which is not installed: "
                           "pip install matplotlib (or: pip install 'spinquant-onnx[plot]')")
    assert not (tmp_path / "out.json").exists() and not (tmp_path / "p.png").exists()
