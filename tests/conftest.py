"""Shared fixtures: the committed exports and their manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


# The fields every fixtures manifest entry carries (scripts/make_fixtures.py and the exporter scripts).
MANIFEST_KEYS = {
    "file": str,
    "family": str,
    "exporter": str,
    "opset": int,
    "tied": bool,
    "hidden": int,
    "layers": int,
    "vocab": int,
    "num_heads": int,
    "num_kv_heads": int,
    "head_dim": int,
    "intermediate": int,
    "notes": str,
}


def manifest(folder: Path = FIXTURES) -> list[dict]:
    path = folder / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else []


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
