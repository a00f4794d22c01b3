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
    assert e.value.message.startswith("MaX4Zero Masked Extended Attention:") and needle in e.value.message
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
