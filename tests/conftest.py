"""Shared fixtures: the committed exports and their manifest."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def manifest(folder: Path = FIXTURES) -> list[dict]:
    path = folder / "manifest.json"
    return json.loads(path.read_text()) if path.is_file() else []


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    return FIXTURES
