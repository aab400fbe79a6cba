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
from spinquant_onnx.integrations.learn.config import LOSSES, OPTIMIZERS, SCHEMES, LearnConfig, default

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
    from spinquant_onnx.integrations.learn.train import Learner

    model = Path(args.model)
    if not model.is_file():
        raise InputError(f"{model}: no such model file")
    config = LearnConfig(
        steps=args.steps,
        bits=args.bits,
        block=args.block,
        rotations=args.rotations,
        r4=args.r4,
        float_channels=args.float_channels,
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


def _option(parser: argparse.ArgumentParser, flag: str, help: str, **kwargs) -> None:
    """An option whose default is LearnConfig's (stated in the help from there, never twice)."""
    field = flag.lstrip("-").replace("-", "_")
    value = default(field)
    shown = ",".join(value) if isinstance(value, tuple) else value
    shown = ("on" if value else "off") if isinstance(value, bool) else shown
    parser.add_argument(flag, default=value, help=f"{help} (default {shown})", **kwargs)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``learn`` on the main parser's subcommands."""
    parser = subparsers.add_parser(
        "learn",
        help="learn R1 (and per-layer R2) on the model's own graph under simulated quantization",
        description=(
            "Optimize R1 and per-layer R2 (Cayley parametrization on the orthogonal group, Adam or SGD, from "
            "the Hadamard) to minimize the KL divergence from the float model (or next-token cross-entropy) "
            "of the rotated model with simulated quantizers where `eval` deploys them (straight-through "
            "rounding). Writes an .npz for `rotate --rotation-file`. Needs torch (pip install "
            "'spinquant-onnx[learn]')."
        ),
    )
    parser.add_argument("model", help="float ONNX decoder (input_ids / attention_mask -> logits)")
    parser.add_argument("--tokens", required=True, help="1-D .npy of token ids (calibration text)")
    parser.add_argument("--out", required=True, help="rotation file to write (.npz); OUT.ckpt holds the checkpoint")
    _option(parser, "--steps", "optimizer steps", type=int)
    _option(parser, "--bits", "target scheme", choices=SCHEMES)
    _option(parser, "--block", "int4 block size", type=int)
    _option(parser, "--rotations", "which to learn: r1 and/or r2", type=_rotations)
    _option(
        parser,
        "--r4",
        "simulate the fixed online R4 before down_proj, as `rotate --r4` deploys it",
        action=argparse.BooleanOptionalAction,
    )
    _option(
        parser,
        "--float-channels",
        "simulate the K largest down_proj input channels on a float side path, as `rotate --calibration "
        "T.npy --float-channels K` deploys them with the same token file; 0 is none",
        type=int,
        metavar="K",
    )
    _option(parser, "--seed", "which windows each step sees", type=int)
    _option(parser, "--optimizer", "adam, or sgd with momentum (SpinQuant's Cayley SGD)", choices=OPTIMIZERS)
    _option(parser, "--lr", "learning rate (SGD wants ~1.5)", type=float)
    _option(parser, "--momentum", "SGD momentum", type=float)
    _option(
        parser, "--loss", "kl (divergence from the float model's logits) or ce (next-token cross-entropy)",
        choices=LOSSES,
    )
    _option(parser, "--batch", "windows per step", type=int)
    _option(parser, "--window-len", "tokens per window", type=int)
    _option(parser, "--offset", "skip the first N tokens, which eval scores and calibrates on", type=int)
    _option(parser, "--save-every", "checkpoint every N steps", type=int)
    _option(parser, "--eval-every", "score the held-out windows every N steps; the best is written", type=int)
    _option(parser, "--eval-windows", "held-out windows scored", type=int)
    _option(parser, "--calibration-windows", "held-out windows that calibrate the static activation ranges", type=int)
    _option(parser, "--keep", "write the rotations with the best held-out loss, or the last step's",
            choices=("best", "last"))
    parser.add_argument("--resume", action="store_true", help="continue from OUT.ckpt")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: every core)")
    parser.add_argument("--json", help="write losses and timing as JSON here")
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    parser.set_defaults(func=run)
    return parser
