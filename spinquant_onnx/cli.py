"""Command line: ``spinquant-onnx rotate IN OUT`` and ``spinquant-onnx inspect IN``.

Every refusal is one line on stderr with exit code 2 (1 when validation fails); ``--debug`` adds the
traceback. The input is never modified and a failed run leaves no output behind.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import traceback
from pathlib import Path

from spinquant_onnx import eval_cli, vlm_cli
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
        _write_json(args.report, data)
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


def _cmd_inspect(args: argparse.Namespace) -> int:
    from spinquant_onnx.api import analyze
    from spinquant_onnx.graph_io import load_model
    from spinquant_onnx.inspect_view import render

    path = Path(args.input)
    analysis = analyze(load_model(path), path.parent)
    print(render(analysis))
    if args.json:
        from spinquant_onnx.match.role_map import export_roles, write_roles

        write_roles(export_roles(analysis.index, analysis.stream, analysis.roles), args.json)
        print(f"role map written to {args.json}")
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
    rotate.set_defaults(func=_cmd_rotate)

    inspect = sub.add_parser("inspect", help="print the blocks, norms and linear roles the matcher finds")
    inspect.add_argument("input")
    inspect.add_argument("--json", metavar="ROLES.json", help="also write the role map (editable; see README)")
    inspect.set_defaults(func=_cmd_inspect)
    eval_cli.add_parser(sub)
    vlm_cli.add_parser(sub)
    return parser


def _say(kind: str, message: object) -> None:
    """One line on stderr whatever the message holds (library errors often span several)."""
    print(f"spinquant-onnx: {kind}: {' '.join(str(message).split())}", file=sys.stderr)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM unwinds like Ctrl-C, so the staging folder is removed


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if threading.current_thread() is not threading.main_thread():
        return _run(args)
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(args: argparse.Namespace) -> int:
    """The command, with every failure turned into one line on stderr and an exit code."""
    try:
        return args.func(args)
    except SpinQuantError as exc:
        if args.debug:
            traceback.print_exc()
        _say("internal error" if exc.exit_code == 3 else "error", exc)  # #13: the output gate's refusal is exit 3
        return exc.exit_code
    except KeyboardInterrupt:
        _say("interrupted", "stopped before finishing; no partial output is left")
        return 130
    except MemoryError:
        if args.debug:
            traceback.print_exc()
        _say("error", "ran out of memory; no output written (free memory, or keep weights in external data)")
        return 2
    except OSError as exc:  # a file operation no check foresaw (I/O error, disk full): still the user's to fix
        if args.debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        _say("error", f"{where}{exc.strerror or exc}; no output written")
        return 2
    except Exception as exc:  # an unexpected failure is still one line unless --debug
        if args.debug:
            traceback.print_exc()
        _say("internal error", f"{type(exc).__name__}: {exc} (rerun with --debug)")
        return 3


if __name__ == "__main__":
    sys.exit(main())
