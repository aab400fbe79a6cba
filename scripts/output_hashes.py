"""Rotate every shipped fixture and print the sha256 of every output file (the refactor's byte-identity check).

    python scripts/output_hashes.py > before.txt        # on the old code
    python scripts/output_hashes.py > after.txt         # on the new code
    diff before.txt after.txt                           # empty: outputs byte-identical

Goes through the ``spinquant-onnx`` command line (the one interface a refactor keeps): every fixture under
fixtures/ with R1, and with R1+R2+R3+R4 (R1+R2+R4 where the conformance table refuses R3), one
``--block-size`` case and both VLM fixtures (rotate-vlm, with and without the embedding table).
A refused case prints its exit code instead of hashes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import io
import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def _cases() -> list[tuple[str, list[str]]]:
    """(label, argv with IN/OUT placeholders) for every case, in a stable order."""
    table = json.loads((FIXTURES / "conformance.json").read_text())
    cases = []
    for name, verdict in table.items():
        cases.append((f"{name} R1", ["rotate", f"IN={name}", "OUT"]))
        if verdict.startswith("exact (R1-R4)"):
            cases.append((f"{name} R1-R4", ["rotate", f"IN={name}", "OUT", "--r2", "--r3", "--r4"]))
        elif verdict.startswith("exact (R1, R2, R4)"):
            cases.append((f"{name} R1,R2,R4", ["rotate", f"IN={name}", "OUT", "--r2", "--r4"]))
    cases.append(("llama_ts.onnx R1 block 16", ["rotate", "IN=llama_ts.onnx", "OUT", "--block-size", "16"]))
    cases.append(("llama_ts.onnx R1 random-orthogonal seed 3",
                  ["rotate", "IN=llama_ts.onnx", "OUT", "--rotation", "random-orthogonal", "--seed", "3"]))
    for family in ("qwen2_5_vl", "qwen3_vl"):
        folder = FIXTURES / "vlm" / family
        common = ["rotate-vlm", "--backbone", str(folder / "backbone.onnx"), "--visual", str(folder / "visual.onnx")]
        cases.append((f"vlm/{family} embedding", [*common, "--embedding", str(folder / "embedding.pth"), "--out-dir",
                                                   "OUTDIR"]))
        cases.append((f"vlm/{family} online", [*common, "--out-dir", "OUTDIR"]))
    return cases


def _hash_tree(folder: Path) -> list[str]:
    lines = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"  {digest}  {path.relative_to(folder)}")
    return lines


def _run_case(argv: list[str], work: Path) -> list[str]:
    from spinquant_onnx.cli import main

    out = work / "out"
    out.mkdir()
    resolved = []
    for arg in argv:
        if arg.startswith("IN="):
            resolved.append(str(FIXTURES / arg[3:]))
        elif arg == "OUT":
            resolved.append(str(out / "model.onnx"))
        elif arg == "OUTDIR":
            resolved.append(str(out))
        else:
            resolved.append(arg)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(resolved)
    if code:
        return [f"  exit {code}: {stderr.getvalue().strip()}"]
    return _hash_tree(out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", metavar="TEXT", help="run only the cases whose label contains TEXT")
    args = parser.parse_args()
    for label, argv in _cases():
        if args.only and args.only not in label:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            lines = _run_case(argv, Path(tmp))
        print(label)
        print("\n".join(lines))
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
