"""Matching and repainting use one processed target mask (docs/method.md §1: protect removed, then dilated 13×13).

Correspondence processes the target mask exactly as Double-Mask Inpaint does; given the matches, Double-Mask
Inpaint refuses a region that differs, so the two cannot get out of step by accident.
"""

from __future__ import annotations

import pytest
import torch

import comfy_models as cm
from comfy_models import Graph, PromptFailed, run_prompt
from test_registration_nodes import SIZE, _correspondence


@pytest.fixture(scope="module")
def pair():
    return cm.synthetic_pair(SIZE)


def _pipeline(g, small_vae, pair, corr_dilation, dm_dilation, protect=None):
    extra = {} if protect is None else {"protect_mask": g.obj(protect, "MASK")}
    corr = _correspondence(g, cm.small_sd15_model(inpaint=True), small_vae, pair, target_dilation=corr_dilation,
                           **extra)
    warp = g.node("MaX4ZeroMLSWarp", reference_image=g.obj(pair["reference"], "IMAGE"),
                  garment_mask=g.obj(pair["garment_mask"], "MASK"), target_image=g.obj(pair["target"], "IMAGE"),
                  matches=corr[0], kind="affine", alpha=0.1, stride=4, sampling="bilinear")
    dm = g.node("MaX4ZeroDoubleMaskInpaint", positive=g.obj(cm.conditioning(1), "CONDITIONING"),
                negative=g.obj(cm.conditioning(2), "CONDITIONING"), vae=g.obj(small_vae, "VAE"),
                target_image=g.obj(pair["target"], "IMAGE"), target_mask=g.obj(pair["target_mask"], "MASK"),
                warped_image=warp[0], warped_mask=warp[1], target_dilation=dm_dilation, fringe_dilation=19,
                matches=corr[0], **extra)
    g.capture(corr[0], "matches")
    g.capture(dm[4], "tmask")
    return corr, dm


def test_correspondence_matches_in_the_processed_target_mask(comfy_env, small_vae, pair):
    protect = torch.zeros(1, SIZE, SIZE)
    protect[:, 80:, :] = 1.0  # hands and a bag over the lower torso
    g = Graph()
    _pipeline(g, small_vae, pair, 13, 13, protect=protect)
    res = run_prompt(g)
    region = res["matches"].target_region
    assert torch.equal(region, res["tmask"][0] > 0.5)  # the region matched is the region repainted
    assert region.sum() > (pair["target_mask"][0] > 0.5).sum() - (protect[0] > 0.5).sum()  # dilated
    assert not bool(region[100:, :].any())  # the protected rows (beyond the 6 px the dilation regrows) are out


def test_double_mask_inpaint_refuses_another_region(comfy_env, small_vae, pair):
    g = Graph()
    _pipeline(g, small_vae, pair, 13, 21)
    with pytest.raises(PromptFailed) as e:
        run_prompt(g)
    msg = e.value.message
    assert msg.startswith("MaX4Zero Double-Mask Inpaint:") and "target_dilation" in msg and "protect_mask" in msg
