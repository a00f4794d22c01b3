"""ComfyUI tensor layouts ↔ the pack's pure helpers, with checks whose errors name the node and the fix.

ComfyUI passes ``IMAGE`` as float ``[B, H, W, C]`` in 0..1 (C is 3, sometimes 4 or 1) and ``MASK``
as float ``[B, H, W]`` (a bare ``[H, W]`` happens; 1 = change). The core works channels-first ``[B, C, H, W]``; its
mask rules (the one normaliser, "soft", "empty", the batch rule) live in ``tensors/masks.py`` and
``tensors/shapes.py`` and are only given the node's name here. Nothing here imports ComfyUI, so the normal test suite
covers it.

Every check raises :class:`NodeInputError` (a ``ValueError``) whose message starts with the node's
display name, says what is wrong and what to do.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from ..tensors import masks as _masks
from ..tensors.images import to_rgb
from ..tensors.masks import PLACEHOLDER_HW
from ..tensors.shapes import batch_problem

__all__ = [
    "NodeInputError",
    "image_to_bchw",
    "bchw_to_image",
    "to_rgb",
    "mask_to_bhw",
    "mask_to_image",
    "broadcast_batch",
    "check_same_size",
    "check_nonempty",
    "check_choice",
    "check_mask_size",
    "placeholder_mask_problem",
    "check_odd",
    "check_widgets",
    "number_problem",
    "validation_result",
    "vae_ratio",
    "window_problem",
    "mask_latent_problem",
]


class NodeInputError(ValueError):
    """Bad input to a node; the message names the node, the problem and the fix."""

    def __init__(self, node: str, problem: str, fix: str = ""):
        self.node, self.problem, self.fix = node, problem, fix
        problem = problem.rstrip(". ")
        super().__init__(f"{node}: {problem}. {fix}" if fix else f"{node}: {problem}.")


# ComfyUI shows an error's type as ``module.qualname``; loaded as a custom node, the module is the pack's folder
# path plus ``.nodes.convert``. The UI should read the pack's own name instead.
NodeInputError.__module__ = "MaX4Zero"


def _shape(x) -> str:
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else type(x).__name__


def image_to_bchw(image: torch.Tensor, node: str, name: str = "image") -> torch.Tensor:
    """``IMAGE`` ``[B, H, W, C]`` (or ``[H, W, C]``) → float ``[B, C, H, W]`` (a view when possible).

    Raises:
        NodeInputError: not a tensor, wrong rank, C not in 1..4, NaN, or an empty image.
    """
    if not isinstance(image, torch.Tensor):
        raise NodeInputError(node, f"{name} is a {type(image).__name__}, not an IMAGE tensor",
                             f"connect an IMAGE output (e.g. Load Image) to '{name}'")
    if image.ndim == 3:
        image = image[None]
    if image.ndim != 4 or not 1 <= image.shape[-1] <= 4:
        raise NodeInputError(
            node, f"{name} has shape {_shape(image)}, expected an IMAGE [batch, height, width, channels] "
            "with 1-4 channels", f"connect an IMAGE to '{name}' (a MASK goes to a mask input; convert with "
            "'Convert Mask to Image' if you really meant it)")
    if image.shape[0] == 0 or image.shape[1] == 0 or image.shape[2] == 0:
        raise NodeInputError(node, f"{name} is empty (shape {_shape(image)})", f"connect a non-empty image to '{name}'")
    if not image.is_floating_point():
        image = image.float() / (255.0 if image.dtype == torch.uint8 else 1.0)
    if torch.isnan(image).any():
        raise NodeInputError(node, f"{name} contains NaN values", "check the node that produced it (a VAE "
                             "decode in fp16 can overflow: try --fp32-vae)")
    return image.permute(0, 3, 1, 2)


def bchw_to_image(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` → contiguous float32 ``IMAGE`` ``[B, H, W, C]`` clamped to 0..1."""
    return x.permute(0, 2, 3, 1).float().clamp(0.0, 1.0).contiguous()


def mask_to_bhw(mask: torch.Tensor, node: str, name: str = "mask") -> torch.Tensor:
    """``MASK`` ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` → float32 ``[B, H, W]`` through the one mask normaliser
    (``tensors/masks.py: usable_mask``): values kept, empty items allowed, a soft item refused, as for every mask
    input of every node.

    Raises:
        NodeInputError: not a tensor, an image-shaped tensor, NaN, a soft mask.
    """
    try:
        return _masks.usable_mask(mask, name)
    except _masks.MaskError as exc:
        raise NodeInputError(node, exc.problem, exc.fix) from None


def mask_to_image(mask: torch.Tensor) -> torch.Tensor:
    """``[B, H, W]`` mask → grey ``IMAGE`` ``[B, H, W, 3]`` for previews."""
    return mask.float().clamp(0, 1)[..., None].expand(*mask.shape, 3).contiguous()


def broadcast_batch(node: str, **tensors: torch.Tensor) -> dict[str, torch.Tensor]:
    """Expand batch-1 tensors to the common batch size of the others (dim 0).

    Returns the tensors under the same names. All non-1 batch sizes must agree.

    Raises:
        NodeInputError: two different batch sizes > 1.
    """
    sizes = {k: int(v.shape[0]) for k, v in tensors.items()}
    problem = batch_problem(sizes)
    if problem:
        raise NodeInputError(node, *problem)
    big = [b for b in sizes.values() if b != 1]
    B = big[0] if big else 1
    return {k: (v.expand(B, *v.shape[1:]) if v.shape[0] != B else v) for k, v in tensors.items()}


def check_same_size(node: str, image_name: str, image_hw: Sequence[int], mask_name: str, mask_hw: Sequence[int]) -> None:
    """Raise unless ``image_hw == mask_hw`` (height, width)."""
    ih, iw = (int(s) for s in image_hw)
    mh, mw = (int(s) for s in mask_hw)
    if (ih, iw) != (mh, mw):
        raise NodeInputError(
            node, f"{mask_name} is {mw}x{mh} but {image_name} is {iw}x{ih} (width x height)",
            "use the mask made for this image, or resize one of them (e.g. crop both with 'MaX4Zero Crop To "
            "Mask' using the same settings)")


def check_nonempty(node: str, name: str, mask: torch.Tensor, what: str = "the region") -> None:
    """Raise if no pixel of ``mask`` (any batch item) is on, for an input that must select something; a soft mask is
    told apart from an empty one (``tensors/masks.py: empty_mask_problem``)."""
    problem = _masks.empty_mask_problem(mask, name, what)
    if problem:
        raise NodeInputError(node, *problem)


def placeholder_mask_problem(mask: torch.Tensor, image_hw: Sequence[int], name: str = "mask") -> Optional[str]:
    """The sentence for Load Image's 64×64 all-zero placeholder mask given with an image of another size, or None."""
    ih, iw = (int(s) for s in image_hw)
    if tuple(mask.shape[-2:]) != PLACEHOLDER_HW or (ih, iw) == PLACEHOLDER_HW or bool((mask != 0).any()):
        return None
    return (f"{name} is the 64x64 empty placeholder that Load Image outputs for an image without an alpha channel, "
            f"not a mask of this {iw}x{ih} image")


def check_mask_size(node: str, image_name: str, image_hw: Sequence[int], mask_name: str, mask: torch.Tensor) -> None:
    """:func:`check_same_size` for a mask tensor, which first recognises Load Image's placeholder mask."""
    problem = placeholder_mask_problem(mask, image_hw, mask_name)
    if problem:
        raise NodeInputError(node, problem, "load the mask itself (LoadImageMask on a mask file, white = inside, "
                             "or a segmentation node); Load Image's MASK output only holds something for PNGs with "
                             "transparency")
    check_same_size(node, image_name, image_hw, mask_name, mask.shape[-2:])


def check_choice(node: str, name: str, value, options: Sequence) -> None:
    """ComfyUI 0.3.64 does not validate V3 combo values: check them here."""
    if value not in options:
        raise NodeInputError(node, f"{name}={value!r} is not one of {list(options)}",
                             f"pick one of {list(options)} (an old workflow may hold a value that was renamed)")


# --------------------------------------------------------------------------------------------
# Widget checks shared by a node's ``execute`` and its V3 ``validate_inputs`` (queue time)


def check_odd(node: str, name: str, value, lo: int = 1, hi: int = 255) -> None:
    """Raise unless ``value`` is an odd int in ``lo..hi`` (side of a square kernel)."""
    try:
        k = int(value)
        ok = k == value and lo <= k <= hi and k % 2 == 1
    except (TypeError, ValueError):
        k, ok = None, False
    if not ok:
        if k is not None and k == value and k % 2 == 0 and lo < k < hi:
            fix = f"use {k - 1} or {k + 1}"
        else:
            fix = f"use an odd whole number from {lo} to {hi}"
        raise NodeInputError(node, f"{name}={value!r} must be an odd whole number from {lo} to {hi} (side of a "
                             "square)", fix)


#: Widget types whose values are numbers (V3 ``io.Int`` / ``io.Float`` inputs).
NUMBER_TYPES = ("INT", "FLOAT")


def number_problem(name: str, value: Any, lo: Any = None, hi: Any = None) -> Optional[str]:
    """Why ``value`` is not a usable number for the widget ``name`` (not a number, NaN, ±inf, outside ``lo..hi``), or
    None. NaN and ±inf reach a node through the API (JSON ``NaN``/``Infinity``): ComfyUI's own min/max check lets NaN
    through (every comparison with it is false), and the node would fail late or give a black image."""
    try:
        x = float(value)
    except (TypeError, ValueError, OverflowError):
        return f"{name}={value!r} is not a number"
    if not math.isfinite(x):
        return f"{name}={value!r} is not a finite number"
    if (lo is not None and x < lo) or (hi is not None and x > hi):
        return f"{name}={value!r} is outside {lo}..{hi}"
    return None


def check_widgets(node: str, inputs: Iterable, values: dict) -> None:
    """ComfyUI's own widget checks (combo options, min, max) for the ``values`` given, by the node's schema inputs,
    and every number finite.

    ComfyUI skips these checks for every input that a V3 ``validate_inputs`` declares, and 0.3.64 never checks
    V3 combo values: this restores them, with messages that name the node, the input and a fix. Every ``INT`` and
    ``FLOAT`` widget is also refused when NaN or ±inf, with or without min/max, so a node's ``validate_inputs`` must
    take every number widget (tests/comfyui/test_hostile_inputs.py: ``QUEUE_TIME_ROWS`` holds every node to it). A
    value of None (a widget converted to a link, unknown at queue time) is skipped.
    """
    for inp in inputs:
        name = getattr(inp, "id", None)
        if name not in values or values[name] is None:
            continue
        v = values[name]
        options = getattr(inp, "options", None)
        if options is not None:
            check_choice(node, name, v, list(options))
            continue
        lo, hi = getattr(inp, "min", None), getattr(inp, "max", None)
        if lo is None and hi is None and getattr(inp, "io_type", None) not in NUMBER_TYPES:
            continue
        problem = number_problem(name, v, lo, hi)
        if problem:
            fix = (f"give a number from {lo} to {hi}" if lo is not None and hi is not None
                   else "give a finite number")
            raise NodeInputError(node, problem, fix)


def validation_result(check: Callable[[], None]) -> bool:
    """What a V3 ``validate_inputs`` does with the node's widget checks: True when they pass, else the
    :class:`NodeInputError` is RAISED, not returned.

    Why raise: ComfyUI (0.3.64 and 0.33, ``execution.validate_inputs``) files a returned message once under EVERY input
    the ``validate_inputs`` declares ("Custom validation failed for node: <input> - ..."), so a node that checks all its
    widgets would show one problem eight times, each under an input that is not at fault. An exception raised there is
    filed once, under the node (``exception_during_inner_validation``, or ``exception_during_validation`` for an output
    node), with this message as its details, and the prompt is still refused before anything runs.
    """
    check()
    return True


def window_problem(start, end) -> Optional[str]:
    """The sentence for an MEA window with start after end (fractions of the schedule), or None."""
    try:
        s, e = float(start), float(end)
    except (TypeError, ValueError):
        return f"start={start!r} and end={end!r} must be numbers from 0 to 1"
    if not (0.0 <= s <= 1.0 and 0.0 <= e <= 1.0):
        return f"start={start} and end={end} must lie from 0 to 1 (fractions of the schedule)"
    if s > e:
        return f"start={start} is after end={end}: the MEA window would hold no step; set start <= end (paper: 0.7 and 1.0)"
    return None


def mask_latent_problem(mask_shape: Sequence[int], latent_shape: Sequence[int], name: str = "target_mask",
                        ratio: int = 8) -> Optional[str]:
    """Whether a target mask fits the latent it is applied to (batch and aspect), as one sentence, or None.

    Args:
        mask_shape: ``[B, H, W]`` (or ``[H, W]``) of the mask.
        latent_shape: ``[B, C, h, w]`` of the latent being sampled.
        ratio: pixels per latent cell (8 for SD), only for the message.

    The batch must be 1 or the latent's. The aspect must agree to within one latent cell (and 2 %): the mask is
    resized to each token grid, so another aspect would be stretched. Crop To Mask's mask and Double-Mask Inpaint's
    target_mask always fit the image they belong to.
    """
    ms = [int(s) for s in mask_shape]
    mb, mh, mw = (ms if len(ms) == 3 else [1, *ms])[-3:]
    lb, lh, lw = int(latent_shape[0]), int(latent_shape[-2]), int(latent_shape[-1])
    batch = batch_problem({name: mb, "the latent being sampled": lb}, fixed="the latent being sampled")
    if batch:
        return f"{batch[0]}: give one mask (shared by the batch) or one per latent, in the latent's order"
    if mh < 1 or mw < 1 or lh < 1 or lw < 1:
        return f"{name} is {mw}x{mh} and the latent {lw}x{lh} cells: neither may be empty"
    off_h = abs(mh * lw / mw - lh)
    off_w = abs(mw * lh / mh - lw)
    if off_h > max(1.0, 0.02 * lh) or off_w > max(1.0, 0.02 * lw):
        return (f"{name} is {mw}x{mh} (aspect {mw / mh:.2f}) but the latent is {lw}x{lh} cells ({lw * ratio}x"
                f"{lh * ratio} px, aspect {lw / lh:.2f}): it would be stretched. Give the mask of the image being "
                "generated, at its size (Crop To Mask's mask, or Double-Mask Inpaint's target_mask)")
    return None


def model_context_dim(model) -> Optional[int]:
    """Width of the text conditioning the UNet's cross-attention takes (768 SD1.5, 1024 SD2, 2048 SDXL), or None.

    Read from the model's ``unet_config`` (``context_dim``), else from the first cross-attention's key
    projection. Duck-typed: no ComfyUI import.
    """
    base = getattr(model, "model", None)
    cfg = getattr(getattr(base, "model_config", None), "unet_config", None)
    cd = cfg.get("context_dim") if isinstance(cfg, dict) else None
    if isinstance(cd, int) and not isinstance(cd, bool) and cd > 0:
        return cd
    dm = getattr(base, "diffusion_model", None)
    if dm is None or not hasattr(dm, "modules"):
        return None
    for m in dm.modules():
        k = getattr(getattr(m, "attn2", None), "to_k", None)
        if k is not None and isinstance(getattr(k, "in_features", None), int):
            return int(k.in_features)
    return None


def conditioning_problem(positive, model, name: str = "positive") -> Optional[str]:
    """Whether a CONDITIONING fits the model's cross-attention (its width), as one sentence, or None.

    Found before any sampling (the MEA node, Correspondence), instead of as a shape error inside the UNet: SD1.5
    text (768) on an SDXL model (2048) is the usual case.
    """
    ok = isinstance(positive, (list, tuple)) and len(positive) > 0 and all(
        isinstance(c, (list, tuple)) and len(c) >= 1 and isinstance(c[0], torch.Tensor) for c in positive)
    if not ok:
        return f"{name} is not a CONDITIONING; connect a CLIP Text Encode output to it"
    want = model_context_dim(model)
    if want is None:
        return None
    widths = sorted({int(c[0].shape[-1]) for c in positive})
    bad = [w for w in widths if w != want]
    if not bad:
        return None
    return (f"{name} is text conditioning {bad[0]} wide but this model's cross-attention takes {want} (SD1.5: 768, "
            "SD2: 1024, SDXL: 2048), so the prompt was encoded by the CLIP of another model family. Encode it with "
            "the CLIP of this checkpoint (the CLIP output of the loader that gives this MODEL)")


def vae_ratio(vae: Any) -> int:
    """Image pixels per latent cell of a ComfyUI ``VAE`` (8 for SD1.5/SD2/SDXL and FLUX.1), asked from the VAE
    (``spacial_compression_encode``, as ComfyUI's own nodes do), 8 when it cannot say. Duck-typed: no ComfyUI import.
    """
    ask = getattr(vae, "spacial_compression_encode", None)
    try:
        ratio = ask() if callable(ask) else None
    except Exception:  # an unusual VAE object: the SD ratio, which every supported model family uses
        ratio = None
    return int(ratio) if isinstance(ratio, int) and not isinstance(ratio, bool) and ratio > 0 else 8
