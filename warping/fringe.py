"""Composite of the warped garment and the fringe masks (docs/method.md §2e).

The warp rarely covers the whole target mask. What it leaves uncovered, the *thin fringe* F, is
what stage 2 really generates; the *dilated fringe* D (F grown by 19×19, kept inside the target
mask) is what the inpainting model is shown as its mask, so it predicts F with context.

F is generated from pure noise (docs/method.md §3a): :func:`latent_fringe_mask` takes F to the latent grid
(hard, any pixel of F regenerates its latent cell) and :func:`clear_latent_cells` empties the
composite latent there, so a sampler's first input inside F is noise alone while every other latent
cell keeps the composite bit for bit.

Layouts: images are ``[B, C, H, W]`` (channels first; the ComfyUI nodes convert from
``[B, H, W, C]``). Masks are ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``, bool or float
(on where ``> 0.5``). A mask with batch 1 (or no batch) is broadcast to the other inputs' batch.
"""

from __future__ import annotations

import torch

from ..tensors import masks as _masks

__all__ = ["fringe_masks", "composite", "latent_fringe_mask", "clear_latent_cells"]


def _hw(mask: torch.Tensor) -> tuple[int, int]:
    return int(mask.shape[-2]), int(mask.shape[-1])


def _batch(mask: torch.Tensor) -> int:
    return 1 if mask.ndim == 2 else int(mask.shape[0])


def _bool4(mask: torch.Tensor, name: str) -> torch.Tensor:
    """Mask → bool ``[B, 1, H, W]`` (validates the layout)."""
    on, _ = _masks._layout(mask, name)
    return on


def _common_batch(named: dict[str, int]) -> int:
    sizes = {b for b in named.values() if b != 1}
    if len(sizes) > 1:
        raise ValueError(
            "batch sizes differ: "
            + ", ".join(f"{k} has {v}" for k, v in named.items())
            + "; give every input the same batch, or batch 1 to share one across the batch"
        )
    return sizes.pop() if sizes else 1


def fringe_masks(
    target_mask: torch.Tensor, warped_mask: torch.Tensor, dilation: int = 19
) -> tuple[torch.Tensor, torch.Tensor]:
    """Thin fringe ``F = target ∧ ¬warped`` and dilated fringe ``D = dilate(F, dilation) ∧ target``.

    ``F`` is ``clip(target − warped, 0)`` on binary masks: target pixels the warped garment does not
    cover. ``D ⊇ F`` always (``F ⊆ target``).

    Args:
        target_mask: region to repaint, ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``.
        warped_mask: the garment mask after the MLS warp, same ``H, W``; batch 1 broadcasts.
        dilation: odd square kernel side (paper: 19 → 19×19); 1 makes ``D = F``.

    Returns:
        ``(F, D)`` in ``target_mask``'s layout and dtype (values 0/1), with the common batch size.

    Raises:
        ValueError: size or batch mismatch, even/non-positive dilation, bad layout.
    """
    if _hw(target_mask) != _hw(warped_mask):
        raise ValueError(
            f"target_mask {tuple(target_mask.shape)} and warped_mask {tuple(warped_mask.shape)} differ in size: "
            "warp the garment mask to the target image's size first"
        )
    B = _common_batch({"target_mask": _batch(target_mask), "warped_mask": _batch(warped_mask)})
    t = _bool4(target_mask, "target_mask")
    w = _bool4(warped_mask, "warped_mask")
    thin = t & ~w  # broadcasts a batch-1 mask
    dil = _masks.dilate(thin, dilation) & t
    thin = thin.expand(B, -1, -1, -1)
    dil = dil.expand(B, -1, -1, -1)
    return _restore_like(thin, target_mask, B), _restore_like(dil, target_mask, B)


def _restore_like(out: torch.Tensor, like: torch.Tensor, B: int) -> torch.Tensor:
    """bool ``[B, 1, H, W]`` → ``like``'s layout and dtype (an ``[H, W]`` input with B > 1 gives ``[B, H, W]``)."""
    if like.ndim == 2:
        out = out[0, 0] if B == 1 else out[:, 0]
    elif like.ndim == 3:
        out = out[:, 0]
    out = out.contiguous()
    return out if like.dtype == torch.bool else out.to(like.dtype)


def composite(
    target: torch.Tensor,
    warped: torch.Tensor,
    warped_mask: torch.Tensor,
    target_mask: torch.Tensor,
) -> torch.Tensor:
    """Warped garment where ``warped_mask ∧ target_mask``, the target image elsewhere.

    Args:
        target: ``[B, C, H, W]`` target (person) image, any float dtype (fp16/bf16 fine).
        warped: ``[B, C, H, W]`` warped garment image, same ``C, H, W``. Cast to ``target``'s dtype
            and device.
        warped_mask, target_mask: masks at ``H, W``.
        Any input with batch 1 (or a mask without batch) is broadcast to the common batch ``B``.

    Returns:
        ``[B, C, H, W]`` in ``target``'s dtype; pixels are copied, never blended.

    Raises:
        ValueError: a size, channel or batch mismatch (message names the shapes).
    """
    for name, img in (("target", target), ("warped", warped)):
        if not isinstance(img, torch.Tensor) or img.ndim != 4:
            shape = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(
                f"{name} must be a [B, C, H, W] image, got {shape}: ComfyUI IMAGE tensors are [B, H, W, C], "
                "use .permute(0, 3, 1, 2)"
            )
    if target.shape[1:] != warped.shape[1:]:
        raise ValueError(
            f"target {tuple(target.shape)} and warped {tuple(warped.shape)} differ in channels or size: "
            "warp the garment to the target image's size and channel count first"
        )
    H, W = target.shape[-2:]
    for name, m in (("warped_mask", warped_mask), ("target_mask", target_mask)):
        if not isinstance(m, torch.Tensor) or _hw(m) != (H, W):
            shape = tuple(m.shape) if isinstance(m, torch.Tensor) else type(m).__name__
            raise ValueError(
                f"{name} has shape {shape} but the images are {H}x{W} (target {tuple(target.shape)}): "
                "resize the mask to the image size"
            )
    B = _common_batch(
        {
            "target": int(target.shape[0]),
            "warped": int(warped.shape[0]),
            "warped_mask": _batch(warped_mask),
            "target_mask": _batch(target_mask),
        }
    )
    keep = (_bool4(warped_mask, "warped_mask") & _bool4(target_mask, "target_mask")).to(target.device)
    out = torch.where(keep, warped.to(device=target.device, dtype=target.dtype), target)
    assert out.shape[0] == B  # torch.where broadcast every batch-1 input
    return out


def latent_fringe_mask(fringe: torch.Tensor, latent_hw: tuple[int, int]) -> torch.Tensor:
    """The thin fringe F on the latent grid, hard: a latent cell is 1 when ANY pixel of F lies in it.

    This is the ``noise_mask`` of the stage-1 LATENT. ComfyUI's samplers resize a ``noise_mask`` to the
    latent size bilinearly and blend every step ``x·m + noised(latent_image)·(1 − m)``: a pixel-size
    F arrives soft (a cell F only partly covers gets a fraction of the composite back), whereas a mask
    already at the latent size comes through unchanged (a bilinear resize to the same size is the
    identity) and, being 0/1, either regenerates a cell or keeps it.

    Args:
        fringe: F at image resolution, ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]`` (bool, or on where
            ``> 0.5``).
        latent_hw: ``(h, w)`` of the latent; ``H`` and ``W`` must be ``f·h`` and ``f·w`` for one
            integer factor ``f`` (the VAE's, 8 for SD1.5/SD2/SDXL), i.e. cells of ``f × f`` pixels.

    Returns:
        float32 ``[B, 1, h, w]`` with values 0/1 (``B`` = 1 for an ``[H, W]`` input): max-pool of F by ``f``.

    Raises:
        ValueError: sizes that are not one integer factor apart, bad mask layout.

    >>> F = torch.zeros(1, 16, 24)
    >>> F[0, 9, 3] = 1          # one pixel, in the cell at latent row 1, column 0 (8-pixel cells)
    >>> latent_fringe_mask(F, (2, 3))
    tensor([[[[0., 0., 0.],
              [1., 0., 0.]]]])
    """
    on = _bool4(fringe, "fringe")
    H, W = int(on.shape[-2]), int(on.shape[-1])
    h, w = (int(s) for s in latent_hw)
    if h < 1 or w < 1 or H % h or W % w or H // h != W // w:
        raise ValueError(
            f"fringe is {W}x{H} pixels but the latent is {w}x{h}: they must be one integer factor apart (the VAE's, "
            "8 for SD); crop the image to a multiple of 8 first"
        )
    f = H // h
    return torch.nn.functional.max_pool2d(on.float(), kernel_size=f, stride=f)


def clear_latent_cells(samples: torch.Tensor, cell_mask: torch.Tensor) -> torch.Tensor:
    """The latent with 0 in the cells where ``cell_mask`` is on, unchanged (bit for bit) elsewhere.

    With ``latent_image`` = 0 in F's cells (and F's cells as the ``noise_mask``) a sampler's first input
    there is ``noise_scaling(σ_max, noise, 0)``, pure noise, and the per-step blend adds nothing of the
    composite back (its weight, ``1 − m``, is 0). For SD1.5/SD2/SDXL latents (no shift in the latent
    format) a raw 0 is also 0 after ``process_latent_in``.

    Args:
        samples: ``[B, C, h, w]`` latent (any float dtype; kept).
        cell_mask: ``[B or 1, 1, h, w]`` from :func:`latent_fringe_mask` (on where ``> 0.5``).

    Returns:
        A new ``[B, C, h, w]`` tensor (common batch), ``samples``' dtype and device.

    >>> clear_latent_cells(torch.ones(1, 2, 1, 2), torch.tensor([[[[1.0, 0.0]]]]))[0]
    tensor([[[0., 1.]],
    <BLANKLINE>
            [[0., 1.]]])
    """
    if (samples.ndim != 4 or cell_mask.ndim != 4 or cell_mask.shape[1] != 1
            or cell_mask.shape[-2:] != samples.shape[-2:]):
        raise ValueError(
            f"samples {tuple(samples.shape)} must be [B, C, h, w] and cell_mask {tuple(cell_mask.shape)} "
            "[B, 1, h, w] at the same h, w"
        )
    _common_batch({"samples": int(samples.shape[0]), "cell_mask": int(cell_mask.shape[0])})
    on = (cell_mask > 0.5).to(samples.device)
    return torch.where(on, torch.zeros((), dtype=samples.dtype, device=samples.device), samples)
