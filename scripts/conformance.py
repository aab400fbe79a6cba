"""Conformance table: every shipped export, family x exporter, exact or refused with the reason.

    python scripts/conformance.py            # measure, write fixtures/conformance.json and README's table

Each cell rotates the fixture with R1 alone and with R2+R3+R4, validating in ONNX Runtime (relative L2
of the logits below 1e-5, argmax identical, KV-cache exports over decode steps). tests/test_conformance.py
re-measures every cell and compares it with fixtures/conformance.json, and checks README shows that table.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
RESULTS = FIXTURES / "conformance.json"
README = ROOT / "README.md"
START, END = "<!-- conformance:start -->", "<!-- conformance:end -->"
EXACT = 1e-5
SHORT_REASONS = {
    "already quantized": "refused: already quantized, rotate the float export",
    "applies attention": "R3 refused: fused attention op",
    "no Hadamard matrix": "refused: no Hadamard of this order",
    "multi-head latent attention": "R2/R3 refused: MLA",
    "no MLP down projection": "refused: parallel attention+MLP block",
    "no o_proj writer": "refused: parallel attention+MLP block",
    "reshapes the keys across head_dim": "R3 refused: keys reshaped across head_dim",
    "mixture of": "R4 refused: MoE experts",
    "cannot tell head_dim": "R2-R4 refused: head_dim not stated by the graph",
    "cannot tell the new keys": "R3 refused: new keys behind the cache Concat",
}
# The transformers-family exports of issue #14 (attention implementations, transformers 5 and 4.5x, KV cache).
FAMILY_ISSUES = {13, 14}
# Issue #15 rows from fixtures/families (MoE, stream multipliers, no final norm, RMSNorm without eps,
# dynamo optimize=False): family -> row name; Llama variants by a word in the file name.
FAMILY_ROWS = {
    "mixtral": "mixtral (MoE)",
    "qwen2_moe": "qwen2-moe (shared expert)",
    "qwen3_moe": "qwen3-moe",
    "deepseek_v3": "deepseek-v3 (MoE + MLA)",
    "granite": "granite (multipliers)",
    "helium": "helium (no eps)",
    "gpt_oss": "gpt-oss (MoE, expert biases)",
}
LLAMA_VARIANTS = {"nofinalnorm": "llama no final norm", "noopt": "llama optimize=False"}


# LayerNorm families (centred stream), post-norm families; the split Llama's parts each alone.
LAYERNORM_ROWS = {
    "gpt2": "gpt2 (LayerNorm, position table, tied)",
    "gpt_neox": "gpt-neox (LayerNorm, parallel)",
    "phi": "phi-2 (LayerNorm, parallel)",
    "stablelm": "stablelm (LayerNorm)",
    "starcoder2": "starcoder2 (LayerNorm, biases)",
    "olmo": "olmo (non-parametric LayerNorm)",
    "nemotron": "nemotron (LayerNorm1P)",
    "cohere": "cohere (decomposed LayerNorm, parallel)",
    "olmo2": "olmo2 (post-norm)",
    "olmo3": "olmo3 (post-norm)",
    "exaone4": "exaone4 (post-norm)",
}
FAMILY_ROWS.update(LAYERNORM_ROWS)


def entries() -> list[dict]:
    """(file, row, column) for every fixture in the manifests; the outlier copies add nothing and are left out."""
    found = []
    for folder in (FIXTURES, FIXTURES / "exporters", FIXTURES / "families"):
        listed = json.loads((folder / "manifest.json").read_text())
        if isinstance(listed, dict):  # fixtures/families: {"fixtures": [...]}; the #14 cases in float32
            listed = [e for e in listed["fixtures"] if _family_case(folder, e)]
        for entry in listed:
            name = entry["file"]
            if "outlier" in name:
                continue
            if "attn_implementation" in entry:
                found.append({"file": f"families/{name}", "row": _family_row(entry), "column": _column(entry)})
                continue
            row = entry["family"]
            if entry.get("hidden", 64) != 64:
                row += f" h{entry['hidden']}"
            if entry.get("tied"):
                row += " tied"
            found.append({"file": str((folder / name).relative_to(FIXTURES)), "row": row, "column": _column(entry)})
    return found + _family_entries()


def _family_entries() -> list[dict]:
    """The issue #15 cells of fixtures/families (its manifest lists many more; other rows come from elsewhere)."""
    path = FIXTURES / "families" / "manifest.json"
    found = []
    for entry in json.loads(path.read_text())["fixtures"] if path.exists() else []:
        name, family = entry["file"], entry["family"]
        row = FAMILY_ROWS.get(family) if family != "deepseek_v3" or "moe" in name else None
        row = f"{row} KV cache" if row and entry.get("kv_cache") else row
        if family == "llama":
            row = next((text for word, text in LLAMA_VARIANTS.items() if word in name), None)
        if entry.get("kind") == "split":
            row = f"llama split, part {entry['part']} alone"
        if row is not None and (FIXTURES / "families" / name).exists():
            column = "TorchScript 17" if "torchscript" in entry["exporter"] else "dynamo 18"
            found.append({"file": f"families/{name}", "row": row, "column": column})
    return found


def _family_case(folder: Path, entry: dict) -> bool:
    wanted = entry.get("issue") in FAMILY_ISSUES and entry.get("dtype") == "float32"
    return wanted and (folder / entry["file"]).is_file()


def _family_row(entry: dict) -> str:
    """family (+ variant), attention implementation, transformers major version: "llama mqa (sdpa, tf 5)"."""
    name, family = entry["file"], entry["family"]
    variant = " mqa" if "mqa" in name else " mla" if "mla" in name else " nope" if "nope" in name else ""
    major = entry["transformers"].split(".")[0]
    return f"{family}{variant} ({entry['attn_implementation']}, tf {major})"


def _column(entry: dict) -> str:
    exporter, name = entry["exporter"], entry["file"]
    if "attn_implementation" in entry:
        column = "TorchScript 17" if "torchscript" in exporter else "dynamo 18"
        return column + (" (past)" if entry.get("kv_cache") else "")
    if exporter == "optimum-onnx":
        return "optimum O2" if "o2" in name else ("optimum (no past)" if "nopast" in name else "optimum (past)")
    if exporter == "onnxruntime-genai":
        return "genai int4" if "int4" in name else "genai fp32"
    if "23" in str(entry.get("opset")):
        return "dynamo 23 (eager)" if "eager" in name else "dynamo 23"
    return "TorchScript 17" if "torchscript" in exporter else "dynamo 18"


def _run(path: Path, **options) -> str:
    from spinquant_onnx.core.pipeline import convert
    from spinquant_onnx.errors import SpinQuantError, ValidationFailedError

    with tempfile.TemporaryDirectory() as tmp:
        try:
            report = convert(path, Path(tmp) / "r.onnx", validate=True, threshold=EXACT, **options)
        except ValidationFailedError as exc:
            return f"WRONG ({exc})"
        except SpinQuantError as exc:
            message = str(exc)
            return next((short for key, short in SHORT_REASONS.items() if key in message), f"refused: {message}")
    validation = report.validation
    return "exact" if validation["passed"] and validation["rel_l2"] < EXACT else f"WRONG ({validation['rel_l2']:.2g})"


def _near(path: Path) -> str:
    """R1 above the 1e-5 bar: is it within 1e-4 with every argmax equal (the CLI's own bar)? Say so, with the number."""
    from spinquant_onnx.core.pipeline import convert
    from spinquant_onnx.errors import SpinQuantError

    with tempfile.TemporaryDirectory() as tmp:
        try:
            report = convert(path, Path(tmp) / "r.onnx", validate=True, threshold=1e-4)
        except SpinQuantError:
            return ""
    validation = report.validation
    if validation["passed"] and validation.get("argmax_agreement", 1.0) == 1.0:
        return f"R1 rel L2 {validation['rel_l2']:.1e}, argmax equal (ill-conditioned router, README)"
    return ""


def outcome(file: str) -> str:
    """R1 alone, then R1+R2+R3+R4 (R2+R4 when R3 is refused): the cell's text."""
    path = FIXTURES / file
    r1 = _run(path)
    if r1.startswith("WRONG"):
        return _near(path) or r1
    if r1 != "exact":
        return r1
    everything = _run(path, r2=True, r3=True, r4=True)
    if everything == "exact":
        return "exact (R1-R4)"
    if everything.startswith("R2-R4 refused"):  # attention refuses R2/R3: does R4 alone hold?
        if _run(path, r4=True) == "exact":
            return f"exact (R1, R4); R2, R3 refused: {everything.split(': ', 1)[1]}"
        return f"exact (R1); {everything}"
    if everything.startswith("R3 refused"):
        rest = _run(path, r2=True, r4=True)
        if rest.startswith("R4 refused") and _run(path, r2=True) == "exact":
            return f"exact (R1, R2); {everything}; {rest}"
        return f"exact (R1, R2, R4); {everything}" if rest == "exact" else f"R1 exact; R2+R4: {rest}"
    if everything.startswith("R2/R3 refused"):
        rest = _run(path, r4=True)
        return f"exact (R1, R4); {everything}" if rest == "exact" else f"R1 exact; R4: {rest}"
    return f"R1 exact; R2-R4: {everything}"


def render(results: dict[str, str]) -> str:
    cells = entries()
    rows = list(dict.fromkeys(c["row"] for c in cells))
    columns = list(dict.fromkeys(c["column"] for c in cells))
    grid = {(c["row"], c["column"]): results.get(c["file"], "?") for c in cells}
    lines = ["| family | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row in rows:
        lines.append(f"| {row} | " + " | ".join(grid.get((row, col), "–") for col in columns) + " |")
    return "\n".join(lines)


def update_readme(results: dict[str, str]) -> None:
    text = README.read_text()
    head, _, rest = text.partition(START)
    _, _, tail = rest.partition(END)
    README.write_text(f"{head}{START}\n{render(results)}\n{END}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Rotate every shipped export (R1, then R1-R4), validate it, and record exact / refused.",
        epilog=f"Writes {RESULTS.relative_to(ROOT)} and the table between the conformance markers in README.md.",
    )
    parser.add_argument("--no-readme", action="store_true", help="write the JSON only; leave README.md alone")
    args = parser.parse_args(argv)
    results = {}
    for cell in entries():
        results[cell["file"]] = outcome(cell["file"])
        print(f"{cell['file']:40s} {results[cell['file']]}", flush=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    if not args.no_readme:
        update_readme(results)
    return 1 if any(value.startswith("WRONG") for value in results.values()) else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
