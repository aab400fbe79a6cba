"""Atomic output: write into a hidden staging folder beside the destination, then commit by renames.

A failed or killed run leaves either the previous output or none, never a partial one.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from spinquant_onnx.errors import SpinQuantError
from spinquant_onnx.io.model_file import one_line

_STAGING = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)-[A-Za-z0-9_]+\.partial$")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_staging(out_path: Path) -> list[Path]:
    """Remove staging folders for ``out_path`` left by runs that were killed (their process is gone)."""
    removed = []
    with contextlib.suppress(OSError):
        for entry in out_path.parent.iterdir():
            found = _STAGING.match(entry.name)
            if found and found["name"] == out_path.name and entry.is_dir() and not _pid_alive(int(found["pid"])):
                shutil.rmtree(entry, ignore_errors=True)
                removed.append(entry)
    return removed


def staging_dir(out_path: str | os.PathLike) -> Path:
    """A fresh hidden folder beside ``out_path``: outputs are written and checked there, then moved.

    Named ``.<out name>.<pid>-<random>.partial``; folders left by killed runs are removed here.
    """
    out_path = Path(out_path)
    if out_path.is_dir():
        raise SpinQuantError(f"{out_path}: output is an existing folder; give a file name such as model.onnx")
    blocking = next((p for p in out_path.parents if p.exists() or p.is_symlink()), None)
    if blocking is not None and not blocking.is_dir():
        raise SpinQuantError(f"{blocking}: is a file, not a folder; cannot write the output under it")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        clean_stale_staging(out_path)
        prefix = f".{out_path.name}.{os.getpid()}-"
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=".partial", dir=out_path.parent))
    except OSError as exc:
        raise SpinQuantError(
            f"{out_path.parent}: cannot write the output there ({one_line(exc.strerror or exc)})"
        ) from exc


def output_data_name(out_path: str | os.PathLike) -> str:
    """Name for the output's external-data file: ``<out>.data`` unless a file of that name exists.

    Never reusing an existing name means the model file's rename is the single commit point: until it
    happens the previous output (or the input, with --in-place) still finds its own data file intact.
    """
    out_path = Path(out_path)
    name = out_path.name + ".data"
    while (out_path.parent / name).exists() or (out_path.parent / name).is_symlink():
        name = f"{out_path.name}.{secrets.token_hex(4)}.data"
    return name


def _fsync(path: Path) -> None:
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if path.is_dir() else os.O_RDONLY
    with contextlib.suppress(OSError):
        fd = os.open(path, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def commit_output(staged: list[Path], out_path: str | os.PathLike, protect: Iterable[str | os.PathLike] = ()) -> None:
    """Move one model's staged files into place; the model file's rename is the one moment the output changes.

    Data files carry names no existing file has (``output_data_name``), so they are moved in first without
    touching the previous output. After the model is renamed over ``out_path``, data files of earlier
    versions (``<out>.data``, ``<out>.<hex>.data``) that the new model does not use are deleted, except
    any in ``protect`` (the input's own files).
    """
    commit_all([Staged(list(staged), Path(out_path))], protect)


class Staged:
    """One output, written in its staging folder: ``files`` (the main file first) destined for ``out_path``.

    A model's further files are external data (moved in under their fresh names, stale ones cleaned up);
    a plain file (``model=False``, e.g. a VLM's embedding table) is one file renamed into place.
    """

    def __init__(self, files: list[Path], out_path: Path, *, model: bool = True) -> None:
        self.files, self.out_path, self.model = files, out_path, model


def commit_all(outputs: list[Staged], protect: Iterable[str | os.PathLike] = ()) -> None:
    """Commit several staged outputs together: every data file first, then the main files back to back.

    Until the first main file is renamed every previous output is intact; the renames follow one another
    with nothing computed in between (POSIX has no atomic multi-file rename: this is the closest).
    """
    for output in outputs:
        if output.model:
            _move_data_files(output)
    for output in outputs:
        if output.model:
            _replace_model(output)
        else:
            os.replace(output.files[0], output.out_path)
    keep = {Path(p).resolve() for p in protect}
    for output in outputs:
        if output.model:
            _clean_after(output, keep)


def _move_data_files(output: Staged) -> None:
    out_path = output.out_path
    try:
        for data in output.files[1:]:
            os.replace(data, out_path.parent / data.name)
    except OSError as exc:
        reason = one_line(exc.strerror or exc)
        raise SpinQuantError(f"{out_path}: cannot move the output into place ({reason})") from exc


def _replace_model(output: Staged) -> None:
    out_path = output.out_path
    try:
        os.replace(output.files[0], out_path)
        _fsync(out_path.parent)
    except OSError as exc:
        reason = one_line(exc.strerror or exc)
        raise SpinQuantError(f"{out_path}: cannot move the output into place ({reason})") from exc


def _clean_after(output: Staged, protect: set[Path]) -> None:
    out_path, model_file, data_files = output.out_path, output.files[0], output.files[1:]
    shutil.rmtree(model_file.parent, ignore_errors=True)
    keep = protect | {(out_path.parent / d.name).resolve() for d in data_files}
    for old in stale_data_files(out_path):
        if old.resolve() not in keep:
            with contextlib.suppress(OSError):
                old.unlink()


def stale_data_files(out_path: Path) -> list[Path]:
    """Files named like this tool's data files for ``out_path``: ``<out>.data`` and ``<out>.<hex>.data``."""
    pattern = re.compile(re.escape(out_path.name) + r"(\.[0-9a-f]{8})?\.data")
    with contextlib.suppress(OSError):
        return [p for p in out_path.parent.iterdir() if pattern.fullmatch(p.name) and not p.is_dir()]
    return []


def discard_output(staging: Path) -> None:
    shutil.rmtree(staging, ignore_errors=True)
