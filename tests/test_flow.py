"""Leffa attention flow: coordinates, reductions, accumulation, visualisation (docs/method.md §4)."""

from __future__ import annotations

import math

import pytest
import torch

from max4zero.attention.flow import (
    AttentionCapture,
    FlowAccumulator,
    accumulate_records,
    end_point_error,
    flow_to_color,
    flow_to_pixel_map,
    identity_flow,
    pixel_map_to_flow,
    reference_flow,
    reference_flow_from_logits,
    reference_flow_from_qk,
    reference_grid,
    resize_flow,
    select_records,
    warp_by_flow,
)


def test_reference_grid_convention():
    g = reference_grid((3, 4))
    assert g.shape == (12, 2)
    assert g[0].tolist() == [-1.0, -1.0]  # top-left
    assert g[3].tolist() == [1.0, -1.0]  # end of first row: x varies fastest
    assert g[-1].tolist() == [1.0, 1.0]
    assert torch.allclose(g[5], torch.tensor([-1 + 2 / 3, 0.0]))  # row 1, col 1
    assert torch.equal(identity_flow((3, 4)).reshape(12, 2), g)


def test_one_hot_onto_permutation_gives_exact_coordinates():
    h, w, heads, t = 5, 7, 3, 20
    perm = torch.randperm(h * w, generator=torch.Generator().manual_seed(0))[:t]
    probs = torch.zeros(2, heads, t, h * w)
    probs[:, :, torch.arange(t), perm] = 0.3  # reference half carries 0.3 of the probability
    stats = reference_flow(probs, (h, w))
    assert torch.equal(stats.flow, reference_grid((h, w))[perm].expand(2, -1, -1))
    assert torch.allclose(stats.mass, torch.full((2, t), 0.3))
    assert torch.equal(stats.entropy, torch.zeros(2, t))
    assert torch.equal(stats.peak, torch.ones(2, t))


def test_heads_are_averaged_after_renormalising():
    probs = torch.zeros(2, 1, 4)  # 2 heads, 1 query, 2x2 reference
    probs[0, 0, 0] = 0.5  # head 0 reads top-left with mass 0.5
    probs[1, 0, 3] = 0.1  # head 1 reads bottom-right with mass 0.1
    stats = reference_flow(probs, (2, 2))
    assert torch.allclose(stats.flow, torch.zeros(1, 2), atol=1e-7)  # equal head weights, not mass weights
    assert torch.allclose(stats.mass, torch.tensor([0.3]))
    assert torch.allclose(stats.entropy, torch.tensor([math.log(2)]))
    assert torch.allclose(stats.peak, torch.tensor([0.5]))


def test_head_with_zero_mass_is_left_out():
    probs = torch.zeros(2, 1, 4)
    probs[0, 0, 3] = 0.2
    stats = reference_flow(probs, (2, 2))
    assert torch.allclose(stats.flow, torch.tensor([[1.0, 1.0]]))
    assert torch.allclose(stats.mass, torch.tensor([0.1]))


def test_mass_entropy_of_known_distributions():
    n = 8
    uniform = torch.full((1, 1, n), 0.25 / n)  # no head axis: [B, T, T_ref]
    s = reference_flow(uniform, (2, 4), head_axis=None)
    assert torch.allclose(s.mass, torch.tensor([[0.25]]))
    assert torch.allclose(s.entropy, torch.tensor([[math.log(n)]]))
    assert torch.allclose(s.peak, torch.tensor([[1.0 / n]]))
    assert torch.allclose(s.flow, torch.zeros(1, 1, 2), atol=1e-6)  # centroid of a symmetric grid
    two = torch.zeros(1, 1, n)
    two[0, 0, 0], two[0, 0, 1] = 0.6, 0.2
    s = reference_flow(two, (2, 4), head_axis=None)
    p = torch.tensor([0.75, 0.25])
    assert torch.allclose(s.entropy, -(p * p.log()).sum().view(1, 1))
    assert torch.allclose(s.flow, torch.tensor([[[-1 + 0.25 * 2 / 3, -1.0]]]))
    assert torch.allclose(s.mass, torch.tensor([[0.8]]))


def test_logits_path_matches_probs_path_and_temperature():
    g = torch.Generator().manual_seed(1)
    lt = torch.randn(2, 3, 10, 10, generator=g) * 3
    lr = torch.randn(2, 3, 10, 12, generator=g) * 3
    mask = torch.rand(12, generator=g) < 0.5
    mask[0] = True
    both = torch.cat([lt, lr.masked_fill(~mask, float("-inf"))], -1)
    p = torch.softmax(both, -1)[..., 10:]
    a = reference_flow(p, (3, 4))
    b = reference_flow_from_logits(lr, (3, 4), key_mask=mask, logits_tgt=lt)
    for x, y in zip(a, b):
        assert torch.allclose(x, y, atol=1e-6)
    c = reference_flow_from_logits(lr, (3, 4), key_mask=mask, tau=2.0)
    soft = torch.softmax(lr.masked_fill(~mask, float("-inf")) / 2.0, -1)
    assert torch.allclose(c.flow, (soft.mean(1) @ reference_grid((3, 4))), atol=1e-6)
    assert c.mass is None
    assert (c.entropy > a.entropy).float().mean() > 0.9  # higher temperature: flatter


@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_sdpa_flow_equals_materialised(tau):
    g = torch.Generator().manual_seed(2)
    heads, d, t, hr, wr = 4, 8, 30, 5, 6
    q = torch.randn(2, t, heads * d, generator=g)
    k = torch.randn(2, t, heads * d, generator=g)
    kr = torch.randn(1, hr * wr, heads * d, generator=g)
    rm = torch.rand(2, hr * wr, generator=g) < 0.5
    rm[:, 0] = True
    got = reference_flow_from_qk(q, kr, rm, heads, (hr, wr), tau=tau, k_tgt=k)
    qh = q.view(2, t, heads, d).transpose(1, 2)
    kh = k.view(2, t, heads, d).transpose(1, 2)
    krh = kr.view(1, hr * wr, heads, d).transpose(1, 2)
    lr = qh @ krh.transpose(-1, -2) / math.sqrt(d)
    lt = qh @ kh.transpose(-1, -2) / math.sqrt(d)
    want = reference_flow_from_logits(lr, (hr, wr), tau=tau, key_mask=rm[:, None, None, :], logits_tgt=lt)
    batch_mask = reference_flow_from_logits(lr, (hr, wr), tau=tau, key_mask=rm, logits_tgt=lt)
    assert torch.equal(want.flow, batch_mask.flow)
    assert torch.allclose(got.flow, want.flow, atol=1e-5)
    assert torch.allclose(got.mass, want.mass, atol=1e-5)


def test_sdpa_flow_empty_mask_gives_zero():
    q = torch.randn(1, 9, 16)
    got = reference_flow_from_qk(q, torch.randn(1, 4, 16), torch.zeros(1, 4, dtype=torch.bool), 2, k_tgt=torch.randn(1, 9, 16))
    assert torch.equal(got.flow, torch.zeros(1, 9, 2)) and torch.equal(got.mass, torch.zeros(1, 9))


def test_identity_attention_and_warp_returns_reference():
    h, w = 6, 5
    eye = torch.eye(h * w).view(1, 1, h * w, h * w) * 0.7
    flow = reference_flow(eye, (h, w)).flow.view(1, h, w, 2)
    assert torch.allclose(flow[0], identity_flow((h, w)), atol=1e-7)
    img = torch.rand(1, 3, 23, 31)
    # token-level identity, upsampled to the image size, warps the reference onto itself
    assert torch.allclose(warp_by_flow(img, flow), img, atol=1e-5)
    assert torch.allclose(warp_by_flow(img[0], flow[0]), img[0], atol=1e-5)


def test_warp_shift_by_one_pixel():
    img = torch.arange(4 * 6, dtype=torch.float32).view(1, 1, 4, 6)
    flow = identity_flow((4, 6)).clone()
    flow[..., 0] += 2.0 / 5  # one pixel to the right at width 6 (align_corners=True)
    out = warp_by_flow(img, flow, padding_mode="border")
    assert torch.allclose(out[0, 0, :, :-1], img[0, 0, :, 1:], atol=1e-5)
    out2 = warp_by_flow(img, flow, size=(8, 11))
    assert out2.shape == (1, 1, 8, 11)


def test_flow_to_color():
    ident = identity_flow((4, 4))
    white = flow_to_color(ident, "displacement")
    assert white.shape == (4, 4, 3) and torch.allclose(white, torch.ones_like(white))
    f = torch.zeros(2, 3, 3, 2)
    f[..., 0] = 1.0  # reads the right edge
    c = flow_to_color(f, "absolute", max_magnitude=1.0)
    assert c.shape == (2, 3, 3, 3)
    assert torch.allclose(c[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]), atol=1e-6)  # +x = red
    f[..., 0], f[..., 1] = -1.0, 0.0
    cyan = flow_to_color(f, "absolute", max_magnitude=1.0)[0, 0, 0]
    assert torch.allclose(cyan, torch.tensor([0.0, 1.0, 1.0]), atol=1e-6)
    centre = flow_to_color(torch.zeros(2, 2, 2), brightness=torch.full((2, 2), 0.5))
    assert torch.allclose(centre, torch.full((2, 2, 3), 0.5))
    rnd = flow_to_color(torch.randn(5, 7, 2) * 3, "displacement")
    assert rnd.min() >= 0 and rnd.max() <= 1
    with pytest.raises(ValueError, match="mode"):
        flow_to_color(ident, "polar")


def test_end_point_error_and_pixel_maps():
    a = identity_flow((4, 6))
    b = a + torch.tensor([0.3, -0.4])
    assert torch.allclose(end_point_error(a, b), torch.full((4, 6), 0.5))
    px = end_point_error(a, b, pixel_size=(11, 21))  # Δx·10, Δy·5
    assert torch.allclose(px, torch.full((4, 6), math.hypot(3.0, 2.0)))
    # different grids: the identity is the identity at any resolution
    assert end_point_error(identity_flow((4, 4)), identity_flow((16, 16))).max() < 1e-6
    # an MLS-style identity pixel map is the identity flow; round trip
    H, W = 9, 13
    ys, xs = torch.meshgrid(torch.arange(H, dtype=torch.float32), torch.arange(W, dtype=torch.float32), indexing="ij")
    pmap = torch.stack([xs, ys], -1)
    assert torch.allclose(pixel_map_to_flow(pmap, (H, W)), identity_flow((H, W)), atol=1e-6)
    assert torch.allclose(flow_to_pixel_map(pixel_map_to_flow(pmap + 0.3, (H, W)), (H, W)), pmap + 0.3, atol=1e-5)
    # warping by the converted pixel map samples the same pixels as the map says
    img = torch.rand(1, 2, H, W)
    shifted = pmap.clone()
    shifted[..., 1] += 1.0
    out = warp_by_flow(img, pixel_map_to_flow(shifted, (H, W)))
    assert torch.allclose(out[0, :, :-1], img[0, :, 1:], atol=1e-5)


def test_resize_flow_shapes():
    f = identity_flow((4, 4))
    assert torch.allclose(resize_flow(f, 8), identity_flow((8, 8)), atol=1e-6)
    assert resize_flow(torch.rand(2, 4, 4), (8, 6)).shape == (2, 8, 6)
    assert resize_flow(f.expand(3, 4, 4, 2), (5, 5)).shape == (3, 5, 5, 2)


def _record_into(cap, hw, value, mass=1.0, **ctx):
    h, w = hw
    cap.set_context(query_hw=hw, **ctx)
    flow = identity_flow(hw).reshape(1, h * w, 2) + value
    m = torch.full((1, h * w), mass)
    ent = torch.full((1, h * w), mass * 2)
    cap.add(flow, m, entropy=ent, peak=ent / 4, query_mask=torch.ones(1, h * w, dtype=torch.bool))


def test_capture_records_and_accumulates_across_grids():
    cap = AttentionCapture(want_entropy=True)
    _record_into(cap, (4, 4), 0.0, mass=0.2, layer=("output", 6), step=0, sigma=10.0)
    _record_into(cap, (8, 8), 0.1, mass=0.6, layer=("output", 9), step=0, sigma=10.0)
    _record_into(cap, (8, 8), 0.4, mass=1.0, layer=("output", 9), step=1, sigma=2.0)
    assert len(cap) == 3 and cap.records[1].flow.shape == (1, 8, 8, 2)
    res = cap.accumulate()  # finest grid, all records
    assert res.flow.shape == (1, 8, 8, 2)
    assert torch.allclose(res.flow, identity_flow((8, 8)) + 0.5 / 3, atol=1e-6)
    assert torch.allclose(res.mass, torch.full((1, 8, 8), 0.6), atol=1e-6)
    assert torch.allclose(res.entropy, torch.full((1, 8, 8), 1.2), atol=1e-6)
    only16 = cap.accumulate(grids=[4])
    assert only16.flow.shape == (1, 4, 4, 2) and torch.allclose(only16.flow, identity_flow((4, 4)))
    late = cap.accumulate(16, sigmas=(None, 5.0))
    assert torch.allclose(late.flow, identity_flow((16, 16)) + 0.4, atol=1e-6)
    step0 = cap.accumulate(steps=(0, 0), layers=lambda name: name[1] == 9)
    assert torch.allclose(step0.flow, identity_flow((8, 8)) + 0.1, atol=1e-6)
    mw = cap.accumulate(mass_weighted=True, grids=[8])
    assert torch.allclose(mw.flow, identity_flow((8, 8)) + (0.1 * 0.6 + 0.4 * 1.0) / 1.6, atol=1e-6)
    weighted = accumulate_records(cap.records, grids=[8], weight=lambda r: 3.0 if r.step == 1 else 1.0)
    assert torch.allclose(weighted.flow, identity_flow((8, 8)) + (0.1 + 1.2) / 4, atol=1e-6)
    with pytest.raises(ValueError, match="selection"):
        cap.accumulate(layers=["nope"])
    assert len(select_records(cap.records, layers=[("output", 9)])) == 2


def test_capture_filters_and_validation():
    cap = AttentionCapture(grids=[(8, 8)], steps=(2, None), max_records=2)
    cap.set_context(query_hw=(8, 8), step=1)
    assert not cap.wanted()
    cap.set_context(step=2)
    assert cap.wanted()
    for _ in range(3):
        _record_into(cap, (8, 8), 0.0, step=2)
    assert len(cap) == 2
    with pytest.raises(ValueError, match="query_hw"):
        cap.set_context(query_hw=(3, 3))
        cap.add(torch.zeros(1, 10, 2), torch.zeros(1, 10))
    with pytest.raises(ValueError, match="context"):
        cap.set_context(grid=(2, 2))
    with pytest.raises(ValueError, match="tau"):
        AttentionCapture(tau=0)


def test_accumulator_direct_use():
    acc = FlowAccumulator((6, 6))
    with pytest.raises(ValueError, match="nothing"):
        acc.result()
    acc.update(identity_flow((3, 3))[None], torch.ones(1, 3, 3))
    acc.update(identity_flow((6, 6))[None], torch.zeros(1, 6, 6), weight=0.0)  # ignored
    r = acc.result()
    assert torch.allclose(r.flow[0], identity_flow((6, 6)), atol=1e-6) and r.entropy is None
    assert acc.count == 1


def test_accumulator_averages_peak_by_its_own_weight():
    """Peak given without entropy (and with it on other records) is a plain weighted mean of the peaks."""
    from max4zero.attention.flow import FlowAccumulator

    acc = FlowAccumulator((2, 2))
    flow, mass = torch.zeros(1, 2, 2, 2), torch.ones(1, 2, 2)
    acc.update(flow, mass, peak=torch.full((1, 2, 2), 0.5), weight=1.0)
    acc.update(flow, mass, entropy=torch.ones(1, 2, 2), peak=torch.full((1, 2, 2), 1.0), weight=3.0)
    stats = acc.result()
    assert torch.allclose(stats.peak, torch.full((1, 2, 2), (0.5 + 3.0) / 4.0))
    assert torch.allclose(stats.entropy, torch.ones(1, 2, 2))
    only_peak = FlowAccumulator((2, 2))
    only_peak.update(flow, mass, peak=torch.full((1, 2, 2), 0.25))
    assert torch.allclose(only_peak.result().peak, torch.full((1, 2, 2), 0.25))  # no division by zero
