#!/usr/bin/env python
"""Export tiny decoders with the onnxruntime-genai model builder; run inside /work/venvs/genai.

onnxruntime-genai depends on onnxruntime (CPU) and must stay out of the system env (see README.md here).
Each model is built from a config, saved as a local HF folder (config.json, safetensors, tokenizer),
converted by `python -m onnxruntime_genai.models.builder -i HF -o OUT -p PRECISION -e cpu -c CACHE`,
checked against torch (prefill + one decode step through the KV cache; fp32 only) and copied to
OUT/<name>/model.onnx + model.onnx.data, the builder's own external-data layout.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import (  # noqa: E402
    ModelSpec,
    build_model,
    describe_tables,
    ort_check,
    sample_ids,
    save_hf_dir,
    temp_dir,
    torch_logits,
    write_entries,
)

KEEP = ("model.onnx", "model.onnx.data")


@dataclass
class Job:
    name: str
    spec: ModelSpec
    precision: str = "fp32"
    expect: str = "exact"
    notes: str = ""


JOBS = [
    Job("genai_llama", ModelSpec("llama", seed=21), notes="LlamaForCausalLM, GQA, untied"),
    Job("genai_llama_tied", ModelSpec("llama", tied=True, seed=22), notes="LlamaForCausalLM, GQA, tied"),
    Job("genai_qwen2", ModelSpec("qwen2", seed=23), notes="Qwen2ForCausalLM, q/k/v bias, untied"),
    Job("genai_qwen3", ModelSpec("qwen3", tied=True, seed=24), notes="Qwen3ForCausalLM, q_norm/k_norm, tied"),
    Job(
        "genai_phi3",
        ModelSpec("phi3", vocab=160, seed=25),
        notes=(
            "Phi3ForCausalLM, fused qkv_proj/gate_up_proj; vocab 160 because the builder takes any Linear "
            "with out_features == vocab for lm_head, and qkv_proj has 64+2*32 = 128 outputs"
        ),
    ),
    Job(
        "genai_llama_int4",
        ModelSpec("llama", seed=21),
        precision="int4",
        expect="refuse",
        notes="same model as genai_llama, -p int4: MatMulNBits weights cannot be rotated exactly",
    ),
]


def run_builder(hf: Path, dest: Path, cache: Path, precision: str) -> None:
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(dest)]
    cmd += ["-p", precision, "-e", "cpu", "-c", str(cache)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"builder failed ({' '.join(cmd)}):\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")


def quantized_note(path: Path, model, spec: ModelSpec) -> str:
    """int4 cannot match torch to 1e-4; report how close it is and that it runs."""
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    ids = sample_ids(spec, 1, 7, seed=spec.seed + 100).numpy()
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
    for inp in sess.get_inputs():
        if inp.name.startswith("past_key_values."):
            feeds[inp.name] = np.zeros((1, spec.num_kv_heads, 0, spec.head_dim), dtype=np.float32)
    got = sess.run(["logits"], feeds)[0]
    ref = torch_logits(model, sample_ids(spec, 1, 7, seed=spec.seed + 100))
    agree = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    return f"int4 vs torch fp32: max abs diff {np.abs(got - ref).max():.2f}, argmax agreement {agree:.2f}"


def export(job: Job, out: Path) -> dict:
    model = build_model(job.spec)
    folder = out / job.name
    with temp_dir("genai_export_") as tmp:
        hf = save_hf_dir(model, job.spec, Path(tmp) / "hf")
        dest = Path(tmp) / "onnx"
        run_builder(hf, dest, Path(tmp) / "cache", job.precision)
        written = sorted(p.name for p in dest.iterdir())
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        for name in KEEP:
            shutil.copy2(dest / name, folder / name)
    path = folder / "model.onnx"
    note = ort_check(path, model, job.spec) if job.precision == "fp32" else quantized_note(path, model, job.spec)
    proto = onnx.load(str(path), load_external_data=False)
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"  {job.name}/: {size / 1024:.0f} KiB; {note}")
    return {
        "file": f"{job.name}/model.onnx",
        **job.spec.manifest_fields(),
        "exporter": "onnxruntime-genai",
        "opset": opset,
        "kv_cache": True,
        "expect": job.expect,
        "notes": "; ".join(
            [
                job.notes,
                f"onnxruntime_genai.models.builder -p {job.precision} -e cpu "
                f"(onnxruntime-genai {version('onnxruntime-genai')}, onnxruntime {ort.__version__})",
                f"builder wrote {', '.join(written)}; kept {', '.join(KEEP)}",
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
    entries = []
    for job in [j for j in JOBS if not args.only or j.name in args.only]:
        print(f"[{job.name}]")
        entries.append(export(job, args.out))
    write_entries(args.entries, entries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
