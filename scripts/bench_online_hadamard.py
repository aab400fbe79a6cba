"""Time the three ONNX forms of an online Hadamard (dense MatMul, Kronecker MatMuls, WHT butterflies) in ORT.

Usage: python scripts/bench_online_hadamard.py [--providers cpu|cuda] [--repeats 20] [--json out.json]

R3 shapes are [1, heads, seq, head_dim] (heads = 32), R4 shapes [1, seq, intermediate]. Each form is checked
against the float64 reference before it is timed. The fastest form per order is what
``spinquant_onnx.rewrite.fast_hadamard_nodes.choose_method`` should return.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper

from spinquant_onnx.rewrite.fast_hadamard_nodes import MATMUL_MAX_ORDER, METHODS, choose_method, hadamard_nodes
from spinquant_onnx.rotation.kinds import make_rotation

HEAD_DIMS = (64, 128, 256)
INTERMEDIATES = (1536, 2048, 4864, 8192, 11008, 14336)
SEQS = (1, 32, 256, 1024)
HEADS = 32


def _session(n: int, rank: int, method: str, providers: list[str]) -> ort.InferenceSession:
    built = hadamard_nodes("x", n, TensorProto.FLOAT, prefix="h", opset=17, method=method, out="y")
    dims = [None] * (rank - 1) + [n]
    graph = helper.make_graph(
        built.nodes,
        "online_hadamard",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, dims)],
        built.initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=providers)


def _time(session: ort.InferenceSession, x: np.ndarray, repeats: int) -> float:
    session.run(None, {"x": x})
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(None, {"x": x})
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def _shape(n: int, seq: int) -> tuple[int, ...]:
    return (1, HEADS, seq, n) if n in HEAD_DIMS else (1, seq, n)


def run(providers: list[str], repeats: int) -> list[dict]:
    rows = []
    for n in HEAD_DIMS + INTERMEDIATES:
        reference_rotation = make_rotation("hadamard", n)
        for seq in SEQS:
            shape = _shape(n, seq)
            x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
            expected = reference_rotation.apply(x, -1)
            row: dict = {"n": n, "shape": list(shape)}
            for method in METHODS:
                if method == "matmul" and n > max(MATMUL_MAX_ORDER * 4, 4096):
                    row[method] = None
                    continue
                session = _session(n, len(shape), method, providers)
                got = session.run(None, {"x": x})[0]
                error = float(np.abs(got - expected).max())
                if error > 1e-4:
                    raise AssertionError(f"{method} n={n}: max error {error:.3g}")
                row[method] = _time(session, x, repeats) * 1e3
            timed = {m: row[m] for m in METHODS if row[m] is not None}
            row["fastest"] = min(timed, key=timed.get)
            row["chosen"] = choose_method(n)
            rows.append(row)
            print(_format(row), flush=True)
    return rows


def _format(row: dict) -> str:
    cells = [f"{row[m]:9.3f}" if row[m] is not None else "        -" for m in METHODS]
    return (
        f"| {row['n']:6d} | {str(tuple(row['shape'])):22s} | "
        + " | ".join(cells)
        + (f" | {row['fastest']:9s} | {row['chosen']:9s} |")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--providers", default="cpu", help="cpu or cuda (cuda falls back to cpu if absent)")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", help="write the table here as JSON")
    args = parser.parse_args()
    providers = (
        ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.providers == "cuda" else ["CPUExecutionProvider"]
    )
    print(f"onnxruntime {ort.__version__}, providers {providers}, median of {args.repeats} runs, milliseconds")
    print("|      n | shape                  |    matmul |      kron | butterfly | fastest   | chosen    |")
    print("|-------:|------------------------|----------:|----------:|----------:|-----------|-----------|")
    rows = run(providers, args.repeats)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump({"providers": providers, "onnxruntime": ort.__version__, "rows": rows}, handle, indent=1)


if __name__ == "__main__":
    main()
