"""Masked Extended Attention on a tiny random-weight Qwen-Image(-Edit) inside a real ComfyUI (docs/method.md §3d).

The model is ComfyUI's own ``QwenImageTransformer2DModel`` (2 heads of 32, RoPE axes 8/12/12, 2 joint blocks, text
width 64, 2×2 patches of Wan 2.1's 16-channel latent), detected by ``model_detection`` as ``QwenImage``
(``comfy_models.small_qwen_image_model``); Qwen-Image-Edit is the same model class with reference latents in the
conditioning. A 128 px image is a 16×16 latent (one frame: [1, 16, 1, 16, 16]) and 8×8 tokens. Sampling goes through
the stock KSamplerAdvanced. On ComfyUI 0.3.64 (no ``attn1_patch`` in Qwen-Image's attention) only the refusal runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import comfy_models as cm
from comfy_models import Graph, PromptFailed, run_prompt
from dit_mea_support import DitGraphs, hostile_reference_kv

SIZE = 128
GRID = (SIZE // 16, SIZE // 16)
LATENT = (SIZE // 8, SIZE // 8)
TEXT = 8
S_MEA = 3.0
TOL = 2e-4


def _has_qwen() -> bool:
    import comfy.supported_models

    return hasattr(comfy.supported_models, "QwenImage")


def _has_hook() -> bool:
    return _has_qwen() and cm.pack_module("nodes.mea_qwen").qwen_hook_problem() is None


needs_hook = pytest.mark.skipif("not _has_hook()", reason="this ComfyUI's Qwen-Image attention has no attn1_patch "
                                "hook (0.3.64): MEA on Qwen-Image needs ComfyUI 0.33.0 or newer; only the refusal "
                                "is tested")


def _mf():
    return cm.pack_module("nodes.mea_flux")


GRAPHS = DitGraphs(size=SIZE, vae=cm.StubWanVAE, conditioning=cm.qwen_conditioning, latent=(1, 16, *LATENT),
                   s_mea=S_MEA)
_pair, _mea, _sampler, _run = GRAPHS.pair, GRAPHS.mea, GRAPHS.sampler, GRAPHS.run


def _ref_latent(seed: int = 7) -> torch.Tensor:
    return torch.randn(1, 16, 1, *LATENT, generator=torch.Generator().manual_seed(seed))


def _region_tokens() -> torch.Tensor:
    return GRAPHS.region_tokens(GRID)


# ------------------------------------------------------------------------------------------------
# refusal (both versions) and what the patch takes from the model
# ------------------------------------------------------------------------------------------------


@pytest.mark.skipif("not _has_qwen()", reason="this ComfyUI has no Qwen-Image")
def test_qwen_image_is_refused_without_the_hook_or_accepted_with_it(comfy_env):
    model = cm.small_qwen_image_model()
    assert model.detected_config == "QwenImage"
    g = Graph()
    g.capture(_mea(g, g.obj(model, "MODEL"))[0], "patched")
    if _has_hook():
        patch = cm.patch_of(run_prompt(g)["patched"])
        assert type(patch).__name__ == "QwenMeaPatch"
        return
    with pytest.raises(PromptFailed, match="Qwen-Image attention has no attention patch hook.*update ComfyUI"):
        run_prompt(g)


@needs_hook
def test_qwen_patch_takes_grid_reference_index_and_blocks_from_the_model(comfy_env):
    g = Graph()
    g.capture(_mea(g, g.obj(cm.small_qwen_image_model(), "MODEL"), blocks="vital")[0], "patched")
    patch = cm.patch_of(run_prompt(g)["patched"])
    assert patch.patch_size == 2 and patch.ref_grid == GRID and patch.layers.levels == frozenset({1})
    assert patch.rope_index({}) == 1.0 and patch.rope_index({"ref_latents": [_ref_latent()] * 2}) == 3.0
    assert patch.settings.ref_latent.shape == (1, 16, 1, *LATENT)
    assert patch.blocks == frozenset({("double", 0), ("double", 1)})
    ids = _mf().reference_token_ids(GRID, 3, 1.0, True)[0]
    assert ids[:, 1].min() == -(GRID[0] // 2) and ids[:, 2].max() == GRID[1] - 1 - GRID[1] // 2  # centred
    # the garment keys' RoPE is the model's own for a reference latent at index 1 (centred grid), garment tokens only
    dm = cm.small_qwen_image_model().model.diffusion_model
    _, ids_model, _ = dm.process_img(patch.settings.ref_latent, index=1)
    state = patch.new_run().worker("cpu")
    idx = patch.garment_index(state, "cpu")
    assert torch.equal(patch.reference_pe(state, dm, "cpu", 1.0), dm.pe_embedder(ids_model[:, idx]))
    g2 = Graph()
    g2.capture(_mea(g2, g2.obj(cm.small_qwen_image_model(), "MODEL"), blocks="single")[0], "patched")
    with pytest.raises(PromptFailed, match="selects no block.*joint \\(double\\) blocks only"):
        run_prompt(g2)


# ------------------------------------------------------------------------------------------------
# no-op and locality
# ------------------------------------------------------------------------------------------------


@needs_hook
def test_qwen_empty_mask_is_bit_identical_to_vanilla(comfy_env):
    model = cm.small_qwen_image_model()
    empty = torch.zeros_like(_pair()["target_mask"])
    out = _run({
        "vanilla": (model, "stock", {"steps": 2}),
        "empty": (model, {"target_mask": empty}, {"steps": 2}),
        "paper_empty": (model, {"target_mask": empty, "guidance": "paper"}, {"steps": 2}),
        "mea": (model, {}, {"steps": 2}),
    })
    assert out["vanilla"].shape == (1, 16, 1, *LATENT)
    for name in ("empty", "paper_empty"):
        assert torch.equal(out[name], out["vanilla"]), name
    assert not torch.equal(out["mea"], out["vanilla"])


@needs_hook
@pytest.mark.parametrize("guidance", ["fused", "paper"])
@pytest.mark.parametrize("edit", [False, True], ids=["image", "edit"])
def test_qwen_region_rows_are_the_region_and_text_and_reference_latent_rows_bit_identical(comfy_env, monkeypatch,
                                                                                        guidance, edit):
    """Every block: MEA redoes the region's image rows at Qwen's 2x2-patch grid; text rows, other image rows and
    (Qwen-Image-Edit) the reference latent's rows are the block's own attention, bit for bit."""
    spy = cm.DitBlockSpy(monkeypatch)
    pos = cm.qwen_conditioning(1, reference_latents=[_ref_latent()] if edit else None)
    _run({"mea": (cm.small_qwen_image_model(), {"guidance": guidance}, {"positive": pos})})
    spy.check_outside_unchanged()
    n_img = GRID[0] * GRID[1]
    assert len(spy.calls) == 2
    for c in spy.calls:
        assert torch.equal(c["region"][0], _region_tokens())
        assert c["start"] == TEXT and c["q"][2] == TEXT + n_img * (2 if edit else 1)


@needs_hook
def test_qwen_text_padding_mask_is_honoured_in_the_region_rows(comfy_env):
    """With Qwen's text padding mask, what the padding tokens hold cannot matter, in the region's MEA rows too:
    two prompts that differ only in their padded tokens give the same latent (an override that dropped the mask
    would let the region's rows read them)."""
    model = cm.small_qwen_image_model()
    pads = [torch.randn(1, 3, 64, generator=torch.Generator().manual_seed(s)) * 10 for s in (11, 12)]
    pos = [cm.qwen_conditioning(1, padding=3, pad_values=p) for p in pads]
    out = _run({
        "a": (model, {}, {"positive": pos[0]}),
        "b": (model, {}, {"positive": pos[1]}),
        "vanilla": (model, "stock", {"positive": pos[0]}),
    })
    assert torch.equal(out["a"], out["b"])
    assert not torch.equal(out["a"], out["vanilla"])


@needs_hook
def test_qwen_reference_keys_outside_the_garment_have_no_influence(comfy_env, monkeypatch):
    model = cm.small_qwen_image_model()
    m2, patches = hostile_reference_kv(monkeypatch, model, block_type=None)  # Qwen's joint blocks: any type
    out = _run({"plain": (model, {"blocks": "d0"}, {}), "hostile": (m2, {"blocks": "d0"}, {}),
                "vanilla": (model, "stock", {})})
    assert len(patches) == 2
    assert torch.equal(out["plain"], out["hostile"])
    assert not torch.equal(out["plain"], out["vanilla"])


@needs_hook
def test_qwen_guidance_identities_through_one_euler_step(comfy_env):
    """Qwen-Image is not distilled: at cfg 1 paper keeps the negative pass (base ε_u, as on a UNet)."""
    import comfy.samplers

    model = cm.small_qwen_image_model()
    pos, neg = cm.qwen_conditioning(1), cm.qwen_conditioning(2)
    out = _run({
        "c": (model, "stock", {"positive": pos}),
        "u": (model, "stock", {"positive": neg}),
        "mea": (model, {"guidance": "fused"}, {"positive": pos}),
        "paper1": (model, {"guidance": "paper"}, {"positive": pos, "negative": neg}),
        "paper3": (model, {"guidance": "paper"}, {"positive": pos, "negative": neg, "cfg": 3.0}),
        "fused3": (model, {"guidance": "fused"}, {"positive": pos, "negative": neg, "cfg": 3.0}),
    })
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 1)
    assert sigmas.shape == (2,) and float(sigmas[-1]) == 0.0
    mask = (_pair()["target_mask"] > 0.5).float()[:, None]
    M = F.interpolate(mask, size=LATENT, mode="nearest")[:, :, None]  # [1, 1, 1, h, w]
    assert 0 < float(M.mean()) < 1
    c, u, mea = out["c"], out["u"], out["mea"]
    assert float((mea - c).abs().max()) > 1e-3
    want = {
        "paper1": c + S_MEA * M * (mea - u),
        "paper3": u + 3.0 * (c - u) + S_MEA * M * (mea - u),
        "fused3": u + 3.0 * (mea - u),
    }
    for name, w in want.items():
        err = float((out[name] - w).abs().max())
        assert err <= TOL * max(1.0, float(w.abs().max())), (name, err)


@needs_hook
def test_qwen_blockwise_model_patch_is_refused_and_a_noise_mask_inpaints(comfy_env):
    """Inpainting on Qwen-Image has no Fill channels: a noise mask keeps everything outside it (MEA or not); a
    blockwise model patch (the inpaint / DiffSynth ControlNet patches) would reach the reference pass: refused."""
    model = cm.small_qwen_image_model()
    g = Graph()
    mea = _mea(g, g.obj(model, "MODEL"))
    start = torch.randn(1, 16, *LATENT, generator=torch.Generator().manual_seed(4))
    keep = torch.zeros(1, 1, *LATENT)
    keep[..., 4:12, 4:12] = 1.0  # the region to repaint
    samp = g.node("KSamplerAdvanced", model=mea[0], add_noise="enable", noise_seed=5, steps=2, cfg=1.0,
                  sampler_name="euler", scheduler="simple", positive=g.obj(cm.qwen_conditioning(1), "CONDITIONING"),
                  negative=g.obj(cm.qwen_conditioning(2), "CONDITIONING"),
                  latent_image=g.obj({"samples": start, "noise_mask": keep}, "LATENT"), start_at_step=0,
                  end_at_step=10000, return_with_leftover_noise="disable")
    g.capture(samp[0], "out")
    out = run_prompt(g)["out"]["samples"][:, :, 0]
    outside = (keep == 0).expand_as(start)
    assert torch.allclose(out[outside], start[outside], atol=1e-5)
    assert not torch.allclose(out[~outside], start[~outside], atol=1e-3)

    patched = model.clone()
    patched.set_model_patch(lambda kwargs: {"img": kwargs["img"], "txt": kwargs["txt"]}, "double_block")
    with pytest.raises(PromptFailed, match="blockwise model patch.*noise mask"):
        _run({"x": (patched, {}, {})})


@needs_hook
def test_double_mask_inpaint_latent_drives_qwen_image_stage_one_and_mea_stage_two(comfy_env):
    """The Qwen-Image-Edit workflow's chain on the tiny model: Double-Mask Inpaint with a one-frame video VAE, stage 1
    by its noise mask (F repainted), then MEA on the whole latent (an all-ones mask → Set Latent Noise Mask), through the
    stock samplers."""
    pair = _pair()
    tm = pair["target_mask"]
    wm = torch.zeros_like(tm)
    wm[:, 56:112, 40:104] = 1.0
    g = Graph()
    model = g.obj(cm.small_qwen_image_model(), "MODEL")
    pos, neg = g.obj(cm.qwen_conditioning(1), "CONDITIONING"), g.obj(cm.qwen_conditioning(2), "CONDITIONING")
    d = g.node("MaX4ZeroDoubleMaskInpaint", positive=pos, negative=neg, vae=g.obj(cm.StubWanVAE(), "VAE"),
               target_image=g.obj(pair["target"], "IMAGE"), target_mask=g.obj(tm, "MASK"),
               warped_image=g.obj(pair["reference"], "IMAGE"), warped_mask=g.obj(wm, "MASK"), target_dilation=13,
               fringe_dilation=19)
    common = dict(noise_seed=3, steps=4, cfg=1.0, sampler_name="euler", scheduler="simple", positive=d[0],
                  negative=d[1])
    s1 = g.node("KSamplerAdvanced", model=model, add_noise="enable", latent_image=d[2], start_at_step=0,
                end_at_step=3, return_with_leftover_noise="enable", **common)
    mea = _mea(g, model, target_mask=tm)
    g.nodes[mea.id]["inputs"]["latent"] = d[2]  # the optional check input takes the one-frame latent too
    lat2 = g.node("SetLatentNoiseMask", samples=s1[0], mask=g.obj(torch.ones(1, SIZE, SIZE), "MASK"))  # SolidMask 1
    s2 = g.node("KSamplerAdvanced", model=mea[0], add_noise="disable", latent_image=lat2[0], start_at_step=3,
                end_at_step=4, return_with_leftover_noise="disable", **common)
    for name, link in (("latent", d[2]), ("s1", s1[0]), ("out", s2[0])):
        g.capture(link, name)
    res = run_prompt(g)
    lat, s1_out = res["latent"], res["s1"]["samples"]
    assert lat["samples"].shape == (1, 16, 1, *LATENT)
    cells = lat["noise_mask"]
    inside = (cells > 0.5).reshape(1, 1, 1, *LATENT).expand_as(s1_out)
    assert inside.any() and (~inside).any()
    assert not torch.allclose(s1_out[inside], lat["samples"][inside], atol=1e-3)  # F repainted
    out = res["out"]["samples"]
    assert out.shape == (1, 16, 1, *LATENT) and torch.isfinite(out).all()
    assert cm.mea_run(mea.id, out).stats["mea_calls"] > 0


@needs_hook
def test_qwen_flow_view_renders_on_the_1_16_grid(comfy_env):
    g = Graph()
    mea = _mea(g, g.obj(cm.small_qwen_image_model(), "MODEL"), contrast=1.0)
    samp = _sampler(g, mea[0])
    view = GRAPHS.flow_view(g, mea, samp, layers="1/16 grid")
    g.capture(view[0], "flow")
    g.capture(view[2], "reliance")
    res = run_prompt(g)
    assert res["flow"].shape == (1, SIZE, SIZE, 3) and res["reliance"].shape == (1, SIZE, SIZE)
    assert float(res["reliance"][0][_pair()["target_mask"][0] > 0.5].mean()) > 0
    records = cm.mea_run(mea.id, res.output(samp.id, 0)["samples"]).records[1.0]
    assert {r.query_hw for r in records} == {GRID} and {r.layer for r in records} == {("double", 0), ("double", 1)}
