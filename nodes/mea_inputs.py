"""The MEA node's inputs in ComfyUI's layouts, handed to the core (``attention/reference.py``): the reference image
and garment mask checked and prepared, the reference prompt, the masks' findings shown on the node.

No ComfyUI import: ``vae`` and ``model`` are duck-typed (``vae.encode(IMAGE)``, ``vae.spacial_compression_encode()``,
``model.model.latent_format.latent_channels``, ``model.model.process_latent_in``), so this is tested with small
stand-ins in the normal suite.
"""

from __future__ import annotations

from typing import Any

import torch

from ..attention.reference import PreparedReference, inputs_preview as _inputs_preview, mask_findings
from ..attention.reference import prepare_reference as _prepare_reference
from . import convert as cv
from .notify import warn_on_node

__all__ = ["ReferenceInputs", "prepare_reference", "positive_context", "check_mea_masks", "inputs_preview"]

#: What the patch reads of the reference (the core's :class:`~max4zero.attention.reference.PreparedReference`).
ReferenceInputs = PreparedReference


def prepare_reference(node: str, model: Any, vae: Any, reference: torch.Tensor, garment_mask: torch.Tensor,
                      background: str, seed: int) -> PreparedReference:
    """The node's reference and garment mask, checked (one image, its one mask, the same size), prepared by the core
    (``attention/reference.py: prepare_reference``). Raises :class:`~.convert.NodeInputError`."""
    ref = cv.image_to_bchw(reference, node, "reference")
    if ref.shape[0] != 1:
        raise cv.NodeInputError(node, f"reference holds {ref.shape[0]} images", "give one reference image "
                                "(it is shared by every image of the batch); pick one with 'ImageFromBatch'")
    gm = cv.mask_to_bhw(garment_mask, node, "garment_mask")
    if gm.shape[0] != 1:
        raise cv.NodeInputError(node, f"garment_mask holds {gm.shape[0]} masks", "give the one mask of the "
                                "reference image")
    cv.check_same_size(node, "reference", ref.shape[-2:], "garment_mask", gm.shape[-2:])
    img = cv.to_rgb(ref).permute(0, 2, 3, 1)  # IMAGE [1, H, W, 3]: grey repeated, alpha dropped
    try:
        return _prepare_reference(
            img, gm, encode=vae.encode, scale_in=model.model.process_latent_in,
            channels=int(model.model.latent_format.latent_channels), vae_ratio=cv.vae_ratio(vae),
            background=background, seed=seed)
    except ValueError as e:
        problem, _, fix = str(e).partition(": ")
        raise cv.NodeInputError(node, problem, fix) from None


def positive_context(positive: Any, node: str) -> torch.Tensor:
    """The first entry's text conditioning of a CONDITIONING, ``[1, L, D]``."""
    ok = isinstance(positive, (list, tuple)) and positive and isinstance(positive[0], (list, tuple))
    ctx = positive[0][0] if ok else None
    if not isinstance(ctx, torch.Tensor) or ctx.dim() != 3:
        raise cv.NodeInputError(node, "positive is not a CONDITIONING", "connect a CLIP Text Encode output to "
                                "'positive'")
    return ctx[:1].detach()


def check_mea_masks(node: str, garment_mask: torch.Tensor, ref: PreparedReference, target_mask: torch.Tensor,
                    layers: Any, node_id: Any = None) -> None:
    """The core's findings on the masks (``attention/reference.py: mask_findings``): a problem is refused, a note
    (empty mask: plain sampling on purpose; a mask that looks inverted) is shown on the node."""
    problems, notes = mask_findings(cv.mask_to_bhw(garment_mask, node, "garment_mask"), ref.garment, target_mask,
                                    layers.levels, ratio=ref.vae_ratio)
    if problems:
        raise cv.NodeInputError(node, problems[0])
    for note in notes:
        warn_on_node(node, note, node_id=None if node_id is None else str(node_id))


def inputs_preview(reference: torch.Tensor, ref: PreparedReference, target_mask: torch.Tensor) -> torch.Tensor:
    """The node's preview (``attention/reference.py: inputs_preview``) from ComfyUI's IMAGE."""
    img = cv.to_rgb(cv.image_to_bchw(reference, "preview")).permute(0, 2, 3, 1)
    return _inputs_preview(img, ref, target_mask)
