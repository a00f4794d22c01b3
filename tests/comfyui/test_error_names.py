"""Errors the pack raises read as the pack's own, in the UI: type ``MaX4Zero.NodeInputError``, not a server path."""

from __future__ import annotations

import pytest
import torch

import comfy_models as cm
from comfy_models import Graph, PromptFailed, run_prompt


def test_error_type_is_the_packs_short_name(comfy_env):
    g = Graph()
    crop = g.node("MaX4ZeroCropToMask", image=g.obj(torch.rand(1, 64, 64, 3), "IMAGE"),
                  mask=g.obj(torch.zeros(1, 64, 64), "MASK"), size=64, padding=0.1)
    g.capture(crop[0], "x")
    with pytest.raises(PromptFailed) as e:
        run_prompt(g)
    assert e.value.exception_type == "MaX4Zero.NodeInputError", e.value.exception_type
    assert e.value.message.startswith("MaX4Zero Crop To Mask:")
    assert str(cm.PACK_ROOT) not in e.value.exception_type
