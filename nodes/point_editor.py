"""What MLS Warp hands its point editor (web/point_editor.js): the crops as temporary previews, the automatic matches
and the rules, sent as the node's UI output; and the server route the editor asks for warnings while the artist
edits (the words of ``warping/point_checks.py``, never copied into the JavaScript).

The payload's parts that need no ComfyUI (:func:`editor_payload`, :func:`check_request`) are plain functions;
saving the previews and the route import ComfyUI lazily, so the normal test suite runs them without it.
"""

from __future__ import annotations

import logging
import os
import random
from typing import Any, Callable, Optional

import torch

from ..registration import manual_points as _manual
from ..registration.matches import FORMAT, Matches
from ..warping.mls import KINDS
from ..warping.point_checks import control_point_warnings

__all__ = ["UI_KEY", "ROUTE", "editor_payload", "check_request", "save_temp_png", "register_route"]

log = logging.getLogger("MaX4Zero")

#: The key of MLS Warp's UI output that carries the editor's payload (one dict in a list, as UI outputs are).
UI_KEY = "max4zero_point_editor"
#: POST {points, reference_size, target_size, kind, alpha} -> {warnings, problem}.
ROUTE = "/max4zero/point_editor/check"
_REGISTERED = False


def _rows(m: Optional[Matches]) -> list[list[float]]:
    if m is None:
        return []
    return [[round(a, 3), round(b, 3), round(c, 3), round(d, 3)]
            for (a, b), (c, d) in zip(m.reference_points.tolist(), m.target_points.tolist())]


def editor_payload(images: dict[str, Any], reference_hw: tuple[int, int], target_hw: tuple[int, int],
                   automatic: Optional[Matches], kind: str, alpha: float, mode: str) -> dict:
    """The editor's payload: ``images`` (garment, garment_mask, person: ``{filename, subfolder, type}`` each), the
    image sizes ``[h, w]``, the automatic matches as ``[xr, yr, xt, yt]`` rows at those sizes (after
    Correspondence's filtering; empty when none are connected), the node's kind/alpha/mode and the rules.
    """
    auto = automatic
    if auto is not None and (auto.reference_size, auto.target_size) != (tuple(reference_hw), tuple(target_hw)):
        auto = auto.rescaled(reference_hw, target_hw)
    return {
        "format": FORMAT,
        "images": images,
        "reference_size": [int(reference_hw[0]), int(reference_hw[1])],
        "target_size": [int(target_hw[0]), int(target_hw[1])],
        "automatic": _rows(auto),
        "kind": kind,
        "alpha": float(alpha),
        "mode": mode,
        "rules": _manual.editor_rules(),
    }


def check_request(body: Any) -> dict:
    """The route's answer for a request body: ``{"warnings": [...], "problem": str | None}``.

    ``points`` are ``[xr, yr, xt, yt]`` rows at ``reference_size`` / ``target_size`` (``[h, w]``). A body that is
    not such a request gets ``problem`` (the parser's words) and no warnings.
    """
    try:
        if not isinstance(body, dict):
            raise ValueError("the request must be a JSON object")
        rows = body.get("points") or []
        kind = body.get("kind", "affine")
        alpha = float(body.get("alpha", 0.1))
        if kind not in KINDS or not alpha > 0:
            raise ValueError(f"kind must be one of {list(KINDS)} and alpha > 0")
        if not rows:
            return {"warnings": control_point_warnings([], []), "problem": None}
        m = Matches.from_json({"points": rows, "reference_size": body.get("reference_size"),
                               "target_size": body.get("target_size")})
    except (TypeError, ValueError) as exc:
        return {"warnings": [], "problem": str(exc)}
    problem = _manual.manual_points_problem(m)
    return {"warnings": [] if problem else _manual.point_warnings(m, kind, alpha), "problem": problem}


def save_temp_png(pixels: torch.Tensor, prefix: str = "max4zero_points") -> dict:
    """Save ``[H, W, C]`` (C = 1 or 3, values 0..1) into ComfyUI's temp folder the way PreviewImage does; returns
    the ``{filename, subfolder, type}`` the frontend's ``/view`` route takes."""
    import folder_paths
    import numpy as np
    from PIL import Image

    arr = (pixels.detach().float().clamp(0, 1).cpu().numpy() * 255.0).round().astype(np.uint8)
    img = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr)
    tag = "".join(random.choice("abcdefghijklmnopqrstupvxyz") for _ in range(5))
    folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(
        f"{prefix}_{tag}", folder_paths.get_temp_directory(), img.width, img.height)
    file = f"{name}_{counter:05}_.png"
    img.save(os.path.join(folder, file), compress_level=1)
    return {"filename": file, "subfolder": subfolder, "type": "temp"}


def register_route(routes: Any = None, check: Callable[[Any], dict] = check_request) -> bool:
    """Add :data:`ROUTE` to the running ComfyUI server's routes (before it starts serving); False without one."""
    global _REGISTERED
    server_routes = routes is None
    if server_routes:
        if _REGISTERED:
            return True
        import sys

        instance = getattr(getattr(sys.modules.get("server"), "PromptServer", None), "instance", None)
        routes = getattr(instance, "routes", None)
        if routes is None:
            return False
    from aiohttp import web

    @routes.post(ROUTE)
    async def _check(request):  # noqa: ANN001 - aiohttp request
        try:
            body = await request.json()
        except Exception:  # noqa: BLE001 - any unreadable body gets the same answer
            body = None
        return web.json_response(check(body))

    _REGISTERED = _REGISTERED or server_routes
    return True
