#!/usr/bin/env python
"""(Re)generate the tiny vision-language fixtures: Qwen2.5-VL and Qwen3-VL, each as three pieces.

A VLM is deployed as separate parts, and each is exported here the way deployments do it:

* ``visual.onnx``    - vision encoder: ``pixel_values`` [patches, C*T*P*P] + ``grid_thw`` [images, 3]
                       -> ``image_embeds`` [merged tokens, hidden] (Qwen3-VL also ``deepstack_embeds_<i>``,
                       one per deepstack merger, same shape);
* ``backbone.onnx``  - text decoder taking ``inputs_embeds`` [batch, seq, hidden] (no embedding Gather),
                       ``attention_mask`` [batch, seq] and ``position_ids`` [3, batch, seq] (mrope: one row
                       each for t/h/w) -> ``logits``. Qwen3-VL's backbone also takes ``deepstack_embeds_<i>``
                       [batch, seq, hidden]: the deepstack features already scattered to the image-token
                       positions (zeros elsewhere), added to the residual stream after text layer i;
* ``embedding.pth``  - the token embedding table [vocab, hidden] saved with ``torch.save``.

transformers adds deepstack features in place (``h[mask] = h[mask] + v``), which the TorchScript exporter
mis-exports; the backbone here uses the equivalent out-of-place ``h = h + scattered_v`` instead. Every
export is checked against torch end to end: the full ``*ForConditionalGeneration`` model on input ids with
image tokens versus visual.onnx -> numpy merge with embedding.pth -> backbone.onnx.

Models are random-init from configs (no hub), with RMSNorm/LayerNorm scales and biases perturbed so that
nothing folds away by accident. Usage::

    python scripts/make_vlm_fixtures.py [--out fixtures/vlm]

Requires torch, transformers, onnx and onnxruntime.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
import transformers

OPSET = 17
ATOL = 1e-4
NORM_PERTURB = 0.5
SIZE_LIMIT = 5_000_000  # bytes for the whole fixtures/vlm folder

# One image of 8 x 8 patches (4 x 4 merged tokens), in a prompt of 24 tokens, batch 2.
GRID_THW = (1, 8, 8)
BATCH, SEQ, IMAGE_START = 2, 24, 3
VOCAB, HIDDEN = 128, 64
IMAGE_TOKEN_ID = 120
PATCH, TEMPORAL, CHANNELS, MERGE = 4, 2, 3, 2


@dataclass
class Family:
    name: str
    model_cls: str
    tied: bool
    seed: int
    notes: str


FAMILIES = [
    Family(
        "qwen2_5_vl",
        "Qwen2_5_VLForConditionalGeneration",
        tied=True,
        seed=11,
        notes=(
            "Qwen2.5-VL: window attention over 2 x 2 windows, merger.mlp.2 output passes the window-undo "
            "Gather; text q/k/v with bias; tie_word_embeddings=True (lm_head is the table, as in the 3B)"
        ),
    ),
    Family(
        "qwen3_vl",
        "Qwen3VLForConditionalGeneration",
        tied=False,
        seed=12,
        notes=(
            "Qwen3-VL: merger.linear_fc2 plus two deepstack mergers (vision layers 0 and 1) whose "
            "outputs are added to the residual stream after text layers 0 and 1; q_norm/k_norm; untied"
        ),
    ),
]


def _text_config(family: Family) -> dict[str, Any]:
    common = dict(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        initializer_range=0.2,
        tie_word_embeddings=family.tied,
        use_cache=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    if family.name == "qwen3_vl":
        return dict(common, head_dim=16, rope_parameters=dict(rope, mrope_interleaved=True))
    return dict(common, rope_parameters=rope, use_sliding_window=False)


def _vision_config(family: Family) -> dict[str, Any]:
    common = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        num_heads=2,
        in_channels=CHANNELS,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL,
        out_hidden_size=HIDDEN,
        initializer_range=0.1,
    )
    if family.name == "qwen3_vl":
        return dict(common, num_position_embeddings=16, deepstack_visual_indexes=[0, 1])
    # window 16 px = 2 x 2 merged tokens per window: an 8 x 8 patch grid has 4 windows, so the window
    # permutation (and its inverse Gather after the merger) is not the identity.
    return dict(common, window_size=MERGE * PATCH * 2, fullatt_block_indexes=[1])


def build_model(family: Family) -> torch.nn.Module:
    torch.manual_seed(family.seed)
    cls_name = family.model_cls.replace("ForConditionalGeneration", "Config")
    config_cls = getattr(transformers, cls_name)
    config = config_cls(
        text_config=_text_config(family),
        vision_config=_vision_config(family),
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=IMAGE_TOKEN_ID + 1,
        vision_start_token_id=IMAGE_TOKEN_ID + 2,
        vision_end_token_id=IMAGE_TOKEN_ID + 3,
        tie_word_embeddings=family.tied,
    )
    for sub in (config, config.text_config, config.vision_config):
        sub._attn_implementation = "eager"
    model = getattr(transformers, family.model_cls)(config).to(torch.float32).eval()
    with torch.no_grad():
        for module in model.modules():
            kind = type(module).__name__
            if kind.endswith("RMSNorm") or isinstance(module, torch.nn.LayerNorm):
                module.weight.copy_(1.0 + NORM_PERTURB * torch.randn_like(module.weight))
                if getattr(module, "bias", None) is not None:
                    module.bias.copy_(0.1 * torch.randn_like(module.bias))
        for name, param in model.named_parameters():
            if name.endswith(".bias") and "norm" not in name and "ln_" not in name:
                param.copy_(0.05 * torch.randn_like(param))
    embed = model.model.language_model.embed_tokens.weight
    assert (model.lm_head.weight is embed) == family.tied
    return model


# ------------------------------------------------------------------------------------------ wrappers


class VisualExport(torch.nn.Module):
    """The vision encoder returning plain tensors: merged embeddings, then each deepstack feature."""

    def __init__(self, visual: torch.nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.visual(pixel_values, grid_thw=grid_thw)
        return (out.pooler_output, *(getattr(out, "deepstack_features", None) or []))


def _add_deepstack(self: torch.nn.Module, hidden: torch.Tensor, mask: Any, scattered: torch.Tensor) -> torch.Tensor:
    """Out-of-place deepstack step: ``scattered`` is zero off the image positions, so this equals
    transformers' in-place ``h[mask] += v`` (which the TorchScript exporter mis-exports)."""
    del mask
    return hidden + scattered


@contextlib.contextmanager
def out_of_place_deepstack(language_model: torch.nn.Module) -> Iterator[None]:
    """Swap in ``_add_deepstack`` for the export only; the torch reference keeps the in-place original."""
    language_model._deepstack_process = types.MethodType(_add_deepstack, language_model)
    try:
        yield
    finally:
        del language_model._deepstack_process


class BackboneExport(torch.nn.Module):
    """Text decoder + lm_head on ``inputs_embeds``; deepstack features come in pre-scattered."""

    def __init__(self, model: torch.nn.Module, deepstack: int) -> None:
        super().__init__()
        self.language_model = model.model.language_model
        self.lm_head = model.lm_head
        self.deepstack = deepstack

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        *deepstack_embeds: torch.Tensor,
    ) -> torch.Tensor:
        extra = {"deepstack_visual_embeds": list(deepstack_embeds)} if self.deepstack else {}
        out = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=False,
            **extra,
        )
        return self.lm_head(out.last_hidden_state)


# ------------------------------------------------------------------------------------------ inputs


def sample_inputs(seed: int = 0) -> dict[str, np.ndarray]:
    """Prompt ids with one image's tokens at IMAGE_START, random pixels, the grid and text positions."""
    rng = np.random.default_rng(seed)
    t, h, w = GRID_THW
    tokens = t * h * w // MERGE**2
    ids = rng.integers(1, IMAGE_TOKEN_ID, size=(BATCH, SEQ), dtype=np.int64)
    ids[:, IMAGE_START : IMAGE_START + tokens] = IMAGE_TOKEN_ID
    pixels = rng.standard_normal((BATCH * t * h * w, CHANNELS * TEMPORAL * PATCH * PATCH)).astype(np.float32)
    grid = np.array([GRID_THW] * BATCH, dtype=np.int64)
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int64), (3, BATCH, SEQ)).copy()
    return {"input_ids": ids, "pixel_values": pixels, "grid_thw": grid, "position_ids": positions}


def merge_embeddings(
    table: np.ndarray, ids: np.ndarray, image_embeds: np.ndarray, image_token_id: int = IMAGE_TOKEN_ID
) -> np.ndarray:
    """Token embeddings with the image embeddings written, in order, at the image-token positions."""
    embeds = np.asarray(table, dtype=np.float32)[ids]
    mask = ids == image_token_id
    assert mask.sum() == image_embeds.shape[0], (mask.sum(), image_embeds.shape)
    embeds[mask] = image_embeds
    return embeds


def scatter(ids: np.ndarray, features: np.ndarray, image_token_id: int = IMAGE_TOKEN_ID) -> np.ndarray:
    out = np.zeros((*ids.shape, features.shape[-1]), dtype=np.float32)
    out[ids == image_token_id] = features
    return out


# ------------------------------------------------------------------------------------------ export


def _export(module: torch.nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dyn: dict) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=OPSET,
            input_names=inputs,
            output_names=outputs,
            dynamic_axes=dyn,
            do_constant_folding=True,
        )
    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    onnx.save_model(model, str(path), save_as_external_data=False)


def export_family(family: Family, out: Path) -> dict[str, Any]:
    model = build_model(family)
    folder = out / family.name
    folder.mkdir(parents=True, exist_ok=True)
    sample = sample_inputs()
    deepstack = len(getattr(model.config.vision_config, "deepstack_visual_indexes", []) or [])

    visual = VisualExport(model.model.visual).eval()
    pixels, grid = torch.from_numpy(sample["pixel_values"]), torch.from_numpy(sample["grid_thw"])
    visual_outputs = ["image_embeds", *[f"deepstack_embeds_{i}" for i in range(deepstack)]]
    _export(visual, (pixels, grid), folder / "visual.onnx", ["pixel_values", "grid_thw"], visual_outputs, {})

    backbone = BackboneExport(model, deepstack).eval()
    embeds = torch.randn(BATCH, SEQ, HIDDEN)
    mask = torch.ones(BATCH, SEQ, dtype=torch.int64)
    positions = torch.from_numpy(sample["position_ids"])
    ds_inputs = [f"deepstack_embeds_{i}" for i in range(deepstack)]
    ds_args = tuple(torch.randn(BATCH, SEQ, HIDDEN) for _ in range(deepstack))
    dyn = {
        "inputs_embeds": {0: "batch", 1: "sequence"},
        "attention_mask": {0: "batch", 1: "sequence"},
        "position_ids": {1: "batch", 2: "sequence"},
        "logits": {0: "batch", 1: "sequence"},
        **{name: {0: "batch", 1: "sequence"} for name in ds_inputs},
    }
    with out_of_place_deepstack(backbone.language_model):
        _export(
            backbone,
            (embeds, mask, positions, *ds_args),
            folder / "backbone.onnx",
            ["inputs_embeds", "attention_mask", "position_ids", *ds_inputs],
            ["logits"],
            dyn,
        )
    table = model.model.language_model.embed_tokens.weight.detach().clone()
    torch.save(table, folder / "embedding.pth")

    error = verify(model, folder, sample, deepstack)
    visual_inputs = [i.name for i in onnx.load(str(folder / "visual.onnx")).graph.input]
    files = sorted(p.name for p in folder.iterdir())
    return {
        "family": family.name,
        "folder": family.name,
        "files": files,
        "model_class": family.model_cls,
        "hidden": HIDDEN,
        "vocab": VOCAB,
        "text_layers": 2,
        "tied": family.tied,
        "image_token_id": IMAGE_TOKEN_ID,
        "grid_thw": list(GRID_THW),
        "images": BATCH,
        "visual_inputs": visual_inputs,
        "visual_note": "traced for this grid and image count"
        + ("" if "grid_thw" in visual_inputs else " (grid baked in: no grid_thw input)"),
        "pixel_values_shape_per_image": [int(np.prod(GRID_THW)), CHANNELS * TEMPORAL * PATCH * PATCH],
        "image_tokens_per_image": int(np.prod(GRID_THW)) // MERGE**2,
        "deepstack_inputs": deepstack,
        "visual_writers": _visual_writers(family, deepstack),
        "max_abs_vs_torch": error,
        "notes": family.notes,
    }


def _visual_writers(family: Family, deepstack: int) -> list[str]:
    if family.name == "qwen3_vl":
        return ["merger.linear_fc2", *[f"deepstack_merger_list.{i}.linear_fc2" for i in range(deepstack)]]
    return ["merger.mlp.2"]


def run_pipeline(folder: Path, sample: dict[str, np.ndarray], table: np.ndarray) -> np.ndarray:
    """visual.onnx -> merge with the table (numpy) -> backbone.onnx: the logits."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    visual = ort.InferenceSession(str(folder / "visual.onnx"), opts, providers=["CPUExecutionProvider"])
    # A traced export may bake the grid in (Qwen2.5-VL's window index) and drop the grid_thw input.
    names = [i.name for i in visual.get_inputs()]
    outs = visual.run(None, {name: sample[name] for name in names})
    backbone = ort.InferenceSession(str(folder / "backbone.onnx"), opts, providers=["CPUExecutionProvider"])
    ids = sample["input_ids"]
    feeds = {
        "inputs_embeds": merge_embeddings(table, ids, outs[0]),
        "attention_mask": np.ones(ids.shape, dtype=np.int64),
        "position_ids": sample["position_ids"],
    }
    for i, feature in enumerate(outs[1:]):
        feeds[f"deepstack_embeds_{i}"] = scatter(ids, feature)
    return backbone.run(["logits"], feeds)[0]


def verify(model: torch.nn.Module, folder: Path, sample: dict[str, np.ndarray], deepstack: int) -> float:
    """Max |logits(onnx pipeline) - logits(torch, in-place deepstack)|; raises above ATOL."""
    with torch.no_grad():
        expected = model(
            input_ids=torch.from_numpy(sample["input_ids"]),
            attention_mask=torch.ones(sample["input_ids"].shape, dtype=torch.int64),
            pixel_values=torch.from_numpy(sample["pixel_values"]),
            image_grid_thw=torch.from_numpy(sample["grid_thw"]),
            position_ids=torch.from_numpy(sample["position_ids"]),
            use_cache=False,
        ).logits.numpy()
    table = model.model.language_model.embed_tokens.weight.detach().numpy()
    got = run_pipeline(folder, sample, table)
    error = float(np.abs(got - expected).max())
    spread = float(expected.std())
    print(f"  {folder.name}: onnx pipeline vs torch max abs {error:.2e} (logit std {spread:.2f})")
    if not error < ATOL:
        raise AssertionError(f"{folder.name}: export differs from torch by {error}")
    return error


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "fixtures" / "vlm")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, onnx {onnx.__version__}")
    manifest = []
    for family in FAMILIES:
        print(f"{family.name}:")
        manifest.append(export_family(family, args.out))
    manifest_doc = {
        "generator": "scripts/make_vlm_fixtures.py",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "opset": OPSET,
        "sample": {"batch": BATCH, "seq": SEQ, "image_start": IMAGE_START, "position_ids": "arange(seq) x 3"},
        "models": manifest,
    }
    (args.out / "manifest.json").write_text(json.dumps(manifest_doc, indent=2) + "\n")
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"total {total / 1e6:.2f} MB in {args.out}")
    if total > SIZE_LIMIT:
        raise AssertionError(f"fixtures/vlm is {total} bytes, over {SIZE_LIMIT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
