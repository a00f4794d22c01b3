"""The ComfyUI-free parts of ``nodes/``: layout conversions and checks, crop/paste geometry, the matches
type and its JSON, the stage-1 glue (features → matches, MLS warp, double mask) and the previews.
Runs without ComfyUI installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from max4zero.nodes import convert as cv
from max4zero.registration import crop as geo
from max4zero.registration import previews as pv
from max4zero.tensors.images import grey_out
from max4zero.registration import recipe as reg
from max4zero.registration.matches import FORMAT, Matches

ROOT = Path(__file__).resolve().parents[1]


def test_pure_node_modules_do_not_import_comfy():
    code = (
        "import sys; sys.path.insert(0, %r); from pack_import import import_pack; import_pack()\n"
        "import max4zero.nodes.convert, max4zero.registration.crop, max4zero.registration.matches\n"
        "import max4zero.registration.recipe, max4zero.registration.previews\n"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('comfy', 'comfy_api', 'nodes', 'folder_paths')]\n"
        "assert not bad, bad\n"
    ) % str(ROOT / "tools")
    subprocess.run([sys.executable, "-c", code], check=True)


# ------------------------------------------------------------------------------------------------
# conversions
# ------------------------------------------------------------------------------------------------


def test_image_roundtrip_and_layout():
    img = torch.rand(2, 5, 7, 3)
    x = cv.image_to_bchw(img, "N")
    assert x.shape == (2, 3, 5, 7)
    assert torch.equal(x[1, 2, 4, 6], img[1, 4, 6, 2])
    assert torch.equal(cv.bchw_to_image(x), img)
    assert cv.image_to_bchw(torch.rand(5, 7, 4), "N").shape == (1, 4, 5, 7)  # bare [H, W, C], RGBA
    u8 = (torch.rand(1, 4, 4, 3) * 255).to(torch.uint8)
    assert torch.allclose(cv.image_to_bchw(u8, "N"), u8.permute(0, 3, 1, 2).float() / 255)
    assert cv.bchw_to_image(torch.full((1, 3, 2, 2), 2.0)).max() == 1.0


@pytest.mark.parametrize(
    "bad, needle",
    [(torch.rand(1, 5, 7), "expected an IMAGE"), (torch.rand(1, 3, 5, 7, 2), "expected an IMAGE"),
     ("nope", "not an IMAGE tensor"), (torch.full((1, 2, 2, 3), float("nan")), "NaN")],
)
def test_image_errors_name_node_and_fix(bad, needle):
    with pytest.raises(ValueError) as e:
        cv.image_to_bchw(bad, "MaX4Zero Thing", "target_image")
    msg = str(e.value)
    assert msg.startswith("MaX4Zero Thing: ") and needle in msg and "target_image" in msg


def test_mask_normalisation():
    assert cv.mask_to_bhw(torch.ones(4, 6), "N").shape == (1, 4, 6)
    assert cv.mask_to_bhw(torch.ones(2, 1, 4, 6), "N").shape == (2, 4, 6)
    assert cv.mask_to_bhw(torch.ones(2, 4, 6, dtype=torch.bool), "N").dtype == torch.float32
    assert cv.mask_to_bhw(torch.full((1, 2, 2), 255, dtype=torch.uint8), "N").max() == 1.0
    with pytest.raises(ValueError, match="is an IMAGE, not a MASK"):
        cv.mask_to_bhw(torch.rand(1, 4, 6, 3), "N")
    with pytest.raises(ValueError, match="expected a MASK"):
        cv.mask_to_bhw(torch.rand(4), "N")


def test_broadcast_and_checks():
    out = cv.broadcast_batch("N", a=torch.zeros(1, 2, 2), b=torch.zeros(3, 2, 2, 3))
    assert out["a"].shape == (3, 2, 2) and out["b"].shape == (3, 2, 2, 3)
    with pytest.raises(ValueError, match="batch sizes differ .*a has 2, b has 3"):
        cv.broadcast_batch("N", a=torch.zeros(2, 2, 2), b=torch.zeros(3, 2, 2))
    cv.check_same_size("N", "img", (4, 5), "m", (4, 5))
    with pytest.raises(ValueError, match=r"m is 4x5 but img is 5x4"):
        cv.check_same_size("N", "img", (4, 5), "m", (5, 4))
    with pytest.raises(ValueError, match="m is empty"):
        cv.check_nonempty("N", "m", torch.zeros(1, 3, 3))
    with pytest.raises(ValueError, match=r"m is soft: no pixel above 0.5 \(its largest value is 0.40\).*ThresholdMask"):
        cv.check_nonempty("N", "m", torch.full((1, 3, 3), 0.4))
    with pytest.raises(ValueError, match=r"mode='x' is not one of \['a', 'b'\]"):
        cv.check_choice("N", "mode", "x", ("a", "b"))
    err = cv.NodeInputError("N", "p.", "do f")
    assert str(err) == "N: p. do f" and (err.node, err.problem, err.fix) == ("N", "p.", "do f")
    assert str(cv.NodeInputError("N", "p")) == "N: p."


# ------------------------------------------------------------------------------------------------
# crop / paste
# ------------------------------------------------------------------------------------------------


def _mask(H, W, y0, y1, x0, x1):
    m = torch.zeros(1, 1, H, W)
    m[..., y0:y1, x0:x1] = 1
    return m


@pytest.mark.parametrize(
    "H, W, box",
    [(100, 160, (20, 60, 30, 90)), (64, 300, (10, 50, 280, 300)), (300, 64, (250, 300, 0, 20)),
     (40, 40, (0, 40, 0, 40)), (33, 517, (5, 9, 500, 517))],
)
def test_square_box_is_square_and_covers_mask(H, W, box):
    m = _mask(H, W, *box)
    x0, y0, x1, y1 = geo.square_box(m, padding=0.1)
    assert x1 - x0 == y1 - y0 >= 8
    assert x0 <= box[2] and x1 >= box[3] and y0 <= box[0] and y1 >= box[1]
    side = x1 - x0
    if side <= W:
        assert 0 <= x0 and x1 <= W  # shifted inside when it fits
    else:
        assert x0 <= 0 and x1 >= W
    if side <= H:
        assert 0 <= y0 and y1 <= H


def test_crop_is_exact_when_no_resize_and_paste_roundtrips_exactly():
    H, W = 90, 120
    img = torch.rand(1, 3, H, W)
    m = _mask(H, W, 30, 60, 40, 70)
    box = geo.square_box(m, padding=0.0)
    info = geo.CropInfo((H, W), box, box[2] - box[0])
    c = geo.crop(img, info)
    x0, y0, x1, y1 = box
    assert torch.equal(c, img[..., y0:y1, x0:x1])
    out = geo.paste(img, c, info, mask=None, feather=1)
    assert torch.equal(out, img)


def test_paste_outside_mask_is_bit_exact_and_feather_stays_inside():
    H, W = 70, 110
    img = torch.rand(2, 3, H, W)
    m = _mask(H, W, 20, 50, 60, 100)
    info = geo.CropInfo((H, W), geo.square_box(m, 0.25), 64)
    gen = torch.zeros(2, 3, 64, 64)  # black result: easy to see where it lands
    out = geo.paste(img, gen, info, mask=m, feather=5)
    outside = m[0, 0] < 0.5
    assert torch.equal(out[:, :, outside], img[:, :, outside])
    inner = torch.zeros(H, W, dtype=torch.bool)
    inner[22:48, 62:98] = True  # >= feather//2 away from the mask edge: fully pasted
    assert torch.allclose(out[:, :, inner], torch.zeros(1), atol=1e-6)
    ring = (~outside) & ~inner
    assert (out[:, :, ring] > 0).any()  # the seam is blended inside the mask


def test_paste_accepts_crop_space_mask_and_box_outside_image():
    H, W = 40, 200  # very wide: the square box is taller than the image
    img = torch.rand(1, 3, H, W)
    m = _mask(H, W, 5, 35, 150, 195)
    info = geo.CropInfo((H, W), geo.square_box(m, 0.3), 32)
    assert info.box[1] < 0 or info.box[3] > H
    c = geo.crop(img, info)
    cm = geo.crop_mask(m, info)
    assert c.shape == (1, 3, 32, 32) and cm.shape == (1, 1, 32, 32)
    out = geo.paste(img, torch.ones(1, 3, 32, 32), info, mask=cm, feather=3)
    full = geo.uncrop_mask(cm, info) > 0.5
    assert torch.equal(out[:, :, ~full[0, 0]], img[:, :, ~full[0, 0]])
    assert (out[:, :, full[0, 0]] > img[:, :, full[0, 0]] - 1e-6).all()
    # down/up resize round trip keeps the picture (smooth content)
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    smooth = torch.stack([xx / W, yy / H, 0.5 + 0 * xx], 0)[None].float()
    back = geo.paste(smooth, geo.crop(smooth, info), info, mask=m, feather=1)
    assert (back - smooth).abs().max() < 0.03


def test_paste_errors():
    info = geo.CropInfo((10, 10), (0, 0, 10, 10), 8)
    with pytest.raises(ValueError, match="odd"):
        geo.paste(torch.rand(1, 3, 10, 10), torch.rand(1, 3, 8, 8), info, feather=2)
    with pytest.raises(ValueError, match="crop was made for"):
        geo.paste(torch.rand(1, 3, 12, 10), torch.rand(1, 3, 8, 8), info)
    with pytest.raises(ValueError, match="empty"):
        geo.square_box(torch.zeros(1, 1, 5, 5))


# ------------------------------------------------------------------------------------------------
# matches
# ------------------------------------------------------------------------------------------------


def _matches(k=5):
    g = torch.Generator().manual_seed(0)
    return Matches(torch.rand(k, 2, generator=g) * 100, torch.rand(k, 2, generator=g) * 50,
                   torch.rand(k, generator=g), (120, 110), (64, 48))


def test_matches_json_roundtrip():
    m = _matches()
    doc = json.loads(m.to_json())
    assert doc["format"] == FORMAT and doc["reference_size"] == [120, 110] and len(doc["points"]) == 5
    back = Matches.from_json(m.to_json())
    assert back.reference_size == m.reference_size and back.target_size == m.target_size
    for a, b in ((back.reference_points, m.reference_points), (back.target_points, m.target_points),
                 (back.scores, m.scores)):
        assert torch.allclose(a, b, atol=5e-4)


def test_matches_short_forms_and_defaults():
    pairs = Matches.from_json("[[[1, 2], [3, 4]], [[5, 6], [7, 8]]]", (10, 10), (20, 20))
    assert pairs.reference_points.tolist() == [[1, 2], [5, 6]] and pairs.scores.tolist() == [1.0, 1.0]
    rows = Matches.from_json({"points": [[1, 2, 3, 4, 0.5]], "target_size": [8, 9]}, (10, 10))
    assert rows.target_points.tolist() == [[3, 4]] and rows.scores.tolist() == [0.5] and rows.target_size == (8, 9)


@pytest.mark.parametrize(
    "text, needle",
    [("", "empty"), ("{bad", "does not parse"), ('{"pts": []}', "'points'"), ('{"points": []}', "no points"),
     ('{"points": [[1, 2]]}', "#0"), ('{"points": [{"reference": [1, 2]}]}', "#0"),
     ('{"format": "other/2", "points": [[[1,2],[3,4]]]}', "unknown control-point format")],
)
def test_matches_json_errors_are_explained(text, needle):
    with pytest.raises(ValueError, match=needle):
        Matches.from_json(text, (10, 10), (10, 10))


def test_matches_json_needs_sizes_and_valid_shapes():
    with pytest.raises(ValueError, match="reference_size"):
        Matches.from_json("[[[1, 2], [3, 4]]]")
    with pytest.raises(ValueError, match="one length"):
        Matches(torch.zeros(3, 2), torch.zeros(2, 2), torch.zeros(3), (1, 1), (1, 1))
    with pytest.raises(ValueError, match="finite"):
        Matches(torch.full((1, 2), float("nan")), torch.zeros(1, 2), torch.zeros(1), (1, 1), (1, 1))


def test_matches_rescale_and_subset():
    m = _matches()
    r = m.rescaled((240, 55), (64, 96))
    assert torch.allclose(r.reference_points, (m.reference_points + 0.5) * torch.tensor([0.5, 2.0]) - 0.5)
    assert torch.allclose(r.target_points, (m.target_points + 0.5) * torch.tensor([2.0, 1.0]) - 0.5)
    back = r.rescaled(m.reference_size, m.target_size)
    assert torch.allclose(back.reference_points, m.reference_points, atol=1e-5)
    assert r.reference_size == (240, 55) and len(m.subset(m.scores > 0.5)) == int((m.scores > 0.5).sum())


# ------------------------------------------------------------------------------------------------
# stage-1 glue
# ------------------------------------------------------------------------------------------------


def test_matches_from_identical_features_are_identity_and_scaled_back():
    g = torch.Generator().manual_seed(1)
    feat = torch.randn(32, 6, 8, generator=g)
    mask = torch.ones(6, 8, dtype=torch.bool)
    m = reg.matches_from_features(feat, feat, mask, mask, (96, 128), (96, 128), (48, 64), (192, 256),
                                  outlier_filter="ransac", control_points="all")
    assert len(m) == 6 * 8 * 4
    # reference at half size, target at double size, same content: points scale by 0.5 and 2
    assert torch.allclose((m.reference_points + 0.5) * 4 - 0.5, m.target_points)
    assert m.reference_size == (48, 64) and m.target_size == (192, 256)


def test_grid_mask_keeps_a_thin_garment():
    m = torch.zeros(1, 64, 64)
    m[:, 20:23, :] = 1  # 3-px strap: nearest at 4x4 misses it
    g = reg.grid_mask(m, (4, 4))
    assert g.shape == (4, 4) and g.any()


def test_warp_garment_translation_and_rescaled_matches():
    H = W = 64
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    ref = torch.stack([xx / W, yy / H, 0 * xx + 0.5], 0)[None].float()
    gm = torch.zeros(1, H, W)
    gm[:, 16:48, 16:48] = 1
    src = torch.tensor([[16.0, 16], [47, 16], [16, 47], [47, 47]])
    m = Matches(src, src + torch.tensor([5.0, -3.0]), torch.ones(4), (H, W), (H, W))
    warped, wm, grid = reg.warp_garment(ref, gm, m, (H, W), "affine", 0.1, 1, "nearest")
    assert warped.shape == (1, 3, H, W) and wm.shape == (1, H, W) and grid.shape == (1, H, W)
    assert torch.equal(warped[..., 20:40, 25:45], ref[..., 23:43, 20:40])
    assert torch.equal(wm[0, 13:45, 21:53], torch.ones(32, 32)) and wm.sum() == 32 * 32
    # the same matches made for a 2x larger pair give the same warp on these images
    big = m.rescaled((2 * H, 2 * W), (2 * H, 2 * W))
    warped2, wm2, _ = reg.warp_garment(ref, gm, big, (H, W), "affine", 0.1, 1, "nearest")
    assert torch.equal(wm2, wm) and torch.equal(warped2, warped)


def test_double_mask_matches_spec_and_protect_order():
    t = torch.zeros(1, 40, 40)
    t[:, 10:30, 10:30] = 1
    w = torch.zeros(1, 40, 40)
    w[:, 10:30, 10:20] = 1
    p = torch.zeros(1, 40, 40)
    p[:, 0:40, 0:5] = 1
    tm, F_, D_ = reg.double_mask(t, w, p, target_dilation=3, fringe_dilation=5)
    exp_t = torch.zeros(1, 40, 40)
    exp_t[:, 9:31, 9:31] = 1  # protect did not touch the mask; 3x3 dilation grows it by 1
    assert torch.equal(tm, exp_t)
    exp_f = exp_t.clone()
    exp_f[:, 10:30, 10:20] = 0
    assert torch.equal(F_, exp_f)
    assert (D_ >= F_).all() and (D_ <= tm).all() and D_.sum() > F_.sum()
    # protect removed BEFORE dilating (paper order): a protect strip inside the mask is re-grown into
    p2 = torch.zeros(1, 40, 40)
    p2[:, 19:20, 10:30] = 1
    tm2, _, _ = reg.double_mask(t, w, p2, target_dilation=3, fringe_dilation=1)
    assert tm2[0, 19, 15] == 1
    tm3, _, _ = reg.double_mask(t, w, p2, target_dilation=1, fringe_dilation=1)
    assert tm3[0, 19, 15] == 0
    assert torch.equal(grey_out(torch.ones(1, 3, 2, 2), torch.tensor([[[1.0, 0.4], [0.6, 0.0]]]))[0, 0],
                       torch.tensor([[0.5, 1.0], [0.5, 1.0]]))


# ------------------------------------------------------------------------------------------------
# previews
# ------------------------------------------------------------------------------------------------


# ------------------------------------------------------------------------------------------------
# stage-1 feature noise (docs/method.md §2a: independent draws for the two images)
# ------------------------------------------------------------------------------------------------


def test_feature_noise_differs_between_the_images_and_is_seeded():
    shapes = [(4, 8, 8), (4, 8, 8)]
    ref, tgt = reg.feature_noise(shapes, 1, seed=3)
    assert ref.shape == tgt.shape == (1, 4, 8, 8) and ref.dtype == torch.float32
    # same size, same seed: still different noise (re-seeding per image would make them equal)
    assert not torch.equal(ref, tgt)
    again = reg.feature_noise(shapes, 1, seed=3)
    assert torch.equal(again[0], ref) and torch.equal(again[1], tgt)
    other = reg.feature_noise(shapes, 1, seed=4)
    assert not torch.equal(other[0], ref) and not torch.equal(other[1], tgt)
    # no image gets the noise of a generator freshly seeded for it alone, except the first one
    fresh = torch.randn((4, 8, 8), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ref[0], fresh) and not torch.equal(tgt[0], fresh)
    # independent: uncorrelated, each N(0, 1)
    a, b = reg.feature_noise([(4, 64, 64)] * 2, 1, seed=0)
    corr = torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1]
    assert abs(float(corr)) < 0.05
    assert abs(float(a.std()) - 1) < 0.05 and abs(float(b.mean())) < 0.05


def test_feature_noise_dift_ensemble_draws_are_batches_of_two():
    shapes = [(4, 8, 8), (4, 6, 10)]  # images of different sizes are fine
    ref, tgt = reg.feature_noise(shapes, 3, seed=11)
    assert ref.shape == (3, 4, 8, 8) and tgt.shape == (3, 4, 6, 10)
    # draw k of image i is call k*2 + i of one generator seeded once
    gen = torch.Generator().manual_seed(11)
    for k in range(3):
        assert torch.equal(ref[k], torch.randn(shapes[0], generator=gen))
        assert torch.equal(tgt[k], torch.randn(shapes[1], generator=gen))
    # all six draws differ (same-size check on the first 4x6x8 corner)
    rows = [x[:, :6, :8].flatten() for x in (*ref, *tgt)]
    assert all(not torch.equal(rows[i], rows[j]) for i in range(6) for j in range(i + 1, 6))
    # paper mode is the first batch of the same sequence
    p_ref, p_tgt = reg.feature_noise(shapes, 1, seed=11)
    assert torch.equal(p_ref[0], ref[0]) and torch.equal(p_tgt[0], tgt[0])
    with pytest.raises(ValueError, match="draws"):
        reg.feature_noise(shapes, 0, seed=0)


def test_registration_docstring_examples():
    import doctest

    res = doctest.testmod(reg, raise_on_error=False)
    assert res.attempted >= 3 and res.failed == 0


def test_match_preview_draws_lines_coloured_by_score():
    ref = torch.zeros(3, 40, 30)
    tgt = torch.zeros(3, 20, 50)
    rp = torch.tensor([[5.0, 5.0], [20.0, 30.0]])
    tp = torch.tensor([[10.0, 10.0], [40.0, 15.0]])
    img = pv.match_preview(ref, tgt, rp, tp, torch.tensor([0.2, 0.9]))
    assert img.shape == (3, 40, 30 + 8 + 100)  # target scaled to the reference's height
    assert torch.equal(img[:, 5, 5], torch.tensor([1.0, 0.0, 0.0]))  # lowest score: red
    assert torch.equal(img[:, 30, 20], torch.tensor([0.0, 1.0, 0.0]))  # highest: green
    colors = pv.score_colors(torch.tensor([0.0, 0.5, 1.0]))
    assert torch.equal(colors[1], torch.tensor([1.0, 1.0, 0.0]))


def test_warp_and_fringe_previews():
    t = torch.zeros(3, 16, 16)
    w = torch.ones(3, 16, 16)
    wm = torch.zeros(16, 16)
    wm[4:12, 4:12] = 1
    grid = pv.grid_lines(16, 16, 8)[0, 0]
    prev = pv.warp_preview(t, w, wm, grid)
    assert torch.equal(prev[:, 0, 0], torch.zeros(3)) and torch.equal(prev[:, 8, 8], torch.tensor([1.0, 0, 1]))
    assert torch.allclose(prev[:, 5, 5], torch.full((3,), 0.75))
    f = torch.zeros(16, 16)
    f[0, 0] = 1
    d = torch.zeros(16, 16)
    d[0, :2] = 1
    fp = pv.fringe_preview(torch.zeros(3, 16, 16), f, d)
    assert fp[0, 0, 0] > 0.5 and fp[1, 0, 0] < 0.1 and fp[1, 0, 1] > 0.3 and torch.equal(fp[:, 5, 5], torch.zeros(3))
