"""One check for the ``(height, width)`` sizes the pack passes around (image sizes, token grids, latents).

>>> as_hw(64), as_hw((48, 64), "latent_hw")
((64, 64), (48, 64))
"""

from __future__ import annotations

from typing import Any

__all__ = ["as_hw", "halved"]


def as_hw(value: Any, name: str = "size", square_ok: bool = True) -> tuple[int, int]:
    """``(height, width)`` as two positive ints, from a pair (or one int for a square when ``square_ok``).

    Raises:
        ValueError: naming ``name``, for anything else (a bool, three numbers, zero or a negative size).

    >>> as_hw([2, 3], "grid")
    (2, 3)
    >>> as_hw(0, "grid")
    Traceback (most recent call last):
    ...
    ValueError: grid must be positive, got (0, 0)
    """
    form = "(height, width)" + (" or one int" if square_ok else "")
    if isinstance(value, bool) or (isinstance(value, int) and not square_ok):
        raise ValueError(f"{name} must be {form}, got {value!r}")
    if isinstance(value, int):
        h = w = value
    else:
        try:
            h, w = (int(s) for s in value)
        except (TypeError, ValueError):
            raise ValueError(f"{name} must be {form}, got {value!r}") from None
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be positive, got {(h, w)}")
    return h, w


def halved(hw: Any, times: int = 1) -> tuple[int, int]:
    """A UNet token grid ``times`` levels below ``hw``: each stride-2 convolution (padding 1) maps n → ⌈n/2⌉.

    The one place the pack computes a downsampled grid (layer choice by grid level, feature grids, mask
    checks at token grids).

    >>> halved((64, 48)), halved((13, 20), 1), halved((64, 64), 0)
    ((32, 24), (7, 10), (64, 64))
    """
    h, w = as_hw(hw, "hw")
    for _ in range(int(times)):
        h, w = -(-h // 2), -(-w // 2)
    return h, w
