"""One check for the ``(height, width)`` sizes the pack passes around (image sizes, token grids, latents), and the
one batch rule: batch 1 is shared by the whole batch, any other batch size must be the same everywhere.

>>> as_hw(64), as_hw((48, 64), "latent_hw")
((64, 64), (48, 64))
"""

from __future__ import annotations

from typing import Any, Mapping, Optional

__all__ = ["as_hw", "halved", "batch_problem", "common_batch"]


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


def batch_problem(sizes: Mapping[str, int], fixed: Optional[str] = None) -> Optional[tuple[str, str]]:
    """``(problem, fix)`` when the batch sizes in ``sizes`` (what → batch size) cannot go together, else None.

    The rule, for every pair of things that are used together (images, masks, latents, a crop's photo): a batch of 1
    is shared by the whole batch; every other batch size must be the same. ``fixed`` names the entry whose batch is
    given (the latent being sampled, a layer's target rows): it is never the one shared, so a batch of 3 masks for
    1 latent is a problem.

    >>> batch_problem({"image": 2, "mask": 1}) is None
    True
    >>> batch_problem({"image": 2, "mask": 3})[0]
    'batch sizes differ (image has 2, mask has 3)'
    >>> batch_problem({"mask": 3, "the latent": 1}, fixed="the latent")[0]
    'batch sizes differ (mask has 3, the latent has 1)'
    """
    big = {int(b) for b in sizes.values() if int(b) != 1}
    if fixed is not None:
        big.add(int(sizes[fixed]))
    if len(big) <= 1:
        return None
    listed = ", ".join(f"{k} has {int(v)}" for k, v in sizes.items())
    return (f"batch sizes differ ({listed})",
            "give every input the same batch size, or a batch of 1 to share one image or mask across the batch")


def common_batch(sizes: Mapping[str, int]) -> int:
    """The batch size ``sizes`` make together under :func:`batch_problem`'s rule (1 when all are 1).

    Raises:
        ValueError: the sizes cannot go together (the message is the problem and its fix).
    """
    problem = batch_problem(sizes)
    if problem:
        raise ValueError(f"{problem[0]}. {problem[1]}")
    big = [int(b) for b in sizes.values() if int(b) != 1]
    return big[0] if big else 1
