"""The README's flow-view picture script runs on the shipped samples and recovers the MLS warp it encodes."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


def test_flow_view_example_recovers_the_encoded_warp(tmp_path, capsys):
    pytest.importorskip("PIL")
    import flow_view_example

    out = tmp_path / "sheet.png"
    flow_view_example.main(str(out))
    printed = capsys.readouterr().out
    median = float(printed.split("median ")[1].split(" px")[0])
    assert out.exists() and out.stat().st_size > 10_000
    # attention built from the MLS warp gives that warp back (to a few px at 256 px, 32x32 tokens)
    assert median < 6.0
