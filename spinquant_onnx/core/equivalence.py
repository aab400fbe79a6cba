"""Numerical equivalence check: run the original and the rotated decoder on the same synthetic inputs.

A SpinQuant rotation must not change the function the model computes, so the check is direct: feed both
models identical inputs (a prefill case, plus a case with a non-empty KV cache when the model has one),
compare every float output by name, and fail on any relative L2 error above the threshold or any change
in the argmax of the logits.
"""

from __future__ import annotations

import contextlib
import functools
import math
import tempfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from spinquant_onnx.errors import InputError, SpinQuantError, ValidationFailedError

ModelLike = str | Path | onnx.ModelProto

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
_ALIASES = {"cpu": CPU, "cuda": CUDA, "gpu": CUDA, "tensorrt": "TensorrtExecutionProvider"}

DEFAULT_VOCAB_SIZE = 64
"""Fallback id range when the vocab cannot be inferred; ids below it are valid for any real embedding."""

_PREFILL_CASE = (1, 8, 0)
# With a KV cache: a chunk after a non-empty past (batch 1: GroupQueryAttention allows no more), then a
# batched single-token decode step.
_PAST_CASES = [(1, 3, 5), (2, 1, 6)]
_PROTOBUF_LIMIT = 2**31 - 1
_TINY = float(np.finfo(np.float64).tiny)
_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.FLOAT16, TensorProto.DOUBLE}


# --------------------------------------------------------------------------------------------- providers


def resolve_providers(requested: Sequence[str] | None = None) -> list[str]:
    """Map short names ("cuda", "cpu") or ORT names to the providers that really work here, CPU last.

    A provider listed by ORT may still fail to load (e.g. CUDA libraries missing), and ORT then silently
    falls back to CPU; probing once up front makes the fallback explicit and the reported provider honest.
    Anything requested after CPU is dropped: CPU claims every node, so later providers would never run.
    """
    names = ["cuda", "cpu"] if requested is None else list(requested)
    resolved: list[str] = []
    for provider in [_canonical_provider(name) for name in names]:  # refuse typos anywhere in the list
        if provider in resolved:
            continue
        if provider == CPU:
            break
        if _provider_loads(provider):
            resolved.append(provider)
    resolved.append(CPU)
    return resolved


def _canonical_provider(name: str) -> str:
    """ORT provider name for an alias or (case-insensitive) ORT name; refuses anything else."""
    key = name.strip().lower()
    if key in _ALIASES:
        return _ALIASES[key]
    by_lower = {p.lower(): p for p in ort.get_all_providers()}
    if key in by_lower:
        return by_lower[key]
    valid = ", ".join([*_ALIASES, *ort.get_all_providers()])
    raise SpinQuantError(f"unknown execution provider {name!r}; valid names: {valid}")


@functools.cache
def _provider_loads(provider: str) -> bool:
    """Whether `provider` is available and a session on it really runs (cached: loading is slow)."""
    if provider not in ort.get_available_providers():
        return False
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "provider_probe",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    try:
        # ORT prints its own fallback notice to stdout; the probe's answer is what matters here.
        # Its logger also reports a missing CUDA library as an error: silence it for the probe only.
        ort.set_default_logger_severity(4)
        with contextlib.redirect_stdout(None):
            session = ort.InferenceSession(
                model.SerializeToString(), _session_options(), providers=[provider, CPU]
            )
            session.run(None, {"x": np.ones(1, dtype=np.float32)})
    except Exception:  # noqa: BLE001 - ORT errors derive from Exception; any failure means "does not load"
        return False
    finally:
        ort.set_default_logger_severity(_default_log_severity)
    return session.get_providers()[0] == provider


_default_log_severity = 2  # onnxruntime's own default (warnings and above)


def quiet_runtime_logs(severity: int = 4) -> None:
    """Keep onnxruntime's own log lines (colored ``[E:onnxruntime:...]``) off stderr: the command line
    reports every failure itself, once, as one line."""
    global _default_log_severity
    _default_log_severity = severity
    ort.set_default_logger_severity(severity)


# ------------------------------------------------------------------------------------------------ inputs


def synthesize_inputs(
    model: onnx.ModelProto,
    *,
    batch: int = 1,
    seq: int = 8,
    past: int = 0,
    seed: int = 0,
    vocab_size: int | None = None,
    dims: dict[str, int] | None = None,
) -> dict[str, np.ndarray]:
    """Deterministic feeds for every real graph input of a decoder export.

    ``dims`` fixes named symbolic dims the names alone do not explain (the genai builder's
    ``kv_cache_dim`` is the head size, say); the caller knows them from the matched graph.

    Symbolic dims are resolved by name (batch / past / total / sequence; unknown -> seq), the
    attention_mask's last dim is always past+seq. Ids are drawn from [0, vocab_size): pass the real vocab
    (see `infer_vocab_size`) so the whole embedding is exercised; the default of 64 is merely safe.
    Each input gets its own generator seeded from (seed, name), so values do not depend on input order.
    """
    if min(batch, seq) < 1 or past < 0:
        raise InputError(f"need batch >= 1, seq >= 1, past >= 0 (got batch={batch} seq={seq} past={past})")
    vocab = DEFAULT_VOCAB_SIZE if vocab_size is None else vocab_size
    if vocab < 1:
        raise InputError(f"vocab_size must be positive, got {vocab}")
    feeds: dict[str, np.ndarray] = {}
    for value_info in _real_inputs(model):
        shape = _input_shape(value_info, batch=batch, seq=seq, past=past, named=dims or {})
        rng = np.random.default_rng([seed, zlib.crc32(value_info.name.encode())])
        feeds[value_info.name] = _input_value(value_info, shape, rng, seq=seq, past=past, vocab=vocab)
    return feeds


def _real_inputs(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """Graph inputs that need a feed (old exports also list initializers as inputs)."""
    initializers = {init.name for init in model.graph.initializer}
    return [vi for vi in model.graph.input if vi.name not in initializers]


def _input_shape(
    value_info: onnx.ValueInfoProto, *, batch: int, seq: int, past: int, named: dict[str, int]
) -> tuple[int, ...]:
    """Concrete shape: fixed dims as given, symbolic ones by name."""
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        raise InputError(f"graph input {value_info.name!r} has no shape; cannot synthesize a value for it")
    dims = list(tensor_type.shape.dim)
    shape = []
    for axis, dim in enumerate(dims):
        if dim.HasField("dim_value"):
            shape.append(dim.dim_value)
        elif dim.dim_param in named:
            shape.append(named[dim.dim_param])
        elif _is_attention_mask(value_info.name) and axis == len(dims) - 1:
            shape.append(past + seq)
        else:
            shape.append(_symbolic_dim(dim.dim_param, batch=batch, seq=seq, past=past))
    return tuple(shape)


def _symbolic_dim(param: str, *, batch: int, seq: int, past: int) -> int:
    """Size for a named dim; handles sums like "past_sequence_length + 1"."""
    name = param.strip().lower()
    if "+" in name:
        return sum(_symbolic_dim(part, batch=batch, seq=seq, past=past) for part in name.split("+"))
    if name.isdigit():
        return int(name)
    if "batch" in name:
        return batch
    if "past" in name:
        return past
    if "total" in name or "all" in name:
        return past + seq
    return seq  # "sequence", "seq" and anything unknown


def _is_attention_mask(name: str) -> bool:
    return "attention_mask" in name.lower()


def _input_value(
    value_info: onnx.ValueInfoProto,
    shape: tuple[int, ...],
    rng: np.random.Generator,
    *,
    seq: int,
    past: int,
    vocab: int,
) -> np.ndarray:
    """One input's value, chosen by its name and element type."""
    elem_type = value_info.type.tensor_type.elem_type
    name = value_info.name.lower()
    if elem_type == TensorProto.BFLOAT16 or elem_type not in _NP_TYPES:
        type_name = TensorProto.DataType.Name(elem_type)
        raise InputError(f"graph input {value_info.name!r} has unsupported element type {type_name}")
    dtype = _NP_TYPES[elem_type]
    if elem_type in _FLOAT_TYPES:
        return rng.standard_normal(shape).astype(dtype)
    if elem_type == TensorProto.BOOL:
        if "mask" in name:  # a selection mask (Qwen3-VL's visual_pos_masks): both branches get exercised
            return rng.random(shape) < 0.5
        # Merged decoders (optimum) take `use_cache_branch`: the with-past branch is the one to test.
        return np.full(shape, past > 0 and "cache" in name, dtype=dtype)
    if "input_ids" in name:
        return rng.integers(0, vocab, size=shape).astype(dtype)
    if _is_attention_mask(name):
        return np.ones(shape, dtype=dtype)
    if "position_ids" in name or "cache_position" in name:
        last = shape[-1] if shape else 1
        positions = np.arange(past, past + last, dtype=dtype)
        return np.broadcast_to(positions if shape else positions[0], shape).copy()
    return np.zeros(shape, dtype=dtype)


_NP_TYPES: dict[int, np.dtype] = {
    t: np.dtype(helper.tensor_dtype_to_np_dtype(t))
    for t in (
        TensorProto.FLOAT,
        TensorProto.FLOAT16,
        TensorProto.DOUBLE,
        TensorProto.INT64,
        TensorProto.INT32,
        TensorProto.INT16,
        TensorProto.INT8,
        TensorProto.UINT8,
        TensorProto.BOOL,
    )
}


def has_past_inputs(model: onnx.ModelProto) -> bool:
    """Whether the decoder takes a KV cache (an input named or dimensioned "past")."""
    for value_info in _real_inputs(model):
        if "past" in value_info.name.lower():
            return True
        if any("past" in d.dim_param.lower() for d in value_info.type.tensor_type.shape.dim):
            return True
    return False


def infer_vocab_size(model: onnx.ModelProto) -> int | None:
    """Token-id range to sample from, or None when the graph does not say.

    Candidates are the static last dim of the logits output and the row count of the largest 2-D
    initializer a Gather reads as its data (the embedding table); the smaller one wins, so every sampled
    id is a valid embedding row even when lm_head is padded beyond the embedding.
    """
    candidates = []
    logits = _logits_value_info(model)
    if logits is not None:
        dims = logits.type.tensor_type.shape.dim
        if dims and dims[-1].HasField("dim_value") and dims[-1].dim_value > 0:
            candidates.append(dims[-1].dim_value)
    gathered = {node.input[0] for node in model.graph.node if node.op_type == "Gather" and node.input}
    tables = [init for init in model.graph.initializer if init.name in gathered and len(init.dims) == 2]
    if tables:
        embedding = max(tables, key=lambda init: init.dims[0] * init.dims[1])
        candidates.append(int(embedding.dims[0]))
    return min(candidates) if candidates else None


def _logits_value_info(model: onnx.ModelProto) -> onnx.ValueInfoProto | None:
    outputs = list(model.graph.output)
    named = [o for o in outputs if o.name == "logits"]
    return named[0] if named else (outputs[0] if outputs else None)


# --------------------------------------------------------------------------------------------- sessions


def _session_options() -> ort.SessionOptions:
    """Default graph optimizations (fast); ORT logs nothing below fatal: errors reach the user once, as ours."""
    options = ort.SessionOptions()
    options.log_severity_level = 4
    return options


@contextlib.contextmanager
def open_session(model: ModelLike, providers: Sequence[str] | None = None) -> Iterator[ort.InferenceSession]:
    """An ORT session for a path or an in-memory model; temp files live exactly as long as the session.

    Paths go straight to ORT so external data next to the file loads. A proto over the 2 GB protobuf
    limit, or one holding external-data tensors, is first saved with external data to a temp dir.
    """
    resolved = resolve_providers(providers)
    with contextlib.ExitStack() as stack:
        if isinstance(model, onnx.ModelProto):
            if _needs_file(model):
                tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="spinquant_validate_")))
                source: str | bytes = _save_with_external_data(model, tmp)
            else:
                source = model.SerializeToString()
        else:
            path = Path(model)
            if not path.is_file():
                raise InputError(f"model file not found: {path}")
            source = str(path)
        try:
            session = ort.InferenceSession(source, _session_options(), providers=resolved)
        except Exception as exc:  # ORT raises several unrelated types
            raise InputError(f"onnxruntime cannot load {_describe(model)}: {exc}") from exc
        yield session


def _needs_file(model: onnx.ModelProto) -> bool:
    """Whether the proto cannot be handed to ORT as serialized bytes."""
    if any(_is_external(t) for t in _all_tensors(model)):
        return True
    try:
        return model.ByteSize() > _PROTOBUF_LIMIT
    except Exception:  # noqa: BLE001 - some protobuf backends refuse to size a > 2 GB message
        return True


def _is_external(tensor: onnx.TensorProto) -> bool:
    return tensor.HasField("data_location") and tensor.data_location == TensorProto.EXTERNAL


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor attributes (e.g. Constant), including those in subgraphs."""
    yield from _graph_tensors(model.graph)


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for subgraph in attr.graphs:
                yield from _graph_tensors(subgraph)


def _save_with_external_data(model: onnx.ModelProto, directory: Path) -> str:
    """Save to `directory` with weights in a side file; refuses references whose bytes are not loaded."""
    unloaded = [t.name for t in _all_tensors(model) if _is_external(t) and not t.HasField("raw_data")]
    if unloaded:
        raise InputError(
            f"in-memory model references external data that was not loaded (e.g. {unloaded[0]!r}); "
            "pass the model path instead, or load it with onnx.load(..., load_external_data=True)"
        )
    path = directory / "model.onnx"
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    onnx.save_model(copy, str(path), save_as_external_data=True, location="model.onnx.data")
    return str(path)


def _describe(model: ModelLike) -> str:
    return "the in-memory model" if isinstance(model, onnx.ModelProto) else str(model)


def run_model(
    model_or_path: ModelLike, feeds: Mapping[str, np.ndarray], providers: Sequence[str] | None = None
) -> tuple[dict[str, np.ndarray], str]:
    """Run once; returns outputs by name and the provider that actually ran."""
    with open_session(model_or_path, providers) as session:
        return _run(session, feeds, model_or_path), session.get_providers()[0]


def _run(session: ort.InferenceSession, feeds: Mapping[str, np.ndarray], model: ModelLike) -> dict[str, Any]:
    names = [o.name for o in session.get_outputs()]
    try:
        values = session.run(names, dict(feeds))
    except Exception as exc:  # ORT raises several unrelated types
        raise InputError(f"onnxruntime failed to run {_describe(model)}: {exc}") from exc
    return dict(zip(names, values, strict=True))


# ------------------------------------------------------------------------------------------- comparison


@dataclass
class OutputDiff:
    """Worst-case difference of one output over all cases."""

    name: str
    max_abs: float
    rel_l2: float
    argmax_agreement: float | None = None  # only for the logits output


@dataclass
class ValidationResult:
    """Outcome of `compare_models`; headline numbers are those of the logits output."""

    provider: str
    outputs: list[OutputDiff]
    max_abs: float
    rel_l2: float
    argmax_agreement: float
    threshold: float
    passed: bool
    cases: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain dict for JSON reports (non-finite floats stay floats; json.dumps writes them as Infinity)."""
        return asdict(self)


def compare_models(
    original: ModelLike,
    rotated: ModelLike,
    *,
    providers: Sequence[str] | None = None,
    threshold: float = 1e-4,
    seed: int = 0,
    vocab_size: int | None = None,
    dims: dict[str, int] | None = None,
    own_cache: bool = False,
) -> ValidationResult:
    """Run both models on identical synthetic inputs and compare every float output by name.

    Passes when every float output's worst-case relative L2 error is <= threshold and the logits' argmax
    agrees everywhere. The models run one after the other, so only one is in memory at a time.
    With a KV cache, a prefill is followed by decode steps in which each model is fed its *own* cache.
    ``own_cache`` says the caches legitimately differ (R2 rotates values, R3 keys): then ``present.*``
    outputs and random-past cases are not compared, only logits along the decode.
    Raises ValidationFailedError when the two models do not even have the same inputs or outputs.
    """
    graph = _graph_only(original)
    if vocab_size is None:
        vocab_size = infer_vocab_size(graph)
    kv = has_past_inputs(graph)
    cases = [_PREFILL_CASE, *_PAST_CASES] if kv and not own_cache else [_PREFILL_CASE]
    feeds = [
        synthesize_inputs(graph, batch=b, seq=s, past=p, seed=seed, vocab_size=vocab_size, dims=dims)
        for b, s, p in cases
    ]
    labels = [f"batch={b} seq={s} past={p}" for b, s, p in cases]
    expected, provider_a = _run_cases(original, "original", feeds, labels, providers)
    actual, provider_b = _run_cases(rotated, "rotated", feeds, labels, providers, set(feeds[0]))
    _check_same_outputs(expected[0], actual[0])

    logits_name = _logits_name(graph, expected[0])
    compared = [n for n in expected[0] if _is_float(expected[0][n]) and not (own_cache and n.startswith("present"))]
    if kv:
        steps = _decode(original, graph, feeds[0], expected[0], logits_name, providers, seed, vocab_size, dims)
        mine = _decode(rotated, graph, feeds[0], actual[0], logits_name, providers, seed, vocab_size, dims)
        if steps is not None and mine is not None:
            expected += [{logits_name: out} for out in steps]
            actual += [{logits_name: out} for out in mine]
            labels = [*labels, f"{len(steps)} decode steps, each model on its own cache"]
    diffs = [
        _diff_output(
            name,
            [e[name] for e in expected if name in e],
            [a[name] for a in actual if name in a],
            name == logits_name,
        )
        for name in compared
    ]
    headline = next(d for d in diffs if d.name == logits_name)
    agreement = 1.0 if headline.argmax_agreement is None else headline.argmax_agreement
    passed = all(d.rel_l2 <= threshold for d in diffs) and agreement == 1.0
    provider = provider_a if provider_a == provider_b else f"{provider_a} (original) / {provider_b} (rotated)"
    return ValidationResult(
        provider=provider,
        outputs=diffs,
        max_abs=headline.max_abs,
        rel_l2=headline.rel_l2,
        argmax_agreement=agreement,
        threshold=threshold,
        passed=passed,
        cases=labels,
    )


DECODE_STEPS = 2


def _decode(
    model: ModelLike,
    graph: onnx.ModelProto,
    first: dict[str, np.ndarray],
    prefill: dict[str, np.ndarray],
    logits: str,
    providers: Sequence[str] | None,
    seed: int,
    vocab_size: int | None,
    dims: dict[str, int] | None,
) -> list[np.ndarray] | None:
    """Logits of single-token steps after ``prefill``, feeding back the model's own ``present.*`` outputs."""
    inputs = {vi.name for vi in _real_inputs(graph)}
    cache = {name.replace("present", "past_key_values"): name for name in prefill if name.startswith("present")}
    if not cache or not set(cache) <= inputs:
        return None  # cache outputs that do not map onto the inputs by name: nothing to feed back
    batch = next(iter(first.values())).shape[0]
    total = _PREFILL_CASE[1]
    outputs, results = prefill, []
    with open_session(model, providers) as session:
        for step in range(DECODE_STEPS):
            feed = synthesize_inputs(graph, batch=batch, seq=1, past=total, seed=seed + 1 + step,
                                     vocab_size=vocab_size, dims=dims)
            feed.update({past: outputs[present] for past, present in cache.items()})
            outputs = _run(session, feed, model)
            results.append(outputs[logits])
            total += 1
    return results


def _graph_only(model: ModelLike) -> onnx.ModelProto:
    """The graph structure (no external weight bytes) for input synthesis and vocab inference."""
    if isinstance(model, onnx.ModelProto):
        return model
    path = Path(model)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises several unrelated types
        raise InputError(f"cannot parse ONNX model {path}: {exc}") from exc


def _run_cases(
    model: ModelLike,
    role: str,
    feeds: list[dict[str, np.ndarray]],
    labels: list[str],
    providers: Sequence[str] | None,
    expected_inputs: set[str] | None = None,
) -> tuple[list[dict[str, np.ndarray]], str]:
    """Outputs for every case from one session (so only one model is loaded at a time).

    Errors name the role and case, since two in-memory models are otherwise indistinguishable.
    """
    try:
        with open_session(model, providers) as session:
            got = {i.name for i in session.get_inputs()}
            if expected_inputs is not None and got != expected_inputs:
                raise ValidationFailedError(
                    "rotated model inputs differ from the original: "
                    f"missing {sorted(expected_inputs - got)}, extra {sorted(got - expected_inputs)}"
                )
            outputs = []
            for feed, label in zip(feeds, labels, strict=True):
                try:
                    outputs.append(_run(session, feed, model))
                except InputError as exc:
                    raise InputError(f"{exc} (case {label})") from exc
            return outputs, session.get_providers()[0]
    except InputError as exc:
        raise InputError(f"{role} model: {exc}") from exc


def _check_same_outputs(expected: Mapping[str, np.ndarray], actual: Mapping[str, np.ndarray]) -> None:
    if set(expected) != set(actual):
        raise ValidationFailedError(
            "rotated model outputs differ from the original: "
            f"missing {sorted(set(expected) - set(actual))}, extra {sorted(set(actual) - set(expected))}"
        )


def _logits_name(graph: onnx.ModelProto, outputs: Mapping[str, np.ndarray]) -> str:
    """The output named "logits", else the first float output."""
    if "logits" in outputs and _is_float(outputs["logits"]):
        return "logits"
    for value_info in graph.graph.output:
        if value_info.name in outputs and _is_float(outputs[value_info.name]):
            return value_info.name
    raise InputError("model has no float output to compare")


def _is_float(value: np.ndarray) -> bool:
    return np.issubdtype(np.asarray(value).dtype, np.floating)


def _diff_output(name: str, expected: list[Any], actual: list[Any], is_logits: bool) -> OutputDiff:
    """Worst case over cases of max |a-b|, relative L2 and (for logits) argmax agreement."""
    max_abs, rel_l2, agreement = 0.0, 0.0, 1.0
    for a, b in zip(expected, actual, strict=True):
        case_abs, case_rel = _errors(np.asarray(a), np.asarray(b))
        max_abs, rel_l2 = max(max_abs, case_abs), max(rel_l2, case_rel)
        if is_logits:
            agreement = min(agreement, argmax_agreement(np.asarray(a), np.asarray(b)))
    return OutputDiff(name, max_abs, rel_l2, agreement if is_logits else None)


def _errors(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(max abs, relative L2) in float64; a shape mismatch or a new NaN/inf counts as infinite error."""
    if a.shape != b.shape:
        return math.inf, math.inf
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    same = (a64 == b64) | (np.isnan(a64) & np.isnan(b64))  # equal infs / shared NaNs are not an error
    diff = np.where(same, 0.0, a64 - b64)
    if not np.all(np.isfinite(diff)):
        return math.inf, math.inf
    if diff.size == 0:
        return 0.0, 0.0
    reference = float(np.linalg.norm(np.where(np.isfinite(a64), a64, 0.0)))
    return float(np.max(np.abs(diff))), float(np.linalg.norm(diff)) / max(reference, _TINY)


def argmax_agreement(a: np.ndarray, b: np.ndarray) -> float:
    """Fraction of positions whose argmax over the last axis (the vocab) is the same."""
    if a.shape != b.shape:
        return 0.0
    if a.size == 0:
        return 1.0
    return float(np.mean(np.argmax(a, axis=-1) == np.argmax(b, axis=-1)))
