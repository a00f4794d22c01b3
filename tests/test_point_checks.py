"""warping.point_checks: degenerate control points are named in plain words, good ones pass silently."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from max4zero.warping import mls
from max4zero.warping.point_checks import control_point_warnings, fold_fraction

POINTS = Path(__file__).resolve().parents[1] / "tools" / "samples" / "points.json"


def _sample() -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    doc = json.loads(POINTS.read_text())
    ref = torch.tensor([p["reference"] for p in doc["points"]], dtype=torch.float64)
    tgt = torch.tensor([p["target"] for p in doc["points"]], dtype=torch.float64)
    return ref, tgt, [p.get("label", "") for p in doc["points"]]


def test_the_shipped_points_give_no_warning_and_no_fold():
    ref, tgt, labels = _sample()
    assert control_point_warnings(ref, tgt, labels) == []
    coords = mls.backward_map(tgt.float(), ref.float(), 128, 128, kind="affine", alpha=1.0, stride=1)
    assert fold_fraction(coords) == 0.0


@pytest.mark.parametrize("k, expect", [(1, "only one distinct"), (2, "only two distinct")])
def test_one_or_two_points_say_the_warp_is_global_and_ask_for_three(k, expect):
    ref, tgt, _ = _sample()
    warnings = control_point_warnings(ref[:k], tgt[:k])
    assert len(warnings) == 1 and expect in warnings[0] and "at least 3" in warnings[0]
    # A repeated pair does not count as a second point.
    assert "only one distinct" in control_point_warnings(ref[[0, 0]], tgt[[0, 0]])[0]


def test_collinear_points_are_named_per_photo():
    ref = torch.tensor([[10.0, 10.0], [50.0, 50.0], [90.0, 90.2]])
    tgt = torch.tensor([[20.0, 30.0], [80.0, 35.0], [60.0, 90.0]])
    warnings = control_point_warnings(ref, tgt)
    assert len(warnings) == 1 and warnings[0].startswith("all reference points lie on one line")
    assert "Add points away from the line" in warnings[0]
    both = control_point_warnings(ref, ref * 2)
    assert [w.split(" lie")[0] for w in both] == ["all reference points", "all target points"]
    # Points spread off the line: silent.
    assert control_point_warnings(tgt, tgt + 5.0) == []


def test_one_reference_point_with_two_targets_is_named_with_both_places():
    ref, tgt, labels = _sample()
    ref2 = torch.cat([ref, ref[:1]])
    tgt2 = torch.cat([tgt, tgt[:1] + torch.tensor([60.0, 40.0], dtype=torch.float64)])
    warnings = control_point_warnings(ref2, tgt2, labels + ["copy"])
    assert len(warnings) == 1
    assert "reference points 1 (neck left) and 15 (copy) are the same garment pixel (206, 60)" in warnings[0]
    assert "(178, 180) and (238, 220)" in warnings[0] and "Keep one" in warnings[0]
    # The reverse: one person pixel reading two garment pixels.
    warnings = control_point_warnings(torch.cat([ref, ref[:1] + 50.0]), torch.cat([tgt, tgt[:1]]))
    assert len(warnings) == 1 and warnings[0].startswith("target points 1 and 15 are the same person pixel")


def test_a_mirrored_garment_is_named():
    ref, tgt, _ = _sample()
    mirrored = tgt.clone()
    mirrored[:, 0] = 511 - mirrored[:, 0]
    warnings = control_point_warnings(ref, mirrored)
    assert len(warnings) == 1 and "mirror" in warnings[0]


def test_swapped_pairs_fold_the_map_and_fold_fraction_sees_it():
    ref, tgt, _ = _sample()
    swapped = tgt.clone()
    swapped[[3, 4]] = swapped[[4, 3]]  # shoulders swapped: the point checks cannot tell, the map folds
    coords = mls.backward_map(swapped.float(), ref.float(), 128, 128, kind="affine", alpha=1.0, stride=1)
    assert fold_fraction(coords) > 0.05
    region = torch.zeros(128, 128, dtype=torch.bool)
    assert fold_fraction(coords, region) == 0.0  # empty region: nothing counted


def test_fold_fraction_on_known_maps():
    ys, xs = torch.meshgrid(torch.arange(8.0), torch.arange(8.0), indexing="ij")
    identity = torch.stack([xs, ys], -1)
    assert fold_fraction(identity) == 0.0
    assert fold_fraction(identity * torch.tensor([-1.0, 1.0])) == 1.0  # a mirror turns everything over
    assert fold_fraction(identity[:1]) == 0.0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="pairs"):
        control_point_warnings([[0, 0], [1, 1]], [[0, 0]])
    with pytest.raises(ValueError, match=r"\[x, y\]"):
        control_point_warnings([[0, 0, 0]], [[0, 0, 0]])
    assert "no control points" in control_point_warnings([], [])[0]
