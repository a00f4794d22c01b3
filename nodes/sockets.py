"""The pack's own socket types (V3 ``io.Custom``) and node category, declared once. Their names are saved in
workflows or shown in the node menu: final."""

from __future__ import annotations

from comfy_api.latest import io

__all__ = ["CATEGORY", "MATCHES", "CROP", "TRACE"]

#: the node menu's folder of every MaX4Zero node
CATEGORY = "MaX4Zero"

#: control-point pairs (``registration/matches.py: Matches``): Correspondence → MLS Warp, Double-Mask Inpaint, Flow View
MATCHES = io.Custom("MAX4ZERO_MATCHES")
#: where a crop came from (``registration/crop.py``): Crop To Mask → Paste Back
CROP = io.Custom("MAX4ZERO_CROP")
#: the attention trace handle (``nodes/trace.py: MeaTrace``): Masked Extended Attention → Flow View
TRACE = io.Custom("MAX4ZERO_TRACE")
