"""What every command shares: argument parsers, the JSON report writer, the one-line error format."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def providers(value: str) -> list[str]:
    """``--providers cuda,cpu`` as a list."""
    return [p.strip() for p in value.split(",") if p.strip()]


def positive(value: str) -> int:
    """``--block-size``: a positive integer (0 and negatives are refused by name, not as a missing rotation)."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {number}")
    return number


def write_json(path: str, payload: dict) -> None:
    """Write a report atomically (a partial file renamed into place)."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.partial")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    tmp.replace(target)


def say(kind: str, message: object) -> None:
    """One line on stderr whatever the message holds (library errors often span several)."""
    print(f"spinquant-onnx: {kind}: {' '.join(str(message).split())}", file=sys.stderr)


def quiet_runtime_logs() -> None:
    """onnxruntime's own log lines stay off stderr (errors reach the user once, as our one line)."""
    try:
        from spinquant_onnx.core.equivalence import quiet_runtime_logs as quiet
    except ImportError:  # onnxruntime missing: the command reports that itself
        return
    quiet()
