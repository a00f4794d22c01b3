"""The MEA node's inputs turned into what the patch needs: the reference latent and its noise, the eroded
garment mask at the encoded size, the reference prompt, and where the encoded part lies in the reference.

No ComfyUI import: ``vae`` and ``model`` are duck-typed (``vae.encode(IMAGE)``,
``vae.spacial_compression_encode()``, ``model.model.latent_format.latent_channels``,
``model.model.process_latent_in``), so this is tested with small stand-ins in the normal suite.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..tensors import masks as _masks
from ..tensors.images import center_crop_multiple, neutralise_background
from . import convert as cv
from .notify import warn_on_node

__all__ = ["ReferenceInputs", "prepare_reference", "positive_context", "check_mea_masks", "inputs_preview"]


@dataclass
class ReferenceInputs:
    """latent/noise [1, C, h, w] (``process_latent_in``-scaled, float32, CPU); garment bool [1, H', W'] at the
    encoded size, eroded; size (H, W) of the given reference; crop (top, left, H', W') of the encoded part;
    vae_ratio: pixels per latent cell of the VAE that encoded it."""

    latent: torch.Tensor
    noise: torch.Tensor
    garment: torch.Tensor
    size: tuple[int, int]
    crop: tuple[int, int, int, int]
    vae_ratio: int = 8


def prepare_reference(node: str, model: Any, vae: Any, reference: torch.Tensor, garment_mask: torch.Tensor,
                      background: str, seed: int) -> ReferenceInputs:
    """Check, neutralise (``background == "neutralised"``), crop to the VAE's multiple, encode and noise the
    reference; erode its garment mask (docs/method.md §1, §3b). Raises :class:`~.convert.NodeInputError`."""
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
    if background == "neutralised":
        img = neutralise_background(img, gm)
    ratio = vae.spacial_compression_encode()
    ratio = int(ratio) if isinstance(ratio, int) else 8
    H, W = int(img.shape[1]), int(img.shape[2])
    if H < ratio or W < ratio:
        raise cv.NodeInputError(node, f"reference is {W}x{H}", f"give a reference of at least {ratio}x{ratio} px")
    img_c = center_crop_multiple(img, ratio, (1, 2))
    gm_c = center_crop_multiple(gm, ratio, (1, 2))
    crop = ((H % ratio) // 2, (W % ratio) // 2, int(img_c.shape[1]), int(img_c.shape[2]))

    latent = vae.encode(img_c.contiguous())
    channels = int(model.model.latent_format.latent_channels)
    if latent.dim() != 4 or latent.shape[1] != channels:
        raise cv.NodeInputError(node, f"the VAE gives {tuple(latent.shape)} latents but the model expects "
                                f"{channels} channels", "connect the VAE that belongs to this model")
    lat = model.model.process_latent_in(latent.detach().float().cpu())
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(lat.shape, generator=gen, dtype=torch.float32)
    garment = _masks.erode(gm_c > 0.5, _masks.GARMENT_EROSION)
    return ReferenceInputs(latent=lat, noise=noise, garment=garment, size=(H, W), crop=crop, vae_ratio=ratio)


def positive_context(positive: Any, node: str) -> torch.Tensor:
    """The first entry's text conditioning of a CONDITIONING, ``[1, L, D]``."""
    ok = isinstance(positive, (list, tuple)) and positive and isinstance(positive[0], (list, tuple))
    ctx = positive[0][0] if ok else None
    if not isinstance(ctx, torch.Tensor) or ctx.dim() != 3:
        raise cv.NodeInputError(node, "positive is not a CONDITIONING", "connect a CLIP Text Encode output to "
                                "'positive'")
    return ctx[:1].detach()


def check_mea_masks(node: str, garment_mask: torch.Tensor, ref: ReferenceInputs, target_mask: torch.Tensor,
                    layers: Any, node_id: Any = None) -> None:
    """The masks as MEA will use them (docs/method.md §3b), before any sampling.

    * empty (nothing above 0.05): the contract, zero mask = no effect, so a batch can carry images without a
      garment; said on the node, not refused;
    * not empty but unusable (soft, thinner than the erosion, or lost at every token grid the chosen layers
      use): the same silent no-op by accident, so refused with what to do;
    * looks inverted: a warning on the node.
    """
    nid = None if node_id is None else str(node_id)
    levels = sorted(layers.levels)
    gm = ref.garment.float()
    grids = _masks.token_grids(tuple(gm.shape[-2:]), levels, ratio=8)
    checks = (("garment_mask", cv.mask_to_bhw(garment_mask, node, "garment_mask"), grids, _masks.GARMENT_EROSION),
              ("target_mask", target_mask, _masks.token_grids(tuple(target_mask.shape[-2:]), levels, ratio=8), 1))
    for name, mask, mask_grids, erosion in checks:
        if problem := _masks.unusable_mask_problem(mask, mask_grids, name, erode_kernel=erosion):
            raise cv.NodeInputError(node, problem)
        if warning := _masks.inverted_mask_problem(mask, name):
            warn_on_node(node, warning, node_id=nid)
    for empty, what in ((not bool(ref.garment.any()), "the garment mask is empty (after 1 px erosion)"),
                        (not bool((target_mask > 0.5).any()), "the target mask is empty")):
        if empty:
            warn_on_node(node, f"{what}: sampling with this model is plain sampling, no try-on", node_id=nid)


def inputs_preview(reference: torch.Tensor, ref: ReferenceInputs, target_mask: torch.Tensor) -> torch.Tensor:
    """What MEA will read and where, as one IMAGE [1, H, W', 3]: the encoded reference with everything but the
    (eroded) garment dimmed, beside the first target mask at the same height (white = the try-on region)."""
    top, left, h, w = ref.crop
    img = cv.to_rgb(cv.image_to_bchw(reference, "preview"))[:1, :, top : top + h, left : left + w].float()
    keep = ref.garment[:1, None].float()
    shown = img * (0.25 + 0.75 * keep)
    tm = target_mask[:1, None].float().clamp(0, 1)
    tw = max(1, round(tm.shape[-1] * h / max(1, tm.shape[-2])))
    tm = torch.nn.functional.interpolate(tm, size=(h, tw), mode="nearest").expand(-1, 3, -1, -1)
    gap = torch.full((1, 3, h, 4), 0.5)
    return torch.cat([shown, gap, tm], dim=-1).permute(0, 2, 3, 1).clamp(0, 1).contiguous()
