"""Issue 13: the ComfyUI-free detectors and checks behind the hostile-input hardening (normal suite).

The registration nodes use them (tests/comfyui/test_hostile_inputs.py runs those through ComfyUI); the
Masked Extended Attention node is to call ``unusable_mask_problem``, ``inverted_mask_problem``,
``mask_latent_problem``, ``window_problem`` and ``conditioning_problem`` (see their docstrings).
"""

from __future__ import annotations

import logging
import types

import pytest
import torch

from max4zero.nodes import convert as cv
from max4zero.registration import crop as geo
from max4zero.nodes import notify
from max4zero.registration import recipe as reg
from max4zero.registration.matches import Matches
from max4zero.tensors import masks as M
from max4zero.warping import matching as mt


def _box(h=64, w=64, y0=16, y1=48, x0=16, x1=48):
    m = torch.zeros(1, h, w)
    m[:, y0:y1, x0:x1] = 1.0
    return m


# ------------------------------------------------------------------------------------------------
# item 2: non-empty but unusable masks (for the MEA node)
# ------------------------------------------------------------------------------------------------


def test_token_grids_halve_like_the_unet():
    assert M.token_grids((512, 512), [0, 1]) == [(64, 64), (32, 32)]
    assert M.token_grids((1024, 1024), [2, 0, 1]) == [(128, 128), (64, 64), (32, 32)]
    assert M.token_grids((104, 72), [1, 2]) == [(7, 5), (4, 3)]  # 13x9 latent → ⌈/2⌉
    assert M.token_grids((4, 4), [0]) == [(1, 1)]


def test_empty_masks_are_not_a_problem_zero_mask_means_no_effect():
    assert M.unusable_mask_problem(torch.zeros(1, 64, 64), [(8, 8)]) is None
    assert M.unusable_mask_problem(torch.full((2, 64, 64), 0.03), [(8, 8)]) is None  # 8-bit noise counts as empty
    assert M.unusable_mask_problem(_box(), [(8, 8), (4, 4)], erode_kernel=3) is None


def test_a_soft_mask_is_unusable():
    p = M.unusable_mask_problem(torch.full((1, 64, 64), 0.45), [(8, 8)], name="target_mask")
    assert p.startswith("target_mask is soft: no pixel above 0.5 (its largest value is 0.45)") and "ThresholdMask" in p


def test_a_thin_line_that_vanishes_at_every_token_grid_is_unusable():
    line = torch.zeros(1, 64, 64)
    line[:, 33, 10:50] = 1.0  # nearest sampling at 8x8 / 4x4 reads rows 0, 8, ... / 0, 16, ...: never 33
    p = M.unusable_mask_problem(line, M.token_grids((64, 64), [0, 1]), name="target_mask")
    assert p.startswith("target_mask vanishes at the attention token grids (8x8, 4x4)") and "GrowMask" in p
    # kept by one grid: MEA still acts there, so it is usable
    line[:, 32, 10:50] = 1.0
    assert M.unusable_mask_problem(line, M.token_grids((64, 64), [0, 1])) is None
    # no grids given: only soft / erosion are checked
    assert M.unusable_mask_problem(torch.nn.functional.pad(torch.ones(1, 1, 8), (0, 56, 33, 30)), []) is None


def test_a_mask_that_the_erosion_removes_is_unusable_and_batch_items_are_named():
    thin = torch.zeros(2, 64, 64)
    thin[0, 16:48, 16:48] = 1.0
    thin[1, 30, 10:50] = 1.0
    p = M.unusable_mask_problem(thin, [], name="garment_mask", erode_kernel=3)
    assert p.startswith("garment_mask (batch item 1) vanishes after the 1-pixel erosion")
    thin[1] = 0.0  # an empty item is fine: a batch may carry images without a garment
    assert M.unusable_mask_problem(thin, [], erode_kernel=3) is None


def test_unusable_mask_accepts_every_mask_layout():
    soft = torch.full((64, 64), 0.4)
    for m in (soft, soft[None], soft[None, None]):
        assert "soft" in M.unusable_mask_problem(m, [(8, 8)])


# ------------------------------------------------------------------------------------------------
# item 6: inverted masks
# ------------------------------------------------------------------------------------------------


def test_inverted_mask_detector():
    garment = _box()
    assert M.inverted_mask_problem(garment) is None
    p = M.inverted_mask_problem(1 - garment, "garment_mask")
    assert p.startswith("garment_mask looks inverted: it covers 100% of the image border but only 0% of the centre")
    assert "1 - alpha" in p and "InvertMask" in p
    # most of the image, border or not
    big = torch.ones(1, 64, 64)
    big[:, :3, :] = 0
    assert "covers 95% of the image" in M.inverted_mask_problem(big)
    # all white (or dilated over everything): said as it is, not called inverted (its centre is covered)
    white = M.inverted_mask_problem(torch.ones(1, 64, 64))
    assert "covers 100% of the image" in white and "all-white" in white and "looks inverted" not in white
    # a garment touching two image edges (a tight product photo) is not inverted
    assert M.inverted_mask_problem(_box(y0=10, y1=64, x0=0, x1=40)) is None
    # empty, tiny: nothing to say
    assert M.inverted_mask_problem(torch.zeros(1, 64, 64)) is None
    assert M.inverted_mask_problem(torch.ones(2, 2)) is None
    # batch: the item is named
    assert M.inverted_mask_problem(torch.cat([garment, 1 - garment])).startswith("mask (batch item 1) looks inverted")


def test_warn_on_node_logs_and_shows_the_text_on_the_executing_node(monkeypatch, caplog):
    sent = []
    server = types.ModuleType("server")
    server.PromptServer = type("PromptServer", (), {"instance": types.SimpleNamespace(
        send_progress_text=lambda text, node_id, sid=None: sent.append((node_id, text)))})
    monkeypatch.setitem(__import__("sys").modules, "server", server)
    with caplog.at_level(logging.WARNING):
        line = notify.warn_on_node("MaX4Zero X", "mask looks inverted", node_id="7")
    assert line == "MaX4Zero X: mask looks inverted"
    assert sent == [("7", line)] and line in caplog.text
    # no executing node, no server: the log only, no error
    monkeypatch.delitem(__import__("sys").modules, "server")
    assert notify.warn_on_node("MaX4Zero X", "t") == "MaX4Zero X: t"


# ------------------------------------------------------------------------------------------------
# items 4, 8: what the MEA node and the sampler-side checks use
# ------------------------------------------------------------------------------------------------


def test_mask_latent_problem_batch_and_aspect():
    assert cv.mask_latent_problem((1, 512, 512), (2, 4, 64, 64)) is None
    assert cv.mask_latent_problem((2, 512, 512), (2, 4, 64, 64)) is None
    assert cv.mask_latent_problem((515, 512), (1, 4, 64, 64)) is None  # a bare [H, W]; within one cell
    p = cv.mask_latent_problem((3, 512, 512), (2, 4, 64, 64))
    assert p.startswith("batch sizes differ (target_mask has 3, the latent being sampled has 2)")
    p = cv.mask_latent_problem((1, 256, 64), (1, 4, 8, 8))
    assert p.startswith("target_mask is 64x256 (aspect 0.25) but the latent is 8x8 cells (64x64 px, aspect 1.00)")
    assert "stretched" in p
    assert cv.mask_latent_problem((1, 768, 512), (1, 4, 96, 64)) is None
    assert cv.mask_latent_problem((1, 1040, 1024), (1, 4, 128, 128)) is None  # 1.6 %: within 2 %
    assert cv.mask_latent_problem((1, 1100, 1024), (1, 4, 128, 128)) is not None


def test_window_problem():
    assert cv.window_problem(0.7, 1.0) is None and cv.window_problem(0.5, 0.5) is None
    assert cv.window_problem(0.9, 0.2).startswith("start=0.9 is after end=0.2")
    assert "from 0 to 1" in cv.window_problem(-0.1, 1.0)
    assert "must be numbers" in cv.window_problem("a", 1.0)


def _fake_model(context_dim=None, key_width=None):
    dm = torch.nn.Module()
    if key_width is not None:
        blk = torch.nn.Module()
        blk.attn2 = torch.nn.Module()
        blk.attn2.to_k = torch.nn.Linear(key_width, 8)
        dm.blk = blk
    cfg = types.SimpleNamespace(unet_config={"context_dim": context_dim} if context_dim else {})
    return types.SimpleNamespace(model=types.SimpleNamespace(model_config=cfg, diffusion_model=dm))


def test_conditioning_problem_compares_with_the_model_context_width():
    sd15, sdxl = _fake_model(768), _fake_model(2048)
    cond768 = [[torch.zeros(1, 77, 768), {}]]
    assert cv.model_context_dim(sd15) == 768 and cv.model_context_dim(_fake_model(key_width=1024)) == 1024
    assert cv.model_context_dim(_fake_model()) is None
    assert cv.conditioning_problem(cond768, sd15) is None
    p = cv.conditioning_problem(cond768, sdxl)
    assert p.startswith("positive is text conditioning 768 wide but this model's cross-attention takes 2048")
    assert cv.conditioning_problem(cond768, _fake_model()) is None  # unknown width: nothing to compare
    assert "not a CONDITIONING" in cv.conditioning_problem("text", sd15)
    assert cv.conditioning_problem(cond768 + [[torch.zeros(1, 77, 1024), {}]], sd15).startswith(
        "positive is text conditioning 1024 wide")


# ------------------------------------------------------------------------------------------------
# widget checks (V3 validate_inputs and execute share them)
# ------------------------------------------------------------------------------------------------


def test_check_odd_and_widgets():
    cv.check_odd("N", "k", 13)
    with pytest.raises(cv.NodeInputError, match=r"N: k=12 must be an odd whole number from 1 to 255.*use 11 or 13"):
        cv.check_odd("N", "k", 12)
    with pytest.raises(cv.NodeInputError, match=r"k=256 .*use an odd whole number from 1 to 255"):
        cv.check_odd("N", "k", 256)
    with pytest.raises(cv.NodeInputError, match=r"k='x'"):
        cv.check_odd("N", "k", "x")
    inputs = [types.SimpleNamespace(id="mode", options=["a", "b"]),
              types.SimpleNamespace(id="size", options=None, min=64, max=128)]
    cv.check_widgets("N", inputs, {"mode": "a", "size": 64})
    cv.check_widgets("N", inputs, {"mode": None, "size": None})  # linked: unknown at queue time
    with pytest.raises(cv.NodeInputError, match=r"mode='c' is not one of \['a', 'b'\]"):
        cv.check_widgets("N", inputs, {"mode": "c"})
    with pytest.raises(cv.NodeInputError, match=r"size=200 is outside 64..128"):
        cv.check_widgets("N", inputs, {"size": 200})
    with pytest.raises(cv.NodeInputError, match=r"size='big' is not a number"):
        cv.check_widgets("N", inputs, {"size": "big"})
    assert cv.validation_result(lambda: None) is True

    def bad():
        raise cv.NodeInputError("N", "p", "f")

    # raised, not returned: ComfyUI files a returned message under every input validate_inputs declares
    with pytest.raises(cv.NodeInputError, match=r"^N: p\. f$"):
        cv.validation_result(bad)
    # every number widget is finite, with or without min/max
    nums = [types.SimpleNamespace(id="x", options=None, min=None, max=None, io_type="FLOAT"),
            types.SimpleNamespace(id="n", options=None, min=0, max=10, io_type="INT")]
    for v in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(cv.NodeInputError, match=rf"N: x={v!r} is not a finite number\. give a finite number"):
            cv.check_widgets("N", nums, {"x": v})
        with pytest.raises(cv.NodeInputError, match=rf"N: n={v!r} is not a finite number\. give a number from 0 to 10"):
            cv.check_widgets("N", nums, {"n": v})
    cv.check_widgets("N", nums, {"x": -1e30, "n": 10})


def test_placeholder_mask_is_recognised():
    ph = torch.zeros(1, 64, 64)
    assert "64x64 empty placeholder that Load Image outputs" in cv.placeholder_mask_problem(ph, (96, 128))
    assert cv.placeholder_mask_problem(ph, (64, 64)) is None  # the image is 64x64 itself: just an empty mask
    assert cv.placeholder_mask_problem(_box(), (96, 128)) is None
    with pytest.raises(cv.NodeInputError, match="placeholder.*LoadImageMask"):
        cv.check_mask_size("N", "image", (96, 128), "mask", ph)
    with pytest.raises(cv.NodeInputError, match="mask is 64x64 but image is 128x96"):
        cv.check_mask_size("N", "image", (96, 128), "mask", _box())


# ------------------------------------------------------------------------------------------------
# items 1, 5, 9: crop fingerprint, far points, no-match stages
# ------------------------------------------------------------------------------------------------


def test_crop_info_fingerprint_recognises_its_photo():
    g = torch.Generator().manual_seed(0)
    a = torch.rand(1, 3, 48, 64, generator=g)
    b = torch.rand(1, 3, 48, 64, generator=g).pow(3)
    info = geo.CropInfo((48, 64), (0, 0, 48, 48), 32, fingerprint=geo.fingerprint(a))
    assert geo.fingerprint_problem(info, a) is None
    assert geo.fingerprint_problem(info, (a * 255).round() / 255) is None  # an 8-bit round trip
    assert geo.fingerprint_problem(info, torch.cat([a, torch.ones_like(a[:, :1])], 1)) is None  # RGBA copy
    p = geo.fingerprint_problem(info, b)
    assert p.startswith("crop_info was made from another 64x48 photo, not from original_image")
    assert "is 32x48 but crop_info was made from a 64x48 image" in geo.fingerprint_problem(info, a[..., :32])
    assert "batch sizes differ (original_image has 3, the photo crop_info was made from has 2)" in geo.fingerprint_problem(
        geo.CropInfo((48, 64), (0, 0, 48, 48), 32, fingerprint=geo.fingerprint(a.expand(2, -1, -1, -1))),
        a.expand(3, -1, -1, -1))
    legacy = geo.CropInfo((48, 64), (0, 0, 48, 48), 32)  # made without a fingerprint: only the size is compared
    assert geo.fingerprint_problem(legacy, b) is None
    assert info == legacy  # the fingerprint is not part of equality (nor of hashing)
    hash(info)


def test_paste_keeps_the_original_alpha_bit_for_bit():
    orig = torch.rand(1, 4, 32, 32)
    info = geo.CropInfo((32, 32), (8, 8, 24, 24), 16)
    out = geo.paste(orig, torch.rand(1, 3, 16, 16), info, feather=3)
    assert torch.equal(out[:, 3], orig[:, 3]) and not torch.equal(out[:, :3], orig[:, :3])


def test_far_points_problem():
    ok = Matches(torch.tensor([[10.0, 10.0], [-30.0, 70.0]]), torch.tensor([[5.0, 5.0], [90.0, -20.0]]),
                 torch.ones(2), (64, 64), (64, 64))
    assert reg.far_points_problem(ok) is None
    far = Matches(torch.tensor([[10.0, 10.0], [1e6, 10.0]]), torch.tensor([[5.0, 5.0], [6.0, 6.0]]), torch.ones(2),
                  (64, 48), (64, 64))
    p = reg.far_points_problem(far)
    assert p.startswith("control point #1 has reference point (1e+06, 10), far outside the 48x64 reference image")
    assert "x from 0 to 47, y from 0 to 63" in p
    inf = Matches(torch.tensor([[10.0, 10.0]]), torch.tensor([[1e30, 5.0]]), torch.ones(1), (64, 64), (64, 64))
    assert "target point" in reg.far_points_problem(inf)


def test_no_match_errors_say_where_the_matches_were_lost():
    ia, ib, sc = torch.tensor([0, 5]), torch.tensor([1, 6]), torch.tensor([0.2, 0.3])
    with pytest.raises(mt.NoMatchError) as e:
        mt.control_points(ia, ib, sc, (4, 4), (4, 4), mode="deterministic", threshold=0.9)
    assert e.value.stage == "control_points" and e.value.detail == "no control points: no match has score ≥ 0.9"
    assert isinstance(e.value, ValueError)  # library callers that catch ValueError keep working
    g = torch.Generator().manual_seed(0)
    idx_a, idx_b = torch.randperm(2500, generator=g)[:12], torch.randperm(2500, generator=g)[:12]
    with pytest.raises(mt.NoMatchError) as e:
        mt.filter_matches(idx_a, idx_b, torch.ones(12), (50, 50), (50, 50), threshold=1e-3)
    assert e.value.stage == "ransac" and e.value.detail.startswith("no matches survive the outlier filter")
