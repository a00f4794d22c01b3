"""ComfyUI tensor layouts ↔ the pack's pure helpers, with checks whose errors name the node and the fix.

ComfyUI passes ``IMAGE`` as float ``[B, H, W, C]`` in 0..1 (C is 3, sometimes 4 or 1) and ``MASK``
as float ``[B, H, W]`` (a bare ``[H, W]`` happens; 1 = change). ``warping/`` works channels-first
``[B, C, H, W]``. Nothing here imports ComfyUI, so the normal test suite covers it.

Every check raises :class:`NodeInputError` (a ``ValueError``) whose message starts with the node's
display name, says what is wrong and what to do.
"""

from __future__ import annotations

from typing import Sequence

import torch

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


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` → 3 channels: grey repeated, alpha (4th channel) dropped. What VAEs take."""
    if x.shape[1] == 3:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 2:  # grey + alpha
        return x[:, :1].expand(-1, 3, -1, -1)
    return x[:, :3]


def mask_to_bhw(mask: torch.Tensor, node: str, name: str = "mask") -> torch.Tensor:
    """``MASK`` ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` → float32 ``[B, H, W]`` (values kept, soft allowed).

    Raises:
        NodeInputError: not a tensor, an image-shaped tensor, NaN.
    """
    if not isinstance(mask, torch.Tensor):
        raise NodeInputError(node, f"{name} is a {type(mask).__name__}, not a MASK tensor",
                             f"connect a MASK output (e.g. from a segmenter or Load Image's mask) to '{name}'")
    m = mask
    if m.ndim == 2:
        m = m[None]
    elif m.ndim == 4 and m.shape[1] == 1:
        m = m[:, 0]
    elif m.ndim == 4 and m.shape[-1] in (1, 3, 4):
        raise NodeInputError(node, f"{name} has shape {_shape(mask)}, which is an IMAGE, not a MASK",
                             "convert it with 'Convert Image to Mask' (pick a channel) first")
    if m.ndim != 3:
        raise NodeInputError(node, f"{name} has shape {_shape(mask)}, expected a MASK [batch, height, width]",
                             f"connect a MASK to '{name}'")
    if m.dtype == torch.bool:
        m = m.float()
    elif not m.is_floating_point():
        m = m.float() / (255.0 if mask.dtype == torch.uint8 and m.max() > 1 else 1.0)
    if torch.isnan(m).any():
        raise NodeInputError(node, f"{name} contains NaN values", "check the node that produced it")
    return m.float()


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
    big = {b for b in sizes.values() if b != 1}
    if len(big) > 1:
        listed = ", ".join(f"{k} has {v}" for k, v in sizes.items())
        raise NodeInputError(node, f"batch sizes differ ({listed})",
                             "give every input the same batch size, or batch 1 to share one image/mask across the batch")
    B = big.pop() if big else 1
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
    """Raise if no pixel of ``mask`` (any batch item) is above 0.5."""
    if not bool((mask > 0.5).any()):
        raise NodeInputError(node, f"{name} is empty (no pixel above 0.5)",
                             f"connect a mask that covers {what} (white = inside)")


def check_choice(node: str, name: str, value, options: Sequence) -> None:
    """ComfyUI 0.3.64 does not validate V3 combo values: check them here."""
    if value not in options:
        raise NodeInputError(node, f"{name}={value!r} is not one of {list(options)}",
                             f"pick one of {list(options)} (an old workflow may hold a value that was renamed)")
