#!/usr/bin/env python
"""(Re)generate fixtures/exporters/: tiny decoders as drawn by exporters other than plain torch.onnx.

Every model is a random-init transformers model built from a config (scripts/exporters/tiny_models.py:
vocab 128, 2 layers, hidden 64, 4 heads / 2 KV heads of dim 16, intermediate 96, every RMSNorm weight
perturbed), exported, and checked against torch with onnxruntime (max abs logits diff < 1e-4; with a KV
cache also one decode step fed from present.*). Groups:

* ``optimum``  - optimum-onnx ``optimum-cli export onnx`` (in /work/venvs/optimum; transformers<4.58)
* ``genai``    - onnxruntime-genai model builder, fp32 and one int4 (in /work/venvs/genai)
* ``dynamo23`` - torch.onnx dynamo exporter at opset 23 (RMSNormalization, RotaryEmbedding, Attention)
* ``gemma3``   - Gemma3ForCausalLM via TorchScript (opset 17) and dynamo (opset 18)

The last two run in this (system) environment. The venv groups run scripts/exporters/*_export.py with
that venv's python; see scripts/exporters/README.md to build the venvs. ``manifest.json`` lists every
fixture with its shape, whether it has a KV cache, and whether spinquant-onnx must rotate it exactly
(``"expect": "exact"``) or refuse it (``"refuse"``).

Usage::

    python scripts/make_exporter_fixtures.py [--out fixtures/exporters] [--only GROUP_OR_NAME ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import onnx
import torch
import transformers

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "exporters"))
from tiny_models import (  # noqa: E402
    MAX_POS,
    ModelSpec,
    build_model,
    describe_tables,
    logits_only,
    ort_check,
    write_entries,
)

SIZE_LIMIT = 10 * 1024 * 1024  # the whole fixtures/exporters folder
VENV_GROUPS = {
    "optimum": ("optimum_export.py", Path("/work/venvs/optimum/bin/python")),
    "genai": ("genai_export.py", Path("/work/venvs/genai/bin/python")),
}
GROUP_ORDER = ["optimum", "genai", "dynamo23", "gemma3"]
STRIP_NODE_METADATA = {"pkg.torch.onnx.stack_trace"}


@dataclass
class Job:
    """One export done in this environment."""

    name: str
    group: str
    spec: ModelSpec
    exporter: str  # "torchscript" | "dynamo"
    opset: int
    attn: str = "eager"
    check_batch: int = 2
    notes: str = ""


GEMMA_NOTE = (
    "Gemma3ForCausalLM: (1+w) norms (the export folds 1+w into one gamma initializer), sqrt(hidden) "
    "embedding scale, sandwich norms, q_norm/k_norm, one sliding + one full layer, gelu-tanh, tied"
)
SYSTEM_JOBS = [
    Job(
        "dynamo23_llama",
        "dynamo23",
        ModelSpec("llama", seed=31),
        "dynamo",
        23,
        attn="sdpa",
        check_batch=1,
        notes="LlamaForCausalLM, untied, sdpa attention -> ONNX Attention op",
    ),
    Job(
        "dynamo23_llama_eager",
        "dynamo23",
        ModelSpec("llama", seed=31),
        "dynamo",
        23,
        check_batch=1,
        notes="same model as dynamo23_llama, eager attention -> MatMul/Softmax",
    ),
    Job(
        "dynamo23_qwen3",
        "dynamo23",
        ModelSpec("qwen3", tied=True, seed=32),
        "dynamo",
        23,
        attn="sdpa",
        check_batch=1,
        notes="Qwen3ForCausalLM, q_norm/k_norm, tied, sdpa attention -> ONNX Attention op",
    ),
    Job("gemma3_ts", "gemma3", ModelSpec("gemma3", tied=True, seed=41), "torchscript", 17, notes=GEMMA_NOTE),
    Job("gemma3_dynamo", "gemma3", ModelSpec("gemma3", tied=True, seed=41), "dynamo", 18, notes=GEMMA_NOTE),
]
BATCH1_NOTE = (
    "onnxruntime (1.31/1.32) runs the opset-23 RotaryEmbedding only at batch 1: its cos/sin caches are "
    "[1, sequence, 8] and it refuses to broadcast them over a larger batch"
)


# ------------------------------------------------------------------------------------------------ export


def _dummy(spec: ModelSpec) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, spec.vocab, (2, 7), generator=g, dtype=torch.int64)
    return ids, torch.ones_like(ids)


def export_torchscript(model: torch.nn.Module, path: Path, job: Job) -> None:
    axes = {0: "batch", 1: "sequence"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            _dummy(job.spec),
            str(path),
            dynamo=False,
            opset_version=job.opset,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={"input_ids": axes, "attention_mask": axes, "logits": axes},
            do_constant_folding=True,
        )


def export_dynamo(model: torch.nn.Module, path: Path, job: Job) -> None:
    batch = torch.export.Dim("batch", min=1, max=16)
    seq = torch.export.Dim("sequence", min=1, max=MAX_POS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prog = torch.onnx.export(
            model,
            _dummy(job.spec),
            dynamo=True,
            opset_version=job.opset,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}},
            external_data=False,
            optimize=True,
            verbose=False,
        )
    prog.save(str(path), external_data=False)


def make_self_contained(path: Path) -> None:
    """Inline every initializer and drop dynamo's per-node Python stack traces (local paths, size)."""
    model = onnx.load(str(path), load_external_data=True)
    for t in model.graph.initializer:
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    for node in model.graph.node:
        keep = [p for p in node.metadata_props if p.key not in STRIP_NODE_METADATA]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
    onnx.save_model(model, str(path), save_as_external_data=False)
    for side in (path.with_name(path.name + ".data"), path.with_suffix(".onnx_data")):
        side.unlink(missing_ok=True)


def run_system_job(job: Job, out: Path) -> dict[str, Any]:
    print(f"[{job.name}]")
    model = logits_only(build_model(job.spec, attn=job.attn))
    path = out / f"{job.name}.onnx"
    (export_torchscript if job.exporter == "torchscript" else export_dynamo)(model, path, job)
    make_self_contained(path)
    notes = [ort_check(path, model, job.spec, batch=job.check_batch, seq=seq) for seq in (7, 12)]
    if job.check_batch == 1:
        notes.append(BATCH1_NOTE)
    notes.append(describe_tables(path))
    print(f"  {path.name}: {path.stat().st_size / 1024:.0f} KiB; {notes[0]}")
    return {
        "file": path.name,
        **job.spec.manifest_fields(),
        "exporter": f"torch.onnx {job.exporter}",
        "opset": job.opset,
        "kv_cache": False,
        "expect": "exact",
        "notes": "; ".join(
            [job.notes, f"torch {torch.__version__}, transformers {transformers.__version__}, {job.attn}", *notes]
        ),
    }


def run_venv_group(group: str, out: Path, names: list[str] | None, python: Path) -> list[dict[str, Any]]:
    script, _ = VENV_GROUPS[group]
    if not python.exists():
        raise SystemExit(f"{python} not found: build the {group} venv (scripts/exporters/README.md)")
    with tempfile.TemporaryDirectory() as tmp:
        entries_path = Path(tmp) / "entries.json"
        cmd = [str(python), str(HERE / "exporters" / script), "--out", str(out), "--entries", str(entries_path)]
        if names:
            cmd += ["--only", *names]
        subprocess.run(cmd, check=True)
        return json.loads(entries_path.read_text())


# ---------------------------------------------------------------------------------------------- manifest


def _group_of(name: str) -> str:
    return name.split("_", 1)[0]


def _merge(old: list[dict], new: list[dict]) -> list[dict]:
    """New entries replace old ones by file; order: group order, then name."""
    by_file = {e["file"]: e for e in old}
    by_file.update({e["file"]: e for e in new})

    def key(e: dict) -> tuple[int, str]:
        return GROUP_ORDER.index(_group_of(e["file"])), e["file"]

    return sorted(by_file.values(), key=key)


def _folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=HERE.parent / "fixtures" / "exporters")
    ap.add_argument("--only", nargs="+", metavar="GROUP_OR_NAME", help=f"groups {GROUP_ORDER} or fixture names")
    for group, (_, default) in VENV_GROUPS.items():
        ap.add_argument(f"--{group}-python", type=Path, default=default, help=f"python of the {group} venv")
    args = ap.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    wanted = set(args.only or GROUP_ORDER)
    new: list[dict[str, Any]] = []
    for group in GROUP_ORDER:
        names = sorted(n for n in wanted if n != group and _group_of(n) == group)
        if group not in wanted and not names:
            continue
        if group in VENV_GROUPS:
            new += run_venv_group(group, out, names or None, getattr(args, f"{group}_python"))
        else:
            new += [run_system_job(j, out) for j in SYSTEM_JOBS if j.group == group and (not names or j.name in names)]

    manifest_path = out / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() and args.only else []
    manifest = _merge(old, new)
    write_entries(manifest_path, manifest)
    size = _folder_size(out)
    print(f"wrote {manifest_path} ({len(manifest)} entries); folder {size / 1024:.0f} KiB")
    if size > SIZE_LIMIT:
        raise SystemExit(f"{out} is {size} bytes, over {SIZE_LIMIT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
