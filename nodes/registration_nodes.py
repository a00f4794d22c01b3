"""Stage-1 nodes (V3 schema): correspondence, MLS warp, double-mask inpaint, crop / paste, one module each.

Thin glue: conversions in ``convert``, logic in ``registration``, ``geometry``, ``preview``, ``features`` and
``warping/``; shared checks in ``stage1_checks``. Ids are final (``MaX4Zero`` prefix); never rename them.
"""

from __future__ import annotations

from .correspondence_node import Correspondence
from .crop_nodes import CropToMask, PasteBack
from .warp_nodes import DoubleMaskInpaint, MLSWarp

NODES = [Correspondence, MLSWarp, DoubleMaskInpaint, CropToMask, PasteBack]
