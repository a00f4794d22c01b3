"""Masks: the one normaliser every mask input goes through, morphology, token grids, and the checks that say
why a mask selects nothing.

Conventions shared by every function here:

* Layouts: a mask is ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``; :func:`mask_layout` is the one parser of
  them (an image-shaped tensor, NaN or a non-tensor is refused with what to do).
* Values: a mask is on where it is above :data:`ON_ABOVE` (0.5); ``bool`` masks are taken as they are, uint8
  0/255 masks are scaled to 0/1 (:func:`mask_values`). A mask whose largest value is at most :data:`EMPTY_BELOW`
  is empty; one above it with nothing on is *soft* and refused wherever a mask is used (:func:`soft_mask_problem`),
  never taken as empty.
* Cost: :func:`dilate` and :func:`erode` are separable running counts, so their cost per pixel does not
  grow with the kernel (``bench/bench_masks.py`` compares them with the ``max_pool2d`` formulation).
* Return rule: a mask comes back in the **same layout and dtype as the input**, with values
  exactly 0/1 (``False``/``True`` for bool). Only the spatial size may change
  (:func:`resize_to_grid`). ComfyUI ``MASK`` tensors (``[B, H, W]`` float32) therefore round-trip.

Problems are :class:`MaskError` (a ``ValueError`` with ``problem`` and ``fix``) or ``(problem, fix)`` pairs; a
host puts its own name in front (``nodes/convert.py: NodeInputError``).
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .shapes import as_hw, halved

#: docs/method.md §1: the garment mask is eroded by 1 px, a 3×3 square, everywhere it is used.
GARMENT_EROSION = 3

#: A mask is on where its value is above this, for every mask input of every node.
ON_ABOVE = 0.5
#: A mask whose largest value is at most this counts as empty (noise from 8-bit files or resizing), so "zero mask =
#: no effect" still holds for it; above it, a mask with nothing above :data:`ON_ABOVE` is *soft*.
EMPTY_BELOW = 0.05

__all__ = [
    "GARMENT_EROSION",
    "ON_ABOVE",
    "EMPTY_BELOW",
    "MaskError",
    "sentence",
    "mask_layout",
    "mask_values",
    "usable_mask",
    "binary_mask",
    "soft_mask_problem",
    "empty_mask_problem",
    "eroded_away_problem",
    "to_bool",
    "resize_to_grid",
    "erode",
    "dilate",
    "bbox",
    "token_grids",
    "unusable_mask_problem",
    "inverted_mask_problem",
]


class MaskError(ValueError):
    """A mask that cannot be used: ``problem`` names the input and says what is wrong, ``fix`` what to do."""

    def __init__(self, problem: str, fix: str = ""):
        self.problem, self.fix = problem, fix
        super().__init__(sentence(problem, fix))


def sentence(problem: str, fix: str = "") -> str:
    """``problem`` and ``fix`` as the one sentence a message shows (the pack's error style: "problem. fix")."""
    problem = problem.rstrip(". ")
    return f"{problem}. {fix}" if fix else f"{problem}."


def mask_layout(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """The one parser of mask layouts: ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` → a ``[B, 1, H, W]`` view.

    Raises:
        MaskError: not a tensor, an image-shaped tensor (``[B, H, W, C]``), another rank, or NaN values.

    >>> mask_layout(torch.zeros(4, 5)).shape, mask_layout(torch.zeros(2, 1, 4, 5)).shape
    (torch.Size([1, 1, 4, 5]), torch.Size([2, 1, 4, 5]))
    """
    if not isinstance(mask, torch.Tensor):
        raise MaskError(f"{name} is a {type(mask).__name__}, not a mask tensor",
                        f"give a MASK ([H, W], [B, H, W] or [B, 1, H, W]; e.g. from a segmenter or Load Image's mask) "
                        f"as '{name}'")
    if mask.ndim == 2:
        b4 = mask[None, None]
    elif mask.ndim == 3:
        b4 = mask[:, None]
    elif mask.ndim == 4 and mask.shape[1] == 1:
        b4 = mask
    elif mask.ndim == 4 and mask.shape[-1] in (1, 3, 4):
        raise MaskError(f"{name} has shape {tuple(mask.shape)}, which is an IMAGE, not a MASK (a multi-channel image "
                        "is not a mask)", "convert it with 'Convert Image to Mask' (pick a channel) first")
    else:
        raise MaskError(f"{name} has shape {tuple(mask.shape)}, expected a MASK [batch, height, width]",
                        "give [H, W], [B, H, W] or [B, 1, H, W] (a multi-channel image is not a mask: take one "
                        "channel first)")
    if b4.is_floating_point() and torch.isnan(b4).any():
        raise MaskError(f"{name} contains NaN values", "check the node that produced it")
    return b4


def mask_values(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """Any mask layout and dtype → float32 ``[B, H, W]``, values kept (soft values too).

    ``bool`` → 0/1; an integer mask is divided by 255 when it is uint8 with values above 1 (0/255 files), else taken
    as it is. Raises :class:`MaskError` as :func:`mask_layout` does.
    """
    m = mask_layout(mask, name)[:, 0]
    if m.dtype == torch.bool:
        m = m.float()
    elif not m.is_floating_point():
        m = m.float() / (255.0 if mask.dtype == torch.uint8 and m.max() > 1 else 1.0)
    return m.float()


def _layout(mask: torch.Tensor, name: str = "mask") -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Bring ``mask`` to bool ``[B, 1, H, W]`` and return a function that restores layout and dtype.

    The restore function takes a bool ``[B, 1, h, w]`` tensor (``h, w`` may differ from the input's).
    """
    b4 = mask_layout(mask, name)
    on = b4 if b4.dtype == torch.bool else b4 > ON_ABOVE
    ndim, dtype = mask.ndim, mask.dtype

    def restore(out: torch.Tensor) -> torch.Tensor:
        if ndim == 2:
            out = out[0, 0]
        elif ndim == 3:
            out = out[:, 0]
        return out if dtype == torch.bool else out.to(dtype)

    return on, restore


def _which(name: str, b: int, batch: int) -> str:
    return f"{name} (batch item {b})" if batch > 1 else name


def soft_mask_problem(mask: torch.Tensor, name: str = "mask") -> Optional[tuple[str, str]]:
    """``(problem, fix)`` when a batch item of ``mask`` is soft (largest value above :data:`EMPTY_BELOW`, none above
    :data:`ON_ABOVE`): it would select nothing without a word. None otherwise (empty items are not soft).

    >>> soft_mask_problem(torch.full((4, 4), 0.45))[0]
    'mask is soft: no pixel above 0.5 (its largest value is 0.45), and a mask counts only where it is above 0.5, so it selects nothing'
    >>> soft_mask_problem(torch.zeros(4, 4)) is None
    True
    """
    m = mask_values(mask, name)
    B = m.shape[0]
    for b in range(B):
        peak = float(m[b].max()) if m[b].numel() else 0.0
        if peak > EMPTY_BELOW and not bool((m[b] > ON_ABOVE).any()):
            return (f"{_which(name, b, B)} is soft: no pixel above {ON_ABOVE} (its largest value is {peak:.2f}), and "
                    f"a mask counts only where it is above {ON_ABOVE}, so it selects nothing",
                    "connect a hard mask (white = inside), or threshold this one first (ThresholdMask with a value "
                    "below its level, e.g. 0.25)")
    return None


def usable_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """The normaliser every mask input goes through: :func:`mask_values` (float32 ``[B, H, W]``, values kept), and a
    soft batch item refused (:func:`soft_mask_problem`). Empty items pass: whether an input may be empty is the
    caller's rule (zero mask = no effect, or :func:`empty_mask_problem`).

    Raises:
        MaskError: a bad layout, NaN, or a soft batch item.
    """
    m = mask_values(mask, name)
    soft = soft_mask_problem(m, name)
    if soft:
        raise MaskError(*soft)
    return m


def binary_mask(mask: torch.Tensor, name: str = "mask") -> torch.Tensor:
    """:func:`usable_mask` binarised: bool ``[B, 1, H, W]`` (on = above :data:`ON_ABOVE`; a bool mask as it is)."""
    if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool:
        return mask_layout(mask, name)
    return usable_mask(mask, name)[:, None] > ON_ABOVE


#: Load Image's MASK output for an image without an alpha channel: ``torch.zeros(64, 64)``.
PLACEHOLDER_HW = (64, 64)


def empty_mask_problem(mask: torch.Tensor, name: str = "mask", what: str = "the region") -> Optional[tuple[str, str]]:
    """``(problem, fix)`` when no pixel of ``mask`` (any batch item) is on, for an input that must select something;
    a soft mask is told apart from an empty one. None otherwise."""
    m = mask_values(mask, name)
    if bool((m > ON_ABOVE).any()):
        return None
    soft = soft_mask_problem(m, name)
    if soft:
        return soft
    hint = ""
    if tuple(m.shape[-2:]) == PLACEHOLDER_HW:
        hint = " (a 64x64 empty mask is what Load Image gives for an image without alpha: load the mask itself)"
    return f"{name} is empty (no pixel above {ON_ABOVE})", f"connect a mask that covers {what} (white = inside){hint}"


def eroded_away_problem(name: str = "garment_mask", kernel: int = 3, batch_item: Optional[int] = None
                        ) -> tuple[str, str]:
    """``(problem, fix)`` for a mask that the ``kernel`` × ``kernel`` erosion removes entirely (a thin line)."""
    which = name if batch_item is None else f"{name} (batch item {batch_item})"
    px = int(kernel) // 2
    return (f"{which} vanishes after the {px}-pixel erosion (it is only a thin line), so it selects nothing",
            "connect a mask that covers the whole garment, or widen it (GrowMask)")


def to_bool(mask: torch.Tensor) -> torch.Tensor:
    """Binarise a mask (``> 0.5`` unless already bool), keeping its layout; returns a bool tensor."""
    on, _ = _layout(mask)
    if mask.ndim == 2:
        return on[0, 0]
    if mask.ndim == 3:
        return on[:, 0]
    return on


def resize_to_grid(mask: torch.Tensor, size: int | Sequence[int], keep_thin: bool = False) -> torch.Tensor:
    """Resize a mask to a token grid.

    Args:
        mask: ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` (bool, or float thresholded at 0.5).
        size: grid size, ``int`` (square) or ``(height, width)``.
        keep_thin: ``False`` is plain nearest neighbour (``F.interpolate(mode="nearest")``, what
            paper mode uses, and what attention masks use at each grid). ``True`` turns a grid cell
            on if ANY pixel inside it is on (adaptive max-pool), so thin parts such as straps,
            narrower than a cell, survive downsampling; it is a superset of the nearest result.

    Returns:
        The mask at ``size`` in the input's layout and dtype (values 0/1).
    """
    on, restore = _layout(mask)
    h, w = as_hw(size, "size")
    if keep_thin:
        out = F.adaptive_max_pool2d(on.float(), (h, w)) > 0.5
    else:
        out = F.interpolate(on.float(), size=(h, w), mode="nearest") > 0.5
    return restore(out)


def _kernel(kernel: int) -> int:
    if isinstance(kernel, bool) or not isinstance(kernel, int) or kernel < 1 or kernel % 2 == 0:
        raise ValueError(
            f"kernel must be a positive odd int (side of the square, e.g. 3 for 3x3), got {kernel!r}: "
            "an even kernel has no centre pixel and would shift the mask"
        )
    return kernel


def _window_any(on: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """1-D dilation of a bool tensor along ``dim``: on where any pixel within ``k // 2`` of it is on.

    Pixels outside the tensor count as off (like ``max_pool`` padding with -inf). Cost is independent of
    ``k``: one cumulative sum and one difference (a running box count), so a 75-pixel window costs the same
    as a 3-pixel one.
    """
    r = k // 2
    n = on.shape[dim]
    # Running count with a leading zero: count(i - r .. i + r) = cs[min(i + r + 1, n)] - cs[max(i - r, 0)].
    cs = F.pad(torch.cumsum(on.movedim(dim, -1).to(torch.int32), dim=-1, dtype=torch.int32), (1, 0))
    idx = torch.arange(n, device=on.device)
    hi = cs.index_select(-1, (idx + r + 1).clamp(max=n))
    lo = cs.index_select(-1, (idx - r).clamp(min=0))
    return (hi > lo).movedim(-1, dim)


def _square_any(on: torch.Tensor, k: int) -> torch.Tensor:
    """Square ``k × k`` dilation of a bool ``[B, 1, H, W]`` tensor, separable (rows, then columns).

    Bit-identical to ``F.max_pool2d(on.float(), k, stride=1, padding=k // 2) > 0.5`` (the square max is the
    column max of the row maxima, and both treat outside pixels as off), at a cost that does not grow with
    ``k`` (``max_pool2d`` costs k² per pixel: 35 s for the 75×75 fringe dilation of a 2000 px photo).
    """
    if k == 1:
        return on
    return _window_any(_window_any(on, k, -1), k, -2)


def dilate(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Dilate with a ``kernel × kernel`` square (``kernel`` odd; 13 → 13×13, the paper's target-mask dilation).

    A pixel is on if any pixel of the square centred on it is on. Exact, any size; the cost per pixel does
    not depend on ``kernel`` (separable running counts, see :func:`_square_any`).
    Returns the input's layout and dtype.
    """
    k = _kernel(kernel)
    on, restore = _layout(mask)
    return restore(_square_any(on, k))


def erode(mask: torch.Tensor, kernel: int) -> torch.Tensor:
    """Erode with a ``kernel × kernel`` square (``kernel`` odd; 3 → 3×3 = 1 px, the paper's garment erosion).

    A pixel stays on only if every pixel of the square centred on it that lies inside the image is
    on: the image border does not eat into the mask (same as OpenCV's default border for erode and
    kornia's geodesic border). Returns the input's layout and dtype. Cost independent of ``kernel``.
    """
    k = _kernel(kernel)
    on, restore = _layout(mask)
    # The off-pixels dilated; outside-the-image pixels never count as "off".
    return restore(~_square_any(~on, k))


def bbox(
    mask: torch.Tensor, pad: int | float = 0, square: bool = False
) -> tuple[int, int, int, int]:
    """Bounding box of the on-pixels, padded and clamped to the image.

    Args:
        mask: ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``; for a batch the box covers the union of
            all masks (one crop that fits the whole batch).
        pad: ``int`` → pixels added on each side; ``float`` → fraction of the box's longer side added
            on each side (``0.1`` adds 10 %). Must be ≥ 0.
        square: grow the shorter side (centred) so the box is square before clamping; if the image
            is too small in that direction the box is shifted, then clamped, so it may end up
            non-square at the image edge.

    Returns:
        ``(x0, y0, x1, y1)`` in pixels, half-open: rows ``y0:y1`` and columns ``x0:x1`` crop it.
        ``0 ≤ x0 < x1 ≤ W`` and ``0 ≤ y0 < y1 ≤ H``.

    Raises:
        ValueError: empty mask (no pixel on), negative pad.
    """
    if isinstance(pad, bool) or not isinstance(pad, (int, float)) or pad < 0:
        raise ValueError(f"pad must be a non-negative int (pixels) or float (fraction), got {pad!r}")
    on, _ = _layout(mask)
    H, W = on.shape[-2:]
    union = on.any(dim=0)[0]
    rows = torch.nonzero(union.any(dim=1)).flatten()
    cols = torch.nonzero(union.any(dim=0)).flatten()
    if rows.numel() == 0:
        raise ValueError(
            f"bbox: the mask ({H}x{W}) is empty, so it has no bounding box: connect a mask that covers the region"
        )
    y0, y1 = int(rows[0]), int(rows[-1]) + 1
    x0, x1 = int(cols[0]), int(cols[-1]) + 1
    p = int(round(pad * max(x1 - x0, y1 - y0))) if isinstance(pad, float) else int(pad)
    x0, y0, x1, y1 = x0 - p, y0 - p, x1 + p, y1 + p
    if square:
        side = max(x1 - x0, y1 - y0)
        x0, x1 = _grow(x0, x1, side, W)
        y0, y1 = _grow(y0, y1, side, H)
    return max(0, x0), max(0, y0), min(W, x1), min(H, y1)


def _grow(lo: int, hi: int, side: int, limit: int) -> tuple[int, int]:
    """Widen ``[lo, hi)`` to ``side`` around its centre, then shift it inside ``[0, limit)`` if it fits."""
    extra = side - (hi - lo)
    lo -= extra // 2
    hi += extra - extra // 2
    if lo < 0:
        hi, lo = hi - lo, 0
    if hi > limit:
        lo, hi = lo - (hi - limit), limit
    return lo, hi


# --------------------------------------------------------------------------------------------
# Detectors of masks that would make a silent no-op. Each returns a sentence saying what is wrong and what to
# do, or None; the nodes put their own name in front and decide whether it is an error or a warning.

def token_grids(hw: Sequence[int], levels: Sequence[int], ratio: int = 8) -> list[tuple[int, int]]:
    """The token grids ``(h, w)`` of an image of size ``hw`` at UNet grid ``levels`` (docs/method.md §3b).

    Level 0 is the latent grid (``hw // ratio``, as a VAE crops to a multiple of ``ratio``); each level
    halves it the way a stride-2 convolution with padding 1 does (n → ⌈n/2⌉).

    >>> token_grids((512, 384), [0, 1, 2])
    [(64, 48), (32, 24), (16, 12)]
    """
    h, w = max(1, int(hw[0]) // int(ratio)), max(1, int(hw[1]) // int(ratio))
    return [halved((h, w), level) for level in sorted({int(v) for v in levels})]


def unusable_mask_problem(
    mask: torch.Tensor,
    grid_sizes: Sequence[Sequence[int]] = (),
    name: str = "mask",
    erode_kernel: int = 1,
) -> "str | None":
    """Why a NON-EMPTY mask selects nothing where it is used, or None (docs/method.md §3b).

    An empty mask (largest value ≤ :data:`EMPTY_BELOW`) is not a problem here: zero mask = no effect is
    the contract. A mask that is not empty but selects nothing makes the same silent no-op, so it is
    reported, per batch item:

    * soft: no value above 0.5 (a mask is on where > 0.5);
    * thin: nothing left after a ``erode_kernel`` × ``erode_kernel`` erosion (the garment mask's 3×3);
    * lost at the token grids: nearest sampling to every one of ``grid_sizes`` leaves no token (what the
      attention masks use at each layer; a grid that keeps a token means the mask still acts there).

    Args:
        mask: ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``, any values.
        grid_sizes: the token grids ``(h, w)`` where the mask is used (see :func:`token_grids`); empty = skip.
        name: the input's name, used in the sentence.
        erode_kernel: odd; 1 = no erosion.

    Returns:
        One sentence (problem, then what to do), or None.
    """
    m = mask_values(mask, name)
    B = m.shape[0]
    for b in range(B):
        x = m[b]
        peak = float(x.max()) if x.numel() else 0.0
        if peak <= EMPTY_BELOW:
            continue  # empty: the contract, not a problem
        which = _which(name, b, B)
        on = x > ON_ABOVE
        if not bool(on.any()):
            return sentence(*soft_mask_problem(x, which))
        if erode_kernel > 1:
            on = erode(on, int(erode_kernel))
            if not bool(on.any()):
                return sentence(*eroded_away_problem(name, int(erode_kernel), b if B > 1 else None))
        grids = [tuple(int(s) for s in g) for g in grid_sizes]
        if grids and not any(bool(resize_to_grid(on, g).any()) for g in grids):
            listed = ", ".join(f"{gw}x{gh}" for gh, gw in grids)
            return (f"{which} vanishes at the attention token grids ({listed}): it is thinner than one token, so "
                    "nearest sampling misses it and it selects nothing. Widen the mask (GrowMask), or crop to a "
                    "larger size so that it spans several tokens")
    return None


def inverted_mask_problem(mask: torch.Tensor, name: str = "mask") -> "str | None":
    """Why ``mask`` looks inverted (white = background), or None: a warning, never an error.

    Looks at each batch item (on = > 0.5): it covers (almost) the whole image border but not the middle
    third of the image, or at least 90 % of the image. A garment or try-on region is a shape inside
    the photo; its inverse (the background) is what covers the border. The usual cause: LoadImage's
    MASK output, and LoadImageMask's ``alpha`` channel, are 1 − alpha, white on the transparent background
    of a cut-out PNG.

    >>> m = torch.zeros(64, 64); m[16:48, 16:48] = 1
    >>> inverted_mask_problem(m) is None, inverted_mask_problem(1 - m) is not None
    (True, True)
    """
    m = mask_values(mask, name) > ON_ABOVE
    B, H, W = m.shape
    if H < 3 or W < 3:
        return None
    band = max(1, min(H, W) // 32)
    border = torch.zeros(H, W, dtype=torch.bool, device=m.device)
    border[:band], border[-band:], border[:, :band], border[:, -band:] = True, True, True, True
    centre = torch.zeros_like(border)
    centre[H // 3:H - H // 3, W // 3:W - W // 3] = True
    fix = ("If white should be the garment / the region: LoadImage's MASK output (and LoadImageMask's alpha "
           "channel) is 1 - alpha, white on the transparent background of a cut-out PNG; put an InvertMask after "
           "it, use a mask file with white = inside, or paint the mask in ComfyUI's MaskEditor (right-click the "
           "Load Image node, Open in MaskEditor: its MASK output is the painted area)")
    for b in range(B):
        x = m[b]
        if not bool(x.any()):
            continue
        which = _which(name, b, B)
        on_border = float(x[border].float().mean())
        on_centre = float(x[centre].float().mean())
        cover = float(x.float().mean())
        if on_border >= 0.9 and on_centre <= 0.5:
            return (f"{which} looks inverted: it covers {on_border:.0%} of the image border but only "
                    f"{on_centre:.0%} of the centre. {fix}")
        if cover >= 0.9:  # centre covered too: not the shape of an inverted garment, just (almost) everything
            return (f"{which} covers {cover:.0%} of the image, so almost everything is treated as inside: an "
                    "all-white mask, one dilated over the whole image, or an inverted one. If white should be only "
                    f"the garment / the region: {fix[0].lower()}{fix[1:]}")
    return None
