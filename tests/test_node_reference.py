"""docs/nodes.md is the nodes' own descriptions and tooltips (tools/node_reference.py)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import node_reference  # noqa: E402


def test_node_reference_is_up_to_date():
    assert node_reference.main(["--check"]) == 0


def test_the_check_can_fail(monkeypatch, tmp_path):
    stale = tmp_path / "nodes.md"
    stale.write_text(node_reference.REFERENCE.read_text(encoding="utf-8").replace("Odd values only.", "Any value."),
                     encoding="utf-8")
    monkeypatch.setattr(node_reference, "REFERENCE", stale)
    assert node_reference.main(["--check"]) == 1
