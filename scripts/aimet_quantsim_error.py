#!/usr/bin/env python
"""W8A16, W4A16 and W8A8 AIMET quantsim logits error against the float model, with and without SpinQuant.

For each precision and each rotation (none; ``--rotation``, R1; and each ``--rotation-file``, e.g. the
R1 + per-layer R2 that ``spinquant-onnx learn`` writes) the script builds a fresh aimet-onnx
``QuantizationSimModel`` from the export, applies ``spinquant_onnx.apply_spinquant(sim)`` where asked
(the documented order: build the sim, rotate, then calibrate), calibrates with ``compute_encodings`` on
a few windows of text, and compares the quantized sim's logits on other windows with those of the float
model run by plain onnxruntime: relative L2 over all logits and next-token argmax agreement. A float row
(every quantizer off) shows that the rotation alone changes nothing.

Quantizers on the additive attention mask's path (calibrated range reaching 1e30: ``finfo.min`` and the
masked scores, see ``quantsim.mask_quantizers``) are switched off before measuring (``--keep-mask`` keeps
them): no 8- or 16-bit grid represents them, and left on they dominate the error of every configuration.
Every other quantizer, large real activations included, stays on, the same rule with and without rotation.
Each precision also gets a "linear inputs only" row: weights plus the activations entering the quantized
MatMuls, i.e. what a rotation can help; the full rows also quantize norm internals, softmax, RoPE, etc.

Usage (the SmolLM2-135M export and its tokens come from scripts/export_smollm2.py)::

    python scripts/aimet_quantsim_error.py /tmp/smollm2/smollm2_ts.onnx [--tokens /tmp/smollm2/tokens.npy]
        [--seq 128] [--calib 8] [--eval 4] [--rotation hadamard] [--r2] [--rotation-file R.npz ...]
        [--precisions W8A16,W4A16,W8A8] [--json out.json]

Without tokens (none beside the model and no ``--tokens``), random ids are used.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spinquant_onnx import apply_spinquant  # noqa: E402
from spinquant_onnx.core.equivalence import infer_vocab_size, synthesize_inputs  # noqa: E402
from spinquant_onnx.integrations.aimet import mask_quantizers  # noqa: E402

PRECISIONS = {"W8A16": ("int8", "int16"), "W4A16": ("int4", "int16"), "W8A8": ("int8", "int8")}


def windows(args: argparse.Namespace, model: onnx.ModelProto) -> tuple[list[dict], list[dict]]:
    """Calibration and evaluation feeds: disjoint windows of real text, or random ids without tokens."""
    tokens_path = args.tokens or Path(args.model).with_name("tokens.npy")
    count = args.calib + args.eval
    if Path(tokens_path).is_file():
        tokens = np.load(tokens_path).astype(np.int64)
        if tokens.size < count * args.seq:
            raise SystemExit(f"{tokens_path}: {tokens.size} tokens, need {count * args.seq}")
        # Spread the windows over the whole text so calibration and evaluation see different topics.
        starts = np.linspace(0, tokens.size - args.seq, count).astype(int)
        feeds = [
            {"input_ids": tokens[s : s + args.seq][None], "attention_mask": np.ones((1, args.seq), np.int64)}
            for s in starts
        ]
        source = f"{tokens_path} ({count} windows of {args.seq} tokens)"
    else:
        vocab = infer_vocab_size(model)
        feeds = [synthesize_inputs(model, seq=args.seq, seed=s, vocab_size=vocab) for s in range(count)]
        source = f"random ids ({count} x {args.seq})"
    print(f"inputs: {source}", flush=True)
    return feeds[: args.calib], feeds[args.calib :]


def float_logits(path: str, feeds: list[dict]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    return [session.run(None, f)[0] for f in feeds]


def errors(reference: list[np.ndarray], logits: list[np.ndarray]) -> tuple[float, float]:
    """Relative L2 over all logits, and the fraction of positions whose argmax agrees."""
    ref = np.concatenate([r.reshape(-1, r.shape[-1]) for r in reference]).astype(np.float64)
    out = np.concatenate([o.reshape(-1, o.shape[-1]) for o in logits]).astype(np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref)), float((out.argmax(-1) == ref.argmax(-1)).mean())


def build_sim(model_path: str, param_type: str, activation_type: str, options: dict | None):
    from aimet_onnx.quantsim import QuantizationSimModel
    from aimet_onnx.utils import duplicate_shared_initializers

    model = onnx.load(model_path)
    duplicate_shared_initializers(model.graph)  # tied embeddings: AIMET wants one reader per initializer
    sim = QuantizationSimModel(model, param_type=param_type, activation_type=activation_type)
    if options is not None:
        apply_spinquant(sim, **options)
    return sim


def linear_inputs(sim) -> set[str]:
    """Activation quantizers that feed a MatMul/Gemm reading a quantized weight: what SpinQuant targets."""
    graph = sim.model.model.graph
    params = set(sim.param_names)
    weights = {n.output[0] for n in graph.node if n.op_type == "QcQuantizeOp" and n.input[0] in params}
    feeds = {n.input[0] for n in graph.node if n.op_type in ("MatMul", "Gemm") and n.input[1] in weights}
    return {n.input[0] for n in graph.node if n.op_type == "QcQuantizeOp" and n.output[0] in feeds}


def enable(sim, names: set[str]) -> None:
    for name, quantizer in sim.qc_quantize_op_dict.items():
        quantizer.enabled = name in names


def run_with(sim, enabled: set[str], evals: list[dict], reference: list[np.ndarray]) -> tuple[float, float]:
    enable(sim, enabled)
    return errors(reference, [sim.session.run(None, f)[0] for f in evals])


def measure_one(args, label: str, rotation: str, options: dict | None, calib, evals, reference) -> list[dict]:
    """One fresh sim: float row (first precision only), all quantizers, then weights + linear inputs only."""
    wt, at = PRECISIONS[label]
    started = time.perf_counter()
    sim = build_sim(args.model, wt, at, options)
    rows = []
    if label == args.precisions[0]:  # every quantizer off, before calibration: the rotation alone must change nothing
        rel, agree = run_with(sim, set(), evals, reference)
        rows.append({"config": "float (quantizers off)", "rotation": rotation, "rel_l2": rel, "argmax": agree})
    everything = set(sim.qc_quantize_op_dict)
    enable(sim, everything)  # calibrate every quantizer
    sim.compute_encodings(calib)
    kept = everything - (set() if args.keep_mask else set(mask_quantizers(sim)))
    for config, enabled in ((label, kept), (f"{label}, linear inputs only", set(sim.param_names) | linear_inputs(sim))):
        rel, agree = run_with(sim, enabled & kept, evals, reference)
        rows.append(
            {"config": config, "rotation": rotation, "rel_l2": rel, "argmax": agree, "quantizers": len(enabled & kept)}
        )
        print(f"  {config:28} rotation={rotation:12} rel L2 {rel:.4f}  argmax {agree:.4f}", flush=True)
    rows[-1]["seconds"] = round(time.perf_counter() - started, 1)
    return rows


def rotations(args: argparse.Namespace) -> dict[str, dict | None]:
    """Each rotation measured, by the name its rows carry: apply_spinquant's options (None: unrotated)."""
    fixed = {"rotation": args.rotation, "seed": args.seed, "r2": args.r2}
    found: dict[str, dict | None] = {"none": None, f"{args.rotation}{' R1+R2' if args.r2 else ''}": fixed}
    for path in args.rotation_file:
        found[path.name] = {"rotation_file": str(path)}
    return found


def measure(args: argparse.Namespace, calib: list[dict], evals: list[dict], reference: list[np.ndarray]) -> list[dict]:
    rows = []
    for rotation, options in rotations(args).items():
        for label in args.precisions:
            rows.extend(measure_one(args, label, rotation, options, calib, evals, reference))
    return rows


def table(rows: list[dict]) -> str:
    lines = [
        "| config | rotation | logits rel L2 | argmax agreement |",
        "| --- | --- | --- | --- |",
    ]
    for row in rows:
        lines.append(f"| {row['config']} | {row['rotation']} | {row['rel_l2']:.4g} | {row['argmax']:.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="float ONNX export (input_ids, attention_mask -> logits)")
    parser.add_argument("--tokens", type=Path, help="int token ids (.npy); default: tokens.npy beside the model")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--calib", type=int, default=8, help="calibration windows")
    parser.add_argument("--eval", type=int, default=4, help="evaluation windows")
    parser.add_argument("--rotation", default="hadamard")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--r2", action="store_true", help="the fixed rotation rotates R2 too (as learned files do)")
    parser.add_argument(
        "--rotation-file", type=Path, action="append", default=[], help="also measure this learned rotation file"
    )
    parser.add_argument(
        "--precisions",
        type=lambda v: tuple(p.strip().upper() for p in v.split(",")),
        default=tuple(PRECISIONS),
        help=f"comma list from {','.join(PRECISIONS)} (default all)",
    )
    parser.add_argument("--keep-mask", action="store_true", help="keep the attention-mask quantizers on")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    unknown = [p for p in args.precisions if p not in PRECISIONS]
    if unknown:
        parser.error(f"unknown precision {unknown[0]}: choose from {','.join(PRECISIONS)}")
    model = onnx.load(args.model, load_external_data=False)
    calib, evals = windows(args, model)
    reference = float_logits(args.model, evals)
    rows = measure(args, calib, evals, reference)
    print()
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps({"model": args.model, "seq": args.seq, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
