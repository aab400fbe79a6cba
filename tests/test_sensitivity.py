"""`eval --sensitivity` on committed fixtures: one row per site family, each a real part of the W8A8 model."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import FIXTURES

from spinquant_onnx.cli import main
from spinquant_onnx.errors import InputError
from spinquant_onnx.integrations import evaluate as ev
from spinquant_onnx.integrations.quantize import excluded_nodes, name_nodes, quantize_w8a8
from spinquant_onnx.integrations.sensitivity import FAMILIES, GROUPS, Variants, families
from spinquant_onnx.match.analysis import analyze

VOCAB, LAYERS = 128, 2
CONFIG = dict(windows=3, window_len=16, calibration_windows=2)
MODEL = FIXTURES / "llama_ts.onnx"


@pytest.fixture(scope="module")
def tokens() -> np.ndarray:
    return np.random.default_rng(7).integers(0, VOCAB, size=5 * 16 + 3).astype(np.int64)


@pytest.fixture(scope="module")
def variants(tokens: np.ndarray, tmp_path_factory: pytest.TempPathFactory) -> Variants:
    graph = onnx.load(str(MODEL))
    name_nodes(graph)
    analysis = functools.cache(lambda: analyze(graph, MODEL.parent))
    _, calibration = ev.split_windows(tokens, ev.EvalConfig(**CONFIG))
    target = tmp_path_factory.mktemp("sens") / "w8a8.onnx"
    quantize_w8a8(MODEL, target, calibration, excluded_nodes(graph, analysis(), False))  # as eval: lm_head float
    return Variants(MODEL, target, families(analysis, str(MODEL)))


def test_every_family_row_is_scored_and_moves_away_from_float(tokens: np.ndarray) -> None:
    config = ev.EvalConfig(rows=("float", "w8a8", *ev.SENSITIVITY_ROWS), activations=False, **CONFIG)
    result = ev.evaluate_model(MODEL, tokens, config)
    assert set(result.perplexity) == {"float", "w8a8", *ev.SENSITIVITY_ROWS}
    for row in ev.SENSITIVITY_ROWS:
        value = result.perplexity[row]
        assert math.isfinite(value) and value > 1, row
        # quantizing only this family is not the float model, and not the whole W8A8 model either
        assert value != pytest.approx(result.perplexity["float"], rel=1e-7), row
        assert value != pytest.approx(result.perplexity["w8a8"], rel=1e-7), row


def test_families_follow_the_architecture(variants: Variants) -> None:
    """2 Llama layers: q, k, v read one input each (3 edges), o 1, gate and up 2, down 1, 7 weights."""
    counts = variants.counts()
    assert counts["qkv"] == 3 * LAYERS and counts["o"] == LAYERS
    assert counts["gate_up"] == 2 * LAYERS and counts["down"] == LAYERS
    assert counts["weights"] == 7 * LAYERS  # lm_head stays float (not quantized, not counted)
    assert counts["outputs"] > 0 and counts["other"] > 0  # what ORT's QDQ MatMul adds besides linear inputs


def test_all_families_together_are_the_w8a8_model(variants: Variants, tokens: np.ndarray, tmp_path: Path) -> None:
    scored, calibration = ev.split_windows(tokens, ev.EvalConfig(**CONFIG))
    whole = tmp_path / "w8a8.onnx"
    graph = onnx.load(str(MODEL))
    name_nodes(graph)
    quantize_w8a8(MODEL, whole, calibration, excluded_nodes(graph, analyze(graph, MODEL.parent), False))
    with ev._session(whole, None, reference_qdq=True) as session:
        expected = ev.score(session, scored).nll
    singles = [family for family in FAMILIES if family not in GROUPS]
    with ev._session(variants.model(*singles), None, reference_qdq=True) as session:
        assembled = ev.score(session, scored).nll
    assert assembled == pytest.approx(expected, rel=1e-9)
    with (
        ev._session(variants.model("linear"), None, reference_qdq=True) as grouped,
        ev._session(variants.model(*GROUPS["linear"]), None, reference_qdq=True) as members,
    ):
        assert ev.score(grouped, scored).nll == pytest.approx(ev.score(members, scored).nll, rel=1e-12)
    with ev._session(variants.model(), None, reference_qdq=True) as session:  # no family: the float model
        with ev._session(MODEL, None) as reference:
            assert ev.score(session, scored).nll == pytest.approx(ev.score(reference, scored).nll, rel=1e-9)


def test_a_model_without_matched_mlp_roles_is_refused(tokens: np.ndarray) -> None:
    path = FIXTURES / "families" / "cohere_dy18.onnx"  # parallel attention + MLP: no separate MLP sub-block
    config = ev.EvalConfig(rows=("float", "w8a8:down"), activations=False, **CONFIG)
    with pytest.raises(InputError, match=r"eval --sensitivity: .*no gate_up, down linears matched"):
        ev.evaluate_model(path, np.random.default_rng(0).integers(0, 64, size=200), config)


def test_cli_sensitivity_prints_one_row_per_family(tokens: np.ndarray, tmp_path: Path, capsys) -> None:
    token_file = tmp_path / "tokens.npy"
    np.save(token_file, tokens)
    code = main(
        [
            "eval",
            str(MODEL),
            "--tokens",
            str(token_file),
            "--windows",
            "3",
            "--window-len",
            "16",
            "--sensitivity",
            "--quiet",
        ]
    )
    assert code == 0
    table = capsys.readouterr().out
    for label in FAMILIES.values():
        assert f"W8A8, {label}" in table
    assert "W4" not in table  # --sensitivity alone asks for float, W8A8 and the families only
