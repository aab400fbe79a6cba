#!/usr/bin/env python
"""(Re)generate fixtures/families/: tiny random-init decoders of many transformers families, real exports.

Each job builds a random-init ``*ForCausalLM`` from a small config (hidden 64, 2 layers, vocab 128 unless
the feature needs more), perturbs every norm weight and fills every bias (so nothing folds away), exports
it with torch.onnx (TorchScript opset 17 or dynamo opset 18) and checks the ONNX model against torch in
onnxruntime on a DIFFERENT input than the traced one (batch 3 x sequence 5, other token ids; with a KV
cache a prefill and one decode step). Exports that do not match torch are dropped and listed in the
manifest's ``dropped`` section with the reason: an exporter that mis-exports a model is not a fixture.

The jobs for transformers 5.x and 4.5x run in their own venvs (``/work/venvs/fx5``, ``/work/venvs/fx4``:
torch 2.13 CPU, onnx, onnxscript, onnxruntime); run this script once with each python and it exports only
the jobs of its own transformers major version, merging into ``fixtures/families/manifest.json``.

Usage::

    /work/venvs/fx5/bin/python scripts/make_family_fixtures.py [--group 13 14 15] [--only NAME ...]
    /work/venvs/fx4/bin/python scripts/make_family_fixtures.py --group 14
    python scripts/make_family_fixtures.py --list
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import os
import re
import sys
import tempfile
import traceback
import warnings
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "fixtures" / "families"
VOCAB = 128
MAX_POS = 64
INIT_RANGE = 0.2
NORM_PERTURB = 0.5
# Export vs torch on the check input: relative L2 of the logits, per dtype (fp16/bf16: own rounding).
MATCH = {"float32": 1e-5, "float16": 1e-2, "bfloat16": 5e-2}
TRACE_SHAPE, CHECK_SHAPE = (2, 7), (3, 5)


@dataclass
class Job:
    name: str
    family: str  # transformers model_type
    exporter: str  # torchscript | dynamo
    group: int  # the issue the fixture is for
    tf: int = 5  # transformers major version that exports it
    attn: str = "eager"
    dtype: str = "float32"
    kind: str = "logits"  # logits | kv | split
    cfg: dict[str, Any] = field(default_factory=dict)
    no_final_norm: bool = False
    optimize: bool = True
    strip_value_info: bool = False
    experts: str | None = None  # transformers 5 experts implementation
    notes: str = ""

    @property
    def opset(self) -> int:
        return 17 if self.exporter == "torchscript" else 18


BASE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=MAX_POS,
    initializer_range=INIT_RANGE,
    tie_word_embeddings=False,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    use_cache=False,
)
FAMILY_CFG: dict[str, dict[str, Any]] = {
    "llama": {},
    "mistral": {"sliding_window": None},
    "qwen3": {"use_sliding_window": False, "tie_word_embeddings": True},
    "phi3": {
        "head_dim": None,
        "original_max_position_embeddings": MAX_POS,
        "sliding_window": None,
        "partial_rotary_factor": 0.5,
    },
    "gemma2": {
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 512,
        "attn_logit_softcapping": 5.0,
        "final_logit_softcapping": 10.0,
        "tie_word_embeddings": True,
    },
    "gemma3_text": {
        "query_pre_attn_scalar": 16,
        "sliding_window": 512,
        "layer_types": ["sliding_attention", "full_attention"],
        "tie_word_embeddings": True,
    },
    "glm4": {"partial_rotary_factor": 0.5},
    "smollm3": {"no_rope_layer_interval": 2, "use_sliding_window": False},
    "deepseek_v3": {
        "head_dim": None,
        "kv_lora_rank": 32,
        "q_lora_rank": 32,
        "qk_rope_head_dim": 8,
        "qk_nope_head_dim": 16,
        "v_head_dim": 16,
        "num_key_value_heads": 4,
        "first_k_dense_replace": 2,
        "n_routed_experts": 4,
        "num_experts_per_tok": 2,
        "n_shared_experts": 1,
        "moe_intermediate_size": 16,
        "n_group": 1,
        "topk_group": 1,
        "rope_scaling": None,
    },
    "mixtral": {"num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": None},
    "qwen2_moe": {
        "head_dim": None,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "shared_expert_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "use_sliding_window": False,
    },
    "qwen3_moe": {
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 16,
        "decoder_sparse_step": 1,
        "use_sliding_window": False,
    },
    "gpt2": {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": MAX_POS, "n_inner": 32},
    "gpt_neox": {"rotary_pct": 0.25, "use_parallel_residual": True},
    "phi": {"partial_rotary_factor": 0.5},
    "stablelm": {"partial_rotary_factor": 0.25},
    "starcoder2": {"sliding_window": None},
    "olmo": {},
    "nemotron": {"partial_rotary_factor": 0.5},
    "cohere": {"use_qk_norm": False},
    "olmo2": {},
    "olmo3": {"sliding_window": 512, "layer_types": ["sliding_attention", "full_attention"]},
    "exaone4": {"sliding_window": None, "layer_types": ["full_attention", "full_attention"]},
    "granite": {
        "embedding_multiplier": 4.0,
        "residual_multiplier": 0.5,
        "attention_multiplier": 0.2,
        "logits_scaling": 2.0,
    },
    "helium": {},
}
FEATURES = {
    "llama": "GQA 4q/2kv heads of dim 16",
    "mistral": "GQA, no sliding window",
    "qwen3": "per-head q_norm/k_norm, tied",
    "phi3": "fused qkv_proj and gate_up_proj, partial rotary (partial_rotary_factor 0.5)",
    "gemma2": "(1+w) sandwich norms, attn_logit_softcapping 5 (tanh on the scores), final softcap 10, tied",
    "gemma3_text": "(1+w) sandwich norms, q_norm/k_norm, sqrt(hidden) embedding scale, sliding + full layer, tied",
    "glm4": "fused gate_up, post-attention/post-MLP sandwich norms, partial rotary 0.5 (interleaved)",
    "smollm3": "NoPE: no_rope_layer_interval 2 -> layer 1 has no rotary",
    "deepseek_v3": "MLA: q_lora 32, kv_lora 32, qk_nope 16 + qk_rope 8 (q/k head dim 24), v_head_dim 16",
    "mixtral": "MoE: 4 experts, top-2 router",
    "qwen2_moe": "MoE: 4 experts top-2 + shared expert with sigmoid shared_expert_gate",
    "qwen3_moe": "MoE: 4 experts top-2, q_norm/k_norm",
    "gpt2": "LayerNorm, learned position embeddings, Conv1D fused c_attn, biases, tied",
    "gpt_neox": "LayerNorm, parallel attention+MLP residual, fused qkv, rotary_pct 0.25",
    "phi": "LayerNorm, parallel attention+MLP (one LayerNorm per layer), partial rotary 0.5, biases",
    "stablelm": "LayerNorm, partial rotary 0.25",
    "starcoder2": "LayerNorm with bias, biases on projections, gelu MLP",
    "olmo": "non-parametric LayerNorm (no weight, no bias)",
    "nemotron": "LayerNorm1P (weight + 1), relu^2 MLP, partial rotary 0.5",
    "cohere": "LayerNorm without bias, parallel attention+MLP, logit_scale, tied",
    "olmo2": "post-norm: RMSNorm after attention and MLP only, full-width q_norm/k_norm",
    "olmo3": "post-norm like olmo2, sliding + full layer",
    "exaone4": "post-norm (post_attention/post_feedforward RMSNorm), per-head q_norm/k_norm",
    "granite": "embedding x4, residual x0.5, attention_multiplier 0.2, logits / 2",
    "helium": "RMSNorm variant (Helium)",
}


# Eager transformers-5 exports that fixtures/*.onnx and fixtures/exporters/gemma3_* already cover (same
# family, exporters and attention; llama_h320 is the MQA one): not repeated here to keep the folder small.
# transformers 4.5x: eager attention through TorchScript only, also to keep the folder small.
COVERED = {
    ("llama", "eager", 5),
    ("qwen3", "eager", 5),
    ("mistral", "eager", 5),
    ("gemma3", "eager", 5),
    ("llama_mqa", "eager", 5),
}


GEMMA2_SDPA_TF4 = (
    "transformers 4.57 accepts sdpa for Gemma2 and drops the attention soft-cap: the torch model itself has no "
    "tanh on the scores (3 Tanh nodes here against 5 in the eager export), so this is Gemma2 WITHOUT attention "
    "soft-capping (transformers 5 refuses sdpa for Gemma2)"
)


def _jobs() -> list[Job]:
    jobs: list[Job] = []

    def both(name: str, fam: str, group: int, **kw: Any) -> None:
        for exp, tag in (("torchscript", "ts17"), ("dynamo", "dy18")):
            jobs.append(Job(f"{name}_{tag}", fam, exp, group, **kw))

    # Issue 13: SmolLM3 NoPE, fp16 sandwich norms, fp16 dynamo without value_info.
    both("smollm3_nope", "smollm3", 13)
    jobs.append(Job("gemma3_ts17_fp16", "gemma3_text", "torchscript", 13, dtype="float16"))
    jobs.append(Job("gemma3_ts17_bf16", "gemma3_text", "torchscript", 13, dtype="bfloat16"))
    jobs.append(Job("gemma2_ts17_fp16", "gemma2", "torchscript", 13, dtype="float16"))
    for fam, short in (("llama", "llama"), ("gemma3_text", "gemma3")):
        jobs.append(
            Job(
                f"{short}_dy18_fp16_novi",
                fam,
                "dynamo",
                13,
                dtype="float16",
                strip_value_info=True,
                notes="value_info removed after export",
            )
        )
    # Issue 14: attention implementations x exporters x transformers majors.
    fams14 = [
        ("llama", "llama", {}),
        ("qwen3", "qwen3", {}),
        ("mistral", "mistral", {}),
        ("phi3", "phi3", {}),
        ("gemma2", "gemma2", {}),
        ("gemma3", "gemma3_text", {}),
        ("llama_mqa", "llama", {"num_key_value_heads": 1}),
        ("glm4", "glm4", {}),
    ]
    fams14_tf4 = {"llama", "qwen3", "phi3", "gemma2", "gemma3"}
    for tf in (5, 4):
        for short, fam, cfg in fams14:
            if tf == 4 and short not in fams14_tf4:
                continue
            for attn in ("eager", "sdpa"):
                for exp, tag in (("torchscript", "ts17"), ("dynamo", "dy18")):
                    if (short, attn, tf) in COVERED or (tf == 4 and attn == "eager" and exp == "dynamo"):
                        continue
                    note = GEMMA2_SDPA_TF4 if (short, attn, tf) == ("gemma2", "sdpa", 4) else ""
                    jobs.append(
                        Job(f"{short}_{attn}_tf{tf}_{tag}", fam, exp, 14, tf=tf, attn=attn, cfg=dict(cfg), notes=note)
                    )
    jobs.append(Job("llama_kv_ts17", "llama", "torchscript", 14, kind="kv"))
    jobs.append(Job("qwen3_kv_ts17", "qwen3", "torchscript", 14, kind="kv"))
    both("deepseek_v3_mla", "deepseek_v3", 14)
    # Issue 15: MoE, LayerNorm families, post-norm, multipliers, no final norm, unoptimized, split.
    # transformers 5's default experts: TorchScript meets aten::histc (eager loop), dynamo a
    # transformers::grouped_mm_fallback custom op; neither exports. The *_bmm jobs use the batched_mm experts
    # implementation (same function: every token through its own top-k experts, batched matmuls).
    for fam, short, cfg in (
        ("mixtral", "mixtral", {}),
        ("qwen2_moe", "qwen2_moe", {}),
        ("qwen3_moe", "qwen3_moe", {}),
        ("deepseek_v3", "deepseek_v3_moe", {"first_k_dense_replace": 1}),
    ):
        both(short, fam, 15, cfg=dict(cfg))
        both(f"{short}_bmm", fam, 15, cfg=dict(cfg), experts="batched_mm")
    for fam in (
        "gpt2",
        "gpt_neox",
        "phi",
        "stablelm",
        "starcoder2",
        "olmo",
        "nemotron",
        "cohere",
        "olmo2",
        "olmo3",
        "exaone4",
        "granite",
        "helium",
    ):
        both(fam, fam, 15)
    both("llama_nofinalnorm", "llama", 15, no_final_norm=True, notes="model.norm replaced by Identity")
    jobs.append(Job("llama_dy18_noopt", "llama", "dynamo", 15, optimize=False, notes="dynamo optimize=False"))
    both(
        "llama_split",
        "llama",
        15,
        kind="split",
        notes="two graphs: part0 = embedding + layer 0 -> hidden_states (raw residual stream), "
        "part1 = hidden_states -> layer 1 + final norm + lm_head -> logits",
    )
    return jobs


JOBS = _jobs()


# ------------------------------------------------------------------------------------------ models


def build(job: Job):
    import torch
    import transformers

    cfg = {**BASE, **FAMILY_CFG[job.family], **job.cfg}
    cfg = {k: v for k, v in cfg.items() if not (k == "head_dim" and v is None)}
    torch.manual_seed(zlib.crc32(job.name.encode()) % 1000)
    config = transformers.AutoConfig.for_model(job.family, **cfg)
    if job.family == "gpt2":
        config.tie_word_embeddings = True
    config._attn_implementation = job.attn
    if job.experts:
        config._experts_implementation = job.experts
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=job.attn)
    model = model.to(torch.float32).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for mod in model.modules():
            if "Norm" in type(mod).__name__ and isinstance(getattr(mod, "weight", None), torch.Tensor):
                w = mod.weight
                w.add_(NORM_PERTURB * torch.randn(w.shape, generator=gen))
        for name, p in model.named_parameters():
            if name.endswith(".bias") and p.dim() == 1:
                p.copy_(INIT_RANGE * torch.randn(p.shape, generator=gen))
        for mod in model.modules():  # routers: sharper routing so top-k changes between tokens
            if type(mod).__name__.endswith(("Router", "TopkRouter", "Gate")) and hasattr(mod, "weight"):
                mod.weight.mul_(5.0)
    if job.no_final_norm:
        model.model.norm = torch.nn.Identity()
    if job.family == "smollm3":
        assert 0 in list(config.no_rope_layers), config.no_rope_layers
    dtype = getattr(torch, job.dtype)
    return model.to(dtype), config


def patch_tf4_masks_for_torchscript() -> None:
    """transformers 4.5x builds masks with torch.vmap, which the TorchScript exporter cannot export
    (its TransformGetItemToIndex indexing fails with "RuntimeError: unordered_map::at"); the mask functions are
    elementwise, so broadcasting the index tensors gives the same mask."""
    from transformers import masking_utils

    def broadcast_bhqkv(mask_function, bh_indices: bool = True):
        def inner(b, h, q, kv):
            if bh_indices:
                return mask_function(
                    b[:, None, None, None], h[None, :, None, None], q[None, None, :, None], kv[None, None, None, :]
                )
            return mask_function(None, None, q[:, None], kv[None, :])

        return inner

    masking_utils._vmap_for_bhqkv = broadcast_bhqkv
    masking_utils.TransformGetItemToIndex = contextlib.nullcontext  # only needed under vmap


def logits_only(model):
    """Swap in a subclass whose forward(input_ids, attention_mask) returns logits only (keeps names)."""
    base = type(model)

    def forward(self, input_ids, attention_mask):
        return base.forward(self, input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    model.__class__ = type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__})
    return model


def kv_wrapper(model, n_layers: int):
    import torch
    from transformers import DynamicCache

    class WithPast(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask, *past):
            cache = DynamicCache()
            for i in range(n_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            presents = []
            for layer in out.past_key_values.layers:
                presents += [layer.keys, layer.values]
            return (out.logits, *presents)

    return WithPast().eval()


def split_parts(model, k: int):
    import torch

    first, second = copy.deepcopy(model), copy.deepcopy(model)
    first.model.layers = first.model.layers[:k]
    first.model.norm = torch.nn.Identity()
    second.model.layers = second.model.layers[k:]

    class Part0(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = first.model

        def forward(self, input_ids, attention_mask):
            return self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    class Part1(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = second.model
            self.lm_head = second.lm_head

        def forward(self, hidden_states, attention_mask):
            h = self.model(inputs_embeds=hidden_states, attention_mask=attention_mask, use_cache=False)
            return self.lm_head(h.last_hidden_state)

    return Part0().eval(), Part1().eval()


# ------------------------------------------------------------------------------------------ export


def _ids(shape: tuple[int, int], seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, shape, generator=g, dtype=torch.int64)


def export(
    module, args: tuple, path: Path, job: Job, inputs: list[str], outputs: list[str], axes: dict[str, dict[int, str]]
) -> None:
    import torch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if job.exporter == "torchscript":
            torch.onnx.export(
                module,
                args,
                str(path),
                dynamo=False,
                opset_version=17,
                input_names=inputs,
                output_names=outputs,
                dynamic_axes=axes,
                do_constant_folding=True,
            )
        else:
            dims: dict[str, Any] = {}
            shapes = []
            for name in inputs:
                shapes.append({i: dims.setdefault(d, torch.export.Dim.DYNAMIC) for i, d in axes[name].items()})
            prog = torch.onnx.export(
                module,
                args,
                dynamo=True,
                opset_version=18,
                input_names=inputs,
                output_names=outputs,
                dynamic_shapes=tuple(shapes),
                external_data=False,
                optimize=job.optimize,
                verbose=False,
            )
            prog.save(str(path), external_data=False)
    finish(path, job)


def finish(path: Path, job: Job) -> None:
    import onnx

    model = onnx.load(str(path), load_external_data=True)
    for t in model.graph.initializer:
        del t.external_data[:]
        t.data_location = onnx.TensorProto.DEFAULT
    # Node metadata (dynamo's stack traces, namespaces, class hierarchies) is dropped: it is half of a
    # dynamo file at this size and nothing reads it.
    for node in model.graph.node:
        del node.metadata_props[:]
    if job.strip_value_info:
        del model.graph.value_info[:]
    onnx.save_model(model, str(path), save_as_external_data=False)
    for side in list(path.parent.glob(path.name + ".data")) + list(path.parent.glob(path.stem + ".onnx_data")):
        side.unlink()


def _np_dtype(dtype: str):
    import ml_dtypes

    return {"float32": np.float32, "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}[dtype]


def _torch_out(module, *args) -> np.ndarray:
    import torch

    with torch.no_grad():
        out = module(*args)
    out = out[0] if isinstance(out, tuple) else out
    return out.float().numpy()


def _compare(got: np.ndarray, ref: np.ndarray) -> dict[str, float]:
    got, ref = got.astype(np.float64), ref.astype(np.float64)
    return {
        "rel_l2": float(np.linalg.norm(got - ref) / np.linalg.norm(ref)),
        "max_rel": float(np.abs(got - ref).max() / np.abs(ref).max()),
        "argmax_agree": float((got.argmax(-1) == ref.argmax(-1)).mean()),
    }


PHASE = ["build"]  # where the current job is, for the dropped entry's reason


def _session(path: Path):
    import onnxruntime as ort

    PHASE[0] = "onnxruntime on the check input"

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def run_job(job: Job, out: Path) -> list[dict[str, Any]]:
    """Export one job, check it against torch on a fresh input; return manifest entries (one per file)."""
    import torch
    import transformers

    if job.exporter == "torchscript" and transformers.__version__.startswith("4."):
        patch_tf4_masks_for_torchscript()
    PHASE[0] = "build"
    model, config = build(job)
    PHASE[0] = "export"
    tmp = Path(tempfile.mkdtemp(prefix="fam_"))
    ids = _ids(TRACE_SHAPE, 0)
    mask = torch.ones_like(ids)
    chk = _ids(CHECK_SHAPE, 99)
    chk_mask = torch.ones_like(chk)
    seq_axes = {0: "batch", 1: "sequence"}
    files: list[Path] = []
    if job.kind == "logits":
        module = logits_only(model)
        path = tmp / f"{job.name}.onnx"
        export(
            module,
            (ids, mask),
            path,
            job,
            ["input_ids", "attention_mask"],
            ["logits"],
            {"input_ids": seq_axes, "attention_mask": seq_axes, "logits": seq_axes},
        )
        got = _session(path).run(["logits"], {"input_ids": chk.numpy(), "attention_mask": chk_mask.numpy()})[0]
        cmp = _compare(got, _torch_out(module, chk, chk_mask))
        files.append(path)
    elif job.kind == "kv":
        n, kvh = config.num_hidden_layers, config.num_key_value_heads
        hd = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        wrapper = kv_wrapper(model, n)
        past_len, new = 3, 2
        past = [torch.randn(2, kvh, past_len, hd) for _ in range(2 * n)]
        t_ids = _ids((2, new), 0)
        t_mask = torch.ones(2, past_len + new, dtype=torch.int64)
        names_in = ["input_ids", "attention_mask"] + [
            f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")
        ]
        names_out = ["logits"] + [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
        axes = {"input_ids": seq_axes, "attention_mask": {0: "batch", 1: "total_sequence"}, "logits": seq_axes}
        for nm in names_in[2:]:
            axes[nm] = {0: "batch", 2: "past_sequence"}
        for nm in names_out[1:]:
            axes[nm] = {0: "batch", 2: "total_sequence"}
        path = tmp / f"{job.name}.onnx"
        export(wrapper, (t_ids, t_mask, *past), path, job, names_in, names_out, axes)
        sess = _session(path)
        full = _ids((3, 6), 99)
        ref = _torch_out(logits_only(copy.deepcopy(model)), full, torch.ones_like(full))
        feeds = {"input_ids": full[:, :5].numpy(), "attention_mask": np.ones((3, 5), np.int64)}
        for nm in names_in[2:]:
            feeds[nm] = np.zeros((3, kvh, 0, hd), np.float32)
        first = dict(zip(names_out, sess.run(names_out, feeds), strict=True))
        feeds = {"input_ids": full[:, 5:].numpy(), "attention_mask": np.ones((3, 6), np.int64)}
        for nm in names_in[2:]:
            feeds[nm] = first[nm.replace("past_key_values.", "present.")]
        second = sess.run(["logits"], feeds)[0]
        cmp = _compare(np.concatenate([first["logits"], second], axis=1), ref)
        files.append(path)
    else:  # split
        k = config.num_hidden_layers // 2
        p0, p1 = split_parts(model, k)
        path0, path1 = tmp / f"{job.name}_part0.onnx", tmp / f"{job.name}_part1.onnx"
        export(
            p0,
            (ids, mask),
            path0,
            job,
            ["input_ids", "attention_mask"],
            ["hidden_states"],
            {"input_ids": seq_axes, "attention_mask": seq_axes, "hidden_states": seq_axes},
        )
        h = p0(ids, mask).detach()
        export(
            p1,
            (h, mask),
            path1,
            job,
            ["hidden_states", "attention_mask"],
            ["logits"],
            {"hidden_states": seq_axes, "attention_mask": seq_axes, "logits": seq_axes},
        )
        feeds = {"input_ids": chk.numpy(), "attention_mask": chk_mask.numpy()}
        hid = _session(path0).run(["hidden_states"], feeds)[0]
        got = _session(path1).run(["logits"], {"hidden_states": hid, "attention_mask": chk_mask.numpy()})[0]
        cmp = _compare(got, _torch_out(logits_only(model), chk, chk_mask))
        files += [path0, path1]
    ok = cmp["rel_l2"] < MATCH[job.dtype] and (job.dtype != "float32" or cmp["argmax_agree"] == 1.0)
    entries = []
    for i, f in enumerate(files):
        entry = manifest_entry(job, config, f.name, cmp, ok)
        if job.kind == "split":
            entry["part"] = i
            entry["parts"] = [p.name for p in files]
        entries.append(entry)
        if ok:
            (out / f.name).write_bytes(f.read_bytes())
    for f in files:
        f.unlink()
    return entries


def manifest_entry(job: Job, config, file: str, cmp: dict, ok: bool) -> dict[str, Any]:
    import onnx
    import torch
    import transformers

    hidden = getattr(config, "hidden_size", None) or config.n_embd
    heads = getattr(config, "num_attention_heads", None) or config.n_head
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    notes = [FEATURES.get(job.family, job.family)]
    if job.cfg:
        notes.append("config overrides " + json.dumps(job.cfg))
    if job.notes:
        notes.append(job.notes)
    if job.experts:
        notes.append(f"experts implementation {job.experts}")
    return {
        "file": file,
        "family": job.family,
        "issue": job.group,
        "exporter": f"torch.onnx {job.exporter}" + ("" if job.optimize else " (optimize=False)"),
        "opset": job.opset,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "attn_implementation": job.attn,
        "dtype": job.dtype,
        "kv_cache": job.kind == "kv",
        "kind": job.kind,
        "tied": bool(getattr(config, "tie_word_embeddings", False)),
        "hidden": int(hidden),
        "layers": int(getattr(config, "num_hidden_layers", None) or config.n_layer),
        "vocab": int(config.vocab_size),
        "num_heads": int(heads),
        "num_kv_heads": int(kv),
        "head_dim": int(head_dim),
        "intermediate": int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", 0) or 0),
        "no_final_norm": job.no_final_norm,
        "value_info_stripped": job.strip_value_info,
        "check": f"onnxruntime vs torch on input {list(CHECK_SHAPE)} (traced on {list(TRACE_SHAPE)})"
        + ("; prefill 5 + 1 decode step from present.*" if job.kind == "kv" else ""),
        "rel_l2_vs_torch": cmp["rel_l2"],
        "max_rel_err_vs_torch": cmp["max_rel"],
        "argmax_agree_vs_torch": cmp["argmax_agree"],
        "matches_torch": ok,
        "notes": "; ".join(notes),
    }


# ------------------------------------------------------------------------------------------ main


HEADER = {
    "generator": "scripts/make_family_fixtures.py (run with /work/venvs/fx5 and /work/venvs/fx4 pythons)",
    "about": (
        "fixtures: exports that match torch on an input other than the traced one (rel_l2_vs_torch, "
        "max_rel_err_vs_torch = max|ort-torch| / max|torch|, argmax_agree_vs_torch); dropped: jobs that failed "
        "to export or did not match torch, with why. Split models: 'parts' lists the graphs in order."
    ),
}


def _write(manifest: dict, mpath: Path) -> None:
    for sec in ("fixtures", "dropped"):
        manifest[sec].sort(key=lambda e: e["file"])
    mpath.write_text(json.dumps({**HEADER, **manifest}, indent=1) + "\n")


def _prune(manifest: dict, out: Path) -> None:
    """Forget entries (and files) of jobs no longer in JOBS."""
    known = {f for j in JOBS for f in (f"{j.name}.onnx", f"{j.name}_part0.onnx", f"{j.name}_part1.onnx")}
    for section in ("fixtures", "dropped"):
        for e in [e for e in manifest[section] if e["file"] not in known]:
            (out / e["file"]).unlink(missing_ok=True)
            manifest[section].remove(e)


def merge(src: Path, out: Path) -> int:
    mpath = out / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.exists() else {"fixtures": [], "dropped": []}
    other = json.loads((src / "manifest.json").read_text())
    names = {e["file"] for sec in ("fixtures", "dropped") for e in other[sec]}
    for sec in ("fixtures", "dropped"):
        manifest[sec] = [e for e in manifest[sec] if e["file"] not in names] + other[sec]
    for e in other["fixtures"]:
        (out / e["file"]).write_bytes((src / e["file"]).read_bytes())
    for e in other["dropped"]:
        (out / e["file"]).unlink(missing_ok=True)
    _prune(manifest, out)
    _write(manifest, mpath)
    print(f"merged {src}: {len(manifest['fixtures'])} fixtures, {len(manifest['dropped'])} dropped")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=OUT, help=f"output folder (default {OUT.relative_to(ROOT)})")
    ap.add_argument("--group", type=int, nargs="+", choices=[13, 14, 15], help="only jobs for these issues")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these jobs")
    ap.add_argument("--list", action="store_true", help="list the jobs and exit")
    ap.add_argument(
        "--merge-from",
        type=Path,
        metavar="DIR",
        help="merge another run's output folder (e.g. the fx4 venv's, run in parallel with --out DIR) and exit",
    )
    args = ap.parse_args(argv)
    if args.list:
        for j in JOBS:
            print(f"{j.name:32s} issue {j.group} tf{j.tf} {j.exporter} {j.attn} {j.dtype} {j.kind}")
        return 0
    if args.merge_from:
        return merge(args.merge_from, args.out)
    import torch
    import transformers

    major = int(transformers.__version__.split(".")[0])
    jobs = [j for j in JOBS if j.tf == major]
    if args.group:
        jobs = [j for j in jobs if j.group in args.group]
    if args.only:
        jobs = [j for j in jobs if j.name in args.only]
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    args.out.mkdir(parents=True, exist_ok=True)
    mpath = args.out / "manifest.json"
    manifest = json.loads(mpath.read_text()) if mpath.exists() else {"fixtures": [], "dropped": []}
    _prune(manifest, args.out)
    for job in jobs:
        print(f"== {job.name}", flush=True)
        try:
            entries = run_job(job, args.out)
        except Exception as exc:  # noqa: BLE001 - an export failure is recorded, not fatal
            traceback.print_exc(limit=2)
            text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # the dynamo exporter colours its messages
            msg = f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"[:300]
            entries = [
                {
                    "file": f"{job.name}.onnx",
                    "family": job.family,
                    "exporter": job.exporter,
                    "transformers": transformers.__version__,
                    "dtype": job.dtype,
                    "attn_implementation": job.attn,
                    "matches_torch": False,
                    "why": f"{PHASE[0]} failed: {msg}",
                }
            ]
        names = {e["file"] for e in entries}
        manifest["fixtures"] = [e for e in manifest["fixtures"] if e["file"] not in names]
        manifest["dropped"] = [e for e in manifest["dropped"] if e["file"] not in names]
        for e in entries:
            if e["matches_torch"]:
                manifest["fixtures"].append(e)
                print(
                    f"   {e['file']}: rel L2 {e['rel_l2_vs_torch']:.1e} "
                    f"{(args.out / e['file']).stat().st_size / 1024:.0f} KiB",
                    flush=True,
                )
            else:
                (args.out / e["file"]).unlink(missing_ok=True)
                e.setdefault(
                    "why",
                    f"does not match torch: rel L2 {e.get('rel_l2_vs_torch', float('nan')):.2e}, "
                    f"argmax agreement {e.get('argmax_agree_vs_torch', 0):.2f}",
                )
                manifest["dropped"].append(e)
                print(f"   DROPPED {e['file']}: {e['why']}", flush=True)
        _write(manifest, mpath)
    total = sum(f.stat().st_size for f in args.out.glob("*.onnx"))
    print(f"{len(manifest['fixtures'])} fixtures, {total / 1e6:.1f} MB in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
