"""Command line: ``spinquant-onnx rotate IN OUT`` and ``spinquant-onnx inspect IN``.

Every refusal is one line on stderr with exit code 2 (1 when validation fails); ``--debug`` adds the
traceback. The input is never modified and a failed run leaves no output behind.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path

from spinquant_onnx.errors import SpinQuantError
from spinquant_onnx.rotations import KINDS


def _providers(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def _write_json(path: str, payload: dict) -> None:
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(target)


def _cmd_rotate(args: argparse.Namespace) -> int:
    from spinquant_onnx.api import convert

    report = convert(
        args.input,
        args.output,
        rotation=args.rotation,
        seed=args.seed,
        block_size=args.block_size,
        validate=args.validate,
        providers=args.providers,
        in_place=args.in_place,
    )
    data = report.to_dict()
    if args.report:
        _write_json(args.report, data)
    rot = data["rotation"]
    print(
        f"wrote {args.output}: R1 {rot['kind']} (n={rot['n']}, seed {args.seed}) over {data['blocks']} blocks, "
        f"{data['norms_fused']} norms fused, {len(data['tensors_rewritten'])} tensors rewritten "
        f"in {data['timings_s']['total']:.2f}s"
    )
    if data["validation"]:
        val = data["validation"]
        print(
            f"validated on {val['provider']}: logits max-abs {val['max_abs']:.3g}, relative L2 {val['rel_l2']:.3g}, "
            f"argmax agreement {val['argmax_agreement']:.4f} ({'; '.join(val['cases'])})"
        )
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from spinquant_onnx.api import analyze
    from spinquant_onnx.graph_io import load_model
    from spinquant_onnx.inspect_view import render

    path = Path(args.input)
    print(render(analyze(load_model(path), path.parent)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spinquant-onnx", description="Apply SpinQuant rotations to exported ONNX decoders, exactly."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True)

    rotate = sub.add_parser("rotate", help="fuse RMSNorm scales and apply the R1 rotation: IN.onnx -> OUT.onnx")
    rotate.add_argument("input", help="ONNX model exported from a decoder LLM (fp32/fp16/bf16)")
    rotate.add_argument("output", help="where to write the rotated model (external data goes beside it)")
    rotate.add_argument("--rotation", choices=KINDS, default="hadamard", help="R1 kind (default: hadamard)")
    rotate.add_argument("--seed", type=int, default=0, help="seed for random-hadamard / random-orthogonal")
    rotate.add_argument("--block-size", type=int, default=None, help="block-diagonal R1 of this order")
    rotate.add_argument("--validate", action="store_true",
                        help="run original and rotated in onnxruntime; fail (exit 1) above relative L2 1e-4")
    rotate.add_argument("--providers", type=_providers, default=None,
                        help="comma list for --validate, e.g. cuda,cpu (default: cuda if it loads, else cpu)")
    rotate.add_argument("--report", help="write a JSON report here")
    rotate.add_argument("--in-place", action="store_true", help="allow OUT to be the same file as IN")
    rotate.set_defaults(func=_cmd_rotate)

    inspect = sub.add_parser("inspect", help="print the blocks, norms and linear roles the matcher finds")
    inspect.add_argument("input")
    inspect.set_defaults(func=_cmd_inspect)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except SpinQuantError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"spinquant-onnx: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("spinquant-onnx: interrupted; no output written", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure is still one line unless --debug
        if args.debug:
            traceback.print_exc()
        print(f"spinquant-onnx: internal error: {type(exc).__name__}: {exc} (rerun with --debug)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
