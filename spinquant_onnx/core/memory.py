"""Memory estimate of a run from sizes alone, against what this process may still allocate.

Refusing early with a clear line is better than being killed by the OS half-way.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from spinquant_onnx.errors import SpinQuantError
from spinquant_onnx.io.model_file import storage_nbytes
from spinquant_onnx.io.tensor_store import TensorStore
from spinquant_onnx.rewrite.plan import CHUNK_ELEMENTS, TensorPlan, workers

SKIP_MEMORY_ENV = "SPINQUANT_SKIP_MEMORY_CHECK"
# Interpreter, numpy, onnx and onnxruntime themselves (measured about 150 MiB).
BASE_MEMORY = 256 << 20
# An onnxruntime session holds its weights, plus packed copies for some kernels.
ORT_WEIGHT_FACTOR = 1.5
GIB = float(1 << 30)


@dataclass
class MemoryEstimate:
    """Peak bytes a run is expected to need, with the largest contributors for the message."""

    need: int
    parts: list[tuple[str, int]] = field(default_factory=list)

    def describe(self) -> str:
        return ", ".join(f"{what} {size / GIB:.1f} GiB" for what, size in self.parts if size >= 1 << 20)


def available_memory() -> int | None:
    """Bytes this process may use in all: what it holds now plus what it may still allocate (MemAvailable,
    capped by a cgroup limit when one is set)."""
    found = [v for v in (_meminfo_available(), _cgroup_available()) if v is not None]
    return min(found) + _resident() if found else None


def _resident() -> int:
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def _cgroup_available() -> int | None:
    """Limit minus non-reclaimable usage of this process's memory cgroup (v2 or v1), if limited."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, relative = line.split(":", 2)
        if controllers == "":
            names = ("memory.max", "memory.current", "inactive_file")
            roots = [Path("/sys/fs/cgroup") / relative.lstrip("/"), Path("/sys/fs/cgroup")]
        elif "memory" in controllers.split(","):
            names = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
            roots = [Path("/sys/fs/cgroup/memory") / relative.lstrip("/"), Path("/sys/fs/cgroup/memory")]
        else:
            continue
        for root in roots:
            value = _cgroup_room(root, *names)
            if value is not None:
                return value
    return None


def _cgroup_room(root: Path, limit_name: str, usage_name: str, inactive_key: str) -> int | None:
    try:
        raw = (root / limit_name).read_text().strip()
        if raw == "max" or int(raw) >= 1 << 60:
            return None
        usage = int((root / usage_name).read_text())
        inactive = 0
        for line in (root / "memory.stat").read_text().splitlines():
            key, _, value = line.partition(" ")
            if key == inactive_key:
                inactive = int(value)
        return max(0, int(raw) - max(0, usage - inactive))
    except (OSError, ValueError):
        return None


def estimate_memory(
    model: onnx.ModelProto, store: TensorStore, plan: TensorPlan, protobuf_bytes: int, *, validate: bool
) -> MemoryEstimate:
    """Peak of the write phase and the validation phase, from sizes alone (nothing is read).

    Writing holds the parsed model and a copy of its graph (embedded weights too, unless read lazily:
    ``protobuf_bytes`` is what was parsed), the tensor being written (its pages in the mapped output file
    and its source's mapped pages, ``io.output_map``: both dropped once it is done), and one float64 working
    chunk per worker thread; embedded outputs are laid out field by field, never serialized whole.
    Validation runs one onnxruntime session at a time, each holding that model's weights.
    """
    sizes = {t.name: storage_nbytes(t.data_type, t.dims) for t in model.graph.initializer}
    total = sum(sizes.values())
    largest = max(sizes, key=sizes.__getitem__, default=None)
    largest_bytes = sizes.get(largest, 0) if largest else 0
    planned = [(name, int(np.prod(store.shape(t.source), dtype=np.int64))) for name, t in plan.targets.items()]
    work = workers() * max((24 * min(count, CHUNK_ELEMENTS) for _, count in planned), default=0)
    parts = [("model protobuf and its copy", 2 * protobuf_bytes)]
    parts += [(f"largest tensor '{largest}' x2", 2 * largest_bytes), ("float64 work", work)]
    write = sum(size for _, size in parts)
    if validate:
        check = protobuf_bytes + int(ORT_WEIGHT_FACTOR * total)
        if check > write:
            parts = [("model protobuf", protobuf_bytes), ("validation (onnxruntime holds the weights)", check)]
            write = check
    return MemoryEstimate(BASE_MEMORY + write, parts)


def check_memory(estimate: MemoryEstimate, *, hints: str = "") -> None:
    """Refuse when the estimate exceeds available memory (unless SPINQUANT_SKIP_MEMORY_CHECK=1)."""
    if os.environ.get(SKIP_MEMORY_ENV, "") not in ("", "0"):
        return
    available = available_memory()
    if available is None or estimate.need <= available:
        return
    raise SpinQuantError(
        f"not enough memory: this run needs about {estimate.need / GIB:.1f} GiB ({estimate.describe()}) but "
        f"{available / GIB:.1f} GiB is available; {hints}free memory, or set {SKIP_MEMORY_ENV}=1 to try anyway"
    )


def check_load_memory(path: Path) -> None:
    """Before parsing: an embedded model is read and parsed whole, about twice its file size."""
    try:
        size = path.stat().st_size
    except OSError:
        return  # load_model reports the missing file
    check_memory(
        MemoryEstimate(BASE_MEMORY + 2 * size, [("reading and parsing the model file", 2 * size)]),
        hints="save the model with external data (onnx.save(..., save_as_external_data=True)), ",
    )
