"""Masked Extended Attention (MaX4Zero, docs/method.md §3b) for one self-attention layer.

Target queries inside the try-on region attend over the target's own keys *and* the garment
tokens of a reference image; everything else is plain self-attention. Plain PyTorch, no ComfyUI.

Layouts (ComfyUI's ``attn1`` replace receives exactly these, before ``to_out``):

* ``q, k, v``        [B, T, heads·d]      target projections (``v`` may have its own width heads·dv)
* ``k_ref, v_ref``   [B or 1, T_ref, heads·d] / [B or 1, T_ref, heads·dv]
* ``ref_key_mask``   [B or 1, T_ref] bool, True = garment token the target may read
* ``query_mask``     [B or 1, T] bool, True = target query inside the try-on region
* result             [B, T, heads·dv]

Token order inside T and T_ref is row-major over the token grid (index = row·w + col), the order
ComfyUI's ``x.reshape(b, c, h*w).transpose`` produces.

How it is computed. Plain self-attention runs for all queries first and its result is kept, bit for
bit, outside the region; only the region queries are redone, per batch element. Masked reference
tokens are dropped from the keys (compacted), never given −10000: the same softmax as −inf, and the
result cannot depend on them. For a region query (per head) the extended softmax splits exactly into
the plain result O_t and the reference half, given lse_t, the log-sum-exp of the target logits::

    lse = logaddexp(lse_t, lse_ref),  w_t = exp(lse_t − lse),  P_ref = exp(l_ref − lse)
    out = w_t·O_t + contrast(P_ref)·V_ref[garment]

* Fast path (``contrast == 1`` and ``capture is None``):
  - when the kernel behind ``F.scaled_dot_product_attention`` returns its log-sum-exp (PyTorch's
    CPU flash kernel; checked bit-identical to the public call once per dtype), one more fused SDPA
    over only the garment keys for the region queries, merged through the two LSEs:
    cost ≈ (1 + region·garment) × plain;
  - otherwise (CUDA, autograd, ``USE_KERNEL_LSE = False``) SDPA over the compacted
    [K ; K_ref[garment]] for the gathered region queries: cost ≈ (1 + region·(1 + garment)) × plain.
* Explicit path (contrast ≠ 1): the reference half is written out in float32, in query chunks whose
  buffers plus the gathered garment keys/values stay under ``chunk_bytes`` (48 MB,
  :data:`DEFAULT_CHUNK_BYTES`) whatever the
  resolution; lse_t comes from the kernel or, without one, from a chunked log-sum-exp of the target
  logits (then the [heads, chunk, T] logits count in the budget too).

Recording (a ``capture``, the Leffa flow view) never changes the result: the output is computed by the
path that runs without it, with the same query chunks, and the reference half is described either in the
same explicit pass or, on the fast path, in a pass of its own that writes nothing. Several captures (one
per Leffa temperature τ) share the output; each gets its own description.
"""

from __future__ import annotations

import math
from typing import Callable, Dict, Optional, Protocol, Sequence, Tuple, Union, runtime_checkable

import torch
import torch.nn.functional as F

from .flow import check_tau, reference_grid
from .policy import check_contrast

__all__ = [
    "masked_extended_attention",
    "capture_list",
    "plain_attention",
    "CaptureProtocol",
    "DEFAULT_CHUNK_BYTES",
    "cpu_flash_op",
    "uses_kernel_lse",
    "plain_with_lse",
]

#: Extra working memory the explicit path allows itself per call: the float32 garment keys/values
#: plus one query chunk's buffers. 48 MB keeps the measured peak (allocator and small tensors
#: included) under the 64 MB-per-layer goal at any resolution (see bench/bench_attention.py).
DEFAULT_CHUNK_BYTES = 48 * 1024 * 1024


@runtime_checkable
class CaptureProtocol(Protocol):
    """What :func:`masked_extended_attention` expects of a ``capture`` recorder.

    :class:`max4zero.attention.flow.AttentionCapture` implements it; any object with these
    attributes works. The caller (a UNet patch) sets ``ref_hw`` (reference token grid, needed to
    build the coordinate grid) and, if known, ``query_hw`` before each layer call.

    Attributes read (``getattr`` with these defaults, so only ``ref_hw`` and ``add`` are required):

    * ``ref_hw: tuple[int, int] | None`` — reference token grid (h_ref, w_ref), h_ref·w_ref = T_ref.
      None means square.
    * ``want_entropy: bool = False`` — also compute entropy and peak (max) of the head-averaged,
      renormalised reference distribution per query.
    * ``tau: float = 1.0`` — Leffa temperature for the flow/entropy: when ≠ 1 they come from
      softmax(Q·K_refᵀ/√d/τ) over the garment keys instead of the MEA probabilities.
    * ``before_contrast: bool = False`` — describe the reference half *before* the contrast step
      (by default the probabilities actually used, i.e. after contrast).

    ``add`` receives, once per call, float32 tensors on the inputs' device:

    * ``flow``  [B, T, 2]: head-averaged Leffa flow (x, y) in [−1, 1], align_corners=True
      convention (see :mod:`max4zero.attention.flow`); 0 where undefined (query outside the
      region, no garment token, or all reference probability clipped away by the contrast).
    * ``mass``  [B, T]: head-averaged fraction of the probability on reference keys before
      renormalising (after contrast unless ``before_contrast``); 0 outside the region.
    * ``entropy``, ``peak``: [B, T] (nats; max probability) or None when not asked for.
    * ``query_mask`` [B, T] bool: which queries used extended attention.
    """

    ref_hw: Optional[Tuple[int, int]]

    def add(
        self,
        flow: torch.Tensor,
        mass: torch.Tensor,
        entropy: Optional[torch.Tensor] = None,
        peak: Optional[torch.Tensor] = None,
        query_mask: Optional[torch.Tensor] = None,
    ) -> None: ...


# --------------------------------------------------------------------------------------------
# layout helpers


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, T, heads·d] → [B, heads, T, d] (a view, like ComfyUI's attention_pytorch)."""
    b, t, c = x.shape
    return x.reshape(b, t, heads, c // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, heads, T, d] → [B, T, heads·d]."""
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain multi-head self-attention in ComfyUI's layout: [B,T,heads·d] → [B,T,heads·dv].

    Exactly ``F.scaled_dot_product_attention`` on the head-split views (the reference the tests
    compare "outside the region" queries against, bit for bit).
    """
    return _merge_heads(
        F.scaled_dot_product_attention(_split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads))
    )


# --------------------------------------------------------------------------------------------
# validation


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ref: torch.Tensor,
    v_ref: torch.Tensor,
    ref_key_mask: torch.Tensor,
    query_mask: torch.Tensor,
    heads: int,
    contrast: float,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Validate shapes; return the masks as bool tensors on q's device, batch [B or 1]."""
    if not isinstance(heads, int) or heads < 1:
        raise ValueError(f"heads must be a positive int, got {heads!r}; pass the layer's head count (extra_options['n_heads'])")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_ref", k_ref), ("v_ref", v_ref)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name} must be a [B, T, heads*d] tensor, got {shape}; pass projections before the head split")
        if t.shape[-1] % heads:
            raise ValueError(f"{name} width {t.shape[-1]} is not divisible by heads={heads}; check the head count")
    b, t = q.shape[0], q.shape[1]
    if k.shape[0] != b or v.shape[:2] != k.shape[:2] or k.shape[-1] != q.shape[-1]:
        raise ValueError(
            f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} disagree; attention needs the same B, k and v "
            "with the same T, and the same q/k width"
        )
    t_ref = k_ref.shape[1]
    if k_ref.shape[-1] != q.shape[-1] or v_ref.shape[-1] != v.shape[-1] or v_ref.shape[1] != t_ref:
        raise ValueError(
            f"k_ref {tuple(k_ref.shape)} / v_ref {tuple(v_ref.shape)} do not match the target widths "
            f"(q {q.shape[-1]}, v {v.shape[-1]}); record the reference from the same layer"
        )
    if k_ref.shape[0] != v_ref.shape[0] or k_ref.shape[0] not in (1, b):
        raise ValueError(f"reference batch must be 1 or {b}, got k_ref {k_ref.shape[0]}, v_ref {v_ref.shape[0]}")
    if t_ref < 1:
        raise ValueError("the reference has no tokens; pass at least one reference token")
    check_contrast(contrast)

    def _mask(m: torch.Tensor, name: str, length: int) -> torch.Tensor:
        if not isinstance(m, torch.Tensor):
            raise ValueError(f"{name} must be a bool tensor [B or 1, {length}], got {type(m).__name__}")
        if m.dim() == 1:
            m = m.unsqueeze(0)
        if m.dim() != 2 or m.shape[1] != length or m.shape[0] not in (1, b):
            raise ValueError(
                f"{name} must be [B or 1, {length}] (B={b}), got {tuple(m.shape)}; resize the mask to the layer's token grid"
            )
        if m.dtype != torch.bool:
            if m.is_floating_point() and torch.isnan(m).any():
                raise ValueError(f"{name} contains NaN; pass a bool mask")
            m = m > 0.5 if m.is_floating_point() else m != 0
        return m.to(q.device)

    return _mask(ref_key_mask, "ref_key_mask", t_ref), _mask(query_mask, "query_mask", t)


# --------------------------------------------------------------------------------------------
# log-sum-exp of the plain call

#: Reuse the log-sum-exp of PyTorch's fused CPU kernel (the one ``F.scaled_dot_product_attention``
#: dispatches to; checked bit-identical once per dtype) so the target half of the extended softmax
#: costs nothing extra. False forces the portable path everywhere (the tests run both).
USE_KERNEL_LSE = True
_KERNEL_LSE_CHECKED: Dict[torch.dtype, bool] = {}


def cpu_flash_op() -> Optional[Callable[..., Tuple[torch.Tensor, torch.Tensor]]]:
    """PyTorch's CPU flash-attention op, which also returns the log-sum-exp the fast path reuses; None without it."""
    try:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    except (AttributeError, RuntimeError):
        return None


def _kernel_self_check(op: Callable[..., Tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype) -> bool:
    """The private op must give the public SDPA's bits and a correct natural-log LSE."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 37, 16, generator=g).to(dtype) for _ in range(3))
    try:
        out, lse = op(q, k, v)
    except Exception:  # noqa: BLE001 - any failure means "do not use it"
        return False
    if not torch.equal(out, F.scaled_dot_product_attention(q, k, v)):
        return False
    want = torch.logsumexp(q.float() @ k.float().transpose(-1, -2) / 4.0, dim=-1)
    return tuple(lse.shape) == tuple(want.shape) and bool(((lse.float() - want).abs() < 1e-2).all())


def uses_kernel_lse(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor) -> bool:
    """Whether public SDPA would run PyTorch's CPU flash kernel here, which also returns the LSE."""
    if not USE_KERNEL_LSE or qh.device.type != "cpu":
        return False
    if torch.is_grad_enabled() and (qh.requires_grad or kh.requires_grad or vh.requires_grad):
        return False
    op = cpu_flash_op()
    choice = getattr(torch, "_fused_sdp_choice", None)
    if op is None or choice is None:
        return False
    try:
        from torch.nn.attention import SDPBackend

        if int(choice(qh, kh, vh)) != int(SDPBackend.FLASH_ATTENTION):
            return False
    except Exception:  # noqa: BLE001 - private API moved: fall back to the portable path
        return False
    ok = _KERNEL_LSE_CHECKED.get(qh.dtype)
    if ok is None:
        ok = _KERNEL_LSE_CHECKED[qh.dtype] = _kernel_self_check(op, qh.dtype)
    return ok


def plain_with_lse(qh: torch.Tensor, kh: torch.Tensor, vh: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Plain SDPA [B, H, T, dv] and, when the kernel exposes it, its log-sum-exp [B, H, T] (float32)."""
    if uses_kernel_lse(qh, kh, vh):
        op = cpu_flash_op()
        assert op is not None
        out, lse = op(qh, kh, vh)
        return out, lse.float()
    return F.scaled_dot_product_attention(qh, kh, vh), None


# --------------------------------------------------------------------------------------------
# the function


def masked_extended_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ref: torch.Tensor,
    v_ref: torch.Tensor,
    ref_key_mask: torch.Tensor,
    query_mask: torch.Tensor,
    heads: int,
    contrast: float = 1.0,
    capture: Union[None, CaptureProtocol, Sequence[CaptureProtocol]] = None,
    *,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    force_explicit: bool = False,
    ref_count: Optional[int] = None,
) -> torch.Tensor:
    """Masked Extended Attention for target queries; plain self-attention elsewhere.

    Shapes: see the module docstring. Returns [B, T, heads·dv] in q's dtype.

    For a query in the region (``query_mask``), per head with s = 1/√d::

        P = softmax([q·Kᵀ ; q·K_ref[garment]ᵀ] · s)        # non-garment reference keys: weight 0
        P_ref ← clip((P_ref − mean) · contrast + mean, 0, 1),  mean = ΣP_ref / T_ref
        out = P_tgt·V + P_ref·V_ref[garment]                 # not renormalised

    The mean runs over all T_ref reference keys (masked ones count as 0). Non-garment reference keys
    keep weight exactly 0 also after the contrast (for contrast < 1 the formula alone would give them
    mean·(1 − contrast)), so the result never depends on their keys or values. Queries outside the
    region, batch elements without garment tokens, and calls with no region query return exactly
    :func:`plain_attention` (bit for bit).

    Args:
        heads: number of attention heads (ComfyUI ``extra_options["n_heads"]``).
        contrast: attention contrast factor c (1.0 = off, paper 1.25), ≥ 0.
        capture: optional recorder (:class:`CaptureProtocol`), or a sequence of them (e.g. one per τ); the
            result is bit-identical to the one without.
        chunk_bytes: extra-memory budget of the explicit path (query chunks plus float32 copies of
            the gathered garment keys/values); at least one query row is processed per chunk.
        force_explicit: use the explicit path even when the fast path applies (tests, benchmarks).
        ref_count: the number of reference tokens T_ref the contrast mean runs over, when ``k_ref``/``v_ref``
            hold only a subset of them (a host that keeps only the garment tokens' K/V, e.g. the Flux
            adapter); default ``k_ref.shape[1]``. Must be ≥ that.

    The target keys may outnumber the queries (``k``/``v`` [B, T_k, ·] with T_k ≠ T): a host that attends a
    subset of the queries over all keys (the Flux adapter's image queries over text + image tokens), or
    whose keys carry cached extra tokens. "Plain attention" is then attention over those T_k keys.
    """
    ref_key_mask, query_mask = _check_inputs(q, k, v, k_ref, v_ref, ref_key_mask, query_mask, heads, contrast)
    if not isinstance(chunk_bytes, int) or chunk_bytes < 1:
        raise ValueError(f"chunk_bytes must be a positive int (bytes), got {chunk_bytes!r}; the default is {DEFAULT_CHUNK_BYTES}")
    if ref_count is None:
        ref_count = k_ref.shape[1]
    if isinstance(ref_count, bool) or not isinstance(ref_count, int) or ref_count < k_ref.shape[1]:
        raise ValueError(f"ref_count must be an int ≥ the {k_ref.shape[1]} reference keys given, got {ref_count!r}")
    b, t, _ = q.shape
    qh, kh, vh = _split_heads(q, heads), _split_heads(k, heads), _split_heads(v, heads)
    qm = query_mask.expand(b, -1)
    rm = ref_key_mask.expand(b, -1)
    active = qm.any(1) & rm.any(1)  # batch elements that need extended attention

    captures = capture_list(capture)
    if not bool(active.any()):
        for cap in captures:
            _capture_empty(cap, b, t, qm, q.device)
        return _merge_heads(F.scaled_dot_product_attention(qh, kh, vh))

    plain, lse = plain_with_lse(qh, kh, vh)
    # token-major [B, T, H, dv] (the CPU kernel's own layout, so usually no copy): gathering and
    # overwriting region rows touches only those rows, and it is the result's layout
    out = plain.transpose(1, 2).contiguous()
    del plain
    explicit = force_explicit or contrast != 1.0
    if not explicit and lse is None:
        _fast_concat(q, k, v, k_ref, v_ref, rm, qm, active, heads, out)
    else:
        _region_path(q, k, k_ref, v_ref, rm, qm, active, heads, out, lse, float(contrast),
                     captures[0] if (explicit and captures) else None, chunk_bytes, explicit, ref_count)
    # captures the output pass did not describe: a pass each that reads lse_t and the garment logits and
    # writes nothing, so recording can never move the result
    for cap in captures[1 if explicit else 0:]:
        _region_path(q, k, k_ref, v_ref, rm, qm, active, heads, out, lse, float(contrast), cap, chunk_bytes, True,
                     ref_count, write=False)
    return out.view(b, t, -1)


def capture_list(capture: Union[None, CaptureProtocol, Sequence[CaptureProtocol]]) -> list:
    """``capture`` as a list: [] for None, [capture] for one recorder, the recorders of a sequence."""
    if capture is None:
        return []
    if isinstance(capture, (list, tuple)):
        return [c for c in capture if c is not None]
    return [capture]


def _rows(x: torch.Tensor, idx: torch.Tensor, heads: int) -> torch.Tensor:
    """Rows ``idx`` of a token-major [T, heads·d] (or [T, H, d]) tensor as a [H, n, d] view.

    Gathering along the token axis copies only the selected rows (index_select on the head-split
    view would first make the whole tensor contiguous).
    """
    sel = x.index_select(0, idx)
    return sel.reshape(idx.numel(), heads, -1).transpose(0, 1)


# --------------------------------------------------------------------------------------------
# fast path without a log-sum-exp: SDPA over the concatenated, compacted keys


def _fast_concat(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ref: torch.Tensor,
    v_ref: torch.Tensor,
    rm: torch.Tensor,
    qm: torch.Tensor,
    active: torch.Tensor,
    heads: int,
    out: torch.Tensor,
) -> None:
    """SDPA over [K ; K_ref[garment]] for the gathered region queries, written into ``out`` [B,T,H,dv].

    Batch elements with different garment/region counts are handled by a loop over the batch,
    not by padding with an additive −inf mask: a float mask forces SDPA onto its masked kernels
    (slower, and no flash kernel on GPU), while B is small (1–4) in diffusion sampling. When every
    active element has the same counts (the usual cond/uncond copies of one image), one batched
    call does all of them.
    """
    nq = qm.sum(1)
    nk = rm.sum(1)
    idx = active.nonzero().flatten().tolist()
    same = all(int(nq[i]) == int(nq[idx[0]]) and int(nk[i]) == int(nk[idx[0]]) for i in idx)
    groups = [idx] if same else [[i] for i in idx]
    for g in groups:
        q_idx = [qm[i].nonzero().flatten() for i in g]
        k_idx = [rm[i].nonzero().flatten() for i in g]
        rb = [0 if k_ref.shape[0] == 1 else i for i in g]
        q_sel = torch.stack([_rows(q[i], qi, heads) for i, qi in zip(g, q_idx)])
        # the target's own keys/values are the head-split views; only the garment rows are gathered
        k_ext = torch.stack(
            [torch.cat([k[i].reshape(k.shape[1], heads, -1).transpose(0, 1), _rows(k_ref[r], ki, heads)], 1)
             for i, r, ki in zip(g, rb, k_idx)]
        )
        v_ext = torch.stack(
            [torch.cat([v[i].reshape(v.shape[1], heads, -1).transpose(0, 1), _rows(v_ref[r], ki, heads)], 1)
             for i, r, ki in zip(g, rb, k_idx)]
        )
        o = F.scaled_dot_product_attention(q_sel, k_ext, v_ext)  # [G, H, n_q, dv]
        for j, (i, qi) in enumerate(zip(g, q_idx)):
            out[i].index_copy_(0, qi, o[j].transpose(0, 1))


# --------------------------------------------------------------------------------------------
# region path: target half from the plain result, reference half separately


def _resolve_ref_hw(capture: CaptureProtocol, t_ref: int) -> Tuple[int, int]:
    ref_hw = getattr(capture, "ref_hw", None)
    if ref_hw is None:
        side = int(round(math.sqrt(t_ref)))
        if side * side != t_ref:
            raise ValueError(
                f"capture.ref_hw is not set and T_ref={t_ref} is not a square; set capture.ref_hw = (h_ref, w_ref)"
            )
        return side, side
    h, w = int(ref_hw[0]), int(ref_hw[1])
    if h * w != t_ref:
        raise ValueError(f"capture.ref_hw={tuple(ref_hw)} gives {h * w} tokens but T_ref={t_ref}; set it per layer call")
    return h, w


def _capture_empty(capture: CaptureProtocol, b: int, t: int, qm: torch.Tensor, device: torch.device) -> None:
    want = bool(getattr(capture, "want_entropy", False))
    z = torch.zeros(b, t, device=device)
    capture.add(
        torch.zeros(b, t, 2, device=device),
        z,
        entropy=z.clone() if want else None,
        peak=z.clone() if want else None,
        query_mask=torch.zeros_like(qm),
    )


def _softmax_tau(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """softmax(logits / τ) over the last axis in one new buffer (Leffa's temperature)."""
    r = logits / tau
    r.sub_(r.amax(-1, keepdim=True)).exp_()
    return r.div_(r.sum(-1, keepdim=True))


def _capture_chunk(
    p: torch.Tensor,
    r_tau: Optional[torch.Tensor],
    g_r: torch.Tensor,
    bi: int,
    rows: torch.Tensor,
    cap_flow: torch.Tensor,
    cap_mass: torch.Tensor,
    cap_ent: Optional[torch.Tensor],
    cap_peak: Optional[torch.Tensor],
) -> None:
    """Reduce one chunk's reference probabilities p [H, c, n_k] (overwritten) to flow/mass/entropy.

    Head average of the renormalised rows; a head whose reference half the contrast clipped to
    nothing has no direction and is left out. With a τ softmax ``r_tau`` the direction comes from it.
    """
    row_mass = p.sum(-1)  # [H, c]
    if r_tau is None:
        n_valid = (row_mass > 0).sum(0).clamp_min(1).unsqueeze(-1)
        a = p.div_(row_mass.clamp_min(torch.finfo(p.dtype).tiny).unsqueeze(-1)).sum(0).div_(n_valid)
    else:
        a = r_tau.mean(0)
    cap_flow[bi, rows] = a @ g_r
    cap_mass[bi, rows] = row_mass.mean(0)
    if cap_ent is not None and cap_peak is not None:
        cap_ent[bi, rows] = -torch.xlogy(a, a).sum(-1)
        cap_peak[bi, rows] = a.amax(-1)


def _region_path(
    q: torch.Tensor,
    k: torch.Tensor,
    k_ref: torch.Tensor,
    v_ref: torch.Tensor,
    rm: torch.Tensor,
    qm: torch.Tensor,
    active: torch.Tensor,
    heads: int,
    out: torch.Tensor,
    lse: Optional[torch.Tensor],
    contrast: float,
    capture: Optional[CaptureProtocol],
    chunk_bytes: int,
    explicit: bool,
    ref_count: Optional[int] = None,
    write: bool = True,
) -> None:
    """Redo the region queries of ``out`` [B, T, H, dv] (holding the plain result) in place.

    ``write=False`` (explicit only): describe the reference half to ``capture`` and leave ``out`` as it is.

    Per head and region query, with lse_t the log-sum-exp of the target logits, the extended
    softmax splits exactly into the plain result O_t and the reference half::

        lse = logaddexp(lse_t, lse_ref),  w_t = exp(lse_t − lse),  P_ref = exp(l_ref − lse)
        out = w_t·O_t + contrast(P_ref)·V_ref

    lse_t comes from the kernel (``lse`` [B, H, T]) or, without one, from a chunked log-sum-exp
    here. Without contrast or capture (``explicit`` False, kernel LSE present) the reference half is
    one more fused SDPA over the garment keys, merged through its own LSE.
    """
    b, t, c_in = q.shape
    h = heads
    d = c_in // h
    dv = out.shape[-1]
    t_ref = k_ref.shape[1] if ref_count is None else int(ref_count)  # the contrast mean's denominator
    t_k = k.shape[1]
    dev = q.device
    scale = 1.0 / math.sqrt(d)
    f32 = torch.float32

    want_cap = capture is not None
    want_ent = want_cap and bool(getattr(capture, "want_entropy", False))
    tau = float(getattr(capture, "tau", 1.0)) if want_cap else 1.0
    before = bool(getattr(capture, "before_contrast", False)) if want_cap else False
    if want_cap:
        check_tau(tau, "capture.tau")
        grid = reference_grid(_resolve_ref_hw(capture, k_ref.shape[1]), dev)
        cap_flow = torch.zeros(b, t, 2, device=dev, dtype=f32)
        cap_mass = torch.zeros(b, t, device=dev, dtype=f32)
        cap_ent = torch.zeros(b, t, device=dev, dtype=f32) if want_ent else None
        cap_peak = torch.zeros(b, t, device=dev, dtype=f32) if want_ent else None

    for bi in active.nonzero().flatten().tolist():
        qi = qm[bi].nonzero().flatten()
        ki = rm[bi].nonzero().flatten()
        n_k = ki.numel()
        rb = 0 if k_ref.shape[0] == 1 else bi
        out_b = out[bi]  # [T, H, dv] view: region rows are overwritten in place

        if not explicit:
            op = cpu_flash_op()
            assert lse is not None and op is not None
            # head-major contiguous copies of the gathered rows: the CPU kernel runs markedly
            # faster on them than on the token-major views (measured 0.32 vs 0.55 ms at 16² tokens)
            q_r, k_r, v_r = (_rows(x, i, h).contiguous()[None] for x, i in ((q[bi], qi), (k_ref[rb], ki), (v_ref[rb], ki)))
            o_r, lse_r = op(q_r, k_r, v_r)
            del q_r, k_r, v_r
            # weight of the target half = Z_t / (Z_t + Z_ref), per head and query → [n_q, H, 1]
            w_t = torch.sigmoid(lse[bi].index_select(1, qi) - lse_r[0].float()).t().unsqueeze(-1)
            o_r = o_r[0].transpose(0, 1).float()  # [n_q, H, dv]
            o = o_r.add_(out_b.index_select(0, qi).float().sub_(o_r).mul_(w_t))
            out_b.index_copy_(0, qi, o.to(out.dtype))
            continue

        # garment keys/values in float32, gathered token-major (only those rows are copied) and used
        # through head-split views [H, n_k, d]: the batched matmuls take the strides as they are
        k_r32 = _rows(k_ref[rb], ki, h).to(f32)
        v_r32 = _rows(v_ref[rb], ki, h).to(f32)
        g_r = grid.index_select(0, ki) if want_cap else None
        k_t32 = k[bi].reshape(t_k, h, d).transpose(0, 1).to(f32) if lse is None else None
        fixed = (k_r32.numel() + v_r32.numel()) * 4
        if k_t32 is not None and k.dtype != f32:
            fixed += k_t32.numel() * 4
        # per query row: one [H, n_k] float32 buffer for the reference half, the row's q/O_t/out in float32,
        # and without a kernel LSE the target logits. A capture's temporaries (a τ softmax, a pre-contrast
        # copy) come on top: the chunks must be the ones a run without a capture uses, or recording would
        # move the result by float rounding.
        per_row = h * n_k * 4 + h * (d + 3 * dv) * 4
        if lse is None:
            per_row += h * t_k * 4
        budget = max(chunk_bytes - fixed, chunk_bytes // 4)
        c = max(1, min(qi.numel(), budget // per_row))
        for s in range(0, qi.numel(), c):
            rows = qi[s : s + c]
            qc = _rows(q[bi], rows, h).to(f32).mul_(scale)  # [H, c, d]
            if lse is None:
                lt = torch.matmul(qc, k_t32.transpose(1, 2))  # [H, c, T]
                m_t = lt.amax(-1, keepdim=True)
                lse_t = lt.sub_(m_t).exp_().sum(-1).log_().add_(m_t.squeeze(-1))
                del lt
            else:
                lse_t = lse[bi].index_select(1, rows)
            lr = torch.matmul(qc, k_r32.transpose(1, 2))  # [H, c, n_k] logits of the garment keys
            r_tau = _softmax_tau(lr, tau) if (want_cap and tau != 1.0) else None
            # log-sum-exp of the reference half and P_ref = exp(l_ref − lse), all in lr's buffer
            m = lr.amax(-1, keepdim=True)
            lr.sub_(m).exp_()
            lse_all = torch.logaddexp(lse_t, m.squeeze(-1) + lr.sum(-1).log())
            w_t = torch.exp(lse_t - lse_all).unsqueeze(-1)
            lr.mul_(torch.exp(m - lse_all.unsqueeze(-1)))  # P_ref
            p_before = lr.clone() if (want_cap and before and contrast != 1.0) else None
            if contrast != 1.0:
                mean = lr.sum(-1, keepdim=True) / t_ref
                lr.sub_(mean).mul_(contrast).add_(mean).clamp_(0.0, 1.0)
            if write:
                o_t = out_b.index_select(0, rows).transpose(0, 1).to(f32)  # [H, c, dv]
                o = torch.baddbmm(o_t.mul_(w_t), lr, v_r32)
                out_b.index_copy_(0, rows, o.transpose(0, 1).to(out.dtype))
                del o, o_t
            if want_cap:
                _capture_chunk(
                    p_before if p_before is not None else lr, r_tau, g_r, bi, rows,
                    cap_flow, cap_mass, cap_ent, cap_peak,
                )
            # free this chunk's buffers before the next chunk allocates its own (rebinding
            # would keep two alive at the peak)
            del lr, p_before, r_tau
    if want_cap:
        capture.add(cap_flow, cap_mass, entropy=cap_ent, peak=cap_peak, query_mask=qm & active[:, None])
