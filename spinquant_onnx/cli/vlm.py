"""``spinquant-onnx rotate-vlm``: a VLM's backbone, visual encoder and embedding table rotated together."""

from __future__ import annotations

import argparse
from typing import Any

from spinquant_onnx.cli.common import positive, providers, write_json
from spinquant_onnx.rotation.kinds import KINDS


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``rotate-vlm`` on the main parser's subparsers."""
    parser = subparsers.add_parser(
        "rotate-vlm",
        help="rotate a vision-language model's backbone, visual encoder and embedding.pth with one R1",
        description=(
            "With --embedding, the table (E @ R1) and the visual encoder's output projections are rotated so that "
            "merged text+image embeddings arrive rotated; without it, R1 is applied online on the backbone's "
            "inputs_embeds (and deepstack) inputs and the visual encoder is left unchanged."
        ),
    )
    parser.add_argument("--backbone", required=True, help="text decoder ONNX taking inputs_embeds")
    parser.add_argument("--visual", help="visual encoder ONNX whose outputs are the image embeddings")
    parser.add_argument("--embedding", help="token embedding table [vocab, hidden] saved with torch.save")
    parser.add_argument("--out-dir", required=True, help="folder for the rotated pieces (same file names)")
    parser.add_argument("--rotation", choices=KINDS, default="hadamard", help="R1 kind (default: hadamard)")
    parser.add_argument("--seed", type=int, default=0, help="seed for random-hadamard / random-orthogonal")
    parser.add_argument("--block-size", type=positive, default=None, help="block-diagonal R1 of this order")
    parser.add_argument(
        "--precision", choices=("float64", "float32"), default="float64", help="arithmetic of the rotation"
    )
    parser.add_argument(
        "--validate",
        action="store_true",
        help="check each rotated piece against the original in onnxruntime; fail (exit 1) above relative L2 1e-4",
    )
    parser.add_argument(
        "--visual-inputs", metavar="FEEDS.npz", help="inputs for the visual encoder's check (else synthesized)"
    )
    parser.add_argument("--providers", type=providers, default=None, help="comma list for --validate, e.g. cuda,cpu")
    parser.add_argument("--report", help="write a JSON report here")
    parser.set_defaults(func=_cmd_rotate_vlm)
    return parser


def _cmd_rotate_vlm(args: argparse.Namespace) -> int:
    from spinquant_onnx.integrations.vlm import convert_vlm

    report = convert_vlm(
        args.backbone,
        args.visual,
        args.embedding,
        args.out_dir,
        visual_feeds=args.visual_inputs,
        rotation=args.rotation,
        seed=args.seed,
        block_size=args.block_size,
        precision=args.precision,
        validate=args.validate,
        providers=args.providers,
    )
    data = report.to_dict()
    if args.report:
        write_json(args.report, data)
    rot, vlm = data["rotation"], data["vlm"]
    visual = vlm["visual"]
    if visual is None:
        visual_text = "no visual encoder"
    elif visual["rotated"]:
        visual_text = f"visual: {len(visual['writers'])} output projection(s) rotated"
    else:
        visual_text = "visual: unchanged"
    how = [f"n={rot['n']}"] + ([f"blocks of {rot['block_size']}"] if rot.get("block_size") else [])
    how += ([f"seed {rot['seed']}"] if rot.get("seed") is not None else []) + [rot["precision"]]
    print(
        f"wrote {args.out_dir}: R1 {rot['kind']} ({', '.join(how)}) over {data['blocks']} blocks, mode {vlm['mode']} "
        f"(entries {', '.join(vlm['entries']) or 'none'}); {visual_text}; "
        f"embedding: {'rotated' if vlm['embedding'] else 'none'}; {len(vlm['online_rotations'])} online rotation(s); "
        + (f"validated on {vlm['validation']['provider']}" if vlm["validation"] else "not validated")
    )
    if vlm["validation"]:
        val = vlm["validation"]
        parts = [f"backbone rel L2 {val['backbone']['rel_l2']:.3g}, argmax {val['backbone']['argmax_agreement']:.4f}"]
        vis = val.get("visual")
        if vis and "rel_l2" in vis:
            shown = ", ".join(
                f"{name} {info.get('values', info['shape'])}" for name, info in vis["inputs"].items()
            )
            parts.append(f"visual rel L2 {vis['rel_l2']:.3g} (inputs: {shown})")
        elif vis:
            parts.append(f"visual not checked: {vis['why']}")
        print(f"validated on {val['provider']}: " + "; ".join(parts))
    return 0
