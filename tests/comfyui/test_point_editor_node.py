"""MLS Warp's side of the point editor, through ComfyUI's own execution: the optional manual_points_mode (its
default keeps what saved workflows did), the editor's payload in the node's UI output (crops saved as temp
previews, the matches at the image sizes) and the refusals the editor relies on."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import comfy_models as cm
from comfy_models import Graph, PromptFailed, run_prompt

SIZE = 128


@pytest.fixture(scope="module")
def pair():
    return cm.synthetic_pair(SIZE)


@pytest.fixture(scope="module")
def pack(comfy_env):
    return (cm.pack_module("registration.manual_points"), cm.pack_module("registration.matches").Matches,
            cm.pack_module("nodes.point_editor"))


def _automatic(Matches):
    # Four corners moved by (+10, +6): the "automatic" matches of a pure translation.
    ref = torch.tensor([[x, y] for x in (32.0, 95.0) for y in (32.0, 95.0)])
    return Matches(ref, ref + torch.tensor([10.0, 6.0]), torch.ones(4), (SIZE, SIZE), (SIZE, SIZE))


def _run(pair, matches=None, manual="", **over):
    g = Graph()
    inputs = dict(reference_image=g.obj(pair["reference"], "IMAGE"), garment_mask=g.obj(pair["garment_mask"], "MASK"),
                  target_image=g.obj(pair["target"], "IMAGE"))
    inputs.update(dict(kind="affine", alpha=0.1, stride=4, sampling="nearest"), **over)
    if matches is not None:
        inputs["matches"] = g.obj(matches, "MAX4ZERO_MATCHES")
    if manual:
        inputs["manual_points"] = manual
    w = g.node("MaX4ZeroMLSWarp", **inputs)
    g.capture(w[0], "warped")
    res = run_prompt(g)
    return res, w.id


def test_modes_replace_by_default_and_add_on_request(comfy_env, pair, pack):
    mp, Matches, _ = pack
    auto = _automatic(Matches)
    # One manual pair pulling the middle of the garment 12 px further right than the matches do.
    manual = json.dumps({"points": [{"reference": [64, 64], "target": [86, 70]}]})
    plain, _ = _run(pair, auto)
    default, _ = _run(pair, auto, manual)
    replaced, _ = _run(pair, auto, manual, manual_points_mode=mp.REPLACE)
    added, _ = _run(pair, auto, manual, manual_points_mode=mp.ADD)
    only_manual, _ = _run(pair, None, manual)
    assert torch.equal(default["warped"], replaced["warped"]) and torch.equal(default["warped"], only_manual["warped"])
    assert not torch.equal(added["warped"], plain["warped"]) and not torch.equal(added["warped"], replaced["warped"])
    # Add = the matches and the manual pair in one set, typed by hand.
    both = json.dumps({"points": [[[x, y], [x + 10, y + 6]] for x in (32, 95) for y in (32, 95)]
                       + [[[64, 64], [86, 70]]]})
    typed, _ = _run(pair, None, both)
    assert torch.equal(added["warped"], typed["warped"])
    # No manual points: the matches, in either mode.
    assert torch.equal(_run(pair, auto, "", manual_points_mode=mp.ADD)[0]["warped"], plain["warped"])


def test_the_editor_payload_comes_with_the_result(comfy_env, pair, pack):
    mp, Matches, pe = pack
    auto = _automatic(Matches)
    res, nid = _run(pair, auto, manual_points_mode=mp.ADD, kind="rigid", alpha=0.5)
    (payload,) = res.ui[nid][pe.UI_KEY]
    assert payload["reference_size"] == [SIZE, SIZE] and payload["target_size"] == [SIZE, SIZE]
    assert payload["automatic"] == [[*a, *b] for a, b in zip(auto.reference_points.tolist(),
                                                                auto.target_points.tolist())]
    assert (payload["kind"], payload["alpha"], payload["mode"]) == ("rigid", 0.5, mp.ADD)
    import folder_paths
    from PIL import Image

    for key, mode in (("garment", "RGB"), ("garment_mask", "L"), ("person", "RGB")):
        ref = payload["images"][key]
        assert ref["type"] == "temp"
        path = Path(folder_paths.get_temp_directory()) / ref["subfolder"] / ref["filename"]
        with Image.open(path) as img:
            assert img.size == (SIZE, SIZE) and img.mode == mode
    # The person crop as it came in (8-bit rounding only).
    with Image.open(Path(folder_paths.get_temp_directory()) / payload["images"]["person"]["filename"]) as img:
        got = torch.from_numpy(np.asarray(img).copy()).float() / 255
    assert (got - pair["target"][0]).abs().max() <= 0.5 / 255 + 1e-6


def test_too_many_manual_points_are_refused_at_queue_time(comfy_env, pair, pack):
    mp, _, _ = pack
    rows = [[[i % 100, i // 100], [i % 100, i // 100]] for i in range(mp.MAX_MANUAL_POINTS + 1)]
    with pytest.raises(PromptFailed) as e:
        _run(pair, None, json.dumps(rows))
    assert e.value.exception_type == "validation" or "validation" in str(e.value)
    assert "MaX4Zero MLS Warp: manual_points:" in e.value.message and "more than the" in e.value.message
    with pytest.raises(PromptFailed, match="is not one of"):
        _run(pair, None, json.dumps(rows[:4]), manual_points_mode="merge")
