"""``spinquant-onnx rotate-parts P1.onnx P2.onnx ... --out-dir DIR``: one R1 across a model split into parts."""

from __future__ import annotations

import argparse
from typing import Any

from spinquant_onnx.cli.common import positive, providers, write_json
from spinquant_onnx.rotation.kinds import KINDS


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``rotate-parts`` on the main parser's subparsers."""
    parser = sub.add_parser(
        "rotate-parts",
        help="rotate a model exported in parts (the residual stream passed between them) with one R1",
    )
    parser.add_argument("parts", nargs="+", help="the parts, in chain order (part i's stream outputs feed part i+1)")
    parser.add_argument("--out-dir", required=True, help="folder for the rotated parts (same file names)")
    parser.add_argument("--rotation", choices=KINDS, default="hadamard", help="R1 kind (default: hadamard)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random-hadamard / random-orthogonal")
    parser.add_argument("--block-size", type=positive, default=None, help="block-diagonal R1 of this order")
    parser.add_argument("--rotation-file", metavar="FILE", help="learned rotations (R.bin or .npz)")
    parser.add_argument("--r2", action="store_true", help="also R2 in every part")
    parser.add_argument("--r3", action="store_true", help="also R3 in every part")
    parser.add_argument("--r4", action="store_true", help="also R4 in every part")
    parser.add_argument("--validate", action="store_true",
                        help="run both chains in onnxruntime; fail (exit 1) above relative L2 1e-4")
    parser.add_argument("--providers", type=providers, default=None, help="comma list for --validate")
    parser.add_argument("--report", help="write a JSON report (one entry per part) here")
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from spinquant_onnx.core.parts import convert_parts  # the library loads on use: --help stays fast

    reports = convert_parts(
        args.parts, args.out_dir, rotation=args.rotation, seed=args.seed, block_size=args.block_size,
        rotation_file=args.rotation_file, r2=args.r2, r3=args.r3, r4=args.r4, validate=args.validate,
        providers=args.providers,
    )
    data = [report.to_dict() for report in reports]
    if args.report:
        write_json(args.report, {"parts": data})
    rot = data[0]["rotation"]
    print(f"wrote {len(data)} parts to {args.out_dir}: R1 {rot['kind']} (n={rot['n']}, seed {args.seed}) in every part")
    if data[0]["validation"]:
        val = data[0]["validation"]
        print(f"validated the chain: {val['output']} relative L2 {val['rel_l2']:.3g}, "
              f"argmax agreement {val['argmax_agreement']:.4f}")
    return 0
