"""The pack-private ``MAX4ZERO_MATCHES`` value: control-point pairs between reference and target.

Produced by the correspondence node, consumed by the MLS warp node. It can also be written by
hand as JSON (the MLS warp node's ``manual_points`` input), so an artist can fix a bad
correspondence; :meth:`Matches.to_json` prints the current points in that format to start from.

Coordinates are float pixels ``(x, y)`` (x to the right, y down, origin at the top-left corner of
the top-left pixel's sample point, i.e. pixel ``(col, row)`` is at ``(col, row)``) in the images
that were given to the correspondence node. No ComfyUI import.

JSON format (all keys but ``points`` optional)::

    {"format": "max4zero-matches/1",
     "reference_size": [height, width], "target_size": [height, width],
     "points": [{"reference": [x, y], "target": [x, y], "score": 0.93}, ...]}

Short forms accepted for hand editing: ``"points"`` (or the whole document) may be a list of
``[[xr, yr], [xt, yt]]`` pairs or of ``[xr, yr, xt, yt]`` rows; a missing score is 1.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..tensors.shapes import as_hw

__all__ = ["Matches", "FORMAT"]

FORMAT = "max4zero-matches/1"


@dataclass(frozen=True)
class Matches:
    """Control-point pairs: ``reference_points[k]`` in the reference ↔ ``target_points[k]`` in the target.

    Attributes:
        reference_points: float32 ``[K, 2]`` pixel ``(x, y)`` in the reference image.
        target_points: float32 ``[K, 2]`` pixel ``(x, y)`` in the target image.
        scores: float32 ``[K]`` match confidence (cosine similarity; 1 for hand-made points).
        reference_size: ``(height, width)`` of the reference image the points refer to.
        target_size: ``(height, width)`` of the target image.
        target_region: bool ``[H, W]`` processed target mask the correspondence matched in (at
            ``target_size``), or None (hand-made points). Not serialised; Double-Mask Inpaint checks that it
            repaints this same region.
    """

    reference_points: torch.Tensor
    target_points: torch.Tensor
    scores: torch.Tensor
    reference_size: tuple[int, int]
    target_size: tuple[int, int]
    target_region: Optional[torch.Tensor] = None

    def __post_init__(self) -> None:
        rp, tp, sc = self.reference_points, self.target_points, self.scores
        for name, p in (("reference_points", rp), ("target_points", tp)):
            if not isinstance(p, torch.Tensor) or p.ndim != 2 or p.shape[1] != 2:
                raise ValueError(f"{name} must be a [K, 2] tensor of (x, y) pixels, got "
                                 f"{tuple(p.shape) if isinstance(p, torch.Tensor) else type(p).__name__}")
        if rp.shape != tp.shape or not isinstance(sc, torch.Tensor) or sc.shape != rp.shape[:1]:
            raise ValueError(
                f"reference_points {tuple(rp.shape)}, target_points {tuple(tp.shape)} and scores "
                f"{tuple(sc.shape) if isinstance(sc, torch.Tensor) else sc!r} must have one length K"
            )
        if not (torch.isfinite(rp).all() and torch.isfinite(tp).all() and torch.isfinite(sc).all()):
            raise ValueError("control points and scores must be finite numbers")
        object.__setattr__(self, "reference_points", rp.detach().to("cpu", torch.float32).contiguous())
        object.__setattr__(self, "target_points", tp.detach().to("cpu", torch.float32).contiguous())
        object.__setattr__(self, "scores", sc.detach().to("cpu", torch.float32).contiguous())
        object.__setattr__(self, "reference_size", as_hw(self.reference_size, "reference_size", square_ok=False))
        object.__setattr__(self, "target_size", as_hw(self.target_size, "target_size", square_ok=False))
        if self.target_region is not None:
            region = self.target_region.detach().to("cpu") > 0.5 if self.target_region.is_floating_point() else \
                self.target_region.detach().to("cpu").bool()
            if tuple(region.shape) != self.target_size:
                raise ValueError(f"target_region is {tuple(region.shape)}, expected the target size {self.target_size}")
            object.__setattr__(self, "target_region", region)

    def __len__(self) -> int:
        return int(self.reference_points.shape[0])

    # -- serialisation ---------------------------------------------------------------------

    def to_dict(self, decimals: int = 3) -> dict:
        """JSON-ready dict in the documented format (coordinates rounded to ``decimals``)."""
        def r(v: float) -> float:
            return round(float(v), decimals)

        return {
            "format": FORMAT,
            "reference_size": list(self.reference_size),
            "target_size": list(self.target_size),
            "points": [
                {"reference": [r(a[0]), r(a[1])], "target": [r(b[0]), r(b[1])], "score": r(s)}
                for a, b, s in zip(self.reference_points.tolist(), self.target_points.tolist(), self.scores.tolist())
            ],
        }

    def to_json(self, indent: Optional[int] = None, decimals: int = 3) -> str:
        return json.dumps(self.to_dict(decimals), indent=indent)

    @classmethod
    def from_json(
        cls,
        text: str | dict | list,
        reference_size: Optional[Sequence[int]] = None,
        target_size: Optional[Sequence[int]] = None,
    ) -> "Matches":
        """Parse the JSON format (or its short forms); sizes missing from the JSON come from the arguments.

        Raises:
            ValueError: invalid JSON, malformed points, no points, missing sizes. The message says
            which point is wrong and shows the expected form.
        """
        example = '{"points": [{"reference": [120, 80], "target": [140, 96]}]}'
        if isinstance(text, str):
            if not text.strip():
                raise ValueError(f"the control-point JSON is empty: write e.g. {example}")
            try:
                doc = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ValueError(f"the control-point JSON does not parse ({exc.msg} at line {exc.lineno} "
                                 f"column {exc.colno}): write e.g. {example}") from None
        else:
            doc = text
        if isinstance(doc, list):
            doc = {"points": doc}
        if not isinstance(doc, dict) or "points" not in doc:
            raise ValueError(f"the control-point JSON needs a 'points' list: write e.g. {example}")
        fmt = doc.get("format", FORMAT)
        if fmt != FORMAT:
            raise ValueError(f"unknown control-point format {fmt!r} (this version reads {FORMAT!r})")
        ref_size = doc.get("reference_size", reference_size)
        tgt_size = doc.get("target_size", target_size)
        if ref_size is None or tgt_size is None:
            raise ValueError("the control-point JSON gives no reference_size/target_size and none were "
                             "supplied: add \"reference_size\": [h, w] and \"target_size\": [h, w]")
        pts = doc["points"]
        if not isinstance(pts, list) or not pts:
            raise ValueError(f"the control-point JSON has no points: write e.g. {example}")
        ref, tgt, sc = [], [], []
        for i, p in enumerate(pts):
            try:
                if isinstance(p, dict):
                    a, b = p["reference"], p["target"]
                    s = p.get("score", 1.0)
                elif isinstance(p, (list, tuple)) and len(p) == 2:
                    (a, b), s = p, 1.0
                elif isinstance(p, (list, tuple)) and len(p) in (4, 5):
                    a, b, s = p[0:2], p[2:4], (p[4] if len(p) == 5 else 1.0)
                else:
                    raise TypeError
                xa, ya = (float(v) for v in a)
                xb, yb = (float(v) for v in b)
                s = float(s)
            except (KeyError, TypeError, ValueError):
                raise ValueError(
                    f"control point #{i} ({json.dumps(p)[:80]}) is malformed: each point is "
                    '{"reference": [x, y], "target": [x, y], "score": s} or [[x, y], [x, y]]'
                ) from None
            if not all(math.isfinite(v) for v in (xa, ya, xb, yb, s)):
                raise ValueError(f"control point #{i} has a non-finite number: use plain pixel coordinates")
            ref.append((xa, ya))
            tgt.append((xb, yb))
            sc.append(s)
        return cls(torch.tensor(ref), torch.tensor(tgt), torch.tensor(sc), as_hw(ref_size, "reference_size", square_ok=False),
                   as_hw(tgt_size, "target_size", square_ok=False))

    # -- geometry --------------------------------------------------------------------------

    def rescaled(self, reference_size: Sequence[int], target_size: Sequence[int]) -> "Matches":
        """The same correspondences for images resized to the given ``(height, width)`` sizes.

        Pixel centres stay pixel centres: ``x' = (x + 0.5) · W'/W − 0.5`` (likewise y), the convention of
        the MLS warp and of ``F.interpolate(align_corners=False)``.
        """
        rh, rw = as_hw(reference_size, "reference_size", square_ok=False)
        th, tw = as_hw(target_size, "target_size", square_ok=False)
        rs = torch.tensor([rw / self.reference_size[1], rh / self.reference_size[0]])
        ts = torch.tensor([tw / self.target_size[1], th / self.target_size[0]])
        return Matches((self.reference_points + 0.5) * rs - 0.5, (self.target_points + 0.5) * ts - 0.5, self.scores,
                       (rh, rw), (th, tw))

    def subset(self, keep: torch.Tensor) -> "Matches":
        """Matches selected by a bool mask or index tensor over K."""
        return Matches(self.reference_points[keep], self.target_points[keep], self.scores[keep],
                       self.reference_size, self.target_size)
