"""The rotated, fake-quantized model as a torch function of the learned rotations.

Quantizers go where ``eval``'s W8A8 puts them: on both inputs of every MatMul whose weight is an
initializer, except lm_head and the online nodes (rotations, float-channel side paths), which stay float,
as deployed. The rotations are parametrized on the orthogonal group: ``R = R0 · cayley(A - A^T)``, so
any step of any optimizer stays exactly orthogonal and ``A = 0`` is the Hadamard start.
"""

from __future__ import annotations

import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from spinquant_onnx.core.equivalence import infer_vocab_size
from spinquant_onnx.integrations.learn.interpreter import TorchGraph, to_torch
from spinquant_onnx.integrations.learn.quantizers import Scheme, activation_range
from spinquant_onnx.integrations.learn.weights import (
    LearnedTensor,
    LearningPlan,
    Resolver,
    learned_tensors,
    plan_learning,
)
from spinquant_onnx.integrations.quantize import lm_head_nodes, name_nodes
from spinquant_onnx.io.model_file import load_model
from spinquant_onnx.match.analysis import analyze
from spinquant_onnx.rewrite.online import online_node_names


def cayley(skew: torch.Tensor) -> torch.Tensor:
    """(I - S/2)^-1 (I + S/2): orthogonal for every skew-symmetric S, the identity at S = 0."""
    eye = torch.eye(skew.shape[0], dtype=skew.dtype)
    return torch.linalg.solve(eye - skew / 2, eye + skew / 2)


class Rotations(torch.nn.Module):
    """The learned matrices: one free parameter A per rotation, R = R0 · cayley(A - A^T)."""

    def __init__(self, starts: dict[str, np.ndarray], learn: set[str]):
        super().__init__()
        self.keys = list(starts)
        self.learn = learn
        for number, key in enumerate(self.keys):
            self.register_buffer(f"start{number}", torch.from_numpy(starts[key].astype(np.float64)))
        self.params = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(starts[k].shape, dtype=torch.float32)) for k in self.keys]
        )
        for key, param in zip(self.keys, self.params, strict=True):
            param.requires_grad_(key in learn)

    def matrices(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        out = {}
        for number, (key, param) in enumerate(zip(self.keys, self.params, strict=True)):
            start = getattr(self, f"start{number}").to(dtype)
            a = param.to(dtype)
            out[key] = start @ cayley(a - a.T) if key in self.learn else start
        return out

    def starts(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """The starting matrices (A = 0)."""
        return {key: getattr(self, f"start{n}").to(dtype) for n, key in enumerate(self.keys)}

    def final(self) -> dict[str, np.ndarray]:
        """The matrices in float64 (orthogonal to ~1e-15), for the rotation file."""
        with torch.no_grad():
            return {key: m.numpy() for key, m in self.matrices(torch.float64).items()}


OUTPUT = -1  # the slot of a MatMul's output in a Ranges key
Ranges = dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]]  # (id(MatMul), input slot) -> (min, max)


@dataclass
class _Uses:
    quantized: set[int]  # id(node) of MatMuls with a constant weight: activation and weight fake-quantized
    both: set[int]  # id(node) of MatMuls of two activations (attention): both quantized as activations
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]]


def _uses(model: onnx.ModelProto, skip: set[str]) -> _Uses:
    initializers = {t.name for t in model.graph.initializer}
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    quantized, both = set(), set()
    for node in model.graph.node:
        for slot, name in enumerate(node.input):
            consumers[name].append((node, slot))
        if node.op_type == "MatMul" and node.name not in skip:
            (quantized if node.input[1] in initializers else both).add(id(node))
    return _Uses(quantized, both, consumers)


class _Hooks:
    """The interpreter hooks of one forward pass: learned ops moved to the activation side, and fake
    quantizers at every site eval's ``quantize_static`` QDQ puts them, with each batch's ranges, ``static``
    calibrated ones, or (``observed`` is a dict: calibrating) none, the float ranges recorded instead."""

    def __init__(
        self,
        resolver: Resolver,
        scheme: Scheme,
        matrices: dict[str, torch.Tensor],
        static: Ranges | None,
        observed: Ranges | None,
    ):
        self.resolver, self.scheme, self.matrices = resolver, scheme, matrices
        self.static, self.observed = static, observed

    def _observe(self, key: tuple[int, int], x: torch.Tensor) -> None:
        """Widen the range recorded for this site (the model stays float, as onnxruntime's calibrator runs it)."""
        low, high = activation_range(x.detach())
        seen = self.observed.get(key)
        if seen is not None:
            low, high = torch.minimum(low, seen[0]), torch.maximum(high, seen[1])
        self.observed[key] = (low, high)

    def _quantize(self, key: tuple[int, int], x: torch.Tensor) -> torch.Tensor:
        if self.observed is not None:
            self._observe(key, x)
            return x
        return self.scheme.activation(x, None if self.static is None else self.static[key])

    def rows(self, tensor: LearnedTensor):
        def run(outputs: list) -> list:
            y = outputs[0]
            for op in tensor.ops:  # the table's axis 1 is the gathered rows' last axis
                y = self.resolver.rotate(y, -1, op.rotation, op.kind == "rotate_t", self.matrices)
            return [y]

        return run

    def inputs(self, node_id: int, tensors: list[LearnedTensor], quantize: bool):
        """A linear's input (learned ops moved onto it) and, when quantized, its activation and weight."""

        def run(args: list) -> list:
            x = args[0]
            for tensor in tensors:
                for op in reversed(tensor.ops):
                    x = self.resolver.apply_to_input(x, op, self.matrices)
            if not quantize:
                return [x, *args[1:]]
            x = self._quantize((node_id, 0), x)
            weight = args[1] if self.observed is not None else self.scheme.weight(args[1])
            return [x, weight, *args[2:]]

        return run

    def activations(self, node_id: int):
        """quantize_static also puts QDQ on both inputs of an attention MatMul (q·kᵀ, p·v) ..."""
        return lambda args: [self._quantize((node_id, 0), args[0]), self._quantize((node_id, 1), args[1]), *args[2:]]

    def output(self, node_id: int):
        """... and on every quantized MatMul's output (QLinearMatMul's uint8 result)."""
        return lambda outputs: [self._quantize((node_id, OUTPUT), outputs[0])]


class QuantModel:
    """The model's graph in torch, its weights functions of ``rotations``, quantized by ``scheme``."""

    def __init__(
        self,
        path: str | os.PathLike,
        scheme: Scheme,
        learn: set[str],
        r4: bool,
        seed: int,
        float_channels: int = 0,
        maxima: dict[str, np.ndarray] | None = None,
    ):
        path = Path(path)
        model = load_model(path)
        name_nodes(model)
        analysis = analyze(model, path.parent)
        self.scheme = scheme
        self.learning: LearningPlan = plan_learning(analysis, "r2" in learn, r4, seed, float_channels, maxima)
        self.layers = sorted(int(k.split(".")[2]) for k in self.learning.starts if k != "R1")
        self.resolver = Resolver(self.learning.markers)
        store = analysis.store
        constants, self.learned = learned_tensors(self.learning, store.array, self.resolver)
        for tensor in model.graph.initializer:
            if tensor.name not in constants and tensor.name not in self.learned and tensor.name in store:
                constants[tensor.name] = to_torch(store.array(tensor.name))
        keys = {"R1"} if "r1" in learn else set()
        keys |= {k for k in self.learning.starts if k != "R1"} if "r2" in learn else set()
        self.rotations = Rotations(self.learning.starts, keys)
        uses = _uses(model, set(lm_head_nodes(analysis)) | set(online_node_names(model)))
        self.input_names = [i.name for i in model.graph.input]
        self.vocab_size = infer_vocab_size(model)
        self.graph = TorchGraph(model.graph, constants, [model.graph.output[0].name])
        self.input_hooks: dict[int, list] = defaultdict(list)
        self.output_hooks: dict[int, list] = {}
        self.materialized: list[LearnedTensor] = []
        for tensor in self.learned.values():
            self._place(tensor, uses)
        self.quantized, self.both = uses.quantized, uses.both
        self._observed: Ranges | None = None
        self._float_weights: dict[str, torch.Tensor] | None = None

    def _place(self, tensor: LearnedTensor, uses: _Uses) -> None:
        """Where a learned tensor's ops run: on gathered rows, on a float linear's input, or on the weight."""
        readers = uses.consumers.get(tensor.name, [])
        if len(readers) == 1 and tensor.base.ndim == 2:
            node, slot = readers[0]
            if node.op_type == "Gather" and slot == 0 and not node.attribute and tensor.axes() == {1}:
                self.graph.constants[tensor.name] = tensor.base
                self.output_hooks[id(node)] = ("rows", tensor)
                return
            if node.op_type == "MatMul" and slot == 1 and id(node) not in uses.quantized and tensor.axes() == {0}:
                self.graph.constants[tensor.name] = tensor.base
                self.input_hooks[id(node)].append(("input", tensor))
                return
        self.materialized.append(tensor)

    def _hooks(
        self, matrices: dict[str, torch.Tensor], quantize: bool, static: Ranges | None = None
    ) -> tuple[dict, dict]:
        hooks = _Hooks(self.resolver, self.scheme, matrices, static, self._observed)
        input_hooks = {}
        quantized = self.quantized if quantize else set()
        for node_id in set(self.input_hooks) | quantized:
            tensors = [t for _, t in self.input_hooks.get(node_id, [])]
            input_hooks[node_id] = hooks.inputs(node_id, tensors, node_id in quantized)
        for node_id in self.both if quantize else ():
            input_hooks[node_id] = hooks.activations(node_id)
        output_hooks = {node_id: hooks.rows(tensor) for node_id, (_, tensor) in self.output_hooks.items()}
        for node_id in (self.quantized | self.both) if quantize else ():
            output_hooks[node_id] = hooks.output(node_id)
        return input_hooks, output_hooks

    def weights(self, matrices: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for tensor in self.materialized:
            value = tensor.base
            for op in tensor.ops:
                value = self.resolver.apply(value, op, matrices)
            out[tensor.name] = value
        return out

    def feeds(self, windows: np.ndarray) -> dict[str, torch.Tensor]:
        ids = torch.from_numpy(np.ascontiguousarray(windows, dtype=np.int64))
        feeds = {}
        for name in self.input_names:
            if name == "input_ids":
                feeds[name] = ids
            elif name == "attention_mask":
                feeds[name] = torch.ones_like(ids)
            elif name == "position_ids":
                feeds[name] = torch.arange(ids.shape[1], dtype=torch.int64).expand_as(ids)
        return feeds

    def logits(
        self,
        windows: np.ndarray,
        quantize: bool = True,
        static: Ranges | None = None,
        weights: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Logits of the rotated model; quantized with each batch's ranges, or ``static`` calibrated ones.
        ``weights`` (``self.weights(self.rotations.matrices())``) may be passed in to reuse them."""
        matrices = self.rotations.matrices()
        input_hooks, output_hooks = self._hooks(matrices, quantize, static)
        weights = self.weights(matrices) if weights is None else weights
        return self.graph.run(self.feeds(windows), weights, input_hooks, output_hooks)[0]

    def float_logits(self, windows: np.ndarray) -> torch.Tensor:
        """The float model's logits (the distillation target): any rotation leaves them unchanged, so the
        starting rotations' weights are computed once and reused."""
        with torch.no_grad():
            matrices = self.rotations.starts()
            if self._float_weights is None:
                self._float_weights = self.weights(matrices)
            input_hooks, output_hooks = self._hooks(matrices, quantize=False)
            return self.graph.run(self.feeds(windows), self._float_weights, input_hooks, output_hooks)[0]

    def calibrate(self, windows: np.ndarray, weights: dict[str, torch.Tensor] | None = None) -> Ranges:
        """Static activation ranges as ``quantize_static``'s MinMax calibrator finds them: min/max of each
        quantized linear's input over the float (rotated) model on ``windows``, one window at a time."""
        self._observed = {}
        try:
            with torch.no_grad():
                for window in windows:
                    self.logits(window[None], weights=weights)
            return self._observed
        finally:
            self._observed = None

    def loss(
        self,
        windows: np.ndarray,
        quantize: bool = True,
        static: Ranges | None = None,
        kind: str = "ce",
        weights: dict[str, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Mean over the windows' next-token predictions of cross-entropy (``ce``) or of the KL divergence
        from the float model's distribution (``kl``, distillation: a target for every vocabulary entry)."""
        logits = self.logits(windows, quantize, static, weights)
        scores = logits[:, :-1].reshape(-1, logits.shape[-1]).float()
        if kind == "kl":
            target = self.float_logits(windows)[:, :-1].reshape(-1, logits.shape[-1]).float()
            return torch.nn.functional.kl_div(
                torch.log_softmax(scores, -1), torch.log_softmax(target, -1), reduction="batchmean", log_target=True
            )
        targets = torch.from_numpy(np.ascontiguousarray(windows[:, 1:], dtype=np.int64))
        return torch.nn.functional.cross_entropy(scores, targets.reshape(-1))
