"""The method's policy (attention/policy.py), in CI: guidance, which passes and rows carry MEA, layers by grid."""

from __future__ import annotations

import pytest
import torch

from max4zero.attention import policy


def _branches(seed=0):
    g = torch.Generator().manual_seed(seed)
    u, c, mea = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 1:7] = 1.0
    return u, c, mea, mask


@pytest.mark.parametrize("cfg", [1.0, 7.5, 12.0])
def test_paper_guidance_is_the_three_branch_formula(cfg):
    u, c, mea, m = _branches()
    out = policy.guided("paper", u, c, mea, m, cfg, 15.0)
    inside, outside = m.bool().expand_as(u), ~m.bool().expand_as(u)
    # inside the mask: eps_u + (cfg + s_mea)(eps_c - eps_u) + s_mea (eps_MEA - eps_c)
    want_in = u + (cfg + 15.0) * (c - u) + 15.0 * (mea - c)
    assert torch.allclose(out[inside], want_in[inside], atol=1e-4)
    # outside: plain CFG, MEA has no say there
    assert torch.allclose(out[outside], (u + cfg * (c - u))[outside], atol=1e-5)


def test_fused_guidance_is_one_weight_for_text_and_garment_everywhere():
    u, c, mea, m = _branches(1)
    out = policy.guided("fused", u, c, mea, m, 7.0, 15.0)
    assert torch.allclose(out, u + 7.0 * (mea - u))
    assert torch.equal(out, policy.guided("fused", u, c * 5, mea, torch.zeros_like(m), 7.0, 0.0))  # c, M, s_mea unused


def test_the_paper_term_is_based_on_the_negative_prediction():
    u, c, mea, m = _branches(2)
    assert torch.equal(policy.guidance_base(u, c), u)
    assert torch.equal(policy.guidance_base(None, c), c)  # only when no negative pass ran at all
    cfg_result = u + 5.0 * (c - u)
    assert torch.equal(policy.paper_guidance(cfg_result, u, mea, m, 0.0), cfg_result)  # s_mea 0 = off, exactly


@pytest.mark.parametrize("cou, n, mea_pass, paper, fused", [
    ([1, 0], 2, False, [], [1]),
    ([0, 1], 2, False, [], [0]),
    ([1, 0], 4, False, [], [2, 3]),
    ([1], 1, False, [], []),
    ([0], 1, True, [0], [0]),
    ([0], 3, True, [0, 1, 2], [0, 1, 2]),
])
def test_which_rows_carry_mea(cou, n, mea_pass, paper, fused):
    assert policy.rows_with_mea("paper", cou, n, mea_pass) == paper  # never the normal passes
    assert policy.rows_with_mea("fused", cou, n, False) == fused  # the positive rows, wherever they are
    with pytest.raises(ValueError, match="mode"):
        policy.rows_with_mea("other", cou, n, mea_pass)


def test_layers_are_chosen_by_token_grid_on_every_unet():
    sel = policy.LAYER_CHOICES[policy.DEFAULT_LAYERS]
    # SD1.5 at 512 px: latent 64; decoder grids 16, 32, 64 -> the paper's 32 and 64
    assert [g for g in (16, 32, 64) if sel.selects("output", policy.grid_level((64, 64), (g, g)))] == [32, 64]
    # SDXL at 1024 px has decoder attention at 32 and 64 only (latent 128): only 64 is "1/16"
    assert [g for g in (32, 64) if sel.selects("output", policy.grid_level((128, 128), (g, g)))] == [64]
    wide = policy.LAYER_CHOICES["decoder 1/32 + 1/16 + 1/8"]
    assert [g for g in (32, 64) if wide.selects("output", policy.grid_level((128, 128), (g, g)))] == [32, 64]
    assert not sel.selects("input", 0)
    # a host that sees only the token count gets the same grid
    assert policy.token_grid(7 * 10, (13, 20))[:2] == (7, 10)
    assert policy.grid_level((13, 20), (7, 10)) == 1


def test_masks_at_a_token_grid_are_nearest_and_flat():
    m = torch.zeros(2, 16, 16)
    m[0, :8, :8] = 0.9
    m[1, 8:, 8:] = 0.4  # soft: below 0.5 is off
    tm = policy.token_mask(m, (2, 2))
    assert tm.dtype == torch.bool and tm.tolist() == [[True, False, False, False], [False, False, False, False]]


def test_no_op_cause_from_the_run_s_counters():
    assert policy.no_op_cause({"calls": 0}) == "window"
    assert policy.no_op_cause({"calls": 3, "layers": 0}) == "layers"
    assert policy.no_op_cause({"calls": 3, "layers": 6, "effective": 0}) == "masks"
    assert policy.no_op_cause({"calls": 3, "layers": 6, "effective": 1}) is None
    assert set(policy.NO_OP_CAUSES) == {"window", "layers", "masks"}


def test_no_op_messages_name_the_cause_and_the_layer_input_of_the_model():
    from max4zero.nodes.mea_patch import no_op_message

    assert "window" in no_op_message("window", 0.7, 1.0, torch.tensor([14.6, 0.0]), "layers")[0]
    assert "token grids" in no_op_message("masks", 0.0, 1.0, None, "layers")[0]
    unet = no_op_message("layers", 0.0, 1.0, None, "layers")
    assert "'layers'" in unet[1] and "flux_blocks" not in " ".join(unet)
    flux = no_op_message("layers", 0.0, 1.0, None, "flux_blocks")
    assert "Flux blocks" in flux[0] and "'flux_blocks'" in flux[1] and "'layers'" not in flux[1]
    for cause in ("window", "masks"):  # the other reasons do not depend on it
        assert no_op_message(cause, 0.7, 1.0, None, "layers") == no_op_message(cause, 0.7, 1.0, None, "flux_blocks")


def test_the_cfg1_rule_keeps_the_negative_pass_only_for_models_that_have_one():
    assert policy.keeps_negative_pass_at_cfg1(distilled=False)
    assert not policy.keeps_negative_pass_at_cfg1(distilled=True)
    from max4zero.nodes.mea_flux import FluxMeaPatch
    from max4zero.nodes.mea_patch import MeaPatch

    assert policy.keeps_negative_pass_at_cfg1(MeaPatch.distilled)  # a UNet: base ε_u, as in the paper
    assert not policy.keeps_negative_pass_at_cfg1(FluxMeaPatch.distilled)  # FLUX.1: base ε_c


# reference_every: when a call reuses the recorded reference K/V (stored at step 3, sigma 0.5)
@pytest.mark.parametrize("every, step, sigma, reuse", [
    (1, 3, 0.5, True),  # the same sigma: cond and uncond in separate calls share one reference pass (paper)
    (1, 4, 0.4, False),  # every 1 = the paper: any other sigma records anew
    (1, 3, 0.45, False),  # ... even at the same step index (a second call per step, e.g. Heun)
    (2, 4, 0.4, True),  # every 2: the next step reuses
    (2, 5, 0.3, False),  # ... the one after records anew
    (2, 3, 0.45, True),  # same step index, other sigma: within the span
    (2, 2, 0.6, False),  # an earlier step never reuses a later recording
    (3, 5, 0.3, True),
    (3, 6, 0.2, False),
])
def test_reference_is_reused_only_at_the_same_sigma_or_within_every_steps(every, step, sigma, reuse):
    assert policy.reuse_reference(3, 0.5, step, sigma, every) is reuse


def test_reference_reuse_needs_both_steps_and_a_recording():
    assert policy.reuse_reference(None, 0.5, 4, 0.4, 2) is False  # recording's step unknown
    assert policy.reuse_reference(3, 0.5, None, 0.4, 2) is False  # call's step unknown (no schedule)
    assert policy.reuse_reference(None, 0.5, None, 0.5, 2) is True  # the exact sigma needs no step
    assert policy.reuse_reference(None, None, 3, 0.5, 5) is False  # nothing recorded yet
    assert policy.reuse_reference(0, None, 0, 0.5, 5) is False


@pytest.mark.parametrize("bad", [0, -1, 1.5, 2.0, "2", None, True])
def test_reference_every_must_be_a_whole_number_of_steps(bad):
    with pytest.raises(ValueError, match="reference_every must be a whole number"):
        policy.check_reference_every(bad)


def test_reference_every_accepts_whole_numbers():
    assert policy.check_reference_every(1) == 1 and policy.check_reference_every(50) == 50
    assert type(policy.check_reference_every(torch.tensor(3).item())) is int
