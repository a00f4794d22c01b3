"""The Flux adapter's host-independent part (attention/dit.py) against a naive float64 formula (docs/method.md §3c)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from max4zero.attention import dit
from max4zero.attention import masked_extended as mea


@pytest.fixture(autouse=True, params=["kernel-lse", "portable"])
def implementation(request, monkeypatch):
    monkeypatch.setattr(mea, "USE_KERNEL_LSE", request.param == "kernel-lse")
    return request.param


def naive(q, k, v, k_ref, v_ref, region, img_start, contrast, ref_count):
    """float64, per head: softmax over [all keys ; garment keys], contrast on the reference half."""
    q, k, v, k_ref, v_ref = (x.double() for x in (q, k, v, k_ref, v_ref))
    b, h, lq, d = q.shape
    out = F.scaled_dot_product_attention(q, k, v)  # [B, H, Lq, dv]
    s = 1.0 / math.sqrt(d)
    for bi in range(b):
        kr, vr = k_ref[0 if k_ref.shape[0] == 1 else bi], v_ref[0 if v_ref.shape[0] == 1 else bi]
        for n in region[0 if region.shape[0] == 1 else bi].nonzero().flatten().tolist():
            i = img_start + n
            lt = torch.einsum("hd,hkd->hk", q[bi, :, i], k[bi]) * s  # [H, Lk]
            lr = torch.einsum("hd,hgd->hg", q[bi, :, i], kr) * s
            p = torch.softmax(torch.cat([lt, lr], -1), -1)
            pt, pr = p[:, : lt.shape[-1]], p[:, lt.shape[-1]:]
            m = pr.sum(-1, keepdim=True) / ref_count
            pr = ((pr - m) * contrast + m).clamp(0, 1)
            out[bi, :, i] = torch.einsum("hk,hkd->hd", pt, v[bi]) + torch.einsum("hg,hgd->hd", pr, vr)
    return out.transpose(1, 2).reshape(b, lq, -1)


def make(b=2, h=2, txt=5, n_img=12, extra=3, g=7, d=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    lq = txt + n_img
    q = torch.randn(b, h, lq, d, generator=gen)
    k, v = (torch.randn(b, h, lq + extra, d, generator=gen) for _ in range(2))
    k_ref, v_ref = (torch.randn(1, h, g, d, generator=gen) for _ in range(2))
    region = torch.zeros(b, n_img, dtype=torch.bool)
    region[0, 2:7] = True
    region[1, 5:11] = True
    return q, k, v, k_ref, v_ref, region, txt


@pytest.mark.parametrize("contrast", [1.0, 1.25])
def test_joint_extended_attention_matches_the_formula_and_keeps_everything_else(contrast):
    q, k, v, k_ref, v_ref, region, txt = make()
    base = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)
    out = dit.joint_extended_attention(q, k, v, k_ref, v_ref, region, txt, base, contrast, ref_count=20)
    want = naive(q, k, v, k_ref, v_ref, region, txt, contrast, 20)
    assert torch.allclose(out.double(), want, atol=1e-5)
    keep = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool)
    keep[:, txt:] = ~region
    assert torch.equal(out[keep], base[keep])  # text and outside-region image queries: bit for bit
    assert not torch.equal(out[~keep], base[~keep])


def test_empty_region_returns_the_base_unchanged():
    q, k, v, k_ref, v_ref, region, txt = make()
    base = torch.randn(q.shape[0], q.shape[2], q.shape[1] * q.shape[3])
    out = dit.joint_extended_attention(q, k, v, k_ref, v_ref, torch.zeros_like(region), txt, base, 1.25)
    assert torch.equal(out, base)


def test_ref_count_must_cover_the_given_keys():
    q, k, v, k_ref, v_ref, region, txt = make()
    base = torch.zeros(q.shape[0], q.shape[2], q.shape[1] * q.shape[3])
    with pytest.raises(ValueError, match="ref_count"):
        dit.joint_extended_attention(q, k, v, k_ref, v_ref, region, txt, base, 1.25, ref_count=3)


def test_token_grid_blocks_and_reference_ids():
    assert dit.flux_token_grid((64, 48), 2) == (32, 24)
    assert dit.flux_token_grid((9, 9), 2) == (5, 5)
    assert dit.flux_token_grid((9, 7), 1) == (9, 7)  # FLUX.2: one latent cell per token
    full = dit.parse_flux_blocks("vital", 19, 38)
    assert full == frozenset({("double", i) for i in (0, 1, 17, 18)} | {("single", i) for i in (6, 9, 34, 35, 37)})
    assert dit.parse_flux_blocks("all", 2, 2) == dit.parse_flux_blocks("double, single", 2, 2)
    assert dit.parse_flux_blocks("d1, s0-1", 2, 2) == frozenset({("double", 1), ("single", 0), ("single", 1)})
    for bad in ("d2", "x1", "", "s1-0"):
        with pytest.raises(ValueError, match="flux_blocks"):
            dit.parse_flux_blocks(bad, 2, 2)
    with pytest.raises(ValueError, match="selects no block"):
        dit.parse_flux_blocks("vital", 0, 3)
    ids = dit.reference_token_ids((3, 4))
    assert ids.shape == (1, 12, 3)
    assert torch.all(ids[0, :, 0] == dit.REFERENCE_ROPE_INDEX)
    assert ids[0, 7, 1:].tolist() == [1.0, 3.0]


@pytest.mark.parametrize("contrast, tau", [(1.0, 1.0), (1.25, 2.0)])
def test_capture_records_the_region_on_the_image_grid_and_changes_nothing(contrast, tau):
    """Garment keys at their places on a 4x5 reference grid: the recorded flow is the Leffa flow of the region's
    queries (reference_flow_from_qk on the same q/k; τ ≠ 1 is Leffa's formula, without the contrast), 0 elsewhere;
    with contrast (explicit path either way) the output is bit-identical to the call without a capture."""
    from max4zero.attention.flow import AttentionCapture, reference_flow_from_qk

    q, k, v, k_ref, v_ref, region, txt = make()
    b, h, _, d = q.shape
    n_img = region.shape[1]
    pos = torch.tensor([0, 3, 4, 8, 11, 15, 19])  # 7 garment tokens of the 20
    base = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, q.shape[2], -1)
    cap = AttentionCapture(want_entropy=True, tau=tau).set_context(query_hw=(3, 4), ref_hw=(4, 5), layer=("double", 0))
    out = dit.joint_extended_attention(q, k, v, k_ref, v_ref, region, txt, base, contrast, ref_count=20, capture=cap,
                                       ref_positions=pos)
    plain = dit.joint_extended_attention(q, k, v, k_ref, v_ref, region, txt, base, contrast, ref_count=20)
    assert torch.equal(out, plain) if contrast != 1.0 else torch.allclose(out, plain, atol=1e-6)
    (rec,) = cap.records
    assert rec.flow.shape == (b, 3, 4, 2) and rec.query_hw == (3, 4) and rec.ref_hw == (4, 5)
    assert torch.equal(rec.query_mask.reshape(b, n_img), region)
    flat = lambda x: x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)  # noqa: E731
    k_full = torch.zeros(1, 20, h * d).index_copy_(1, pos, flat(k_ref))
    rm = torch.zeros(1, 20, dtype=torch.bool)
    rm[0, pos] = True
    img = flat(q)[:, txt:]  # [B, N, H·d] the image queries
    want = reference_flow_from_qk(img, k_full, rm, h, (4, 5), tau=tau).flow
    got = rec.flow.reshape(b, n_img, 2)
    assert torch.allclose(got[region], want[region], atol=1e-5)
    assert not got[~region].any() and not rec.mass.reshape(b, n_img)[~region].any()
    assert (rec.mass.reshape(b, n_img)[region] > 0).all()


def test_capture_needs_reference_positions():
    from max4zero.attention.flow import AttentionCapture

    q, k, v, k_ref, v_ref, region, txt = make()
    base = torch.zeros(q.shape[0], q.shape[2], q.shape[1] * q.shape[3])
    cap = AttentionCapture().set_context(query_hw=(3, 4), ref_hw=(4, 5))
    with pytest.raises(ValueError, match="ref_positions"):
        dit.joint_extended_attention(q, k, v, k_ref, v_ref, region, txt, base, 1.25, capture=cap)


def test_patch_level_reference_index_and_vital_blocks_per_family():
    assert [dit.patch_level(p) for p in (1, 2, 4)] == [0, 1, 2]
    with pytest.raises(ValueError, match="power of two"):
        dit.patch_level(3)
    # FLUX.1 Kontext's offset method: index 1 whatever the call's references; FLUX.2's index method: one
    # ref_index_scale step after the call's own reference latents
    assert dit.reference_rope_index("offset", 10.0, 2) == 1.0
    assert [dit.reference_rope_index("index", 10.0, n) for n in (0, 1, 2)] == [10.0, 20.0, 30.0]
    assert dit.reference_rope_index("index_timestep_zero", 10.0, 1) == 20.0
    with pytest.raises(ValueError, match="uxo"):
        dit.reference_rope_index("uxo", 10.0)
    # FLUX.1 at full depth: Stable Flow's indices; FLUX.2 dev (8 + 48) and klein 4B (5 + 20): the same relative
    # depths (FLUX.1's table at FLUX.2's depth would pick single blocks 6, 9, 34, 35, 37 of 48: not the ends)
    assert dit.vital_blocks("flux", 19, 38) == dit.parse_flux_blocks("vital", 19, 38)
    dev = dit.parse_flux_blocks("vital", 8, 48, "flux2")
    assert dev == frozenset({("double", 0), ("double", 7)} | {("single", j) for j in (8, 11, 43, 44, 47)})
    klein = dit.parse_flux_blocks("vital", 5, 20, "flux2")
    assert klein == frozenset({("double", 0), ("double", 4)} | {("single", j) for j in (3, 5, 17, 18, 19)})
    assert dit.parse_flux_blocks("vital", 2, 2, "flux2") == dit.parse_flux_blocks("all", 2, 2)
    with pytest.raises(ValueError, match="no 'vital' blocks"):
        dit.parse_flux_blocks("vital", 2, 2, "hunyuan")
    ids = dit.reference_token_ids((2, 3), 4, 10.0)
    assert ids.shape == (1, 6, 4) and torch.all(ids[0, :, 0] == 10.0) and not ids[0, :, 3].any()


def test_key_keep_from_a_padding_mask_is_the_masked_attention_and_a_soft_mask_is_refused():
    """Qwen-Image's text padding mask (0 / -finfo.max per key): the region rows redone over the kept keys equal
    plain attention with that additive mask (contrast 1, garment keys appended); a soft bias is refused."""
    torch.manual_seed(3)
    b, heads, txt, n_img, d = 1, 2, 4, 6, 8
    lq = txt + n_img
    q, k, v = (torch.randn(b, heads, lq, d) for _ in range(3))
    k_ref, v_ref = torch.randn(1, heads, 3, d), torch.randn(1, heads, 3, d)
    bias = torch.zeros(b, 1, lq)
    bias[..., 1] = -torch.finfo(torch.float32).max  # one padded text token
    keep = dit.key_keep_from_bias(bias, lq)
    assert keep.tolist() == [[True, False] + [True] * (lq - 2)]
    region = torch.zeros(1, n_img, dtype=torch.bool)
    region[0, 2:4] = True
    base = torch.zeros(b, lq, heads * d)
    out = dit.joint_extended_attention(q, k, v, k_ref, v_ref, region, txt, base, 1.0, key_keep=keep)
    # reference: softmax over [all keys with the additive bias ; garment keys]
    logits = torch.cat([q @ k.transpose(-1, -2) + bias[:, None], q @ k_ref.transpose(-1, -2)], -1) / d**0.5
    want = (logits.softmax(-1) @ torch.cat([v, v_ref.expand(b, -1, -1, -1)], 2)).transpose(1, 2).reshape(b, lq, -1)
    rows = txt + region[0].nonzero().flatten()
    assert torch.allclose(out[0, rows], want[0, rows], atol=1e-5)
    ignored = dit.joint_extended_attention(q, k, v, k_ref, v_ref, region, txt, base, 1.0)  # the mask dropped
    assert not torch.allclose(ignored[0, rows], want[0, rows], atol=1e-3)
    with pytest.raises(ValueError, match="not a padding mask"):
        dit.key_keep_from_bias(torch.full((1, 1, lq), -0.5), lq)
    with pytest.raises(ValueError, match="covers 3 keys"):
        dit.key_keep_from_bias(torch.zeros(1, 3), lq)


def test_mask_checks_look_at_the_token_grid_of_the_vae_ratio():
    """FLUX.2's tokens are its 16x latent cells (level 0 at ratio 16): a target stripe that the 1/8 grid keeps but the
    1/16 grid loses is refused there, as it is for FLUX.1 (level 1 at ratio 8); at ratio 8 and level 0 it would pass."""
    from max4zero.attention.reference import mask_findings

    garment = torch.zeros(1, 128, 128)
    garment[:, 16:112, 16:112] = 1
    target = torch.zeros(1, 128, 128)
    target[:, 8:14, :] = 1  # a 6 px stripe
    flux2 = mask_findings(garment, garment.bool(), target, [0], ratio=16)[0]
    flux1 = mask_findings(garment, garment.bool(), target, [1], ratio=8)[0]
    wrong = mask_findings(garment, garment.bool(), target, [0], ratio=8)[0]
    assert any("target_mask" in p for p in flux2) and flux2 == flux1
    assert not any("target_mask" in p for p in wrong)
