"""The Python side of the point editor: how manual points combine with the matches, what is refused, the
warnings the editor asks the server for (the node's words), and the payload MLS Warp sends the editor.
Runs without ComfyUI."""

from __future__ import annotations

import asyncio
import json
import math

import pytest
import torch

from max4zero.nodes import point_editor as pe
from max4zero.registration import manual_points as mp
from max4zero.registration.matches import Matches
from max4zero.warping import point_checks

# A garment 64x48 (h x w) and a person 80x60: four well-spread pairs, a slight shift and scale.
REF_HW, TGT_HW = (64, 48), (80, 60)
REF = [[8.0, 8.0], [40.0, 8.0], [8.0, 56.0], [40.0, 56.0], [24.0, 30.0]]
TGT = [[10.0, 12.0], [50.0, 11.0], [11.0, 70.0], [49.0, 71.0], [30.0, 40.0]]


def _m(ref=REF, tgt=TGT, ref_hw=REF_HW, tgt_hw=TGT_HW) -> Matches:
    ref, tgt = torch.tensor(ref), torch.tensor(tgt)
    return Matches(ref, tgt, torch.ones(len(ref)), ref_hw, tgt_hw)


def _rows(m: Matches) -> list[list[float]]:
    return [[*a, *b] for a, b in zip(m.reference_points.tolist(), m.target_points.tolist())]


# ------------------------------------------------------------------------------------------------
# combining manual points with the automatic matches
# ------------------------------------------------------------------------------------------------


def test_the_default_mode_is_what_the_node_did_before_it_existed():
    # Saved workflows get the first option: manual_points, when filled in, replace the matches.
    assert mp.MODES[0] == mp.REPLACE and mp.REPLACE.startswith("replace") and mp.ADD.startswith("add")
    manual, auto = _m(REF[:3], TGT[:3]), _m()
    got = mp.combine(manual, auto, mp.REPLACE, REF_HW, TGT_HW)
    assert torch.equal(got.reference_points, manual.reference_points)
    assert torch.equal(got.target_points, manual.target_points)
    # No manual points: the matches, whatever the mode.
    for mode in mp.MODES:
        assert torch.equal(mp.combine(None, auto, mode, REF_HW, TGT_HW).target_points, auto.target_points)
    assert mp.combine(None, None, mp.ADD, REF_HW, TGT_HW) is None


def test_add_puts_the_manual_points_after_the_matches_at_the_image_sizes():
    auto = _m(REF[:4], TGT[:4])
    # Manual points given for images twice the size: rescaled (pixel centres kept) before they join.
    manual = _m([[47.5, 61.5]], [[59.5, 79.5]], (128, 96), (160, 120))
    got = mp.combine(manual, auto, mp.ADD, REF_HW, TGT_HW)
    assert len(got) == 5 and got.reference_size == REF_HW and got.target_size == TGT_HW
    assert torch.equal(got.reference_points[:4], auto.reference_points)
    assert got.reference_points[4].tolist() == pytest.approx([23.5, 30.5])
    assert got.target_points[4].tolist() == pytest.approx([29.5, 39.5])
    with pytest.raises(ValueError, match="manual_points_mode must be one of"):
        mp.combine(manual, auto, "merge", REF_HW, TGT_HW)


# ------------------------------------------------------------------------------------------------
# refusals and warnings
# ------------------------------------------------------------------------------------------------


def test_too_many_pairs_are_refused_and_the_limit_is_allowed():
    n = mp.MAX_MANUAL_POINTS
    xy = torch.rand(n + 1, 2) * 40
    assert mp.manual_points_problem(Matches(xy[:n], xy[:n], torch.ones(n), REF_HW, TGT_HW)) is None
    problem = mp.manual_points_problem(Matches(xy, xy, torch.ones(n + 1), REF_HW, TGT_HW))
    assert problem and f"{n + 1} control point pairs" in problem and str(n) in problem


def test_point_warnings_are_the_point_checks_words():
    # Degenerate sets: exactly the sentences of warping/point_checks.py.
    for ref, tgt in ((REF[:2], TGT[:2]), ([[5, 5], [20, 20], [35, 35.1]], TGT[:3])):
        m = _m(ref, tgt)
        assert mp.point_warnings(m) == point_checks.control_point_warnings(m.reference_points, m.target_points)
        assert mp.point_warnings(m)
    assert mp.point_warnings(_m()) == []


def test_crossed_pairs_get_the_folded_warp_warning():
    # Pairs 1 and 5 swap their person points: the map folds between them, and only the fold check sees it
    # (no duplicate, no line, no mirror of the whole garment).
    tgt = [list(p) for p in TGT]
    tgt[0], tgt[4] = tgt[4], tgt[0]
    m = _m(REF, tgt)
    assert point_checks.control_point_warnings(m.reference_points, m.target_points) == []
    warnings = mp.point_warnings(m, "affine", 1.0)
    assert len(warnings) == 1 and warnings[0].startswith("the warp turns the garment over on")
    assert warnings[0] == point_checks.fold_warning(float(warnings[0].split("on ")[1].split(" %")[0]) / 100,
                                                    "the person pixels that show the garment photo")
    assert point_checks.fold_warning(point_checks.FOLD_WARN_FRACTION) is None


# ------------------------------------------------------------------------------------------------
# the route the editor asks, and the payload it gets
# ------------------------------------------------------------------------------------------------


def _request(rows, **over) -> dict:
    return {"points": rows, "reference_size": list(REF_HW), "target_size": list(TGT_HW), "kind": "affine",
            "alpha": 0.1, **over}


def test_the_route_answers_with_the_nodes_warnings():
    good = pe.check_request(_request(_rows(_m())))
    assert good == {"warnings": [], "problem": None}
    two = _m(REF[:2], TGT[:2])
    said = pe.check_request(_request(_rows(two)))
    assert said["problem"] is None and said["warnings"] == mp.point_warnings(two)
    assert pe.check_request(_request([]))["warnings"][0].startswith("no control points")


@pytest.mark.parametrize("rows, needle", [
    ([[1, 2, 3, None]], "is malformed"),  # what JSON.stringify makes of NaN
    ([[1, 2, 3]], "is malformed"),
    ([[1, 2, 3, 4]] * (mp.MAX_MANUAL_POINTS + 1), "more than the"),
])
def test_the_route_refuses_what_the_node_refuses(rows, needle):
    said = pe.check_request(_request(rows))
    assert said["warnings"] == [] and needle in said["problem"]
    assert "must be a JSON object" in pe.check_request([1, 2])["problem"]
    assert "kind must be one of" in pe.check_request(_request([[1, 2, 3, 4]], kind="wobbly"))["problem"]


def test_the_payload_holds_the_matches_at_the_image_sizes_and_the_rules():
    auto = _m(REF[:4], TGT[:4], (128, 96), (160, 120))  # made on images twice the size
    images = {k: {"filename": f"{k}.png", "subfolder": "", "type": "temp"} for k in ("garment", "person")}
    p = pe.editor_payload(images, REF_HW, TGT_HW, auto, "rigid", 0.5, mp.ADD)
    assert p["reference_size"] == [64, 48] and p["target_size"] == [80, 60] and p["images"] == images
    back = auto.rescaled(REF_HW, TGT_HW)
    assert torch.allclose(torch.tensor(p["automatic"]), torch.tensor(_rows(back)), atol=1e-3)
    assert (p["kind"], p["alpha"], p["mode"]) == ("rigid", 0.5, mp.ADD)
    assert p["rules"] == {"duplicate_px": point_checks.DUPLICATE_PX, "max_points": mp.MAX_MANUAL_POINTS,
                          "modes": list(mp.MODES), "replace": mp.REPLACE, "add": mp.ADD,
                          "preview_stride": mp.PREVIEW_STRIDE}
    assert json.loads(json.dumps(p)) == p  # what the server sends as the node's UI output
    assert pe.editor_payload(images, REF_HW, TGT_HW, None, "affine", 0.1, mp.REPLACE)["automatic"] == []
    # What the editor writes back parses at those sizes into the same points.
    written = {"format": p["format"], "reference_size": p["reference_size"], "target_size": p["target_size"],
               "points": [{"reference": r[:2], "target": r[2:]} for r in p["automatic"]]}
    m = Matches.from_json(json.dumps(written))
    assert m.reference_size == REF_HW and torch.allclose(m.target_points, back.target_points, atol=1e-3)


def test_the_route_is_registered_and_answers_json():
    from aiohttp import web

    routes = web.RouteTableDef()
    assert pe.register_route(routes)
    (route,) = [r for r in routes if r.path == pe.ROUTE]
    assert route.method == "POST"

    class Request:
        def __init__(self, body):
            self.body = body

        async def json(self):
            if isinstance(self.body, Exception):
                raise self.body
            return self.body

    two = _rows(_m(REF[:2], TGT[:2]))
    resp = asyncio.run(route.handler(Request(_request(two))))
    assert json.loads(resp.text)["warnings"] == mp.point_warnings(_m(REF[:2], TGT[:2]))
    resp = asyncio.run(route.handler(Request(ValueError("not json"))))
    assert "must be a JSON object" in json.loads(resp.text)["problem"]
    # Without a running server there is nothing to register with.
    assert pe.register_route() is False or pe._REGISTERED


def test_fold_warning_words_are_the_demos():
    text = point_checks.fold_warning(0.05, picture="mls_grid.png")
    assert text.startswith("the warp turns the garment over on 5.0 % of the person mask (see mls_grid.png: grid "
                           "lines cross there): some pairs cross each other")
    assert math.isclose(point_checks.FOLD_WARN_FRACTION, 0.001)
