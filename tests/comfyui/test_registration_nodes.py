"""Stage-1 nodes (correspondence, MLS warp, double-mask inpaint, crop/paste) run through ComfyUI's own
execution on random-weight models, and the whole first stage through the stock KSamplerAdvanced."""

from __future__ import annotations

import json

import pytest
import torch

import comfy_models as cm
from comfy_models import Graph, PromptFailed, run_prompt

SIZE = 128


@pytest.fixture(scope="module")
def pair():
    return cm.synthetic_pair(SIZE)


def _correspondence(g: Graph, model, vae, pair, *, mode="paper", ensemble=2, outlier_filter="none",
                    control_points="all", same=False, seed=0, **over):
    ref, gm = pair["reference"], pair["garment_mask"]
    tgt, tm = (ref, gm) if same else (pair["target"], pair["target_mask"])
    inputs = dict(
        model=g.obj(model, "MODEL"), vae=g.obj(vae, "VAE"), positive=g.obj(cm.conditioning(1), "CONDITIONING"),
        reference_image=g.obj(ref, "IMAGE"), garment_mask=g.obj(gm, "MASK"),
        target_image=g.obj(tgt, "IMAGE"), target_mask=g.obj(tm, "MASK"),
        mode=mode, ensemble=ensemble, outlier_filter=outlier_filter, outlier_threshold=5.0,
        control_points=control_points, score_threshold=0.5, seed=seed,
    )
    inputs.update(over)
    return g.node("MaX4ZeroCorrespondence", **inputs)


# ------------------------------------------------------------------------------------------------
# loading
# ------------------------------------------------------------------------------------------------


def test_pack_is_loaded_by_comfyui_own_loader(comfy_env):
    import nodes

    for nid in cm.REGISTRATION_NODE_IDS:
        assert nid in comfy_env["node_ids"], f"{nid} not registered by nodes.load_custom_node"
        cls = nodes.NODE_CLASS_MAPPINGS[nid]
        assert cls.CATEGORY == "MaX4Zero"
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[nid].startswith("MaX4Zero ")
        # loaded from this checkout through the real path (module key = folder path)
        assert cls.RELATIVE_PYTHON_MODULE.startswith("custom_nodes.")


def test_every_pack_node_documents_itself(comfy_env):
    for cls in cm.pack_node_classes():
        schema = cls.GET_SCHEMA()
        assert schema.node_id.startswith("MaX4Zero"), schema.node_id
        assert schema.description and len(schema.description) > 40, schema.node_id
        for i in schema.inputs:
            assert i.tooltip, f"{schema.node_id}.{i.id} has no tooltip"
        for o in schema.outputs:
            assert o.display_name and o.tooltip, f"{schema.node_id} output {o.id} lacks display_name/tooltip"


# ------------------------------------------------------------------------------------------------
# crop / paste
# ------------------------------------------------------------------------------------------------


def test_crop_then_paste_returns_original_outside_mask(comfy_env):
    g = Graph()
    H, W = 150, 230  # odd, non-square: the square crop must reach outside or shift
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    img = torch.stack([xx / W, yy / H, (xx + yy) % 7 / 7.0], -1)[None].float()
    mask = ((yy > 40) & (yy < 120) & (xx > 150) & (xx < 220)).float()[None]
    crop = g.node("MaX4ZeroCropToMask", image=g.obj(img, "IMAGE"), mask=g.obj(mask, "MASK"), size=64, padding=0.2)
    paste = g.node("MaX4ZeroPasteBack", original_image=g.obj(img, "IMAGE"), generated_image=crop[0],
                   crop_info=crop[2], mask=g.obj(mask, "MASK"), feather=3)
    g.capture(crop[0], "crop")
    g.capture(crop[1], "crop_mask")
    g.capture(crop[2], "info")
    g.capture(paste[0], "pasted")
    res = run_prompt(g)
    assert res["crop"].shape == (1, 64, 64, 3)
    assert torch.equal(res.output(crop.id, 0), res["crop"])
    assert res["crop_mask"].shape == (1, 64, 64)
    info = res["info"]
    assert info.original_size == (H, W) and info.box[2] - info.box[0] == info.box[3] - info.box[1]
    out = res["pasted"]
    assert out.shape == img.shape
    outside = mask[0] < 0.5
    assert torch.equal(out[0][outside], img[0][outside])
    # inside: the crop went through a down/up resize, so close but not exact
    assert (out[0][~outside] - img[0][~outside]).abs().mean() < 0.05


def test_crop_rejects_empty_mask_naming_the_node(comfy_env):
    g = Graph()
    crop = g.node("MaX4ZeroCropToMask", image=g.obj(torch.rand(1, 64, 64, 3), "IMAGE"),
                  mask=g.obj(torch.zeros(1, 64, 64), "MASK"), size=64, padding=0.1)
    g.capture(crop[0], "x")
    with pytest.raises(PromptFailed) as e:
        run_prompt(g)
    assert "MaX4Zero Crop To Mask" in e.value.message and "empty" in e.value.message
    # the UI shows the error's type as the pack's own short name, not the pack's server path
    assert e.value.exception_type == "MaX4Zero.NodeInputError", e.value.exception_type
    assert str(cm.PACK_ROOT) not in e.value.exception_type


# ------------------------------------------------------------------------------------------------
# correspondence
# ------------------------------------------------------------------------------------------------


def test_correspondence_paper_mode_on_inpainting_model(comfy_env, small_vae, pair):
    model = cm.small_sd15_model(inpaint=True)
    opts_before = repr(model.model_options)
    g = Graph()
    c = _correspondence(g, model, small_vae, pair, mode="paper")
    g.capture(c[0], "matches")
    g.capture(c[1], "preview")
    res = run_prompt(g)
    m = res["matches"]
    assert len(m) > 0 and m.reference_size == (SIZE, SIZE) and m.target_size == (SIZE, SIZE)
    # 'all' control points: 4 per match, on the 16-px token lattice (+0/8 offsets)
    assert len(m) % 4 == 0
    assert torch.all(m.reference_points % 8 == 0)
    gm, tm = pair["garment_mask"][0], m.target_region.float()  # the processed (dilated) target mask is matched in
    for pts, mask in ((m.reference_points, gm), (m.target_points, tm)):
        # token corners lie inside the (nearest-resized) mask's tokens
        tok = (pts // 16).long()
        grid = mask[::16, ::16] > 0.5
        assert grid[tok[:, 1], tok[:, 0]].all()
    prev = res["preview"]
    assert prev.shape[0] == 1 and prev.shape[1] == SIZE and prev.shape[2] > 2 * SIZE and prev.shape[3] == 3
    # two feature passes, reported on the node's progress bar
    node_updates = [p for p in res.progress if p[0] == c.id]
    assert len(node_updates) == 2 and node_updates[-1][1:] == (2, 2)
    assert repr(model.model_options) == opts_before


def test_correspondence_dift_identical_images_gives_identity(comfy_env, small_vae, pair):
    model = cm.small_sd15_model(inpaint=False)
    g = Graph()
    c = _correspondence(g, model, small_vae, pair, mode="dift", ensemble=3, outlier_filter="ransac", same=True)
    g.capture(c[0], "matches")
    res = run_prompt(g)
    m = res["matches"]
    assert len(m) >= 8
    assert torch.equal(m.reference_points, m.target_points)
    assert [p for p in res.progress if p[0] == c.id][-1][1:] == (6, 6)  # 2 images x 3 draws


def test_correspondence_is_seeded(comfy_env, small_vae, pair):
    model = cm.small_sd15_model(inpaint=True)
    out = []
    for seed in (5, 5, 6):
        g = Graph()
        c = _correspondence(g, model, small_vae, pair, mode="dift", ensemble=1, control_points="random", seed=seed)
        g.capture(c[0], "m")
        out.append(run_prompt(g)["m"])
    assert torch.equal(out[0].reference_points, out[1].reference_points)
    assert not (out[0].reference_points.shape == out[2].reference_points.shape
                and torch.equal(out[0].reference_points, out[2].reference_points))


def test_paper_mode_on_plain_model_says_switch_to_dift(comfy_env, small_vae, pair):
    g = Graph()
    c = _correspondence(g, cm.small_sd15_model(inpaint=False), small_vae, pair, mode="paper")
    g.capture(c[0], "m")
    with pytest.raises(PromptFailed) as e:
        run_prompt(g)
    msg = e.value.message
    assert "MaX4Zero Correspondence" in msg and "dift" in msg and "inpainting" in msg


def test_non_unet_model_is_refused(comfy_env, small_vae, pair):
    g = Graph()
    c = _correspondence(g, cm.non_unet_model(), small_vae, pair, mode="dift")
    g.capture(c[0], "m")
    with pytest.raises(PromptFailed) as e:
        run_prompt(g)
    assert "TinyDiT" in e.value.message and "not a Stable Diffusion UNet" in e.value.message


@pytest.mark.parametrize("bad", ["mode", "mask", "size"])
def test_correspondence_input_errors(comfy_env, small_vae, pair, bad):
    g = Graph()
    over = {}
    if bad == "mode":
        over["mode"] = "magic"
    elif bad == "mask":
        over["target_mask"] = g.obj(torch.zeros(1, SIZE, SIZE), "MASK")
    else:
        over["garment_mask"] = g.obj(torch.ones(1, 64, 64), "MASK")
    c = _correspondence(g, cm.small_sd15_model(inpaint=True), small_vae, pair, **over)
    g.capture(c[0], "m")
    if bad == "mode":
        # ComfyUI 0.33 rejects an unknown combo value at validation; 0.3.64 lets it through to the node.
        with pytest.raises(PromptFailed) as e:
            run_prompt(g)
        assert "magic" in e.value.message and "mode" in e.value.message
    with pytest.raises(PromptFailed) as e:
        run_prompt(g, validate=bad != "mode")  # the node's own check, whatever the server validates
    msg = e.value.message
    assert msg.startswith("MaX4Zero Correspondence:")
    assert {"mode": "'magic' is not one of", "mask": "target_mask is empty",
            "size": "garment_mask is 64x64 but reference_image is 128x128"}[bad] in msg


# ------------------------------------------------------------------------------------------------
# MLS warp
# ------------------------------------------------------------------------------------------------


def _warp(g, pair, matches=None, manual="", **over):
    inputs = dict(reference_image=g.obj(pair["reference"], "IMAGE"), garment_mask=g.obj(pair["garment_mask"], "MASK"),
                  target_image=g.obj(pair["target"], "IMAGE"), kind="affine", alpha=0.1, stride=4,
                  sampling="bilinear")
    if matches is not None:
        inputs["matches"] = matches
    if manual:
        inputs["manual_points"] = manual
    inputs.update(over)
    return g.node("MaX4ZeroMLSWarp", **inputs)


def test_mls_warp_manual_translation(comfy_env, pair):
    # four corners moved by (+10, +6): a pure translation, so the warp shifts the garment exactly
    pts = [[[x, y], [x + 10, y + 6]] for x in (32, 95) for y in (32, 95)]
    g = Graph()
    w = _warp(g, pair, manual=json.dumps(pts), sampling="nearest")
    for i, k in enumerate(("img", "mask", "prev")):
        g.capture(w[i], k)
    res = run_prompt(g)
    img, mask, prev = res["img"], res["mask"], res["prev"]
    assert img.shape == (1, SIZE, SIZE, 3) and mask.shape == (1, SIZE, SIZE) and prev.shape == (1, SIZE, SIZE, 3)
    ref = pair["reference"][0]
    assert torch.allclose(img[0, 50:90, 50:90], ref[44:84, 40:80], atol=1e-5)
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    # eroded garment mask (32..95 → 33..94) shifted by (10, 6)
    assert mask[0, 39:101, 43:105].all() and mask.sum() == 62 * 62


def test_mls_warp_matches_equal_their_json(comfy_env, small_vae, pair):
    g = Graph()
    c = _correspondence(g, cm.small_sd15_model(inpaint=True), small_vae, pair, mode="paper")
    w = _warp(g, pair, matches=c[0])
    g.capture(c[0], "m")
    g.capture(w[0], "warped")
    res = run_prompt(g)
    g2 = Graph()
    w2 = _warp(g2, pair, manual=res["m"].to_json())
    g2.capture(w2[0], "warped")
    res2 = run_prompt(g2)
    assert torch.allclose(res["warped"], res2["warped"], atol=1e-3)


def test_mls_warp_needs_points(comfy_env, pair):
    g = Graph()
    w = _warp(g, pair)
    g.capture(w[0], "x")
    with pytest.raises(PromptFailed) as e:
        run_prompt(g)
    assert "MaX4Zero MLS Warp" in e.value.message and "manual_points" in e.value.message
    g = Graph()
    w = _warp(g, pair, manual="{not json")
    g.capture(w[0], "x")
    with pytest.raises(PromptFailed, match="does not parse"):
        run_prompt(g)


# ------------------------------------------------------------------------------------------------
# double mask + the whole first stage through stock samplers
# ------------------------------------------------------------------------------------------------


def test_double_mask_conditioning_matches_spec(comfy_env, small_vae, pair):
    tm = pair["target_mask"]
    wm = torch.zeros_like(tm)
    wm[:, 56:112, 40:104] = 1.0  # covers the lower part of the target mask only
    protect = torch.zeros_like(tm)
    protect[:, 100:112, 40:60] = 1.0
    g = Graph()
    d = g.node("MaX4ZeroDoubleMaskInpaint", positive=g.obj(cm.conditioning(1), "CONDITIONING"),
               negative=g.obj(cm.conditioning(2), "CONDITIONING"), vae=g.obj(small_vae, "VAE"),
               target_image=g.obj(pair["target"], "IMAGE"), target_mask=g.obj(tm, "MASK"),
               warped_image=g.obj(pair["reference"], "IMAGE"), warped_mask=g.obj(wm, "MASK"),
               protect_mask=g.obj(protect, "MASK"), target_dilation=13, fringe_dilation=19)
    names = ["pos", "neg", "latent", "comp", "tmask", "F", "D", "prev"]
    for i, k in enumerate(names):
        g.capture(d[i], k)
    r = run_prompt(g)
    t = torch.nn.functional.max_pool2d(((tm > 0.5) & ~(protect > 0.5)).float()[:, None], 13, 1, 6)[:, 0]
    assert torch.equal(r["tmask"], t)
    F_ = (t > 0.5) & ~(wm > 0.5)
    assert torch.equal(r["F"], F_.float())
    D_ = (torch.nn.functional.max_pool2d(F_.float()[:, None], 19, 1, 9)[:, 0] > 0.5) & (t > 0.5)
    assert torch.equal(r["D"], D_.float())
    comp = r["comp"]
    inside = (t > 0.5) & (wm > 0.5)
    assert torch.equal(comp[inside], pair["reference"][inside])
    assert torch.equal(comp[~inside], pair["target"][~inside])
    for k in ("pos", "neg"):
        extras = r[k][0][1]
        assert torch.equal(extras["concat_mask"], D_.float()[:, None])
        assert extras["concat_latent_image"].shape == (1, 4, SIZE // 8, SIZE // 8)
    # the noise mask is F on the latent grid, hard (any pixel of F regenerates its 8x8 cell) ...
    cells = torch.nn.functional.max_pool2d(F_.float()[:, None], 8, 8)
    assert torch.equal(r["latent"]["noise_mask"], cells)
    # masked image = composite with D greyed, exactly as stock InpaintModelConditioning would build it
    import nodes

    ref_pos, _, ref_lat = nodes.InpaintModelConditioning().encode(cm.conditioning(1), cm.conditioning(2), comp,
                                                                   small_vae, r["D"], True)
    assert torch.allclose(ref_pos[0][1]["concat_latent_image"], r["pos"][0][1]["concat_latent_image"], atol=1e-5)
    # ... and the composite latent is kept outside those cells, emptied inside (F starts from noise)
    on = (cells > 0.5).expand_as(r["latent"]["samples"])
    assert torch.allclose(ref_lat["samples"][~on], r["latent"]["samples"][~on], atol=1e-5)
    assert on.any() and (r["latent"]["samples"][on] == 0).all()
    assert r["prev"].shape == (1, SIZE, SIZE, 3)


@pytest.mark.parametrize("batch, stage2", [(1, "plain"), (2, "plain"), (1, "mea"), (2, "mea")])
def test_two_stage_pipeline_with_stock_ksampler_advanced(comfy_env, small_vae, batch, stage2):
    """Crop → correspondence → MLS warp → double mask → KSamplerAdvanced (steps 0→7 of 10, like 0→35 of 50)
    → inpainting stage 2 (7→10) on the plain model or the Masked Extended Attention model (paper guidance,
    window 0.7→1.0) → decode → paste back into the full photo."""
    pair = cm.synthetic_pair(SIZE, batch=batch)
    model = cm.small_sd15_model(inpaint=True)
    g = Graph()
    m, vae = g.obj(model, "MODEL"), g.obj(small_vae, "VAE")
    pos, neg = g.obj(cm.conditioning(1), "CONDITIONING"), g.obj(cm.conditioning(2), "CONDITIONING")
    pad = (40, 8, 16, 30)  # the person sits off-centre in a larger, non-square photo
    photo = torch.nn.functional.pad(pair["target"].movedim(-1, 1), pad, value=0.3).movedim(1, -1).contiguous()
    photo_mask = torch.nn.functional.pad(pair["target_mask"][:1], pad)
    pm = g.obj(photo_mask, "MASK")
    crop = g.node("MaX4ZeroCropToMask", image=g.obj(photo, "IMAGE"), mask=pm, size=SIZE, padding=0.3)
    crop1 = g.node("MaX4ZeroCropToMask", image=g.obj(photo[:1], "IMAGE"), mask=pm, size=SIZE, padding=0.3)
    ref1 = g.obj(pair["reference"][:1], "IMAGE")
    gm1 = g.obj(pair["garment_mask"][:1], "MASK")
    corr = g.node("MaX4ZeroCorrespondence", model=m, vae=vae, positive=pos, reference_image=ref1, garment_mask=gm1,
                  target_image=crop1[0], target_mask=crop1[1], mode="paper", ensemble=1, outlier_filter="none",
                  outlier_threshold=5.0, control_points="all", score_threshold=0.5, seed=0)
    warp = g.node("MaX4ZeroMLSWarp", reference_image=ref1, garment_mask=gm1, target_image=crop[0], matches=corr[0],
                  kind="affine", alpha=0.1, stride=4, sampling="bilinear")
    dm = g.node("MaX4ZeroDoubleMaskInpaint", positive=pos, negative=neg, vae=vae, target_image=crop[0],
                target_mask=crop[1], warped_image=warp[0], warped_mask=warp[1], target_dilation=13,
                fringe_dilation=19)
    s1 = g.node("KSamplerAdvanced", model=m, add_noise="enable", noise_seed=1, steps=10, cfg=3.0,
                sampler_name="euler", scheduler="normal", positive=dm[0], negative=dm[1], latent_image=dm[2],
                start_at_step=0, end_at_step=7, return_with_leftover_noise="enable")
    # stage 2 (no MEA here): the whole target mask is inpainted, continuing from step 7
    ic = g.node("InpaintModelConditioning", positive=pos, negative=neg, vae=vae, pixels=dm[3], mask=dm[4],
                noise_mask=True)
    lat2 = g.node("SetLatentNoiseMask", samples=s1[0], mask=dm[4])
    m2 = m
    if stage2 == "mea":
        mea = g.node("MaX4ZeroMaskedExtendedAttention", model=m, vae=vae, reference=ref1, garment_mask=gm1,
                     target_mask=dm[4], positive=pos, guidance="paper", s_mea=15.0, contrast=1.25, start=0.7,
                     end=1.0, layers="decoder 1/16 + 1/8 (paper)", reference_seed=0, background="kept")
        m2 = mea[0]
        g.capture(m2, "mea_model")
    s2 = g.node("KSamplerAdvanced", model=m2, add_noise="disable", noise_seed=1, steps=10, cfg=3.0,
                sampler_name="euler", scheduler="normal", positive=ic[0], negative=ic[1], latent_image=lat2[0],
                start_at_step=7, end_at_step=10, return_with_leftover_noise="disable")
    dec = g.node("VAEDecode", samples=s2[0], vae=vae)
    paste = g.node("MaX4ZeroPasteBack", original_image=g.obj(photo, "IMAGE"), generated_image=dec[0],
                   crop_info=crop[2], mask=dm[4], feather=3)
    for name, link in (("latent", dm[2]), ("F", dm[5]), ("s1", s1[0]), ("final", paste[0]), ("tmask", dm[4]),
                       ("info", crop[2]), ("warped", warp[0]), ("s2", s2[0])):
        g.capture(link, name)
    r = run_prompt(g)

    assert r["warped"].shape == (1, SIZE, SIZE, 3)
    s1_out = r["s1"]["samples"]
    assert s1_out.shape == (batch, 4, SIZE // 8, SIZE // 8) and torch.isfinite(s1_out).all()
    # stage 1 regenerates only the thin fringe F: where F's latent-grid mask is 0 the composite latent is kept
    lat = r["latent"]["samples"]
    f_lat = r["latent"]["noise_mask"]
    assert torch.equal(f_lat, torch.nn.functional.max_pool2d(r["F"][:, None], 8, 8))
    keep = (f_lat == 0).expand_as(lat)
    changed = (f_lat == 1).expand_as(lat)
    assert keep.any() and changed.any()
    # ... forward-noised with the sampler's own fixed noise at step 7 (leftover noise returned)
    import comfy.sample
    import comfy.samplers

    ms = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", 10)
    s0, s7 = float(sigmas[0]), float(sigmas[7])
    noise = comfy.sample.prepare_noise(lat, 1)
    scale = model.model.latent_format.scale_factor
    # euler's state there: x0 = lat + noise·sqrt(1+s0²) (full-denoise start), then each step scales the
    # noise part by s_{i+1}/s_i because the model's x0 prediction is replaced by the composite latent
    expected = lat + noise * (s7 * (1 + s0**2) ** 0.5 / s0) / scale
    assert torch.allclose(s1_out[keep], expected[keep], atol=1e-3)
    assert (s1_out[changed] - lat[changed]).abs().max() > 1e-3
    if stage2 == "mea":  # the MEA patch really ran inside stage 2's window
        assert cm.mea_run(mea.id, r["s2"]["samples"]).stats["mea_calls"] > 0
    final = r["final"]
    assert final.shape == photo.shape and torch.isfinite(final).all()
    # outside the target mask (mapped back from the crop) the photo is returned bit for bit
    geo = cm.pack_module("registration.crop")
    full = geo.uncrop_mask(r["tmask"][:, None], r["info"])[:, 0] > 0.5
    assert torch.equal(final[~full.expand(batch, -1, -1)], photo[~full.expand(batch, -1, -1)])
    assert not torch.equal(final, photo)


# ------------------------------------------------------------------------------------------------
# feature block selection (SD1.5 and SDXL layouts)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["sd15", "sdxl"])
def test_features_come_from_the_first_decoder_stage_at_one_sixteenth(comfy_env, small_vae, layout):
    ft = cm.pack_module("nodes.features")
    if layout == "sd15":
        model, cond, block, channels = cm.small_sd15_model(inpaint=False), cm.conditioning(1), ("output", 6), 4 * 32
    else:
        model, cond, block, channels = cm.small_sdxl_model(), cm.sdxl_conditioning(1), ("output", 3), 4 * 64
    img = cm.synthetic_pair(SIZE)["reference"].permute(0, 3, 1, 2)
    info = {}
    with torch.inference_mode():
        feat = ft.extract_features(model, small_vae, cond, img, torch.zeros(1, SIZE, SIZE),
                                   ft.FeatureSpec("dift", ft.DIFT_T, ensemble=2, seed=0), info=info)
    assert info["block"] == block
    assert feat.shape == (channels, SIZE // 16, SIZE // 16) and torch.isfinite(feat).all()
    ms = model.get_model_object("model_sampling")
    assert int(ms.timestep(torch.tensor([info["sigma"]]))) == 261
    # the ensemble is a mean: one draw differs from the two-draw average
    with torch.inference_mode():
        one = ft.extract_features(model, small_vae, cond, img, torch.zeros(1, SIZE, SIZE),
                                  ft.FeatureSpec("dift", ft.DIFT_T, ensemble=1, seed=0))
    assert not torch.allclose(one, feat)


# ------------------------------------------------------------------------------------------------
# docs/method.md §2a: the two feature passes draw independent noise
# ------------------------------------------------------------------------------------------------


class _UNetInputs:
    """Records the exact input of every UNet forward (the tensor entering ``input_blocks[0]``'s conv:
    noisy latent × c_in, then the inpainting channels) with a forward pre-hook; removed on exit."""

    def __init__(self, model):
        self.layer = model.model.diffusion_model.input_blocks[0][0]
        self.calls: list[torch.Tensor] = []

    def __enter__(self):
        self.handle = self.layer.register_forward_pre_hook(
            lambda mod, args: self.calls.append(args[0].detach().clone()))
        return self

    def __exit__(self, *exc):
        self.handle.remove()


@pytest.mark.parametrize("mode", ["paper", "dift"])
def test_feature_passes_of_identical_images_see_independent_noise(comfy_env, small_vae, pair, mode):
    """Reference = target and garment mask = target mask: everything the two passes see is identical except
    the noise, which must differ (a token deep inside both holes would otherwise get the same input in both
    images and match "no warp"); the same seed still gives the same inputs and the same matches."""
    model = cm.small_sd15_model(inpaint=True)
    draws = 1 if mode == "paper" else 2
    # the node erodes the garment mask by 1 px: give the target that eroded mask, so the two passes match
    eroded = cm.pack_module("tensors.masks").erode(pair["garment_mask"] > 0.5, 3).float()
    runs = []
    for _ in range(2):
        with _UNetInputs(model) as rec:
            g = Graph()
            c = _correspondence(g, model, small_vae, pair, mode=mode, ensemble=draws, same=True, seed=7,
                                target_mask=g.obj(eroded, "MASK"), target_dilation=1)  # both holes alike
            g.capture(c[0], "m")
            runs.append((rec.calls, run_prompt(g)["m"]))
    (calls, m), (calls2, m2) = runs
    assert len(calls) == 2  # one UNet pass per image (DIFT: its draws batched)
    ref_x, tgt_x = calls
    assert ref_x.shape == tgt_x.shape == (draws, 9, SIZE // 8, SIZE // 8)
    # masked image and mask channels: the same image and mask in both passes ...
    assert torch.equal(ref_x[:, 4:], tgt_x[:, 4:])
    # ... the noisy-latent channels are not, anywhere: independent draws, not one draw re-used per image
    lat_r, lat_t = ref_x[:, :4], tgt_x[:, :4]
    assert not torch.equal(lat_r, lat_t)
    assert (lat_r != lat_t).float().mean() > 0.99
    hole = (pair["garment_mask"][0, ::8, ::8] > 0.5).expand_as(lat_r)  # inside both holes
    diff = (lat_r - lat_t)[hole]
    assert diff.abs().mean() > 0.5  # of the order of the noise itself (paper: N(0, 1))
    if mode == "paper":
        corr = torch.corrcoef(torch.stack([lat_r.flatten(), lat_t.flatten()]))[0, 1]
        assert abs(float(corr)) < 0.15
    else:  # every ensemble draw is new: across draws and across images
        rows = [lat_r[0], lat_r[1], lat_t[0], lat_t[1]]
        assert all(not torch.equal(rows[i], rows[j]) for i in range(4) for j in range(i + 1, 4))
    # deterministic for a seed
    assert len(calls2) == 2 and all(torch.equal(a, b) for a, b in zip(calls, calls2))
    assert len(m) > 0
    assert torch.equal(m.reference_points, m2.reference_points) and torch.equal(m.target_points, m2.target_points)
    assert torch.equal(m.scores, m2.scores)


# ------------------------------------------------------------------------------------------------
# docs/method.md §3a: stage 1 starts from pure noise inside the thin fringe F
# ------------------------------------------------------------------------------------------------


def _double_mask_then_sample(small_vae, model, target, tm, wm, warped, steps, seed=1):
    """Double-Mask Inpaint → stock KSamplerAdvanced (add_noise enable, steps 0 → steps, cfg 3, euler) on a clone
    of ``model`` with an APPLY_MODEL wrapper recording every noisy input x. Returns (result, recorded x's)."""
    import comfy.patcher_extension

    seen: list[torch.Tensor] = []

    def record(executor, x, *args, **kwargs):
        seen.append(x.detach().clone())
        return executor(x, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "max4zero_test_record", record)
    g = Graph()
    d = g.node("MaX4ZeroDoubleMaskInpaint", positive=g.obj(cm.conditioning(1), "CONDITIONING"),
               negative=g.obj(cm.conditioning(2), "CONDITIONING"), vae=g.obj(small_vae, "VAE"),
               target_image=g.obj(target, "IMAGE"), target_mask=g.obj(tm, "MASK"),
               warped_image=g.obj(warped, "IMAGE"), warped_mask=g.obj(wm, "MASK"), target_dilation=13,
               fringe_dilation=19)
    s = g.node("KSamplerAdvanced", model=g.obj(m, "MODEL"), add_noise="enable", noise_seed=seed, steps=steps,
               cfg=3.0, sampler_name="euler", scheduler="normal", positive=d[0], negative=d[1], latent_image=d[2],
               start_at_step=0, end_at_step=steps, return_with_leftover_noise="disable")
    for name, link in (("latent", d[2]), ("F", d[5]), ("out", s[0])):
        g.capture(link, name)
    return run_prompt(g), seen


def test_stage1_fringe_starts_from_pure_noise(comfy_env, small_vae, pair):
    """Two composites (different person photos, same masks and warp) through Double-Mask Inpaint and the stock
    KSamplerAdvanced: the first model input inside F's latent cells is bit-identical (pure noise, no composite
    signal); outside F it is the noised composite, which differs; the result outside F is the composite."""
    import comfy.sample
    import comfy.samplers

    model = cm.small_sd15_model(inpaint=True)
    tm = pair["target_mask"]
    wm = torch.zeros_like(tm)
    wm[:, 56:112, 40:104] = 1.0  # covers the lower part of the target mask only
    targets = (pair["target"], (1.0 - pair["target"]).flip(2).contiguous())
    results = [_double_mask_then_sample(small_vae, model, t, tm, wm, pair["reference"], steps=2) for t in targets]

    F_pix = results[0][0]["F"]
    assert torch.equal(F_pix, results[1][0]["F"])
    cells = torch.nn.functional.max_pool2d(F_pix[:, None], 8, 8)  # latent cells holding any pixel of F
    frac = torch.nn.functional.avg_pool2d(F_pix[:, None], 8, 8)
    assert ((frac > 0) & (frac < 1)).any() and (cells == 0).any()  # F partly covers some cells
    inside = (cells > 0.5).expand(1, 4, -1, -1)

    ms = model.get_model_object("model_sampling")
    s0 = float(comfy.samplers.calculate_sigmas(ms, "normal", 2)[0])
    firsts = []
    for res, seen in results:
        x = seen[0]
        assert all(torch.equal(row, x[0]) for row in x)  # cond and uncond rows: the same noisy latent
        firsts.append(x[:1])
    noise = comfy.sample.prepare_noise(results[0][0]["latent"]["samples"], 1)
    # inside F: pure noise at sigma_max, the same for both composites, bit for bit
    assert torch.equal(firsts[0][inside], firsts[1][inside])
    assert torch.allclose(firsts[0][inside], (noise * (1 + s0**2) ** 0.5)[inside], atol=1e-4)
    # outside F: the composite latent, forward-noised with the same noise, so the composites differ there
    assert not torch.allclose(firsts[0][~inside], firsts[1][~inside], atol=1e-2)
    for (res, _), x in zip(results, firsts):
        comp = model.model.process_latent_in(res["latent"]["samples"])
        assert torch.allclose(x[~inside], (noise * s0 + comp)[~inside], atol=1e-4)
        # the latent the node hands over: F's cells as a hard noise mask, the composite emptied there
        assert torch.equal(res["latent"]["noise_mask"], cells)
        assert (res["latent"]["samples"][inside] == 0).all()
        # after sampling, ComfyUI restores the composite outside F: nothing changes there
        out = res["out"]["samples"]
        assert torch.allclose(out[~inside], res["latent"]["samples"][~inside], atol=1e-4)
        assert (out[inside] - res["latent"]["samples"][inside]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------
# the VAE's ratio (issue 17: the stage-1 nodes ask the VAE, as the MEA node does, instead of assuming 8)
# ------------------------------------------------------------------------------------------------


class _Ratio16Vae:
    """A VAE with 16 image pixels per latent cell (as a deeper autoencoder has): the small SD VAE on the image
    halved. Only what the stage-1 nodes call."""

    def __init__(self, vae):
        self.vae = vae

    def spacial_compression_encode(self):
        return 16

    def encode(self, pixels):
        half = torch.nn.functional.avg_pool2d(pixels.movedim(-1, 1), 2).movedim(1, -1)
        return self.vae.encode(half.contiguous())


def test_double_mask_inpaint_crops_to_the_vae_ratio(comfy_env, small_vae, pair):
    """Before: centre-cropped to multiples of 8 whatever the VAE, so a 200 px target gave F on a 200 px grid for a
    12-cell latent ("the VAE's latent does not fit the image")."""
    tgt = torch.nn.functional.interpolate(pair["target"].movedim(-1, 1), size=(200, 200)).movedim(1, -1).contiguous()
    tm = torch.nn.functional.interpolate(pair["target_mask"][:, None], size=(200, 200))[:, 0]
    wm = torch.zeros_like(tm)
    wm[:, 80:150, 70:140] = 1.0
    g = Graph()
    d = g.node("MaX4ZeroDoubleMaskInpaint", positive=g.obj(cm.conditioning(1), "CONDITIONING"),
               negative=g.obj(cm.conditioning(2), "CONDITIONING"), vae=g.obj(_Ratio16Vae(small_vae), "VAE"),
               target_image=g.obj(tgt, "IMAGE"), target_mask=g.obj(tm, "MASK"), warped_image=g.obj(tgt, "IMAGE"),
               warped_mask=g.obj(wm, "MASK"), target_dilation=13, fringe_dilation=19)
    g.capture(d[2], "latent")
    g.capture(d[0], "positive")
    r = run_prompt(g)
    assert r["latent"]["samples"].shape[-2:] == (12, 12) and r["latent"]["noise_mask"].shape[-2:] == (12, 12)
    assert r["positive"][0][1]["concat_mask"].shape[-2:] == (192, 192)  # 12 cells of 16 px


def test_correspondence_draws_feature_noise_at_the_vae_ratio(comfy_env, small_vae, pair):
    """Before: the DIFT pass drew noise for an 8 px latent cell, so a 16 px VAE's latent did not match it."""
    g = Graph()
    c = _correspondence(g, cm.small_sd15_model(inpaint=False), _Ratio16Vae(small_vae), pair, mode="dift", ensemble=1)
    g.capture(c[0], "m")
    m = run_prompt(g)["m"]
    assert len(m) > 0 and tuple(m.target_size) == (SIZE, SIZE)
