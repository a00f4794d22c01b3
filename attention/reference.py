"""The reference pass of Masked Extended Attention, for any host (docs/method.md §3b, §3c).

At each MEA step the garment photo goes through the same model as the target, and the garment tokens' keys
and values of the chosen layers are kept for the target's attention. What that pass gets is method, decided
here once for every adapter (the UNet patch, the Flux patch, the diffusers processor's caller):

* **noised to the call's σ** with fixed seeded noise: ``x_ref = noise_scaling(σ, noise, latent)``, the host's
  own forward process (:func:`noised_reference`);
* **its own text**: the node's prompt when given, else the positive row's (:func:`reference_text`);
* **it reconstructs itself**: a model with extra input channels (an inpainting UNet, FLUX.1 Fill) is told to
  keep everything, mask 0 and the reference itself as the masked image (:func:`reconstruct_itself`);
* **nothing that describes the target image**: ControlNet residuals, an editing model's reference latents,
  the target text's attention mask (:data:`DROPPED_INPUTS`);
* every other model input of one positive row of the call (pooled text, a guidance embedding, …)
  (:func:`slice_row`).

Layouts: ``latent``/``noise`` [1, C, h, w] (the host's scaled latent space); per-row inputs [N, …] with N the
call's batch; the reference row is a batch of 1. Plain PyTorch, no host import.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import torch

__all__ = [
    "PreparedReference",
    "prepare_reference",
    "mask_findings",
    "inputs_preview",
    "DROPPED_INPUTS",
    "MASK_PARTS",
    "IMAGE_PARTS",
    "ReferenceRow",
    "reference_row",
    "noised_reference",
    "reconstruct_itself",
    "reference_text",
    "slice_row",
    "append_row",
]

#: Model inputs the reference pass never takes from the target's call: they describe the target image
#: (ControlNet residuals, reference latents of an editing model and how to place them, the target text's
#: attention mask).
DROPPED_INPUTS = ("control", "ref_latents", "ref_latents_method", "attention_mask")

#: Extra-channel parts that are an inpainting mask (1 = repaint; the reference keeps everything: 0) and its
#: inverse (1 = keep). ``"mask:N"`` is a mask packed into N channels (FLUX.1 Fill: 8×8 pixels per latent cell).
MASK_PARTS = ("mask", "mask_inverted")
#: Extra-channel parts that are the image to keep (the reference itself).
IMAGE_PARTS = ("masked_image", "concat_image")


@dataclass
class ReferenceRow:
    """The reference pass's model inputs, batch 1: ``x`` [1, C, h, w] at ``t`` [1]; ``c_concat`` extra channels
    or None; ``c_crossattn`` the text; ``extra`` every other model input, by name."""

    x: torch.Tensor
    t: torch.Tensor
    c_concat: Optional[torch.Tensor]
    c_crossattn: Any
    extra: dict = field(default_factory=dict)


def noised_reference(noise_scaling: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                     sigma: torch.Tensor, latent: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The reference latent at noise level ``sigma`` [1] through the host's forward process
    ``noise_scaling(sigma, noise, latent)`` (ComfyUI's ``model_sampling.noise_scaling``), with the fixed noise.

    >>> scale = lambda s, n, x: x + s.view(-1, 1, 1, 1) * n
    >>> noised_reference(scale, torch.tensor([2.0]), torch.zeros(1, 1, 1, 1), torch.ones(1, 1, 1, 1)).item()
    2.0
    """
    return noise_scaling(sigma.to(latent.dtype), noise.to(latent), latent)


def reconstruct_itself(parts: Sequence[str], latent: torch.Tensor) -> torch.Tensor:
    """Extra input channels that tell a model to keep the whole ``latent`` [B, C, h, w]: each mask part says
    "keep" and each image part is the latent itself, concatenated in ``parts`` order.

    >>> reconstruct_itself(("mask", "masked_image"), torch.ones(1, 4, 2, 2)).shape
    torch.Size([1, 5, 2, 2])
    >>> reconstruct_itself(("masked_image", "mask:64"), torch.ones(1, 16, 2, 2)).sum().item()
    64.0
    """
    b, _, h, w = latent.shape
    out = []
    for part in parts:
        name, _, count = part.partition(":")
        n = int(count) if count else 1
        if name == "mask":
            out.append(latent.new_zeros(b, n, h, w))
        elif name == "mask_inverted":
            out.append(latent.new_ones(b, n, h, w))
        elif name in IMAGE_PARTS:
            out.append(latent)
        else:
            raise ValueError(f"the model takes a '{part}' input the reference pass cannot build (it knows inpainting "
                             f"masks {MASK_PARTS} and images {IMAGE_PARTS}); use a plain or inpainting checkpoint")
    return torch.cat(out, dim=1)


def reference_text(ref_context: Optional[torch.Tensor], ctx_row: Any) -> Any:
    """The reference pass's text: the node's own prompt ``[1, L, D]``, cast like the call's row, or the row's
    when the node gave none. Raises when the widths differ (a prompt encoded for another model family)."""
    if ref_context is None or not isinstance(ctx_row, torch.Tensor):
        return ctx_row
    if ref_context.shape[-1] != ctx_row.shape[-1]:
        raise ValueError(
            f"the reference prompt ('positive') is {ref_context.shape[-1]} wide but this model's text conditioning "
            f"is {ctx_row.shape[-1]} wide: encode the prompt with the text encoder of the same checkpoint"
        )
    return ref_context.to(device=ctx_row.device, dtype=ctx_row.dtype)


def slice_row(value: Any, n_rows: int, row: int) -> Any:
    """Row ``row`` (kept as a batch of 1) of a per-row model input; anything else unchanged.

    >>> slice_row(torch.arange(3), 3, 1).tolist(), slice_row("text", 3, 1)
    ([1], 'text')
    """
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n_rows:
        return value[row : row + 1]
    if isinstance(value, list):
        return [slice_row(v, n_rows, row) for v in value]
    return value


def append_row(value: Any, ref_value: Any, n_rows: int) -> Any:
    """A per-row model input with the reference row's value appended (others unchanged)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n_rows:
        return torch.cat([value, ref_value.to(value)])
    if isinstance(value, list):
        return [append_row(v, r, n_rows) for v, r in zip(value, ref_value)]
    return value


def reference_row(
    *,
    t: torch.Tensor,
    row: int,
    n_rows: int,
    c_crossattn: Any,
    extra: dict,
    latent: torch.Tensor,
    noise: torch.Tensor,
    ref_context: Optional[torch.Tensor],
    noise_scaling: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    concat_parts: Optional[Sequence[str]],
) -> ReferenceRow:
    """The reference pass's inputs for a model call whose row ``row`` (of ``n_rows``) carries MEA.

    Args:
        t: the call's σ, [n_rows] or a scalar.
        c_crossattn, extra: the call's text and other model inputs (per row or shared).
        latent, noise: [1, C, h, w] reference latent and its fixed noise, on the call's device and dtype.
        ref_context: the node's reference prompt [1, L, D] or None.
        noise_scaling: the host's forward process ``(σ, noise, latent) → x_σ``.
        concat_parts: the model's extra-channel parts in order (:func:`reconstruct_itself`), or None for a model
            without extra channels.
    """
    t_ref = t[row : row + 1] if t.dim() > 0 and t.shape[0] == n_rows else t.reshape(-1)[:1]
    return ReferenceRow(
        x=noised_reference(noise_scaling, t_ref, latent, noise),
        t=t_ref,
        c_concat=None if concat_parts is None else reconstruct_itself(concat_parts, latent),
        c_crossattn=reference_text(ref_context, slice_row(c_crossattn, n_rows, row)),
        extra={k: slice_row(v, n_rows, row) for k, v in extra.items() if k not in DROPPED_INPUTS},
    )


# --------------------------------------------------------------------------------------------
# the reference branch's inputs, prepared once per MEA node (docs/method.md §3b "Reference branch")


@dataclass(frozen=True)
class PreparedReference:
    """The reference as every pass reads it: ``latent``/``noise`` [1, C, h, w] or [1, C, 1, h, w] (a video VAE's one
    frame, as the model takes it) (the host's scaled latent space,
    float32, CPU); ``garment`` bool [1, H', W'] at the encoded size, eroded (:data:`~max4zero.tensors.masks.
    GARMENT_EROSION`); ``size`` (H, W) of the given image; ``crop`` (top, left, H', W') of the encoded part (the
    centre crop to a multiple of ``vae_ratio``, as VAE Encode does)."""

    latent: torch.Tensor
    noise: torch.Tensor
    garment: torch.Tensor
    size: tuple[int, int]
    crop: tuple[int, int, int, int]
    vae_ratio: int = 8


def prepare_reference(
    image: torch.Tensor,
    garment_mask: torch.Tensor,
    *,
    encode: Callable[[torch.Tensor], torch.Tensor],
    scale_in: Callable[[torch.Tensor], torch.Tensor],
    channels: int,
    vae_ratio: int,
    background: str,
    seed: int,
) -> PreparedReference:
    """Neutralise (``background == "neutralised"``: flat grey outside the garment), centre-crop to the VAE's
    multiple, encode, scale and draw the fixed noise; erode the garment mask (docs/method.md §1, §3b).

    Args:
        image: [1, H, W, 3] the reference in 0..1; garment_mask: [1, H, W] at the same size.
        encode: the host's VAE encode (IMAGE → [1, C, h, w]); scale_in: into the model's latent space.
        channels: the latent channels the model takes; vae_ratio: pixels per latent cell.

    Raises:
        ValueError: a reference smaller than one latent cell, or a VAE whose latents the model cannot take.
    """
    from ..tensors import masks as _masks
    from ..tensors.images import center_crop_multiple, neutralise_background

    if background == "neutralised":
        image = neutralise_background(image, garment_mask)
    ratio = int(vae_ratio)
    H, W = int(image.shape[1]), int(image.shape[2])
    if H < ratio or W < ratio:
        raise ValueError(f"reference is {W}x{H}: give a reference of at least {ratio}x{ratio} px")
    img_c = center_crop_multiple(image, ratio, (1, 2))
    gm_c = center_crop_multiple(garment_mask, ratio, (1, 2))
    crop = ((H % ratio) // 2, (W % ratio) // 2, int(img_c.shape[1]), int(img_c.shape[2]))
    latent = encode(img_c.contiguous())
    # [1, C, h, w], or [1, C, 1, h, w] from a video VAE (Qwen-Image's Wan 2.1: one frame), kept as the model takes it
    if latent.dim() not in (4, 5) or (latent.dim() == 5 and latent.shape[2] != 1) or latent.shape[1] != int(channels):
        raise ValueError(f"the VAE gives {tuple(latent.shape)} latents but the model expects {channels} channels: "
                         "connect the VAE that belongs to this model")
    lat = scale_in(latent.detach().float().cpu())
    gen = torch.Generator().manual_seed(int(seed))
    noise = torch.randn(lat.shape, generator=gen, dtype=torch.float32)
    garment = _masks.erode(gm_c > 0.5, _masks.GARMENT_EROSION)
    return PreparedReference(latent=lat, noise=noise, garment=garment, size=(H, W), crop=crop, vae_ratio=ratio)


def mask_findings(garment_mask: torch.Tensor, garment: torch.Tensor, target_mask: torch.Tensor,
                  levels: Sequence[int], ratio: int = 8) -> tuple[list[str], list[str]]:
    """``(problems, notes)`` of the masks as MEA will use them (docs/method.md §3b), before any sampling.

    * empty (nothing above ``EMPTY_BELOW``): the contract, zero mask = no effect (a batch may carry images without a
      garment): a note, not a problem;
    * not empty but unusable (soft, thinner than the erosion, or lost at every token grid the chosen layers use): the
      same silent no-op by accident, so a problem;
    * looks inverted: a note.

    Args: ``garment_mask`` [1, H, W] as given, ``garment`` the eroded one at the encoded size
    (:func:`prepare_reference`), ``target_mask`` [B, H, W], ``levels`` the token-grid levels the chosen layers use
    (halvings of the latent grid), ``ratio`` pixels per latent cell (the VAE's: 8, FLUX.2's 16).
    """
    from ..tensors import masks as _masks

    levels = sorted(levels)
    problems, notes = [], []
    grids = _masks.token_grids(tuple(garment.shape[-2:]), levels, ratio=ratio)
    checks = (("garment_mask", garment_mask, grids, _masks.GARMENT_EROSION),
              ("target_mask", target_mask, _masks.token_grids(tuple(target_mask.shape[-2:]), levels, ratio=ratio), 1))
    for name, mask, mask_grids, erosion in checks:
        if problem := _masks.unusable_mask_problem(mask, mask_grids, name, erode_kernel=erosion):
            problems.append(problem)
        elif warning := _masks.inverted_mask_problem(mask, name):
            notes.append(warning)
    for empty, what in ((not bool(garment.any()), "the garment mask is empty (after 1 px erosion)"),
                        (not bool((target_mask > 0.5).any()), "the target mask is empty")):
        if empty:
            notes.append(f"{what}: sampling with this model is plain sampling, no try-on")
    return problems, notes


def inputs_preview(image: torch.Tensor, ref: PreparedReference, target_mask: torch.Tensor) -> torch.Tensor:
    """What MEA will read and where, as one IMAGE [1, H', W'', 3]: the encoded part of ``image`` [1, H, W, 3] with
    everything but the (eroded) garment dimmed, beside the first target mask at the same height (white = region)."""
    top, left, h, w = ref.crop
    img = image[:1, top : top + h, left : left + w, :3].permute(0, 3, 1, 2).float()
    shown = img * (0.25 + 0.75 * ref.garment[:1, None].float())
    tm = target_mask[:1, None].float().clamp(0, 1)
    tw = max(1, round(tm.shape[-1] * h / max(1, tm.shape[-2])))
    tm = torch.nn.functional.interpolate(tm, size=(h, tw), mode="nearest").expand(-1, 3, -1, -1)
    gap = torch.full((1, 3, h, 4), 0.5)
    return torch.cat([shown, gap, tm], dim=-1).permute(0, 2, 3, 1).clamp(0, 1).contiguous()
