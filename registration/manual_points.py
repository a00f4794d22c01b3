"""Hand-made control points (MLS Warp's ``manual_points``): how they combine with the automatic matches, what is
refused, and the warnings the artist sees on the node and in the point editor (docs/point-editor.md).

One set of rules for typed points and for points placed in the editor: :func:`manual_points_problem` says why a
set is refused (the node raises it; the editor never writes such a set), :func:`point_warnings` lists what is
legal but probably wrong (the node shows it on itself; the editor asks the server for the same list while the
artist edits, so the words are written once, in ``warping/point_checks.py``). No ComfyUI import.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..warping import mls as _mls
from ..warping import point_checks as _checks
from .matches import Matches

__all__ = [
    "MODES", "REPLACE", "ADD", "MAX_MANUAL_POINTS", "PREVIEW_STRIDE", "combine", "manual_points_problem",
    "point_warnings", "editor_rules",
]

#: MLS Warp's ``manual_points_mode`` choices. The first is the default: what the node did before the choice existed.
REPLACE = "replace the automatic matches"
ADD = "add to the automatic matches"
MODES = (REPLACE, ADD)
#: More hand-made pairs than this are refused: a 1024 px crop's whole 64x64 feature grid (Correspondence never
#: gives more), so a bigger list is a pasted mistake, and MLS's cost grows with every point.
MAX_MANUAL_POINTS = 4096
#: Coarse-grid stride (px) of the map the fold warning is measured on; the editor's live preview uses the same.
PREVIEW_STRIDE = 8


def combine(manual: Optional[Matches], automatic: Optional[Matches], mode: str,
            reference_hw: tuple[int, int], target_hw: tuple[int, int]) -> Optional[Matches]:
    """The control points MLS Warp uses, at ``reference_hw`` / ``target_hw`` pixels.

    ``REPLACE``: the manual points when there are any, else the automatic ones. ``ADD``: the automatic points
    followed by the manual ones (either may be missing). None when there is neither.

    Raises:
        ValueError: ``mode`` is not one of :data:`MODES`.
    """
    if mode not in MODES:
        raise ValueError(f"manual_points_mode must be one of {list(MODES)}, got {mode!r}")
    parts = [manual] if (mode == REPLACE and manual is not None) else [automatic, manual]
    parts = [m.rescaled(reference_hw, target_hw) if (m.reference_size, m.target_size) != (tuple(reference_hw),
             tuple(target_hw)) else m for m in parts if m is not None and len(m)]
    if not parts:
        return None
    if len(parts) == 1:
        return parts[0]
    return Matches(torch.cat([m.reference_points for m in parts]), torch.cat([m.target_points for m in parts]),
                   torch.cat([m.scores for m in parts]), tuple(reference_hw), tuple(target_hw))


def manual_points_problem(manual: Matches) -> Optional[str]:
    """Why a parsed ``manual_points`` set is refused (too many pairs), or None.

    Parsing (``Matches.from_json``) already refuses NaN, inf and malformed pairs, and ``recipe.far_points_problem``
    points far outside their images; the editor keeps every point inside its image, one pair per point.
    """
    if len(manual) > MAX_MANUAL_POINTS:
        return (f"{len(manual)} control point pairs, more than the {MAX_MANUAL_POINTS} MLS Warp takes by hand: "
                "keep a few dozen well-spread pairs (both shoulders, the hem, the outline)")
    return None


def point_warnings(matches: Matches, kind: str = "affine", alpha: float = 0.1) -> list[str]:
    """Plain-language warnings for a set of control points (``warping/point_checks.py``'s words).

    The point checks (fewer than 3, on one line, duplicates, mirrored), then the folded-warp check on the MLS map
    of ``kind`` / ``alpha`` evaluated every :data:`PREVIEW_STRIDE` px, counted on the person pixels that read
    inside the garment photo. Coordinates as in ``matches`` (its own sizes).
    """
    out = _checks.control_point_warnings(matches.reference_points, matches.target_points)
    if out or len(matches) < 3:
        return out  # degenerate sets: the map is a fallback (docs/method.md §2d), its folds say nothing more
    (ht, wt), (hr, wr) = matches.target_size, matches.reference_size
    coords = _mls.backward_map(matches.target_points.double(), matches.reference_points.double(), ht, wt,
                               kind=kind, alpha=float(alpha), stride=PREVIEW_STRIDE)
    inside = ((coords[..., 0] >= -0.5) & (coords[..., 0] <= wr - 0.5)
              & (coords[..., 1] >= -0.5) & (coords[..., 1] <= hr - 0.5))
    fold = _checks.fold_warning(_checks.fold_fraction(coords, inside), "the person pixels that show the garment photo")
    return out + ([fold] if fold else [])


def editor_rules() -> dict:
    """The numbers the point editor enforces while placing points, from the one place that defines them."""
    return {"duplicate_px": _checks.DUPLICATE_PX, "max_points": MAX_MANUAL_POINTS, "modes": list(MODES),
            "replace": REPLACE, "add": ADD, "preview_stride": PREVIEW_STRIDE}
