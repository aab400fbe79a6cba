#!/usr/bin/env python
"""(Re)generate the tiny ONNX decoder fixtures used by the test-suite.

Every model is a randomly initialised ``transformers`` ``*ForCausalLM`` built
from a config (no hub access), exported twice:

* ``<name>_ts.onnx``     - TorchScript exporter (``dynamo=False``), opset 17
* ``<name>_dynamo.onnx`` - dynamo exporter (``dynamo=True``), opset 18

Both have inputs ``input_ids`` / ``attention_mask`` (int64, ``[batch, sequence]``)
and a single output ``logits`` (``[batch, sequence, vocab]``), with the weights
embedded in the ``.onnx`` file.  Each export is checked against the torch
logits with onnxruntime (CPU).  ``manifest.json`` describes every file.

Usage::

    python scripts/make_fixtures.py [--out fixtures] [--only NAME ...]

Requires torch, transformers, onnx, onnxscript and onnxruntime; the tests that
consume the fixtures only need onnx and onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers
from onnx import numpy_helper

VOCAB = 128
MAX_POS = 64
# Random-init std 0.02 gives near-uniform logits.  Use std 0.2 at hidden 64 and
# scale it as 1/sqrt(hidden) so wider fixtures get a similar logit spread.
INIT_RANGE = 0.2
NORM_PERTURB = 0.5  # RMSNorm gamma = 1 + NORM_PERTURB * randn
OUTLIER_SCALE = 30.0
ATOL = 1e-4
SIZE_LIMIT = 1_100_000  # bytes per .onnx file

TS_OPSET = 17
DYNAMO_OPSET = 18


@dataclass
class Spec:
    name: str
    family: str
    hidden: int = 64
    layers: int = 2
    vocab: int = VOCAB
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate: int = 96
    tied: bool = False
    outlier_channel: int | None = None
    seed: int = 0
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


SPECS: list[Spec] = [
    Spec("llama", "llama", seed=1, notes="LlamaForCausalLM, GQA 4q/2kv heads, untied"),
    Spec("llama_tied", "llama", tied=True, seed=2, notes="LlamaForCausalLM, GQA, tie_word_embeddings=True"),
    Spec("mistral", "mistral", intermediate=128, seed=3, notes="MistralForCausalLM, GQA, intermediate 128, untied"),
    Spec("qwen2", "qwen2", seed=4, notes="Qwen2ForCausalLM, q/k/v projections with bias, untied"),
    Spec("qwen3", "qwen3", tied=True, seed=5, notes="Qwen3ForCausalLM, per-head q_norm/k_norm RMSNorm, tied"),
    Spec(
        "phi3",
        "phi3",
        seed=6,
        notes="Phi3ForCausalLM, fused qkv_proj and gate_up_proj, untied",
    ),
    Spec(
        "smollm",
        "llama",
        hidden=576,
        layers=1,
        num_heads=9,
        num_kv_heads=3,
        head_dim=8,
        intermediate=32,
        vocab=64,
        tied=True,
        seed=7,
        notes=(
            "SmolLM-shaped llama: hidden 576 (not a power of two), 9q/3kv heads of dim 8, "
            "1 layer, vocab 64 and intermediate 32 to stay under ~1 MB, tied"
        ),
    ),
    Spec(
        "llama_h320",
        "llama",
        hidden=320,
        num_heads=5,
        num_kv_heads=1,
        head_dim=8,
        intermediate=32,
        vocab=64,
        seed=8,
        notes=(
            "llama hidden 320 (not a power of two), 5q/1kv heads (MQA) of dim 8, "
            "vocab 64 and intermediate 32 to stay under ~1 MB, untied"
        ),
    ),
    Spec(
        "llama_outlier",
        "llama",
        outlier_channel=13,
        seed=9,
        notes=(
            "llama whose residual channel `outlier_channel` carries a massive activation: "
            f"embedding column and layer-0 down_proj output row scaled by {OUTLIER_SCALE:g}"
        ),
    ),
]


# --------------------------------------------------------------------------- models


def _init_range(spec: Spec) -> float:
    return INIT_RANGE * (64 / spec.hidden) ** 0.5


def _config(spec: Spec) -> transformers.PretrainedConfig:
    common: dict[str, Any] = dict(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=MAX_POS,
        initializer_range=_init_range(spec),
        tie_word_embeddings=spec.tied,
        use_cache=False,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        **spec.extra,
    )
    fam = spec.family
    if fam == "llama":
        return transformers.LlamaConfig(head_dim=spec.head_dim, **common)
    if fam == "mistral":
        return transformers.MistralConfig(head_dim=spec.head_dim, sliding_window=None, **common)
    if fam == "qwen2":
        # Qwen2 derives head_dim = hidden // heads; qkv bias is hard-wired.
        assert spec.hidden // spec.num_heads == spec.head_dim
        return transformers.Qwen2Config(use_sliding_window=False, **common)
    if fam == "qwen3":
        return transformers.Qwen3Config(head_dim=spec.head_dim, use_sliding_window=False, **common)
    if fam == "phi3":
        assert spec.hidden // spec.num_heads == spec.head_dim
        return transformers.Phi3Config(original_max_position_embeddings=MAX_POS, sliding_window=None, **common)
    raise ValueError(f"unknown family {fam!r}")


_MODEL_CLS = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "phi3": "Phi3ForCausalLM",
}


def build_model(spec: Spec) -> torch.nn.Module:
    torch.manual_seed(spec.seed)
    config = _config(spec)
    config._attn_implementation = "eager"
    cls = getattr(transformers, _MODEL_CLS[spec.family])
    model = cls(config).to(torch.float32).eval()

    with torch.no_grad():
        # Random-init leaves every RMSNorm gamma at exactly 1; perturb them all
        # (input/post-attention, final norm, qwen3 q_norm/k_norm) so that
        # nothing can be folded away by accident.
        n_norms = 0
        for mod in model.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.copy_(1.0 + NORM_PERTURB * torch.randn_like(mod.weight))
                n_norms += 1
        assert n_norms >= 2 * spec.layers + 1, n_norms
        # Biases (qwen2 q/k/v) are zero at init; give them some content.
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(_init_range(spec) * torch.randn_like(p))

        if spec.outlier_channel is not None:
            c = spec.outlier_channel
            model.model.embed_tokens.weight[:, c] *= OUTLIER_SCALE
            model.model.layers[0].mlp.down_proj.weight[c, :] *= OUTLIER_SCALE

    if spec.tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert model.lm_head.weight is not model.model.embed_tokens.weight
    return model


def logits_only(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model(input_ids, attention_mask)`` return only the logits tensor.

    transformers 5 models take ``logits_to_keep`` / cache arguments that the
    TorchScript exporter would turn into stray graph inputs.  Instead of wrapping
    the model in another ``nn.Module`` (which would prefix every parameter and
    node name with ``model.``), swap in a subclass with a narrower ``forward``,
    so the ONNX names match a direct export (``model.layers.0...``,
    ``lm_head.weight``, ``/model/layers.0/...``).
    """
    base = type(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out = base.forward(self, input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits

    model.__class__ = type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__})
    return model


def check_outlier(model: torch.nn.Module, spec: Spec) -> str:
    """Assert the residual stream's per-channel max |x| is dominated by the outlier channel."""
    c = spec.outlier_channel
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, spec.vocab, (4, 16), generator=g)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    # hidden_states: embeddings, then the residual after each layer (the last
    # one has the final norm applied by transformers; skip it).
    ratios = []
    for i, h in enumerate(out.hidden_states[:-1]):
        amax = h.abs().amax(dim=(0, 1))
        top = int(amax.argmax())
        others = torch.cat([amax[:c], amax[c + 1 :]]).max()
        ratio = float(amax[c] / others)
        if top != c or ratio < 3.0:
            raise AssertionError(
                f"{spec.name}: residual {i} max|x| argmax is channel {top} (want {c}), ratio {ratio:.2f}"
            )
        ratios.append(ratio)
    return f"min outlier/next-channel max|x| ratio over residual states: {min(ratios):.1f}"


# --------------------------------------------------------------------------- export

DUMMY_BATCH, DUMMY_SEQ = 2, 7


def _dummy_inputs(vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (DUMMY_BATCH, DUMMY_SEQ), generator=g, dtype=torch.int64)
    return ids, torch.ones_like(ids)


def export_ts(model: torch.nn.Module, path: Path, spec: Spec) -> str:
    torchscript_export(model, _dummy_inputs(spec.vocab), path)
    return ""


def torchscript_export(model: torch.nn.Module, args: tuple, path: Path) -> None:
    """TorchScript export (opset 17) with dynamic batch and sequence, inputs ids + mask, output logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=False,
            opset_version=TS_OPSET,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {0: "batch", 1: "sequence"},
                "attention_mask": {0: "batch", 1: "sequence"},
                "logits": {0: "batch", 1: "sequence"},
            },
            do_constant_folding=True,
        )


def export_dynamo(model: torch.nn.Module, path: Path, spec: Spec) -> str:
    ids, mask = _dummy_inputs(spec.vocab)
    batch = torch.export.Dim("batch", min=1, max=16)
    seq = torch.export.Dim("sequence", min=1, max=MAX_POS)
    dyn = {"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}}
    note = ""
    try:
        prog = dynamo_export(model, (ids, mask), dyn)
    except Exception as exc:  # noqa: BLE001 - fall back, but record why
        print(f"    dynamic-shape dynamo export failed ({type(exc).__name__}: {exc}); static fallback")
        prog = dynamo_export(model, (ids, mask), None)
        note = f"dynamo export with dynamic shapes failed; STATIC shapes [{DUMMY_BATCH}, {DUMMY_SEQ}]"
    prog.save(str(path), external_data=False)
    return note


def dynamo_export(model: torch.nn.Module, args: tuple, dyn: dict | None):
    """Dynamo export (opset 18), weights inline, inputs ids + mask, output logits."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return torch.onnx.export(
            model,
            args,
            dynamo=True,
            opset_version=DYNAMO_OPSET,
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_shapes=dyn,
            external_data=False,
            optimize=True,
            verbose=False,
        )


STRIP_NODE_METADATA = {"pkg.torch.onnx.stack_trace"}


def _all_nodes(graph: onnx.GraphProto):
    for node in graph.node:
        yield node
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                yield from _all_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    yield from _all_nodes(g)


def make_self_contained(path: Path) -> None:
    """Re-save with every initializer inline and remove any side-car data files."""
    model = onnx.load(str(path), load_external_data=True)
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise AssertionError(f"{path}: unresolved external initializers {external[:3]}")
    for t in model.graph.initializer:
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    # The dynamo exporter stores a Python stack trace (with local paths) on
    # every node; drop it to keep the files small and machine-independent.
    # The other metadata (namespace, class hierarchy, name scopes) is kept.
    for node in _all_nodes(model.graph):
        keep = [p for p in node.metadata_props if p.key not in STRIP_NODE_METADATA]
        if len(keep) != len(node.metadata_props):
            del node.metadata_props[:]
            node.metadata_props.extend(keep)
    onnx.save_model(model, str(path), save_as_external_data=False)
    for side in path.parent.glob(path.name + ".data"):
        side.unlink()
    for side in path.parent.glob(path.stem + ".onnx_data"):
        side.unlink()


def describe_tied(path: Path) -> str:
    """Say how a tied embedding / lm_head pair ended up in the exported graph."""
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}
    gathers = [
        n
        for n in proto.graph.node
        if n.op_type == "Gather" and n.input[0] in inits and len(inits[n.input[0]].dims) == 2
    ]
    assert len(gathers) == 1, [n.name for n in gathers]
    emb = gathers[0].input[0]
    (head,) = [n for n in proto.graph.node if "logits" in n.output]
    w = head.input[1]
    if w in inits:
        same = np.array_equal(numpy_helper.to_array(inits[w]), numpy_helper.to_array(inits[emb]).T)
        assert same, f"{path.name}: lm_head weight is not the transposed embedding"
        return (
            f"tied weights exported as TWO initializers: '{emb}' (Gather) and its "
            f"pre-transposed copy '{w}' (lm_head {head.op_type})"
        )
    src = producer[w]
    assert src.op_type == "Transpose" and src.input[0] == emb, (src.op_type, list(src.input))
    return f"tied weights exported as ONE initializer '{emb}' feeding Gather and Transpose->{head.op_type}"


def verify(model: torch.nn.Module, path: Path, spec: Spec, dynamic: bool) -> float:
    """Check the file alone (copied into an empty folder) against torch; return max abs diff."""
    data = path.read_bytes()
    with tempfile.TemporaryDirectory() as tmp:
        iso = Path(tmp) / "model.onnx"
        iso.write_bytes(data)
        proto = onnx.load(str(iso))
        onnx.checker.check_model(proto, full_check=False)
        sess = ort.InferenceSession(str(iso), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    assert names == ["input_ids", "attention_mask"], names
    assert [o.name for o in sess.get_outputs()] == ["logits"]

    cases = [_dummy_inputs(spec.vocab, seed=spec.seed + 100)]
    if dynamic:
        # Another batch/sequence length, with left padding in the mask.
        g = torch.Generator().manual_seed(spec.seed + 200)
        ids = torch.randint(0, spec.vocab, (3, 11), generator=g, dtype=torch.int64)
        mask = torch.ones_like(ids)
        mask[1, :4] = 0
        cases.append((ids, mask))
    worst = 0.0
    for ids, mask in cases:
        with torch.no_grad():
            ref = model(ids, mask).numpy()
        got = sess.run(["logits"], {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})[0]
        assert got.shape == ref.shape == (*ids.shape, spec.vocab), (got.shape, ref.shape)
        diff = float(np.abs(got - ref).max())
        if not diff < ATOL:
            raise AssertionError(
                f"{path.name}: onnxruntime vs torch max abs diff {diff:.3g} >= {ATOL} "
                f"for input shape {tuple(ids.shape)}"
            )
        worst = max(worst, diff)
        print(f"      {tuple(ids.shape)}: logits std {ref.std():.2f}, max|logit| {np.abs(ref).max():.1f}")
        # Logits must be informative, not near-uniform.
        spread = float(ref.std(axis=-1).mean())
        if spread < 0.5:
            raise AssertionError(f"{path.name}: degenerate logits (mean per-row std {spread:.3f})")
    return worst


def build_one(spec: Spec, out: Path) -> list[dict[str, Any]]:
    print(f"[{spec.name}]")
    model = build_model(spec)
    notes = [spec.notes]
    if spec.outlier_channel is not None:
        notes.append(check_outlier(model, spec))
    logits_only(model)
    entries = []
    for exporter, opset, fn in (
        ("torchscript", TS_OPSET, export_ts),
        ("dynamo", DYNAMO_OPSET, export_dynamo),
    ):
        suffix = "ts" if exporter == "torchscript" else "dynamo"
        path = out / f"{spec.name}_{suffix}.onnx"
        extra_note = fn(model, path, spec)
        make_self_contained(path)
        diff = verify(model, path, spec, dynamic=not extra_note)
        if spec.tied:
            extra_note = "; ".join(n for n in [extra_note, describe_tied(path)] if n)
        size = path.stat().st_size
        print(f"    {path.name}: {size / 1024:.1f} KiB, max|ort-torch| = {diff:.2e}")
        if size > SIZE_LIMIT:
            raise AssertionError(f"{path.name} is {size} bytes; shrink the model")
        entries.append(
            {
                "file": path.name,
                "family": spec.family,
                "exporter": exporter,
                "opset": opset,
                "tied": spec.tied,
                "hidden": spec.hidden,
                "layers": spec.layers,
                "vocab": spec.vocab,
                "num_heads": spec.num_heads,
                "num_kv_heads": spec.num_kv_heads,
                "head_dim": spec.head_dim,
                "intermediate": spec.intermediate,
                "outlier_channel": spec.outlier_channel,
                "notes": "; ".join(n for n in [*notes, extra_note] if n),
            }
        )
    return entries


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="fixtures", type=Path, help="output folder (default: fixtures)")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only (re)build these fixtures")
    args = ap.parse_args(argv)

    by_name = {s.name: s for s in SPECS}
    names = args.only or list(by_name)
    unknown = [n for n in names if n not in by_name]
    if unknown:
        ap.error(f"unknown fixture(s) {unknown}; choose from {sorted(by_name)}")

    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))

    manifest_path = out / "manifest.json"
    old: list[dict[str, Any]] = []
    if args.only and manifest_path.exists():
        old = json.loads(manifest_path.read_text())

    new: dict[str, list[dict[str, Any]]] = {}
    for name in names:
        new[name] = build_one(by_name[name], out)

    rebuilt = {e["file"] for entries in new.values() for e in entries}
    kept = {e["file"]: e for e in old if e["file"] not in rebuilt}
    # Keep manifest order = SPECS order, regardless of --only.
    manifest: list[dict[str, Any]] = []
    for spec in SPECS:
        if spec.name in new:
            manifest.extend(new[spec.name])
        else:
            for suffix in ("ts", "dynamo"):
                f = f"{spec.name}_{suffix}.onnx"
                if f in kept:
                    manifest.append(kept[f])
    manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")

    total = sum((out / e["file"]).stat().st_size for e in manifest if (out / e["file"]).exists())
    print(f"wrote {manifest_path} ({len(manifest)} entries); fixtures total {total / 1024:.1f} KiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
