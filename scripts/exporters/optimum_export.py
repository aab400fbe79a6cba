#!/usr/bin/env python
"""Export tiny decoders with optimum-onnx (`optimum-cli export onnx`); run inside /work/venvs/optimum.

optimum-onnx 0.1.0 pins transformers<4.58, hence its own venv (see README.md here). Each model is built
from a config, saved with a local tokenizer to a temp folder (no hub), exported by the venv's
optimum-cli, checked against torch (prefill + one decode step through the KV cache) and copied to
OUT/<name>.onnx. The manifest entries go to --entries as JSON for make_exporter_fixtures.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import onnx
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import (  # noqa: E402
    ModelSpec,
    build_model,
    describe_tables,
    ort_check,
    save_hf_dir,
    temp_dir,
    write_entries,
)


@dataclass
class Job:
    name: str
    spec: ModelSpec
    task: str = "text-generation-with-past"
    optimize: str | None = None
    notes: str = ""


JOBS = [
    Job("optimum_llama", ModelSpec("llama", seed=11), notes="LlamaForCausalLM, GQA, untied"),
    Job("optimum_llama_tied", ModelSpec("llama", tied=True, seed=12), notes="LlamaForCausalLM, GQA, tied"),
    Job("optimum_qwen2", ModelSpec("qwen2", seed=13), notes="Qwen2ForCausalLM, q/k/v bias, untied"),
    Job("optimum_qwen3", ModelSpec("qwen3", tied=True, seed=14), notes="Qwen3ForCausalLM, q_norm/k_norm, tied"),
    Job("optimum_phi3", ModelSpec("phi3", seed=15), notes="Phi3ForCausalLM, fused qkv_proj/gate_up_proj"),
    Job(
        "optimum_llama_o2",
        ModelSpec("llama", seed=11),
        optimize="O2",
        notes="same model as optimum_llama, --optimize O2 (onnxruntime transformers fusions)",
    ),
    Job(
        "optimum_llama_nopast",
        ModelSpec("llama", seed=11),
        task="text-generation",
        notes="same model as optimum_llama, --task text-generation (no KV cache)",
    ),
]


def export(job: Job, out: Path) -> dict:
    model = build_model(job.spec, attn="sdpa")  # what optimum's from_pretrained picks
    with temp_dir("optimum_export_") as tmp:
        hf = save_hf_dir(model, job.spec, Path(tmp) / "hf")
        dest = Path(tmp) / "onnx"
        cli = Path(sys.executable).parent / "optimum-cli"
        cmd = [str(cli), "export", "onnx", "--model", str(hf), "--task", job.task]
        if job.optimize:
            cmd += ["--optimize", job.optimize]
        proc = subprocess.run([*cmd, str(dest)], capture_output=True, text=True)
        if proc.returncode:
            raise RuntimeError(f"{job.name}: optimum-cli failed:\n{proc.stderr[-4000:]}")
        path = out / f"{job.name}.onnx"
        proto = onnx.load(str(dest / "model.onnx"), load_external_data=True)
        onnx.save_model(proto, str(path), save_as_external_data=False)
    note = ort_check(path, model, job.spec)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    import optimum.version

    print(f"  {path.name}: {path.stat().st_size / 1024:.0f} KiB; {note}")
    return {
        "file": path.name,
        **job.spec.manifest_fields(),
        "exporter": "optimum-onnx",
        "opset": opset,
        "kv_cache": job.task.endswith("with-past"),
        "expect": "exact",
        "notes": "; ".join(
            [
                job.notes,
                f"optimum-cli export onnx --task {job.task}" + (f" --optimize {job.optimize}" if job.optimize else ""),
                f"optimum {optimum.version.__version__}, transformers {transformers.__version__}, sdpa attention",
                note,
                describe_tables(path),
            ]
        ),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--entries", type=Path, required=True, help="write manifest entries (JSON list) here")
    ap.add_argument("--only", nargs="+", metavar="NAME")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [j for j in JOBS if not args.only or j.name in args.only]
    entries = []
    for job in jobs:
        print(f"[{job.name}]")
        entries.append(export(job, args.out))
    write_entries(args.entries, entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
