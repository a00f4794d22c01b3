"""Plain-language warnings about hand-made control points, before they give a degenerate or folded MLS warp.

MLS (``warping.mls``) never fails on a bad set of control points: one or two points, points on one line or
one garment pixel sent to two places all give *a* map (docs/method.md §2d lists its fallbacks), but not the
one the user meant. These checks say what is wrong and what to do. They are used by the registration demo
(``tools/registration_demo.py``) and are meant for MLS Warp's ``manual_points``; they never change the points.

* :func:`control_point_warnings` — on the points alone: fewer than 3 pairs, all reference (or all target)
  points on one line, one reference point sent to two different targets (or two garment points to one person
  pixel), and a mirrored garment (the best affine fit flips it).
* :func:`fold_fraction` — on a computed backward map: the share of pixels where the map turns the garment
  over (Jacobian determinant ≤ 0), which crossing or swapped pairs cause; :func:`fold_warning` says it in words
  once that share passes :data:`FOLD_WARN_FRACTION`.

Coordinates are pixel ``(x, y)``, as everywhere in ``warping``. Pure PyTorch, no ComfyUI import.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch

__all__ = ["control_point_warnings", "fold_fraction", "fold_warning", "DUPLICATE_PX", "COLLINEAR_FRACTION",
           "FOLD_WARN_FRACTION"]

#: Two points closer than this (pixels) are the same point.
DUPLICATE_PX = 0.5
#: Points whose RMS distance to their best-fit line is below this fraction of their RMS spread along it
#: (or below :data:`DUPLICATE_PX`) are "on one line": an affine fit is then (nearly) singular.
COLLINEAR_FRACTION = 0.02
#: Share of the counted pixels where the warp may turn the garment over before :func:`fold_warning` says so.
FOLD_WARN_FRACTION = 0.001


def _coords(x: Any, name: str) -> torch.Tensor:
    t = torch.as_tensor(x, dtype=torch.float64).detach().cpu()
    if t.numel() == 0:
        return t.reshape(0, 2)
    if t.ndim != 2 or t.shape[1] != 2:
        raise ValueError(f"{name} must be a list of [x, y] pixel pairs, got shape {tuple(t.shape)}")
    return t


def _name(i: int, labels: Optional[Sequence[str]]) -> str:
    label = labels[i] if labels is not None and i < len(labels) else None
    return f"{i + 1} ({label})" if label and label != str(i + 1) else f"{i + 1}"


def _xy(p: torch.Tensor) -> str:
    return f"({p[0].item():g}, {p[1].item():g})"


def _line_spread(points: torch.Tensor) -> tuple[float, float]:
    """(RMS distance to the best-fit line, RMS spread along it) of ``[K, 2]`` points."""
    centred = points - points.mean(dim=0)
    s = torch.linalg.svdvals(centred)
    k = points.shape[0] ** 0.5
    return float(s[-1]) / k, float(s[0]) / k


def _duplicates(key: torch.Tensor, other: torch.Tensor, tol: float) -> list[tuple[int, int]]:
    """Pairs (i, j), i < j, with the same ``key`` point but ``other`` points more than ``tol`` apart."""
    d_key = torch.cdist(key, key)
    d_other = torch.cdist(other, other)
    i, j = torch.nonzero(torch.triu((d_key <= tol) & (d_other > tol), diagonal=1), as_tuple=True)
    return list(zip(i.tolist(), j.tolist()))


def control_point_warnings(
    reference: Any,
    target: Any,
    labels: Optional[Sequence[str]] = None,
    *,
    duplicate_px: float = DUPLICATE_PX,
    collinear_fraction: float = COLLINEAR_FRACTION,
) -> list[str]:
    """Warnings, one sentence each with what to do, for control points that give a degenerate or folded warp.

    Args:
        reference: ``[K, 2]`` pixel (x, y) on the garment photo.
        target: ``[K, 2]`` the same garment points on the person photo, same order.
        labels: optional names of the pairs, used in the messages (pairs are numbered from 1).
        duplicate_px: distance under which two points count as one.
        collinear_fraction: see :data:`COLLINEAR_FRACTION`.

    Returns:
        An empty list when the points can define a proper warp.

    Raises:
        ValueError: the two lists differ in length or are not ``[K, 2]``.
    """
    ref, tgt = _coords(reference, "reference"), _coords(target, "target")
    if ref.shape != tgt.shape:
        raise ValueError(f"{ref.shape[0]} reference points but {tgt.shape[0]} target points: give pairs")
    k = ref.shape[0]
    if k == 0:
        return ["no control points: give at least 3 pairs spread over the garment (e.g. both shoulders and the hem)"]
    out: list[str] = []

    for i, j in _duplicates(ref, tgt, duplicate_px):
        out.append(
            f"reference points {_name(i, labels)} and {_name(j, labels)} are the same garment pixel {_xy(ref[i])} "
            f"but go to two places on the person, {_xy(tgt[i])} and {_xy(tgt[j])}: the garment is torn apart "
            "between them and folds around them. Keep one of the two pairs, or move one reference point to the "
            "garment pixel that really belongs there."
        )
    for i, j in _duplicates(tgt, ref, duplicate_px):
        out.append(
            f"target points {_name(i, labels)} and {_name(j, labels)} are the same person pixel {_xy(tgt[i])} but "
            f"read two garment pixels, {_xy(ref[i])} and {_xy(ref[j])}: the warp averages them there and "
            "squeezes the garment between them into one spot. Keep one of the two pairs."
        )

    # Distinct pairs only from here on (an exact repeat of a pair is harmless).
    distinct = torch.unique(torch.round(torch.cat([ref, tgt], 1) / max(duplicate_px, 1e-9)), dim=0).shape[0]
    if distinct < 3:
        n = "one" if distinct == 1 else "two"
        what = ("moves the whole garment by one offset" if distinct == 1 else
                "can only rotate and scale the whole garment (no shear, no per-part bending)")
        out.append(
            f"only {n} distinct control point pair{'s' if distinct > 1 else ''}: MLS then {what}. Add pairs to "
            "reach at least 3 spread over the garment and not on one line (e.g. both shoulders and the middle "
            "of the hem); a dozen along the outline is better."
        )
        return out

    for name, pts in (("reference", ref), ("target", tgt)):
        off_line, along = _line_spread(pts)
        if off_line <= max(duplicate_px, collinear_fraction * along):
            out.append(
                f"all {name} points lie on one line (they are {off_line:.2g} px from it on average, "
                f"{along:.3g} px along it): an affine MLS cannot tell how the garment extends across that line, "
                "so it squashes or stretches it there arbitrarily. Add points away from the line (e.g. a "
                "shoulder and the hem as well as the points on the chest)."
            )
    if any("lie on one line" in w for w in out):
        return out

    # Best affine fit reference -> target: a negative determinant mirrors the garment.
    ones = torch.ones(k, 1, dtype=torch.float64)
    a = torch.linalg.lstsq(torch.cat([ref, ones], 1), tgt).solution  # [3, 2]
    det = float(torch.linalg.det(a[:2]))
    if det < 0:
        out.append(
            "the points mirror the garment (its left lands on the person's right): the pairs are probably "
            "listed in a different order on the two photos, or left and right were swapped. Check that "
            "reference point i and target point i are the same part of the garment for every i."
        )
    return out


def fold_fraction(coords: torch.Tensor, region: Optional[torch.Tensor] = None) -> float:
    """Share of pixels where a backward map turns the garment over (Jacobian determinant ≤ 0).

    Args:
        coords: ``[H, W, 2]`` reference (x, y) read by each target pixel (``mls.backward_map``'s output).
        region: optional bool ``[H, W]``; only its pixels are counted (e.g. the person's try-on mask).

    Returns:
        A fraction in [0, 1] (0 when the region is empty or the map is smaller than 2×2). A healthy MLS warp
        through good points gives 0; crossing or swapped pairs give folds around them.
    """
    c = torch.as_tensor(coords).detach().to("cpu", torch.float64)
    if c.ndim != 3 or c.shape[-1] != 2:
        raise ValueError(f"coords must be [H, W, 2], got {tuple(c.shape)}")
    h, w = c.shape[:2]
    if h < 2 or w < 2:
        return 0.0
    dx = c[:-1, 1:] - c[:-1, :-1]  # d(coords)/dx
    dy = c[1:, :-1] - c[:-1, :-1]  # d(coords)/dy
    det = dx[..., 0] * dy[..., 1] - dx[..., 1] * dy[..., 0]
    folded = det <= 0
    if region is not None:
        r = torch.as_tensor(region).detach().to("cpu").bool()[:-1, :-1]
        n = int(r.sum())
        return float((folded & r).sum()) / n if n else 0.0
    return float(folded.float().mean())


def fold_warning(fraction: float, where: str = "the person mask", picture: str = "") -> Optional[str]:
    """The folded-warp warning for a :func:`fold_fraction` result, or None below :data:`FOLD_WARN_FRACTION`.

    ``where`` names the pixels the fraction was counted on; ``picture`` optionally names where to see it.
    """
    if not fraction > FOLD_WARN_FRACTION:
        return None
    see = f" (see {picture}: grid lines cross there)" if picture else ""
    return (f"the warp turns the garment over on {100 * fraction:.1f} % of {where}{see}: some pairs cross each "
            "other, e.g. two target points swapped. Check that reference point i and target point i are the same "
            "part of the garment for every i, or use fewer, better spread points there.")
