"""The README's flow-view picture script: it recovers the MLS warp it encodes, and its text says what it shows."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))


def test_flow_view_example_recovers_the_encoded_warp_where_the_warp_lands_on_the_garment(tmp_path, capsys):
    pytest.importorskip("PIL")
    import flow_view_example

    out = tmp_path / "sheet.jpg"
    numbers = flow_view_example.main(out)
    printed = capsys.readouterr().out
    assert out.exists() and out.stat().st_size > 10_000
    # On the garment: within about half a token (8 px tokens at 512 px), as the docstring says.
    assert numbers["on_median"] < 6.0 and numbers["on_p95"] < 20.0
    # Off the garment the attention cannot follow (garment tokens outside its mask get no weight): large error,
    # on a share of the mask the docstring calls "about a quarter".
    assert numbers["off_median"] > 32.0 and 0.15 < numbers["off_share"] < 0.35
    assert numbers["reliance_on"] > 0.99
    assert f"median {numbers['on_median']:.2f}" in printed and "off the garment" in printed
    doc = flow_view_example.__doc__
    assert "near zero" not in doc and "about a quarter" in doc and "median about 4 px" in doc
    # The disagreement panel uses the node's own scale (the Flow View's epe_scale_px default).
    assert flow_view_example.EPE_SCALE_PX == 32.0


def test_the_default_output_is_the_readmes_picture_not_the_current_folder():
    import flow_view_example

    assert flow_view_example.DEFAULT_OUT == Path(__file__).resolve().parents[1] / "docs" / "flow_view_example.jpg"


def test_the_epe_scale_is_the_nodes_default():
    """The example's white level is the Flow View node's epe_scale_px default (read from the node snapshot)."""
    import json

    info = json.loads((Path(__file__).resolve().parents[1] / "tests" / "data" / "object_info_pack-0.3.64.json")
                      .read_text())["MaX4ZeroFlowView"]
    spec = {**info["input"].get("required", {}), **info["input"].get("optional", {})}["epe_scale_px"]
    import flow_view_example

    assert spec[1]["default"] == flow_view_example.EPE_SCALE_PX
