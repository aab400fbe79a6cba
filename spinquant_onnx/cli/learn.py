"""``spinquant-onnx learn MODEL.onnx --tokens T.npy --out R.npz``: learned R1/R2 for ``rotate --rotation-file``.

torch is an optional dependency (``pip install 'spinquant-onnx[learn]'``); without it the command refuses
with the pip line instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

from spinquant_onnx.errors import InputError

TORCH_PIN = "torch==2.13.0"


def _rotations(value: str) -> tuple[str, ...]:
    return tuple(r.strip().lower() for r in value.split(",") if r.strip())


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    if importlib.util.find_spec("torch") is None:
        raise InputError(
            f"learn needs torch, which is not installed: pip install 'spinquant-onnx[learn]' "
            f"(or pip install {TORCH_PIN} --index-url https://download.pytorch.org/whl/cpu)"
        )
    from spinquant_onnx.integrations.evaluate import load_tokens
    from spinquant_onnx.integrations.learn.train import LearnConfig, Learner

    model = Path(args.model)
    if not model.is_file():
        raise InputError(f"{model}: no such model file")
    config = LearnConfig(
        steps=args.steps,
        bits=args.bits,
        block=args.block,
        rotations=args.rotations,
        r4=args.r4,
        seed=args.seed,
        lr=args.lr,
        optimizer=args.optimizer,
        momentum=args.momentum,
        loss=args.loss,
        batch=args.batch,
        window_len=args.window_len,
        offset=args.offset,
        save_every=args.save_every,
        eval_every=args.eval_every,
        eval_windows=args.eval_windows,
        calibration_windows=args.calibration_windows,
        keep=args.keep,
    )
    learner = Learner(model, load_tokens(args.tokens), args.out, config, threads=args.threads)
    if args.resume:
        learner.resume()
    result = learner.run(log=None if args.quiet else _log)
    first = f"{result.losses[0]:.4f}" if result.losses else "-"
    last = f"{result.losses[-1]:.4f}" if result.losses else "-"
    start, best = result.heldout[0][1], min(v for _, v in result.heldout)
    print(
        f"wrote {result.out}: {result.steps} steps, step loss {first} -> {last}; held-out quantized loss "
        f"{start:.4f} (start) -> {best:.4f} (best), step {result.written_step} written, "
        f"float {result.heldout_float:.4f}; "
        f"{result.seconds:.0f}s ({result.seconds_per_step}s/step) on {result.threads} threads"
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"config": vars(config), **result.to_dict()}, indent=2) + "\n")
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``learn`` on the main parser's subcommands."""
    parser = subparsers.add_parser(
        "learn",
        help="learn R1 (and per-layer R2) on the model's own graph under simulated quantization",
        description=(
            "Optimize R1 and per-layer R2 (Cayley parametrization on the orthogonal group, Adam, from the "
            "Hadamard) to minimize next-token cross-entropy of the rotated model with simulated quantizers "
            "on every linear's input and weight (straight-through rounding). Writes an .npz for "
            "`rotate --rotation-file`. Needs torch (pip install 'spinquant-onnx[learn]')."
        ),
    )
    parser.add_argument("model", help="float ONNX decoder (input_ids / attention_mask -> logits)")
    parser.add_argument("--tokens", required=True, help="1-D .npy of token ids (calibration text)")
    parser.add_argument("--out", required=True, help="rotation file to write (.npz); OUT.ckpt holds the checkpoint")
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps (default 100)")
    parser.add_argument("--bits", default="w8a8", help="w8a8 | w4a8 | w4a16 (default w8a8)")
    parser.add_argument("--block", type=int, default=128, help="int4 block size (default 128)")
    parser.add_argument("--rotations", type=_rotations, default=("r1", "r2"), help="which to learn (default r1,r2)")
    parser.add_argument(
        "--r4",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="simulate the fixed online R4 before down_proj, as `rotate --r4` deploys (default on)",
    )
    parser.add_argument("--seed", type=int, default=0, help="which windows each step sees (default 0)")
    parser.add_argument("--lr", type=float, default=1.5, help="learning rate (default 1.5)")
    parser.add_argument("--optimizer", default="sgd", help="sgd (with momentum, as SpinQuant's Cayley SGD) | adam")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (default 0.9)")
    parser.add_argument(
        "--loss", default="ce", help="ce (next-token cross-entropy) | kl (KL divergence from the float model's logits)"
    )
    parser.add_argument("--batch", type=int, default=1, help="windows per step (default 1)")
    parser.add_argument("--window-len", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument(
        "--offset",
        type=int,
        default=4096,
        help="skip the first N tokens, which eval scores and calibrates on (default 4096)",
    )
    parser.add_argument("--save-every", type=int, default=10, help="checkpoint every N steps (default 10)")
    parser.add_argument(
        "--eval-every",
        type=int,
        default=10,
        help="score the held-out windows every N steps (default 10); the best is written",
    )
    parser.add_argument("--eval-windows", type=int, default=2, help="held-out windows scored (default 2)")
    parser.add_argument(
        "--calibration-windows",
        type=int,
        default=2,
        help="held-out windows that calibrate the static activation ranges (default 2)",
    )
    parser.add_argument(
        "--keep",
        default="best",
        choices=("best", "last"),
        help="write the rotations with the best held-out loss (default), or the last step's",
    )
    parser.add_argument("--resume", action="store_true", help="continue from OUT.ckpt")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--json", help="write losses and timing as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(func=run)
    return parser
