"""The matcher's findings on one model, built once per run and shared by every pass and entry point.

``analyze`` traces the residual stream (its norms, readers and writers) and assigns each linear its role;
the attention geometry (``sites``) is matched on first use and kept. Norms are matched once per graph
state (``find_norms`` is cached on the index), however many matchers ask for them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import onnx

from spinquant_onnx.errors import UnsupportedGraphError
from spinquant_onnx.graph.index import GraphIndex
from spinquant_onnx.io.tensor_store import TensorStore
from spinquant_onnx.match.heads import AttentionSite, attention_sites
from spinquant_onnx.match.residual import Stream, trace_stream
from spinquant_onnx.match.role_map import import_roles
from spinquant_onnx.match.roles import Roles, assign_roles


@dataclass
class Analysis:
    """What the matcher found in a model."""

    model: onnx.ModelProto
    store: TensorStore
    index: GraphIndex
    stream: Stream
    roles: Roles
    _sites: list[AttentionSite] | None = field(default=None, repr=False)

    @property
    def sites(self) -> list[AttentionSite]:
        """Every attention block's head geometry and projections (matched on first use, then kept)."""
        if self._sites is None:
            self._sites = attention_sites(self.index, self.roles)
        return self._sites

    def sites_for(self, flag: str) -> list[AttentionSite]:
        """``sites`` for a pass that needs at least one: a requested rotation that finds nothing is refused (#13)."""
        if not self.sites:
            raise UnsupportedGraphError(
                f"{flag}: no attention block with its q/k/v and o projections was found in the "
                f"{len(self.roles.blocks)} matched block(s), so there is nothing to rotate; drop {flag}"
            )
        return self.sites


def analyze(model: onnx.ModelProto, base_dir: str | os.PathLike | None = None, roles: Any = None) -> Analysis:
    """Run the matcher: the residual stream, its norms, readers and writers, and each weight's role.

    ``roles`` (a role-map dict or JSON path, see ``inspect --json``) replaces matching with a checked map.
    """
    store = TensorStore(model, base_dir)
    index = GraphIndex(model, store)
    if roles is not None:
        stream, found = import_roles(index, roles)
        return Analysis(model, store, index, stream, found)
    stream = trace_stream(index)
    return Analysis(model, store, index, stream, assign_roles(index, stream))
