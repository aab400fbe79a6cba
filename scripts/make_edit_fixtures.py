"""Graph-edit fixtures for issue #13 (cases an exporter does not produce on demand), into fixtures/edits/.

- ``per_channel_eps.onnx``: llama_ts with every norm's eps made a per-channel [hidden] vector. Not an RMSNorm
  (``x / sqrt(ms + eps_i)`` does not commute with a rotation): must be refused.
- ``gemma3_ts_fp16.onnx``: the Gemma3 TorchScript export cast to float16 (weights, constants, Casts, graph
  I/O); like the exporter's own output it declares no value_info, so inserted nodes must infer their type.
- ``rotary_free_fused_transpose.onnx``: a hand-built Llama-style decoder without rotary whose two K
  transposes (head split, then K^T) are fused into one ``perm=(0,2,3,1)``.
- ``rotary_free_fused_transpose_gqa.onnx``: the same with 2 KV heads for 4 query heads (repeat_kv on K^T).
- ``fused_qkv_split.onnx``: the same decoder (with separate transposes) whose q/k/v are one MatMul cut by a Split.
- ``mlp_only.onnx``: the same decoder with MLP-only blocks (no attention site: R2/R3 have nothing to do).
- ``fused_qkv_packed.onnx``: one qkv MatMul whose output is reshaped to [b, s, 3, heads, head_dim] and
  cut by Gather along the "3" axis (the packed layout of some test models): no Slice/Split of the columns.

Run from the repository root: ``python scripts/make_edit_fixtures.py`` (only onnx and numpy needed).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
OUT = FIXTURES / "edits"


def per_channel_eps() -> onnx.ModelProto:
    model = onnx.load(str(FIXTURES / "llama_ts.onnx"))
    producers = {o: n for n in model.graph.node for o in n.output}
    hidden = 64
    count = 0
    for node in model.graph.node:
        if node.op_type != "Add" or len(node.input) != 2:
            continue
        mean, eps = (producers.get(name) for name in node.input)
        if mean is None or mean.op_type != "ReduceMean" or eps is None or eps.op_type != "Constant":
            continue
        name = f"{node.name}/per_channel_eps"
        values = np.logspace(-6, 3, hidden, dtype=np.float32)  # large enough to dominate ms
        model.graph.initializer.append(numpy_helper.from_array(values, name))
        node.input[1] = name
        count += 1
    assert count, "no norm eps found"
    return model


def to_float16(model: onnx.ModelProto) -> onnx.ModelProto:
    """Every float32 tensor, constant, Cast target and graph I/O made float16; value_info dropped."""
    half = TensorProto.FLOAT16

    def convert_tensor(tensor: TensorProto) -> None:
        if tensor.data_type == TensorProto.FLOAT:
            values = np.clip(numpy_helper.to_array(tensor), -65504, 65504)  # masks use float32's min: fp16's instead
            tensor.CopyFrom(numpy_helper.from_array(values.astype(np.float16), tensor.name))

    for tensor in model.graph.initializer:
        convert_tensor(tensor)
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                convert_tensor(attr.t)
            if node.op_type == "Cast" and attr.name == "to" and attr.i == TensorProto.FLOAT:
                attr.i = half
            if node.op_type == "ConstantOfShape" and attr.name == "value":
                convert_tensor(attr.t)
    for info in [*model.graph.input, *model.graph.output]:
        if info.type.tensor_type.elem_type == TensorProto.FLOAT:
            info.type.tensor_type.elem_type = half
    del model.graph.value_info[:]
    return model


def gemma3_fp16() -> onnx.ModelProto:
    return to_float16(onnx.load(str(FIXTURES / "exporters" / "gemma3_ts.onnx")))


class _Graph:
    """A tiny helper for building a decoder by hand."""

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.count = 0

    def weight(self, name: str, shape: tuple[int, ...], scale: float = 0.2) -> str:
        self.inits.append(numpy_helper.from_array((self.rng.standard_normal(shape) * scale).astype(np.float32), name))
        return name

    def const(self, name: str, values: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(values, name))
        return name

    def op(self, op: str, inputs: list[str], name: str, outputs: int = 1, **attrs) -> list[str] | str:
        outs = [f"{name}_out{i}" if outputs > 1 else f"{name}_out" for i in range(outputs)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=name, **attrs))
        return outs if outputs > 1 else outs[0]

    def rmsnorm(self, x: str, prefix: str, hidden: int) -> str:
        two, eps = self.const(f"{prefix}.two", np.array(2.0, np.float32)), self.const(
            f"{prefix}.eps", np.array(1e-6, np.float32)
        )
        sq = self.op("Pow", [x, two], f"{prefix}/pow")
        mean = self.op("ReduceMean", [sq], f"{prefix}/mean", axes=[-1], keepdims=1)
        denom = self.op("Sqrt", [self.op("Add", [mean, eps], f"{prefix}/add")], f"{prefix}/sqrt")
        norm = self.op("Div", [x, denom], f"{prefix}/div")
        gamma = self.const(f"{prefix}.weight", (1 + 0.3 * self.rng.standard_normal(hidden)).astype(np.float32))
        return self.op("Mul", [norm, gamma], f"{prefix}/scale")


def rotary_free_decoder(
    *, fused_transpose: bool, fused_qkv: str | None = None, kv_heads: int = 4, seed: int = 0, attention: bool = True
) -> onnx.ModelProto:
    """Llama-style pre-norm decoder without rotary; causal mask omitted (every position sees every other)."""
    hidden, heads, head_dim, inter, vocab, layers = 64, 4, 16, 96, 128, 2
    kv = kv_heads * head_dim
    g = _Graph(seed)
    x = g.op("Gather", [g.weight("embed", (vocab, hidden), 1.0), "input_ids"], "embed/gather")
    split_q = g.const("shape.q", np.array([0, 0, heads, head_dim], np.int64))
    split_kv = g.const("shape.kv", np.array([0, 0, kv_heads, head_dim], np.int64))
    merge = g.const("shape.merge", np.array([0, 0, hidden], np.int64))
    scale = g.const("scale", np.array(np.sqrt(head_dim), np.float32))
    rep = heads // kv_heads
    unsq = g.const("axes.2", np.array([2], np.int64))
    shape5 = g.const("shape.rep5", np.array([1, 1, rep, 1, 1], np.int64))
    shape_k = g.const("shape.rep_k", np.array([0, heads, head_dim, -1], np.int64))  # [b, heads, hd, s]
    shape_v = g.const("shape.rep_v", np.array([0, heads, -1, head_dim], np.int64))  # [b, heads, s, hd]
    for layer in range(layers):
        p = f"layers.{layer}"
        if not attention:  # MLP-only blocks: a decoder with no attention site at all
            h = g.rmsnorm(x, f"{p}/post_norm", hidden)
            up = g.op("MatMul", [h, g.weight(f"{p}.up", (hidden, inter))], f"{p}/up_proj")
            act = g.op("Sigmoid", [up], f"{p}/act")
            down = g.op("MatMul", [act, g.weight(f"{p}.down", (inter, hidden))], f"{p}/down_proj")
            x = g.op("Add", [x, down], f"{p}/res2")
            continue
        h = g.rmsnorm(x, f"{p}/input_norm", hidden)
        if fused_qkv is None:
            q = g.op("MatMul", [h, g.weight(f"{p}.q", (hidden, hidden))], f"{p}/q_proj")
            k = g.op("MatMul", [h, g.weight(f"{p}.k", (hidden, kv))], f"{p}/k_proj")
            v = g.op("MatMul", [h, g.weight(f"{p}.v", (hidden, kv))], f"{p}/v_proj")
        else:
            qkv = g.op("MatMul", [h, g.weight(f"{p}.qkv", (hidden, hidden + 2 * kv))], f"{p}/qkv_proj")
            if fused_qkv == "split":
                sizes = g.const(f"{p}.split", np.array([hidden, kv, kv], np.int64))
                q, k, v = g.op("Split", [qkv, sizes], f"{p}/split", outputs=3, axis=-1)
            else:  # packed: [b, s, 3, heads, head_dim], cut along the "3" axis
                packed = g.const(f"{p}.packed", np.array([0, 0, 3, heads, head_dim], np.int64))
                five = g.op("Reshape", [qkv, packed], f"{p}/packed")
                q, k, v = (
                    g.op("Gather", [five, g.const(f"{p}.pick{i}", np.array(i, np.int64))], f"{p}/pick{i}", axis=2)
                    for i in range(3)
                )
        if fused_qkv == "packed":
            qh, kh, vh = q, k, v
        else:
            qh = g.op("Reshape", [q, split_q], f"{p}/q_split")
            kh = g.op("Reshape", [k, split_kv], f"{p}/k_split")
            vh = g.op("Reshape", [v, split_kv], f"{p}/v_split")
        qt = g.op("Transpose", [qh], f"{p}/q_t", perm=[0, 2, 1, 3])
        vt = g.op("Transpose", [vh], f"{p}/v_t", perm=[0, 2, 1, 3])
        if fused_transpose:
            kt = g.op("Transpose", [kh], f"{p}/k_t", perm=[0, 2, 3, 1])  # [b, kv, hd, s]: both transposes in one
        else:
            k1 = g.op("Transpose", [kh], f"{p}/k_t1", perm=[0, 2, 1, 3])
            kt = g.op("Transpose", [k1], f"{p}/k_t2", perm=[0, 1, 3, 2])
        if kv_heads != heads:  # repeat_kv on [b, kv, a, c]: Unsqueeze, Expand, Reshape to [b, heads, a, c]

            def repeat(t: str, what: str, p: str = p) -> str:
                e = g.op("Expand", [g.op("Unsqueeze", [t, unsq], f"{p}/{what}_unsq"), shape5], f"{p}/{what}_exp")
                return g.op("Reshape", [e, shape_k if what == "k" else shape_v], f"{p}/{what}_rep")

            kt, vt = repeat(kt, "k"), repeat(vt, "v")
        scores = g.op("Div", [g.op("MatMul", [qt, kt], f"{p}/scores"), scale], f"{p}/scaled")
        probs = g.op("Softmax", [scores], f"{p}/softmax", axis=-1)
        ctx = g.op("MatMul", [probs, vt], f"{p}/ctx")
        merged = g.op("Reshape", [g.op("Transpose", [ctx], f"{p}/ctx_t", perm=[0, 2, 1, 3]), merge], f"{p}/merge")
        x = g.op("Add", [x, g.op("MatMul", [merged, g.weight(f"{p}.o", (hidden, hidden))], f"{p}/o_proj")], f"{p}/res1")
        h = g.rmsnorm(x, f"{p}/post_norm", hidden)
        gate = g.op("MatMul", [h, g.weight(f"{p}.gate", (hidden, inter))], f"{p}/gate_proj")
        up = g.op("MatMul", [h, g.weight(f"{p}.up", (hidden, inter))], f"{p}/up_proj")
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate], f"{p}/sig")], f"{p}/silu"), up], f"{p}/act")
        down = g.op("MatMul", [act, g.weight(f"{p}.down", (inter, hidden))], f"{p}/down_proj")
        x = g.op("Add", [x, down], f"{p}/res2")
    h = g.rmsnorm(x, "final_norm", hidden)
    g.nodes.append(helper.make_node("MatMul", [h, g.weight("lm_head", (hidden, vocab))], ["logits"], name="lm_head"))
    graph = helper.make_graph(
        g.nodes,
        "rotary_free",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "sequence", vocab])],
        g.inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model, full_check=True)
    return model


def main() -> None:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    built = {
        "per_channel_eps.onnx": per_channel_eps(),
        "gemma3_ts_fp16.onnx": gemma3_fp16(),
        "rotary_free_fused_transpose.onnx": rotary_free_decoder(fused_transpose=True),
        "rotary_free_fused_transpose_gqa.onnx": rotary_free_decoder(fused_transpose=True, kv_heads=2),
        "fused_qkv_split.onnx": rotary_free_decoder(fused_transpose=False, fused_qkv="split"),
        "fused_qkv_packed.onnx": rotary_free_decoder(fused_transpose=False, fused_qkv="packed"),
        "mlp_only.onnx": rotary_free_decoder(fused_transpose=False, attention=False),
    }
    for name, model in built.items():
        onnx.save(model, str(OUT / name))
        print(f"wrote {OUT / name}")


if __name__ == "__main__":
    main()
