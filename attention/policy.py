"""Method policy of Masked Extended Attention, for any host (docs/method.md §3b).

Everything here decides *what* MEA does, never *how* a host calls it: which self-attention layers carry
it (by token grid, so one choice fits SD1.5, SD2 and SDXL), which model passes and batch rows carry it,
the guidance step, the schedule window and the masks at token level. Host adapters — the ComfyUI model
patch (``nodes/mea_patch.py``), the diffusers processor (``adapters/diffusers_processor.py``) and the flow
view — call these functions; none keeps a copy. Plain PyTorch, no host import.

Layouts: a token grid is ``(h, w)``, tokens row-major; masks are ``[B, H, W]`` at any resolution
(> 0.5 = on) and become bool ``[B, h·w]`` at a grid (nearest neighbour). ``cond_or_uncond`` lists the
chunks of a batched model call in order, 0 = positive, 1 = negative (ComfyUI's convention).
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..tensors.masks import resize_to_grid
from ..tensors.shapes import halved

__all__ = [
    "GUIDANCE_MODES",
    "LayerSelection",
    "LAYER_CHOICES",
    "DEFAULT_LAYERS",
    "FLOW_LAYER_CHOICES",
    "grid_level",
    "token_grid",
    "token_mask",
    "check_contrast",
    "in_window",
    "mea_rows",
    "rows_with_mea",
    "row_mask_index",
    "paper_guidance",
    "guidance_base",
    "guided",
    "nearest_step",
    "check_reference_every",
    "reuse_reference",
    "NO_OP_CAUSES",
    "no_op_cause",
    "keeps_negative_pass_at_cfg1",
]

#: paper: three branches (the normal passes without MEA, one extra positive pass with it);
#: fused: MEA inside the normal positive pass (ComfyUI's own CFG).
GUIDANCE_MODES = ("paper", "fused")


# --------------------------------------------------------------------------------------------
# layers


@dataclass(frozen=True)
class LayerSelection:
    """Which self-attention layers get MEA: UNet parts × token-grid levels.

    ``levels`` count halvings of the latent grid: 0 = the latent grid itself (1/8 of the image for an
    8× VAE), 1 = latent/2 (1/16 of the image), 2 = latent/4 (1/32), …

    >>> LAYER_CHOICES[DEFAULT_LAYERS].selects("output", 1), LAYER_CHOICES[DEFAULT_LAYERS].selects("input", 1)
    (True, False)
    """

    parts: frozenset
    levels: frozenset

    def selects(self, part: str, level: int) -> bool:
        return part in self.parts and level in self.levels


#: Choices offered by the MEA node (label → selection). The first is the paper's (docs/method.md §3b).
LAYER_CHOICES: dict[str, LayerSelection] = {
    "decoder 1/16 + 1/8 (paper)": LayerSelection(frozenset({"output"}), frozenset({0, 1})),
    "decoder 1/8": LayerSelection(frozenset({"output"}), frozenset({0})),
    "decoder 1/16": LayerSelection(frozenset({"output"}), frozenset({1})),
    "decoder 1/32 + 1/16 + 1/8": LayerSelection(frozenset({"output"}), frozenset({0, 1, 2})),
    "encoder + decoder 1/16 + 1/8": LayerSelection(frozenset({"input", "output"}), frozenset({0, 1})),
}
DEFAULT_LAYERS = "decoder 1/16 + 1/8 (paper)"

#: Flow view choices: label → grid levels to average (None = every recorded layer). Same levels as above.
FLOW_LAYER_CHOICES: dict[str, Optional[frozenset]] = {
    "all MEA layers": None,
    "1/8 grid": frozenset({0}),
    "1/16 grid": frozenset({1}),
    "1/32 grid": frozenset({2}),
}


def grid_level(latent_hw: Sequence[int], layer_hw: Sequence[int]) -> int:
    """How many times the UNet halved the latent grid to reach this layer's token grid.

    A stride-2 convolution with padding 1 maps n → ⌈n/2⌉, so odd sizes are matched exactly; a grid
    that matches no level (an unusual architecture) gets the nearest level by area ratio.

    >>> grid_level((64, 64), (32, 32)), grid_level((13, 20), (7, 10)), grid_level((64, 64), (64, 64))
    (1, 1, 0)
    """
    lh, lw = int(latent_hw[-2]), int(latent_hw[-1])
    gh, gw = int(layer_hw[-2]), int(layer_hw[-1])
    if lh < 1 or lw < 1 or gh < 1 or gw < 1:
        raise ValueError(f"grid sizes must be positive, got latent {lh}x{lw} and layer {gh}x{gw}")
    h, w = lh, lw
    for level in range(16):
        if (h, w) == (gh, gw):
            return level
        if h == 1 and w == 1:
            break
        h, w = halved((h, w))
    return max(0, int(round(0.5 * math.log2((lh * lw) / (gh * gw)))))


def token_grid(tokens: int, latent_hw: Sequence[int], max_levels: int = 8) -> tuple[int, int, int]:
    """Token grid of a layer that sees ``tokens`` tokens in a UNet whose latent is ``latent_hw``.

    For hosts that see only the token count (diffusers): the grid at level k is the latent halved k times
    (⌈n/2⌉ per halving, as :func:`grid_level`), and the layer's grid is the one with ``h · w == tokens``.

    Returns:
        ``(h, w, factor)`` with ``factor = 2**level``.

    Raises:
        ValueError: no level matches (the latent size is not the one the UNet is running on).

    >>> token_grid(32 * 32, (64, 64)), token_grid(7 * 10, (13, 20))
    ((32, 32, 2), (7, 10, 2))
    """
    H, W = (int(s) for s in latent_hw)
    h, w, factor = H, W, 1
    for _ in range(max_levels + 1):
        if h * w == tokens:
            return h, w, factor
        if h == 1 and w == 1:
            break
        (h, w), factor = halved((h, w)), factor * 2
    raise ValueError(
        f"a self-attention layer has {tokens} tokens, which is no downsampled grid of the latent size "
        f"{(H, W)}: pass the latent (H, W) the UNet actually runs on as latent_hw, or leave latent_hw=None "
        "so it is read from the UNet input"
    )


def token_mask(mask: torch.Tensor, hw: Sequence[int]) -> torch.Tensor:
    """A mask at a token grid, flattened: bool ``[B, h·w]`` from ``[B, H, W]`` (any resolution; > 0.5 = on).

    Nearest neighbour, as the method resizes masks to each grid (docs/method.md §3b).

    >>> m = torch.zeros(1, 8, 8); m[:, :4] = 1
    >>> token_mask(m, (2, 2)).tolist()
    [[True, True, False, False]]
    """
    src = mask if mask.dtype == torch.bool else mask > 0.5
    return resize_to_grid(src, tuple(int(s) for s in hw)).reshape(src.shape[0], -1)


def check_contrast(contrast: float) -> float:
    """The attention-contrast factor as a float; raises unless it is a finite number ≥ 0 (1 = off, paper 1.25).

    >>> check_contrast(1)
    1.0
    """
    if isinstance(contrast, bool) or not isinstance(contrast, (int, float)) or not math.isfinite(contrast) \
            or contrast < 0:
        raise ValueError(f"contrast must be a finite number ≥ 0 (1.0 = off, paper 1.25), got {contrast!r}")
    return float(contrast)


# --------------------------------------------------------------------------------------------
# which passes and rows carry MEA


def in_window(sigma: float, sigma_start: float, sigma_end: float) -> bool:
    """Whether ``sigma`` lies in the schedule window [start → end] (sigmas decrease while sampling).

    A relative tolerance absorbs float32 vs float64 rounding of the same schedule value.

    >>> in_window(1.0, 2.0, 0.5), in_window(3.0, 2.0, 0.5)
    (True, False)
    """
    tol = 1e-5 * max(1.0, abs(sigma))
    return (sigma_end - tol) <= sigma <= (sigma_start + tol)


def mea_rows(cond_or_uncond: Sequence[int], n_rows: int, all_rows: bool = False) -> list[int]:
    """Batch rows that get MEA: the positive rows (``cond_or_uncond`` value 0), or all rows.

    The batch is one chunk of ``n_rows // len(cond_or_uncond)`` rows per entry of ``cond_or_uncond``, in
    that order — which is not fixed (negative first happens; cfg = 1 drops the negative; memory pressure
    splits the chunks into separate calls).

    >>> mea_rows([1, 0], 4), mea_rows([0, 1], 2), mea_rows([1], 2), mea_rows([1], 2, all_rows=True)
    ([2, 3], [0], [], [0, 1])
    """
    chunks = list(cond_or_uncond) if cond_or_uncond else [0]
    if n_rows % len(chunks):
        raise ValueError(
            f"batch of {n_rows} rows does not split into {len(chunks)} chunks (cond_or_uncond={chunks}); "
            "this call was not made by ComfyUI's calc_cond_batch"
        )
    if all_rows:
        return list(range(n_rows))
    per = n_rows // len(chunks)
    return [c * per + r for c, v in enumerate(chunks) if v == 0 for r in range(per)]


def rows_with_mea(mode: str, cond_or_uncond: Sequence[int], n_rows: int, mea_pass: bool) -> list[int]:
    """The rows of one model call that carry MEA, by guidance mode (docs/method.md §3b).

    ``paper``: only the extra MEA pass (``mea_pass``), all of its rows; the normal cond and uncond passes run
    without MEA. ``fused``: the positive rows of the normal passes.

    >>> rows_with_mea("paper", [1, 0], 2, False), rows_with_mea("paper", [0], 1, True), rows_with_mea("fused", [1, 0], 2, False)
    ([], [0], [1])
    """
    if mode not in GUIDANCE_MODES:
        raise ValueError(f"mode must be one of {GUIDANCE_MODES}, got {mode!r}")
    if mode == "paper":
        return mea_rows(cond_or_uncond, n_rows, all_rows=True) if mea_pass else []
    return mea_rows(cond_or_uncond, n_rows)


def row_mask_index(rows: Sequence[int], n_rows: int, n_chunks: int, mask_batch: int) -> list[int]:
    """For each batch row, which item of a ``mask_batch``-item target mask applies to it.

    Row r is item ``r % per`` of its chunk (``per = n_rows // n_chunks``). A mask batch of 1 is shared;
    otherwise it must equal ``per``.

    >>> row_mask_index([2, 3], 4, 2, 2), row_mask_index([1], 2, 2, 1)
    ([0, 1], [0])
    """
    per = n_rows // max(1, n_chunks)
    if mask_batch == 1:
        return [0] * len(rows)
    if mask_batch != per:
        raise ValueError(
            f"the target mask has {mask_batch} items but the latent batch has {per}: give the target mask batch 1 "
            "(shared) or one mask per latent"
        )
    return [r % per for r in rows]


# --------------------------------------------------------------------------------------------
# guidance


def guidance_base(uncond: Optional[torch.Tensor], cond: torch.Tensor) -> torch.Tensor:
    """The base of the paper's MEA term: the negative prediction (ε_u); the positive one when the host ran no
    negative pass (cfg 1 on a distilled model: :func:`keeps_negative_pass_at_cfg1`)."""
    return cond if uncond is None else uncond


def paper_guidance(
    cfg_result: torch.Tensor, base: torch.Tensor, mea: torch.Tensor, mask: torch.Tensor, s_mea: float
) -> torch.Tensor:
    """The paper's third branch added to a CFG result: ``cfg_result + s_mea·M⊙(mea − base)``.

    Works unchanged on ε or on x̂0 predictions: every branch shares x and σ, so differences of x̂0 are −σ
    times differences of ε. ``mask`` [B or 1, 1, h, w] broadcasts over channels (and batch).
    """
    return cfg_result + (float(s_mea) * mask.to(cfg_result.dtype)) * (mea - base)


def guided(
    mode: str, u: torch.Tensor, c: torch.Tensor, mea: torch.Tensor, mask: torch.Tensor, cfg: float, s_mea: float
) -> torch.Tensor:
    """The whole guidance step from the branch predictions (docs/method.md §3b), for hosts without a CFG of
    their own and as the reference the ComfyUI test checks the sampler against.

    ``paper``: ``u + cfg·(c − u) + s_mea·M⊙(mea − u)``, where ``mea`` is the positive prediction with MEA on and
    ``c`` the one without. ``fused``: ``u + cfg·(mea − u)`` — one weight for text and garment, unmasked; ``c``
    and ``mask`` are not used.

    >>> u, c, mea, m = torch.zeros(1), torch.ones(1), torch.full((1,), 2.0), torch.ones(1)
    >>> guided("paper", u, c, mea, m, 12.0, 15.0).item(), guided("fused", u, c, mea, m, 12.0, 15.0).item()
    (42.0, 24.0)
    """
    if mode == "fused":
        return u + float(cfg) * (mea - u)
    if mode != "paper":
        raise ValueError(f"mode must be one of {GUIDANCE_MODES}, got {mode!r}")
    return paper_guidance(u + float(cfg) * (c - u), u, mea, mask, s_mea)


def nearest_step(sample_sigmas: Optional[torch.Tensor], sigma: float) -> Optional[int]:
    """Index of the schedule entry closest to ``sigma`` (None without a schedule)."""
    if sample_sigmas is None or not isinstance(sample_sigmas, torch.Tensor) or sample_sigmas.numel() == 0:
        return None
    return int(torch.argmin((sample_sigmas.detach().float().cpu() - float(sigma)).abs()))


def check_reference_every(every: Any) -> int:
    """How many sampler steps one recorded reference K/V serves, as an int; raises unless it is a whole number ≥ 1.

    1 = the paper: a reference pass at every step (docs/method.md §3b, §3c).

    >>> check_reference_every(2)
    2
    """
    if isinstance(every, bool) or not isinstance(every, numbers.Integral) or every < 1:
        raise ValueError(f"reference_every must be a whole number ≥ 1 (1 = a reference pass at every step, as in "
                         f"the paper), got {every!r}")
    return int(every)


def reuse_reference(stored_step: Optional[int], stored_sigma: Optional[float], step: Optional[int], sigma: float,
                    every: int) -> bool:
    """Whether a model call at ``sigma`` (schedule index ``step``) reuses the reference K/V recorded at
    ``stored_sigma`` (index ``stored_step``) instead of running a new reference pass.

    The same sigma always reuses: cond and uncond split into separate calls, or the paper's extra pass, at
    one step compute the reference once; that is all the paper allows (``every`` = 1). With ``every`` = N > 1
    a recording also serves the next N − 1 steps (``0 ≤ step − stored_step < N``), so the garment K/V those
    steps read were recorded at an earlier, noisier sigma: an approximation of the paper that saves the
    reference pass. Without both step indices (no schedule known) only the exact sigma reuses. ``stored_sigma``
    None means nothing is stored.

    >>> reuse_reference(3, 0.5, 3, 0.5, 1), reuse_reference(3, 0.5, 4, 0.4, 1)
    (True, False)
    >>> [reuse_reference(3, 0.5, s, 0.1, 2) for s in (2, 3, 4, 5)], reuse_reference(None, 0.5, 4, 0.4, 2)
    ([False, True, True, False], False)
    """
    if stored_sigma is None:
        return False
    if stored_sigma == sigma:
        return True
    if every <= 1 or stored_step is None or step is None:
        return False
    return 0 <= step - stored_step < every


#: Why a sampling run applied MEA nowhere although its masks are not empty (:func:`no_op_cause`).
NO_OP_CAUSES = ("window", "layers", "masks")


def no_op_cause(stats: dict) -> Optional[str]:
    """Why a run in which MEA changed nothing did nothing, from its counters (:data:`~.run.STAT_KEYS`), or None
    when it did act: ``"window"`` (no model call in the MEA window), ``"layers"`` (no chosen layer reached),
    ``"masks"`` (layers reached, but no region query read a garment token: a mask vanished at those grids).

    >>> no_op_cause({"calls": 0, "layers": 0, "effective": 0}), no_op_cause({"calls": 2, "layers": 4, "effective": 1})
    ('window', None)
    """
    if stats.get("effective", 0):
        return None
    if stats.get("calls", 0) == 0:
        return "window"
    if stats.get("layers", 0) == 0:
        return "layers"
    return "masks"


def keeps_negative_pass_at_cfg1(distilled: bool) -> bool:
    """Whether a host runs the negative pass at cfg 1 so that paper guidance has its base (docs/method.md §3b).

    The paper's third branch is ``s_mea·M⊙(ε_MEA − ε_u)``. A sampler at cfg 1 skips the negative pass; a model
    sampled with real CFG (an SD UNet) still has a meaningful ε_u there, so the host keeps that pass and the
    base stays ε_u (one more model pass per MEA step). A guidance- or timestep-distilled model (FLUX.1 dev,
    Fill, schnell: sampled at cfg 1 by design) has no meaningful ε_u: the base is ε_c and ``s_mea`` weighs
    ``ε_MEA − ε_c``, which has no text term beside it. So the same ``s_mea`` is a different strength on the two
    (the paper's 15 is for a UNet; about 3 on FLUX.1, docs/method.md §3c).

    >>> keeps_negative_pass_at_cfg1(distilled=False), keeps_negative_pass_at_cfg1(distilled=True)
    (True, False)
    """
    return not distilled
