"""Mask helpers: resize to a token grid, square erode/dilate, padded bounding boxes.

Conventions shared by every function here:

* Layouts: a mask is ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``.
* Values: ``bool`` masks are taken as they are; any other dtype is "on" where ``mask > 0.5``
  (so float 0/1, float soft masks and uint8 0/1 or 0/255 all work).
* Cost: :func:`dilate` and :func:`erode` are separable running counts, so their cost per pixel does not
  grow with the kernel (``bench/bench_masks.py`` compares them with the ``max_pool2d`` formulation).
* Return rule: a mask comes back in the **same layout and dtype as the input**, with values
  exactly 0/1 (``False``/``True`` for bool). Only the spatial size may change
  (:func:`resize_to_grid`). ComfyUI ``MASK`` tensors (``[B, H, W]`` float32) therefore round-trip.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "to_bool",
    "resize_to_grid",
    "erode",
    "dilate",
    "bbox",
]


def _layout(mask: torch.Tensor, name: str = "mask") -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """Bring ``mask`` to bool ``[B, 1, H, W]`` and return a function that restores layout and dtype.

    The restore function takes a bool ``[B, 1, h, w]`` tensor (``h, w`` may differ from the input's).
    """
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}: convert it with torch.as_tensor")
    if mask.ndim == 2:
        b4 = mask[None, None]
    elif mask.ndim == 3:
        b4 = mask[:, None]
    elif mask.ndim == 4 and mask.shape[1] == 1:
        b4 = mask
    else:
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)}; expected [H, W], [B, H, W] or [B, 1, H, W] "
            "(a multi-channel image is not a mask: take one channel first)"
        )
    if mask.is_floating_point() and torch.isnan(b4).any():
        raise ValueError(f"{name} contains NaN: check the node that produced it")
    on = b4 if b4.dtype == torch.bool else b4 > 0.5
    ndim, dtype = mask.ndim, mask.dtype

    def restore(out: torch.Tensor) -> torch.Tensor:
        if ndim == 2:
            out = out[0, 0]
        elif ndim == 3:
            out = out[:, 0]
        return out if dtype == torch.bool else out.to(dtype)

    return on, restore


def to_bool(mask: torch.Tensor) -> torch.Tensor:
    """Binarise a mask (``> 0.5`` unless already bool), keeping its layout; returns a bool tensor."""
    on, _ = _layout(mask)
    if mask.ndim == 2:
        return on[0, 0]
    if mask.ndim == 3:
        return on[:, 0]
    return on


def _size2(size: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, bool):
        raise ValueError(f"size must be an int or (height, width), got {size!r}")
    if isinstance(size, int):
        h = w = size
    else:
        try:
            h, w = (int(s) for s in size)
        except (TypeError, ValueError):
            raise ValueError(f"size must be an int or (height, width), got {size!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"size must be positive, got {(h, w)}")
    return h, w


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
    h, w = _size2(size)
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
