"""Issue 13 for the Masked Extended Attention node: no silent no-op, no late error.

* a mask that is not empty but unusable (soft, thinner than the erosion, lost at every token grid) is refused at
  the node with what to do; an empty mask keeps its contract (plain sampling) and says so on the node;
* a target mask of another aspect or batch than the latent is refused before the first step, naming the node;
* widget values (start > end, a combo value sent through the API) are refused at queue time;
* SD1.5 text on an SDXL model is refused when the node runs, not at the first MEA step;
* a garment mask that looks inverted is pointed out on the node.
"""

from __future__ import annotations

import logging

import pytest
import torch

import comfy_models as cm
from comfy_models import Graph, PromptFailed, run_prompt
from test_hostile_inputs import assert_names_real, ui_text  # noqa: F401  (fixture)
from test_mea_nodes import MEA, SIZE, _latent, _mea, _sampler


@pytest.fixture(scope="module")
def pair():
    return cm.synthetic_pair(SIZE)


def _run(g, node, validate=True):
    g.capture(_sampler(g, node[0])[0], "x")
    return run_prompt(g, validate=validate)


@pytest.mark.parametrize("which, mask, needle", [
    ("garment_mask", lambda p: p["garment_mask"] * 0.45, "is soft"),
    ("target_mask", lambda p: p["target_mask"] * 0.45, "is soft"),
    ("garment_mask", lambda p: torch.zeros_like(p["garment_mask"]).index_fill_(2, torch.tensor([30]), 1.0),
     "vanishes after the 1-pixel erosion"),
    ("target_mask", lambda p: torch.zeros_like(p["target_mask"]).index_fill_(1, torch.tensor([33]), 1.0),
     "vanishes at the attention token grids"),
])
def test_unusable_masks_are_refused_at_the_node(comfy_env, small_sd15_model, small_vae, pair, which, mask, needle):
    """Before: the same output as an empty mask (plain sampling), with no word."""
    g = Graph()
    node = _mea(g, g.obj(small_sd15_model(), "MODEL"), small_vae, pair, **{which: mask(pair)})
    with pytest.raises(PromptFailed) as e:
        _run(g, node)
    assert e.value.node_type == MEA and e.value.message.startswith("MaX4Zero Masked Extended Attention:")
    assert which in e.value.message and needle in e.value.message
    assert_names_real(MEA, e.value.message)


def test_an_empty_mask_is_still_plain_sampling_and_says_so_on_the_node(comfy_env, small_sd15_model, small_vae, pair,
                                                                         caplog, ui_text):  # noqa: F811
    model = small_sd15_model()
    g = Graph()
    m = g.obj(model, "MODEL")
    node = _mea(g, m, small_vae, pair, target_mask=torch.zeros_like(pair["target_mask"]))
    g.capture(_sampler(g, node[0])[0], "mea")
    g.capture(_sampler(g, m)[0], "stock")
    with caplog.at_level(logging.WARNING):
        res = run_prompt(g)
    assert torch.equal(_latent(res, "mea"), _latent(res, "stock"))  # the contract: bit-identical
    said = [t for nid, t in ui_text.texts if nid == node.id]
    assert any("target mask is empty" in t and "plain sampling" in t for t in said), ui_text.texts


@pytest.mark.parametrize("mask_shape, needle", [((1, 256, 64), "would be stretched"), ((3, SIZE, SIZE), "target_mask has 3")])
def test_target_mask_that_does_not_fit_the_latent_is_refused_before_the_first_step(comfy_env, small_sd15_model,
                                                                                    small_vae, pair, mask_shape, needle):
    """Before: a 256x64 mask was stretched over a square latent silently; a batch mismatch failed inside the UNet."""
    tm = torch.zeros(mask_shape)
    tm[:, mask_shape[1] // 4: 3 * mask_shape[1] // 4, mask_shape[2] // 4: 3 * mask_shape[2] // 4] = 1.0
    calls = []
    model = small_sd15_model().clone()
    import comfy.patcher_extension

    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "count",
                               lambda executor, *a, **k: calls.append(1) or executor(*a, **k))
    g = Graph()
    node = _mea(g, g.obj(model, "MODEL"), small_vae, pair, target_mask=tm)
    with pytest.raises(PromptFailed) as e:
        _run(g, node)
    # raised in the sampler's node, so it names the MEA node and its id
    assert e.value.message.startswith(f"MaX4Zero Masked Extended Attention (node #{node.id}):") and needle in e.value.message
    assert calls == []  # refused before any model call


@pytest.mark.parametrize("over, needle", [
    (dict(start=0.9, end=0.5), "start=0.9 is after end=0.5"),
    (dict(guidance="nonsense"), "guidance='nonsense' is not one of"),
    (dict(layers="decoder 1/3"), "layers='decoder 1/3' is not one of"),
    (dict(reference_every=0), "reference_every=0 is outside 1..50"),
    (dict(reference_every=51), "reference_every=51 is outside 1..50"),
])
def test_widget_errors_are_found_at_queue_time(comfy_env, small_sd15_model, small_vae, pair, over, needle):
    """Before: start > end and a bad combo were accepted at /prompt (0.3.64) and failed only when the node ran."""
    g = Graph()
    node = _mea(g, g.obj(small_sd15_model(), "MODEL"), small_vae, pair, **over)
    with pytest.raises(PromptFailed) as e:
        _run(g, node)
    assert e.value.exception_type == "validation" and needle in e.value.message, e.value.message


def test_text_of_another_model_family_is_refused_when_the_node_runs(comfy_env, small_vae, pair):
    """Before: found at the first MEA step, after most of the sampling (SD1.5 text on an SDXL UNet)."""
    g = Graph()
    node = _mea(g, g.obj(cm.small_sdxl_model(), "MODEL"), small_vae, pair)  # positive: 768-wide SD1.5 text
    g.capture(node[0], "model")
    with pytest.raises(PromptFailed) as e:
        run_prompt(g)
    assert e.value.node_type == MEA and "768 wide" in e.value.message and "2048" in e.value.message


def test_inverted_garment_mask_is_pointed_out_on_the_mea_node(comfy_env, small_sd15_model, small_vae, pair, caplog,
                                                               ui_text):  # noqa: F811
    g = Graph()
    node = _mea(g, g.obj(small_sd15_model(), "MODEL"), small_vae, pair, garment_mask=1.0 - pair["garment_mask"])
    g.capture(node[0], "model")
    with caplog.at_level(logging.WARNING):
        run_prompt(g)
    said = [t for nid, t in ui_text.texts if nid == node.id]
    assert any("garment_mask looks inverted" in t and "InvertMask" in t for t in said), ui_text.texts


# ------------------------------------------------------------------------------------------------
# no error after the expensive work: a mismatch reported before any sampler runs
# ------------------------------------------------------------------------------------------------


def _tryon(small_vae, mea_target, *, latent_input: bool):
    """The full try-on chain (crop, correspondence, warp, double mask, stage 1, MEA, stage 2, paste back) with
    ``mea_target`` as the MEA node's target mask ("crop": the crop's region, as shipped; "photo": the original
    photo's mask, another aspect; "batch3": three masks for one latent)."""
    size = 64
    pair = cm.synthetic_pair(size)
    model = cm.small_sd15_model(inpaint=True)
    g = Graph()
    m, vae = g.obj(model, "MODEL"), g.obj(small_vae, "VAE")
    pos, neg = g.obj(cm.conditioning(1), "CONDITIONING"), g.obj(cm.conditioning(2), "CONDITIONING")
    pad = (40, 8, 16, 90)  # a portrait photo (176x112): its mask is another aspect than the square crop
    photo = torch.nn.functional.pad(pair["target"].movedim(-1, 1), pad, value=0.3).movedim(1, -1).contiguous()
    photo_mask = torch.nn.functional.pad(pair["target_mask"][:1], pad)
    pm = g.obj(photo_mask, "MASK")
    crop = g.node("MaX4ZeroCropToMask", image=g.obj(photo, "IMAGE"), mask=pm, size=size, padding=0.3)
    ref = g.obj(pair["reference"], "IMAGE")
    gm = g.obj(pair["garment_mask"], "MASK")
    corr = g.node("MaX4ZeroCorrespondence", model=m, vae=vae, positive=pos, reference_image=ref, garment_mask=gm,
                  target_image=crop[0], target_mask=crop[1], mode="paper", ensemble=1, outlier_filter="none",
                  outlier_threshold=5.0, control_points="all", score_threshold=0.5, seed=0)
    warp = g.node("MaX4ZeroMLSWarp", reference_image=ref, garment_mask=gm, target_image=crop[0], matches=corr[0],
                  kind="affine", alpha=0.1, stride=4, sampling="bilinear")
    dm = g.node("MaX4ZeroDoubleMaskInpaint", positive=pos, negative=neg, vae=vae, target_image=crop[0],
                target_mask=crop[1], warped_image=warp[0], warped_mask=warp[1], target_dilation=13,
                fringe_dilation=19)
    s1 = g.node("KSamplerAdvanced", model=m, add_noise="enable", noise_seed=1, steps=4, cfg=3.0,
                sampler_name="euler", scheduler="normal", positive=dm[0], negative=dm[1], latent_image=dm[2],
                start_at_step=0, end_at_step=3, return_with_leftover_noise="enable")
    target = {"crop": dm[4], "photo": pm, "batch3": g.obj(torch.cat([photo_mask] * 3)[:, :size, :size], "MASK")}
    over = {"latent": dm[2]} if latent_input else {}
    mea = g.node(MEA, model=m, vae=vae, reference=ref, garment_mask=gm, target_mask=target[mea_target],
                 positive=pos, guidance="paper", s_mea=15.0, contrast=1.25, start=0.7, end=1.0,
                 layers="decoder 1/16 + 1/8 (paper)", reference_seed=0, background="kept", **over)
    ic = g.node("InpaintModelConditioning", positive=pos, negative=neg, vae=vae, pixels=dm[3], mask=dm[4],
                noise_mask=True)
    lat2 = g.node("SetLatentNoiseMask", samples=s1[0], mask=dm[4])
    s2 = g.node("KSamplerAdvanced", model=mea[0], add_noise="disable", noise_seed=1, steps=4, cfg=3.0,
                sampler_name="euler", scheduler="normal", positive=ic[0], negative=ic[1], latent_image=lat2[0],
                start_at_step=3, end_at_step=4, return_with_leftover_noise="disable")
    dec = g.node("VAEDecode", samples=s2[0], vae=vae)
    paste = g.node("MaX4ZeroPasteBack", original_image=g.obj(photo, "IMAGE"), generated_image=dec[0],
                   crop_info=crop[2], mask=dm[4], feather=3)
    g.capture(paste[0], "final")
    return g, mea


@pytest.fixture
def sampler_runs(monkeypatch):
    """How many sampling runs started (every KSampler goes through comfy.sample.sample)."""
    import comfy.sample

    runs = []
    real = comfy.sample.sample

    def counted(*a, **k):
        runs.append(1)
        return real(*a, **k)

    monkeypatch.setattr(comfy.sample, "sample", counted)
    return runs


@pytest.mark.parametrize("mea_target, needle", [("photo", "would be stretched"), ("batch3", "target_mask has 3")])
def test_a_target_mask_mismatch_in_the_tryon_fails_before_any_sampler(comfy_env, small_vae, sampler_runs,
                                                                      mea_target, needle):
    g, mea = _tryon(small_vae, mea_target, latent_input=True)
    with pytest.raises(PromptFailed) as e:
        run_prompt(g)
    assert e.value.node_type == MEA and needle in e.value.message
    assert sampler_runs == []  # stage 1 never started
    # as shipped (the crop's region) the same chain runs through, both samplers
    g_ok, _ = _tryon(small_vae, "crop", latent_input=True)
    assert torch.isfinite(run_prompt(g_ok)["final"]).all() and len(sampler_runs) == 2


def test_without_the_latent_input_the_mismatch_is_still_refused_before_stage_two_samples(comfy_env, small_vae,
                                                                                         sampler_runs):
    """What 'latent' is for: unconnected, the MEA node cannot know the latent, so the refusal comes when stage 2's
    sampler starts (still before any MEA model call), after stage 1 has sampled."""
    g, _ = _tryon(small_vae, "photo", latent_input=False)
    with pytest.raises(PromptFailed, match="would be stretched"):
        run_prompt(g)
    assert len(sampler_runs) == 2
