"""Time `learn`'s pieces on a model: the rotated weights (forward, forward + backward), one training step,
one held-out evaluation. Wall and CPU seconds (CPU seconds are the steadier number on a shared machine).

Usage: python scripts/bench_learn.py MODEL.onnx --tokens T.npy [--batch 1] [--window-len 256] [--threads 2]
       [--repeats 2] [--json out.json]

The first step of a process is slower (first-touch allocation of the activations); it is reported apart.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable

import numpy as np
import torch

from spinquant_onnx.integrations.evaluate import load_tokens
from spinquant_onnx.integrations.learn.train import LearnConfig, Learner


def _timed(fn: Callable[[], object], repeats: int) -> dict[str, float]:
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"wall_s": round(float(np.median(walls)), 2), "cpu_s": round(float(np.median(cpus)), 2)}


def _weights_backward(learner: Learner) -> None:
    weights = learner.model.weights(learner.model.rotations.matrices())
    sum((w * w).sum() for w in weights.values()).backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--tokens", required=True)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--window-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    config = LearnConfig(steps=0, batch=args.batch, window_len=args.window_len)
    learner = Learner(args.model, load_tokens(args.tokens), "/tmp/bench_learn.npz", config, threads=args.threads)
    model = learner.model
    out: dict[str, object] = {"batch": args.batch, "window_len": args.window_len, "threads": args.threads}
    with torch.no_grad():
        out["weights_forward"] = _timed(lambda: model.weights(model.rotations.matrices()), args.repeats)
    out["weights_forward_backward"] = _timed(lambda: _weights_backward(learner), args.repeats)
    out["first_step"] = _timed(learner.train_step, 1)
    out["step"] = _timed(learner.train_step, args.repeats)
    out["heldout"] = _timed(learner.heldout_loss, 1)
    print(json.dumps(out, indent=2))
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(out, handle, indent=2)


if __name__ == "__main__":
    main()
