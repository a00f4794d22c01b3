"""Masked Extended Attention on a tiny random-weight Flux (FLUX.1 Fill layout) inside a real ComfyUI (docs/method.md §3c).

The model is ComfyUI's own ``comfy.ldm.flux.model.Flux`` (hidden 128, 2 heads, axes 16/24/24, 2 double + 2 single
blocks, 96 input channels), detected by ``model_detection`` as ``FluxInpaint`` (``comfy_models.small_flux_model``).
Sampling goes through the stock KSamplerAdvanced in ComfyUI's own execution. On ComfyUI 0.3.64 (no
``attn1_patch`` in the Flux blocks) only the refusal test runs.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import comfy_models as cm
from comfy_models import Graph, PromptFailed, run_prompt
from dit_mea_support import DitGraphs, first_double_block_outputs, hostile_reference_kv

SIZE = 128  # 16×16 latent → 8×8 Flux tokens
S_MEA = 3.0
TOL = 2e-4


def _has_hook() -> bool:
    return cm.pack_module("nodes.mea_flux").flux_hook_problem() is None


needs_hook = pytest.mark.skipif("not _has_hook()", reason="this ComfyUI's Flux blocks have no attn1_patch hook "
                                "(0.3.64): MEA on Flux needs ComfyUI 0.33.0 or newer; only the refusal is tested")


def _mf():
    return cm.pack_module("nodes.mea_flux")


GRAPHS = DitGraphs(size=SIZE, vae=cm.StubFluxVAE, conditioning=cm.flux_conditioning,
                   latent=(1, 16, SIZE // 8, SIZE // 8), s_mea=S_MEA)
_pair, _mea, _sampler, _run = GRAPHS.pair, GRAPHS.mea, GRAPHS.sampler, GRAPHS.run


def _kv_cache(model):
    import comfy_extras.nodes_flux as nf

    return nf.FluxKVCache.execute(model).result[0]


def _scale_v_patch(model):
    """Another pack's attn1_patch (halves V everywhere), set on a clone."""
    m = model.clone()
    m.set_model_attn1_patch(lambda q, k, v, extra_options=None, **kw: {"v": v * 0.5})
    return m


_Blocks = cm.DitBlockSpy


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

    vanilla, patched_src, seen = first_double_block_outputs(cm.small_flux_model())
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
    model = cm.small_flux_model()
    m2, patches = hostile_reference_kv(monkeypatch, model)
    out = _run({"plain": (model, {"blocks": "d0"}, {}), "hostile": (m2, {"blocks": "d0"}, {})})
    assert len(patches) == 2
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


class _HalfAttention:
    """Another pack's ``optimized_attention_override`` (e.g. a faster attention): calls the attention it is given,
    halves the result, counts its calls. Set on a clone, as packs do."""

    def __init__(self):
        self.calls = 0
        self.outputs = []

    def __call__(self, func, *args, **kwargs):
        self.calls += 1
        out = func(*args, **kwargs) * 0.5
        self.outputs.append(out.clone())
        return out

    def returned(self, t: torch.Tensor) -> bool:
        return any(o.shape == t.shape and torch.equal(o, t) for o in self.outputs)

    def on(self, model):
        m = model.clone()
        m.model_options.setdefault("transformer_options", {})["optimized_attention_override"] = self
        return m


@needs_hook
def test_chains_with_another_attention_override_in_either_order(comfy_env, monkeypatch):
    """Another pack's attention override set before or after the MEA node is called, never dropped; the region's
    image queries are MEA's, every other row is what that override returned (bit for bit)."""
    spy = _Blocks(monkeypatch)
    model = cm.small_flux_model()
    g0 = Graph()
    g0.capture(_sampler(g0, _mea(g0, g0.obj(model, "MODEL"))[0], steps=2)[0], "mea_only")
    mea_model = _mea(g0, g0.obj(model, "MODEL"))[0]
    g0.capture(mea_model, "mea_model")
    res0 = run_prompt(g0)
    results = {}
    for order, other in (("before", _HalfAttention()), ("after", _HalfAttention())):
        spy.calls.clear()
        g = Graph()
        if order == "before":  # the other pack's node, then MaX4Zero's
            link = _mea(g, g.obj(other.on(model), "MODEL"))[0]
        else:  # MaX4Zero's node, then the other pack's
            link = g.obj(other.on(res0.captured["mea_model"]), "MODEL")
        g.capture(_sampler(g, link, steps=2)[0], order)
        results[order] = run_prompt(g)[order]["samples"]
        assert other.calls > 0, f"{order}: the other pack's override was dropped"
        spy.check_outside_unchanged()
        # MEA's base (every row outside the region) is the other override's result
        assert all(other.returned(c["base"]) for c in spy.calls), order
    assert torch.equal(results["before"], results["after"])
    assert not torch.equal(results["before"], res0["mea_only"]["samples"])  # the override took effect


def _scale_block_replace(model):
    """Another pack's whole-block replacement of double block 0 (runs the original block, scales its image
    stream), set on a clone with ComfyUI's own ``patches_replace["dit"]`` API."""
    m = model.clone()

    def replace(args, extra):
        out = extra["original_block"](args)
        return {**out, "img": out["img"] * 0.9}

    m.set_model_patch_replace(replace, "dit", "double_block", 0)
    return m


@needs_hook
def test_chains_with_another_block_replacement_in_either_order(comfy_env, monkeypatch):
    """A ``patches_replace["dit"]`` block wrapper from another pack stays in place, and MEA still acts inside the
    block it wraps (the original block runs the attention hook)."""
    spy = _Blocks(monkeypatch)
    model = cm.small_flux_model()
    g = Graph()
    g.capture(_sampler(g, _mea(g, g.obj(_scale_block_replace(model), "MODEL"), blocks="d0")[0], steps=2)[0], "a")
    g.capture(_sampler(g, _mea(g, g.obj(model, "MODEL"), blocks="d0")[0], steps=2)[0], "mea_only")
    mea_model = _mea(g, g.obj(model, "MODEL"), blocks="d0")[0]
    g.capture(mea_model, "mea_model")
    res = run_prompt(g)
    assert not res.captured["mea_model"].model_options.get("transformer_options", {}).get(
        "patches_replace", {}).get("dit"), "MEA itself replaces no block"
    g2 = Graph()
    g2.capture(_sampler(g2, g2.obj(_scale_block_replace(res.captured["mea_model"]), "MODEL"), steps=2)[0], "b")
    res2 = run_prompt(g2)
    assert torch.equal(res["a"]["samples"], res2["b"]["samples"])
    assert not torch.equal(res["a"]["samples"], res["mea_only"]["samples"])  # the replacement took effect
    assert spy.calls and all(c["start"] > 0 for c in spy.calls)
    spy.check_outside_unchanged()


# ------------------------------------------------------------------------------------------------
# reference_every: a reference pass every N-th step, its K/V reused in between
# ------------------------------------------------------------------------------------------------


@needs_hook
@pytest.mark.parametrize("guidance", ["fused", "paper"])
def test_reference_every_runs_the_reference_pass_every_nth_step(comfy_env, monkeypatch, guidance):
    """cfg 1 (guidance-distilled): fused = cond pass with MEA, paper = cond pass + MEA pass; 5 steps, window = all."""
    steps = 5
    log = cm.ReferenceLog(monkeypatch)
    model = cm.small_flux_model()
    latents = {}
    for every in (None, 1, 2, 3):
        log.clear()
        g = Graph()
        node = _mea(g, g.obj(model, "MODEL"), guidance=guidance, reference_every=every)
        g.capture(_sampler(g, node[0], steps=steps)[0], "x")
        res = run_prompt(g)
        latents[every] = res["x"]["samples"]
        n = every or 1
        assert cm.mea_run(node.id, latents[every]).stats["reference_passes"] == -(-steps // n), every  # ceil(K/N)
        assert log.recorded_steps() == list(range(0, steps, n)), every
        assert {call_step for _, call_step, _, _ in log.uses} == set(range(steps))  # MEA at every step
        for call_sigma, call_step, sigma, step in log.uses:
            assert step <= call_step < step + n, (every, call_step, step)
            # a reused step reads K/V recorded at an earlier, noisier sigma; every 1 only ever its own sigma
            assert sigma == call_sigma if call_step == step else sigma > call_sigma
    assert torch.equal(latents[1], latents[None])  # 1 = today's behaviour, the paper's
    assert not torch.equal(latents[2], latents[1])


# ------------------------------------------------------------------------------------------------
# node inputs and reference
# ------------------------------------------------------------------------------------------------


@needs_hook
def test_reference_pass_uses_fill_layout_and_garment_tokens_only(comfy_env):
    mf = _mf()
    model = cm.small_flux_model()
    lat = torch.randn(1, 16, 8, 6)
    parts = mf.flux_concat_parts(model.model)
    assert parts == ("masked_image", "mask:64")
    concat = cm.pack_module("attention.reference").reconstruct_itself(parts, lat)
    assert concat.shape == (1, 80, 8, 6)
    assert torch.equal(concat[:, :16], lat) and not concat[:, 16:].any()  # itself as masked image, mask all 0
    g = Graph()
    g.capture(_mea(g, g.obj(model, "MODEL"), blocks="d1, s0")[0], "patched")
    patched = run_prompt(g)["patched"]
    patch = patched.wrappers["apply_model"]["max4zero_mea"][0].__self__
    assert patch.blocks == frozenset({("double", 1), ("single", 0)})
    n_garment = int(mf.token_mask(patch.settings.garment_mask, patch.ref_grid).sum())
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


# ------------------------------------------------------------------------------------------------
# Leffa Flow View from a Flux run (docs/method.md §4)
# ------------------------------------------------------------------------------------------------

def _view(g: Graph, mea, samp, *, layers="all MEA layers", tau=1.0):
    return GRAPHS.flow_view(g, mea, samp, layers=layers, tau=tau)


class _Inputs:
    """Records every joint_extended_attention call's inputs (q, k and the garment K roped, region, capture)."""

    def __init__(self, monkeypatch):
        self.calls = []
        mf = _mf()
        real = mf.joint_extended_attention

        def spy(q, k, v, k_ref, v_ref, region, start, base, *a, **kw):
            self.calls.append(dict(q=q.clone(), k=k.clone(), k_ref=k_ref.clone(), region=region.clone(), start=start,
                                   positions=kw.get("ref_positions"), capture=kw.get("capture") is not None))
            return real(q, k, v, k_ref, v_ref, region, start, base, *a, **kw)

        monkeypatch.setattr(mf, "joint_extended_attention", spy)


@needs_hook
def test_flow_view_renders_from_a_flux_run_and_records_the_core_flow(comfy_env, monkeypatch):
    """Flow View on a Flux MEA run: outputs at 8x the latent, flow/reliance inside the region only, and each
    record equals the Leffa flow and row mass computed independently from the block's own q and garment k."""
    from max4zero.attention.flow import reference_flow_from_qk, reference_grid

    spy = _Inputs(monkeypatch)
    model = cm.small_flux_model()
    g = Graph()
    mea = _mea(g, g.obj(model, "MODEL"), contrast=1.0)
    samp = _sampler(g, mea[0], steps=2)
    view = _view(g, mea, samp)
    for i, name in enumerate(("flow", "warped", "reliance", "sharpness", "disagreement")):
        g.capture(view[i], name)
    g.capture(_view(g, mea, samp, layers="1/16 grid")[2], "reliance16")
    res = run_prompt(g)
    assert res["flow"].shape == (1, SIZE, SIZE, 3) and res["warped"].shape == (1, SIZE, SIZE, 3)
    for name in ("reliance", "sharpness", "disagreement"):
        assert res[name].shape == (1, SIZE, SIZE), name
        assert torch.isfinite(res[name]).all() and res[name].min() >= 0 and res[name].max() <= 1, name
    assert torch.equal(res["reliance16"], res["reliance"])  # Flux tokens are the 1/16 grid
    tm = _pair()["target_mask"][0] > 0.5
    tok = F.interpolate(tm[None, None].float(), size=(SIZE // 16, SIZE // 16), mode="nearest")[0, 0] > 0.5
    far = F.max_pool2d(tok[None, None].float(), 3, 1, 1)[0, 0] == 0  # tokens with no region token nearby
    far_px = F.interpolate(far[None, None].float(), size=(SIZE, SIZE), mode="nearest")[0, 0] > 0.5
    assert float(res["reliance"][0][tm].mean()) > 0 and float(res["flow"][0][tm].amax()) > 0
    assert far_px.any() and not res["reliance"][0][far_px].any() and not res["flow"][0][far_px].any()

    trace = res.output(mea.id, 1)
    records = cm.mea_run(mea.id, res.output(samp.id, 0)["samples"]).records[1.0]
    assert trace.enabled and len(records) == len(spy.calls) == 8  # 4 blocks x 2 steps
    assert all(c["capture"] for c in spy.calls)
    assert {r.layer for r in records} == {("double", 0), ("double", 1), ("single", 0), ("single", 1)}
    assert {r.query_hw for r in records} == {(SIZE // 16, SIZE // 16)}
    assert {r.ref_hw for r in records} == {(SIZE // 16, SIZE // 16)}
    grid = reference_grid((SIZE // 16, SIZE // 16), "cpu")
    for call, rec in zip(spy.calls, records):
        q, k, kr, pos = call["q"].float(), call["k"].float(), call["k_ref"].float(), call["positions"]
        idx = call["region"][0].nonzero().flatten()
        heads, d = q.shape[1], q.shape[-1]
        qr = q[0, :, idx + call["start"]]  # [H, n, d] the region's image queries (roped)
        lr = qr @ kr[0].transpose(1, 2) / d**0.5  # [H, n, G] garment logits
        want_flow = (torch.softmax(lr, -1) @ grid[pos]).mean(0)  # naive Leffa flow, tau 1, head mean
        lt = qr @ k[0].transpose(1, 2) / d**0.5  # [H, n, L] every key of the block
        want_mass = torch.softmax(torch.cat([lt, lr], -1), -1)[..., lt.shape[-1]:].sum(-1).mean(0)
        got_flow = rec.flow[0].reshape(-1, 2)
        got_mass = rec.mass[0].reshape(-1)
        assert torch.allclose(got_flow[idx], want_flow, atol=1e-5), float((got_flow[idx] - want_flow).abs().max())
        assert torch.allclose(got_mass[idx], want_mass, atol=1e-5)
        outside = torch.ones(got_mass.numel(), dtype=torch.bool)
        outside[idx] = False
        assert not got_flow[outside].any() and not got_mass[outside].any()
        assert torch.equal(rec.query_mask[0].reshape(-1), ~outside)
        # the core's map-free flow (SDPA with the coordinates as values) on the same q / k agrees too
        flat = lambda x: x.transpose(0, 1).reshape(1, x.shape[1], -1)  # noqa: E731  [H, n, d] → [1, n, H·d]
        k_full = torch.zeros(1, grid.shape[0], heads * d).index_copy_(1, pos, flat(kr[0]))
        rm = torch.zeros(1, grid.shape[0], dtype=torch.bool)
        rm[0, pos] = True
        sdpa = reference_flow_from_qk(flat(qr), k_full, rm, heads, (SIZE // 16, SIZE // 16)).flow[0]
        assert torch.allclose(got_flow[idx], sdpa, atol=1e-5)


@needs_hook
def test_flux_recording_does_not_change_the_result_and_other_grids_are_refused(comfy_env):
    model = cm.small_flux_model()
    g = Graph()
    m = g.obj(model, "MODEL")
    mea = _mea(g, m)  # contrast 1.25: the explicit path with or without recording
    samp = _sampler(g, mea[0], steps=2)
    g.capture(_view(g, mea, samp, tau=2.0)[0], "flow")
    quiet = _mea(g, m)
    g.capture(_sampler(g, quiet[0], steps=2)[0], "quiet")
    res = run_prompt(g)
    trace = res.output(mea.id, 1)
    run = cm.mea_run(mea.id, res.output(samp.id, 0)["samples"])
    assert trace.enabled and trace.taus == (2.0,) and list(run.records) == [2.0] and len(run.records[2.0]) == 8
    assert not res.output(quiet.id, 1).enabled
    assert torch.equal(res.output(samp.id, 0)["samples"], res["quiet"]["samples"])
    assert res["flow"].shape == (1, SIZE, SIZE, 3) and res["flow"].max() > 0
    for layers in ("1/8 grid", "1/32 grid"):
        g2 = Graph()
        mea2 = _mea(g2, g2.obj(model, "MODEL"))
        g2.capture(_view(g2, mea2, _sampler(g2, mea2[0]), layers=layers)[0], "flow")
        with pytest.raises(PromptFailed, match=r"1/16 grid only \(a Flux model.*'all MEA layers' or '1/16 grid'"):
            run_prompt(g2)


@needs_hook
def test_no_op_report_on_flux_points_to_flux_blocks(comfy_env):
    g = Graph()
    g.capture(_mea(g, g.obj(cm.small_flux_model(), "MODEL"), blocks="d0")[0], "patched")
    patched = run_prompt(g)["patched"]
    patch = patched.wrappers["apply_model"]["max4zero_mea"][0].__self__
    said = []
    # the same settings on blocks this forward never reaches (the patch is frozen: a new one, as the node builds)
    lost = _mf().FluxMeaPatch(blocks=frozenset({("double", 99)}), settings=patch.settings, warn=said.append)
    g2 = Graph()
    g2.capture(_sampler(g2, g2.obj(lost.install(cm.small_flux_model().clone()), "MODEL"))[0], "out")
    run_prompt(g2)
    assert len(said) == 1 and "Flux blocks" in said[0] and "'flux_blocks'" in said[0] and "'layers'" not in said[0]


# ------------------------------------------------------------------------------------------------
# stage 1 on FLUX.1 Fill: Double-Mask Inpaint's conditioning and latent through the stock sampler
# ------------------------------------------------------------------------------------------------


def _double_mask_on_fill(target, pair, seen):
    import comfy.patcher_extension

    def record(executor, x, t, c_concat=None, *args, **kwargs):
        seen.append((x.detach().clone(), None if c_concat is None else c_concat.detach().clone()))
        return executor(x, t, c_concat, *args, **kwargs)

    model = cm.small_flux_model().clone()  # the Fill layout: 16 latent + 16 masked-image + 64 mask channels
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "max4zero_test_record", record)
    tm = pair["target_mask"]
    wm = torch.zeros_like(tm)
    wm[:, 56:112, 40:104] = 1.0  # the warp covers the lower part of the target mask only
    g = Graph()
    d = g.node("MaX4ZeroDoubleMaskInpaint", positive=g.obj(cm.flux_conditioning(1), "CONDITIONING"),
               negative=g.obj(cm.flux_conditioning(2), "CONDITIONING"), vae=g.obj(cm.StubFluxVAE(), "VAE"),
               target_image=g.obj(target, "IMAGE"), target_mask=g.obj(tm, "MASK"),
               warped_image=g.obj(pair["reference"], "IMAGE"), warped_mask=g.obj(wm, "MASK"), target_dilation=13,
               fringe_dilation=19)
    s = g.node("KSamplerAdvanced", model=g.obj(model, "MODEL"), add_noise="enable", noise_seed=3, steps=2, cfg=1.0,
               sampler_name="euler", scheduler="simple", positive=d[0], negative=d[1], latent_image=d[2],
               start_at_step=0, end_at_step=2, return_with_leftover_noise="disable")
    for name, link in (("latent", d[2]), ("D", d[6]), ("out", s[0])):
        g.capture(link, name)
    return run_prompt(g)


@needs_hook
def test_double_mask_inpaint_drives_flux_fill_through_the_stock_sampler(comfy_env):
    """The Fill model reads Double-Mask Inpaint's concat (masked image + the dilated fringe D as its mask channels);
    inside F the first model input carries nothing of the composite; outside F the composite comes back."""
    pair = _pair()
    targets = (pair["target"], (1.0 - pair["target"]).flip(2).contiguous())
    seen = [[], []]
    results = [_double_mask_on_fill(t, pair, s) for t, s in zip(targets, seen)]
    x0s = [s[0][0][:1] for s in seen]
    concat = seen[0][0][1]
    assert concat is not None and concat.shape[1] == 16 + 64  # masked-image latent + the 8x8-pixel mask channels
    d_cells = F.avg_pool2d(results[0]["D"][:, None], 8)  # D at the latent grid, the share of each cell
    mask_channels = concat[:1, 16:].mean(1, keepdim=True)
    assert torch.allclose(mask_channels, d_cells, atol=1e-5)  # the model's mask channel is D, not F
    cells = results[0]["latent"]["noise_mask"]  # F's latent cells (hard)
    inside = (cells > 0.5).expand(1, 16, -1, -1)
    assert inside.any() and (~inside).any()
    assert torch.equal(x0s[0][inside], x0s[1][inside])  # the same for both composites: no composite signal
    # (a flow model starts at sigma 1, where the first input is noise everywhere; at the next step the blend
    # brings the noised composite back outside F, so the two composites differ there)
    x1s = [s[1][0][:1] for s in seen]
    assert not torch.allclose(x1s[0][~inside], x1s[1][~inside], atol=1e-3)
    for res in results:
        out, lat = res["out"]["samples"], res["latent"]["samples"]
        assert torch.allclose(out[~inside], lat[~inside], atol=1e-4)  # outside F the composite, unchanged
        assert (out[inside] - lat[inside]).abs().max() > 1e-3  # inside F: generated
