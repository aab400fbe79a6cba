"""A rewrite as a plan: which operations each initializer use needs, applied later one tensor at a time.

Planning per *use* (an edge into a node) rather than per initializer is what makes shared tensors safe:
when two uses of one table need different rewrites (a tied embedding read by the Gather as a writer and
by lm_head as a reader), the plan clones the table and points each use at its own copy. Uses the plan
does not mention keep the original values. Nothing is computed until ``materialize`` is asked for a
tensor, so writing a model streams: read one tensor, rewrite it in float64, cast back, write, free.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import dataclass, field

import numpy as np
import onnx

from spinquant_onnx.graph.index import GraphIndex, Use, fresh_name
from spinquant_onnx.io.tensor_store import TensorStore
from spinquant_onnx.rotation.kinds import Rotation

# Elements of float64 work per chunk when a tensor is rewritten along one axis: bounds temporary memory
# (one chunk per worker thread in flight), and splits a tensor across threads. 256K (a 2 MB working copy
# and its GEMM buffer) stays in cache while the ops run over it: on the 2-layer Llama-1B-shaped model
# rotate took 1.62x the streaming floor against 1.73x with 1M (median of 3 interleaved runs), and 8.4 / 4.9
# ns per element instead of 13.0 / 8.9 on one core (column / row layout); 128K and smaller lose more to
# strided reads of the mapped source than they win in cache.
CHUNK_ELEMENTS = 1 << 18
# Tensors from this size on are split across the worker threads (below it, threads cost more than they save).
SPLIT_ELEMENTS = 1 << 16
THREADS_ENV = "SPINQUANT_THREADS"


@dataclass(frozen=True, eq=False)
class TensorOp:
    """One float64 operation on one axis of a tensor."""

    kind: str  # "scale" | "rotate" | "rotate_t" | "fill" | "center" | "shift"
    axis: int = 0
    vector: np.ndarray | None = None
    rotation: Rotation | None = None
    value: float = 0.0
    note: str = ""

    def key(self) -> tuple:
        vec = None if self.vector is None else self.vector.tobytes()
        return (self.kind, self.axis, vec, id(self.rotation), self.value)

    def apply(self, values: np.ndarray, work: type = np.float64, owned: bool = False) -> np.ndarray:
        """The op in the working precision ``work`` (float64 by default); ``owned`` arrays are reused."""
        if self.kind == "fill":
            return np.full(values.shape, self.value, dtype=work)
        if self.kind == "scale":
            shape = [1] * values.ndim
            shape[self.axis] = -1
            factor = self.vector.astype(work).reshape(shape)
            if owned:
                values *= factor
                return values
            return values * factor
        if self.kind == "center":  # x <- x (I - 11^T/n) along the axis: each row loses its mean
            mean = values.mean(axis=self.axis, keepdims=True)
            if owned:
                values -= mean
                return values
            return values - mean
        if self.kind == "shift":  # add a vector along the axis (a LayerNorm's beta moved into a bias)
            shape = [1] * values.ndim
            shape[self.axis] = -1
            return values + self.vector.astype(work).reshape(shape)
        if self.kind == "rotate":
            return self.rotation.apply(values, self.axis, dtype=work, overwrite=owned)
        if self.kind == "rotate_t":
            return self.rotation.apply_transpose(values, self.axis, dtype=work, overwrite=owned)
        raise ValueError(self.kind)


def scale(axis: int, vector: np.ndarray, note: str = "") -> TensorOp:
    return TensorOp("scale", axis, vector=np.asarray(vector, dtype=np.float64), note=note)


def center(axis: int, note: str = "") -> TensorOp:
    return TensorOp("center", axis, note=note)


def shift(axis: int, vector: np.ndarray, note: str = "") -> TensorOp:
    return TensorOp("shift", axis, vector=np.asarray(vector, dtype=np.float64), note=note)


def rotate(axis: int, rotation: Rotation, note: str = "") -> TensorOp:
    return TensorOp("rotate", axis, rotation=rotation, note=note)


def rotate_transposed(axis: int, rotation: Rotation, note: str = "") -> TensorOp:
    return TensorOp("rotate_t", axis, rotation=rotation, note=note)


def fill(value: float, note: str = "") -> TensorOp:
    return TensorOp("fill", value=value, note=note)


def workers() -> int:
    """Threads that rewrite one tensor's chunks side by side (every core this process may use)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return max(1, int(os.environ.get(THREADS_ENV, "0") or 0) or cores)


@functools.lru_cache(maxsize=1)
def _pool(count: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=count, thread_name_prefix="spinquant-chunk")


# glibc mallopt parameters and the values set: every chunk's float64 working copy and GEMM results are
# megabytes, which glibc would otherwise map and unmap per allocation, zero-filling fresh pages each time.
_MALLOPT = {-3: 64 << 20, -1: 512 << 20, -2: 64 << 20}  # M_MMAP_THRESHOLD, M_TRIM_THRESHOLD, M_TOP_PAD


@functools.lru_cache(maxsize=1)
def _reuse_freed_memory() -> bool:
    """Keep freed working chunks in the allocator for the next chunk instead of returning them to the kernel.

    Measured on the 2-layer Llama-1B-shaped model: system time 6.1 s -> 1.8 s, wall 10.0 s -> 6.2 s; peak RSS
    unchanged (the freed chunks are the ones the next chunk reuses). A no-op where libc is not glibc.
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return all(libc.mallopt(param, value) == 1 for param, value in _MALLOPT.items())
    except (OSError, AttributeError):
        return False


def _one_blas_thread() -> contextlib.AbstractContextManager:
    """BLAS single-threaded while our threads split the work: its own threading of these skinny GEMMs
    (K = 32..64) is several times slower than one thread per chunk (measured on OpenBLAS)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def run_ops(
    values: np.ndarray,
    ops: tuple[TensorOp, ...],
    dtype: np.dtype,
    work: type = np.float64,
    finite: list[bool] | None = None,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Apply ``ops`` in ``work`` precision and cast to ``dtype`` (into ``out`` when given, e.g. a view of the
    output file), in chunks when every op works on one axis.

    Chunks split the axis no op touches, so each one is an independent fused pass (one working copy in
    ``work`` precision, every op applied in place, cast back on assignment); they run on every core.
    When chunked and ``finite`` is a list, each chunk appends whether its output was all finite (checked
    while the chunk is hot in cache: no separate pass over the tensor). That covers the input too unless an
    op discards it (``fill``): every other op carries a NaN/Inf of its input into some output element.
    """
    if out is None:
        out = np.empty(values.shape, dtype=dtype)
    _reuse_freed_memory()
    axes = {op.axis for op in ops if op.kind != "fill"}
    if len(axes) == 1 and values.ndim >= 2 and values.size >= SPLIT_ELEMENTS:
        axis = axes.pop()
        other = max((a for a in range(values.ndim) if a != axis), key=lambda a: values.shape[a])
        # Chunks of at most CHUNK_ELEMENTS, and at least one per worker: mid-size tensors use every core too.
        step = max(1, min(CHUNK_ELEMENTS * values.shape[other] // values.size, -(-values.shape[other] // workers())))
        inputs_checked = finite if any(op.kind == "fill" for op in ops) else None

        def chunk(start: int) -> None:
            window = [slice(None)] * values.ndim
            window[other] = slice(start, start + step)
            where = tuple(window)
            with np.errstate(over="ignore", invalid="ignore"):  # worker threads: overflow is the caller's to report
                out[where] = _run_all(values[where], ops, work, inputs_checked)  # cast on assignment
            if finite is not None:
                finite.append(bool(np.isfinite(out[where]).all()))

        starts = range(0, values.shape[other], step)
        count = min(workers(), len(starts))
        with _one_blas_thread():
            if count == 1:
                for start in starts:
                    chunk(start)
            else:
                _run_chunks(_pool(count), chunk, starts)
        return out
    out[...] = _run_all(values, ops, work)
    return out


def _run_chunks(pool: ThreadPoolExecutor, chunk: Callable[[int], None], starts: range) -> None:
    """Run every chunk; on any error (or Ctrl-C) wait for those already running before raising: they write
    into ``out``, which may be a view of the mapped output file that the caller unmaps while unwinding."""
    futures = [pool.submit(chunk, start) for start in starts]
    try:
        for future in futures:
            future.result()
    except BaseException:
        for future in futures:
            future.cancel()
        wait(futures)
        raise


def _run_all(values: np.ndarray, ops: tuple[TensorOp, ...], work: type, finite: list[bool] | None = None
             ) -> np.ndarray:
    """One owned working copy, transformed in place by every op."""
    result = np.array(values, dtype=work, order="C")
    if finite is not None:
        finite.append(bool(np.isfinite(result).all()))
    for op in ops:
        result = op.apply(result, work, owned=True)
    return result


@dataclass
class Target:
    """An initializer the rewritten model will hold: its values come from ``source`` through ``ops``."""

    name: str
    source: str
    ops: tuple[TensorOp, ...]
    role: str


@dataclass
class TensorPlan:
    planned: dict[str, list[tuple[Use, tuple[TensorOp, ...], str]]] = field(
        default_factory=lambda: defaultdict(list)
    )
    targets: dict[str, Target] = field(default_factory=dict)
    work: type = np.float64  # arithmetic precision of every rewrite

    def add(self, tensor: str, use: Use, ops: tuple[TensorOp, ...] | list[TensorOp], role: str) -> None:
        """Ask that the value ``use`` reads from initializer ``tensor`` be ``ops`` applied to it (in order).

        Several requests for the same use compose in the order they were made.
        """
        entries = self.planned[tensor]
        for i, (seen, previous, previous_role) in enumerate(entries):
            if seen.node is use.node and seen.index == use.index:
                entries[i] = (
                    use,
                    previous + tuple(ops),
                    previous_role if role in previous_role else f"{previous_role}+{role}",
                )
                return
        entries.append((use, tuple(ops), role))

    def finalize(self, index: GraphIndex) -> None:
        """Group each initializer's uses by their op list; clone where groups differ and rewire edges."""
        model = index.model
        for tensor, entries in self.planned.items():
            groups: dict[tuple, list[tuple[Use, tuple[TensorOp, ...], str]]] = {}
            planned_edges = {(id(u.node), u.index) for u, _, _ in entries}
            for use, ops, role in entries:
                groups.setdefault(tuple(op.key() for op in ops), []).append((use, ops, role))
            unplanned = [u for u in index.users(tensor) if (id(u.node), u.index) not in planned_edges]
            keep_original = bool(unplanned) or tensor in index.graph_outputs
            ordered = sorted(groups.values(), key=len, reverse=True)
            for number, members in enumerate(ordered):
                ops = members[0][1]
                role = "+".join(sorted({m[2] for m in members}))
                if not keep_original and number == 0:
                    self.targets[tensor] = Target(tensor, tensor, ops, role)
                    continue
                name = fresh_name(index, f"{tensor}.spinquant.{role.replace('+', '_')}", set())
                self.targets[name] = Target(name, tensor, ops, role)
                _append_initializer(model, index.store, tensor, name)
                for use, _, _ in members:
                    use.node.input[use.index] = name

    def materialize(
        self, store: TensorStore, name: str, finite: list[bool] | None = None, out: np.ndarray | None = None
    ) -> np.ndarray:
        """The final values of initializer ``name`` (unchanged ones straight from the store), written into
        ``out`` when given; ``finite`` as in ``run_ops``."""
        target = self.targets.get(name)
        if target is None:
            if out is None:
                return store.array(name)
            np.copyto(out, store.array(name))
            return out
        return run_ops(store.array(target.source), target.ops, store.dtype(target.source), self.work, finite, out)


def _append_initializer(model: onnx.ModelProto, store: TensorStore, source: str, name: str) -> None:
    """A placeholder initializer with the source's type and shape; its data is written at save time."""
    tensor = model.graph.initializer.add()
    tensor.name = name
    tensor.data_type = store.tensors[source].data_type
    tensor.dims.extend(store.shape(source))
    store.tensors[name] = tensor
