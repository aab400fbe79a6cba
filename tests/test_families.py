"""The tool's promise on every fixtures/families/ export: each rotation exits 2 with one line, or writes a
model that loads in onnxruntime and matches the original (fp32: rel L2 < 1e-5, every argmax equal; fp16/bf16:
within 10x the model's own rounding noise). Judged by scripts/survey.py's checks, independently of --validate.

Cells that break the promise today are strict xfails naming the bug (KNOWN_BAD, from docs/survey.md): a fix
flips them to XPASS, which fails the suite until the entry is removed here.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import pytest
from conftest import FIXTURES, ROOT

spec = importlib.util.spec_from_file_location("survey", ROOT / "scripts" / "survey.py")
survey = importlib.util.module_from_spec(spec)
spec.loader.exec_module(survey)

ITEMS = survey.fixtures(include_old=False)
FLAGS = {"R1": [], "R1-R4": ["--r2", "--r3", "--r4"]}

# (fixture file, rotation) -> the bug, as measured by scripts/survey.py (see docs/survey.md).
FP16_TYPE = (
    "#13: online R1 MatMul after a (1+w) sandwich norm is typed float32 in an fp16 model "
    "(onnxruntime: MatMul bound to float16 and float)"
)
NOPE_R3 = (
    "#13: --r3 on SmolLM3's NoPE layer puts a head_dim Hadamard on k_proj's full output "
    "(onnxruntime: Incompatible dimensions for matrix multiplication)"
)
KNOWN_BAD: dict[tuple[str, str], str] = {
    ("gemma2_ts17_fp16.onnx", "R1"): FP16_TYPE,
    ("gemma3_ts17_fp16.onnx", "R1"): FP16_TYPE,
    ("gemma3_ts17_fp16.onnx", "R1-R4"): FP16_TYPE,
    ("gemma3_dy18_fp16_novi.onnx", "R1"): FP16_TYPE,
    ("gemma3_dy18_fp16_novi.onnx", "R1-R4"): FP16_TYPE,
    ("smollm3_nope_ts17.onnx", "R1-R4"): NOPE_R3,
    ("smollm3_nope_dy18.onnx", "R1-R4"): NOPE_R3,
}


def _cells() -> list:
    cells = []
    for item in ITEMS:
        for rot in FLAGS:
            key = (item["entry"]["file"], rot)
            marks = [pytest.mark.xfail(strict=True, reason=KNOWN_BAD[key])] if key in KNOWN_BAD else []
            cells.append(pytest.param(item, rot, id=f"{item['entry']['file']}-{rot}", marks=marks))
    return cells


def test_family_manifest_lists_existing_files() -> None:
    names = {it["entry"]["file"] for it in ITEMS}
    on_disk = {p.name for p in (FIXTURES / "families").glob("*.onnx")}
    assert names == on_disk
    total = sum(p.stat().st_size for p in (FIXTURES / "families").iterdir())
    assert total < 24 * 1024 * 1024, total  # about 85 files of ~270 KB; shrink models before adding many more
    assert len(names) >= 40
    for item in ITEMS:
        e = item["entry"]
        assert e["matches_torch"] is True
        assert e["rel_l2_vs_torch"] < survey_threshold(e["dtype"]), e["file"]
        for key in ("family", "exporter", "opset", "transformers", "torch", "attn_implementation", "dtype"):
            assert e[key], (e["file"], key)


def survey_threshold(dtype: str) -> float:
    return {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}[dtype]


def test_known_bad_cells_exist() -> None:
    files = {it["entry"]["file"] for it in ITEMS}
    assert {f for f, _ in KNOWN_BAD} <= files
    assert {r for _, r in KNOWN_BAD} <= set(FLAGS)


@pytest.mark.parametrize(("item", "rot"), _cells())
def test_exact_or_refused(item: dict, rot: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rotated.onnx"
        code, lines = survey.rotate_lines(item["path"], out, FLAGS[rot], validate=False)
        if code == 2:
            assert len(lines) == 1, lines
            assert not out.exists()
            return
        assert code == 0, f"exit {code}: {lines}"
        result = survey.check_output(out, item, survey._takes_hidden(item))
    assert result["outcome"] == "exact", result
