"""``spinquant-onnx rotate IN OUT``: fuse norms, rotate (R1, and R2/R3/R4 as asked), write atomically."""

from __future__ import annotations

import argparse
from typing import Any

from spinquant_onnx.cli.common import providers, write_json
from spinquant_onnx.rotation.kinds import KINDS


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``rotate`` on the main parser's subparsers."""
    rotate = sub.add_parser("rotate", help="fuse RMSNorm scales and apply the R1 rotation: IN.onnx -> OUT.onnx")
    rotate.add_argument("input", help="ONNX model exported from a decoder LLM (fp32/fp16/bf16)")
    rotate.add_argument("output", help="where to write the rotated model (external data goes beside it)")
    rotate.add_argument("--rotation", choices=KINDS, default="hadamard", help="R1 kind (default: hadamard)")
    rotate.add_argument("--seed", type=int, default=0, help="seed for random-hadamard / random-orthogonal")
    rotate.add_argument("--block-size", type=int, default=None, help="block-diagonal R1 of this order")
    rotate.add_argument("--validate", action="store_true",
                        help="run original and rotated in onnxruntime; fail (exit 1) above relative L2 1e-4")
    rotate.add_argument("--providers", type=providers, default=None,
                        help="comma list for --validate, e.g. cuda,cpu (default: cuda if it loads, else cpu)")
    rotate.add_argument("--report", help="write a JSON report here")
    rotate.add_argument("--in-place", action="store_true", help="allow OUT to be the same file as IN")
    rotate.add_argument("--precision", choices=("float64", "float32"), default="float64",
                        help="arithmetic of the rotation (default float64; float32 halves the working memory)")
    rotate.add_argument("--roles", metavar="ROLES.json", help="use this role map instead of matching (validates)")
    rotate.add_argument("--trust-roles", action="store_true", help="with --roles: skip the forced validation")
    rotate.add_argument("--r2", action="store_true", help="also R2: a head_dim rotation between v_proj and o_proj")
    rotate.add_argument("--r3", action="store_true", help="also R3: online Hadamard on Q and K after rotary")
    rotate.add_argument("--r4", action="store_true", help="also R4: online Hadamard before down_proj")
    rotate.add_argument("--rotation-file", metavar="FILE",
                        help="learned rotations (SpinQuant R.bin or .npz with R1 / model.layers.N.self_attn.R2)")
    rotate.add_argument("--force", action="store_true",
                        help="rotate a model spinquant-onnx already rotated (refused otherwise: it would undo R1)")
    rotate.set_defaults(func=run)
    return rotate


def run(args: argparse.Namespace) -> int:
    from spinquant_onnx.core.pipeline import convert  # the library loads on use: --help stays fast

    report = convert(
        args.input,
        args.output,
        rotation=args.rotation,
        seed=args.seed,
        block_size=args.block_size,
        validate=args.validate,
        providers=args.providers,
        in_place=args.in_place,
        roles=args.roles,
        precision=args.precision,
        trust_roles=args.trust_roles,
        r2=args.r2,
        r3=args.r3,
        r4=args.r4,
        rotation_file=args.rotation_file,
        force=args.force,
    )
    data = report.to_dict()
    if args.report:
        write_json(args.report, data)
    rot = data["rotation"]
    print(
        f"wrote {args.output}: R1 {rot['kind']} (n={rot['n']}"
        + (f", blocks of {rot['block_size']}" if rot.get("block_size") else "")
        + f", seed {args.seed}, {rot['precision']}) over {data['blocks']} blocks, "
        f"{data['norms_fused']} norms fused, {len(data['tensors_rewritten'])} tensors rewritten "
        f"in {data['timings_s']['total']:.2f}s"
    )
    if data["validation"]:
        val = data["validation"]
        print(
            f"validated on {val['provider']}: logits max-abs {val['max_abs']:.3g}, relative L2 {val['rel_l2']:.3g}, "
            f"argmax agreement {val['argmax_agreement']:.4f} ({'; '.join(val['cases'])})"
            # #13: low-precision models are judged against their own rounding noise
            + (f"; threshold {val['threshold']:.3g} from rounding noise {val['rounding_noise']:.3g}"
               if val.get("rounding_noise") is not None else "")
        )
    return 0
