"""Preview images for the registration nodes (pure torch; channels-first ``[C, H, W]`` in 0..1).

* :func:`match_preview` — reference and target side by side, one line per control-point pair,
  coloured by score (red = lowest score of the set, yellow, green = highest); pixels outside each
  image's mask are dimmed.
* :func:`warp_preview` — the warped garment over the target, with a reference-space grid carried
  through the same warp (shows how MLS bends the garment).
* :func:`fringe_preview` — the composite with the thin fringe F tinted red and the ring D∖F yellow.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["score_colors", "draw_lines", "match_preview", "grid_lines", "warp_preview", "fringe_preview"]


def _rgb(img: torch.Tensor) -> torch.Tensor:
    """``[C, H, W]`` → 3 channels (grey repeated, alpha dropped)."""
    if img.shape[0] == 1:
        return img.expand(3, -1, -1)
    return img[:3]


def score_colors(scores: torch.Tensor) -> torch.Tensor:
    """``[K]`` scores → ``[K, 3]`` RGB, red (lowest) → yellow → green (highest), relative to the set."""
    s = scores.float()
    if s.numel() == 0:
        return torch.zeros(0, 3)
    lo, hi = float(s.min()), float(s.max())
    u = (s - lo) / (hi - lo) if hi > lo else torch.ones_like(s)
    r = (2.0 * (1.0 - u)).clamp(0, 1)
    g = (2.0 * u).clamp(0, 1)
    return torch.stack([r, g, torch.zeros_like(u)], dim=1)


def draw_lines(canvas: torch.Tensor, p0: torch.Tensor, p1: torch.Tensor, colors: torch.Tensor) -> torch.Tensor:
    """Draw 1-px segments ``p0[k] → p1[k]`` (pixel ``(x, y)``) with ``colors[k]`` into ``[3, H, W]`` (in place)."""
    if p0.numel() == 0:
        return canvas
    _, H, W = canvas.shape
    length = int(torch.ceil((p1 - p0).norm(dim=1).max()).item()) + 1
    t = torch.linspace(0.0, 1.0, max(2, length))
    pts = p0[:, None, :] + (p1 - p0)[:, None, :] * t[None, :, None]  # [K, n, 2]
    xy = pts.round().long()
    ok = (xy[..., 0] >= 0) & (xy[..., 0] < W) & (xy[..., 1] >= 0) & (xy[..., 1] < H)
    col = colors[:, None, :].expand(-1, xy.shape[1], -1)
    flat = (xy[..., 1] * W + xy[..., 0])[ok]
    canvas.view(3, -1)[:, flat] = col[ok].t().to(canvas.dtype)
    return canvas


def _dots(canvas: torch.Tensor, p: torch.Tensor, colors: torch.Tensor, r: int = 1) -> None:
    for dx in range(-r, r + 1):
        for dy in range(-r, r + 1):
            q = p + torch.tensor([float(dx), float(dy)])
            draw_lines(canvas, q, q, colors)


def _fit_height(img: torch.Tensor, h: int) -> tuple[torch.Tensor, float]:
    scale = h / img.shape[-2]
    if img.shape[-2] == h:
        return img, 1.0
    w = max(1, int(round(img.shape[-1] * scale)))
    return F.interpolate(img[None].float(), size=(h, w), mode="bilinear", align_corners=False,
                         antialias=True)[0].clamp(0, 1), scale


def match_preview(
    reference: torch.Tensor,
    target: torch.Tensor,
    reference_points: torch.Tensor,
    target_points: torch.Tensor,
    scores: torch.Tensor,
    reference_mask: Optional[torch.Tensor] = None,
    target_mask: Optional[torch.Tensor] = None,
    max_lines: int = 300,
    gap: int = 8,
) -> torch.Tensor:
    """Side-by-side ``[3, H, Wr + gap + Wt]`` image with the matches drawn (at most ``max_lines``, best first).

    Args:
        reference, target: ``[C, H, W]`` images (heights may differ: both are scaled to the larger one).
        reference_points, target_points: ``[K, 2]`` pixel ``(x, y)`` in those images.
        scores: ``[K]``.
        reference_mask, target_mask: optional ``[H, W]``; outside them the image is dimmed.
    """
    def dim(img, m):
        img = _rgb(img.float())
        if m is None:
            return img
        return img * (0.35 + 0.65 * (m.float() > 0.5)[None])

    H = max(reference.shape[-2], target.shape[-2])
    ref, rs = _fit_height(dim(reference, reference_mask), H)
    tgt, ts = _fit_height(dim(target, target_mask), H)
    canvas = torch.cat([ref, torch.ones(3, H, gap), tgt], dim=2).clone()
    K = reference_points.shape[0]
    if K:
        order = torch.argsort(scores.float(), descending=True, stable=True)[:max_lines]
        order = order.flip(0)  # draw the best last, so it ends on top
        a = reference_points[order].float() * rs
        b = target_points[order].float() * ts + torch.tensor([float(ref.shape[-1] + gap), 0.0])
        col = score_colors(scores[order])
        draw_lines(canvas, a, b, col)
        _dots(canvas, a, col)
        _dots(canvas, b, col)
    return canvas


def grid_lines(h: int, w: int, step: int = 16) -> torch.Tensor:
    """``[1, 1, h, w]`` float mask with 1-px lines every ``step`` pixels."""
    yy = torch.arange(h)[:, None]
    xx = torch.arange(w)[None, :]
    return (((yy % step) == 0) | ((xx % step) == 0)).float()[None, None]


def warp_preview(target: torch.Tensor, warped: torch.Tensor, warped_mask: torch.Tensor,
                 warped_grid: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]``: the warped garment (75 %) over the target where the warped mask is on, with the
    warped reference grid drawn in magenta."""
    t = _rgb(target.float())
    m = (warped_mask.float() > 0.5)[None]
    out = torch.where(m, 0.75 * _rgb(warped.float()) + 0.25 * t, t)
    g = (warped_grid.float() > 0.3)[None] & m
    magenta = torch.tensor([1.0, 0.0, 1.0])[:, None, None]
    return torch.where(g, magenta.expand_as(out), out)


def fringe_preview(composite: torch.Tensor, thin: torch.Tensor, dilated: torch.Tensor) -> torch.Tensor:
    """``[3, H, W]``: composite with F tinted red (generated) and D∖F tinted yellow (context ring)."""
    c = _rgb(composite.float())
    f = (thin.float() > 0.5)[None]
    ring = (dilated.float() > 0.5)[None] & ~f
    red = torch.tensor([1.0, 0.1, 0.1])[:, None, None]
    yellow = torch.tensor([1.0, 0.9, 0.1])[:, None, None]
    out = torch.where(f, 0.45 * c + 0.55 * red, c)
    return torch.where(ring, 0.6 * out + 0.4 * yellow, out)
