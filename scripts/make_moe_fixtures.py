#!/usr/bin/env python
"""MoE family fixtures beyond make_family_fixtures.py's: gpt-oss (expert biases, attention sinks) and a
Qwen3-MoE TorchScript export with a KV cache.

Reuses scripts/make_family_fixtures.py (same config base, checks against torch on another input, manifest
entry or dropped reason); run with the transformers 5.x venv:
``/work/venvs/fx5/bin/python scripts/make_moe_fixtures.py [--out DIR]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
spec = importlib.util.spec_from_file_location("make_family_fixtures", HERE / "make_family_fixtures.py")
fam = importlib.util.module_from_spec(spec)
sys.modules["make_family_fixtures"] = fam
spec.loader.exec_module(fam)

fam.FAMILY_CFG["gpt_oss"] = {
    "num_local_experts": 4,
    "num_experts_per_tok": 2,
    "layer_types": ["sliding_attention", "full_attention"],
    "sliding_window": 512,
    "rope_scaling": None,
}
fam.FEATURES["gpt_oss"] = "MoE: 4 experts top-2 with expert biases, attention sinks"
fam.JOBS[:] = [
    fam.Job(f"gpt_oss_bmm_{tag}", "gpt_oss", exporter, 15, experts="batched_mm")
    for exporter, tag in (("torchscript", "ts17"), ("dynamo", "dy18"))
] + [fam.Job("qwen3_moe_bmm_kv_ts17", "qwen3_moe", "torchscript", 15, kind="kv", experts="batched_mm")]


def main(argv: list[str]) -> int:
    """This script's own --help (what it adds), then make_family_fixtures' options, which parse the rest."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 add_help=False)
    ap.add_argument("-h", "--help", action="store_true", help="show this help and make_family_fixtures' options")
    args, rest = ap.parse_known_args(argv)
    if args.help:
        print(__doc__)
        rest = [*rest, "--help"]
    return fam.main(rest)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
