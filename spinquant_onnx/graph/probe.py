"""The graph's actual shapes: one onnxruntime run on a tiny input with distinct sizes, every tensor recorded.

Exporters state head geometry in many ways (constant Reshape targets, shapes computed from ``Shape`` ops at
run time, repeat_kv through Expand, sdpa decompositions that flatten batch and heads), and static shape
inference leaves most of those dims unknown. Running the model once on batch 2, sequence 3 (and a past of 5
where it takes a KV cache) gives every intermediate tensor a concrete shape, in which head_dim, the head
counts and the batch/sequence axes are all different numbers. The matcher proves head_dim blocks intact
from these shapes (``match/head_paths.py``); nothing is guessed from local patterns.

The probe runs a copy of the graph (weights are shared, never copied: external data is read from the
model's folder) with every node output added as a graph output. AIMET's quantizer nodes run as Identity.
A model onnxruntime cannot run gives no shapes (``{}``), and every proof that needs one is then refused.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper

from spinquant_onnx.graph.feeds import DEFAULT_VOCAB_SIZE, synthesize_inputs
from spinquant_onnx.graph.index import GraphIndex

PROBE_BATCH, PROBE_SEQ, PROBE_PAST = 2, 3, 5
Shapes = dict[str, tuple[int, ...]]
_AS_IDENTITY = {"QcQuantizeOp"}


def _has_past(model: onnx.ModelProto) -> bool:
    return any("past" in i.name.lower() for i in model.graph.input)


def _vocab(model: onnx.ModelProto) -> int:
    """Ids below the smallest gathered 2-D table's row count (the embedding), at most the safe default."""
    gathered = {n.input[0] for n in model.graph.node if n.op_type == "Gather" and n.input}
    rows = [int(t.dims[0]) for t in model.graph.initializer if t.name in gathered and len(t.dims) == 2]
    return min([DEFAULT_VOCAB_SIZE, *rows])


def probe_copy(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """The graph with every node output exposed (quantizer nodes as Identity) and the names exposed."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    outputs = {o.name for o in graph.output}
    names = []
    for node in graph.node:
        if node.op_type in _AS_IDENTITY:
            node.op_type, node.domain = "Identity", ""
            del node.input[1:], node.attribute[:]
        names += [o for o in node.output if o and o not in outputs]
    del graph.value_info[:]  # a stale declared shape must not override the run
    graph.output.extend(helper.make_empty_tensor_value_info(n) for n in names)
    return copy, names


def probe_shapes(model: onnx.ModelProto, base_dir: str | Path | None) -> Shapes:
    """Every tensor's shape on one run (batch 2, sequence 3, past 5; batch 1 where an op allows no more).

    ``{}`` when onnxruntime cannot run the model on synthesized inputs.
    """
    import onnxruntime as ort

    copy, _ = probe_copy(model)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    with contextlib.ExitStack() as stack:
        folder = Path(base_dir) if base_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(folder))
        try:
            session = ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])
        except Exception:  # ORT raises several unrelated types; no shapes means every proof is refused
            return {}
        names = [o.name for o in session.get_outputs()]
        for batch in (PROBE_BATCH, 1):
            try:
                feeds = synthesize_inputs(
                    model,
                    batch=batch,
                    seq=PROBE_SEQ,
                    past=PROBE_PAST if _has_past(model) else 0,
                    vocab_size=_vocab(model),
                )
                values = session.run(names, feeds)
            except Exception:  # an input the synthesizer cannot feed, or an op refusing these sizes
                continue
            shapes = {name: tuple(int(d) for d in np.shape(v)) for name, v in zip(names, values, strict=True)}
            shapes.update({name: tuple(int(d) for d in np.shape(v)) for name, v in feeds.items()})
            return shapes
    return {}


def graph_shapes(index: GraphIndex) -> Shapes:
    """``probe_shapes`` of the index's graph, once per graph state."""
    return index.cached("probe_shapes", lambda: probe_shapes(index.model, index.store.base_dir))


def shape_of(index: GraphIndex, name: str) -> tuple[int, ...] | None:
    """A tensor's probed shape, else its fully static declared shape, else None."""
    if name in index.store:
        return index.store.shape(name)
    found = graph_shapes(index).get(name)
    if found is not None:
        return found
    static = index.static_shape(name)
    return static if static is not None and all(d is not None for d in static) else None
