"""Command line: ``rotate``, ``rotate-parts``, ``inspect``, ``eval``, ``quantize``, ``rotate-vlm`` (one module each).

Every refusal is one line on stderr with exit code 2 (1 when validation fails); ``--debug`` adds the
traceback. The input is never modified and a failed run leaves no output behind.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import traceback

from spinquant_onnx import __version__
from spinquant_onnx.cli import eval as eval_cli
from spinquant_onnx.cli import inspect, learn, quantize, rotate, rotate_parts
from spinquant_onnx.cli import vlm as vlm_cli
from spinquant_onnx.cli.common import quiet_runtime_logs, say
from spinquant_onnx.errors import SpinQuantError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spinquant-onnx", description="Apply SpinQuant rotations to exported ONNX decoders, exactly."
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    parser.add_argument("--version", action="version", version=f"spinquant-onnx {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    for command in (rotate, rotate_parts, inspect, eval_cli, quantize, vlm_cli, learn):
        # --debug is accepted before or after the subcommand; SUPPRESS keeps the main parser's value otherwise
        command.add_parser(sub).add_argument(
            "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors"
        )
    return parser


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
        # As the program (no argv given), a SIGTERM after the command has finished (its output published, the
        # interpreter shutting down) no longer changes the outcome: it is ignored, so the process ends with
        # the command's own status (0 or 130), never -15. A Python handler would not do: finalization resets
        # those to the default, ignored signals it leaves alone. Called from other code, the caller's handler
        # comes back.
        signal.signal(signal.SIGTERM, signal.SIG_IGN if argv is None else previous)


def _run(args: argparse.Namespace) -> int:
    """The command, with every failure turned into one line on stderr and an exit code."""
    try:
        quiet_runtime_logs()
        return args.func(args)
    except BrokenPipeError:  # `inspect | head`: the reader left; that is not an error
        _silence_stdout()
        return 0
    except SpinQuantError as exc:
        if args.debug:
            traceback.print_exc()
        say("internal error" if exc.exit_code == 3 else "error", exc)  # #13: the output gate's refusal is exit 3
        return exc.exit_code
    except KeyboardInterrupt:
        say("interrupted", "stopped before finishing; no partial output is left")
        return 130
    except MemoryError:
        if args.debug:
            traceback.print_exc()
        say("error", "ran out of memory; no output written (free memory, or keep weights in external data)")
        return 2
    except OSError as exc:  # a file operation no check foresaw (I/O error, disk full): still the user's to fix
        if args.debug:
            traceback.print_exc()
        where = f"{exc.filename}: " if exc.filename else ""
        say("error", f"{where}{exc.strerror or exc}; no output written")
        return 2
    except Exception as exc:  # an unexpected failure is still one line unless --debug
        if args.debug:
            traceback.print_exc()
        say("internal error", f"{type(exc).__name__}: {exc} (rerun with --debug)")
        return 3


def _silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not raise again (Python docs' recipe)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout is not a real file (captured in tests)
        pass


if __name__ == "__main__":
    sys.exit(main())
