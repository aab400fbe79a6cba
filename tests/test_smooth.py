"""`rotate --smooth` on committed fixtures: exact with and without R2/R4, really scales, refuses what it cannot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FIXTURES

from spinquant_onnx.cli import main
from spinquant_onnx.core.equivalence import compare_models
from spinquant_onnx.core.pipeline import convert
from spinquant_onnx.errors import InputError, UnsupportedGraphError
from spinquant_onnx.integrations.activation_stats import collect_maxima, site_inputs, smoothing_from_tokens
from spinquant_onnx.integrations.dispatch import apply_spinquant
from spinquant_onnx.match.analysis import analyze
from spinquant_onnx.rewrite.smooth import Smoothing, smoothing_scales

EXACT = 1e-5
WINDOWS = dict(windows=2, window_len=32, offset=64)
# GQA (Llama, Mistral), v bias (Qwen2), fused qkv and fused gate_up (Phi-3), both exporters
CASES = ["llama_ts.onnx", "llama_dynamo.onnx", "mistral_ts.onnx", "qwen2_ts.onnx", "phi3_ts.onnx", "phi3_dynamo.onnx"]


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokens") / "tokens.npy"
    np.save(path, np.random.default_rng(3).integers(0, 128, size=4096).astype(np.int32))
    return path


def _smoothing(name: str, token_file: Path, alpha: float = 0.5, sites: tuple[str, ...] = ("down", "o")) -> Smoothing:
    return smoothing_from_tokens(FIXTURES / name, token_file, alpha=alpha, sites=sites, **WINDOWS)


@pytest.mark.parametrize("rotations", [{}, {"r2": True, "r4": True}], ids=["smooth", "smooth-r2-r4"])
@pytest.mark.parametrize("name", CASES)
def test_smoothing_is_exact(name: str, rotations: dict, token_file: Path) -> None:
    original = onnx.load(str(FIXTURES / name))
    model = onnx.load(str(FIXTURES / name))
    report = apply_spinquant(model, smooth=_smoothing(name, token_file), **rotations).to_dict()
    result = compare_models(original, model, providers=["cpu"], threshold=EXACT)
    assert result.rel_l2 < EXACT, result.to_dict()
    assert result.argmax_agreement == 1.0
    layers = report["rotation"]["smooth"]["layers"]
    assert sorted({entry["site"] for entry in layers}) == ["down", "o"]
    assert all(entry["scale_max"] > entry["scale_min"] > 0 for entry in layers)  # real, per-channel scales


def test_fused_projections_scale_only_the_up_and_v_columns(token_file: Path) -> None:
    model = onnx.load(str(FIXTURES / "phi3_ts.onnx"))  # gate_up [64, 192] (up = 96..192), qkv (v = 96..128)
    layers = apply_spinquant(model, smooth=_smoothing("phi3_ts.onnx", token_file)).to_dict()["rotation"]["smooth"]
    columns = {(entry["site"], tuple(entry["columns"])) for entry in layers["layers"]}
    assert columns == {("down", (96, 192)), ("o", (96, 128))}


def test_full_migration_flattens_the_down_input(token_file: Path, tmp_path: Path) -> None:
    """alpha = 1: s = max|x|, so on the windows the scales came from every channel's max |x / s| is 1."""
    name = "llama_outlier_ts.onnx"
    tokens = np.load(token_file).astype(np.int64)
    before = collect_maxima(FIXTURES / name, tokens, sites=("down",), **WINDOWS)
    assert max(v.max() / np.median(v) for v in before.values()) > 1.5  # the input really is uneven
    out = tmp_path / "smoothed.onnx"
    convert(FIXTURES / name, out, smooth=_smoothing(name, token_file, alpha=1.0, sites=("down",)))
    after = collect_maxima(out, tokens, sites=("down",), **WINDOWS)
    assert len(after) == 2
    for values in after.values():
        np.testing.assert_allclose(values, 1.0, rtol=1e-4)


def test_scales_follow_smoothquant() -> None:
    x, w = np.array([4.0, 1.0, 0.0, 9.0]), np.array([1.0, 4.0, 2.0, 0.0])
    np.testing.assert_allclose(smoothing_scales(x, w, 0.5), [2.0, 0.5, 1.0, 1.0])  # zero on a side: no scale
    np.testing.assert_allclose(smoothing_scales(x, w, 1.0), [4.0, 1.0, 1.0, 1.0])


def test_a_non_gated_mlp_is_refused_and_nothing_is_written(token_file: Path, tmp_path: Path) -> None:
    name = "families/gpt2_ts17.onnx"  # act(x W_fc) W_proj: GELU does not commute with a scale
    out = tmp_path / "gpt2.onnx"
    with pytest.raises(UnsupportedGraphError, match="not gated.*not exact.*--smooth-sites o"):
        convert(FIXTURES / name, out, smooth=_smoothing(name, token_file, sites=("down",)))
    assert not out.exists()


def test_attention_only_smoothing_of_a_non_gated_model_is_exact(token_file: Path) -> None:
    name = "families/starcoder2_ts17.onnx"
    original, model = onnx.load(str(FIXTURES / name)), onnx.load(str(FIXTURES / name))
    apply_spinquant(model, smooth=_smoothing(name, token_file, sites=("o",)))
    result = compare_models(original, model, providers=["cpu"], threshold=EXACT)
    assert result.rel_l2 < EXACT and result.argmax_agreement == 1.0


def test_bad_options_and_foreign_statistics_are_refused(token_file: Path) -> None:
    with pytest.raises(InputError, match="--smooth-alpha"):
        Smoothing({}, alpha=1.5)
    with pytest.raises(InputError, match="--smooth-sites"):
        Smoothing({}, sites=("qkv",))
    other = _smoothing("qwen2_ts.onnx", token_file)  # statistics of another model's tensors
    model = onnx.load(str(FIXTURES / "llama_dynamo.onnx"))
    names = set(site_inputs(analyze(model, FIXTURES), ("down", "o")))
    assert not names & set(other.maxima)
    with pytest.raises(InputError, match="no activation statistics"):
        apply_spinquant(model, smooth=other)


CALIBRATION = ["--calibration-windows", "2", "--calibration-window-len", "32", "--calibration-offset", "64"]


def test_cli_rotate_smooth_and_float_channels_validate(token_file: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.onnx"
    args = ["rotate", str(FIXTURES / "llama_ts.onnx"), str(out), "--r2", "--r4", "--calibration", str(token_file)]
    args += [*CALIBRATION, "--smooth", "--smooth-alpha", "0.4", "--float-channels", "3", "--validate"]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "smoothed down/o inputs (alpha 0.4) at 4 sites" in text
    assert "3 down_proj input channels on a float side path in 2 blocks" in text and "validated on" in text


@pytest.mark.parametrize("flag", [["--smooth"], ["--float-channels", "2"]])
def test_cli_refuses_smoothing_without_statistics(flag: list[str], tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.onnx"
    assert main(["rotate", str(FIXTURES / "llama_ts.onnx"), str(out), *flag]) == 2
    assert "needs activation statistics: add --calibration TOKENS.npy" in capsys.readouterr().err
    assert not out.exists()
