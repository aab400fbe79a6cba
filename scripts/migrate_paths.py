"""Rewrite imports from the flat pre-#18 layout to the layered one (for merging branches cut before it).

    python scripts/migrate_paths.py FILE...          # rewrite in place, print the files changed
    python scripts/migrate_paths.py --check FILE...  # only list what would change (exit 1 if anything)

Three kinds of change, all textual: module paths (``spinquant_onnx.api`` -> ``spinquant_onnx.core.pipeline``),
names that moved to another module inside ``from M import a, b`` lines (``TensorStore`` now lives in
``io.tensor_store``), and private names made public (``hadamard._sylvester`` -> ``sylvester``). Run ruff
``--fix`` afterwards to sort the imports. The tables below are the whole map.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

MODULES = [  # old dotted path (under spinquant_onnx.) -> new one; order matters (vlm_cli before vlm)
    ("graph_io", "io.model_file"),
    ("torch_pickle", "io.torch_pickle"),
    ("graph_index", "graph.index"),
    ("hadamard", "rotation.hadamard"),
    ("rotations", "rotation.kinds"),
    ("rotation_file", "rotation.learned_file"),
    ("checks", "core.preflight"),
    ("validate", "core.equivalence"),
    ("api", "core.pipeline"),
    ("quantsim", "integrations.aimet"),
    ("vlm_cli", "cli.vlm"),
    ("vlm", "integrations.vlm"),
    ("evaluate", "integrations.evaluate"),
    ("eval_cli", "cli.eval"),
    ("inspect_view", "cli.inspect"),
]
# (module after MODULES, name) -> module the name lives in now
MOVED = {
    ("io.model_file", "TensorStore"): "io.tensor_store",
    **{("io.model_file", n): "io.staging" for n in (
        "staging_dir", "commit_output", "commit_all", "discard_output", "output_data_name", "clean_stale_staging",
        "stale_data_files")},
    **{(m, n): "graph.ops" for m in ("graph.index",) for n in ("TRANSPARENT_OPS", "SHAPE_ONLY_OPS")},
    ("match.linears", "LINEAR_OPS"): "graph.ops",
    ("match.roles", "ATTENTION_OPS"): "graph.ops",
    ("match.roles", "ACTIVATION_OPS"): "graph.ops",
    ("match.heads", "FUSED_ATTENTION"): "graph.ops",
    ("match.residual", "SCALAR_OPS"): "graph.ops",
    ("match.residual", "QUANTIZED_OPS"): "graph.ops",
    ("match.pattern", "PASS_THROUGH"): "graph.ops",
    ("rewrite.rotate_r2", "LAYOUT_OPS"): "graph.ops",
    ("rewrite.rotate_r3", "KEY_LAYOUT_OPS"): "graph.ops",
    ("rewrite.rotate_r3", "SCORE_OPS"): "graph.ops",
    ("integrations.vlm", "ROW_OPS"): "graph.ops",
    ("rewrite.rotate_r3", "activation_type"): "graph.shapes",
    ("core.pipeline", "Analysis"): "match.analysis",
    ("core.pipeline", "analyze"): "match.analysis",
    ("core.pipeline", "Options"): "core.options",
    ("core.pipeline", "PRECISIONS"): "core.options",
    ("core.pipeline", "Report"): "core.report",
    ("core.pipeline", "apply_spinquant"): "integrations.dispatch",
    ("core.pipeline", "_as_model_proto"): "core.pipeline",
    **{("core.preflight", n): "core.memory" for n in (
        "MemoryEstimate", "available_memory", "estimate_memory", "check_memory", "check_load_memory",
        "SKIP_MEMORY_ENV")},
    ("cli.inspect", "render"): "cli.inspect",
}
RENAMED = {  # private names that other modules use, now public
    "_sylvester": "sylvester",
    "_as_3d": "as_3d",
    "_contract": "contract",
    "_norm_axis": "norm_axis",
    "_transform3": "transform3",
    "_unsupported": "unsupported",
}
RENAMED_IN = ("rotation/hadamard.py", "rotation.hadamard")
# Not textual (port by hand): api._plan(a, o) -> core.pipeline.plan_model(a, o) returns (plan, report, ctx);
# api.plan_r2_r3_r4 -> the r2/r3/r4 passes (rewrite/base.py); plan_r2(index, sites, rotation_for, plan) ->
# plan_r2(prepare_r2(index, sites, rotation_for), plan); plan_r3/plan_r4 removed (prepare_* + insert_*);
# aimet.check_no_online_nodes(model, options) -> (stream, options); evaluate.residual_points(model, dir) and
# lm_head_nodes(model, dir) -> (analysis); api._as_model_proto -> core.pipeline.as_model_proto.
_FROM = re.compile(r"^(?P<indent>[ \t]*)from spinquant_onnx\.(?P<mod>[\w.]+) import (?P<names>\([^)]*\)|[^\n]+)", re.M)


def _split_import(match: re.Match[str]) -> str:
    indent, module = match["indent"], match["mod"]
    raw = match["names"].strip("()")
    names = [n.strip() for n in raw.replace("\n", " ").split(",") if n.strip()]
    if "#" in raw:  # a trailing comment: leave the line alone
        return match.group(0)
    groups: dict[str, list[str]] = {}
    for name in names:
        base = name.split(" as ")[0].strip()
        target = MOVED.get((module, base), module)
        if target == RENAMED_IN[1] or module == RENAMED_IN[1]:
            name = " as ".join(RENAMED.get(part.strip(), part.strip()) for part in name.split(" as "))
        groups.setdefault(target, []).append(name)
    return "\n".join(f"{indent}from spinquant_onnx.{m} import {', '.join(ns)}" for m, ns in groups.items())


def migrate(text: str, path: str = "") -> str:
    for old, new in MODULES:
        text = re.sub(rf"spinquant_onnx\.{old}\b", f"spinquant_onnx.{new}", text)
    text = _FROM.sub(_split_import, text)
    if path.replace("\\", "/").endswith(RENAMED_IN[0]) or "fast_hadamard_nodes" in path or "kinds.py" in path:
        for old, new in RENAMED.items():
            text = re.sub(rf"(?<![\w.]){re.escape(old)}\b", new, text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--check", action="store_true", help="list the files that would change; write nothing")
    args = parser.parse_args()
    changed = 0
    for path in args.files:
        text = path.read_text()
        new = migrate(text, str(path))
        if new != text:
            changed += 1
            print(path)
            if not args.check:
                path.write_text(new)
    return 1 if args.check and changed else 0


if __name__ == "__main__":
    sys.exit(main())
