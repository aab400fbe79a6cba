"""``spinquant-onnx quantize IN OUT --scheme w8a8|w4 --tokens T.npy``: ONNX Runtime's quantizers, online nodes float.

rotate -> quantize -> deploy without code: the same quantizer calls as ``eval``'s rows
(``integrations/quantize.py``), with the online rotations (and lm_head, unless asked) excluded.
"""

from __future__ import annotations

import argparse
import json


def run(args: argparse.Namespace) -> int:
    from spinquant_onnx.integrations import quantize as q
    from spinquant_onnx.integrations.evaluate import load_tokens

    tokens = load_tokens(args.tokens) if args.tokens else None
    done = q.quantize_model(
        args.input,
        args.output,
        args.scheme,
        tokens=tokens,
        windows=args.calibration_windows,
        window_len=args.window_len,
        block_size=args.block_size,
        quantize_lm_head=args.quantize_lm_head,
    )
    print(json.dumps({**done, "kept_float": len(done["kept_float"]), "online_nodes": len(done["online_nodes"])}))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``quantize`` on the main parser's subcommands."""
    parser = subparsers.add_parser(
        "quantize",
        help="quantize a (rotated) model with onnxruntime, online rotations kept float",
        description=(
            "w8a8: quantize_static QDQ, per-channel int8 weights, per-tensor uint8 activations, MinMax "
            "calibration on the first windows of --tokens; w4: MatMulNBits RTN, symmetric, --block-size. "
            "The online rotation nodes (spinquant_onnx.keep_float) and lm_head stay float."
        ),
    )
    parser.add_argument("input", help="ONNX model (typically the output of rotate)")
    parser.add_argument("output", help="quantized ONNX model to write")
    parser.add_argument("--scheme", choices=("w8a8", "w4"), required=True)
    parser.add_argument("--tokens", help="1-D .npy of token ids for calibration (needed by w8a8)")
    parser.add_argument("--calibration-windows", type=int, default=2, help="calibration windows (default 2)")
    parser.add_argument("--window-len", type=int, default=256, help="tokens per calibration window (default 256)")
    parser.add_argument("--block-size", type=int, default=128, help="w4 block size (default 128)")
    parser.add_argument("--quantize-lm-head", action="store_true", help="quantize lm_head too (default: float)")
    parser.set_defaults(func=run)
    return parser
