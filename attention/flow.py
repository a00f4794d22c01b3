"""Leffa attention flow fields (docs/method.md §4): where each target token reads from in the reference.

Coordinate convention (used by every function here and by the MEA capture):

* A flow is an *absolute* sampling position in the reference, (x, y) order, normalised to [−1, 1].
* ``align_corners=True``: the centre of the first token/pixel is −1 and of the last is +1, i.e. token
  (row i, col j) of an h×w grid sits at (−1 + 2j/(w−1), −1 + 2i/(h−1)); top-left (−1, −1). A grid
  of size 1 along an axis sits at −1.
* Token order is row-major (index = row·w + col); flows are stored [..., T, 2] or [..., h, w, 2].
* Upsampling a token flow to pixels is bilinear with ``align_corners=True`` and warping uses
  ``grid_sample(..., align_corners=True)``, so the identity grid warps a reference onto itself and a
  token-level flow means "the same relative position" at any resolution.
* Pixel maps (MLS ``backward_map``) give pixel-centre coordinates 0..W−1; ``x_n = 2x/(W−1) − 1``.

Per layer, the flow is F = Â·C with Â the head-averaged, per-query renormalised reference attention
and C the coordinate grid. :func:`reference_flow` works on materialised probabilities (small layers,
tests); :func:`reference_flow_from_qk` never materialises the attention map (SDPA with the
coordinates as values). :class:`AttentionCapture` records per-layer results during sampling (the
``capture`` of :func:`max4zero.attention.masked_extended.masked_extended_attention`) and
:class:`FlowAccumulator` averages them over layers/steps on a common grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from ..tensors.shapes import as_hw

__all__ = [
    "FlowStats",
    "FlowRecord",
    "AttentionCapture",
    "FlowAccumulator",
    "reference_grid",
    "identity_flow",
    "reference_flow",
    "reference_flow_from_logits",
    "reference_flow_from_qk",
    "select_records",
    "accumulate_records",
    "resize_flow",
    "flow_to_color",
    "warp_by_flow",
    "end_point_error",
    "pixel_map_to_flow",
    "flow_to_pixel_map",
]

HW = Tuple[int, int]


class FlowStats(NamedTuple):
    """Per-query reduction of the reference attention. Fields are None when not computed.

    flow [..., T, 2] (or [..., h, w, 2]), mass/entropy/peak [..., T] (or [..., h, w]).
    """

    flow: torch.Tensor
    mass: Optional[torch.Tensor] = None
    entropy: Optional[torch.Tensor] = None
    peak: Optional[torch.Tensor] = None


# --------------------------------------------------------------------------------------------
# grids


def _axis(n: int, device: Any, dtype: torch.dtype) -> torch.Tensor:
    if n == 1:
        return torch.full((1,), -1.0, device=device, dtype=dtype)
    return torch.linspace(-1.0, 1.0, n, device=device, dtype=dtype)


def check_tau(tau: Any, name: str = "tau") -> float:
    """The Leffa temperature τ as a float; raises unless it is a finite number > 0 (1 = off, Leffa trains with 2).

    >>> check_tau(2)
    2.0
    """
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"{name} must be a finite number > 0 (1 = off, Leffa 2), got {tau!r}")
    return float(tau)


def reference_grid(
    ref_hw: Union[int, Sequence[int]], device: Any = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Token centres of an h×w grid: [h·w, 2] (x, y), row-major, align_corners=True in [−1, 1]."""
    h, w = as_hw(ref_hw, "ref_hw")
    gy, gx = torch.meshgrid(_axis(h, device, dtype), _axis(w, device, dtype), indexing="ij")
    return torch.stack([gx, gy], dim=-1).reshape(h * w, 2)


def identity_flow(hw: Union[int, Sequence[int]], device: Any = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The flow that reads every position from the same position: [h, w, 2]."""
    h, w = as_hw(hw)
    return reference_grid((h, w), device, dtype).view(h, w, 2)


def _square_hw(t: int, name: str) -> HW:
    side = int(round(math.sqrt(t)))
    if side * side != t:
        raise ValueError(f"{name} is not given and {t} tokens are not a square grid; pass {name}=(h, w)")
    return side, side


# --------------------------------------------------------------------------------------------
# flow from attention


def _reduce(
    r: torch.Tensor, valid: Optional[torch.Tensor], coords: torch.Tensor, head_axis: Optional[int], want_entropy: bool
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Head-average renormalised rows r [..., H, T, n] → flow, entropy, peak.

    ``valid`` [..., H, T] marks heads that have a distribution; the others are left out of the mean.
    """
    if head_axis is None:
        a = r
    elif valid is None:
        a = r.mean(head_axis)
    else:
        a = (r * valid.unsqueeze(-1)).sum(head_axis) / valid.sum(head_axis).clamp_min(1).unsqueeze(-1)
    flow = a @ coords
    if not want_entropy:
        return flow, None, None
    return flow, -torch.xlogy(a, a).sum(-1), a.amax(-1)


def _norm_head_axis(head_axis: Optional[int], ndim: int) -> Optional[int]:
    if head_axis is None:
        return None
    ax = head_axis if head_axis >= 0 else ndim + head_axis
    if not 0 <= ax < ndim - 2:
        raise ValueError(
            f"head_axis={head_axis} must point before the last two (query, key) axes of a {ndim}-d tensor; "
            "use head_axis=None for input without a head axis"
        )
    return ax


def reference_flow(
    probs_ref: torch.Tensor,
    ref_hw: Optional[Union[int, Sequence[int]]] = None,
    *,
    head_axis: Optional[int] = -3,
    want_entropy: bool = True,
) -> FlowStats:
    """Leffa flow from materialised reference-half probabilities.

    Args:
        probs_ref: [..., H, T, T_ref] reference half of the attention probabilities (rows sum to the
            mass on the reference, ≤ 1; masked keys hold 0). ``head_axis=None``: [..., T, T_ref].
        ref_hw: reference token grid (h, w) with h·w = T_ref (None: square).
    Returns:
        :class:`FlowStats` — flow [..., T, 2] (head average of the per-head renormalised rows times
        the grid), mass [..., T] (head-averaged row sum before renormalising), entropy [..., T]
        (nats) and peak [..., T] (max) of the head-averaged renormalised distribution. A head with
        zero mass has no direction and is left out of the averages; a query whose heads all have
        zero mass gets flow 0.
    """
    if probs_ref.dim() < 2:
        raise ValueError(f"probs_ref must be [..., T, T_ref], got {tuple(probs_ref.shape)}")
    t_ref = probs_ref.shape[-1]
    hw = _square_hw(t_ref, "ref_hw") if ref_hw is None else as_hw(ref_hw, "ref_hw")
    if hw[0] * hw[1] != t_ref:
        raise ValueError(f"ref_hw={hw} has {hw[0] * hw[1]} tokens but probs_ref has T_ref={t_ref}")
    ax = _norm_head_axis(head_axis, probs_ref.dim())
    p = probs_ref.float()
    s = p.sum(-1)
    r = p / s.clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    mass = s if ax is None else s.mean(ax)
    coords = reference_grid(hw, p.device)
    flow, ent, peak = _reduce(r, s > 0, coords, ax, want_entropy)
    return FlowStats(flow, mass, ent, peak)


def reference_flow_from_logits(
    logits_ref: torch.Tensor,
    ref_hw: Optional[Union[int, Sequence[int]]] = None,
    *,
    tau: float = 1.0,
    key_mask: Optional[torch.Tensor] = None,
    logits_tgt: Optional[torch.Tensor] = None,
    head_axis: Optional[int] = -3,
    want_entropy: bool = True,
) -> FlowStats:
    """Leffa flow with temperature: Â = head-mean of softmax(logits_ref / τ) over garment keys.

    Args:
        logits_ref: [..., H, T, T_ref] scaled logits q·k_refᵀ/√d (``head_axis=None``: no head axis).
        tau: temperature τ > 0 (Leffa trains with 2); affects flow/entropy/peak only.
        key_mask: [T_ref], [*batch, T_ref] or full-rank broadcastable bool, True = garment key.
        logits_tgt: [..., H, T, T] target-half logits; when given, mass = share of softmax over
            [target ; garment reference] at τ = 1 (what the model uses), else mass is None.
    """
    check_tau(tau)
    t_ref = logits_ref.shape[-1]
    hw = _square_hw(t_ref, "ref_hw") if ref_hw is None else as_hw(ref_hw, "ref_hw")
    if hw[0] * hw[1] != t_ref:
        raise ValueError(f"ref_hw={hw} has {hw[0] * hw[1]} tokens but logits_ref has T_ref={t_ref}")
    ax = _norm_head_axis(head_axis, logits_ref.dim())
    lr = logits_ref.float()
    if key_mask is not None:
        km = key_mask.to(device=lr.device)
        km = km > 0.5 if km.is_floating_point() else km.bool()
        # [T_ref] or [*batch, T_ref] (batch = the axes before heads/queries): insert the missing
        # head and query axes; a full-rank mask is used as given
        lead = lr.dim() - (3 if ax is not None else 2)
        if km.shape[-1] != t_ref or km.dim() not in (1, lead + 1, lr.dim()):
            raise ValueError(
                f"key_mask {tuple(key_mask.shape)} must be [T_ref], [*batch, T_ref] or broadcastable to "
                f"{tuple(lr.shape)} with T_ref={t_ref}"
            )
        if km.dim() != lr.dim():
            km = km.reshape(*km.shape[:-1], *([1] * (lr.dim() - km.dim())), t_ref)
        lr = lr.masked_fill(~km, float("-inf"))
    has_key = torch.isfinite(lr).any(-1)  # rows with at least one garment key
    r = torch.softmax(lr / tau, dim=-1).nan_to_num(0.0)
    coords = reference_grid(hw, lr.device)
    flow, ent, peak = _reduce(r, has_key, coords, ax, want_entropy)
    mass = None
    if logits_tgt is not None:
        both = torch.cat([logits_tgt.float(), lr], dim=-1)
        m = torch.softmax(both, dim=-1)[..., logits_tgt.shape[-1] :].sum(-1)
        mass = m if ax is None else m.mean(ax)
    return FlowStats(flow, mass, ent, peak)


def reference_flow_from_qk(
    q: torch.Tensor,
    k_ref: torch.Tensor,
    ref_key_mask: Optional[torch.Tensor],
    heads: int,
    ref_hw: Optional[Union[int, Sequence[int]]] = None,
    *,
    tau: float = 1.0,
    k_tgt: Optional[torch.Tensor] = None,
) -> FlowStats:
    """Leffa flow without materialising the attention map (SDPA with coordinates as values).

    The renormalised reference attention times the grid is exactly SDPA over the garment reference
    keys with the (x, y) coordinates as values, at scale 1/(√d·τ); heads are averaged afterwards.
    The row mass is SDPA over [K_tgt ; K_ref[garment]] (scale 1/√d, i.e. τ = 1, what the model
    uses) with value 1 on reference keys and 0 on target keys. Values are zero-padded to the head
    width so SDPA can keep its fused kernel (a narrower value falls back to the materialising one).

    Args:
        q: [B, T, heads·d] target queries; k_ref: [B or 1, T_ref, heads·d];
        ref_key_mask: [B or 1, T_ref] bool (None = all reference keys).
        k_tgt: [B, T, heads·d] target keys; mass is None when not given.
    Returns:
        FlowStats(flow [B, T, 2], mass [B, T] or None, None, None). Batch elements without garment
        keys get flow 0 and mass 0.
    """
    check_tau(tau)
    if q.dim() != 3 or k_ref.dim() != 3 or q.shape[-1] != k_ref.shape[-1] or q.shape[-1] % heads:
        raise ValueError(
            f"q {tuple(q.shape)} and k_ref {tuple(k_ref.shape)} must be [B, T, heads*d] with the same width divisible by heads={heads}"
        )
    b, t, c = q.shape
    t_ref = k_ref.shape[1]
    if k_ref.shape[0] not in (1, b):
        raise ValueError(f"k_ref batch must be 1 or {b}, got {k_ref.shape[0]}")
    hw = _square_hw(t_ref, "ref_hw") if ref_hw is None else as_hw(ref_hw, "ref_hw")
    if hw[0] * hw[1] != t_ref:
        raise ValueError(f"ref_hw={hw} has {hw[0] * hw[1]} tokens but T_ref={t_ref}")
    if ref_key_mask is None:
        ref_key_mask = torch.ones(1, t_ref, dtype=torch.bool, device=q.device)
    rm = ref_key_mask.to(q.device)
    if rm.dim() == 1:
        rm = rm.unsqueeze(0)
    if rm.shape[-1] != t_ref or rm.shape[0] not in (1, b):
        raise ValueError(f"ref_key_mask must be [B or 1, {t_ref}], got {tuple(ref_key_mask.shape)}")
    rm = (rm > 0.5 if rm.is_floating_point() else rm.bool()).expand(b, -1)
    if k_tgt is not None and k_tgt.shape != q.shape:
        raise ValueError(f"k_tgt must have q's shape {tuple(q.shape)}, got {tuple(k_tgt.shape)}")

    d = c // heads
    scale = 1.0 / math.sqrt(d)
    qh = q.view(b, t, heads, d).transpose(1, 2)
    krh = k_ref.view(k_ref.shape[0], t_ref, heads, d).transpose(1, 2)
    coords = reference_grid(hw, q.device, q.dtype)
    flow = torch.zeros(b, t, 2, device=q.device, dtype=torch.float32)
    mass = torch.zeros(b, t, device=q.device, dtype=torch.float32) if k_tgt is not None else None
    for bi in range(b):
        ki = rm[bi].nonzero().flatten()
        if ki.numel() == 0:
            continue
        kr = krh[0 if krh.shape[0] == 1 else bi].index_select(1, ki).unsqueeze(0)  # [1, H, n, d]
        vals = q.new_zeros(1, heads, ki.numel(), d)
        vals[..., :2] = coords.index_select(0, ki)
        f = F.scaled_dot_product_attention(qh[bi : bi + 1], kr, vals, scale=scale / tau)
        flow[bi] = f[0, :, :, :2].float().mean(0)
        if k_tgt is not None:
            kt = k_tgt[bi : bi + 1].view(1, t, heads, d).transpose(1, 2)
            ones = q.new_zeros(1, heads, t + ki.numel(), d)
            ones[:, :, t:, 0] = 1.0
            m = F.scaled_dot_product_attention(qh[bi : bi + 1], torch.cat([kt, kr], dim=2), ones, scale=scale)
            mass[bi] = m[0, :, :, 0].float().mean(0)
    return FlowStats(flow, mass, None, None)


# --------------------------------------------------------------------------------------------
# recording during sampling


@dataclass
class FlowRecord:
    """One layer call's reduced reference attention, on a token grid (float32, ``store_device``).

    flow [B, h, w, 2]; mass/entropy/peak [B, h, w]; query_mask [B, h, w] bool (queries that used
    extended attention). ``layer``/``step``/``sigma`` are whatever the caller set on the capture.
    """

    flow: torch.Tensor
    mass: torch.Tensor
    entropy: Optional[torch.Tensor]
    peak: Optional[torch.Tensor]
    query_mask: Optional[torch.Tensor]
    query_hw: HW
    ref_hw: Optional[HW]
    layer: Any = None
    step: Optional[int] = None
    sigma: Optional[float] = None


class AttentionCapture:
    """Recorder for :func:`masked_extended_attention`'s ``capture`` argument.

    The UNet patch sets the context before each layer call (``set_context`` or the attributes):

    * ``ref_hw`` (required unless T_ref is square), ``query_hw`` (required unless T is square),
    * ``layer`` (any label, e.g. ``("output", 7)``), ``step`` (int) and ``sigma`` (float), stored
      with the record for later selection.

    Options: ``want_entropy`` (also entropy and peak; costs nothing extra on the explicit path),
    ``tau`` (Leffa temperature for flow/entropy), ``before_contrast`` (describe the reference half
    before the contrast step), ``store_device`` (records are moved there, default CPU, as float32),
    ``max_records`` (oldest records are dropped beyond it).

    The patch may call :meth:`wanted` with the current context to skip capturing layers the filters
    (``grids``, ``steps``, ``sigmas``, ``layers``) exclude; ``add`` itself records everything.
    """

    def __init__(
        self,
        *,
        want_entropy: bool = False,
        tau: float = 1.0,
        before_contrast: bool = False,
        store_device: Any = "cpu",
        max_records: Optional[int] = None,
        grids: Optional[Iterable[Union[int, Sequence[int]]]] = None,
        steps: Optional[Tuple[Optional[int], Optional[int]]] = None,
        sigmas: Optional[Tuple[Optional[float], Optional[float]]] = None,
        layers: Optional[Union[Iterable[Any], Callable[[Any], bool]]] = None,
    ) -> None:
        check_tau(tau)
        self.want_entropy = bool(want_entropy)
        self.tau = float(tau)
        self.before_contrast = bool(before_contrast)
        self.store_device = store_device
        self.max_records = max_records
        self.filters = dict(grids=grids, steps=steps, sigmas=sigmas, layers=layers)
        self.ref_hw: Optional[HW] = None
        self.query_hw: Optional[HW] = None
        self.layer: Any = None
        self.step: Optional[int] = None
        self.sigma: Optional[float] = None
        self.records: List[FlowRecord] = []

    def set_context(self, **context: Any) -> "AttentionCapture":
        """Set any of ref_hw, query_hw, layer, step, sigma for the next ``add`` calls."""
        for key, value in context.items():
            if key not in ("ref_hw", "query_hw", "layer", "step", "sigma"):
                raise ValueError(f"unknown capture context {key!r}; use ref_hw, query_hw, layer, step or sigma")
            if key in ("ref_hw", "query_hw") and value is not None:
                value = as_hw(value, key)
            setattr(self, key, value)
        return self

    def wanted(self) -> bool:
        """Whether the current context passes the filters given at construction."""
        probe = FlowRecord(
            flow=torch.empty(0), mass=torch.empty(0), entropy=None, peak=None, query_mask=None,
            query_hw=self.query_hw or (0, 0), ref_hw=self.ref_hw, layer=self.layer, step=self.step, sigma=self.sigma,
        )
        return bool(select_records([probe], **self.filters))

    def add(
        self,
        flow: torch.Tensor,
        mass: torch.Tensor,
        entropy: Optional[torch.Tensor] = None,
        peak: Optional[torch.Tensor] = None,
        query_mask: Optional[torch.Tensor] = None,
    ) -> None:
        """Store one layer call: flow [B, T, 2], mass [B, T], entropy/peak/query_mask [B, T]."""
        if flow.dim() != 3 or flow.shape[-1] != 2 or mass.shape != flow.shape[:2]:
            raise ValueError(f"add() needs flow [B, T, 2] and mass [B, T], got {tuple(flow.shape)} and {tuple(mass.shape)}")
        b, t, _ = flow.shape
        hw = self.query_hw if self.query_hw is not None else _square_hw(t, "capture.query_hw")
        if hw[0] * hw[1] != t:
            raise ValueError(f"capture.query_hw={hw} has {hw[0] * hw[1]} tokens but the layer has T={t}; set it per layer call")

        def keep(x: Optional[torch.Tensor], tail: Tuple[int, ...] = ()) -> Optional[torch.Tensor]:
            if x is None:
                return None
            x = x.detach().to(self.store_device)
            x = x if x.dtype == torch.bool else x.float()
            return x.reshape(b, hw[0], hw[1], *tail)

        self.records.append(
            FlowRecord(
                flow=keep(flow, (2,)), mass=keep(mass), entropy=keep(entropy), peak=keep(peak),
                query_mask=keep(query_mask), query_hw=hw, ref_hw=self.ref_hw,
                layer=self.layer, step=self.step, sigma=None if self.sigma is None else float(self.sigma),
            )
        )
        if self.max_records is not None and len(self.records) > self.max_records:
            del self.records[: len(self.records) - self.max_records]

    def clear(self) -> None:
        self.records.clear()

    def __len__(self) -> int:
        return len(self.records)

    def accumulate(self, size: Optional[Union[int, Sequence[int]]] = None, *, mass_weighted: bool = False, **select: Any) -> FlowStats:
        """Average the records (``select_records`` keywords select them) on a common grid.

        See :func:`accumulate_records`.
        """
        return accumulate_records(self.records, size, mass_weighted=mass_weighted, **select)


def select_records(
    records: Iterable[FlowRecord],
    *,
    grids: Optional[Iterable[Union[int, Sequence[int]]]] = None,
    steps: Optional[Tuple[Optional[int], Optional[int]]] = None,
    sigmas: Optional[Tuple[Optional[float], Optional[float]]] = None,
    layers: Optional[Union[Iterable[Any], Callable[[Any], bool]]] = None,
) -> List[FlowRecord]:
    """Records whose query grid is in ``grids`` (ints mean square), step in [lo, hi], sigma in
    [lo, hi] (bounds inclusive, None = open; records without step/sigma fail a given range), and
    layer in ``layers`` (a collection, or a predicate)."""
    grid_set = None if grids is None else {as_hw(g, "grids entry") for g in grids}
    layer_ok: Optional[Callable[[Any], bool]]
    if layers is None:
        layer_ok = None
    elif callable(layers):
        layer_ok = layers
    else:
        allowed = list(layers)
        layer_ok = lambda name: name in allowed  # noqa: E731

    def in_range(x: Optional[float], rng: Optional[Tuple[Optional[float], Optional[float]]]) -> bool:
        if rng is None:
            return True
        if x is None:
            return False
        lo, hi = rng
        return (lo is None or x >= lo) and (hi is None or x <= hi)

    return [
        r
        for r in records
        if (grid_set is None or tuple(r.query_hw) in grid_set)
        and in_range(r.step, steps)
        and in_range(r.sigma, sigmas)
        and (layer_ok is None or layer_ok(r.layer))
    ]


# --------------------------------------------------------------------------------------------
# accumulation


def _resize_grid(x: torch.Tensor, size: HW) -> torch.Tensor:
    """[B, h, w, C] → [B, H, W, C], bilinear, align_corners=True (the flow convention)."""
    if tuple(x.shape[1:3]) == tuple(size):
        return x
    y = F.interpolate(x.permute(0, 3, 1, 2), size=size, mode="bilinear", align_corners=True)
    return y.permute(0, 2, 3, 1)


def resize_flow(flow: torch.Tensor, size: Union[int, Sequence[int]]) -> torch.Tensor:
    """Bilinear resize of a flow [h, w, 2] / [B, h, w, 2] (or a scalar map [B, h, w]) to ``size``.

    Values are absolute normalised positions, so they are interpolated, not rescaled.
    """
    size = as_hw(size, "size")
    if flow.dim() == 3 and flow.shape[-1] == 2:
        return _resize_grid(flow.unsqueeze(0), size)[0]
    if flow.dim() == 4 and flow.shape[-1] == 2:
        return _resize_grid(flow, size)
    if flow.dim() == 3:
        return _resize_grid(flow.unsqueeze(-1), size)[..., 0]
    if flow.dim() == 2:
        return _resize_grid(flow[None, :, :, None], size)[0, ..., 0]
    raise ValueError(f"resize_flow takes [h, w, 2], [B, h, w, 2], [B, h, w] or [h, w], got {tuple(flow.shape)}")


class FlowAccumulator:
    """Running weighted mean of flows/masses/entropies from different token grids on one grid.

    Each update is upsampled (bilinear, align_corners=True) to ``size``. With ``mass_weighted``
    the flow mean is weighted by weight·mass per pixel (layers that barely read the reference count
    less); mass and entropy are always plain weighted means. Entropy/peak are averaged over the
    updates that carry them.
    """

    def __init__(self, size: Union[int, Sequence[int]], *, mass_weighted: bool = False) -> None:
        self.size = as_hw(size, "size")
        self.mass_weighted = mass_weighted
        self._flow: Optional[torch.Tensor] = None
        self._flow_w: Optional[torch.Tensor] = None
        self._mass: Optional[torch.Tensor] = None
        self._ent: Optional[torch.Tensor] = None
        self._peak: Optional[torch.Tensor] = None
        self._w = 0.0
        self._w_ent = 0.0
        self._w_peak = 0.0
        self.count = 0

    def update(
        self,
        flow: torch.Tensor,
        mass: torch.Tensor,
        entropy: Optional[torch.Tensor] = None,
        peak: Optional[torch.Tensor] = None,
        *,
        weight: float = 1.0,
    ) -> None:
        """Add flow [B, h, w, 2] with mass [B, h, w] (and entropy/peak [B, h, w]) at ``weight``."""
        if flow.dim() != 4 or flow.shape[-1] != 2 or mass.shape != flow.shape[:3]:
            raise ValueError(f"update() needs flow [B, h, w, 2] and mass [B, h, w], got {tuple(flow.shape)}, {tuple(mass.shape)}")
        if weight < 0 or not math.isfinite(weight):
            raise ValueError(f"weight must be finite and ≥ 0, got {weight}")
        if weight == 0:
            return
        f = _resize_grid(flow.float(), self.size)
        m = _resize_grid(mass.float().unsqueeze(-1), self.size)[..., 0]
        if self._flow is not None and f.shape[0] != self._flow.shape[0]:
            raise ValueError(f"batch size changed from {self._flow.shape[0]} to {f.shape[0]}; accumulate one batch layout at a time")
        fw = weight * m if self.mass_weighted else torch.full_like(m, weight)
        if self._flow is None:
            self._flow = torch.zeros_like(f)
            self._flow_w = torch.zeros_like(m)
            self._mass = torch.zeros_like(m)
        self._flow += f * fw.unsqueeze(-1)
        self._flow_w += fw
        self._mass += weight * m
        self._w += weight
        if entropy is not None:
            e = _resize_grid(entropy.float().unsqueeze(-1), self.size)[..., 0]
            self._ent = weight * e if self._ent is None else self._ent + weight * e
            self._w_ent += weight
        if peak is not None:
            p = _resize_grid(peak.float().unsqueeze(-1), self.size)[..., 0]
            self._peak = weight * p if self._peak is None else self._peak + weight * p
            self._w_peak += weight
        self.count += 1

    def update_record(self, record: FlowRecord, weight: float = 1.0) -> None:
        self.update(record.flow, record.mass, record.entropy, record.peak, weight=weight)

    def result(self) -> FlowStats:
        """FlowStats(flow [B, H, W, 2], mass [B, H, W], entropy or None, peak or None).

        Pixels with zero total flow weight (mass-weighted and never read) get flow 0.
        """
        if self._flow is None:
            raise ValueError("nothing accumulated: no layer call was recorded/selected; check the capture filters")
        flow = self._flow / self._flow_w.clamp_min(1e-12).unsqueeze(-1)
        mass = self._mass / self._w
        ent = None if self._ent is None else self._ent / self._w_ent
        peak = None if self._peak is None else self._peak / self._w_peak
        return FlowStats(flow, mass, ent, peak)


def accumulate_records(
    records: Iterable[FlowRecord],
    size: Optional[Union[int, Sequence[int]]] = None,
    *,
    mass_weighted: bool = False,
    weight: Optional[Callable[[FlowRecord], float]] = None,
    **select: Any,
) -> FlowStats:
    """Mean over the selected records on grid ``size`` (default: the finest selected grid).

    ``select`` takes :func:`select_records`' keywords (grids, steps, sigmas, layers); ``weight``
    maps a record to its weight (default 1).
    """
    chosen = select_records(records, **select)
    if not chosen:
        raise ValueError("no recorded layer call matches the selection; widen grids/steps/sigmas/layers")
    if size is None:
        size = max((r.query_hw for r in chosen), key=lambda hw: hw[0] * hw[1])
    acc = FlowAccumulator(size, mass_weighted=mass_weighted)
    for r in chosen:
        acc.update_record(r, 1.0 if weight is None else float(weight(r)))
    return acc.result()


# --------------------------------------------------------------------------------------------
# visualisation and comparison


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """h in [0, 1), s, v in [0, 1] → [..., 3]."""
    k = torch.tensor([5.0, 3.0, 1.0], device=h.device, dtype=h.dtype)
    kk = (k + h.unsqueeze(-1) * 6.0) % 6.0
    part = torch.clamp(torch.minimum(kk, 4.0 - kk), 0.0, 1.0)
    return v.unsqueeze(-1) - (v * s).unsqueeze(-1) * part


def flow_to_color(
    flow: torch.Tensor,
    mode: str = "absolute",
    *,
    max_magnitude: Optional[float] = None,
    brightness: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Colour-wheel picture of a flow [H, W, 2] or [B, H, W, 2] → [H, W, 3] / [B, H, W, 3] in 0..1.

    Hue = direction atan2(y, x) of the vector (image axes: x right, y down; red = +x), saturation =
    length / ``max_magnitude`` clipped to 1, value = ``brightness`` (e.g. the row mass) or 1.

    * ``mode="absolute"``: the vector is the sampling position itself, from the reference centre
      (white = reads the centre; default scale √2, the corner distance).
    * ``mode="displacement"``: the vector is flow − identity grid (where it reads from relative to
      where it is; white = reads its own position); default scale: the largest length in each image.
    """
    if flow.dim() not in (3, 4) or flow.shape[-1] != 2:
        raise ValueError(f"flow must be [H, W, 2] or [B, H, W, 2], got {tuple(flow.shape)}")
    f = flow.float()
    if mode == "displacement":
        f = f - identity_flow(f.shape[-3:-1], f.device)
        scale = max_magnitude
    elif mode == "absolute":
        scale = math.sqrt(2.0) if max_magnitude is None else max_magnitude
    else:
        raise ValueError(f"mode must be 'absolute' or 'displacement', got {mode!r}")
    mag = torch.linalg.vector_norm(f, dim=-1)
    if scale is None:
        top = mag.flatten(-2).amax(-1).clamp_min(1e-12)
        sat = mag / top[..., None, None]
    else:
        if not scale > 0:
            raise ValueError(f"max_magnitude must be > 0, got {max_magnitude}")
        sat = mag / scale
    hue = (torch.atan2(f[..., 1], f[..., 0]) / (2 * math.pi)) % 1.0
    val = torch.ones_like(mag) if brightness is None else brightness.float().clamp(0.0, 1.0).expand_as(mag)
    return _hsv_to_rgb(hue, sat.clamp(0.0, 1.0), val).clamp(0.0, 1.0)


def warp_by_flow(
    reference_image: torch.Tensor,
    flow: torch.Tensor,
    size: Optional[Union[int, Sequence[int]]] = None,
    *,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Attention-warped reference: sample ``reference_image`` where the flow points.

    Args:
        reference_image: [B, C, Hr, Wr] or [C, Hr, Wr] (any float dtype; ComfyUI IMAGE is
            [B, H, W, C] — permute first).
        flow: [B, h, w, 2] or [h, w, 2] (batch 1 broadcasts), e.g. at token resolution.
        size: output (H, W); default the reference size.
    Returns:
        [B, C, H, W] (or [C, H, W]): the flow upsampled bilinearly (align_corners=True) to the output
        size, then ``grid_sample(..., align_corners=True)`` — the identity flow returns the reference.
    """
    squeeze = reference_image.dim() == 3
    img = reference_image.unsqueeze(0) if squeeze else reference_image
    if img.dim() != 4:
        raise ValueError(f"reference_image must be [B, C, H, W] or [C, H, W], got {tuple(reference_image.shape)}")
    fl = flow.unsqueeze(0) if flow.dim() == 3 else flow
    if fl.dim() != 4 or fl.shape[-1] != 2:
        raise ValueError(f"flow must be [B, h, w, 2] or [h, w, 2], got {tuple(flow.shape)}")
    if fl.shape[0] not in (1, img.shape[0]) and img.shape[0] != 1:
        raise ValueError(f"flow batch {fl.shape[0]} does not match the image batch {img.shape[0]}")
    out_hw = tuple(img.shape[-2:]) if size is None else as_hw(size, "size")
    grid = _resize_grid(fl.float(), out_hw)
    bsz = max(img.shape[0], grid.shape[0])
    img = img.expand(bsz, -1, -1, -1)
    grid = grid.expand(bsz, -1, -1, -1)
    dtype = img.dtype if img.is_floating_point() else torch.float32
    out = F.grid_sample(img.to(dtype), grid.to(dtype), mode=mode, padding_mode=padding_mode, align_corners=True)
    return out[0] if squeeze and bsz == 1 else out


def end_point_error(
    flow_a: torch.Tensor,
    flow_b: torch.Tensor,
    *,
    size: Optional[Union[int, Sequence[int]]] = None,
    pixel_size: Optional[Union[int, Sequence[int]]] = None,
) -> torch.Tensor:
    """Per-pixel end-point error |flow_a − flow_b|: [H, W] or [B, H, W].

    Flows [.., h, w, 2] in the normalised convention; different grids are resized bilinearly to
    ``size`` (default: the finer of the two). ``pixel_size=(H_ref, W_ref)`` reports the error in
    reference pixels instead of normalised units (Δx·(W−1)/2, Δy·(H−1)/2).
    """
    for name, f in (("flow_a", flow_a), ("flow_b", flow_b)):
        if f.dim() not in (3, 4) or f.shape[-1] != 2:
            raise ValueError(f"{name} must be [H, W, 2] or [B, H, W, 2], got {tuple(f.shape)}")
    a = flow_a.float().unsqueeze(0) if flow_a.dim() == 3 else flow_a.float()
    b = flow_b.float().unsqueeze(0) if flow_b.dim() == 3 else flow_b.float()
    if size is None:
        size = max(tuple(a.shape[1:3]), tuple(b.shape[1:3]), key=lambda hw: hw[0] * hw[1])
    size = as_hw(size, "size")
    d = _resize_grid(a, size) - _resize_grid(b, size)
    if pixel_size is not None:
        ph, pw = as_hw(pixel_size, "pixel_size")
        d = d * torch.tensor([(pw - 1) / 2.0, (ph - 1) / 2.0], device=d.device)
    e = torch.linalg.vector_norm(d, dim=-1)
    return e[0] if flow_a.dim() == 3 and flow_b.dim() == 3 else e


def pixel_map_to_flow(pixel_map: torch.Tensor, ref_size: Union[int, Sequence[int]]) -> torch.Tensor:
    """Convert a backward map in reference pixel coordinates (x, y), pixel centres 0..W−1 (e.g.
    ``warping.mls.backward_map`` [H, W, 2]) to the normalised flow convention: x_n = 2x/(W_ref−1) − 1.

    ``ref_size`` = (H_ref, W_ref) of the reference image the map samples. Works on [..., 2].
    """
    h, w = as_hw(ref_size, "ref_size")
    if pixel_map.shape[-1] != 2:
        raise ValueError(f"pixel_map must end in (x, y), got {tuple(pixel_map.shape)}")
    den = torch.tensor([max(w - 1, 1), max(h - 1, 1)], device=pixel_map.device, dtype=torch.float32)
    return pixel_map.float() * (2.0 / den) - 1.0


def flow_to_pixel_map(flow: torch.Tensor, ref_size: Union[int, Sequence[int]]) -> torch.Tensor:
    """Inverse of :func:`pixel_map_to_flow`: normalised (x, y) → reference pixel coordinates."""
    h, w = as_hw(ref_size, "ref_size")
    den = torch.tensor([max(w - 1, 1), max(h - 1, 1)], device=flow.device, dtype=torch.float32)
    return (flow.float() + 1.0) * (den / 2.0)
