"""Each cell of README's conformance table, re-measured: exact where it says exact, refused where it says so."""

from __future__ import annotations

import importlib.util
import json

import pytest
from conftest import ROOT

spec = importlib.util.spec_from_file_location("conformance", ROOT / "scripts" / "conformance.py")
conformance = importlib.util.module_from_spec(spec)
spec.loader.exec_module(conformance)

EXPECTED = json.loads(conformance.RESULTS.read_text())
CELLS = conformance.entries()


@pytest.mark.parametrize("cell", CELLS, ids=[f"{c['row']} x {c['column']}" for c in CELLS])
def test_cell(cell: dict) -> None:
    expected = EXPECTED[cell["file"]]
    assert not expected.startswith("WRONG")
    assert conformance.outcome(cell["file"]) == expected


def test_every_fixture_has_a_cell_and_readme_shows_the_table() -> None:
    assert {c["file"] for c in CELLS} == set(EXPECTED)
    readme = conformance.README.read_text()
    assert conformance.render(EXPECTED) in readme
