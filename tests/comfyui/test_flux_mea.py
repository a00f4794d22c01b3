"""Masked Extended Attention on a tiny random-weight Flux (FLUX.1 Fill layout) inside a real ComfyUI (docs/method.md §3c).

The model is ComfyUI's own ``comfy.ldm.flux.model.Flux`` (hidden 128, 2 heads, axes 16/24/24, 2 double + 2 single
blocks, 96 input channels), detected by ``model_detection`` as ``FluxInpaint`` (``comfy_models.small_flux_model``).
Sampling goes through the stock KSamplerAdvanced in ComfyUI's own execution. On ComfyUI 0.3.64 (no
``attn1_patch`` in the Flux blocks) only the refusal test runs.
"""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

import comfy_models as cm
from comfy_models import Graph, PromptFailed, run_prompt

SIZE = 128  # 16×16 latent → 8×8 Flux tokens
MEA = "MaX4ZeroMaskedExtendedAttention"
S_MEA = 3.0
TOL = 2e-4


def _has_hook() -> bool:
    return cm.pack_module("nodes.mea_flux").flux_hook_problem() is None


needs_hook = pytest.mark.skipif("not _has_hook()", reason="this ComfyUI's Flux blocks have no attn1_patch hook "
                                "(0.3.64): MEA on Flux needs ComfyUI 0.33.0 or newer; only the refusal is tested")


def _mf():
    return cm.pack_module("nodes.mea_flux")


@functools.lru_cache(maxsize=None)
def _pair():
    return cm.synthetic_pair(SIZE)


def _mea(g: Graph, model_link, *, target_mask=None, guidance="fused", blocks="all", contrast=1.25, start=0.0,
         end=1.0, reference=None):
    pair = _pair()
    return g.node(
        MEA, model=model_link, vae=g.obj(cm.StubFluxVAE(), "VAE"),
        reference=g.obj(pair["reference"] if reference is None else reference, "IMAGE"),
        garment_mask=g.obj(pair["garment_mask"], "MASK"),
        target_mask=g.obj(pair["target_mask"] if target_mask is None else target_mask, "MASK"),
        positive=g.obj(cm.flux_conditioning(3), "CONDITIONING"), guidance=guidance, s_mea=S_MEA, contrast=contrast,
        start=start, end=end, layers="decoder 1/16 + 1/8 (paper)", reference_seed=0, background="kept",
        flux_blocks=blocks,
    )


def _sampler(g: Graph, model_link, *, cfg=1.0, steps=1, positive=None, negative=None, seed=5):
    return g.node(
        "KSamplerAdvanced", model=model_link, add_noise="enable", noise_seed=seed, steps=steps, cfg=cfg,
        sampler_name="euler", scheduler="simple",
        positive=g.obj(positive or cm.flux_conditioning(1), "CONDITIONING"),
        negative=g.obj(negative or cm.flux_conditioning(2), "CONDITIONING"),
        latent_image=g.obj({"samples": torch.zeros(1, 16, SIZE // 8, SIZE // 8)}, "LATENT"),
        start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable",
    )


def _run(models: dict, **mea_kw) -> dict:
    """{name: sampled latent} for {name: (model patcher, "stock" | mea overrides dict, sampler overrides dict)}."""
    g = Graph()
    for name, (model, mea, samp) in models.items():
        link = g.obj(model, "MODEL")
        if mea != "stock":
            link = _mea(g, link, **{**mea_kw, **mea})[0]
        g.capture(_sampler(g, link, **samp)[0], name)
    res = run_prompt(g)
    return {name: res[name]["samples"] for name in models}


def _kv_cache(model):
    import comfy_extras.nodes_flux as nf

    return nf.FluxKVCache.execute(model).result[0]


def _scale_v_patch(model):
    """Another pack's attn1_patch (halves V everywhere), set on a clone."""
    m = model.clone()
    m.set_model_attn1_patch(lambda q, k, v, extra_options=None, **kw: {"v": v * 0.5})
    return m


class _Blocks:
    """Records, per MEA block call, the block's own attention and MEA's result (joint_extended_attention)."""

    def __init__(self, monkeypatch):
        self.calls = []
        mf = _mf()
        real = mf.joint_extended_attention

        def spy(q, k, v, k_ref, v_ref, region, start, base, *a, **kw):
            out = real(q, k, v, k_ref, v_ref, region, start, base, *a, **kw)
            self.calls.append({"q": q.shape, "k": k.shape, "region": region.clone(), "start": start,
                               "base": base.clone(), "out": out.clone()})
            return out

        monkeypatch.setattr(mf, "joint_extended_attention", spy)

    def check_outside_unchanged(self):
        assert self.calls, "MEA ran in no block"
        changed = 0
        for c in self.calls:
            keep = torch.ones(c["base"].shape[:2], dtype=torch.bool)
            n = c["region"].shape[-1]
            keep[:, c["start"] : c["start"] + n] = ~c["region"].expand(keep.shape[0], -1)
            assert c["start"] > 0  # text tokens come first
            assert torch.equal(c["out"][keep], c["base"][keep])  # text + outside region: bit for bit
            changed += int(not torch.equal(c["out"][~keep], c["base"][~keep]))
        assert changed, "MEA changed no region query"


# ------------------------------------------------------------------------------------------------
# refusal (both versions)
# ------------------------------------------------------------------------------------------------


def test_flux_is_refused_without_the_hook_or_accepted_with_it(comfy_env):
    model = cm.small_flux_model()
    assert model.detected_config == "FluxInpaint"
    g = Graph()
    g.capture(_mea(g, g.obj(model, "MODEL"))[0], "patched")
    if _has_hook():
        res = run_prompt(g)
        assert res["patched"] is not model
        return
    with pytest.raises(PromptFailed, match="update ComfyUI to 0.33.0 or newer"):
        run_prompt(g)


# ------------------------------------------------------------------------------------------------
# no-op and locality
# ------------------------------------------------------------------------------------------------


@needs_hook
def test_empty_mask_and_window_outside_are_bit_identical_to_vanilla(comfy_env):
    model = cm.small_flux_model()
    empty = torch.zeros_like(_pair()["target_mask"])
    out = _run({
        "vanilla": (model, "stock", {"steps": 2}),
        "empty": (model, {"target_mask": empty}, {"steps": 2}),
        "paper_empty": (model, {"target_mask": empty, "guidance": "paper"}, {"steps": 2}),
        "outside_window": (model, {"start": 0.0, "end": 0.0}, {"steps": 2}),
        "mea": (model, {}, {"steps": 2}),
    })
    for name in ("empty", "paper_empty"):
        assert torch.equal(out[name], out["vanilla"]), name
    assert not torch.equal(out["mea"], out["vanilla"])


@needs_hook
@pytest.mark.parametrize("guidance", ["fused", "paper"])
def test_text_and_outside_region_tokens_are_bit_identical_at_every_block(comfy_env, monkeypatch, guidance):
    spy = _Blocks(monkeypatch)
    _run({"mea": (cm.small_flux_model(), {"guidance": guidance}, {})})
    spy.check_outside_unchanged()
    kinds = {(c["q"][2], c["k"][2]) for c in spy.calls}
    assert len(spy.calls) == 4  # 2 double + 2 single blocks, one MEA call each
    assert all(lq == lk for lq, lk in kinds)


@needs_hook
def test_first_block_matches_a_vanilla_run_outside_the_region(comfy_env, monkeypatch):
    """Before the first MEA block both runs are equal: its attention output must equal vanilla's outside."""
    import comfy.ldm.flux.layers as layers

    seen = {}

    def record(name):
        def patch(attn, extra_options):
            if extra_options.get("block_type") == "double" and extra_options.get("block_index") == 0:
                seen.setdefault(name, []).append(attn.clone())
            return attn
        return patch

    model = cm.small_flux_model()
    vanilla, patched_src = model.clone(), model.clone()
    vanilla.set_model_attn1_output_patch(record("vanilla"))
    patched_src.set_model_attn1_output_patch(record("mea"))
    spy = _Blocks(monkeypatch)
    _run({"vanilla": (vanilla, "stock", {}), "mea": (patched_src, {"blocks": "d0"}, {})})
    assert layers is not None and len(spy.calls) == 1
    region = spy.calls[0]["region"][0]
    start = spy.calls[0]["start"]
    v, m = seen["vanilla"][-1], seen["mea"][-1]  # the target call (the reference pass comes first)
    keep = torch.ones(v.shape[1], dtype=torch.bool)
    keep[start : start + region.numel()] = ~region
    assert torch.equal(m[:, keep], v[:, keep])
    assert not torch.equal(m[:, ~keep], v[:, ~keep])


@needs_hook
def test_reference_keys_outside_the_garment_have_no_influence(comfy_env, monkeypatch):
    """Huge K/V on the reference's non-garment tokens at the MEA block (reference pass only): same result."""
    mf = _mf()
    model = cm.small_flux_model()

    def hostile(q, k, v, pe=None, attn_mask=None, extra_options=None, **kw):
        to = extra_options or {}
        if to.get("uuids") is None or to.get("block_type") != "double" or to.get("block_index") != 0:
            return {}
        patch = next((p for p in hostile.patches if list(to["uuids"]) == [p.ref_uuid]), None)
        if patch is None:
            return {}
        start = int(to["img_slice"][0])
        outside = torch.ones(patch.ref_tokens, dtype=torch.bool)
        outside[patch.garment_index("cpu")] = False
        k, v = k.clone(), v.clone()
        k[:, :, start:][:, :, outside] = 1e4
        v[:, :, start:][:, :, outside] = -1e4
        return {"k": k, "v": v}

    hostile.patches = []
    real_init = mf.FluxMeaPatch.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        hostile.patches.append(self)

    monkeypatch.setattr(mf.FluxMeaPatch, "__init__", init)
    m2 = model.clone()
    m2.set_model_attn1_patch(hostile)
    out = _run({"plain": (model, {"blocks": "d0"}, {}), "hostile": (m2, {"blocks": "d0"}, {})})
    assert len(hostile.patches) == 2
    assert torch.equal(out["plain"], out["hostile"])


# ------------------------------------------------------------------------------------------------
# guidance through ComfyUI's sampler (one Euler step returns x̂0)
# ------------------------------------------------------------------------------------------------


@needs_hook
def test_guidance_formula_through_the_sampler(comfy_env):
    import comfy.samplers

    model = cm.small_flux_model()
    pos, neg = cm.flux_conditioning(1), cm.flux_conditioning(2)
    out = _run({
        "c": (model, "stock", {"positive": pos}),
        "u": (model, "stock", {"positive": neg}),
        "mea": (model, {"guidance": "fused"}, {"positive": pos}),  # fused at cfg 1 = the positive pass with MEA
        "paper1": (model, {"guidance": "paper"}, {"positive": pos}),  # distilled: cfg 1, no negative pass
        "paper3": (model, {"guidance": "paper"}, {"positive": pos, "cfg": 3.0}),  # real CFG
        "fused3": (model, {"guidance": "fused"}, {"positive": pos, "cfg": 3.0}),
    })
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 1)
    assert sigmas.shape == (2,) and float(sigmas[-1]) == 0.0
    mask = (_pair()["target_mask"] > 0.5).float()[:, None]
    M = F.interpolate(mask, size=out["c"].shape[-2:], mode="nearest")
    assert 0 < float(M.mean()) < 1
    c, u, mea = out["c"], out["u"], out["mea"]
    assert float((mea - c).abs().max()) > 1e-3
    want = {
        "paper1": c + S_MEA * M * (mea - c),  # ε_c + s_mea·M⊙(ε_MEA − ε_c): guidance_base(None, c) = c
        "paper3": u + 3.0 * (c - u) + S_MEA * M * (mea - u),
    }
    for name, w in want.items():
        err = float((out[name] - w).abs().max())
        assert err <= TOL * max(1.0, float(w.abs().max())), (name, err)
    # fused at cfg 3 is ComfyUI's own CFG over the MEA positive: u + 3(mea − u) (needs the fused cfg-3 call's
    # MEA positive, which is the same call as at cfg 1)
    w = u + 3.0 * (mea - u)
    assert float((out["fused3"] - w).abs().max()) <= TOL * max(1.0, float(w.abs().max()))


# ------------------------------------------------------------------------------------------------
# chaining
# ------------------------------------------------------------------------------------------------


def _kontext_cond(seed: int):
    """Flux conditioning with a Kontext reference latent, so FluxKVCache has something to cache."""
    g = torch.Generator().manual_seed(50 + seed)
    (t, d), = cm.flux_conditioning(seed)
    return [[t, {**d, "reference_latents": [torch.randn(1, 16, SIZE // 16, SIZE // 16, generator=g)]}]]


@needs_hook
def test_chains_with_flux_kv_cache_in_either_order(comfy_env, monkeypatch):
    """Kontext-style reference latents on a 16-channel Flux (no Fill channels) with shared modulation, which
    FluxKVCache's ``index_timestep_zero`` needs (it fails on FLUX.1's per-block modulation, with or without MEA)."""
    spy = _Blocks(monkeypatch)
    model = cm.small_flux_model(in_channels=16, global_modulation=True)
    assert model.detected_config == "Flux"
    g = Graph()
    pos = _kontext_cond(1)
    kv_then_mea = _mea(g, g.obj(_kv_cache(model), "MODEL"))[0]
    mea_only = _mea(g, g.obj(model, "MODEL"))[0]
    g.capture(mea_only, "mea_patched")
    res_a = run_prompt(_with_sampler(g, kv_then_mea, pos, "a"))
    calls_a = list(spy.calls)
    spy.calls.clear()
    mea_then_kv = _kv_cache(res_a.captured["mea_patched"])
    g2 = Graph()
    res_b = run_prompt(_with_sampler(g2, g2.obj(mea_then_kv, "MODEL"), pos, "b"))
    assert torch.equal(res_a["a"]["samples"], res_b["b"]["samples"])
    spy.calls = calls_a + spy.calls
    spy.check_outside_unchanged()
    # the second step runs on the cached reference-latent K/V: keys outnumber queries there
    assert any(c["k"][2] > c["q"][2] for c in spy.calls)


def _with_sampler(g: Graph, model_link, positive, name):
    g.capture(_sampler(g, model_link, steps=2, positive=positive)[0], name)
    return g


@needs_hook
def test_chains_with_another_attn1_patch_in_either_order(comfy_env, monkeypatch):
    spy = _Blocks(monkeypatch)
    model = cm.small_flux_model()
    g = Graph()
    before = _mea(g, g.obj(_scale_v_patch(model), "MODEL"))[0]
    mea_first = _mea(g, g.obj(model, "MODEL"))[0]
    g.capture(mea_first, "mea_first")
    g.capture(_sampler(g, before, steps=2)[0], "a")
    res = run_prompt(g)
    after = _scale_v_patch(res.captured["mea_first"])
    g2 = Graph()
    g2.capture(_sampler(g2, g2.obj(after, "MODEL"), steps=2)[0], "b")
    g2.capture(_sampler(g2, g2.obj(_scale_v_patch(model), "MODEL"), steps=2)[0], "plain")
    res2 = run_prompt(g2)
    assert torch.equal(res["a"]["samples"], res2["b"]["samples"])
    assert not torch.equal(res2["b"]["samples"], res2["plain"]["samples"])
    spy.check_outside_unchanged()


# ------------------------------------------------------------------------------------------------
# node inputs and reference
# ------------------------------------------------------------------------------------------------


@needs_hook
def test_reference_pass_uses_fill_layout_and_garment_tokens_only(comfy_env):
    mf = _mf()
    model = cm.small_flux_model()
    lat = torch.randn(1, 16, 8, 6)
    concat = mf.flux_reference_concat(model.model, lat)
    assert concat.shape == (1, 80, 8, 6)
    assert torch.equal(concat[:, :16], lat) and not concat[:, 16:].any()  # itself as masked image, mask all 0
    g = Graph()
    g.capture(_mea(g, g.obj(model, "MODEL"), blocks="d1, s0")[0], "patched")
    patched = run_prompt(g)["patched"]
    patch = patched.wrappers["apply_model"]["max4zero_mea"][0].__self__
    assert patch.blocks == frozenset({("double", 1), ("single", 0)})
    n_garment = int(patch.garment_index("cpu").numel())
    assert 0 < n_garment < patch.ref_tokens
    assert patch.ref_grid == (SIZE // 16, SIZE // 16)
    ids_axis0 = {float(x) for x in mf.reference_token_ids(patch.ref_grid)[0, :, 0]}
    assert ids_axis0 == {1.0}  # Kontext's reference index


@needs_hook
def test_bad_flux_blocks_is_refused_on_the_node(comfy_env):
    g = Graph()
    g.capture(_mea(g, g.obj(cm.small_flux_model(), "MODEL"), blocks="d7")[0], "patched")
    with pytest.raises(PromptFailed, match="flux_blocks"):
        run_prompt(g)
