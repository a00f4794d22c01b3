"""Masked Extended Attention on Flux-family DiTs (docs/method.md §3c): the host-independent part.

A Flux transformer attends jointly over ``[text tokens ; image tokens]`` in every double and single
block. MEA there means (same method as the UNet, ``attention/masked_extended.py`` does the maths):

* image queries inside the try-on region attend over every key the block attends over (text + image,
  and whatever else a host appended, e.g. cached reference-latent tokens) **plus** the garment tokens
  of the reference (K/V recorded in a reference pass at the same step), with the contrast step on the
  reference half;
* text queries and image queries outside the region never see a reference key: their output is the
  block's own attention, bit for bit.

What is policy and lives here (plain PyTorch, no host import):

* the token grid of a packed latent from the model's own patch size (FLUX.1: 2×2 latent cells per token =
  16×16 px with its 8× VAE; FLUX.2: 1×1 cell of its 16× latent = 16×16 px): :func:`flux_token_grid`,
  :func:`patch_level`; masks at that grid are :func:`~.policy.token_mask` at it;
* which blocks carry MEA: :data:`FLUX_BLOCK_CHOICES`, :func:`parse_flux_blocks` (default
  :data:`DEFAULT_FLUX_BLOCKS`: :func:`vital_blocks` of the model's family — Stable Flow's "vital layers" on
  FLUX.1, the same relative depths on FLUX.2; untuned for try-on on real weights);
* where the reference tokens sit for RoPE: :func:`reference_rope_index` (the model's own way of placing a
  reference latent: Kontext's index 1 for FLUX.1's ``offset``, FLUX.2's ``index`` method one
  ``ref_index_scale`` step after the call's own reference latents), :func:`reference_token_ids`;
* :func:`joint_extended_attention`: the region's image queries redone over [all keys ; garment keys],
  written into the block's own attention output.

Layouts (ComfyUI's Flux attention): ``q, k, v`` [B, heads, L, d] with RoPE applied, L = text + image
tokens (+ extra keys for k, v); the block's attention output ``base`` [B, L_q, heads·d].
"""

from __future__ import annotations

import re
from typing import Optional, Sequence, Union

import torch

from .masked_extended import CaptureProtocol, capture_list, masked_extended_attention

__all__ = [
    "FLUX_PATCH",
    "FLUX_LEVEL",
    "REFERENCE_ROPE_INDEX",
    "DIT_FAMILIES",
    "patch_level",
    "reference_rope_index",
    "vital_blocks",
    "FLUX_VITAL_GLOBAL",
    "key_keep_from_bias",
    "FLUX_VITAL_DOUBLE",
    "FLUX_VITAL_SINGLE",
    "FLUX_BLOCK_CHOICES",
    "DEFAULT_FLUX_BLOCKS",
    "flux_token_grid",
    "parse_flux_blocks",
    "reference_token_ids",
    "joint_extended_attention",
]

#: A FLUX.1 image token packs a 2×2 patch of latent cells (16×16 px with the 8× VAE). Only FLUX.1's; every
#: grid is computed from the model's own ``patch_size`` (FLUX.2 packs 1×1 cells of its 16× latent).
FLUX_PATCH = 2
#: FLUX.1's token grid is the latent grid halved once (⌈n/2⌉), i.e. grid level 1 of ``policy.grid_level``
#: (:func:`patch_level` of its patch size).
FLUX_LEVEL = 1
#: The DiT families the adapters know (ComfyUI's ``unet_config["image_model"]``); any other is refused.
DIT_FAMILIES = ("flux", "flux2", "qwen_image")
#: Stable Flow's vital layers of FLUX.1-dev in its global numbering (19 double then 38 single blocks, 0 … 56), for a
#: family whose blocks are all joint (double-stream) blocks: the same relative depths of one stack.
FLUX_VITAL_GLOBAL = (0, 1, 17, 18, 25, 28, 53, 54, 56)
#: First RoPE axis of the reference tokens. Flux Kontext places a reference latent at index 1 on its own
#: grid (``Flux._forward``, ``ref_latents_method = "offset"``); MEA's reference tokens sit there too.
REFERENCE_ROPE_INDEX = 1

#: Stable Flow (Avrahami et al., CVPR 2025) "vital layers" of FLUX.1-dev: the blocks whose removal changes
#: the image most, where it injects the reference's attention features. Global numbering 0, 1, 17, 18
#: (double blocks) and 25, 28, 53, 54, 56 (single blocks 6, 9, 34, 35, 37).
FLUX_VITAL_DOUBLE = (0, 1, 17, 18)
FLUX_VITAL_SINGLE = (6, 9, 34, 35, 37)

#: Named choices of the MEA node's ``flux_blocks`` input (a custom list is also accepted, see
#: :func:`parse_flux_blocks`).
FLUX_BLOCK_CHOICES = ("vital", "double", "single", "all")
DEFAULT_FLUX_BLOCKS = "vital"

_TOKEN = re.compile(r"^([ds])(\d+)(?:-(?:[ds])?(\d+))?$")


def flux_token_grid(latent_hw: Sequence[int], patch: int) -> tuple[int, int]:
    """Token grid ``(h, w)`` of a latent ``(H, W)`` packed in ``patch``×``patch`` cells per token: ComfyUI pads
    to the patch size, so ⌈H/p⌉ × ⌈W/p⌉. ``patch`` is the model's own (no default: FLUX.1 2, FLUX.2 1).

    >>> flux_token_grid((128, 128), 2), flux_token_grid((13, 20), 2), flux_token_grid((13, 20), 1)
    ((64, 64), (7, 10), (13, 20))
    """
    h, w = (int(s) for s in latent_hw[-2:])
    if h < 1 or w < 1:
        raise ValueError(f"latent size must be positive, got {h}x{w}")
    patch = int(patch)
    if patch < 1:
        raise ValueError(f"patch size must be positive, got {patch}")
    return -(-h // patch), -(-w // patch)


def patch_level(patch: int) -> int:
    """The grid level (``policy.grid_level``: halvings of the latent grid) of tokens that pack ``patch``×``patch``
    latent cells, for the mask checks shared with the UNet adapter. A patch size that is not a power of two has no
    level (refused: the checks would look at the wrong grid).

    >>> patch_level(1), patch_level(2), patch_level(4)
    (0, 1, 2)
    """
    patch = int(patch)
    if patch < 1 or patch & (patch - 1):
        raise ValueError(f"a DiT patch size of {patch} is not a power of two: its token grid is no grid level")
    return patch.bit_length() - 1


def reference_rope_index(method: str, index_scale: float = 1.0, n_refs: int = 0) -> float:
    """First RoPE axis of MEA's garment keys, placed as the model places a reference latent of its own.

    ``method`` is the call's ``ref_latents_method`` (the model's ``default_ref_method`` when the call gives none):

    * ``"offset"`` (FLUX.1 Kontext, FLUX.1's default): index 1 (:data:`REFERENCE_ROPE_INDEX`), as before;
    * ``"index"`` / ``"index_timestep_zero"`` (FLUX.2's default): the k-th reference latent sits at k ×
      ``index_scale`` (FLUX.2: 10); the garment goes one step after the call's own ``n_refs`` reference latents
      (``ReferenceLatent``), so it never shares an index with one of them: ``(n_refs + 1) × index_scale``.

    Any other method (``"uxo"``: references beside the target at index 0) is refused: it has no index step.

    >>> reference_rope_index("offset"), reference_rope_index("index", 10.0), reference_rope_index("index", 10.0, 2)
    (1.0, 10.0, 30.0)
    """
    if method == "offset":
        return float(REFERENCE_ROPE_INDEX)
    if method in ("index", "index_timestep_zero"):
        if not index_scale > 0:
            raise ValueError(f"ref_index_scale must be positive for the '{method}' method, got {index_scale}")
        return float(index_scale) * (int(n_refs) + 1)
    raise ValueError(f"the reference latent method {method!r} places references beside the target, not at a "
                     "RoPE index: MEA cannot place the garment there; use 'offset' or 'index'")


def vital_blocks(family: str, n_double: int, n_single: int) -> frozenset:
    """The ``vital`` choice of a model family at its depth, as ``{("double", i), ("single", j)}``.

    * ``"flux"`` (FLUX.1): Stable Flow's vital layers (:data:`FLUX_VITAL_DOUBLE`, :data:`FLUX_VITAL_SINGLE`), the
      indices that exist in this model (unchanged from before FLUX.2 was supported);
    * ``"flux2"``: no vital layers are published for FLUX.2; the same *relative* depths on its stacks
      (index i of FLUX.1's 19 double blocks → round(i / 18 · (n_double − 1)), single j of 38 → round(j / 37 ·
      (n_single − 1))): first and last double blocks, early and late single blocks. An analogy, untuned;
    * ``"qwen_image"`` (one stack of joint blocks, 60 in Qwen-Image): FLUX.1's vital layers in its global
      numbering (:data:`FLUX_VITAL_GLOBAL`, 57 blocks) at the same relative depths of that stack
      (60 blocks: 0, 1, 18, 19, 26, 30, 56, 57, 59). An analogy, untuned.

    >>> sorted(vital_blocks("flux2", 8, 48))
    [('double', 0), ('double', 7), ('single', 8), ('single', 11), ('single', 43), ('single', 44), ('single', 47)]
    """
    if family == "flux":
        return frozenset({("double", i) for i in FLUX_VITAL_DOUBLE if i < n_double}
                         | {("single", i) for i in FLUX_VITAL_SINGLE if i < n_single})
    rel = lambda idx, src, n: {round(i / (src - 1) * (n - 1)) for i in idx} if n > 0 else set()  # noqa: E731
    if family == "flux2":
        return frozenset({("double", i) for i in rel(FLUX_VITAL_DOUBLE, 19, n_double)}
                         | {("single", i) for i in rel(FLUX_VITAL_SINGLE, 38, n_single)})
    if family == "qwen_image" and n_single == 0:
        return frozenset({("double", i) for i in rel(FLUX_VITAL_GLOBAL, 57, n_double)})
    raise ValueError(f"no 'vital' blocks are known for the {family!r} family: pick 'double', 'single', 'all' or a list")


def parse_flux_blocks(spec: str, n_double: int, n_single: int, family: str = "flux") -> frozenset:
    """The blocks a ``flux_blocks`` text selects, as ``{("double", i), ("single", j), …}``.

    Comma-separated items, each one of: ``vital`` (:func:`vital_blocks` of the model's ``family`` at its depth),
    ``double`` (every double block), ``single`` (every single block), ``all``, ``d<i>`` / ``s<j>`` (one
    double / single block, 0-based) or a range ``d<i>-<k>`` / ``s<i>-<k>`` (inclusive).

    Raises:
        ValueError: an item that is none of these, a block this model does not have, or nothing selected.

    >>> sorted(parse_flux_blocks("d0, s1-2", 2, 3))
    [('double', 0), ('single', 1), ('single', 2)]
    >>> sorted(parse_flux_blocks("vital", 2, 2))
    [('double', 0), ('double', 1)]
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("flux_blocks is empty: give 'vital', 'double', 'single', 'all' or a list like 'd0-18, s6'")
    out: set = set()
    for raw in spec.split(","):
        item = raw.strip().lower()
        if not item:
            continue
        if item == "vital":
            out |= vital_blocks(family, n_double, n_single)
            continue
        if item in ("double", "all"):
            out |= {("double", i) for i in range(n_double)}
        if item in ("single", "all"):
            out |= {("single", i) for i in range(n_single)}
        if item in ("double", "single", "all"):
            continue
        m = _TOKEN.match(item.replace(" ", ""))
        if m is None:
            raise ValueError(f"flux_blocks item {raw.strip()!r} is not 'vital', 'double', 'single', 'all', "
                             "'d<i>', 's<i>' or a range like 'd0-18'")
        kind = "double" if m.group(1) == "d" else "single"
        n = n_double if kind == "double" else n_single
        lo = int(m.group(2))
        hi = int(m.group(3)) if m.group(3) is not None else lo
        if hi < lo or hi >= n:
            raise ValueError(f"flux_blocks item {raw.strip()!r}: this model has {n} {kind} blocks (0 to {n - 1})")
        out |= {(kind, i) for i in range(lo, hi + 1)}
    if not out:
        raise ValueError(f"flux_blocks {spec!r} selects no block of this model ({n_double} double, {n_single} single "
                         "blocks): pick 'double', 'single', 'all' or a list")
    return frozenset(out)


def reference_token_ids(hw: Sequence[int], n_axes: int = 3, index: float = REFERENCE_ROPE_INDEX,
                        centred: bool = False) -> torch.Tensor:
    """RoPE position ids ``[1, h·w, n_axes]`` of the reference's tokens (row-major).

    Axis 0 = ``index``, axis 1 = row, axis 2 = column on the reference's own token grid (further axes 0):
    what ``Flux.process_img(ref, index=1)`` gives a Kontext reference latent. Relative to a target token
    (index 0, its row, its column) a reference key is one step away on the first axis and at its own
    2-D offset, so the reference reads as "another image", not as the target's own tokens at the same
    place.

    >>> reference_token_ids((2, 2))[0].tolist()
    [[1.0, 0.0, 0.0], [1.0, 0.0, 1.0], [1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    """
    h, w = int(hw[0]), int(hw[1])
    if n_axes < 3:
        raise ValueError(f"Flux position ids have at least 3 axes, got {n_axes}")
    ids = torch.zeros(h, w, n_axes, dtype=torch.float32)
    ids[..., 0] = float(index)
    ids[..., 1] = torch.arange(h, dtype=torch.float32)[:, None] - (h // 2 if centred else 0)
    ids[..., 2] = torch.arange(w, dtype=torch.float32)[None, :] - (w // 2 if centred else 0)
    return ids.reshape(1, h * w, n_axes)


def key_keep_from_bias(bias: torch.Tensor, n_keys: int) -> torch.Tensor:
    """The keys an additive attention mask lets through, bool ``[B, n_keys]``, from ``bias`` [B, n_keys],
    [B, 1, n_keys] or [B, 1, 1, n_keys] (Qwen-Image's text padding: 0 = attend, −finfo.max = padding).

    A key whose bias is below −1e4 gets weight exactly 0 after the softmax in float32 and bfloat16, so dropping it
    is the same attention; any other bias must be 0 (a soft mask cannot be dropped: refused, the region rows
    would silently ignore it).

    >>> key_keep_from_bias(torch.tensor([[0.0, -3e38, 0.0]]), 3).tolist()
    [[True, False, True]]
    """
    b = bias.reshape(bias.shape[0], -1)
    if b.shape[-1] != n_keys:
        raise ValueError(f"the attention mask covers {b.shape[-1]} keys but the block attends over {n_keys}")
    keep = b > -1e4
    if bool((b[keep] != 0).any()):
        raise ValueError("the attention mask is not a padding mask (0 or a large negative bias per key): Masked "
                         "Extended Attention cannot recompute the region's rows with a soft mask")
    return keep


def joint_extended_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_ref: torch.Tensor,
    v_ref: torch.Tensor,
    region: torch.Tensor,
    img_start: int,
    base: torch.Tensor,
    contrast: float = 1.0,
    ref_count: Optional[int] = None,
    *,
    capture: Union[None, CaptureProtocol, Sequence[CaptureProtocol]] = None,
    ref_positions: Optional[torch.Tensor] = None,
    key_keep: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The block's attention output with the region's image queries redone as Masked Extended Attention.

    Args:
        q: [B, H, L_q, d] queries (RoPE applied), text first, the image from ``img_start``.
        k, v: [B, H, L_k, d] / [B, H, L_k, dv] every key/value the block attends over (L_k ≥ L_q allowed).
        k_ref, v_ref: [1 or B, H, G, d] / [.., dv] the reference's garment tokens only (RoPE applied at the
            reference positions).
        region: bool [1 or B, N] the try-on region over the target's N image tokens (row-major grid).
        img_start: index of the first target image token in the query sequence.
        base: [B, L_q, H·dv] the block's own attention output (kept bit for bit outside the region).
        contrast: the contrast on the reference half (1.25 paper, 1 = off).
        ref_count: all reference tokens (garment or not), the contrast mean's denominator; default G.
        capture: optional recorder (:class:`~.masked_extended.CaptureProtocol`, e.g. the trace's
            :class:`~.flow.AttentionCapture` with ``query_hw`` = the target's token grid and ``ref_hw`` = the
            reference's). The core records the flow/mass/entropy of the region's queries (its explicit path,
            in query chunks: never the heads × queries × keys map); they are written back onto the target's
            image grid ([B, N], 0 and ``query_mask`` False outside the region) and handed to ``capture.add``
            once per call. A sequence of recorders (one per τ) gets one description each; recording never
            changes the result.
        ref_positions: with a capture: long [G], where each garment key sits on the reference's token grid
            (row-major, increasing), so the flow points at reference coordinates. The garment keys are then
            laid out on the full reference grid (``ref_count`` = h_ref·w_ref tokens) with the other tokens
            masked out, which the core drops before the softmax: the same numbers as without the capture.
        key_keep: optional bool [1 or B, L_k]: the block's keys its own attention mask lets through
            (:func:`key_keep_from_bias`); the region's queries attend over those (plus the garment keys) only.

    Returns:
        A new [B, L_q, H·dv] tensor: ``base`` with the region rows replaced. ``base`` itself is untouched.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4 or k_ref.dim() != 4 or v_ref.dim() != 4:
        raise ValueError("q, k, v, k_ref, v_ref must be [B, heads, L, d] tensors (ComfyUI's Flux attention layout)")
    b, heads, lq, d = q.shape
    if base.shape[:2] != (b, lq):
        raise ValueError(f"base {tuple(base.shape)} is not the [B, L_q, heads*dv] output of q {tuple(q.shape)}")
    n_img = region.shape[-1]
    if img_start < 0 or img_start + n_img > lq:
        raise ValueError(f"{n_img} image tokens from {img_start} do not fit the {lq} queries")
    out = base.clone()
    g = k_ref.shape[2]
    reg = region.expand(b, -1) if region.shape[0] == 1 else region
    to_flat = lambda x: x.transpose(1, 2).reshape(x.shape[0], x.shape[2], -1)  # noqa: E731  [B,H,L,d] → [B,L,H·d]
    recs = [_GridRecorder(c, b, n_img, q.device) for c in capture_list(capture)]
    rec = recs[0] if recs else None
    if any(r.t_ref != rec.t_ref for r in recs):
        raise ValueError("the captures of one call must share the reference grid (ref_hw)")
    key_mask = None
    if rec is not None and g:
        if ref_positions is None or ref_positions.numel() != g:
            raise ValueError(f"a capture needs ref_positions: where each of the {g} garment keys sits on the "
                             "reference's token grid")
        t_ref = rec.t_ref
        if ref_count is not None and int(ref_count) != t_ref:
            raise ValueError(f"capture.ref_hw has {t_ref} tokens but ref_count is {ref_count}")
        pos = ref_positions.to(q.device).long()
        key_mask = torch.zeros(1, t_ref, dtype=torch.bool, device=q.device)
        key_mask[0, pos] = True
        ref_count = t_ref
    for bi in range(b if g else 0):
        idx = reg[bi].nonzero().flatten()
        if idx.numel() == 0:
            continue
        qi = idx.to(q.device) + int(img_start)
        rb = 0 if k_ref.shape[0] == 1 else bi
        q_b = to_flat(q[bi : bi + 1].index_select(2, qi))
        k_b, v_b = to_flat(k[bi : bi + 1]), to_flat(v[bi : bi + 1])
        if key_keep is not None:  # the block's own mask: its masked keys have weight 0, so they are dropped
            kk = key_keep[0 if key_keep.shape[0] == 1 else bi].nonzero().flatten().to(k.device)
            k_b, v_b = k_b.index_select(1, kk), v_b.index_select(1, kk)
        kr, vr = to_flat(k_ref[rb : rb + 1]), to_flat(v_ref[rb : rb + 1])
        ones_q = torch.ones(1, qi.numel(), dtype=torch.bool, device=q.device)
        if key_mask is None:
            ones_k = torch.ones(1, g, dtype=torch.bool, device=q.device)
        else:  # the garment keys at their places on the full reference grid, the rest masked out (dropped)
            ones_k = key_mask
            kr = kr.new_zeros(1, rec.t_ref, kr.shape[-1]).index_copy_(1, pos, kr)
            vr = vr.new_zeros(1, rec.t_ref, vr.shape[-1]).index_copy_(1, pos, vr)
        mea = masked_extended_attention(q_b, k_b, v_b, kr, vr, ones_k, ones_q, heads, contrast,
                                        [r.row(bi, idx) for r in recs], ref_count=ref_count)
        out[bi].index_copy_(0, qi, mea[0].to(out.dtype))
    for r in recs:
        r.flush()
    return out


class _GridRecorder:
    """Collects the core's per-row captures (region queries only) onto the target's image grid [B, N] and
    hands them to the real capture once, as the UNet path's one ``add`` per layer call."""

    def __init__(self, capture: CaptureProtocol, b: int, n_img: int, device: torch.device) -> None:
        ref_hw = getattr(capture, "ref_hw", None)
        if ref_hw is None:
            raise ValueError("set capture.ref_hw to the reference's token grid before a Flux block call")
        self.capture = capture
        self.t_ref = int(ref_hw[0]) * int(ref_hw[1])
        self.want = bool(getattr(capture, "want_entropy", False))
        f32 = torch.float32
        self.flow = torch.zeros(b, n_img, 2, device=device, dtype=f32)
        self.mass = torch.zeros(b, n_img, device=device, dtype=f32)
        self.entropy = torch.zeros(b, n_img, device=device, dtype=f32) if self.want else None
        self.peak = torch.zeros(b, n_img, device=device, dtype=f32) if self.want else None
        self.query_mask = torch.zeros(b, n_img, dtype=torch.bool, device=device)

    def row(self, bi: int, idx: torch.Tensor) -> "_RowCapture":
        return _RowCapture(self, bi, idx.to(self.flow.device))

    def flush(self) -> None:
        self.capture.add(self.flow, self.mass, entropy=self.entropy, peak=self.peak, query_mask=self.query_mask)


class _RowCapture:
    """The capture the core sees for one batch row's gathered region queries (same options as the real one)."""

    def __init__(self, grid: _GridRecorder, bi: int, idx: torch.Tensor) -> None:
        cap = grid.capture
        self.grid, self.bi, self.idx = grid, bi, idx
        self.ref_hw = tuple(cap.ref_hw)
        self.want_entropy = grid.want
        self.tau = float(getattr(cap, "tau", 1.0))
        self.before_contrast = bool(getattr(cap, "before_contrast", False))

    def add(self, flow: torch.Tensor, mass: torch.Tensor, entropy: Optional[torch.Tensor] = None,
            peak: Optional[torch.Tensor] = None, query_mask: Optional[torch.Tensor] = None) -> None:
        g, bi, idx = self.grid, self.bi, self.idx
        g.flow[bi].index_copy_(0, idx, flow[0].float())
        g.mass[bi].index_copy_(0, idx, mass[0].float())
        if g.entropy is not None and entropy is not None:
            g.entropy[bi].index_copy_(0, idx, entropy[0].float())
        if g.peak is not None and peak is not None:
            g.peak[bi].index_copy_(0, idx, peak[0].float())
        qm = torch.ones_like(idx, dtype=torch.bool) if query_mask is None else query_mask[0].bool()
        g.query_mask[bi].index_copy_(0, idx, qm)
