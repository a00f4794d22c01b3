"""Masked Extended Attention on tiny random-weight FLUX.2 dev and klein inside a real ComfyUI (docs/method.md §3c).

The models are ComfyUI's own ``comfy.ldm.flux.model.Flux`` with FLUX.2's layout (hidden 256, 2 heads, RoPE axes
32 × 4, 2 double + 2 single blocks, shared modulation, 1×1 patches of a 128-channel latent), detected by
``model_detection`` as ``Flux2`` (``comfy_models.small_flux2_model``): dev with a guidance embedding, klein without.
A 128 px image is an 8×8 latent at 16× and 8×8 tokens. Sampling goes through the stock KSamplerAdvanced.

ComfyUI 0.3.64 has no FLUX.2 (no ``Flux2`` model config) and no ``attn1_patch`` hook in its Flux blocks: every test
here is skipped there with that reason; the refusal of every Flux-family model on 0.3.64 is tested in
``test_flux_mea.py: test_flux_is_refused_without_the_hook_or_accepted_with_it``.
"""

from __future__ import annotations

import functools
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import comfy_models as cm
from comfy_models import Graph, run_prompt
from dit_mea_support import DitGraphs, first_double_block_outputs, hostile_reference_kv

SIZE = 128  # 8×8 latent cells at 16× → 8×8 FLUX.2 tokens (patch 1)
GRID = (SIZE // 16, SIZE // 16)
TEXT = 512  # Flux2.extra_conds pads the text to 512 tokens
S_MEA = 3.0
TOL = 2e-4
VARIANTS = ["dev", "klein"]


def _usable() -> bool:
    import comfy.supported_models

    return hasattr(comfy.supported_models, "Flux2") and cm.pack_module("nodes.mea_flux").flux_hook_problem() is None


needs_flux2 = pytest.mark.skipif("not _usable()", reason="this ComfyUI has no FLUX.2 model config and no Flux "
                                 "attn1_patch hook (0.3.64): FLUX.2 exists from ComfyUI 0.33.0 on")


def _mf():
    return cm.pack_module("nodes.mea_flux")


@functools.lru_cache(maxsize=None)
def _graphs(variant: str) -> DitGraphs:
    conditioning = functools.partial(cm.flux2_conditioning, variant=variant)
    return DitGraphs(size=SIZE, vae=cm.StubFlux2VAE, conditioning=conditioning, latent=(1, 128, *GRID), s_mea=S_MEA)


def _pair():
    return _graphs("dev").pair()


def _ref_latent(seed: int = 7) -> torch.Tensor:
    return torch.randn(1, 128, *GRID, generator=torch.Generator().manual_seed(seed))


def _mea(g: Graph, model_link, variant, **kw):
    return _graphs(variant).mea(g, model_link, **kw)


def _sampler(g: Graph, model_link, variant, **kw):
    return _graphs(variant).sampler(g, model_link, **kw)


def _run(variant: str, models: dict, **mea_kw) -> dict:
    return _graphs(variant).run(models, **mea_kw)


def _region_tokens() -> torch.Tensor:
    """The target region at FLUX.2's token grid (one token per 16 px), bool [64]."""
    return _graphs("dev").region_tokens(GRID)


# ------------------------------------------------------------------------------------------------
# the layout the adapter takes from the model
# ------------------------------------------------------------------------------------------------


@needs_flux2
@pytest.mark.parametrize("variant", VARIANTS)
def test_flux2_patch_takes_grid_text_reference_index_and_blocks_from_the_model(comfy_env, variant):
    model = cm.small_flux2_model(variant=variant)
    assert model.detected_config == "Flux2" and model.model.diffusion_model.patch_size == 1
    assert model.model.diffusion_model.params.guidance_embed == (variant == "dev")
    g = Graph()
    g.capture(_mea(g, g.obj(model, "MODEL"), variant, blocks="vital")[0], "patched")
    patch = cm.patch_of(run_prompt(g)["patched"])
    assert patch.patch_size == 1 and patch.ref_grid == GRID and patch.ref_tokens == 64
    assert patch.layers.levels == frozenset({0})  # the latent grid itself: 1/16 of the image at FLUX.2's 16×
    assert (patch.ref_method, patch.ref_index_scale) == ("index", 10.0)
    assert patch.rope_index({}) == 10.0 and patch.rope_index({"ref_latents": [_ref_latent()]}) == 20.0
    ctx = patch.settings.ref_context  # the node's prompt as Flux2.extra_conds hands it to the model
    prompt = cm.flux2_conditioning(3, variant)[0][0]
    assert ctx.shape == (1, TEXT, 64)
    assert torch.equal(ctx, F.pad(prompt, (0, 0, TEXT - prompt.shape[1], 0)))
    # the garment keys' RoPE is the model's own for its first reference latent (index 10), garment tokens only
    dm = model.model.diffusion_model
    _, ids_model = dm.process_img(patch.settings.ref_latent, index=10.0)
    state = patch.new_run().worker("cpu")
    idx = patch.garment_index(state, "cpu")
    assert torch.equal(patch.reference_pe(state, dm, "cpu", 10.0), dm.pe_embedder(ids_model[:, idx]))
    # 'vital' on FLUX.2: the relative depths of Stable Flow's FLUX.1 layers; on 2 + 2 blocks that is every block
    assert patch.blocks == frozenset({("double", 0), ("double", 1), ("single", 0), ("single", 1)})


def test_unknown_flux_layouts_are_refused(comfy_env):
    """Only FLUX.1's and FLUX.2's layouts are known: a FLUX.2 config with 2x2 patches, or another family on the
    Flux class, is refused with the layout named (no ComfyUI needed: the check reads the model's config)."""
    mf = _mf()

    def base(family, patch, channels):
        return SimpleNamespace(diffusion_model=SimpleNamespace(patch_size=patch),
                               model_config=SimpleNamespace(unet_config={"image_model": family,
                                                                         "out_channels": channels}))

    assert mf.flux_layout_problem(base("flux", 2, 16)) is None
    assert mf.flux_layout_problem(base("flux2", 1, 128)) is None
    assert "FLUX.2 model is not supported: it packs 2x2 patches" in mf.flux_layout_problem(base("flux2", 2, 128))
    assert "'chroma'" in mf.flux_layout_problem(base("chroma", 2, 16))


# ------------------------------------------------------------------------------------------------
# no-op and locality
# ------------------------------------------------------------------------------------------------


@needs_flux2
@pytest.mark.parametrize("variant", VARIANTS)
def test_flux2_empty_mask_is_bit_identical_to_vanilla(comfy_env, variant):
    model = cm.small_flux2_model(variant=variant)
    empty = torch.zeros_like(_pair()["target_mask"])
    out = _run(variant, {
        "vanilla": (model, "stock", {"steps": 2}),
        "empty": (model, {"target_mask": empty}, {"steps": 2}),
        "paper_empty": (model, {"target_mask": empty, "guidance": "paper"}, {"steps": 2}),
        "mea": (model, {}, {"steps": 2}),
    })
    for name in ("empty", "paper_empty"):
        assert torch.equal(out[name], out["vanilla"]), name
    assert not torch.equal(out["mea"], out["vanilla"])


@needs_flux2
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("guidance", ["fused", "paper"])
def test_flux2_region_rows_are_the_target_region_and_all_other_rows_bit_identical(comfy_env, monkeypatch, variant,
                                                                                 guidance):
    """At every block: the rows MEA redoes are the target region at FLUX.2's own grid (8x8 tokens, not FLUX.1's
    halved 4x4), every garment token of the reference's 8x8 grid is a key, text and other rows are untouched."""
    spy = cm.DitBlockSpy(monkeypatch)
    _run(variant, {"mea": (cm.small_flux2_model(variant=variant), {"guidance": guidance}, {})})
    spy.check_outside_unchanged()
    assert len(spy.calls) == 4  # 2 double + 2 single blocks, one MEA call each
    region = _region_tokens()
    masks = cm.pack_module("tensors.masks")
    eroded = masks.erode(_pair()["garment_mask"] > 0.5, masks.GARMENT_EROSION)  # what the node keeps
    garment = _mf().token_mask(eroded, GRID)[0]
    assert 0 < int(region.sum()) < region.numel() and int(garment.sum()) > 0
    for c in spy.calls:
        assert torch.equal(c["region"][0], region)
        assert c["start"] == TEXT and c["q"][2] == TEXT + region.numel()
        assert c["k_ref"][2] == int(garment.sum())
    # the changed rows are exactly the region's (a random model changes each row it redoes)
    c = spy.calls[0]
    changed = (c["out"] != c["base"]).any(-1)[0, TEXT:]
    assert torch.equal(changed, region)


@needs_flux2
@pytest.mark.parametrize("variant", VARIANTS)
def test_flux2_reference_latent_rows_stay_vanilla_and_the_garment_sits_after_them(comfy_env, monkeypatch, variant):
    """With a ReferenceLatent (FLUX.2's multi-reference editing) its tokens follow the target's image tokens: their
    rows are the block's own attention at every block, and before the first MEA block they equal a vanilla run's;
    the garment keys are roped one ref_index_scale step after the call's reference latents (20, not FLUX.2's 10)."""
    mf = _mf()
    indices = []
    real_ids = mf.reference_token_ids

    def ids(hw, n_axes=3, index=1.0, *rest):
        indices.append(float(index))
        return real_ids(hw, n_axes, index, *rest)

    monkeypatch.setattr(mf, "reference_token_ids", ids)
    vanilla, patched_src, seen = first_double_block_outputs(cm.small_flux2_model(variant=variant))
    pos = cm.flux2_conditioning(1, variant, reference_latents=[_ref_latent()])
    spy = cm.DitBlockSpy(monkeypatch)
    _run(variant, {"vanilla": (vanilla, "stock", {"positive": pos}), "mea": (patched_src, {}, {"positive": pos})})
    spy.check_outside_unchanged()
    n_img = GRID[0] * GRID[1]
    assert len(spy.calls) == 4 and all(c["q"][2] == TEXT + 2 * n_img for c in spy.calls)  # text, image, reference
    assert set(indices) == {20.0}
    v, m = seen["vanilla"][-1], seen["mea"][-1]  # the target call of block d0 (the reference pass comes first)
    assert v.shape[1] == TEXT + 2 * n_img
    keep = torch.ones(v.shape[1], dtype=torch.bool)
    keep[TEXT : TEXT + n_img] = ~_region_tokens()
    assert torch.equal(m[:, keep], v[:, keep])
    assert torch.equal(m[:, TEXT + n_img :], v[:, TEXT + n_img :])  # the reference latent's rows
    assert not torch.equal(m[:, ~keep], v[:, ~keep])


@needs_flux2
@pytest.mark.parametrize("variant", VARIANTS)
def test_flux2_reference_pass_gets_the_model_text_and_no_reference_latents(comfy_env, variant):
    """The reference pass's text is the prompt as Flux2.extra_conds pads it (512 tokens, as the target's), and it
    takes neither the target's reference latents nor its guidance row's other inputs beyond the model's own."""
    import comfy.patcher_extension

    calls = []

    def record(executor, x, timestep, context, *args, **kwargs):
        to = args[4] if len(args) > 4 else kwargs.get("transformer_options", {})  # (y, guidance, ref_latents, control, to)
        ref = args[2] if len(args) > 2 else kwargs.get("ref_latents")
        calls.append((x.shape, context.shape, ref is not None, any(k.startswith("max4zero") for k in to)))
        return executor(x, timestep, context, *args, **kwargs)

    model = cm.small_flux2_model(variant=variant).clone()
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "max4zero_test", record)
    pos = cm.flux2_conditioning(1, variant, reference_latents=[_ref_latent()])
    _run(variant, {"mea": (model, {}, {"positive": pos})})
    assert len(calls) == 2  # one Euler step at cfg 1: the reference pass and the target call
    (ref_x, ref_ctx, ref_refs, _), (x, ctx, refs, _) = calls
    assert ref_ctx == ctx == (1, TEXT, 64)
    assert ref_x == x == (1, 128, *GRID)
    assert refs and not ref_refs


@needs_flux2
@pytest.mark.parametrize("variant", VARIANTS)
def test_flux2_reference_keys_outside_the_garment_have_no_influence(comfy_env, monkeypatch, variant):
    """Huge K/V on the reference's non-garment tokens at the MEA block (reference pass only): same result."""
    model = cm.small_flux2_model(variant=variant)
    m2, patches = hostile_reference_kv(monkeypatch, model)
    out = _run(variant, {"plain": (model, {"blocks": "d0"}, {}), "hostile": (m2, {"blocks": "d0"}, {}),
                         "vanilla": (model, "stock", {})})
    assert len(patches) == 2
    assert torch.equal(out["plain"], out["hostile"])
    assert not torch.equal(out["plain"], out["vanilla"])


# ------------------------------------------------------------------------------------------------
# guidance through ComfyUI's sampler (one Euler step returns x̂0)
# ------------------------------------------------------------------------------------------------


@needs_flux2
@pytest.mark.parametrize("variant", VARIANTS)
def test_flux2_guidance_identities_through_one_euler_step(comfy_env, variant):
    import comfy.samplers

    model = cm.small_flux2_model(variant=variant)
    pos, neg = cm.flux2_conditioning(1, variant), cm.flux2_conditioning(2, variant)
    out = _run(variant, {
        "c": (model, "stock", {"positive": pos}),
        "u": (model, "stock", {"positive": neg}),
        "mea": (model, {"guidance": "fused"}, {"positive": pos}),  # fused at cfg 1 = the positive pass with MEA
        "paper1": (model, {"guidance": "paper"}, {"positive": pos}),  # distilled: cfg 1, no negative pass
        "paper3": (model, {"guidance": "paper"}, {"positive": pos, "negative": neg, "cfg": 3.0}),  # real CFG
        "fused3": (model, {"guidance": "fused"}, {"positive": pos, "negative": neg, "cfg": 3.0}),
    })
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 1)
    assert sigmas.shape == (2,) and float(sigmas[-1]) == 0.0
    mask = (_pair()["target_mask"] > 0.5).float()[:, None]
    M = F.interpolate(mask, size=out["c"].shape[-2:], mode="nearest")  # the latent grid is the token grid
    assert 0 < float(M.mean()) < 1
    c, u, mea = out["c"], out["u"], out["mea"]
    assert float((mea - c).abs().max()) > 1e-3
    want = {
        "paper1": c + S_MEA * M * (mea - c),
        "paper3": u + 3.0 * (c - u) + S_MEA * M * (mea - u),
        "fused3": u + 3.0 * (mea - u),
    }
    for name, w in want.items():
        err = float((out[name] - w).abs().max())
        assert err <= TOL * max(1.0, float(w.abs().max())), (name, err)


# ------------------------------------------------------------------------------------------------
# the flow view on FLUX.2's grid
# ------------------------------------------------------------------------------------------------


@needs_flux2
def test_flux2_flow_view_names_the_1_16_grid_and_renders_at_16x(comfy_env):
    model = cm.small_flux2_model(variant="klein")
    g = Graph()
    mea = _mea(g, g.obj(model, "MODEL"), "klein", contrast=1.0)
    samp = _sampler(g, mea[0], "klein")
    view = _graphs("klein").flow_view(g, mea, samp, layers="1/16 grid")
    g.capture(view[0], "flow")
    g.capture(view[2], "reliance")
    res = run_prompt(g)
    assert res["flow"].shape == (1, SIZE, SIZE, 3) and res["reliance"].shape == (1, SIZE, SIZE)
    tm = _pair()["target_mask"][0] > 0.5
    assert float(res["reliance"][0][tm].mean()) > 0
    records = cm.mea_run(mea.id, res.output(samp.id, 0)["samples"]).records[1.0]
    assert {r.query_hw for r in records} == {GRID} and {r.ref_hw for r in records} == {GRID}


@needs_flux2
def test_flux2_mask_check_uses_the_16x_token_grid(comfy_env):
    """A 6 px target stripe survives FLUX.1-style checks at 1/8 of the image but vanishes at FLUX.2's 1/16 token grid:
    the node refuses it before any sampler (with the latent grid read at 8x it would pass and do nothing)."""
    stripe = torch.zeros(1, SIZE, SIZE)
    stripe[:, 8:14, :] = 1.0
    g = Graph()
    g.capture(_mea(g, g.obj(cm.small_flux2_model(variant="klein"), "MODEL"), "klein", target_mask=stripe)[0], "p")
    with pytest.raises(cm.PromptFailed, match="target_mask"):
        run_prompt(g)
