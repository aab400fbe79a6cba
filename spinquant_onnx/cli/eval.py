"""``spinquant-onnx eval MODEL.onnx [--rotated R.onnx]``: perplexity, float and quantized, before and after."""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

from spinquant_onnx.errors import InputError


def _rows(value: str) -> tuple[str, ...]:
    return tuple(r.strip() for r in value.split(",") if r.strip())


def _providers(value: str) -> list[str]:
    return [p.strip() for p in value.split(",") if p.strip()]


def _tokens_path(args: argparse.Namespace) -> Path:
    if args.tokens:
        return Path(args.tokens)
    beside = Path(args.model).parent / "tokens.npy"
    if beside.is_file():
        return beside
    raise InputError(f"no --tokens given and no tokens.npy beside {args.model}; scripts/export_smollm2.py writes one")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# Optional dependencies by the option that needs them: checked before any work, with the command that fixes it.
OPTIONAL_DEPENDENCIES = {
    "plot": ("--plot", "matplotlib", "pip install matplotlib  (or: pip install 'spinquant-onnx[plot]')"),
}


def check_optional_dependencies(args: argparse.Namespace) -> None:
    for attribute, (option, module, fix) in OPTIONAL_DEPENDENCIES.items():
        if not getattr(args, attribute, None):
            continue
        try:
            importlib.import_module(module)
        except ImportError:
            raise InputError(f"{option} needs {module}, which is not installed: {fix}") from None


def chosen_rows(rows: tuple[str, ...] | None, sensitivity: bool) -> tuple[str, ...]:
    """``--rows`` (default: DEFAULT_ROWS); ``--sensitivity`` adds float, W8A8 and one row per site family
    (and alone asks for nothing else)."""
    from spinquant_onnx.integrations.evaluate import DEFAULT_ROWS, ROWS, SENSITIVITY_ROWS

    if not sensitivity:
        return DEFAULT_ROWS if rows is None else rows
    wanted = {*(rows or ()), "float", "w8a8", *SENSITIVITY_ROWS}
    return tuple(row for row in ROWS if row in wanted)


def run(args: argparse.Namespace) -> int:
    check_optional_dependencies(args)
    from spinquant_onnx.integrations import evaluate as ev

    config = ev.EvalConfig(
        windows=args.windows,
        window_len=args.window_len,
        calibration_windows=args.calibration_windows,
        rows=chosen_rows(args.rows, args.sensitivity),
        providers=args.providers,
        activations=True,
        quantize_lm_head=args.quantize_lm_head,
    )
    tokens_path = _tokens_path(args)
    tokens = ev.load_tokens(tokens_path)
    results = ev.evaluate(args.model, tokens, config, rotated=args.rotated, log=None if args.quiet else _log)
    print(ev.table(results))
    if args.json:
        target = Path(args.json)
        target.parent.mkdir(parents=True, exist_ok=True)
        payload = ev.to_json(results, config, str(tokens_path), int(tokens.size))
        target.write_text(json.dumps(payload, indent=2) + "\n")
    if args.plot:
        ev.plot(results, args.plot)
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register ``eval`` on the main parser's subcommands."""
    from spinquant_onnx.integrations.evaluate import DEFAULT_ROWS, ROWS

    parser = subparsers.add_parser(
        "eval",
        help="perplexity on a token file: float, W8A8 (static QDQ) and W4 (MatMulNBits), original vs rotated",
        description=(
            "Score MODEL (and --rotated) on fixed windows of a token array with onnxruntime: float, W8A8 "
            "(quantize_static QDQ, per-channel int8 weights, per-tensor uint8 activations, MinMax calibration "
            "on held-out windows, lm_head float) and weight-only int4 (MatMulNBits RTN, block 128 and 32)."
        ),
    )
    parser.add_argument(
        "model",
        help="float ONNX decoder with input_ids (attention_mask, position_ids, past key/values: an empty past is "
        "fed) and a logits output",
    )
    parser.add_argument("--rotated", help="its rotated twin, scored on the same windows")
    parser.add_argument("--tokens", help="1-D .npy of token ids (default: tokens.npy beside MODEL)")
    parser.add_argument("--windows", type=int, default=4, help="windows scored (default 4)")
    parser.add_argument("--window-len", type=int, default=256, help="tokens per window (default 256)")
    parser.add_argument(
        "--calibration-windows",
        type=int,
        default=2,
        help="windows after the scored ones used to calibrate W8A8 (default 2)",
    )
    parser.add_argument(
        "--rows",
        type=_rows,
        default=None,
        help=f"comma list from {','.join(ROWS)} (default {','.join(DEFAULT_ROWS)}); w8a8-int runs the W8A8 "
        "model with onnxruntime's fused int8 kernels instead of as dequantize-then-float",
    )
    parser.add_argument(
        "--sensitivity",
        action="store_true",
        help="also W8A8 with one site family quantized at a time (weights only; the input of q/k/v, o_proj, "
        "gate/up, down_proj; other activations), from the matched roles and the full W8A8 model's scales",
    )
    parser.add_argument("--quantize-lm-head", action="store_true", help="quantize lm_head too (default: float)")
    parser.add_argument("--providers", type=_providers, default=None, help="onnxruntime providers (default cpu)")
    parser.add_argument("--json", help="write the results as JSON here")
    parser.add_argument("--plot", help="write a PNG: residual per-channel max |x| and perplexity bars")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=run)
    return parser
