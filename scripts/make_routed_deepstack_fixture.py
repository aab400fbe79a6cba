"""Qwen3-VL backbone whose deepstack features enter the stream through routing, as TorchScript draws it.

transformers adds deepstack features in place, ``h[visual_pos_masks] += deepstack_embeds[k]``; the
TorchScript exporter draws that as ``Add(h, Where(mask, Gather(deepstack_embeds[k], index), 0))``. This
script graph-edits the shipped ``fixtures/vlm/qwen3_vl/backbone.onnx`` (which takes the features already
scattered, one ``[batch, seq, hidden]`` input each) into that form: one stacked input ``deepstack_embeds``
``[layers, visual_tokens, hidden]`` and a bool ``visual_pos_masks [batch, seq]``, routed by Gather, CumSum,
Unsqueeze and Where into the same Adds. Fed the same features, both backbones compute the same logits
(checked here before writing). No torch needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
SOURCE = ROOT / "fixtures" / "vlm" / "qwen3_vl" / "backbone.onnx"
TARGET = ROOT / "fixtures" / "vlm" / "qwen3_vl_routed" / "backbone.onnx"


def routed(model: onnx.ModelProto) -> onnx.ModelProto:
    """Replace each ``deepstack_embeds_<k>`` input by its routing from the stacked input and the mask."""
    graph = model.graph
    old = sorted(i.name for i in graph.input if i.name.startswith("deepstack_embeds_"))
    hidden = graph.input[0].type.tensor_type.shape.dim[-1].dim_value
    keep = [i for i in graph.input if i.name not in old]
    del graph.input[:]
    graph.input.extend(keep)
    graph.input.append(helper.make_tensor_value_info("deepstack_embeds", TensorProto.FLOAT,
                                                     [len(old), "visual_tokens", hidden]))
    graph.input.append(helper.make_tensor_value_info("visual_pos_masks", TensorProto.BOOL, ["batch", "sequence"]))
    graph.initializer.extend([
        numpy_helper.from_array(np.array(1, dtype=np.int64), "ds.one"),
        numpy_helper.from_array(np.array(0, dtype=np.int64), "ds.zero_i"),
        numpy_helper.from_array(np.array(0.0, dtype=np.float32), "ds.zero"),
        numpy_helper.from_array(np.array([-1], dtype=np.int64), "ds.last"),
        numpy_helper.from_array(np.array(1, dtype=np.int64), "ds.axis1"),
    ])
    # index of each image position among the image positions: cumsum(mask) - 1 (clamped at 0 elsewhere)
    prologue = [
        helper.make_node("Cast", ["visual_pos_masks"], ["ds.mask_i"], to=TensorProto.INT64, name="ds/Cast"),
        helper.make_node("CumSum", ["ds.mask_i", "ds.axis1"], ["ds.count"], name="ds/CumSum"),
        helper.make_node("Sub", ["ds.count", "ds.one"], ["ds.index_raw"], name="ds/Sub"),
        helper.make_node("Max", ["ds.index_raw", "ds.zero_i"], ["ds.index"], name="ds/Max"),
        helper.make_node("Unsqueeze", ["visual_pos_masks", "ds.last"], ["ds.mask3"], name="ds/Unsqueeze"),
    ]
    nodes = list(graph.node)
    out_nodes = list(prologue)
    for node in nodes:
        for slot, name in enumerate(node.input):
            if name in old:
                k = old.index(name)
                graph.initializer.append(numpy_helper.from_array(np.array(k, dtype=np.int64), f"ds.k{k}"))
                out_nodes += [
                    helper.make_node("Gather", ["deepstack_embeds", f"ds.k{k}"], [f"ds.layer{k}"], axis=0,
                                     name=f"ds/Gather_layer{k}"),
                    helper.make_node("Gather", [f"ds.layer{k}", "ds.index"], [f"ds.rows{k}"], axis=0,
                                     name=f"ds/Gather_rows{k}"),
                    helper.make_node("Where", ["ds.mask3", f"ds.rows{k}", "ds.zero"], [f"ds.routed{k}"],
                                     name=f"ds/Where{k}"),
                ]
                node.input[slot] = f"ds.routed{k}"
        out_nodes.append(node)
    del graph.node[:]
    graph.node.extend(out_nodes)
    onnx.checker.check_model(model)
    return model


def sample(seed: int = 0, batch: int = 2, seq: int = 24, layers: int = 2, hidden: int = 64):
    rng = np.random.default_rng(seed)
    mask = np.zeros((batch, seq), dtype=bool)
    mask[:, 3:19] = True
    tokens = int(mask[0].sum())
    stacked = rng.standard_normal((layers, tokens, hidden)).astype(np.float32)
    common = {
        "inputs_embeds": rng.standard_normal((batch, seq, hidden)).astype(np.float32),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(seq, dtype=np.int64), (3, batch, seq)).copy(),
    }
    scattered = {}
    for k in range(layers):
        full = np.zeros((batch, seq, hidden), dtype=np.float32)
        full[mask] = np.concatenate([stacked[k]] * batch)
        scattered[f"deepstack_embeds_{k}"] = full
    return {**common, **scattered}, {**common, "deepstack_embeds": stacked, "visual_pos_masks": mask}


def check(original: Path, model: onnx.ModelProto) -> float:
    """Max |logits| difference between the pre-scattered original and the routed backbone, same features."""
    plain, routed_feeds = sample()
    want = ort.InferenceSession(str(original), providers=["CPUExecutionProvider"]).run(["logits"], plain)[0]
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        ["logits"], routed_feeds)[0]
    return float(np.abs(want - got).max())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--source", type=Path, default=SOURCE, help=f"pre-scattered backbone (default {SOURCE})")
    parser.add_argument("--out", type=Path, default=TARGET, help=f"where to write (default {TARGET})")
    args = parser.parse_args(argv)
    model = routed(onnx.load(str(args.source)))
    error = check(args.source, model)
    if error > 1e-5:
        print(f"routed backbone differs from the original by {error:.3g}", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(args.out))
    print(f"wrote {args.out} (max |logits difference| vs the pre-scattered backbone {error:.3g})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
