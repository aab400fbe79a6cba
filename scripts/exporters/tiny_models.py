"""Tiny random-init decoders shared by every exporter script (system env and the exporter venvs).

Kept free of anything newer than transformers 4.57 so that the optimum venv (transformers<4.58) and the
system env (transformers 5.x) build the same architectures from the same specs. Random values differ
between transformers versions; each exporter therefore checks its export against the model it built.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import transformers

VOCAB = 128
MAX_POS = 64
INIT_RANGE = 0.2  # std 0.02 gives near-uniform logits at hidden 64
NORM_PERTURB = 0.5
ATOL = 1e-4

_CLASSES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM"),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "phi3": ("Phi3Config", "Phi3ForCausalLM"),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM"),
}


@dataclass
class ModelSpec:
    """Shape of one tiny decoder; the manifest fields come straight from it."""

    family: str
    tied: bool = False
    hidden: int = 64
    layers: int = 2
    vocab: int = VOCAB
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    intermediate: int = 96
    seed: int = 0

    def manifest_fields(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("seed")
        return d


def make_config(spec: ModelSpec) -> transformers.PretrainedConfig:
    common: dict[str, Any] = dict(
        vocab_size=spec.vocab,
        hidden_size=spec.hidden,
        intermediate_size=spec.intermediate,
        num_hidden_layers=spec.layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=MAX_POS,
        initializer_range=INIT_RANGE,
        tie_word_embeddings=spec.tied,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    fam = spec.family
    cfg_cls = getattr(transformers, _CLASSES[fam][0])
    if fam == "llama":
        cfg = cfg_cls(head_dim=spec.head_dim, **common)
    elif fam == "qwen2":
        assert spec.hidden // spec.num_heads == spec.head_dim
        cfg = cfg_cls(use_sliding_window=False, **common)
    elif fam == "qwen3":
        cfg = cfg_cls(head_dim=spec.head_dim, use_sliding_window=False, **common)
    elif fam == "phi3":
        assert spec.hidden // spec.num_heads == spec.head_dim
        cfg = cfg_cls(original_max_position_embeddings=MAX_POS, sliding_window=None, **common)
    elif fam == "gemma3":
        # One sliding and one full layer like the real 5:1 pattern; the window exceeds MAX_POS, so the
        # sliding mask never bites and both layer kinds compute plain causal attention.
        cfg = cfg_cls(
            head_dim=spec.head_dim,
            query_pre_attn_scalar=spec.head_dim,
            sliding_window=512,
            layer_types=["sliding_attention", "full_attention"][: spec.layers],
            **common,
        )
    else:
        raise ValueError(f"unknown family {fam!r}")
    cfg.architectures = [_CLASSES[fam][1]]
    return cfg


def build_model(spec: ModelSpec, attn: str = "eager") -> torch.nn.Module:
    """Random-init model with every norm perturbed (and biases filled) so nothing folds away."""
    torch.manual_seed(spec.seed)
    config = make_config(spec)
    config._attn_implementation = attn
    model = getattr(transformers, _CLASSES[spec.family][1])(config).to(torch.float32).eval()
    gemma = spec.family == "gemma3"
    with torch.no_grad():
        n_norms = 0
        for mod in model.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                w = mod.weight
                # Gemma scales by (1 + w) with w zero-initialised; the others by w initialised to 1.
                w.copy_((0.0 if gemma else 1.0) + NORM_PERTURB * torch.randn_like(w))
                n_norms += 1
        assert n_norms >= 2 * spec.layers + 1, n_norms
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.copy_(INIT_RANGE * torch.randn_like(p))
    same = model.lm_head.weight is model.model.embed_tokens.weight
    assert same == spec.tied, (spec, same)
    return model


def logits_only(model: torch.nn.Module) -> torch.nn.Module:
    """Swap in a subclass whose forward(input_ids, attention_mask) returns logits only (keeps param names)."""
    base = type(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return base.forward(self, input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    model.__class__ = type(base.__name__, (base,), {"forward": forward, "__module__": base.__module__})
    model.logits_only = True
    return model


def save_tokenizer(directory: Path, vocab: int) -> None:
    """A WordLevel tokenizer over `vocab` tokens, saved offline as a PreTrainedTokenizerFast."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    words = {tok: i for i, tok in enumerate(specials)}
    words.update({f"t{i}": i for i in range(len(specials), vocab)})
    tok = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    fast.model_max_length = MAX_POS
    fast.save_pretrained(str(directory))


def save_hf_dir(model: torch.nn.Module, spec: ModelSpec, directory: Path) -> Path:
    """config.json + safetensors + tokenizer: what a local 'hub' folder holds."""
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(directory), safe_serialization=True)
    save_tokenizer(directory, spec.vocab)
    return directory


def sample_ids(spec: ModelSpec, batch: int, seq: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, spec.vocab, (batch, seq), generator=g, dtype=torch.int64)


def torch_logits(model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor | None = None) -> np.ndarray:
    mask = torch.ones_like(ids) if mask is None else mask
    with torch.no_grad():
        if getattr(model, "logits_only", False):
            return model(ids, mask).numpy()
        return model(input_ids=ids, attention_mask=mask, use_cache=False).logits.numpy()


def check_spread(ref: np.ndarray, what: str) -> None:
    spread = float(ref.std(axis=-1).mean())
    if spread < 0.5:
        raise AssertionError(f"{what}: degenerate logits (mean per-row std {spread:.3f})")


def write_entries(path: Path, entries: list[dict[str, Any]]) -> None:
    path.write_text(json.dumps(entries, indent=2) + "\n")


def temp_dir(prefix: str) -> tempfile.TemporaryDirectory:
    return tempfile.TemporaryDirectory(prefix=prefix)


def _past_feeds(
    session: Any, spec: ModelSpec, batch: int, presents: dict[str, np.ndarray] | None
) -> dict[str, np.ndarray]:
    """past_key_values.* feeds: empty for a prefill, the previous present.* for a decode step.

    The genai builder names the head dim symbolically ("kv_cache_dim"), hence the spec's numbers.
    """
    feeds = {}
    for inp in session.get_inputs():
        if not inp.name.startswith("past_key_values."):
            continue
        if presents is not None:
            feeds[inp.name] = presents[inp.name.replace("past_key_values.", "present.")]
        else:
            _, kv, _, hd = inp.shape
            kv = kv if isinstance(kv, int) else spec.num_kv_heads
            hd = hd if isinstance(hd, int) else spec.head_dim
            feeds[inp.name] = np.zeros((batch, kv, 0, hd), dtype=np.float32)
    return feeds


def _step(
    session: Any, spec: ModelSpec, ids: np.ndarray, past_len: int, presents: dict[str, np.ndarray] | None
) -> dict:
    names = {i.name for i in session.get_inputs()}
    batch, seq = ids.shape
    feeds: dict[str, np.ndarray] = {"input_ids": ids}
    if "attention_mask" in names:
        feeds["attention_mask"] = np.ones((batch, past_len + seq), dtype=np.int64)
    if "position_ids" in names:
        feeds["position_ids"] = np.broadcast_to(np.arange(past_len, past_len + seq), (batch, seq)).copy()
    feeds.update(_past_feeds(session, spec, batch, presents))
    outs = [o.name for o in session.get_outputs()]
    return dict(zip(outs, session.run(outs, feeds), strict=True))


def ort_check(path: Path, model: torch.nn.Module, spec: ModelSpec, batch: int = 2, seq: int = 7) -> str:
    """Compare an export with torch on a prefill and, with a KV cache, one decode step; return a note.

    The decode step feeds the prefill's present.* back as past_key_values.*, so a wrongly placed cache
    (e.g. keys stored before the rotary embedding when the graph expects after) shows up as a mismatch.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    full = sample_ids(spec, batch, seq + 1, seed=spec.seed + 100).numpy()
    ref = torch_logits(model, torch.from_numpy(full))
    check_spread(ref, path.name)
    first = _step(session, spec, full[:, :seq], 0, None)
    diffs = [float(np.abs(first["logits"] - ref[:, :seq]).max())]
    has_past = any(i.name.startswith("past_key_values.") for i in session.get_inputs())
    if has_past:
        second = _step(session, spec, full[:, seq:], seq, first)
        diffs.append(float(np.abs(second["logits"] - ref[:, seq:]).max()))
    worst = max(diffs)
    if not worst < ATOL:
        raise AssertionError(f"{path}: onnxruntime vs torch max abs diff {diffs} >= {ATOL}")
    what = f"prefill [{batch},{seq}]" + (" + 1 decode step from present.*" if has_past else "")
    return f"matches torch ({what}): max|ort-torch| {worst:.1e}"


def describe_tables(path: Path) -> str:
    """How the embedding table and the lm_head weight are laid out (shared, transposed, copied) in an export."""
    import onnx
    from onnx import numpy_helper

    proto = onnx.load(str(path), load_external_data=True)
    inits = {t.name: t for t in proto.graph.initializer}
    producer = {o: n for n in proto.graph.node for o in n.output}

    def source(name: str) -> tuple[str, bool]:
        """(initializer, transposed?) behind a tensor, through at most one Transpose."""
        if name in inits:
            return name, False
        node = producer.get(name)
        if node is not None and node.op_type == "Transpose" and node.input[0] in inits:
            return node.input[0], True
        return name, False

    def shape(name: str) -> list[int]:
        return list(inits[name].dims) if name in inits else []

    gathers = [n for n in proto.graph.node if n.op_type.startswith("Gather") and source(n.input[0])[0] in inits]
    gathers = [n for n in gathers if len(shape(source(n.input[0])[0])) >= 2]
    head = next(n for n in proto.graph.node if "logits" in n.output)
    parts = []
    emb = None
    if gathers:
        emb, emb_t = source(gathers[0].input[0])
        how = f"{gathers[0].op_type}(Transpose('{emb}'))" if emb_t else f"{gathers[0].op_type}('{emb}')"
        parts.append(f"embedding {how} {shape(emb)}")
    w, w_t = source(head.input[1]) if len(head.input) > 1 else ("?", False)
    how = f"Transpose('{w}')" if w_t else f"'{w}'"
    parts.append(f"lm_head {head.op_type}(x, {how}) {shape(w)}")
    if emb is not None and w == emb:
        parts.append("ONE shared table")
    elif emb is not None and w in inits and inits[w].data_type == inits[emb].data_type == 1:
        a, b = numpy_helper.to_array(inits[emb]), numpy_helper.to_array(inits[w])
        same = a.shape == b.T.shape and np.array_equal(a, b.T) or a.shape == b.shape and np.array_equal(a, b)
        parts.append("two copies of the SAME table" if same else "separate tables")
    return "tables: " + ", ".join(parts)
