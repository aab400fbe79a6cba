"""``spinquant-onnx rotate IN OUT``: fuse norms, rotate (R1, and R2/R3/R4 as asked), write atomically."""

from __future__ import annotations

import argparse
from typing import Any

from spinquant_onnx.cli.common import positive, providers, say, write_json
from spinquant_onnx.errors import InputError
from spinquant_onnx.rotation.kinds import KINDS


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``rotate`` on the main parser's subparsers."""
    rotate = sub.add_parser("rotate", help="fuse RMSNorm scales and apply the R1 rotation: IN.onnx -> OUT.onnx")
    rotate.add_argument("input", help="ONNX model exported from a decoder LLM (fp32/fp16/bf16)")
    rotate.add_argument("output", help="where to write the rotated model (external data goes beside it)")
    rotate.add_argument("--rotation", choices=KINDS, default=None, help="R1 kind (default: hadamard)")
    rotate.add_argument("--seed", type=int, default=None,
                        help="seed for random-hadamard / random-orthogonal (default 0)")
    rotate.add_argument("--block-size", type=positive, default=None, help="block-diagonal R1 of this order")
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
    calib = rotate.add_argument_group(
        "activation statistics", "--smooth and --float-channels use the original model's per-channel max |x| of "
        "o_proj's and down_proj's inputs, measured on windows of a token file")
    calib.add_argument("--calibration", metavar="TOKENS.npy", help="1-D .npy of token ids to measure them on")
    calib.add_argument("--calibration-windows", type=positive, default=4, help="windows (default 4)")
    calib.add_argument("--calibration-window-len", type=positive, default=256, help="tokens per window (default 256)")
    calib.add_argument("--calibration-offset", type=int, default=4096,
                       help="first token used (default 4096: past what eval scores and calibrates on)")
    calib.add_argument("--smooth", action="store_true",
                       help="SmoothQuant scales moved from o_proj's / down_proj's inputs into v / up (exact)")
    calib.add_argument("--smooth-alpha", type=float, default=0.5,
                       help="migration strength a in s = max|x|^a / max|W|^(1-a) (default 0.5)")
    calib.add_argument("--smooth-sites", type=lambda v: tuple(s.strip() for s in v.split(",") if s.strip()),
                       default=("down", "o"), help="comma list from down,o (default both)")
    calib.add_argument("--float-channels", type=positive, default=None, metavar="K",
                       help="compute the K largest down_proj input channels on a float side path (exact), so "
                       "their massive values set neither down_proj's input nor its output range")
    rotate.add_argument("--force", action="store_true",
                        help="rotate a model spinquant-onnx already rotated (refused otherwise: it would undo R1)")
    rotate.set_defaults(func=run)
    return rotate


def run(args: argparse.Namespace) -> int:
    from spinquant_onnx.core.pipeline import convert  # the library loads on use: --help stays fast

    warnings = ignored_options(args)
    for text in warnings:
        say("warning", text)
    smooth, maxima = calibration(args)
    report = convert(
        args.input,
        args.output,
        rotation=args.rotation or "hadamard",
        seed=0 if args.seed is None else args.seed,
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
        smooth=smooth,
        float_channels=args.float_channels or 0,
        activation_maxima=maxima,
    )
    data = report.to_dict()
    late = after_run_warnings(args, data)
    for text in late:
        say("warning", text)
    data["warnings"] = warnings + late
    if args.report:
        write_json(args.report, data)
    print(summary(args.output, data))
    val = data["validation"]
    if val:
        print(
            f"validated on {val['provider']}: logits max-abs {val['max_abs']:.3g}, relative L2 {val['rel_l2']:.3g}, "
            f"argmax agreement {val['argmax_agreement']:.4f} ({'; '.join(val['cases'])})"
            # #13: low-precision models are judged against their own rounding noise
            + (f"; threshold {val['threshold']:.3g} from rounding noise {val['rounding_noise']:.3g}"
               if val.get("rounding_noise") is not None else "")
        )
    return 0


def calibration(args: argparse.Namespace) -> tuple[Any, dict | None]:
    """The Smoothing and the maxima --smooth / --float-channels ask for, measured once (options checked first)."""
    if not (args.smooth or args.float_channels):
        return None, None
    if not args.calibration:
        asked = "--smooth" if args.smooth else "--float-channels"
        raise InputError(f"{asked} needs activation statistics: add --calibration TOKENS.npy")
    from spinquant_onnx.integrations.activation_stats import calibrate
    from spinquant_onnx.rewrite.smooth import Smoothing

    if args.smooth:
        Smoothing({}, args.smooth_alpha, args.smooth_sites)  # a bad alpha or site list: refused before any run
    sites = tuple(sorted({*(args.smooth_sites if args.smooth else ()), *(("down",) if args.float_channels else ())}))
    maxima, source = calibrate(args.input, args.calibration, sites=sites, windows=args.calibration_windows,
                               window_len=args.calibration_window_len, offset=args.calibration_offset)
    smooth = Smoothing(maxima, args.smooth_alpha, args.smooth_sites, source) if args.smooth else None
    return smooth, maxima if args.float_channels else None


def ignored_options(args: argparse.Namespace) -> list[str]:
    """Options the run will not use, known before it starts (the rotation file's contents are checked later)."""
    found = []
    if args.seed is not None and (args.rotation or "hadamard") == "hadamard" and not args.rotation_file:
        found.append("--seed is ignored with --rotation hadamard (deterministic); use random-hadamard or "
                     "random-orthogonal for a seeded R1")
    if args.trust_roles and not args.roles:
        found.append("--trust-roles is ignored without --roles")
    if args.calibration and not (args.smooth or args.float_channels):
        found.append("--calibration is ignored without --smooth or --float-channels")
    validates = args.validate or bool(args.roles and not args.trust_roles)  # a role map forces validation
    if args.providers and not validates:
        found.append("--providers is ignored without --validate (it picks where the check runs)")
    return found


def after_run_warnings(args: argparse.Namespace, data: dict[str, Any]) -> list[str]:
    """Options the run turned out not to use: an R1 from the rotation file, CUDA asked for but absent."""
    found = []
    learned = data["rotation"].get("rotation_file")
    if learned and learned.get("r1"):
        given = [flag for flag, value in (("--rotation", args.rotation), ("--seed", args.seed),
                                          ("--block-size", args.block_size)) if value is not None]
        if given:
            found.append(f"{', '.join(given)} ignored: R1 comes from the rotation file {learned['path']}")
    asked = [p.lower() for p in args.providers or []]
    val = data["validation"]
    if val and {"cuda", "gpu", "cudaexecutionprovider"} & set(asked) and "CUDA" not in val["provider"]:
        found.append(f"CUDA was asked for (--providers {','.join(args.providers)}) but does not load here; "
                     f"validated on {val['provider']}")
    return found


def summary(output: str, data: dict[str, Any]) -> str:
    """One line naming everything the run did: R1 and how, R2/R3/R4, online nodes, the rotation file."""
    rot = data["rotation"]
    how = [f"n={rot['n']}"]
    if rot.get("block_size"):
        how.append(f"blocks of {rot['block_size']}")
    if rot.get("seed") is not None:
        how.append(f"seed {rot['seed']}")
    how.append(rot["precision"])
    kind = f"block-diagonal {rot['block_kind']}" if rot["kind"] == "block-diagonal" else rot["kind"]
    parts = [f"R1 {kind} ({', '.join(how)}) over {data['blocks']} blocks, {data['norms_fused']} norms fused"]
    learned = rot.get("rotation_file")
    if learned:
        held = [name for name, present in (("R1", learned["r1"]), ("R2", learned["r2_layers"] or learned["r2_shared"]))
                if present]
        parts.append(f"rotation file {learned['path']} ({' and '.join(held) or 'empty'}"
                     + (f"; {'; '.join(learned['notes'])}" if learned["notes"] else "") + ")")
    if rot.get("r2"):
        dims = sorted({site["head_dim"] for site in rot["r2"]})
        parts.append(f"R2 (head_dim {'/'.join(map(str, dims))}) in {len(rot['r2'])} blocks")
    if rot.get("r3"):
        parts.append(f"R3 online on Q and K in {len(rot['r3'])} blocks")
    if rot.get("smooth"):
        smooth = rot["smooth"]
        parts.append(f"smoothed {'/'.join(smooth['sites'])} inputs (alpha {smooth['alpha']:g}) at "
                     f"{len(smooth['layers'])} sites")
    if rot.get("float_channels"):
        count = len(rot["float_channels"][0]["channels"])
        parts.append(f"{count} down_proj input channels on a float side path in {len(rot['float_channels'])} blocks")
    if rot.get("r4"):
        orders = sorted({site["order"] for site in rot["r4"]})
        parts.append(f"R4 online (order {'/'.join(map(str, orders))}) in {len(rot['r4'])} blocks")
    online = data["online_rotations"]
    if online:
        nodes = sum(int(o.get("nodes", 1)) for o in online)
        parts.append(f"{len(online)} online rotations ({nodes} nodes)")
    parts.append(f"{len(data['tensors_rewritten'])} tensors rewritten in {data['timings_s']['total']:.2f}s")
    val = data["validation"]
    parts.append(f"validated on {val['provider']}" if val else "not validated")
    return f"wrote {output}: " + "; ".join(parts)

