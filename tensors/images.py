"""Image preparation shared by the stages: the VAE's crop to a multiple, the inpainting grey-out, a neutral
background (docs/method.md §3a, §3b). Plain PyTorch.

Layouts are given per function: ComfyUI's ``IMAGE`` is ``[B, H, W, C]``, the pack's working layout
``[B, C, H, W]``; masks are ``[B, H, W]`` (> 0.5 = on).
"""

from __future__ import annotations

import torch

__all__ = ["to_rgb", "center_crop_multiple", "grey_out", "neutralise_background"]


def to_rgb(x: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` → 3 channels: grey repeated, alpha (the channel after grey or RGB) dropped. What VAEs take.

    >>> to_rgb(torch.zeros(1, 2, 4, 4)).shape, to_rgb(torch.zeros(1, 4, 4, 4)).shape
    (torch.Size([1, 3, 4, 4]), torch.Size([1, 3, 4, 4]))
    """
    if x.shape[1] == 3:
        return x
    if x.shape[1] == 1:
        return x.expand(-1, 3, -1, -1)
    if x.shape[1] == 2:  # grey + alpha
        return x[:, :1].expand(-1, 3, -1, -1)
    return x[:, :3]


def center_crop_multiple(x: torch.Tensor, multiple: int, dims: tuple[int, int] = (1, 2)) -> torch.Tensor:
    """Centre-crop the two spatial ``dims`` to multiples of ``multiple`` (what ComfyUI's VAE.encode and
    InpaintModelConditioning do), as a view.

    >>> center_crop_multiple(torch.zeros(1, 13, 17, 3), 8).shape
    torch.Size([1, 8, 16, 3])
    """
    for d in dims:
        n = x.shape[d]
        keep = (n // multiple) * multiple
        if keep != n:
            x = x.narrow(d, (n % multiple) // 2, keep)
    return x


def grey_out(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` with pixels where ``round(mask) == 1`` set to 0.5 grey (InpaintModelConditioning's rule).

    >>> grey_out(torch.ones(1, 1, 1, 2), torch.tensor([[[1.0, 0.4]]])).tolist()
    [[[[0.5, 1.0]]]]
    """
    keep = (1.0 - mask.float().round())[:, None]
    return (image.float() - 0.5) * keep + 0.5


def neutralise_background(image: torch.Tensor, mask: torch.Tensor, grey: float = 0.5) -> torch.Tensor:
    """Flat grey outside the garment: ``image·m + grey·(1 − m)`` with a hard (> 0.5) mask.

    image ``[B, H, W, C]`` (ComfyUI IMAGE), mask ``[B or 1, H, W]``. The result depends on pixels inside the
    mask only, so everything computed from it is provably independent of the reference background.
    """
    m = (mask > 0.5).to(image.dtype)[..., None]
    return image * m + grey * (1.0 - m)
