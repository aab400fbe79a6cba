"""Typed errors: every refusal the tool makes is one of these, so the CLI can print one line and exit 2."""

from __future__ import annotations


class SpinQuantError(Exception):
    """A refusal with a one-line, user-facing message (what, where, what to do)."""

    exit_code = 2


class InputError(SpinQuantError):
    """The input file or model cannot be read or is malformed."""


class UnsupportedGraphError(SpinQuantError):
    """The graph is readable but its structure is not one we can rotate exactly."""


class UnsupportedSizeError(SpinQuantError):
    """No rotation of the requested kind exists for this size."""


class ValidationFailedError(SpinQuantError):
    """The rotated model does not reproduce the original within tolerance."""

    exit_code = 1


class OutputGateError(SpinQuantError):
    """The rewritten graph failed the structural output gate (``core.gate``): a bug in this tool, not the input."""

    exit_code = 3
