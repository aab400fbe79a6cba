#!/usr/bin/env python
"""Time every way to apply a Sylvester Hadamard of order P as Kronecker factors, on one core, in one run.

``rotation/hadamard.py`` applies H_P as one GEMM per factor (``_sylvester_factors`` picks them); which
factorization is fastest depends on BLAS's efficiency for each GEMM shape, not on flops alone. This
script times each composition of P into power-of-two factors (4..64) for the two layouts a chunk has:
``row`` (the rotated axis contiguous: embedding rows, o/down outputs) and ``col`` (the rotated axis
leading: q/k/v/gate/up inputs), on float64 chunks of plan.CHUNK_ELEMENTS (256K) elements, BLAS single-threaded
as rotate runs it. Reports ns per element, best first, and the factors rotate uses.

Usage::

    python scripts/bench_hadamard_factors.py [--orders 512,1024,2048,4096,8192] [--top 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from spinquant_onnx.rewrite.plan import CHUNK_ELEMENTS, _one_blas_thread  # noqa: E402
from spinquant_onnx.rotation.hadamard import _kron_apply, _sylvester_factors, sylvester  # noqa: E402


def compositions(k: int, low: int = 2, high: int = 6, most: int = 4) -> list[tuple[int, ...]]:
    """Every ordered split of 2**k into factors 2**low .. 2**high (at most ``most`` of them)."""
    found = [(1 << k,)] if k <= high else []
    for parts in range(2, most + 1):
        for combo in itertools.product(range(low, high + 1), repeat=parts):
            if sum(combo) == k:
                found.append(tuple(1 << c for c in combo))
    return found


def best_time(run, reps: int) -> float:
    best = math.inf
    for _ in range(reps):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def measure(order: int, layout: str, sizes: tuple[int, ...], reps: int) -> float:
    rng = np.random.default_rng(0)
    if layout == "row":
        x = rng.standard_normal((CHUNK_ELEMENTS // order, order))
        post = 1
    else:
        post = max(1, CHUNK_ELEMENTS // order)
        x = rng.standard_normal((order, post))
    mats = [sylvester(f) / math.sqrt(f) for f in sizes]  # orthonormal: repeated runs stay finite
    return best_time(lambda: _kron_apply(x, sizes, mats, post), reps) / x.size * 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", default="512,1024,2048,4096,8192")
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {}
    with _one_blas_thread():
        for order in (int(v) for v in args.orders.split(",")):
            k = order.bit_length() - 1
            for layout in ("row", "col"):
                timed = sorted((measure(order, layout, s, args.reps), s) for s in compositions(k))
                used = _sylvester_factors(order)
                found = [t for t, s in timed if s == used]
                mine = found[0] if found else measure(order, layout, used, args.reps)
                results[f"{order}/{layout}"] = {"used": used, "used_ns": mine, "best": timed[: args.top]}
                best = ", ".join(f"{'x'.join(map(str, s))} {t:.2f}" for t, s in timed[: args.top])
                shown = "x".join(map(str, used))
                print(f"{order:5} {layout}: used {shown} {mine:.2f} ns/elem; best {best}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
