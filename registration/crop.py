"""Crop a padded square around a mask to the model's working size, and paste the result back.

For photos "in the wild" the person (or the garment) is small in the frame: docs/method.md §1 crops a padded
square around the target mask (and around the garment on the reference), works at the model's
native size, and pastes back with a feathered seam; outside the mask the original pixels are kept
exactly (docs/method.md §3 Finish). Any input size and aspect: a box that does not fit in the image is shifted
inside it when it can be, otherwise the missing border is filled (edge pixels for images, 0 for
masks), so the crop is always an exact square.

Layouts: images ``[B, C, H, W]`` float, masks ``[B, 1, H, W]`` float (the nodes convert). No
ComfyUI import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F

from ..tensors import masks as _masks
from ..tensors.shapes import batch_problem

__all__ = ["CropInfo", "square_box", "crop", "crop_mask", "uncrop_mask", "paste", "fingerprint", "fingerprint_problem"]

#: Side of the thumbnail that recognises the cropped photo (per batch item, RGB, area mean).
FINGERPRINT_SIDE = 16
#: Mean absolute difference (0..1) of two thumbnails above which they are different photos. An 8-bit round
#: trip of the same photo differs by < 0.005; a different photo of the same size typically by > 0.1.
FINGERPRINT_TOLERANCE = 0.03


@dataclass(frozen=True)
class CropInfo:
    """Where a crop came from (the ``MAX4ZERO_CROP`` value).

    Attributes:
        original_size: ``(height, width)`` of the image that was cropped.
        box: ``(x0, y0, x1, y1)``, a square in original pixels (half-open); it may reach outside the
            image (negative or beyond the size) when the image is smaller than the box.
        size: side of the crop in pixels (the working size, e.g. 512).
        fingerprint: ``[B, 3, 16, 16]`` thumbnail of the cropped photo (:func:`fingerprint`), so that Paste Back
            can tell the photo this crop came from from another photo of the same size. None = unknown
            (not compared).
    """

    original_size: tuple[int, int]
    box: tuple[int, int, int, int]
    size: int
    fingerprint: Optional[torch.Tensor] = field(default=None, compare=False, repr=False)

    @property
    def side(self) -> int:
        return self.box[2] - self.box[0]

    @property
    def scale(self) -> float:
        """Crop pixels per original pixel."""
        return self.size / self.side

    def inside(self) -> tuple[int, int, int, int]:
        """The part of the box inside the image, ``(x0, y0, x1, y1)`` in original pixels."""
        H, W = self.original_size
        x0, y0, x1, y1 = self.box
        return max(0, x0), max(0, y0), min(W, x1), min(H, y1)


def fingerprint(image: torch.Tensor) -> torch.Tensor:
    """A cheap fingerprint of ``image`` ``[B, C, H, W]``: its RGB area-mean thumbnail, float32 ``[B, 3, 16, 16]`` on CPU.

    Alpha (a 4th channel) plays no part, so an RGBA photo and its RGB copy have the same fingerprint; grey
    is repeated to 3 channels.
    """
    x = image.float()
    x = x[:, :3] if x.shape[1] >= 3 else x[:, :1].expand(-1, 3, -1, -1)
    return F.adaptive_avg_pool2d(x, FINGERPRINT_SIDE).detach().cpu()


def fingerprint_problem(info: "CropInfo", image: torch.Tensor, name: str = "original_image") -> Optional[str]:
    """Why ``image`` ``[B, C, H, W]`` is not the photo ``info`` was cropped from, or None (also None when unknown).

    The size is compared first, then the fingerprint (mean absolute thumbnail difference per batch item;
    a batch of 1 on either side is shared).
    """
    H, W = (int(s) for s in info.original_size)
    if tuple(image.shape[-2:]) != (H, W):
        return (f"{name} is {image.shape[-1]}x{image.shape[-2]} but crop_info was made from a {W}x{H} image")
    ref = info.fingerprint
    if ref is None:
        return None
    cur = fingerprint(image)
    batch = batch_problem({name: cur.shape[0], "the photo crop_info was made from": ref.shape[0]})
    if batch:
        return f"{batch[0]}, so crop_info belongs to another image"
    diff = (cur - ref).abs().mean(dim=(1, 2, 3))
    worst = float(diff.max())
    if worst > FINGERPRINT_TOLERANCE:
        return (f"crop_info was made from another {W}x{H} photo, not from {name} (their thumbnails differ by "
                f"{worst:.2f} on average; the same photo differs by < {FINGERPRINT_TOLERANCE})")
    return None


def square_box(mask: torch.Tensor, padding: float = 0.1, min_side: int = 8) -> tuple[int, int, int, int]:
    """A square around the on-pixels (> 0.5) of ``mask`` (union over the batch), padded.

    Args:
        mask: ``[B, 1, H, W]``, ``[B, H, W]`` or ``[H, W]``; must not be empty.
        padding: added on each side as a fraction of the bounding box's longer side (0.1 → 10 %).
        min_side: smallest side in pixels (a tiny mask still gives a usable crop).

    Returns:
        ``(x0, y0, x1, y1)`` with ``x1 - x0 == y1 - y0``. Centred on the mask's box, then shifted to
        lie inside the image when the side fits; when it does not, the box covers the whole image
        in that direction and stays as centred on the mask as that allows.

    Raises:
        ValueError: empty mask, negative padding.
    """
    if not (isinstance(padding, (int, float)) and padding >= 0 and math.isfinite(padding)):
        raise ValueError(f"padding must be a fraction >= 0, got {padding!r}")
    H, W = int(mask.shape[-2]), int(mask.shape[-1])
    x0, y0, x1, y1 = _masks.bbox(mask)
    side = max(int(math.ceil(max(x1 - x0, y1 - y0) * (1.0 + 2.0 * padding))), int(min_side), 1)

    def place(lo_m: int, hi_m: int, limit: int) -> int:
        lo = int(math.floor((lo_m + hi_m) / 2.0 - side / 2.0))
        if side <= limit:
            return min(max(lo, 0), limit - side)
        return min(max(lo, limit - side), 0)

    bx, by = place(x0, x1, W), place(y0, y1, H)
    return bx, by, bx + side, by + side


def _resize(x: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    down = size < x.shape[-1] or size < x.shape[-2]
    if mode == "nearest":
        return F.interpolate(x, size=(size, size), mode="nearest-exact")
    out = F.interpolate(x.float(), size=(size, size), mode=mode, align_corners=False, antialias=down)
    return out.clamp(0.0, 1.0) if mode == "bicubic" else out


def _extract(x: torch.Tensor, box: tuple[int, int, int, int], pad_mode: str) -> torch.Tensor:
    """Pixels of ``box`` (possibly outside the image) from ``[B, C, H, W]``; outside filled by ``pad_mode``."""
    H, W = x.shape[-2:]
    x0, y0, x1, y1 = box
    ix0, iy0, ix1, iy1 = max(0, x0), max(0, y0), min(W, x1), min(H, y1)
    if ix0 >= ix1 or iy0 >= iy1:
        raise ValueError(f"crop box {box} does not overlap the {W}x{H} image")
    region = x[..., iy0:iy1, ix0:ix1]
    pads = (ix0 - x0, x1 - ix1, iy0 - y0, y1 - iy1)
    if any(pads):
        if pad_mode == "replicate":
            region = F.pad(region.float(), pads, mode="replicate")
        else:
            region = F.pad(region.float(), pads, mode="constant", value=0.0)
    return region


def crop(image: torch.Tensor, info: CropInfo, mode: str = "bicubic") -> torch.Tensor:
    """Crop ``image`` ``[B, C, H, W]`` to ``info.box`` and resize to ``info.size`` square.

    Outside the image the edge pixels are repeated. When the box side equals the size and the box is
    inside the image the pixels are copied exactly. Downscaling is antialiased.
    """
    if tuple(image.shape[-2:]) != tuple(info.original_size):
        raise ValueError(f"image is {tuple(image.shape[-2:])} but the crop was made for {info.original_size}")
    return _resize(_extract(image, info.box, "replicate"), info.size, mode)


def crop_mask(mask: torch.Tensor, info: CropInfo) -> torch.Tensor:
    """Crop a ``[B, 1, H, W]`` mask like :func:`crop` (0 outside the image; soft edges when resized)."""
    if tuple(mask.shape[-2:]) != tuple(info.original_size):
        raise ValueError(f"mask is {tuple(mask.shape[-2:])} but the crop was made for {info.original_size}")
    return _resize(_extract(mask.float(), info.box, "constant"), info.size, "bilinear").clamp(0.0, 1.0)


def _place(x: torch.Tensor, info: CropInfo, mode: str) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Resize a crop ``[B, C, s, s]`` back to the box side; return the part inside the image and where it goes."""
    big = _resize(x, info.side, mode)
    x0, y0, _, _ = info.box
    ix0, iy0, ix1, iy1 = info.inside()
    return big[..., iy0 - y0:iy1 - y0, ix0 - x0:ix1 - x0], (ix0, iy0, ix1, iy1)


def uncrop_mask(mask: torch.Tensor, info: CropInfo) -> torch.Tensor:
    """A crop-space mask ``[B, 1, s, s]`` → original-size ``[B, 1, H, W]`` (0 outside the box)."""
    part, (x0, y0, x1, y1) = _place(mask.float(), info, "bilinear")
    out = torch.zeros((*mask.shape[:2], *info.original_size), dtype=torch.float32, device=mask.device)
    out[..., y0:y1, x0:x1] = part.clamp(0.0, 1.0)
    return out


def _box_blur(m: torch.Tensor, k: int) -> torch.Tensor:
    """Mean over a ``k × k`` window that ignores pixels outside the image (so image borders stay 1)."""
    if k <= 1:
        return m
    return F.avg_pool2d(m, kernel_size=k, stride=1, padding=k // 2, count_include_pad=False)


def paste(
    original: torch.Tensor,
    generated: torch.Tensor,
    info: CropInfo,
    mask: Optional[torch.Tensor] = None,
    feather: int = 3,
    mode: str = "bicubic",
) -> torch.Tensor:
    """Paste a generated crop back into the original image with a feathered seam.

    Args:
        original: ``[B, C, H, W]`` the image that was cropped (``H, W == info.original_size``).
        generated: ``[B, C', s, s]`` the (processed) crop, ``s == info.size`` or any square size;
            batch 1 broadcasts. Grey (C' = 1) is repeated; channels the crop lacks (e.g. the
            original's alpha) are kept from the original.
        info: from the crop.
        mask: where pasting is allowed, ``[B, 1, H, W]`` at the original size or ``[B, 1, s, s]`` at
            the crop size (e.g. the dilated target mask); on where > 0.5. None → the whole box.
        feather: side of the box blur (odd, in original pixels) that softens the seam; the ramp lies
            INSIDE the mask, so every pixel outside it is the original pixel, bit for bit (docs/method.md §3
            Finish: paste the original back outside the mask, blur the seam 3×3). 1 = hard edge.
        mode: resampling of the crop back to the box size ("bicubic", "bilinear" or "nearest").

    Returns:
        ``[B, C, H, W]`` in ``original``'s dtype.
    """
    if tuple(original.shape[-2:]) != tuple(info.original_size):
        raise ValueError(f"original is {tuple(original.shape[-2:])} but the crop was made for {info.original_size}")
    if generated.shape[-1] != generated.shape[-2]:
        raise ValueError(f"generated crop is {tuple(generated.shape[-2:])}, expected a square (the crop's output)")
    if generated.shape[1] == 1 and original.shape[1] > 1:
        generated = generated.expand(-1, original.shape[1], -1, -1)
    c = min(generated.shape[1], original.shape[1])  # extra original channels (alpha) are kept
    if isinstance(feather, bool) or not isinstance(feather, int) or feather < 1 or feather % 2 == 0:
        raise ValueError(f"feather must be a positive odd int (blur side in pixels), got {feather!r}")
    B = max(original.shape[0], generated.shape[0])
    H, W = info.original_size
    part, (x0, y0, x1, y1) = _place(generated.to(original.device), info, mode)
    gen_full = original.float().expand(B, -1, -1, -1).clone()
    gen_full[:, :c, y0:y1, x0:x1] = part[:, :c].float()
    inside = torch.zeros((1, 1, H, W), dtype=torch.bool, device=original.device)
    inside[..., y0:y1, x0:x1] = True
    if mask is None:
        allowed = inside
    else:
        if tuple(mask.shape[-2:]) == (H, W):
            m = mask.to(original.device).float()
        elif mask.shape[-1] == mask.shape[-2]:
            m = uncrop_mask(mask.to(original.device), info)
        else:
            raise ValueError(
                f"mask is {tuple(mask.shape[-2:])}: give it at the original size {(H, W)} or at the crop size")
        allowed = (m > 0.5) & inside
    alpha = _box_blur(allowed.float(), feather) * allowed
    alpha = alpha.expand(B, 1, H, W)
    blended = original.float() * (1.0 - alpha) + gen_full * alpha
    out = torch.where(alpha > 0, blended, original.float().expand_as(blended))
    if c < original.shape[1]:  # channels the crop lacks (alpha): the original's, bit for bit
        out[:, c:] = original.float().expand(B, -1, -1, -1)[:, c:]
    return out.to(original.dtype)
