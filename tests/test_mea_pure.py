"""Pure logic of the MEA model patch and the flow view (no ComfyUI): layer selection by token grid,
cond/uncond bookkeeping, guidance formula, replace chaining, trace handle, flow-view rendering."""

from __future__ import annotations

import math

import pytest
import torch

from max4zero.attention.flow import AttentionCapture, FlowRecord, reference_grid
from max4zero.attention.masked_extended import masked_extended_attention, plain_attention
from max4zero.attention import policy
from max4zero.nodes import mea_calls as calls
from max4zero.nodes import mea_patch as mp
from max4zero.nodes.mea_replace import Attn1Replace, CallRows, RefEntry
from max4zero.tensors import images
from max4zero.registration.matches import Matches
from max4zero.attention.flow_view import render_flow_view, select_for_view
from max4zero.attention.flow_view import mls_flow
from max4zero.attention import reference as refpass
from max4zero.attention.run import MeaRun, MeaSettings, WorkerState
from max4zero.nodes.trace import MeaTrace


# ---------------------------------------------------------------------------------------------
# layer selection


@pytest.mark.parametrize(
    "latent, layer, level",
    [((64, 64), (64, 64), 0), ((64, 64), (32, 32), 1), ((64, 64), (16, 16), 2), ((128, 128), (64, 64), 1),
     ((13, 20), (7, 10), 1), ((13, 20), (4, 5), 2), ((9, 9), (5, 5), 1), ((96, 64), (48, 32), 1)],
)
def test_grid_level_counts_halvings_with_ceil(latent, layer, level):
    assert policy.grid_level(latent, layer) == level


def test_grid_level_rejects_nonsense():
    with pytest.raises(ValueError, match="positive"):
        policy.grid_level((0, 8), (4, 4))


def test_paper_selection_is_decoder_at_latent_and_half():
    sel = policy.LAYER_CHOICES[policy.DEFAULT_LAYERS]
    assert sel.selects("output", 0) and sel.selects("output", 1)
    assert not sel.selects("output", 2) and not sel.selects("input", 0) and not sel.selects("middle", 1)
    # SD1.5 at 512: output blocks 6-8 are 32x32 and 9-11 are 64x64 on a 64x64 latent; 3-5 are 16x16
    grids = {3: 16, 4: 16, 5: 16, 6: 32, 7: 32, 8: 32, 9: 64, 10: 64, 11: 64}
    chosen = [i for i, g in grids.items() if sel.selects("output", policy.grid_level((64, 64), (g, g)))]
    assert chosen == [6, 7, 8, 9, 10, 11]
    # SDXL 1024: latent 128, decoder attention at 32 and 64 only -> only the 64 grid (1/16 of the image)
    assert [g for g in (32, 64) if sel.selects("output", policy.grid_level((128, 128), (g, g)))] == [64]


class _ST(torch.nn.Module):
    def __init__(self, depth):
        super().__init__()
        self.transformer_blocks = torch.nn.ModuleList(torch.nn.Identity() for _ in range(depth))


class _FakeUNet(torch.nn.Module):
    """Block layout of a UNet: ResBlock(+SpatialTransformer) sequences."""

    def __init__(self):
        super().__init__()
        self.input_blocks = torch.nn.ModuleList(
            [torch.nn.Sequential(torch.nn.Identity()), torch.nn.Sequential(torch.nn.Identity(), _ST(1)),
             torch.nn.Sequential(torch.nn.Identity(), _ST(2))]
        )
        self.middle_block = torch.nn.Sequential(torch.nn.Identity(), _ST(3), torch.nn.Identity())
        self.output_blocks = torch.nn.ModuleList(
            [torch.nn.Sequential(torch.nn.Identity(), _ST(2)), torch.nn.Sequential(torch.nn.Identity()),
             torch.nn.Sequential(torch.nn.Identity(), _ST(1), torch.nn.Identity())]
        )


def test_attn1_slots_walk_blocks_and_depths():
    u = _FakeUNet()
    assert calls.attn1_slots(u, ["output"]) == [("output", 0, 0), ("output", 0, 1), ("output", 2, 0)]
    assert calls.attn1_slots(u, ["input", "middle"]) == [
        ("input", 1, 0), ("input", 2, 0), ("input", 2, 1), ("middle", 0, 0), ("middle", 0, 1), ("middle", 0, 2)]
    assert calls.is_unet(u) and not calls.is_unet(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------------------------
# sampling bookkeeping


def test_window_uses_decreasing_sigmas():
    s0, s1 = 2.0, 0.0  # start 0.7 -> sigma 2.0, end 1.0 -> sigma 0
    assert policy.in_window(1.0, s0, s1) and policy.in_window(2.0, s0, s1) and policy.in_window(0.0, s0, s1)
    assert not policy.in_window(2.1, s0, s1)
    assert policy.in_window(2.0 * (1 + 1e-7), s0, s1)  # float32 rounding of the same schedule value
    assert not policy.in_window(0.5, 0.0, 0.0)  # start = end = 1.0: nothing


@pytest.mark.parametrize(
    "cou, n, expect",
    [([0, 1], 4, [0, 1]), ([1, 0], 4, [2, 3]), ([0], 3, [0, 1, 2]), ([1], 2, []), ([1, 0, 0], 3, [1, 2]), ([], 2, [0, 1])],
)
def test_mea_rows_follow_cond_or_uncond(cou, n, expect):
    assert policy.mea_rows(cou, n) == expect


def test_mea_rows_all_rows_and_bad_layout():
    assert policy.mea_rows([1, 0], 4, all_rows=True) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="does not split"):
        policy.mea_rows([0, 1], 3)


def test_row_mask_index():
    assert policy.row_mask_index([2, 3], 4, 2, 1) == [0, 0]
    assert policy.row_mask_index([2, 3], 4, 2, 2) == [0, 1]
    assert policy.row_mask_index([0, 1, 2], 3, 1, 3) == [0, 1, 2]
    with pytest.raises(ValueError, match="one mask per latent"):
        policy.row_mask_index([0, 1], 4, 2, 3)


def test_paper_guidance_same_in_eps_and_x0_space():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    sigma = 3.7
    eu, ec, em = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    m = (torch.rand(1, 1, 8, 8, generator=g) > 0.5).float()
    s_txt, s_mea = 7.5, 15.0
    eps = eu + s_txt * (ec - eu) + s_mea * m * (em - eu)  # docs/method.md §3b in noise space
    x0 = lambda e: x - sigma * e  # noqa: E731  (EPS: denoised = x - sigma * eps)
    cfg_x0 = x0(eu) + s_txt * (x0(ec) - x0(eu))  # what ComfyUI's CFG hands to post-CFG functions
    out = policy.paper_guidance(cfg_x0, x0(eu), x0(em), m, s_mea)
    assert torch.allclose(out, x0(eps), atol=1e-4)
    assert torch.equal(policy.paper_guidance(cfg_x0, x0(eu), x0(em), m, 0.0), cfg_x0)
    outside = m == 0
    assert torch.equal(out.expand_as(x)[outside.expand_as(x)], cfg_x0[outside.expand_as(x)])


def test_bind_apply_model_args_positional_and_keyword():
    x, t = torch.zeros(1), torch.ones(1)
    named, extra = calls.bind_apply_model_args((x, t, None, "ctx", None, {"a": 1}), {"y": 5})
    assert named["c_crossattn"] == "ctx" and named["transformer_options"] == {"a": 1} and extra == {"y": 5}
    named, extra = calls.bind_apply_model_args((x, t), {"c_crossattn": "c", "transformer_options": {"b": 2}, "y": 1})
    assert named["c_crossattn"] == "c" and named["c_concat"] is None and named["transformer_options"] == {"b": 2}
    assert extra == {"y": 1}
    named, _ = calls.bind_apply_model_args((x, t), {})
    assert named["transformer_options"] == {}


def test_slice_row():
    a = torch.arange(6).view(3, 2)
    assert torch.equal(refpass.slice_row(a, 3, 1), a[1:2])
    assert refpass.slice_row(7, 3, 1) == 7
    b = torch.zeros(2, 2)  # not per-row
    assert refpass.slice_row(b, 3, 1) is b
    out = refpass.slice_row([a, b], 3, 2)
    assert torch.equal(out[0], a[2:3]) and out[1] is b


def test_reference_reconstructs_itself_in_each_layout():
    lat = torch.randn(1, 4, 5, 6)
    c = refpass.reconstruct_itself(("mask", "masked_image"), lat)  # SD inpainting: [mask ; masked image]
    assert c.shape == (1, 5, 5, 6) and torch.equal(c[:, :1], torch.zeros(1, 1, 5, 6)) and torch.equal(c[:, 1:], lat)
    c = refpass.reconstruct_itself(("concat_image", "mask_inverted"), lat)
    assert torch.equal(c[:, 4:], torch.ones(1, 1, 5, 6))
    fill = refpass.reconstruct_itself(("masked_image", "mask:64"), torch.randn(1, 16, 2, 2))  # FLUX.1 Fill
    assert fill.shape == (1, 80, 2, 2) and fill[:, 16:].eq(0).all()
    with pytest.raises(ValueError, match="cannot build"):
        refpass.reconstruct_itself(("depth",), lat)


def test_reference_row_is_one_noised_positive_row_without_the_target_s_inputs():
    lat, noise = torch.zeros(1, 4, 2, 2), torch.ones(1, 4, 2, 2)
    scale = lambda s, n, x: x + s.view(-1, 1, 1, 1) * n  # noqa: E731
    ctx = torch.arange(3.0).view(3, 1, 1).expand(3, 2, 8)
    extra = {"y": torch.arange(3.0).view(3, 1), "control": "hint", "ref_latents": [lat], "attention_mask": 1,
             "guidance": torch.tensor([3.5])}
    row = refpass.reference_row(t=torch.tensor([3.0, 2.0, 1.0]), row=1, n_rows=3, c_crossattn=ctx, extra=extra,
                                latent=lat, noise=noise, ref_context=None, noise_scaling=scale, concat_parts=None)
    assert row.t.tolist() == [2.0] and row.x.eq(2.0).all() and row.c_concat is None
    assert row.c_crossattn.shape == (1, 2, 8) and row.c_crossattn.eq(1.0).all()  # the positive row's text
    assert set(row.extra) == {"y", "guidance"} and row.extra["y"].tolist() == [[1.0]]
    mine = torch.full((1, 5, 8), 7.0)
    row = refpass.reference_row(t=torch.tensor(1.5), row=0, n_rows=3, c_crossattn=ctx, extra={}, latent=lat,
                                noise=noise, ref_context=mine, noise_scaling=scale, concat_parts=("mask", "masked_image"))
    assert row.c_crossattn.eq(7.0).all() and row.c_concat.shape == (1, 5, 2, 2) and row.t.tolist() == [1.5]
    with pytest.raises(ValueError, match="16 wide"):
        refpass.reference_text(torch.zeros(1, 5, 16), ctx[:1])


def test_neutralise_background_depends_only_on_garment_pixels():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(1, 8, 8, 3, generator=g)
    mask = torch.zeros(1, 8, 8)
    mask[:, 2:6, 3:7] = 1
    a = images.neutralise_background(img, mask)
    other = img.clone()
    other[:, 0] = 0.123  # background row changes
    assert torch.equal(images.neutralise_background(other, mask), a)
    assert torch.equal(a[0, 0, 0], torch.full((3,), 0.5))
    assert torch.equal(a[:, 2:6, 3:7], img[:, 2:6, 3:7])


def test_center_crop_multiple_matches_vae_encode():
    x = torch.arange(1 * 19 * 21 * 3).view(1, 19, 21, 3)
    y = images.center_crop_multiple(x, 8, (1, 2))
    assert y.shape == (1, 16, 16, 3)
    assert torch.equal(y, x[:, 1:17, 2:18])  # offset (n % 8) // 2, like comfy's vae_encode_crop_pixels


def test_trace_consumers_finds_links_to_the_trace_output():
    prompt = {
        "5": {"class_type": "MaX4ZeroMaskedExtendedAttention", "inputs": {"model": ["1", 0]}},
        "6": {"class_type": "KSamplerAdvanced", "inputs": {"model": ["5", 0]}},
        "7": {"class_type": "MaX4ZeroFlowView", "inputs": {"trace": ["5", 1], "tau": 2.0}},
        "8": {"class_type": "Other", "inputs": {"x": [5, 1]}},
    }
    found = calls.trace_consumers(prompt, "5", 1)
    assert [c for c, _ in found] == ["MaX4ZeroFlowView", "Other"]
    assert found[0][1]["tau"] == 2.0
    assert calls.trace_consumers(prompt, "6", 1) == []
    assert calls.trace_consumers(None, "5", 1) == [] and calls.trace_consumers(prompt, None, 1) == []


def test_nearest_step():
    s = torch.tensor([14.6, 5.0, 2.0, 0.5, 0.0])
    assert policy.nearest_step(s, 2.0) == 2 and policy.nearest_step(s, 0.6) == 3 and policy.nearest_step(None, 1.0) is None


# ---------------------------------------------------------------------------------------------
# replace chaining and use-mode semantics (no ComfyUI: every slot has an existing replace)


def _settings(**kw):
    args = dict(mode="fused", s_mea=15.0, contrast=1.0, start=0.0, end=1.0, reference_every=1,
                ref_latent=torch.zeros(1, 4, 4, 4), ref_noise=torch.zeros(1, 4, 4, 4), ref_context=None,
                garment_mask=torch.ones(1, 16, 16, dtype=torch.bool), target_mask=torch.ones(1, 16, 16))
    args.update(kw)
    return MeaSettings(**args)


def _patch(**kw):
    return mp.MeaPatch(settings=_settings(**kw), layers=policy.LAYER_CHOICES[policy.DEFAULT_LAYERS],
                       attn1_keys=[("output", 9, 0), ("output", 6, 0)])


def _state(patch) -> WorkerState:
    return MeaRun(patch.settings).worker("cpu")


def test_with_hooks_wraps_existing_slots_and_never_mutates():
    p = _patch()
    theirs3 = lambda q, k, v, e: q  # noqa: E731
    theirs2 = lambda q, k, v, e: k  # noqa: E731
    to = {"patches_replace": {"attn1": {("output", 9, 0): theirs3, ("output", 6): theirs2}, "attn2": {"x": 1}},
          "other": 3}
    snapshot = {"patches_replace": {"attn1": dict(to["patches_replace"]["attn1"]), "attn2": {"x": 1}}, "other": 3}
    new = p.with_hooks(to, _state(p), "record", {}, None, {})
    attn1 = new["patches_replace"]["attn1"]
    assert attn1[("output", 9, 0)].prev is theirs3
    assert attn1[("output", 6, 0)].prev is theirs2  # the 2-tuple slot our 3-tuple key would shadow is wrapped
    assert to == snapshot  # the caller's dicts are untouched
    assert set(attn1) == {("output", 9, 0), ("output", 6), ("output", 6, 0)}
    assert new["patches_replace"]["attn2"] == {"x": 1} and new["other"] == 3


def test_the_patch_is_frozen_settings():
    p = _patch()
    with pytest.raises(AttributeError, match="frozen"):
        p.warn = print
    with pytest.raises(AttributeError, match="frozen"):
        p.anything = 1
    import copy

    assert copy.deepcopy(p) is p  # nothing in it is written, so clones may share it
    with pytest.raises(Exception):
        p.settings.s_mea = 3.0  # a frozen dataclass


def _extra(latent_hw, hw, heads, cou, block=("output", 9)):
    return {"activations_shape": [1, 8, hw[0], hw[1]], "original_shape": [1, 4, *latent_hw], "n_heads": heads,
            "cond_or_uncond": cou, "block": block}


def test_use_replace_applies_mea_to_positive_region_queries_only():
    g = torch.Generator().manual_seed(0)
    heads, d, hw = 2, 4, (4, 4)
    T = hw[0] * hw[1]
    tm = torch.zeros(1, 16, 16)
    tm[:, :8] = 1  # top half of the target is the try-on region
    p = _patch(target_mask=tm)
    k_ref = torch.randn(1, T, heads * d, generator=g)
    v_ref = torch.randn(1, T, heads * d, generator=g)
    store = {("output", 9, 0): RefEntry(k_ref, v_ref, hw)}
    calls = []

    def theirs(q, k, v, e):
        calls.append(q.shape[0])
        return plain_attention(q, k, v, heads) * 0.5  # another pack's replace with a visible effect

    ctx = CallRows(rows=[2, 3], mask_index=[0, 0], n_rows=4, sigma=1.0, step=0)  # cou [1, 0]
    fn = Attn1Replace(p, _state(p), ("output", 9, 0), theirs, "use", ctx, store)
    q, k, v = (torch.randn(4, T, heads * d, generator=g) for _ in range(3))
    out = fn(q, k, v, _extra((4, 4), hw, heads, [1, 0]))
    base = plain_attention(q, k, v, heads) * 0.5
    qm = torch.zeros(T, dtype=torch.bool)
    qm[: T // 2] = True
    mea = masked_extended_attention(q[2:], k[2:], v[2:], k_ref, v_ref, torch.ones(1, T, dtype=torch.bool),
                                    qm[None], heads)
    assert calls == [4]  # the existing replace ran once, on the whole batch
    assert torch.equal(out[:2], base[:2])  # negative rows: theirs
    assert torch.equal(out[2:, ~qm], base[2:, ~qm])  # outside the region: theirs
    assert torch.allclose(out[2:, qm], mea[:, qm])  # region queries of positive rows: MEA
    assert not torch.allclose(out[2:, qm], base[2:, qm], atol=1e-3)
    # a layer at an unselected grid (latent/4) is left to the existing replace
    store2 = {("output", 9, 0): RefEntry(k_ref[:, :4], v_ref[:, :4], (2, 2))}
    fn2 = Attn1Replace(p, _state(p), ("output", 9, 0), theirs, "use", ctx, store2)
    q2, k2, v2 = q[:, :4], k[:, :4], v[:, :4]
    assert torch.equal(fn2(q2, k2, v2, _extra((8, 8), (2, 2), heads, [1, 0])), plain_attention(q2, k2, v2, heads) * 0.5)


def test_record_replace_keeps_selected_layers_and_returns_theirs():
    p = _patch()
    store = {}
    theirs = lambda q, k, v, e: q * 2  # noqa: E731
    fn = Attn1Replace(p, _state(p), ("output", 9, 0), theirs, "record", store=store)
    q = torch.randn(1, 16, 8)
    k, v = q + 1, q + 2
    assert torch.equal(fn(q, k, v, _extra((4, 4), (4, 4), 2, [0])), q * 2)
    assert store[("output", 9, 0)].hw == (4, 4) and torch.equal(store[("output", 9, 0)].k, k)
    store.clear()
    fn(q[:, :1], k[:, :1], v[:, :1], _extra((4, 4), (1, 1), 2, [0]))  # latent/4: not selected
    assert store == {}


def test_patch_is_inactive_when_it_cannot_change_anything():
    assert _settings().active
    assert not _settings(garment_mask=torch.zeros(1, 16, 16, dtype=torch.bool)).active
    assert not _settings(target_mask=torch.zeros(1, 16, 16)).active
    assert not _settings(mode="paper", s_mea=0.0).active
    assert _settings(mode="paper", s_mea=1.0).active
    with pytest.raises(ValueError, match="start"):
        _settings(start=0.9, end=0.5)
    with pytest.raises(ValueError, match="contrast"):
        _settings(contrast=float("nan"))


def test_a_run_serves_its_reference_by_the_patch_s_reference_every():
    """WorkerState.stored: the recorded K/V at the same sigma (every 1 = the paper), or within reference_every steps."""
    store = {("output", 9, 0): "kv"}
    for every, reused_steps in ((1, []), (2, [4]), (3, [4, 5])):
        run = MeaRun(_settings(reference_every=every)).worker("cpu")
        assert run.stored(0.5, 3) is None  # nothing recorded yet
        run.keep(store, 0.5, 3)
        assert run.stored(0.5, 3) is store and run.stored(0.5, None) is store  # the same sigma, always
        assert [s for s in range(2, 8) if s != 3 and run.stored(3.0 / (s + 3), s) is store] == reused_steps, every
        assert run.stored(0.4, None) is None  # no schedule: only the exact sigma
    run = MeaRun(_settings(reference_every=5)).worker("cpu")
    run.keep({}, 0.5, 3)
    assert run.stored(0.5, 3) is None  # an empty recording (no layer reached) is never served


@pytest.mark.parametrize("bad", [0, 1.5, None])
def test_the_patch_refuses_a_bad_reference_every(bad):
    with pytest.raises(ValueError, match="reference_every"):
        _settings(reference_every=bad)
    assert _settings().reference_every == 1  # the paper's, by default


def test_latent_mask_for_paper_guidance():
    tm = torch.zeros(2, 16, 16)
    tm[0, :8] = 1
    state = MeaRun(_settings(target_mask=tm)).worker("cpu")
    m = state.latent_mask(torch.zeros(2, 4, 4, 4))
    assert m.shape == (2, 1, 4, 4) and m[0, 0, :2].eq(1).all() and m[0, 0, 2:].eq(0).all() and m[1].eq(0).all()
    with pytest.raises(ValueError, match="one mask per latent"):
        state.latent_mask(torch.zeros(3, 4, 4, 4))


def test_each_thread_writes_only_its_own_worker_state():
    import threading

    run = MeaRun(_settings(), taus=(1.0, 2.0))
    here = run.worker("cpu")
    assert run.worker("cpu") is here and run.worker("cpu:1") is not here
    seen, errors = [], []

    def other_thread():
        mine = run.worker("cpu")  # same device, another thread: its own state
        seen.append(mine)
        mine.count("calls")
        try:
            here.count("calls")  # writing the main thread's state from here is refused
        except RuntimeError as e:
            errors.append(str(e))

    t = threading.Thread(target=other_thread)
    t.start()
    t.join()
    assert seen[0] is not here and errors and "another thread" in errors[0]
    here.count("calls", 2)
    assert run.stats["calls"] == 3  # merged over the workers
    assert set(here.captures) == {1.0, 2.0} and run.records() == {1.0: (), 2.0: ()}


# ---------------------------------------------------------------------------------------------
# trace handle and flow view


def test_trace_is_frozen_and_records_what_views_and_requests_ask_for():
    from max4zero.nodes.trace import RunRegistry

    reg = RunRegistry()
    t = MeaTrace(node_key="7", node_id="7", taus=[2.0, 2.0, 1.0], registry=reg)
    assert t.enabled and t.taus == (1.0, 2.0) and t.recording_taus() == (1.0, 2.0)
    quiet = MeaTrace(node_key="8", registry=reg)
    assert not quiet.enabled and quiet.recording_taus() == ()
    reg.request("8", 3.0)
    assert quiet.recording_taus() == (3.0,)  # a view's request: the next run of node 8 records
    with pytest.raises(AttributeError, match="frozen"):
        t.taus = (5.0,)
    with pytest.raises(ValueError, match="tau"):
        MeaTrace(node_key="9", taus=[0.0])
    import copy

    assert copy.deepcopy(t) is t


def _record(flow_hw, sigma, level_hw, mass=1.0, flow=None, batch=1):
    h, w = level_hw
    f = reference_grid(flow_hw).view(*flow_hw, 2) if flow is None else flow
    f = torch.nn.functional.interpolate(f.permute(2, 0, 1)[None], size=(h, w), mode="bilinear",
                                        align_corners=True)[0].permute(1, 2, 0)
    return FlowRecord(flow=f.expand(batch, -1, -1, -1).clone(), mass=torch.full((batch, h, w), mass),
                      entropy=torch.full((batch, h, w), math.log(4.0)), peak=None, query_mask=None,
                      query_hw=(h, w), ref_hw=flow_hw, layer=("output", 9, 0), step=None, sigma=sigma)


def test_select_for_view_by_grid_and_step_fraction():
    recs = [_record((4, 4), s, hw) for s in (3.0, 2.0, 1.0) for hw in ((8, 8), (4, 4))]
    assert len(select_for_view(recs, (8, 8))) == 6
    assert {r.query_hw for r in select_for_view(recs, (8, 8), frozenset({0}))} == {(8, 8)}
    assert {r.sigma for r in select_for_view(recs, (8, 8), None, 0.5, 1.0)} == {2.0, 1.0}
    assert {r.sigma for r in select_for_view(recs, (8, 8), None, 0.3, 0.4)} == {2.0}  # nearest to the centre
    with pytest.raises(ValueError):
        select_for_view(recs, (8, 8), None, 0.8, 0.2)


def test_identity_flow_view_returns_the_reference_and_right_sizes():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(1, 3, 32, 32, generator=g)
    recs = [_record((4, 4), 1.0, (8, 8), mass=0.4), _record((4, 4), 1.0, (4, 4), mass=0.4)]
    view = render_flow_view(recs, ref, (8, 8), (32, 32))
    assert view.flow_rgb.shape == (1, 32, 32, 3) and view.warped.shape == (1, 32, 32, 3)
    assert view.reliance.shape == (1, 32, 32) and view.sharpness.shape == (1, 32, 32) and view.epe is None
    assert torch.allclose(view.warped, ref.permute(0, 2, 3, 1), atol=1e-5)  # identity flow → the reference
    assert torch.allclose(view.reliance, torch.full((1, 32, 32), 0.4))
    assert torch.allclose(view.sharpness, torch.full((1, 32, 32), 0.25))  # exp(-log 4): spread over 4 tokens
    # against an identity MLS flow the end-point error is ~0; against a shifted one it is not
    ident = reference_grid((32, 32)).view(32, 32, 2)
    v2 = render_flow_view(recs, ref, (8, 8), (32, 32), mls_flow=ident, mode="displacement")
    assert v2.epe.shape == (1, 32, 32) and v2.epe.max() < 1e-3
    shifted = ident + torch.tensor([0.5, 0.0])
    v3 = render_flow_view(recs, ref, (8, 8), (32, 32), mls_flow=shifted)
    assert torch.allclose(v3.epe, torch.full((1, 32, 32), 0.5 * 31 / 2), atol=1e-3)  # 0.5 units = 7.75 ref px


def test_flow_view_blacks_out_queries_that_never_read_the_reference():
    ref = torch.rand(1, 3, 16, 16)
    rec = _record((4, 4), 1.0, (4, 4), mass=0.0)
    rec.mass[:, :2] = 0.5
    view = render_flow_view([rec], ref, (4, 4), (16, 16))
    assert view.flow_rgb[:, -1].eq(0).all() and view.warped[:, -1].eq(0).all()
    assert view.flow_rgb[:, 0].gt(0).any()
    with pytest.raises(ValueError, match="layers"):
        render_flow_view([rec], ref, (4, 4), (16, 16), levels=frozenset({1}))


def test_mls_flow_from_identity_matches_is_the_identity():
    pts = torch.tensor([[0.0, 0.0], [31.0, 0.0], [0.0, 31.0], [31.0, 31.0], [10.0, 20.0]])
    m = Matches(pts, pts.clone(), torch.ones(5), (32, 32), (32, 32))
    f = mls_flow(m.target_points, m.reference_points, (32, 32), (32, 32), stride=1)
    assert f.shape == (32, 32, 2)
    assert torch.allclose(f, reference_grid((32, 32)).view(32, 32, 2), atol=1e-4)
    # a reference twice as large: same normalised flow (points are rescaled first)
    m2 = Matches(pts * 2, pts.clone(), torch.ones(5), (64, 64), (32, 32)).rescaled((64, 64), (32, 32))
    f2 = mls_flow(m2.target_points, m2.reference_points, (64, 64), (32, 32), stride=1)
    assert torch.allclose(f2, reference_grid((32, 32)).view(32, 32, 2), atol=0.05)


# ---------------------------------------------------------------------------------------------
# reference as an extra row of the same call


def test_append_row_and_pad_control():
    a = torch.arange(6.0).view(3, 2)
    ref = torch.tensor([[9.0, 9.0]])
    assert torch.equal(refpass.append_row(a, ref, 3), torch.cat([a, ref]))
    assert refpass.append_row(5, 7, 3) == 5
    out = refpass.append_row([a, a], [ref, ref * 2], 3)
    assert torch.equal(out[1][-1], torch.tensor([18.0, 18.0]))
    ctrl = {"input": [torch.ones(2, 3, 4, 4), None], "middle": [torch.ones(2, 5, 2, 2)], "output": []}
    padded = calls.pad_control(ctrl, 2)
    assert padded["input"][0].shape == (3, 3, 4, 4) and padded["input"][0][2].eq(0).all()
    assert padded["input"][1] is None and padded["output"] == [] and padded["middle"][0][:2].eq(1).all()
    assert padded["input"] is not ctrl["input"] and len(ctrl["input"]) == 2  # ComfyUI pops from these lists
    assert calls.pad_control(None, 2) is None


def test_inline_reference_only_when_the_chunk_layout_survives():
    p = _patch(ref_latent=torch.zeros(1, 4, 8, 8), ref_context=torch.zeros(1, 77, 16))
    state = _state(p)

    def call(n, cou, to=None, **over):
        named = {"x": torch.zeros(n, 4, 8, 8), "t": torch.ones(n), "c_crossattn": torch.zeros(n, 77, 16),
                 "control": None, "c_concat": None, "transformer_options": to or {}}
        extra = over.pop("extra", {})
        named.update(over)
        return mp.MeaCall(named=named, extra=extra, state=state, cond_or_uncond=cou,
                          rows=CallRows(rows=[0], mask_index=[0], n_rows=n, sigma=1.0, step=None))

    assert p.can_inline(call(2, [1, 0]))  # batch 1 with CFG: one-row chunks
    assert p.can_inline(call(3, [0]))  # a single chunk (paper's extra pass) grows
    assert not p.can_inline(call(4, [1, 0]))  # two 2-row chunks: a 5th row would break the layout
    assert not p.can_inline(call(2, [1, 0], x=torch.zeros(2, 4, 6, 8)))  # reference latent of another size
    assert not p.can_inline(call(2, [1, 0], c_crossattn=torch.zeros(2, 154, 16)))  # text of another length
    assert not p.can_inline(call(2, [1, 0], control=object()))
    assert not p.can_inline(call(2, [1, 0], extra={"attention_mask": torch.ones(2, 77)}))  # the ref must drop it
    chained = {mp.RUN_KEY_PREFIX + "other": MeaRun(p.settings)}
    assert not p.can_inline(call(2, [1, 0], to=chained))  # another MEA node in the run: a separate pass


def test_use_replace_reads_the_reference_row_of_the_same_batch():
    g = torch.Generator().manual_seed(3)
    heads, d, hw = 2, 4, (4, 4)
    T = hw[0] * hw[1]
    p = _patch()
    q, k, v = (torch.randn(3, T, heads * d, generator=g) for _ in range(3))  # rows [uncond, cond, ref]
    theirs = lambda q, k, v, e: plain_attention(q, k, v, heads)  # noqa: E731
    store = {}
    ctx = CallRows(rows=[1], mask_index=[0], n_rows=3, sigma=1.0, step=None, ref_row=2)
    out = Attn1Replace(p, _state(p), ("output", 9, 0), theirs, "inline", ctx, store)(q, k, v, _extra((4, 4), hw, heads, [1, 0, 0]))
    ones = torch.ones(1, T, dtype=torch.bool)
    mea = masked_extended_attention(q[1:2], k[1:2], v[1:2], k[2:3], v[2:3], ones, ones, heads)
    plain = plain_attention(q, k, v, heads)
    assert torch.allclose(out[1:2], mea) and torch.equal(out[0], plain[0]) and torch.equal(out[2], plain[2])
    assert torch.equal(store[("output", 9, 0)].k, k[2:3])  # kept for later calls at the same sigma


# ---------------------------------------------------------------------------------------------
# the MEA node's inputs (nodes/mea_inputs.py), with stand-ins for the VAE and the model


class _Vae:
    def spacial_compression_encode(self):
        return 8

    def encode(self, image):  # IMAGE [B, H, W, 3] -> [B, 4, H/8, W/8]: the mean colour of each 8x8 cell
        x = image.permute(0, 3, 1, 2)
        cells = torch.nn.functional.avg_pool2d(x, 8)
        return torch.cat([cells, cells.mean(1, keepdim=True)], 1)


class _Model:
    class model:  # noqa: N801  (ComfyUI's ModelPatcher.model)
        class latent_format:  # noqa: N801
            latent_channels = 4

        @staticmethod
        def process_latent_in(x):
            return x * 0.5


def test_reference_is_cropped_to_the_vae_multiple_encoded_and_noised_with_its_seed():
    from max4zero.nodes.mea_inputs import prepare_reference

    img = torch.rand(1, 21, 35, 3)
    gm = torch.zeros(1, 21, 35)
    gm[:, 4:18, 6:30] = 1
    a = prepare_reference("N", _Model, _Vae(), img, gm, "kept", 3)
    assert a.size == (21, 35) and a.crop == (2, 1, 16, 32) and a.latent.shape == (1, 4, 2, 4)
    assert a.garment.shape == (1, 16, 32) and a.garment.dtype == torch.bool
    assert a.garment.sum() < (gm[:, 2:18, 1:33] > 0.5).sum()  # eroded by 1 px
    b = prepare_reference("N", _Model, _Vae(), img, gm, "kept", 3)
    assert torch.equal(a.noise, b.noise) and not torch.equal(a.noise, prepare_reference("N", _Model, _Vae(), img, gm,
                                                                                       "kept", 4).noise)
    # neutralised: the result no longer depends on the background
    other = img.clone()
    other[:, :4] = 0.0
    n1 = prepare_reference("N", _Model, _Vae(), img, gm, "neutralised", 3)
    n2 = prepare_reference("N", _Model, _Vae(), other, gm, "neutralised", 3)
    assert torch.equal(n1.latent, n2.latent)
    with pytest.raises(ValueError, match="at least 8x8"):
        prepare_reference("N", _Model, _Vae(), torch.rand(1, 4, 40, 3), torch.ones(1, 4, 40), "kept", 0)
    with pytest.raises(ValueError, match="one reference image"):
        prepare_reference("N", _Model, _Vae(), torch.rand(2, 16, 16, 3), torch.ones(1, 16, 16), "kept", 0)
