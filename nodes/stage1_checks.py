"""What the stage-1 nodes share around the core's rules: one image pair, the eroded garment and the region left after
protection refused with the node's name (the rules are ``registration/recipe.py``'s), the inverted-mask warning on the
node, and the widget checks run at queue time (V3 ``validate_inputs``) and again in ``execute``.
"""

from __future__ import annotations

import torch

from ..registration import recipe
from ..tensors import masks as _masks
from . import convert as cv
from .notify import warn_on_node

__all__ = ["single_item", "eroded_garment", "warn_if_inverted", "check_region_left", "WidgetChecks"]


def single_item(node: str, name: str, x: torch.Tensor) -> torch.Tensor:
    """``x`` [1, ...] as it is; a batch of several is refused (these nodes register one image pair)."""
    if x.shape[0] != 1:
        raise cv.NodeInputError(node, f"{name} is a batch of {x.shape[0]}, this node works on one image pair",
                                "pick one image with 'Image From Batch' (or run the workflow once per pair)")
    return x


def eroded_garment(node: str, gm: torch.Tensor) -> torch.Tensor:
    """Garment mask [B, H, W] eroded by ``GARMENT_EROSION`` (float); refused when nothing is left of it."""
    er = recipe.eroded_garment_mask(gm)
    if not bool(er.any()):
        raise cv.NodeInputError(node, *_masks.eroded_away_problem("garment_mask", _masks.GARMENT_EROSION))
    return er.float()


def warn_if_inverted(node: str, name: str, mask: torch.Tensor) -> None:
    """A mask that looks inverted (background white) is legal but almost never meant: say so."""
    problem = _masks.inverted_mask_problem(mask, name)
    if problem:
        warn_on_node(node, problem)


class WidgetChecks:
    """Checks that need only widget values run at queue time (V3 ``validate_inputs``) and again in ``execute``.

    ``WIDGETS`` names the inputs checked. ComfyUI skips its own min/max/combo checks for the inputs a
    ``validate_inputs`` declares, so :func:`convert.check_widgets` redoes them from the schema; ``_rules`` adds
    the node's own (odd kernels, multiples of 8, parsable points). A widget turned into a link arrives as None
    at queue time and is checked when the node runs.
    """

    NODE = ""
    WIDGETS: tuple = ()

    @classmethod
    def check_widget_values(cls, **values) -> None:
        values = {k: v for k, v in values.items() if k in cls.WIDGETS and v is not None}
        cv.check_widgets(cls.NODE, cls.define_schema().inputs, values)
        cls._rules(values)

    @classmethod
    def _rules(cls, values: dict) -> None:
        pass


def check_region_left(node: str, processed: torch.Tensor) -> None:
    """Refuse, before any sampling, a protect_mask that removes the whole try-on region."""
    problem = recipe.region_left_problem(processed)
    if problem:
        raise cv.NodeInputError(node, *problem)
