"""One check for the ``(height, width)`` sizes the pack passes around (image sizes, token grids, latents).

>>> as_hw(64), as_hw((48, 64), "latent_hw")
((64, 64), (48, 64))
"""

from __future__ import annotations

from typing import Any

__all__ = ["as_hw"]


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
