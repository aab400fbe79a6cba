"""``spinquant-onnx inspect IN``: what the matcher found, as a readable table (and the editable role map)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the library loads on use: --help stays fast
    from spinquant_onnx.match.analysis import Analysis
    from spinquant_onnx.match.linears import Linear


def _shape(analysis: Analysis, name: str | None) -> str:
    if name is None or name not in analysis.store:  # no gamma (raw-stream readers, Olmo), or a Constant
        return ""
    return "x".join(str(d) for d in analysis.store.shape(name))


def _layout(linear: Linear) -> str:
    return "[in,out]" if linear.in_axis == 0 else "[out,in]"


def render(analysis: Analysis) -> str:
    """One header, then one row per tensor the rotation touches, grouped by block."""
    stream, roles = analysis.stream, analysis.roles
    rows: list[tuple[str, str, str, str, str]] = []
    if stream.embedding is not None:
        emb = stream.embedding
        rows.append(("-", "embedding", emb.table, _shape(analysis, emb.table), f"Gather {emb.node.name or ''}".strip()))
    for name in stream.entries:
        rows.append(("-", "inputs_embeds", name, "", "graph input"))
    for block in roles.blocks:
        for part in block.parts:
            if part.norm is not None:
                norm = part.norm
                kind = norm.kind + (f", beta {norm.shift}" if norm.shift else "")
                rows.append(
                    (str(block.number), f"{part.kind} norm", norm.gamma or "-", _shape(analysis, norm.gamma), kind)
                )
            for entry in part.readers + part.writers:
                lin = entry.linear
                detail = f"{lin.node.op_type} {_layout(lin)}" + (f" bias {lin.bias}" if lin.bias else "")
                detail += f", {lin.experts} experts gathered per token" if lin.experts else ""
                rows.append((str(block.number), entry.role, lin.weight, _shape(analysis, lin.weight), detail))
            if part.online_write is not None:
                post = part.post_norm
                rows.append(
                    (
                        str(block.number),
                        "post-norm",
                        post.gamma,
                        _shape(analysis, post.gamma),
                        f"{post.kind}; R1 inserted online after it (not absorbable)",
                    )
                )
    if roles.final is not None:
        final = roles.final
        if final.norm is None:
            rows.append(("-", "no final norm", "", "", "lm_head reads the raw residual stream"))
        else:
            kind = final.norm.kind + (f", beta {final.norm.shift}" if final.norm.shift else "")
            rows.append(("-", "final norm", final.norm.gamma or "-", _shape(analysis, final.norm.gamma), kind))
        for entry in final.readers:
            lin = entry.linear
            rows.append(
                ("-", entry.role, lin.weight, _shape(analysis, lin.weight), f"{lin.node.op_type} {_layout(lin)}")
            )
    header = ("block", "role", "tensor", "shape", "how")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        f"hidden size {stream.hidden}, {len(roles.blocks)} blocks, {len(stream.norms)} "
        f"{'LayerNorms (stream centred)' if stream.centered else 'RMSNorms'} on the stream, "
        f"{len(stream.writers)} writers"
        + (
            f" ({sum(1 for w in stream.writers if w.online)} rotated online)"
            if any(w.online for w in stream.writers)
            else ""
        )
        + (", tied embedding table shared with lm_head" if _tied(analysis) else ""),
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in rows]
    from spinquant_onnx.core import metadata

    done = metadata.read(analysis.model)  # #13: a rotated model says so
    if done is not None:
        lines.insert(1, metadata.describe(done))
    return "\n".join(lines)


def render_capabilities(info: dict[str, Any]) -> str:
    """Heads per attention block (grouped when all agree) and which rotations this graph allows."""
    attention = info["attention"]
    blocks = attention["blocks"]
    if attention["error"]:
        lines = [f"attention: head geometry not read ({attention['error']})"]
    elif not blocks:
        lines = ["attention: no attention blocks found"]
    else:
        shapes = {(b["num_heads"], b["num_kv_heads"], b["head_dim"]) for b in blocks}
        if len(shapes) == 1:
            heads, kv, dim = shapes.pop()
            lines = [f"attention: {len(blocks)} blocks, {heads} heads, {kv} kv heads, head_dim {dim}"]
        else:
            lines = ["attention:"] + [
                f"  block {b['block']}: {b['num_heads']} heads, {b['num_kv_heads']} kv heads, head_dim {b['head_dim']}"
                for b in blocks
            ]
    for name, why in info["rotations"].items():
        lines.append(f"{name.upper()}: " + ("possible" if why is None else f"not possible: {why}"))
    return "\n".join(lines)


def capabilities(analysis: Analysis) -> dict[str, Any]:
    from spinquant_onnx.core import capabilities as caps

    return {"attention": caps.heads(analysis), "rotations": caps.possible(analysis)}


def _tied(analysis: Analysis) -> bool:
    roles = analysis.roles
    if analysis.stream.embedding is None or roles.final is None:
        return False
    return any(entry.linear.weight == analysis.stream.embedding.table for entry in roles.final.readers)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    """Register ``inspect`` on the main parser's subparsers."""
    inspect = sub.add_parser("inspect", help="print the blocks, norms and linear roles the matcher finds")
    inspect.add_argument("input")
    inspect.add_argument("--json", metavar="ROLES.json", help="also write the role map (editable; see README)")
    inspect.set_defaults(func=run)
    return inspect


def run(args: argparse.Namespace) -> int:
    from spinquant_onnx.io.model_file import load_model
    from spinquant_onnx.match.analysis import analyze

    path = Path(args.input)
    analysis = analyze(load_model(path), path.parent)
    info = capabilities(analysis)
    print(render(analysis))
    print(render_capabilities(info))
    if args.json:
        from spinquant_onnx.match.role_map import export_roles, write_roles

        data = export_roles(analysis.index, analysis.stream, analysis.roles)
        data["inspect"] = {**info, "note": "informational; ignored when the map is read back with --roles"}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        write_roles(data, args.json)
        print(f"role map written to {args.json}")
    return 0
