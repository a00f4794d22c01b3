"""Masked Extended Attention against a naive float64 implementation written here (docs/method.md §3b)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from max4zero.attention import masked_extended as mea
from max4zero.attention.flow import AttentionCapture, reference_flow, reference_flow_from_qk
from max4zero.attention.masked_extended import masked_extended_attention, plain_attention

HEADS = 4
D = 8


@pytest.fixture(autouse=True, params=["kernel-lse", "portable"])
def implementation(request, monkeypatch):
    """Every test runs with the CPU kernel's log-sum-exp reused and with the portable path (CUDA's)."""
    monkeypatch.setattr(mea, "USE_KERNEL_LSE", request.param == "kernel-lse")
    return request.param


def make(b=2, t=48, t_ref=36, heads=HEADS, d=D, b_ref=None, seed=0, dtype=torch.float32, p_ref=0.4, p_q=0.5):
    g = torch.Generator().manual_seed(seed)
    b_ref = b if b_ref is None else b_ref
    c = heads * d
    q, k, v = (torch.randn(b, t, c, generator=g).to(dtype) for _ in range(3))
    k_ref, v_ref = (torch.randn(b_ref, t_ref, c, generator=g).to(dtype) for _ in range(2))
    ref_mask = torch.rand(b_ref, t_ref, generator=g) < p_ref
    q_mask = torch.rand(b, t, generator=g) < p_q
    # every test case must actually exercise both kinds of keys and queries
    ref_mask[:, 0] = True
    ref_mask[:, -1] = False
    q_mask[:, 0] = True
    q_mask[:, -1] = False
    return q, k, v, k_ref, v_ref, ref_mask, q_mask


def naive(q, k, v, k_ref, v_ref, ref_mask, q_mask, heads, contrast=1.0, return_probs=False, before_contrast=False):
    """Softmax over the concatenated logits with −inf on masked keys, contrast by formula, float64."""
    q, k, v, k_ref, v_ref = (x.double() for x in (q, k, v, k_ref, v_ref))
    b, t, c = q.shape
    t_ref = k_ref.shape[1]
    d = c // heads
    rm = ref_mask.expand(b, -1)
    qm = q_mask.expand(b, -1)
    out = torch.empty(b, t, v.shape[-1], dtype=torch.float64)
    probs = []
    for i in range(b):
        r = 0 if k_ref.shape[0] == 1 else i
        qh = q[i].view(t, heads, d).transpose(0, 1)
        kh = k[i].view(t, heads, d).transpose(0, 1)
        vh = v[i].view(t, heads, -1).transpose(0, 1)
        krh = k_ref[r].view(t_ref, heads, d).transpose(0, 1)
        vrh = v_ref[r].view(t_ref, heads, -1).transpose(0, 1)
        logits = torch.cat([qh @ kh.transpose(1, 2), qh @ krh.transpose(1, 2)], dim=-1) / math.sqrt(d)
        keep = torch.cat([torch.ones(t, dtype=torch.bool), rm[i]])
        logits = logits.masked_fill(~keep, float("-inf"))
        p = torch.softmax(logits, dim=-1)
        p_t, p_r = p[..., :t], p[..., t:]
        p_r0 = p_r
        mean = p_r.sum(-1, keepdim=True) / t_ref
        p_r = ((p_r - mean) * contrast + mean).clamp(0, 1) * rm[i]
        o_ext = p_t @ vh + p_r @ vrh
        o_plain = torch.softmax(qh @ kh.transpose(1, 2) / math.sqrt(d), dim=-1) @ vh
        o = torch.where(qm[i][None, :, None], o_ext, o_plain)
        out[i] = o.transpose(0, 1).reshape(t, -1)
        probs.append(p_r0 if before_contrast else p_r)
    if return_probs:
        return out, torch.stack(probs)
    return out


def sdpa_plain(q, k, v, heads):
    b, t, c = q.shape
    sh = lambda x: x.view(b, t, heads, x.shape[-1] // heads).transpose(1, 2)  # noqa: E731
    o = F.scaled_dot_product_attention(sh(q), sh(k), sh(v))
    return o.transpose(1, 2).reshape(b, t, -1)


class Recorder:
    """Minimal capture object: only the protocol's required attributes."""

    def __init__(self, ref_hw, want_entropy=False):
        self.ref_hw = ref_hw
        self.want_entropy = want_entropy
        self.calls = []

    def add(self, flow, mass, entropy=None, peak=None, query_mask=None):
        self.calls.append((flow, mass, entropy, peak, query_mask))


MODES = {
    "fast": dict(),
    "explicit": dict(force_explicit=True),
    "contrast": dict(contrast=1.25),
    "capture": dict(capture="rec"),
}


def run(args, mode, **extra):
    kw = dict(MODES[mode])
    kw.update(extra)
    if kw.get("capture") == "rec":
        kw["capture"] = Recorder((6, 6), want_entropy=True)
    return masked_extended_attention(*args, HEADS, **kw)


# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", list(MODES))
def test_empty_garment_mask_is_plain_attention(mode):
    q, k, v, kr, vr, rm, qm = make()
    out = run((q, k, v, kr, vr, torch.zeros_like(rm), qm), mode)
    assert torch.equal(out, sdpa_plain(q, k, v, HEADS))
    assert torch.equal(out, plain_attention(q, k, v, HEADS))


@pytest.mark.parametrize("mode", list(MODES))
def test_no_region_query_is_plain_attention(mode):
    q, k, v, kr, vr, rm, qm = make()
    out = run((q, k, v, kr, vr, rm, torch.zeros_like(qm)), mode)
    assert torch.equal(out, sdpa_plain(q, k, v, HEADS))


@pytest.mark.parametrize("mode", list(MODES))
def test_outside_queries_bit_identical(mode):
    q, k, v, kr, vr, rm, qm = make()
    out = run((q, k, v, kr, vr, rm, qm), mode)
    plain = sdpa_plain(q, k, v, HEADS)
    assert torch.equal(out[~qm], plain[~qm])
    # and the region queries really changed
    assert (out[qm] - plain[qm]).abs().max() > 1e-3


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("value", [1e4, -1e30, 3e38])
def test_masked_reference_tokens_have_no_influence(mode, value):
    q, k, v, kr, vr, rm, qm = make()
    ref = run((q, k, v, kr, vr, rm, qm), mode)
    kr2, vr2 = kr.clone(), vr.clone()
    kr2[~rm] = value
    vr2[~rm] = -value
    out = run((q, k, v, kr2, vr2, rm, qm), mode)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("contrast", [1.0, 1.25, 2.0, 0.5, 0.0])
def test_matches_naive_float64(contrast):
    args = make(seed=1)
    want = naive(*args, HEADS, contrast=contrast)
    explicit = masked_extended_attention(*args, HEADS, contrast=contrast, force_explicit=True)
    assert (explicit.double() - want).abs().max() <= 1e-5
    if contrast == 1.0:
        fast = masked_extended_attention(*args, HEADS)
        assert (fast.double() - want).abs().max() <= 1e-5
        assert (fast - explicit).abs().max() <= 1e-5


def test_contrast_changes_result():
    args = make(seed=2)
    a = masked_extended_attention(*args, HEADS)
    b = masked_extended_attention(*args, HEADS, contrast=1.25)
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("contrast", [1.0, 1.25])
def test_chunked_equals_unchunked(contrast):
    args = make(seed=3, t=64)
    whole = masked_extended_attention(*args, HEADS, contrast=contrast, force_explicit=True, chunk_bytes=1 << 30)
    tiny = masked_extended_attention(*args, HEADS, contrast=contrast, force_explicit=True, chunk_bytes=1)
    assert (whole - tiny).abs().max() <= 1e-6


@pytest.mark.parametrize("mode", list(MODES))
def test_batch_with_different_masks(mode):
    q, k, v, kr, vr, rm, qm = make(b=3, seed=4)
    rm[1] = False  # one element without garment: plain
    qm[2] = ~qm[2]
    args = (q, k, v, kr, vr, rm, qm)
    out = run(args, mode)
    contrast = MODES[mode].get("contrast", 1.0)
    assert (out.double() - naive(*args, HEADS, contrast=contrast)).abs().max() <= 1e-5
    for i in range(3):
        one = run((q[i : i + 1], k[i : i + 1], v[i : i + 1], kr[i : i + 1], vr[i : i + 1], rm[i : i + 1], qm[i : i + 1]), mode)
        assert (one[0] - out[i]).abs().max() <= 1e-6
    assert torch.equal(out[1], sdpa_plain(q, k, v, HEADS)[1])


def test_batch_same_counts_different_positions():
    # equal counts per element take the batched gather: positions must still be per element
    q, k, v, kr, vr, rm, qm = make(b=2, seed=5)
    rm[1] = rm[0].roll(3)
    qm[1] = qm[0].roll(5)
    args = (q, k, v, kr, vr, rm, qm)
    out = masked_extended_attention(*args, HEADS)
    assert (out.double() - naive(*args, HEADS)).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", list(MODES))
def test_reference_batch_one_broadcasts(mode):
    q, k, v, kr, vr, rm, qm = make(b=2, b_ref=1, seed=6)
    a = run((q, k, v, kr, vr, rm, qm), mode)
    b = run((q, k, v, kr.expand(2, -1, -1), vr.expand(2, -1, -1), rm.expand(2, -1), qm), mode)
    assert torch.equal(a, b)
    contrast = MODES[mode].get("contrast", 1.0)
    assert (a.double() - naive(q, k, v, kr, vr, rm, qm, HEADS, contrast=contrast)).abs().max() <= 1e-5


def test_query_mask_batch_one_and_float_masks():
    q, k, v, kr, vr, rm, qm = make(b=2, seed=7)
    qm1 = qm[:1]
    a = masked_extended_attention(q, k, v, kr, vr, rm, qm1, HEADS)
    b = masked_extended_attention(q, k, v, kr, vr, rm.float(), qm1.expand(2, -1).float(), HEADS)
    assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("contrast", [1.0, 1.25])
def test_half_precision(dtype, contrast):
    args = make(seed=8)
    want = naive(*args, HEADS, contrast=contrast)
    half = [x.to(dtype) if x.is_floating_point() else x for x in args]
    out = masked_extended_attention(*half, HEADS, contrast=contrast)
    assert out.dtype == dtype
    assert (out.double() - want).abs().max() <= 5e-2


def test_value_width_may_differ():
    q, k, v, kr, vr, rm, qm = make(seed=9)
    v = torch.randn(2, q.shape[1], HEADS * 5)
    vr = torch.randn(2, kr.shape[1], HEADS * 5)
    args = (q, k, v, kr, vr, rm, qm)
    for kw in (dict(), dict(contrast=1.25)):
        out = masked_extended_attention(*args, HEADS, **kw)
        assert out.shape == (2, q.shape[1], HEADS * 5)
        assert (out.double() - naive(*args, HEADS, contrast=kw.get("contrast", 1.0))).abs().max() <= 1e-5


@pytest.mark.parametrize("contrast", [1.0, 1.25])
def test_capture_matches_materialised_flow(contrast):
    q, k, v, kr, vr, rm, qm = make(seed=10)
    rec = Recorder((6, 6), want_entropy=True)
    masked_extended_attention(q, k, v, kr, vr, rm, qm, HEADS, contrast=contrast, capture=rec)
    assert len(rec.calls) == 1
    flow, mass, ent, peak, used = rec.calls[0]
    assert flow.shape == (2, 48, 2) and mass.shape == ent.shape == peak.shape == (2, 48)
    assert torch.equal(used, qm)
    _, p_r = naive(q, k, v, kr, vr, rm, qm, HEADS, contrast=contrast, return_probs=True)  # [B, H, T, T_ref]
    want = reference_flow(p_r, (6, 6))
    for got, exp in ((flow, want.flow), (mass, want.mass), (ent, want.entropy), (peak, want.peak)):
        assert (got[qm].double() - exp[qm].double()).abs().max() <= 1e-5
        assert torch.equal(got[~qm], torch.zeros_like(got[~qm]))


def test_capture_flow_equals_sdpa_flow_and_attention_capture_class():
    q, k, v, kr, vr, rm, qm = make(seed=11, t=64, t_ref=48)
    cap = AttentionCapture(want_entropy=False).set_context(ref_hw=(6, 8), query_hw=(8, 8), layer="up", step=3)
    out = masked_extended_attention(q, k, v, kr, vr, rm, qm, HEADS, capture=cap)
    assert torch.allclose(out, masked_extended_attention(q, k, v, kr, vr, rm, qm, HEADS), atol=1e-6)
    rec = cap.records[0]
    assert rec.flow.shape == (2, 8, 8, 2) and rec.entropy is None and rec.layer == "up" and rec.step == 3
    ref = reference_flow_from_qk(q, kr, rm, HEADS, (6, 8), k_tgt=k)
    m = qm.view(2, 8, 8)
    assert (rec.flow[m] - ref.flow.view(2, 8, 8, 2)[m]).abs().max() <= 1e-5
    assert (rec.mass[m] - ref.mass.view(2, 8, 8)[m]).abs().max() <= 1e-5


def test_capture_on_empty_masks_records_zeros():
    q, k, v, kr, vr, rm, qm = make(seed=12)
    rec = Recorder((6, 6))
    out = masked_extended_attention(q, k, v, kr, vr, torch.zeros_like(rm), qm, HEADS, capture=rec)
    assert torch.equal(out, sdpa_plain(q, k, v, HEADS))
    flow, mass, ent, peak, used = rec.calls[0]
    assert flow.abs().max() == 0 and mass.abs().max() == 0 and ent is None and not used.any()


def test_capture_tau_uses_reference_softmax():
    q, k, v, kr, vr, rm, qm = make(seed=13)
    cap = AttentionCapture(tau=2.0)
    cap.ref_hw = (6, 6)
    cap.query_hw = (6, 8)
    masked_extended_attention(q, k, v, kr, vr, rm, qm, HEADS, capture=cap)
    ref = reference_flow_from_qk(q, kr, rm, HEADS, (6, 6), tau=2.0)
    m = qm.view(2, 48)
    assert (cap.records[0].flow.view(2, 48, 2)[m] - ref.flow[m]).abs().max() <= 1e-5
    sharp = reference_flow_from_qk(q, kr, rm, HEADS, (6, 6), tau=1.0)
    assert (sharp.flow[m] - ref.flow[m]).abs().max() > 1e-3


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda a: {**a, "heads": 3}, "divisible"),
        (lambda a: {**a, "k": a["k"][:, :-1]}, "disagree"),
        (lambda a: {**a, "k_ref": a["k_ref"][..., :-4]}, "divisible|match"),
        (lambda a: {**a, "ref_key_mask": a["ref_key_mask"][:, :-1]}, "ref_key_mask"),
        (lambda a: {**a, "query_mask": a["query_mask"][:, :-1]}, "query_mask"),
        (lambda a: {**a, "contrast": -1.0}, "contrast"),
        (lambda a: {**a, "contrast": float("nan")}, "contrast"),
        (lambda a: {**a, "q": a["q"][0]}, r"\[B, T"),
        (lambda a: {**a, "chunk_bytes": 0}, "chunk_bytes"),
    ],
)
def test_bad_input_raises(change, match):
    q, k, v, kr, vr, rm, qm = make()
    a = dict(q=q, k=k, v=v, k_ref=kr, v_ref=vr, ref_key_mask=rm, query_mask=qm, heads=HEADS)
    with pytest.raises(ValueError, match=match):
        masked_extended_attention(**change(a))


def test_capture_needs_reference_grid_for_non_square():
    q, k, v, kr, vr, rm, qm = make(t_ref=24)
    with pytest.raises(ValueError, match="ref_hw"):
        masked_extended_attention(q, k, v, kr, vr, rm, qm, HEADS, capture=Recorder(None))


def test_kernel_lse_is_used_on_cpu_when_available(implementation):
    q, k, v, *_ = make()
    qh = q.view(2, -1, HEADS, D).transpose(1, 2)
    has_op = mea.cpu_flash_op() is not None and hasattr(torch, "_fused_sdp_choice")
    used = mea.uses_kernel_lse(qh, qh, qh)
    if implementation == "portable":
        assert not used
    elif not has_op:
        pytest.skip("this torch has no CPU flash kernel with a log-sum-exp")
    else:
        assert used
        out, lse = mea.plain_with_lse(qh, qh, qh)
        want = torch.logsumexp(qh @ qh.transpose(-1, -2) / math.sqrt(D), dim=-1)
        assert (lse - want).abs().max() <= 1e-5
        assert torch.equal(out, F.scaled_dot_product_attention(qh, qh, qh))


def test_capture_before_contrast():
    q, k, v, kr, vr, rm, qm = make(seed=14)
    cap = AttentionCapture(before_contrast=True)
    cap.set_context(ref_hw=(6, 6), query_hw=(6, 8))
    masked_extended_attention(q, k, v, kr, vr, rm, qm, HEADS, contrast=1.5, capture=cap)
    _, p0 = naive(q, k, v, kr, vr, rm, qm, HEADS, contrast=1.5, return_probs=True, before_contrast=True)
    _, p1 = naive(q, k, v, kr, vr, rm, qm, HEADS, contrast=1.5, return_probs=True)
    want, after = reference_flow(p0, (6, 6)), reference_flow(p1, (6, 6))
    got = cap.records[0]
    m = qm.view(2, 6, 8)
    assert (got.flow[m] - want.flow.view(2, 6, 8, 2)[m].float()).abs().max() <= 1e-5
    assert (got.mass[m] - want.mass.view(2, 6, 8)[m].float()).abs().max() <= 1e-5
    assert (want.mass - after.mass).abs().max() > 1e-4  # the contrast did change what is described
