#!/usr/bin/env python
"""Survey: every fixture x {R1, R1+R2+R3+R4}, rotated by the tool and judged independently of --validate.

For each fixture in fixtures/ (the torch.onnx set, fixtures/exporters/ and fixtures/families/; the VLM
folders have their own command and are left out) and each rotation, ``spinquant-onnx rotate IN OUT
--validate [--r2 --r3 --r4]`` is run in-process (``spinquant_onnx.cli.main``) and the outcome classified:

* ``exact``       exit 0, the output loads in onnxruntime and matches the original (below)
* ``refused``     exit 2 (the first line of the message is kept)
* ``validate``    exit 1: --validate rejected it; the rotation is then redone without --validate and the
                  output judged as below, so a false alarm (e.g. fp16 rounding) and a real catch differ
* ``WRONG``       exit 0 but the output differs from the original
* ``UNLOADABLE``  exit 0 but onnxruntime cannot load the output
* ``CRASH``       exit 3 (internal error)

"Matches" is checked here, not by the tool: both models run in onnxruntime (CPU) on batch 2 x sequence 5
token ids (with a KV cache: a prefill from an empty cache, then one decode step, each model on its own
present.*); fp32: relative L2 of the logits < 1e-5 and every argmax equal; fp16/bf16: relative L2 below
10x the model's own rounding noise (the original against the same graph upcast to fp32) and no more
argmax flips than that noise causes. A split model's parts are rotated one by one and, when both exit 0,
also composed (rotated part 0 -> rotated part 1 against the original chain).

    python scripts/survey.py [--only SUBSTRING ...] [--json docs/survey.json] [--md docs/survey.md]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import re
import sys
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
EXACT = 1e-5
NOISE_FACTOR = 10.0
CONFIGS = {"R1": [], "R1+R2+R3+R4": ["--r2", "--r3", "--r4"]}
BATCH, SEQ = 2, 5


# ------------------------------------------------------------------------------------------ fixtures


def fixtures(include_old: bool = True) -> list[dict[str, Any]]:
    """Every surveyed fixture: id (path under fixtures/), path, manifest entry; split parts carry their partner."""
    found: list[dict[str, Any]] = []
    if include_old:
        for folder in (FIXTURES, FIXTURES / "exporters"):
            for e in json.loads((folder / "manifest.json").read_text()):
                if e.get("opset") == 23:  # onnxruntime runs the opset-23 RotaryEmbedding at batch 1 only
                    e = dict(e, survey_batch=1)
                found.append(
                    {"id": str((folder / e["file"]).relative_to(FIXTURES)), "path": folder / e["file"], "entry": e}
                )
    fam = FIXTURES / "families" / "manifest.json"
    if fam.is_file():
        for e in json.loads(fam.read_text())["fixtures"]:
            path = FIXTURES / "families" / e["file"]
            found.append({"id": str(path.relative_to(FIXTURES)), "path": path, "entry": e})
    return found


def split_pairs(items: list[dict[str, Any]]) -> list[tuple[dict, dict]]:
    by_file = {it["entry"]["file"]: it for it in items}
    pairs = []
    for it in items:
        e = it["entry"]
        if e.get("kind") == "split" and e.get("part") == 0:
            pairs.append((it, by_file[e["parts"][1]]))
    return pairs


# ------------------------------------------------------------------------------------------ running


def _session(model_or_path: Any):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    src = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") else str(model_or_path)
    return ort.InferenceSession(src, so, providers=["CPUExecutionProvider"])


_NP = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(double)": np.float64,
}


def _np_type(t: str):
    if t == "tensor(bfloat16)":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return _NP[t]


def _dim(d: Any, fallback: int) -> int:
    return d if isinstance(d, int) and d > 0 else fallback


def _feeds(sess, entry: dict, ids: np.ndarray, past: int, presents: dict | None, hidden: np.ndarray | None):
    feeds: dict[str, np.ndarray] = {}
    b, s = ids.shape
    for inp in sess.get_inputs():
        n, t = inp.name, _np_type(inp.type)
        if n == "input_ids":
            feeds[n] = ids.astype(t)
        elif n == "attention_mask":
            feeds[n] = np.ones((b, past + s), dtype=t)
        elif "position" in n:
            feeds[n] = np.broadcast_to(np.arange(past, past + s), (b, s)).astype(t).copy()
        elif n.startswith("past_key_values") or n.startswith("past_"):
            if presents is not None:
                feeds[n] = presents[n.replace("past_key_values", "present")]
            else:
                shape = inp.shape
                kv = _dim(shape[1], entry.get("num_kv_heads", 2))
                hd = _dim(shape[3], entry.get("head_dim", 16))
                feeds[n] = np.zeros((b, kv, 0, hd), dtype=t)
        elif len(inp.shape) == 3 and t in (np.float32, np.float16):
            if hidden is None:
                raise ValueError(f"no feed for float input {n!r}")
            feeds[n] = hidden.astype(t)
        else:
            raise ValueError(f"no feed for input {n!r} {inp.type} {inp.shape}")
    return feeds


def _ids(entry: dict, seed: int, seq: int = SEQ + 1) -> np.ndarray:
    vocab = int(entry.get("vocab", 64))
    return np.random.default_rng(seed).integers(3, vocab, size=(entry.get("survey_batch", BATCH), seq), dtype=np.int64)


def run(model_or_path: Any, entry: dict, hidden: np.ndarray | None = None, seed: int = 0) -> np.ndarray:
    """The model's main output ('logits', else the first) on the survey input; KV: prefill + 1 decode step."""
    sess = _session(model_or_path)
    outs = [o.name for o in sess.get_outputs()]
    main_out = "logits" if "logits" in outs else outs[0]
    full = _ids(entry, seed)
    has_past = any(i.name.startswith("past") for i in sess.get_inputs())
    if not has_past:
        return sess.run([main_out], _feeds(sess, entry, full[:, :SEQ], 0, None, hidden))[0].astype(np.float64)
    first = dict(zip(outs, sess.run(outs, _feeds(sess, entry, full[:, :SEQ], 0, None, hidden)), strict=True))
    second = sess.run([main_out], _feeds(sess, entry, full[:, SEQ:], SEQ, first, hidden))[0]
    return np.concatenate([first[main_out], second], axis=1).astype(np.float64)


def upcast(model):
    """The same graph in fp32 (initializers, Casts, Constants, declared types): the rounding-noise reference."""
    import onnx
    from onnx import numpy_helper

    low = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    m = copy.deepcopy(model)

    def fix_tensor(t):
        if t.data_type in low:
            arr = numpy_helper.to_array(t).astype(np.float32)
            t.CopyFrom(numpy_helper.from_array(arr, t.name))

    def fix_graph(g):
        for t in g.initializer:
            fix_tensor(t)
        for vi in [*g.input, *g.output, *g.value_info]:
            if vi.type.tensor_type.elem_type in low:
                vi.type.tensor_type.elem_type = onnx.TensorProto.FLOAT
        for node in g.node:
            for a in node.attribute:
                if a.name == "to" and a.i in low:
                    a.i = onnx.TensorProto.FLOAT
                if a.type == onnx.AttributeProto.TENSOR:
                    fix_tensor(a.t)
                if a.type == onnx.AttributeProto.GRAPH:
                    fix_graph(a.g)

    fix_graph(m.graph)
    return m


def model_dtype(path: Path) -> str:
    import onnx

    m = onnx.load(str(path), load_external_data=False)
    elem = m.graph.output[0].type.tensor_type.elem_type
    return {onnx.TensorProto.FLOAT16: "float16", onnx.TensorProto.BFLOAT16: "bfloat16"}.get(elem, "float32")


@cache
def original(path: Path, entry_json: str, hidden_key: str = "") -> tuple[np.ndarray, float, float]:
    """(outputs, rel-L2 noise, argmax-flip noise) of the original; noise is 0 for fp32."""
    import onnx

    entry = json.loads(entry_json)
    hidden = _hidden(entry) if hidden_key else None
    ref = run(path, entry, hidden)
    if model_dtype(path) == "float32":
        return ref, 0.0, 0.0
    up = run(upcast(onnx.load(str(path))), entry, hidden)
    return ref, _rel(ref, up), float((ref.argmax(-1) != up.argmax(-1)).mean())


def _hidden(entry: dict) -> np.ndarray:
    return (
        np.random.default_rng(5)
        .standard_normal((entry.get("survey_batch", BATCH), SEQ, int(entry["hidden"])))
        .astype(np.float32)
    )


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def judge(got: np.ndarray, ref: np.ndarray, noise: float, flip_noise: float) -> tuple[bool, float, float]:
    """(matches, rel L2, argmax-flip fraction) under the fp32 rule or the rounding-noise rule."""
    rel = _rel(got, ref)
    flips = float((got.argmax(-1) != ref.argmax(-1)).mean())
    if noise == 0.0:
        return rel < EXACT and flips == 0.0, rel, flips
    return rel < max(EXACT, NOISE_FACTOR * noise) and flips <= flip_noise, rel, flips


def rotate(src: Path, dst: Path, flags: list[str], validate: bool) -> tuple[int, str]:
    """Run the CLI in-process: (exit code, first line of stderr, without the program-name prefix)."""
    code, lines = rotate_lines(src, dst, flags, validate)
    first = _no_tmp(lines[0]) if lines else ""
    for prefix in ("spinquant-onnx: error: ", "spinquant-onnx: internal error: "):
        first = first.removeprefix(prefix)
    return code, first


def rotate_lines(src: Path, dst: Path, flags: list[str], validate: bool) -> tuple[int, list[str]]:
    """Run the CLI in-process: (exit code, the non-progress lines it wrote on stderr)."""
    from spinquant_onnx import cli

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = cli.main(["rotate", str(src), str(dst), *flags, *(["--validate"] if validate else [])])
        except SystemExit as exc:  # argparse
            code = int(exc.code or 0)
    lines = [ln for ln in err.getvalue().splitlines() if ln.strip() and not ln.startswith(("rotating", "\r"))]
    return code, lines


def check_output(out: Path, item: dict, hidden: bool = False) -> dict[str, Any]:
    """Load and run a written model against the original; the outcome of an exit-0 rotation."""
    entry = item["entry"]
    ref, noise, flip_noise = original(item["path"], json.dumps(entry, sort_keys=True), "h" if hidden else "")
    try:
        got = run(out, entry, _hidden(entry) if hidden else None)
    except Exception as exc:  # noqa: BLE001 - ORT's refusal to load is the finding
        return {"outcome": "UNLOADABLE", "message": _no_tmp(f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}")}
    ok, rel, flips = judge(got, ref, noise, flip_noise)
    res = {"outcome": "exact" if ok else "WRONG", "rel_l2": rel, "argmax_flips": flips}
    if noise:
        res["noise"] = noise
    return res


def _takes_hidden(item: dict) -> bool:
    return item["entry"].get("kind") == "split" and item["entry"].get("part") == 1


def classify(item: dict, flags: list[str], validate: bool = True) -> dict[str, Any]:
    """Rotate one fixture with these flags (with or without --validate) and classify the outcome."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rotated.onnx"
        code, message = rotate(item["path"], out, flags, validate)
        res: dict[str, Any] = {"exit": code}
        if code == 2:
            res.update(outcome="refused", message=message)
        elif code == 0:
            res.update(check_output(out, item, _takes_hidden(item)))
        elif code == 1:
            res.update(outcome="validate", message=message)
        else:
            res.update(outcome="CRASH", message=f"exit {code}: {message}")
    return res


def survey_cell(item: dict, flags: list[str]) -> dict[str, Any]:
    """The cell: rotated with --validate (the outcome) and without (what a user gets who skips it)."""
    cell = classify(item, flags, validate=True)
    cell["without_validate"] = classify(item, flags, validate=False)
    return cell


def classify_composed(p0: dict, p1: dict, flags: list[str]) -> dict[str, Any]:
    """Rotate both parts of a split model alone and compose them in onnxruntime against the original chain."""
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / "p0.onnx", Path(tmp) / "p1.onnx"]
        codes = [rotate(p["path"], o, flags, validate=False) for p, o in zip((p0, p1), outs, strict=True)]
        if any(c != 0 for c, _ in codes):
            return {"outcome": "n/a", "message": "a part did not exit 0: " + "; ".join(f"{c}: {m}" for c, m in codes)}
        e0, e1 = p0["entry"], p1["entry"]

        def chain(a, b):
            sa = _session(a)
            ids = _ids(e0, 0)[:, :SEQ]
            hid = sa.run(["hidden_states"], _feeds(sa, e0, ids, 0, None, None))[0]
            return run(b, e1, hid)

        ref = chain(p0["path"], p1["path"])
        try:
            got = chain(*outs)
        except Exception as exc:  # noqa: BLE001
            return {"outcome": "UNLOADABLE", "message": str(exc).splitlines()[0][:300]}
        ok, rel, flips = judge(got, ref, 0.0, 0.0)
        return {"outcome": "exact" if ok else "WRONG", "rel_l2": rel, "argmax_flips": flips}


# ------------------------------------------------------------------------------------------ report


def _no_tmp(message: str) -> str:
    """Temporary paths differ on every run; keep the survey's JSON stable."""
    return re.sub(r"(/tmp|/var)/[^\s'\"]+", "<tmp>", message)


def _short(message: str, limit: int = 220) -> str:
    message = _no_tmp(message)
    return message if len(message) <= limit else message[: limit - 3] + "..."


def _one(r: dict) -> str:
    o = r["outcome"]
    if o == "exact":
        return "exact"
    if o == "WRONG":
        return f"WRONG: rel L2 {r['rel_l2']:.2e}, argmax flips {r['argmax_flips']:.2f}"
    if o == "validate":
        return f"validate rejected (exit 1): {_short(r.get('message', ''))}"
    return f"{o}: {_short(r.get('message', ''))}"


def cell_text(r: dict) -> str:
    """The --validate outcome, and the outcome without --validate when that differs."""
    text = _one(r)
    raw = r.get("without_validate")
    if raw is not None and _one(raw) != text:
        text += f" [without --validate: {_one(raw)}]"
    return text


BAD = ("WRONG", "UNLOADABLE", "CRASH")


def counts(results: list[dict], raw: bool) -> dict[str, int]:
    found: dict[str, int] = {}
    for r in results:
        for c in CONFIGS:
            cell = r[c].get("without_validate", r[c]) if raw else r[c]
            found[cell["outcome"]] = found.get(cell["outcome"], 0) + 1
    return dict(sorted(found.items()))


def markdown(results: list[dict]) -> str:
    lines = [
        "# Survey: every fixture x {R1, R1+R2+R3+R4}",
        "",
        "Generated by `python scripts/survey.py`: each cell is `spinquant-onnx rotate --validate`, and the same",
        "rotation without `--validate` in brackets where that differs. Every written model is run in onnxruntime",
        "against the original independently of the tool (fp32: rel L2 < 1e-5 and every argmax equal; fp16/bf16:",
        "below 10x the model's own rounding noise). Outcomes: exact, refused (exit 2), validate (exit 1),",
        "WRONG / UNLOADABLE (exit 0 with a bad model), CRASH (exit 3). The VLM fixtures have their own command",
        "and are not surveyed here.",
        "",
        "Cells with --validate: " + ", ".join(f"{k} {v}" for k, v in counts(results, False).items()),
        "",
        "Cells without --validate: " + ", ".join(f"{k} {v}" for k, v in counts(results, True).items()),
        "",
        "## Bad cells (exit 0 with a wrong or unloadable model, or a crash)",
        "",
    ]
    for r in results:
        for c in CONFIGS:
            for how, cell in (("--validate", r[c]), ("no --validate", r[c].get("without_validate", {}))):
                if cell.get("outcome") in BAD:
                    lines.append(f"- {r['id']} {c} ({how}): {_one(cell)}")
    lines += [
        "",
        "## All cells",
        "",
        "| fixture | family | exporter | transformers | attn | dtype | R1 | R1+R2+R3+R4 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        e = r["entry"]
        cells = [cell_text(r[c]).replace("|", "\\|") for c in CONFIGS]
        lines.append(
            f"| {r['id']} | {e.get('family', '')} | {e.get('exporter', '')} {e.get('opset', '')} | "
            f"{e.get('transformers', '')} | {e.get('attn_implementation', '')} | {e.get('dtype', 'float32')} | "
            + " | ".join(cells)
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", metavar="SUBSTRING", help="only fixtures whose id contains one of these")
    ap.add_argument("--set", choices=["all", "old", "families"], default="all", help="which fixtures (default all)")
    ap.add_argument("--reuse", type=Path, help="take the cells of fixtures already in this survey JSON from it")
    ap.add_argument("--json", type=Path, default=ROOT / "docs" / "survey.json", help="JSON results")
    ap.add_argument("--md", type=Path, default=ROOT / "docs" / "survey.md", help="markdown table")
    args = ap.parse_args(argv)
    items = fixtures(include_old=args.set != "families")
    if args.set == "old":
        items = [it for it in items if not it["id"].startswith("families/")]
    reuse = {r["id"]: r for r in json.loads(args.reuse.read_text())} if args.reuse else {}
    items = [it for it in items if it["entry"].get("expect") != "skip"]
    if args.only:
        items = [it for it in items if any(s in it["id"] for s in args.only)]
    results = []
    for it in items:
        started = time.perf_counter()
        row: dict[str, Any] = {"id": it["id"], "entry": it["entry"]}
        for name, flags in CONFIGS.items():
            row[name] = reuse[it["id"]][name] if it["id"] in reuse else survey_cell(it, flags)
        results.append(row)
        print(
            f"{it['id']:55s} "
            + " | ".join(f"{c}: {cell_text(row[c])[:70]}" for c in CONFIGS)
            + f"  ({time.perf_counter() - started:.1f}s)",
            flush=True,
        )
    for p0, p1 in split_pairs(items):
        e = dict(p0["entry"], file=p0["entry"]["file"].replace("_part0", "_composed"))
        row = {"id": p0["id"].replace("_part0", "_composed"), "entry": e}
        for name, flags in CONFIGS.items():
            row[name] = classify_composed(p0, p1, flags)
        results.append(row)
        print(f"{row['id']:55s} " + " | ".join(f"{c}: {cell_text(row[c])[:70]}" for c in CONFIGS), flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    slim = [{"id": r["id"], **{c: r[c] for c in CONFIGS}} for r in results]
    args.json.write_text(json.dumps(slim, indent=1) + "\n")
    args.md.write_text(markdown(results))
    print(f"wrote {args.json} and {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
