"""Masked Extended Attention model patch and Leffa flow view, inside a real ComfyUI (CPU, random weights).

Sampling goes through the stock KSamplerAdvanced in ComfyUI's own execution; the cond/uncond order
tests call the patched model's ``apply_model`` directly with both orders and with split calls.
"""

from __future__ import annotations

import copy

import pytest
import torch

import comfy_models as cm
from comfy_models import Graph, PromptFailed, run_prompt

SIZE = 64  # 8x8 latent: the 1/8 and 1/16 decoder grids are 8x8 and 4x4
STEPS = 4
MEA = "MaX4ZeroMaskedExtendedAttention"
FLOW = "MaX4ZeroFlowView"


@pytest.fixture(scope="module")
def pair():
    return cm.synthetic_pair(SIZE)


def _mea(g: Graph, model_link, vae, pair, **over):
    inputs = dict(
        model=model_link, vae=g.obj(vae, "VAE"), reference=g.obj(pair["reference"], "IMAGE"),
        garment_mask=g.obj(pair["garment_mask"], "MASK"), target_mask=g.obj(pair["target_mask"], "MASK"),
        positive=g.obj(cm.conditioning(3), "CONDITIONING"), guidance="fused", s_mea=15.0, contrast=1.25,
        start=0.0, end=1.0, layers="decoder 1/16 + 1/8 (paper)", reference_seed=0, background="kept",
    )
    for k, v in over.items():
        inputs[k] = g.obj(v, {"reference": "IMAGE", "garment_mask": "MASK", "target_mask": "MASK"}[k]) \
            if k in ("reference", "garment_mask", "target_mask") else v
    return g.node(MEA, **inputs)


def _sampler(g: Graph, model_link, latent_link=None, *, cfg=5.0, seed=7, batch=1, steps=STEPS, positive=None,
             negative=None):
    if latent_link is None:
        latent_link = g.obj({"samples": torch.zeros(batch, 4, SIZE // 8, SIZE // 8)}, "LATENT")
    return g.node(
        "KSamplerAdvanced", model=model_link, add_noise="enable", noise_seed=seed, steps=steps, cfg=cfg,
        sampler_name="euler", scheduler="normal",
        positive=positive or g.obj(cm.conditioning(1), "CONDITIONING"),
        negative=negative or g.obj(cm.conditioning(2), "CONDITIONING"), latent_image=latent_link,
        start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable",
    )


def _latent(res, name):
    return res[name]["samples"]


_patch_of = cm.patch_of


def _snapshot(value):
    """A comparable deep snapshot of model_options (callables by identity, tensors by value)."""
    if isinstance(value, dict):
        return {k: _snapshot(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_snapshot(v) for v in value)
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.detach().cpu().clone())
    if callable(value):
        return ("callable", id(value))
    return value


def _same(a, b):
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return a == b


# ------------------------------------------------------------------------------------------------
# identity where MEA cannot act, and the input MODEL untouched
# ------------------------------------------------------------------------------------------------


def test_no_effect_cases_are_bit_identical_to_stock_sampling(comfy_env, small_sd15_model, small_vae, pair):
    model = small_sd15_model()
    before = _snapshot(model.model_options)
    wrappers_before = _snapshot(model.wrappers)
    g = Graph()
    m = g.obj(model, "MODEL")
    empty = torch.zeros_like(pair["garment_mask"])
    variants = {
        "empty_garment_fused": _mea(g, m, small_vae, pair, garment_mask=empty),
        "empty_garment_paper": _mea(g, m, small_vae, pair, garment_mask=empty, guidance="paper"),
        "s_mea_0_paper": _mea(g, m, small_vae, pair, guidance="paper", s_mea=0.0),
        "outside_window_fused": _mea(g, m, small_vae, pair, start=1.0, end=1.0),
        "outside_window_paper": _mea(g, m, small_vae, pair, guidance="paper", start=1.0, end=1.0),
    }
    g.capture(_sampler(g, m)[0], "stock")
    for name, node in variants.items():
        g.capture(_sampler(g, node[0])[0], name)
    res = run_prompt(g)
    stock = _latent(res, "stock")
    for name, node in variants.items():
        assert torch.equal(_latent(res, name), stock), name
        stats = cm.mea_run(node.id, _latent(res, name)).stats
        assert stats["reference_passes"] == 0 and stats["mea_calls"] == 0, name  # early-out: no reference pass
    # the input MODEL is never modified
    assert _same(_snapshot(model.model_options), before)
    assert _same(_snapshot(model.wrappers), wrappers_before)


def test_mea_changes_the_output_and_input_model_stays_clean(comfy_env, small_sd15_model, small_vae, pair):
    model = small_sd15_model()
    before = _snapshot(model.model_options)
    g = Graph()
    m = g.obj(model, "MODEL")
    fused = _mea(g, m, small_vae, pair, start=0.5)
    paper = _mea(g, m, small_vae, pair, guidance="paper", start=0.5)
    g.capture(_sampler(g, m)[0], "stock")
    g.capture(_sampler(g, fused[0])[0], "fused")
    g.capture(_sampler(g, paper[0])[0], "paper")
    res = run_prompt(g)
    stock = _latent(res, "stock")
    for name, node in (("fused", fused), ("paper", paper)):
        out = _latent(res, name)
        assert torch.isfinite(out).all()
        assert (out - stock).abs().max() > 1e-3, name
        stats = cm.mea_run(node.id, out).stats
        assert stats["mea_calls"] > 0
        # one reference pass per model evaluation in the window (euler: one per step), never per call
        assert 1 <= stats["reference_passes"] <= STEPS
    assert not torch.equal(_latent(res, "fused"), _latent(res, "paper"))
    assert _same(_snapshot(model.model_options), before)
    patched = res.output(fused.id, 0)
    assert patched is not model and patched.model is model.model
    assert "max4zero_mea" not in model.wrappers.get("apply_model", {})
    assert "sampler_post_cfg_function" not in model.model_options


def test_inpainting_model_with_stock_inpaint_conditioning(comfy_env, small_sd15_model, small_vae, pair):
    """9-channel model: the reference pass gets an all-zero mask channel; runs in both modes."""
    model = small_sd15_model(inpaint=True)
    g = Graph()
    m = g.obj(model, "MODEL")
    cond = g.node("InpaintModelConditioning", positive=g.obj(cm.conditioning(1), "CONDITIONING"),
                  negative=g.obj(cm.conditioning(2), "CONDITIONING"), vae=g.obj(small_vae, "VAE"),
                  pixels=g.obj(pair["target"], "IMAGE"), mask=g.obj(pair["target_mask"], "MASK"), noise_mask=True)
    outs = {}
    for name, model_link in (("stock", m), ("fused", _mea(g, m, small_vae, pair)[0]),
                             ("paper", _mea(g, m, small_vae, pair, guidance="paper")[0]),
                             ("empty", _mea(g, m, small_vae, pair,
                                            garment_mask=torch.zeros_like(pair["garment_mask"]))[0])):
        outs[name] = _sampler(g, model_link, cond[2], positive=cond[0], negative=cond[1])
        g.capture(outs[name][0], name)
    res = run_prompt(g)
    stock = _latent(res, "stock")
    assert torch.equal(_latent(res, "empty"), stock)
    for name in ("fused", "paper"):
        assert torch.isfinite(_latent(res, name)).all() and not torch.equal(_latent(res, name), stock), name


# ------------------------------------------------------------------------------------------------
# chaining with other packs' patches
# ------------------------------------------------------------------------------------------------


def _scaling_replace(counter: dict, name: str, scale: float):
    from comfy.ldm.modules.attention import optimized_attention

    def replace(q, k, v, extra):
        counter[name] = counter.get(name, 0) + 1
        return optimized_attention(q, k, v, extra["n_heads"]) * scale

    return replace


def test_other_attn1_replaces_and_wrappers_on_the_same_slots_keep_working(comfy_env, small_sd15_model, small_vae,
                                                                          pair):
    import comfy.patcher_extension as pe

    base = small_sd15_model()
    slots = [("output", i, 0) for i in range(3, 12) if i < 9] + [("output", 9), ("output", 10), ("output", 11)]
    counter: dict = {}
    theirs = base.clone()  # "another pack" applied BEFORE MEA: 3-tuple keys and ComfyUI's 2-tuple fallback keys
    for key in slots:
        theirs.set_model_attn1_replace(_scaling_replace(counter, "before", 0.7), *key)
    wrapper_calls = []

    def their_wrapper(executor, *args, **kwargs):
        wrapper_calls.append(1)
        return executor(*args, **kwargs)

    theirs.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "another_pack", their_wrapper)
    g = Graph()
    mt = g.obj(theirs, "MODEL")
    mb = g.obj(base, "MODEL")
    both = _mea(g, mt, small_vae, pair, start=0.0)
    mea_only = _mea(g, mb, small_vae, pair, start=0.0)
    g.capture(_sampler(g, mt)[0], "theirs_only")
    g.capture(_sampler(g, both[0])[0], "both")
    g.capture(_sampler(g, mea_only[0])[0], "mea_only")
    res = run_prompt(g)
    assert counter["before"] > 0 and wrapper_calls
    a, b, c = _latent(res, "theirs_only"), _latent(res, "both"), _latent(res, "mea_only")
    assert not torch.equal(b, a) and not torch.equal(b, c)  # both patches take effect
    # their replace is still in the MEA-patched model's options (wrapped at run time, never overwritten)
    patched = res.output(both.id, 0)
    assert set(slots) <= set(patched.model_options["transformer_options"]["patches_replace"]["attn1"])
    assert patched.wrappers["apply_model"]["another_pack"] == [their_wrapper]

    # another pack applied AFTER MEA (on the patched model) is wrapped as well
    after = patched.clone()
    for key in slots[:3]:
        after.set_model_attn1_replace(_scaling_replace(counter, "after", 1.3), *key)
    g2 = Graph()
    g2.capture(_sampler(g2, g2.obj(after, "MODEL"))[0], "after")
    res2 = run_prompt(g2)
    assert counter["after"] > 0
    assert not torch.equal(_latent(res2, "after"), b)
    assert _patch_of(after) is _patch_of(patched)  # clones share the frozen patch (nothing in it is written)


# ------------------------------------------------------------------------------------------------
# batch, cfg 1, cond/uncond order and split calls
# ------------------------------------------------------------------------------------------------


def test_batch_2_and_cfg_1_run_in_both_modes(comfy_env, small_sd15_model, small_vae, pair):
    model = small_sd15_model()
    g = Graph()
    m = g.obj(model, "MODEL")
    tm2 = torch.cat([pair["target_mask"], torch.flip(pair["target_mask"], dims=[1])])
    names = []
    for cfg, batch in ((1.0, 1), (5.0, 2), (1.0, 2)):
        g.capture(_sampler(g, m, cfg=cfg, batch=batch)[0], f"stock_{cfg}_{batch}")
    for mode in ("fused", "paper"):
        for cfg, batch, tm in ((1.0, 1, None), (5.0, 2, None), (1.0, 2, tm2)):
            over = {"guidance": mode}
            if tm is not None:
                over["target_mask"] = tm
            name = (f"{mode}_cfg{cfg}_b{batch}_{'tm2' if tm is not None else 'tm1'}", f"stock_{cfg}_{batch}")
            g.capture(_sampler(g, _mea(g, m, small_vae, pair, **over)[0], cfg=cfg, batch=batch)[0], name[0])
            names.append(name)
    res = run_prompt(g)
    for name, stock_name in names:
        out, stock = _latent(res, name), _latent(res, stock_name)
        assert out.shape == stock.shape and torch.isfinite(out).all(), name
        assert not torch.equal(out, stock), name


def _direct_call(patched, x, sigma, ctx, cou, sample_sigmas=None, mea_pass=None, run=None):
    """``apply_model`` of a patched ModelPatcher the way calc_cond_batch makes it, with our cond_or_uncond; ``run``:
    the per-run state to put in the call's options, as the OUTER_SAMPLE wrapper does (None: a call outside a
    sampling run, which keeps nothing)."""
    import comfy.model_management as mm
    import comfy.patcher_extension as pe

    mm.load_models_gpu([patched])
    to = pe.copy_nested_dicts(patched.model_options["transformer_options"])
    pe.merge_nested_dicts(to.setdefault("wrappers", {}), patched.wrappers, copy_dict1=False)
    to["cond_or_uncond"] = list(cou)
    to["sigmas"] = sigma.expand(1)
    if sample_sigmas is not None:
        to["sample_sigmas"] = sample_sigmas
    if mea_pass is not None:
        to["max4zero_mea_pass"] = mea_pass
    if run is not None:
        to[_patch_of(patched).run_key] = run
    return patched.model.apply_model(x, sigma.expand(x.shape[0]), c_crossattn=ctx, transformer_options=to)


def test_cond_uncond_orders_and_split_calls_agree(comfy_env, small_sd15_model, small_vae, pair):
    model = small_sd15_model()
    g = Graph()
    node = _mea(g, g.obj(model, "MODEL"), small_vae, pair)
    g.capture(node[0], "patched")
    res = run_prompt(g)
    patched = res["patched"]
    patch = _patch_of(patched)
    gen = torch.Generator().manual_seed(5)
    B = 2
    xc, xu = torch.randn(B, 4, 8, 8, generator=gen), torch.randn(B, 4, 8, 8, generator=gen)
    cc = cm.conditioning(1, batch=B)[0][0]
    cu = cm.conditioning(2, batch=B)[0][0]
    sigma = torch.tensor([1.5])
    run = patch.new_run()
    with torch.inference_mode():
        uc = _direct_call(patched, torch.cat([xu, xc]), sigma, torch.cat([cu, cc]), [1, 0], run=run)
        passes = run.stats["reference_passes"]
        cu_first = _direct_call(patched, torch.cat([xc, xu]), sigma, torch.cat([cc, cu]), [0, 1], run=run)
        only_c = _direct_call(patched, xc, sigma, cc, [0], run=run)
        only_u = _direct_call(patched, xu, sigma, cu, [1], run=run)
        assert run.stats["reference_passes"] == passes  # same sigma: the reference K/V are cached, not recomputed
        stock_u = _direct_call(model, xu, sigma, cu, [1])
        stock_c = _direct_call(model, xc, sigma, cc, [0])
        one_c = _direct_call(patched, xc[:1], sigma, cc[:1], [0])  # batch 1 agrees with row 0 of batch 2
    assert torch.allclose(uc[B:], cu_first[:B], atol=1e-5) and torch.allclose(uc[:B], cu_first[B:], atol=1e-5)
    assert torch.allclose(only_c, uc[B:], atol=1e-5) and torch.allclose(only_u, uc[:B], atol=1e-5)
    assert torch.equal(only_u, stock_u)  # a negative-only call passes through untouched
    assert (only_c - stock_c).abs().max() > 1e-4  # the positive rows do get MEA
    assert torch.allclose(one_c, only_c[:1], atol=1e-5)
    with torch.inference_mode():
        _direct_call(patched, xc, torch.tensor([1.25]), cc, [0], run=run)
    assert run.stats["reference_passes"] == passes + 1  # a new sigma: one new reference pass


def test_reference_as_extra_row_equals_separate_reference_pass(comfy_env, small_sd15_model, small_vae, pair,
                                                              monkeypatch):
    """Batch 1 with CFG (one-row chunks) and the paper's extra pass carry the reference as one more row."""
    model = small_sd15_model()
    g = Graph()
    g.capture(_mea(g, g.obj(model, "MODEL"), small_vae, pair)[0], "fused")
    g.capture(_mea(g, g.obj(model, "MODEL"), small_vae, pair, guidance="paper")[0], "paper")
    res = run_prompt(g)
    gen = torch.Generator().manual_seed(6)
    xc, xu = torch.randn(1, 4, 8, 8, generator=gen), torch.randn(1, 4, 8, 8, generator=gen)
    xs = torch.randn(3, 4, 8, 8, generator=gen)
    cc, cu = cm.conditioning(1)[0][0], cm.conditioning(2)[0][0]
    sigma = torch.tensor([2.5])
    outs = {}
    for name in ("fused", "paper"):
        patched = res[name]
        patch = _patch_of(patched)
        for inline in (True, False):
            monkeypatch.setattr(type(patch), "inline_reference", inline)  # a class setting, not patch state
            run = patch.new_run()
            with torch.inference_mode():
                if name == "fused":
                    a = _direct_call(patched, torch.cat([xu, xc]), sigma, torch.cat([cu, cc]), [1, 0], run=run)
                    b = _direct_call(patched, xc, sigma, cc, [0], run=run)  # same sigma again: cached K/V
                else:  # the extra positive pass: one chunk of 3 rows (+ the reference row when inline)
                    a = _direct_call(patched, xs, sigma, cc.expand(3, -1, -1), [0], mea_pass=patch.id, run=run)
                    b = _direct_call(patched, xs[:1], sigma, cc, [0], mea_pass=patch.id, run=run)
            assert run.stats["reference_passes"] == 1, (name, inline)
            outs[(name, inline)] = (a, b)
    for name in ("fused", "paper"):
        (a1, b1), (a2, b2) = outs[(name, True)], outs[(name, False)]
        assert a1.shape == a2.shape and torch.allclose(a1, a2, atol=1e-4), name
        assert torch.allclose(b1, b2, atol=1e-4), name
    with torch.inference_mode():
        stock = _direct_call(model, torch.cat([xu, xc]), sigma, torch.cat([cu, cc]), [1, 0])
    assert torch.equal(outs[("fused", True)][0][:1], stock[:1]) or torch.allclose(outs[("fused", True)][0][:1],
                                                                                 stock[:1], atol=1e-5)
    assert (outs[("fused", True)][0][1:] - stock[1:]).abs().max() > 1e-4


# ------------------------------------------------------------------------------------------------
# reference_every: a reference pass every N-th step, its K/V reused in between
# ------------------------------------------------------------------------------------------------

EVERY_STEPS = 5  # euler, "normal": sigmas 14.6, 4.09, 1.62, 0.695, 0.029, 0


def _sample_every(g_model, vae, pair, log, every, *, guidance="fused", batch=1, start=0.0):
    """(run stats, latent, recorded steps, uses) of one sampling run of EVERY_STEPS steps; ``every`` None = the
    input absent (a workflow saved before it existed)."""
    log.clear()
    g = Graph()
    over = {} if every is None else {"reference_every": every}
    node = _mea(g, g.obj(g_model, "MODEL"), vae, pair, guidance=guidance, start=start, **over)
    g.capture(_sampler(g, node[0], steps=EVERY_STEPS, batch=batch)[0], "x")
    res = run_prompt(g)
    return cm.mea_run(node.id, _latent(res, "x")).stats, _latent(res, "x"), log.recorded_steps(), set(log.uses)


@pytest.mark.parametrize("guidance, batch", [
    ("fused", 1),  # the reference rides inline (one-row chunks) when it runs
    ("fused", 2),  # a separate reference pass
    ("paper", 1),  # the extra MEA pass carries it
])
def test_reference_every_runs_the_reference_pass_every_nth_step(comfy_env, small_sd15_model, small_vae, pair,
                                                                 monkeypatch, guidance, batch):
    log = cm.ReferenceLog(monkeypatch)
    model = small_sd15_model()
    absent = _sample_every(model, small_vae, pair, log, None, guidance=guidance, batch=batch)
    latents = {}
    for every in (1, 2, 3):
        stats, latents[every], recorded, uses = _sample_every(model, small_vae, pair, log, every, guidance=guidance,
                                                              batch=batch)
        assert stats["reference_passes"] == -(-EVERY_STEPS // every), every  # ceil(K / N)
        assert recorded == list(range(0, EVERY_STEPS, every)), every
        for call_sigma, call_step, sigma, step in uses:
            assert step <= call_step < step + every, (every, call_step, step)
            # a reused step reads K/V recorded at an earlier, noisier sigma; every 1 only ever its own sigma
            assert sigma == call_sigma if call_step == step else sigma > call_sigma
        if every > 1:
            assert any(call_step > step for _, call_step, _, step in uses), every
        assert stats["mea_calls"] > 0
    assert torch.equal(latents[1], absent[1]) and absent[0]["reference_passes"] == EVERY_STEPS  # 1 = the paper
    assert not torch.equal(latents[2], latents[1])


def test_reference_every_counts_from_the_first_step_of_the_window(comfy_env, small_sd15_model, small_vae, pair,
                                                                   monkeypatch):
    """start 0.2 (sigma 5.09): the window holds steps 1-4; the reference runs at its first step, not at multiples
    of N from step 0."""
    log = cm.ReferenceLog(monkeypatch)
    model = small_sd15_model()
    for every, want in ((1, [1, 2, 3, 4]), (2, [1, 3]), (3, [1, 4])):
        stats, _, recorded, _ = _sample_every(model, small_vae, pair, log, every, start=0.2)
        assert recorded == want and stats["reference_passes"] == len(want), every


def test_a_reused_step_computes_with_the_earlier_reference(comfy_env, small_sd15_model, small_vae, pair):
    """Step 1 with reference_every 2 is exactly step 1 with reference_every 1 given step 0's K/V: nothing else
    (the target's own attention, the masks, the re-noising) depends on which K/V are reused."""
    model = small_sd15_model()
    g = Graph()
    g.capture(_mea(g, g.obj(model, "MODEL"), small_vae, pair, reference_every=2)[0], "every2")
    g.capture(_mea(g, g.obj(model, "MODEL"), small_vae, pair, reference_every=1)[0], "every1")
    res = run_prompt(g)
    two, one = _patch_of(res["every2"]), _patch_of(res["every1"])
    schedule = torch.tensor([2.5, 1.5, 0.5, 0.0])
    gen = torch.Generator().manual_seed(8)
    x0, x1 = (torch.randn(2, 4, 8, 8, generator=gen) for _ in range(2))
    ctx = torch.cat([cm.conditioning(2)[0][0], cm.conditioning(1)[0][0]])

    runs = {"every2": two.new_run(), "every1": one.new_run()}

    def step(name, x, i):
        return _direct_call(res[name], x, schedule[i : i + 1], ctx, [1, 0], sample_sigmas=schedule, run=runs[name])

    with torch.inference_mode():
        for name in ("every2", "every1"):
            step(name, x0, 0)
        state1 = runs["every1"].worker(x0.device)
        store0 = state1.store
        reused = step("every2", x1, 1)
        assert runs["every2"].stats["reference_passes"] == 1  # step 1 ran no reference (and no inline row)
        fresh = step("every1", x1, 1)
        assert runs["every1"].stats["reference_passes"] == 2
        state1.keep(store0, float(schedule[1]), 1)  # step 0's K/V, filed under step 1's sigma
        forced = step("every1", x1, 1)
        assert runs["every1"].stats["reference_passes"] == 3  # the keep above; no reference pass ran
    assert torch.equal(reused, forced)
    assert (reused[1] - fresh[1]).abs().max() > 1e-5  # the reference's sigma matters: it was really reused
    assert torch.equal(reused[0], fresh[0])  # the negative row never reads the reference


# ------------------------------------------------------------------------------------------------
# reference background
# ------------------------------------------------------------------------------------------------


def test_neutralised_background_makes_reference_outside_garment_irrelevant(comfy_env, small_sd15_model, small_vae,
                                                                           pair):
    model = small_sd15_model()
    ref2 = pair["reference"].clone()
    outside = pair["garment_mask"][0] < 0.5
    ref2[0][outside] = torch.tensor([0.9, 0.1, 0.2])  # repaint the whole background
    g = Graph()
    m = g.obj(model, "MODEL")
    for bg in ("neutralised", "kept"):
        for name, ref in (("a", pair["reference"]), ("b", ref2)):
            g.capture(_sampler(g, _mea(g, m, small_vae, pair, background=bg, reference=ref)[0])[0], f"{bg}_{name}")
    res = run_prompt(g)
    assert torch.equal(_latent(res, "neutralised_a"), _latent(res, "neutralised_b"))
    assert not torch.equal(_latent(res, "kept_a"), _latent(res, "kept_b"))  # the test can fail


# ------------------------------------------------------------------------------------------------
# flow view and recording switch
# ------------------------------------------------------------------------------------------------


def test_flow_view_outputs_and_recording_only_when_connected(comfy_env, small_sd15_model, small_vae, pair):
    from max4zero.registration.matches import Matches

    model = small_sd15_model()
    g = Graph()
    m = g.obj(model, "MODEL")
    mea = _mea(g, m, small_vae, pair, start=0.5)
    samp = _sampler(g, mea[0])
    pts = torch.tensor([[16.0, 16.0], [48.0, 16.0], [16.0, 48.0], [48.0, 48.0]])
    matches = Matches(pts, pts + 2.0, torch.ones(4), (SIZE, SIZE), (SIZE, SIZE))
    view = g.node(FLOW, trace=mea[1], reference=g.obj(pair["reference"], "IMAGE"), samples=samp[0],
                  layers="all MEA layers", step_start=0.0, step_end=1.0, tau=2.0, mode="displacement",
                  matches=g.obj(matches, "MAX4ZERO_MATCHES"), mls_kind="affine", mls_alpha=0.1, epe_scale_px=8.0)
    for i, name in enumerate(("flow", "warped", "reliance", "sharpness", "disagreement")):
        g.capture(view[i], name)
    # the same MEA settings without a flow view: nothing recorded
    quiet = _mea(g, m, small_vae, pair, start=0.5)
    g.capture(_sampler(g, quiet[0])[0], "quiet")
    res = run_prompt(g)
    assert res["flow"].shape == (1, SIZE, SIZE, 3) and res["warped"].shape == (1, SIZE, SIZE, 3)
    for name in ("reliance", "sharpness", "disagreement"):
        assert res[name].shape == (1, SIZE, SIZE), name
        assert torch.isfinite(res[name]).all() and res[name].min() >= 0 and res[name].max() <= 1, name
    assert res["reliance"].max() > 0 and res["disagreement"].max() > 0
    assert res["flow"].max() > 0 and 0 <= res["flow"].min()
    trace = res.output(mea.id, 1)
    assert trace.enabled and trace.taus == (2.0,)  # τ read from the connected view
    assert len(cm.mea_run(mea.id, res.output(samp.id, 0)["samples"]).records[2.0]) > 0
    quiet_trace = res.output(quiet.id, 1)
    quiet_run = cm.mea_run(quiet.id, _latent(res, "quiet"))
    assert not quiet_trace.enabled and quiet_run.records == {}
    assert quiet_run.stats["mea_calls"] > 0
    # recording does not change the sampled latent
    assert torch.equal(_latent(res, "quiet"), res.output(samp.id, 0)["samples"])
    assert FLOW in res.ui or view.id in res.ui  # the preview was saved


def test_flow_view_explains_a_trace_that_did_not_record(comfy_env, small_sd15_model, small_vae, pair):
    trace = cm.pack_module("nodes.trace").MeaTrace(node_key="never-sampled", node_id="99")
    g = Graph()
    view = g.node(FLOW, trace=g.obj(trace, "MAX4ZERO_TRACE"),
                  reference=g.obj(pair["reference"], "IMAGE"),
                  samples=g.obj({"samples": torch.zeros(1, 4, 8, 8)}, "LATENT"), layers="all MEA layers",
                  step_start=0.0, step_end=1.0, tau=1.0, mode="absolute")
    g.capture(view[0], "flow")
    with pytest.raises(PromptFailed, match="no sampling run with a model from MEA node #99"):
        run_prompt(g)


# ------------------------------------------------------------------------------------------------
# errors
# ------------------------------------------------------------------------------------------------


def test_non_unet_model_is_refused_with_a_clear_message(comfy_env, small_vae, pair):
    g = Graph()
    node = _mea(g, g.obj(cm.non_unet_model(), "MODEL"), small_vae, pair)
    g.capture(node[0], "model")
    with pytest.raises(PromptFailed) as exc:
        run_prompt(g)
    msg = exc.value.message
    assert "Masked Extended Attention" in msg and "not a Stable Diffusion UNet" in msg and "SD1.5" in msg


def test_bad_inputs_name_the_problem(comfy_env, small_sd15_model, small_vae, pair):
    model = small_sd15_model()
    cases = [
        (dict(start=0.9, end=0.5), "start"),
        (dict(garment_mask=torch.ones(1, SIZE // 2, SIZE // 2)), "garment_mask"),
        (dict(reference=torch.cat([pair["reference"]] * 2)), "one reference image"),
        (dict(guidance="nonsense"), "guidance"),
    ]
    for over, needle in cases:
        g = Graph()
        node = _mea(g, g.obj(model, "MODEL"), small_vae, pair, **over)
        g.capture(node[0], "model")
        with pytest.raises(PromptFailed) as exc:
            run_prompt(g, validate=False)
        assert needle in exc.value.message, (over, exc.value.message)
    # a target mask batch that fits no latent batch is refused before the first step, naming the MEA node
    g = Graph()
    node = _mea(g, g.obj(model, "MODEL"), small_vae, pair, target_mask=torch.cat([pair["target_mask"]] * 3))
    g.capture(_sampler(g, node[0], batch=2)[0], "x")
    with pytest.raises(PromptFailed, match="one per latent"):
        run_prompt(g)
    copy.deepcopy(model.model_options)  # still a plain, copyable options dict


# ------------------------------------------------------------------------------------------------
# SDXL layout: attention depth > 1, no attention at the latent grid, pooled text in ``y``
# ------------------------------------------------------------------------------------------------


def _small_sdxl():
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    unet = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 64, "num_res_blocks": [1, 1, 1], "transformer_depth": [0, 0, 1, 1, 2, 2],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 1, 1, 2, 2],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    cfg = comfy.supported_models.SDXL(unet)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "model.diffusion_model.", device=mm.unet_offload_device())
    cm.init_random(model, 0)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def test_sdxl_layout_selects_layers_by_token_grid(comfy_env, small_vae):
    model = _small_sdxl()
    pair = cm.synthetic_pair(128)  # latent 16x16: decoder attention at 8x8 (depth 1) and 4x4 (depth 2)
    gen = torch.Generator().manual_seed(0)

    def sdxl_cond():
        return [[torch.randn(1, 77, 2048, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen)}]]

    pos, neg = sdxl_cond(), sdxl_cond()
    g = Graph()
    m = g.obj(model, "MODEL")
    latent = g.obj({"samples": torch.zeros(1, 4, 16, 16)}, "LATENT")
    runs = {}
    for name, over in (("fused", {}), ("paper", {"guidance": "paper"}),
                       ("empty", {"garment_mask": torch.zeros_like(pair["garment_mask"])})):
        node = _mea(g, m, small_vae, pair, positive=g.obj(sdxl_cond(), "CONDITIONING"), **over)
        samp = _sampler(g, node[0], latent, positive=g.obj(pos, "CONDITIONING"), negative=g.obj(neg, "CONDITIONING"))
        g.capture(samp[0], name)
        runs[name] = (node, samp)
    view = g.node(FLOW, trace=runs["fused"][0][1], reference=g.obj(pair["reference"], "IMAGE"),
                  samples=runs["fused"][1][0], layers="all MEA layers", step_start=0.0, step_end=1.0, tau=1.0,
                  mode="absolute")
    g.capture(view[0], "flow")
    stock = _sampler(g, m, latent, positive=g.obj(pos, "CONDITIONING"), negative=g.obj(neg, "CONDITIONING"))
    g.capture(stock[0], "stock")
    res = run_prompt(g)
    assert torch.equal(_latent(res, "empty"), _latent(res, "stock"))
    for name in ("fused", "paper"):
        assert torch.isfinite(_latent(res, name)).all() and not torch.equal(_latent(res, name), _latent(res, "stock"))
    records = cm.mea_run(runs["fused"][0].id, _latent(res, "fused")).records[1.0]
    assert records and {r.query_hw for r in records} == {(8, 8)}  # 1/16 of the image only: no 1/8 attention
    assert {r.layer for r in records} == {("output", 2, 0), ("output", 3, 0)}
    assert res["flow"].shape == (1, 128, 128, 3)


# ------------------------------------------------------------------------------------------------
# the patch is frozen settings: nothing in it is written by a run
# ------------------------------------------------------------------------------------------------


def _walk(obj, seen=None):
    """Every attribute reachable from a patch (its settings, trace, …), by value: tensors as values, callables and
    other objects by identity, recursing into plain objects, dataclasses, dicts, lists and tuples."""
    import dataclasses

    seen = set() if seen is None else seen
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype, obj.detach().cpu().clone())
    if isinstance(obj, (str, int, float, bool, type(None), torch.dtype, torch.device)):
        return obj
    if isinstance(obj, (list, tuple, frozenset, set)):
        return (type(obj).__name__, [_walk(x, seen) for x in (sorted(obj, key=repr) if isinstance(obj, (set, frozenset)) else obj)])
    if isinstance(obj, dict):
        return {repr(k): _walk(v, seen) for k, v in obj.items()}
    if id(obj) in seen or callable(obj) and not hasattr(obj, "__dict__"):
        return ("ref", id(obj))
    seen.add(id(obj))
    if type(obj).__name__ == "RunRegistry":  # process-wide, written by every run on purpose: identity only
        return ("registry", id(obj))
    fields = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else getattr(obj, "__dict__", None)
    if fields is None:
        return ("ref", id(obj))
    return (type(obj).__name__, {k: _walk(v, seen) for k, v in fields.items()})


def _equal(a, b):
    if isinstance(a, tuple) and a and a[0] == "tensor":
        return isinstance(b, tuple) and b[:3] == a[:3] and torch.equal(a[3], b[3])
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.parametrize("guidance", ["fused", "paper"])
def test_nothing_in_a_patch_is_written_by_a_run(comfy_env, small_sd15_model, small_vae, pair, guidance):
    model = small_sd15_model()
    g = Graph()
    mea = _mea(g, g.obj(model, "MODEL"), small_vae, pair, guidance=guidance)
    g.capture(mea[0], "patched")
    patched = run_prompt(g)["patched"]
    patch = _patch_of(patched)
    before = _walk(patch)
    g2 = Graph()
    m = g2.obj(patched, "MODEL")
    samp = _sampler(g2, m)
    g2.capture(samp[0], "x")
    g2.capture(_sampler(g2, m, cfg=1.0, batch=2)[0], "y")  # another run of the same patch
    res = run_prompt(g2)
    assert cm.mea_run(mea.id, res["x"]["samples"]).stats["mea_calls"] > 0  # the runs did use the patch
    after = _walk(patch)
    assert _equal(before, after)
    with pytest.raises(AttributeError, match="frozen"):
        patch.settings = None
    with pytest.raises(AttributeError, match="frozen"):
        patch.trace.taus = (2.0,)
