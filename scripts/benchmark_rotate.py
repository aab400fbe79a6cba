#!/usr/bin/env python
"""Benchmark ``spinquant-onnx rotate``: wall time and peak RSS against a dense baseline and the I/O floor.

Every measurement runs in a fresh child process (peak RSS from ``os.wait4``, which reports that child
alone), with the input files read once beforehand so every run starts from the same warm page cache, and
``sync`` after each so dirty pages of one run are not flushed on the next one's clock. ``--repeat N``
runs the whole list N times round-robin, starting each round one run later (on these shared machines the
run right after a big write pays for it: up to 20% more system time), and reports each run's median wall
and CPU time and its largest peak RSS. Runs per model:

* ``rotate``     - ``spinquant-onnx rotate IN OUT`` (R1 Hadamard, float64, no validation)
* ``rotate-f32`` - the same with ``--precision float32``
* ``io-copy``    - copying the model's files (every byte read and written once, synced): the raw floor
* ``io-stream``  - the streaming I/O floor: our reader and streaming writer, no rotation (#17's yardstick)
* ``io-onnx``    - plain ``onnx.load`` / ``onnx.save``
* ``dense``      - the naive approach: ``onnx.load`` everything, rotate the same tensors with the same
  operations but as dense float64 matrix products, ``onnx.save``
* ``aimet``      - aimet-onnx's ``apply_spinquant`` (R1) between ``onnx.load`` and ``onnx.save``, when
  installed (it refuses hidden sizes outside 2^k x {1, 12, 20, 28}, e.g. SmolLM2's 576)

Models: the SmolLM2 export (``--smollm2``, from scripts/export_smollm2.py) and a synthetic
Llama-3.2-1B-shaped decoder (hidden 2048, 16 layers, intermediate 8192, 32 heads, 8 KV heads, vocab
128256, random weights, external data, 6.0 GB fp32), built with onnx.helper in the structure of a
TorchScript Llama export and streamed to its .data file (``--layers`` for a smaller one).

Usage::

    python scripts/benchmark_rotate.py [--smollm2 /tmp/smollm2/smollm2_ts.onnx] [--layers 16]
        [--workdir /tmp/spinquant_bench] [--runs rotate,dense,io-stream,io-onnx] [--repeat 3] [--json out.json]
        [--keep]
    python scripts/benchmark_rotate.py --build-only --layers 2 --workdir /tmp/llama_small
    python scripts/benchmark_rotate.py --profile --layers 2   # cProfile of the rotate child
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

RUNS = ("rotate", "rotate-f32", "io-copy", "io-stream", "io-onnx", "dense", "aimet")
ALIGN = 64
CHUNK = 1 << 24  # random values generated per step while streaming weights to disk


# ----------------------------------------------------------------------------------- synthetic Llama


@dataclass
class Shape:
    hidden: int = 2048
    layers: int = 16
    intermediate: int = 8192
    heads: int = 32
    kv_heads: int = 8
    vocab: int = 128256
    max_pos: int = 2048
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


class Builder:
    """Nodes, small constants and streamed weights of one graph, with TorchScript-like names."""

    def __init__(self, data_path: Path, seed: int) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[TensorProto] = []
        self.data_path = data_path
        self.data = open(data_path, "wb")  # noqa: SIM115 - closed by finish()
        self.offset = 0
        self.rng = np.random.default_rng(seed)
        self.counter = 0

    def node(self, op: str, inputs: list[str], name: str, outputs: int = 1, **attrs) -> list[str] | str:
        outs = [f"{name}_output_{i}" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs[0] if outputs == 1 else outs

    def const(self, name: str, values: np.ndarray) -> str:
        self.initializers.append(onnx.numpy_helper.from_array(np.ascontiguousarray(values), name))
        return name

    def weight(self, name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> str:
        """A float32 random tensor written straight to the data file in chunks (never whole in memory)."""
        pad = (-self.offset) % ALIGN
        self.data.write(b"\0" * pad)
        self.offset += pad
        total = int(np.prod(shape))
        done = 0
        while done < total:
            n = min(CHUNK, total - done)
            chunk = self.rng.standard_normal(n, dtype=np.float32)
            chunk *= np.float32(std)
            chunk += np.float32(mean)
            self.data.write(chunk.tobytes())
            done += n
        tensor = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=list(shape))
        tensor.data_location = TensorProto.EXTERNAL
        for key, value in (("location", self.data_path.name), ("offset", str(self.offset)), ("length", str(total * 4))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.offset += total * 4
        self.initializers.append(tensor)
        return name

    def matmul_weight(self, shape: tuple[int, int], std: float) -> str:
        """TorchScript names pre-transposed linear weights ``onnx::MatMul_N``."""
        self.counter += 1
        return self.weight(f"onnx::MatMul_{self.counter}", shape, std)

    def finish(self) -> None:
        self.data.close()


def _i64(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def rms_norm(b: Builder, x: str, gamma: str, scope: str, eps: float) -> str:
    """TorchScript's decomposed RMSNorm: Cast, Pow, ReduceMean, Add eps, Sqrt, Div(1, .), Mul, Cast, Mul(gamma)."""
    two = b.const(f"{scope}/Constant_output_0", np.array(2.0, np.float32))
    eps_c = b.const(f"{scope}/Constant_1_output_0", np.array(eps, np.float32))
    one = b.const(f"{scope}/Constant_2_output_0", np.array(1.0, np.float32))
    cast = b.node("Cast", [x], f"{scope}/Cast", to=TensorProto.FLOAT)
    power = b.node("Pow", [cast, two], f"{scope}/Pow")
    mean = b.node("ReduceMean", [power], f"{scope}/ReduceMean", axes=[-1], keepdims=1)
    added = b.node("Add", [mean, eps_c], f"{scope}/Add")
    root = b.node("Sqrt", [added], f"{scope}/Sqrt")
    inverse = b.node("Div", [one, root], f"{scope}/Div")
    scaled = b.node("Mul", [cast, inverse], f"{scope}/Mul")
    back = b.node("Cast", [scaled], f"{scope}/Cast_1", to=TensorProto.FLOAT)
    return b.node("Mul", [gamma, back], f"{scope}/Mul_1")


def rotate_half(b: Builder, x: str, scope: str, half: int, tag: str) -> str:
    first = b.node(
        "Slice",
        [
            x,
            b.const(f"{scope}/s0{tag}", _i64(0)),
            b.const(f"{scope}/e0{tag}", _i64(half)),
            b.const(f"{scope}/a0{tag}", _i64(3)),
        ],
        f"{scope}/Slice{tag}",
    )
    second = b.node(
        "Slice",
        [
            x,
            b.const(f"{scope}/s1{tag}", _i64(half)),
            b.const(f"{scope}/e1{tag}", _i64(2 * half)),
            b.const(f"{scope}/a1{tag}", _i64(3)),
        ],
        f"{scope}/Slice_1{tag}",
    )
    negated = b.node("Neg", [second], f"{scope}/Neg{tag}")
    return b.node("Concat", [negated, first], f"{scope}/Concat{tag}", axis=-1)


def attention(b: Builder, x: str, layer: int, s: Shape, cos: str, sin: str, bias: str) -> str:
    scope = f"/model/layers.{layer}/self_attn"
    d, kv = s.head_dim, s.kv_heads * s.head_dim
    std_in, std_out = 0.02, 0.02 / np.sqrt(2 * s.layers)
    heads = b.const(f"{scope}/q_shape", _i64(0, 0, s.heads, d))
    kv_shape = b.const(f"{scope}/kv_shape", _i64(0, 0, s.kv_heads, d))

    def project(role: str, width: int, shape: str) -> str:
        w = b.matmul_weight((s.hidden, width), std_in)
        y = b.node("MatMul", [x, w], f"{scope}/{role}_proj/MatMul")
        y = b.node("Reshape", [y, shape], f"{scope}/{role}/Reshape")
        return b.node("Transpose", [y], f"{scope}/{role}/Transpose", perm=[0, 2, 1, 3])

    q, k, v = project("q", s.hidden, heads), project("k", kv, kv_shape), project("v", kv, kv_shape)
    q = b.node(
        "Add",
        [
            b.node("Mul", [q, cos], f"{scope}/Mul"),
            b.node("Mul", [rotate_half(b, q, scope, d // 2, "q"), sin], f"{scope}/Mul_1"),
        ],
        f"{scope}/Add",
    )
    k = b.node(
        "Add",
        [
            b.node("Mul", [k, cos], f"{scope}/Mul_2"),
            b.node("Mul", [rotate_half(b, k, scope, d // 2, "k"), sin], f"{scope}/Mul_3"),
        ],
        f"{scope}/Add_1",
    )
    groups = b.const(f"{scope}/expand_shape", _i64(1, 1, s.heads // s.kv_heads, 1, 1))
    axis2 = b.const(f"{scope}/axis2", _i64(2))
    merged = b.const(f"{scope}/repeat_shape", _i64(0, s.heads, -1, d))

    def repeat(t: str, tag: str) -> str:
        t = b.node("Unsqueeze", [t, axis2], f"{scope}/Unsqueeze{tag}")
        t = b.node("Expand", [t, groups], f"{scope}/Expand{tag}")
        return b.node("Reshape", [t, merged], f"{scope}/Reshape{tag}")

    k, v = repeat(k, "k"), repeat(v, "v")
    kt = b.node("Transpose", [k], f"{scope}/Transpose_kt", perm=[0, 1, 3, 2])
    scores = b.node("MatMul", [q, kt], f"{scope}/MatMul")
    scale = b.const(f"{scope}/scale", np.array(1.0 / np.sqrt(d), np.float32))
    scores = b.node("Add", [b.node("Mul", [scores, scale], f"{scope}/Mul_scale"), bias], f"{scope}/Add_mask")
    probs = b.node("Softmax", [scores], f"{scope}/Softmax", axis=-1)
    out = b.node("MatMul", [probs, v], f"{scope}/MatMul_1")
    out = b.node("Transpose", [out], f"{scope}/Transpose_out", perm=[0, 2, 1, 3])
    out = b.node("Reshape", [out, b.const(f"{scope}/out_shape", _i64(0, 0, s.hidden))], f"{scope}/Reshape_out")
    return b.node("MatMul", [out, b.matmul_weight((s.hidden, s.hidden), std_out)], f"{scope}/o_proj/MatMul")


def mlp(b: Builder, x: str, layer: int, s: Shape) -> str:
    scope = f"/model/layers.{layer}/mlp"
    gate = b.node("MatMul", [x, b.matmul_weight((s.hidden, s.intermediate), 0.02)], f"{scope}/gate_proj/MatMul")
    up = b.node("MatMul", [x, b.matmul_weight((s.hidden, s.intermediate), 0.02)], f"{scope}/up_proj/MatMul")
    silu = b.node("Mul", [gate, b.node("Sigmoid", [gate], f"{scope}/act_fn/Sigmoid")], f"{scope}/act_fn/Mul")
    hidden = b.node("Mul", [silu, up], f"{scope}/Mul")
    down = b.matmul_weight((s.intermediate, s.hidden), 0.02 / np.sqrt(2 * s.layers))
    return b.node("MatMul", [hidden, down], f"{scope}/down_proj/MatMul")


def masks_and_rope(b: Builder, s: Shape) -> tuple[str, str, str]:
    """Causal + padding bias [B, 1, S, S] and rotary cos/sin [S, head_dim] for the current sequence length."""
    seq = b.node(
        "Slice",
        [
            b.node("Shape", ["input_ids"], "/model/Shape"),
            b.const("/model/c1", _i64(1)),
            b.const("/model/c2", _i64(2)),
            b.const("/model/c0", _i64(0)),
        ],
        "/model/Slice_seq",
    )
    square = b.node("Concat", [seq, seq], "/model/Concat_square", axis=0)
    ones = b.node(
        "ConstantOfShape",
        [square],
        "/model/ConstantOfShape",
        value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
    )
    lower = b.node("Trilu", [ones], "/model/Trilu", upper=0)
    big = b.const("/model/neg_big", np.array(1e9, np.float32))
    unit = b.const("/model/one", np.array(1.0, np.float32))
    causal = b.node("Mul", [b.node("Sub", [lower, unit], "/model/Sub_causal"), big], "/model/Mul_causal")
    mask = b.node("Cast", ["attention_mask"], "/model/Cast_mask", to=TensorProto.FLOAT)
    pad = b.node("Mul", [b.node("Sub", [mask, unit], "/model/Sub_pad"), big], "/model/Mul_pad")
    pad = b.node("Unsqueeze", [pad, b.const("/model/axes12", _i64(1, 2))], "/model/Unsqueeze_pad")
    bias = b.node("Add", [causal, pad], "/model/Add_bias")
    inv = 1.0 / (500000.0 ** (np.arange(0, s.head_dim, 2, dtype=np.float64) / s.head_dim))
    angles = np.outer(np.arange(s.max_pos), inv)
    angles = np.concatenate([angles, angles], axis=1)
    tables = []
    for name, fn in (("cos", np.cos), ("sin", np.sin)):
        table = b.const(f"/model/rotary_emb/{name}_cached", fn(angles).astype(np.float32))
        tables.append(
            b.node(
                "Slice",
                [
                    table,
                    b.const(f"/model/rotary_emb/{name}_s", _i64(0)),
                    seq,
                    b.const(f"/model/rotary_emb/{name}_a", _i64(0)),
                ],
                f"/model/rotary_emb/{name}",
            )
        )
    return bias, tables[0], tables[1]


def build_llama(path: Path, s: Shape, seed: int = 0) -> int:
    """Write ``path`` and ``path.data``; returns the weight bytes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    b = Builder(path.parent / (path.name + ".data"), seed)
    table = b.weight("model.embed_tokens.weight", (s.vocab, s.hidden), 0.02)
    x = b.node("Gather", [table, "input_ids"], "/model/embed_tokens/Gather")
    bias, cos, sin = masks_and_rope(b, s)
    for layer in range(s.layers):
        scope = f"/model/layers.{layer}"
        gamma = b.weight(f"model.layers.{layer}.input_layernorm.weight", (s.hidden,), 0.1, 1.0)
        h = rms_norm(b, x, gamma, f"{scope}/input_layernorm", s.eps)
        x = b.node("Add", [x, attention(b, h, layer, s, cos, sin, bias)], f"{scope}/Add")
        gamma = b.weight(f"model.layers.{layer}.post_attention_layernorm.weight", (s.hidden,), 0.1, 1.0)
        h = rms_norm(b, x, gamma, f"{scope}/post_attention_layernorm", s.eps)
        x = b.node("Add", [x, mlp(b, h, layer, s)], f"{scope}/Add_1")
    h = rms_norm(b, x, b.weight("model.norm.weight", (s.hidden,), 0.1, 1.0), "/model/norm", s.eps)
    # Untied, two tables: what a TorchScript export of tied Llama-3.2-1B also holds (Gather table + [H, V] copy).
    lm_head = b.matmul_weight((s.hidden, s.vocab), 1.0 / np.sqrt(s.hidden))
    b.nodes.append(helper.make_node("MatMul", [h, lm_head], ["logits"], name="/lm_head/MatMul"))
    b.finish()
    graph = helper.make_graph(
        b.nodes,
        "main_graph",
        [
            helper.make_tensor_value_info(n, TensorProto.INT64, ["batch", "sequence"])
            for n in ("input_ids", "attention_mask")
        ],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", s.vocab])],
        initializer=b.initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17)],
        ir_version=8,
        producer_name="spinquant-onnx benchmark (TorchScript-shaped Llama)",
    )
    onnx.save_model(model, str(path))
    return b.offset


# ---------------------------------------------------------------------------------------- child modes


def child_dense(src: Path, dst: Path) -> None:
    """Naive rotation: whole model in memory, the plan's operations as dense float64 matrix products."""
    from spinquant_onnx.core.options import Options
    from spinquant_onnx.core.pipeline import plan_model
    from spinquant_onnx.io.model_file import set_tensor_data
    from spinquant_onnx.match.analysis import analyze

    external = _external(src)
    model = onnx.load(str(src), load_external_data=True)
    analysis = analyze(model, src.parent)
    plan, _, _ = plan_model(analysis, Options())
    matrices: dict[int, np.ndarray] = {}
    # clones read their source's original values, so they go before tensors rewritten in place
    for name, target in sorted(plan.targets.items(), key=lambda item: item[1].source == item[0]):
        array = np.array(analysis.store.array(target.source), dtype=np.float64)
        for op in target.ops:
            if op.kind in ("rotate", "rotate_t"):
                dense = matrices.setdefault(id(op.rotation), op.rotation.matrix())
                matrix = dense if op.kind == "rotate" else dense.T
                array = np.moveaxis(np.moveaxis(array, op.axis, -1) @ matrix, -1, op.axis)
            else:
                array = op.apply(array)
        set_tensor_data(analysis.store.tensors[name], array.astype(analysis.store.dtype(target.source)))
        del array
    _save_onnx(model, dst, external)


def child_io_stream(src: Path, dst: Path) -> None:
    from spinquant_onnx.io.model_file import load_model, save_model, uses_external_data
    from spinquant_onnx.io.protowire import reads_own_file
    from spinquant_onnx.io.tensor_store import TensorStore

    model = load_model(src, lazy=True)
    store = TensorStore(model, src.parent)
    external = uses_external_data(model) and not reads_own_file(model, src)
    save_model(model, dst, store.array, external=True if external else None)


def child_io_copy(src: Path, dst: Path) -> None:
    for file in model_files(src):
        target = dst.parent / (dst.name + file.name[len(src.name):])
        with open(file, "rb") as inp, open(target, "wb") as out:
            while block := inp.read(1 << 24):
                out.write(block)
            out.flush()
            os.fsync(out.fileno())


def child_aimet(src: Path, dst: Path) -> None:
    from aimet_onnx.spinquant import apply_spinquant

    external = _external(src)
    model = onnx.load(str(src), load_external_data=True)
    apply_spinquant(model)
    _save_onnx(model, dst, external)


def child_io_onnx(src: Path, dst: Path) -> None:
    external = _external(src)
    _save_onnx(onnx.load(str(src), load_external_data=True), dst, external)


def _external(src: Path) -> bool:
    """Whether the input keeps its weights in external data (then every output does too)."""
    from spinquant_onnx.io.protowire import reads_own_file

    model = _graph(src)
    return any(t.data_location == TensorProto.EXTERNAL for t in model.graph.initializer) and not reads_own_file(
        model, src
    )


def _save_onnx(model: onnx.ModelProto, dst: Path, external: bool) -> None:
    onnx.save_model(
        model,
        str(dst),
        save_as_external_data=external,
        location=dst.name + ".data",
        all_tensors_to_one_file=True,
        size_threshold=0,
    )


CHILDREN = {
    "dense": child_dense,
    "io-copy": child_io_copy,
    "io-stream": child_io_stream,
    "io-onnx": child_io_onnx,
    "aimet": child_aimet,
}


# ------------------------------------------------------------------------------------------- measuring


@dataclass
class Measured:
    run: str
    wall_s: float
    cpu_s: float
    peak_rss_bytes: int
    returncode: int
    output_bytes: int
    load_avg_1min: float


def median_of(rounds: list[Measured]) -> Measured:
    """One run's rounds as one: median wall and CPU time, the largest peak RSS, the worst exit code."""
    first = rounds[0]
    return Measured(
        first.run,
        statistics.median(m.wall_s for m in rounds),
        statistics.median(m.cpu_s for m in rounds),
        max(m.peak_rss_bytes for m in rounds),
        next((m.returncode for m in rounds if m.returncode), 0),
        first.output_bytes,
        statistics.median(m.load_avg_1min for m in rounds),
    )


def model_files(path: Path) -> list[Path]:
    return sorted(p for p in path.parent.glob(path.name + "*") if p.is_file())


def _graph(path: Path) -> onnx.ModelProto:
    """The graph without its weights: parsing an embedded model whole here would grow this process, and
    every child forked from it starts with its resident size (ru_maxrss would report it)."""
    from spinquant_onnx.io.model_file import load_model

    return load_model(path, lazy=True)


def model_bytes(path: Path) -> int:
    """Initializer bytes: what must be read, rotated and written."""
    from spinquant_onnx.io.model_file import np_dtype

    model = _graph(path)
    return sum(int(np.prod(t.dims, dtype=np.int64)) * np_dtype(t.data_type).itemsize for t in model.graph.initializer)


def warm(path: Path) -> None:
    for file in model_files(path):
        with open(file, "rb") as handle:
            while handle.read(1 << 26):
                pass


def command(run: str, src: Path, dst: Path, profile: Path | None) -> list[str]:
    if run == "rotate-f32":
        return [sys.executable, "-m", "spinquant_onnx.cli", "rotate", str(src), str(dst), "--precision", "float32"]
    if run == "rotate":
        if profile is not None:
            return [
                sys.executable,
                "-m",
                "cProfile",
                "-o",
                str(profile),
                "-m",
                "spinquant_onnx.cli",
                "rotate",
                str(src),
                str(dst),
            ]
        return [sys.executable, "-m", "spinquant_onnx.cli", "rotate", str(src), str(dst)]
    return [sys.executable, str(Path(__file__).resolve()), "--child", run, str(src), str(dst)]


def measure(run: str, src: Path, out_dir: Path, profile: Path | None = None) -> Measured:
    """One run in a fresh process; the output is deleted afterwards."""
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    dst = out_dir / f"{run}.onnx"
    warm(src)
    os.sync()
    started = time.perf_counter()
    process = subprocess.Popen(command(run, src, dst, profile), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    code = os.waitstatus_to_exitcode(status)
    err = process.stderr.read().decode(errors="replace").strip() if process.stderr else ""
    if code != 0:
        print(f"    {run} failed (exit {code}): {err[-2000:]}", file=sys.stderr)
    written = sum(p.stat().st_size for p in model_files(dst)) if dst.exists() else 0
    shutil.rmtree(out_dir, ignore_errors=True)
    os.sync()
    cpu = usage.ru_utime + usage.ru_stime
    return Measured(run, round(wall, 2), round(cpu, 2), usage.ru_maxrss * 1024, code, written, os.getloadavg()[0])


def report(label: str, size: int, file_bytes: int, external: bool, results: dict[str, Measured]) -> dict:
    """Print a table and #17's targets; return the same as a dict."""
    rot = results.get("rotate")
    print(f"\n{label}: {size / 1e9:.2f} GB of weights, files {file_bytes / 1e9:.2f} GB, {os.cpu_count()} CPUs")
    print(
        f"  {'run':<10} {'wall s':>8} {'cpu s':>8} {'peak RSS GB':>12} {'RSS / model':>12} "
        f"{'rotate wall / this':>19} {'load':>5}"
    )
    for run, m in results.items():
        ratio = f"{rot.wall_s / m.wall_s:.2f}" if rot and m.wall_s else "-"
        failed = "  FAILED" if m.returncode else ""
        print(
            f"  {run:<10} {m.wall_s:>8.1f} {m.cpu_s:>8.1f} {m.peak_rss_bytes / 1e9:>12.2f} "
            f"{m.peak_rss_bytes / size:>12.2f} "
            f"{ratio:>19} {m.load_avg_1min:>5.1f}{failed}"
        )
    data: dict = {
        "model": label,
        "weight_bytes": size,
        "file_bytes": file_bytes,
        "runs": {k: vars(v) for k, v in results.items()},
    }
    if rot is None:
        return data
    for other in RUNS[1:]:
        if other in results and results[other].returncode == 0:
            data[f"rotate_wall_over_{other}"] = round(rot.wall_s / results[other].wall_s, 3)
            data[f"rotate_cpu_over_{other}"] = round(rot.cpu_s / max(results[other].cpu_s, 1e-9), 3)
    data["rotate_peak_rss_over_model_bytes"] = round(rot.peak_rss_bytes / size, 3)
    data["rotate_peak_rss_over_file_bytes"] = round(rot.peak_rss_bytes / max(file_bytes, 1), 3)
    ok = {k: m.returncode == 0 for k, m in results.items()}
    if external:
        targets = {
            "rotate <= 1.5x io-stream": ok.get("io-stream", False) and rot.wall_s <= 1.5 * results["io-stream"].wall_s,
            "rotate <= io-onnx": ok.get("io-onnx", False) and rot.wall_s <= results["io-onnx"].wall_s,
            "rotate peak RSS <= 1.0x model bytes": rot.peak_rss_bytes <= size,
        }
    else:
        targets = {
            "rotate <= 1.5x io-onnx": ok.get("io-onnx", False) and rot.wall_s <= 1.5 * results["io-onnx"].wall_s,
            "rotate peak RSS <= 1.5x file bytes": rot.peak_rss_bytes <= 1.5 * file_bytes,
        }
    for name, ok in targets.items():
        print(f"  target {name}: {'met' if ok else 'MISSED'}")
    data["targets"] = targets
    return data


def measure_rounds(label: str, path: Path, runs: list[str], repeat: int, workdir: Path, profile: bool
                   ) -> dict[str, Measured]:
    """Every run ``repeat`` times, round-robin, each round starting one run later; medians per run."""
    rounds: dict[str, list[Measured]] = {run: [] for run in runs}
    for number in range(repeat):
        for run in runs[number % len(runs) :] + runs[: number % len(runs)]:
            prof = workdir / "rotate.prof" if profile and run == "rotate" else None
            print(f"  {label}: {run} ...", flush=True)
            one = measure(run, path, workdir / "out", prof)
            rounds[run].append(one)
            print(f"    {one.wall_s:.1f}s, peak RSS {one.peak_rss_bytes / 1e9:.2f} GB", flush=True)
            if prof is not None:
                print_profile(prof)
    return {run: median_of(rounds[run]) for run in runs}


def print_profile(path: Path, limit: int = 25) -> None:
    import pstats

    stats = pstats.Stats(str(path))
    stats.sort_stats("cumulative").print_stats(limit)
    stats.sort_stats("tottime").print_stats(limit)


# ------------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, metavar=("MODE", "IN", "OUT"), help=argparse.SUPPRESS)
    ap.add_argument("--smollm2", type=Path, help="SmolLM2 export to benchmark too (scripts/export_smollm2.py)")
    ap.add_argument("--layers", type=int, default=16, help="layers of the synthetic Llama (default 16)")
    ap.add_argument("--vocab", type=int, default=128256, help="vocab of the synthetic Llama (default 128256)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/spinquant_bench"))
    ap.add_argument("--runs", default=",".join(RUNS), help=f"comma list from {','.join(RUNS)}")
    ap.add_argument("--no-synthetic", action="store_true", help="only the --smollm2 model")
    ap.add_argument("--build-only", action="store_true", help="build the synthetic model and stop")
    ap.add_argument("--profile", action="store_true", help="cProfile the rotate run and print the top entries")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of every run, round-robin; medians (default 1)")
    ap.add_argument("--json", type=Path, help="write the measurements here")
    ap.add_argument("--keep", action="store_true", help="keep the synthetic model (default: delete at the end)")
    args = ap.parse_args(argv)
    if args.child:
        mode, src, dst = args.child
        CHILDREN[mode](Path(src), Path(dst))
        return 0
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    unknown = set(runs) - set(RUNS)
    if unknown:
        ap.error(f"unknown runs {sorted(unknown)}")
    if args.repeat < 1:
        ap.error("--repeat needs at least 1")
    args.workdir.mkdir(parents=True, exist_ok=True)
    models: list[tuple[str, Path]] = []
    if args.smollm2:
        models.append(("SmolLM2-135M (TorchScript export)", args.smollm2))
    synthetic = args.workdir / "model" / f"llama1b_{args.layers}l.onnx"
    if not args.no_synthetic:
        if not synthetic.exists():
            started = time.perf_counter()
            size = build_llama(synthetic, Shape(layers=args.layers, vocab=args.vocab))
            print(f"built {synthetic}: {size / 1e9:.2f} GB in {time.perf_counter() - started:.0f}s")
        models.append((f"Llama-3.2-1B-shaped, {args.layers} layers (synthetic, external data)", synthetic))
        if args.build_only:
            return 0
    print(f"disk free in {args.workdir}: {shutil.disk_usage(args.workdir).free / 1e9:.1f} GB; {os.cpu_count()} CPUs")
    results = []
    try:
        for label, path in models:
            size = model_bytes(path)
            measured = measure_rounds(label, path, runs, args.repeat, args.workdir, args.profile)
            files = sum(p.stat().st_size for p in model_files(path))
            medians = f", median of {args.repeat} rounds" if args.repeat > 1 else ""
            results.append(report(label + medians, size, files, _external(path), measured))
    finally:
        if not args.keep and not args.no_synthetic:
            shutil.rmtree(synthetic.parent, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "models": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
