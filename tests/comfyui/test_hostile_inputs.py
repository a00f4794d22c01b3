"""Issue 13: hostile inputs to the registration nodes, through ComfyUI's own validation and execution.

No silent wrong result (a crop_info of another photo, a protect mask that removes the whole region, absurd
control points, an inverted mask, an RGBA photo), every check that needs only widget values at queue time
(V3 ``validate_inputs``), and messages that name the node, a real input and a fix. Each test here fails on
the code before issue 13 (see the docstrings) and passes on both supported ComfyUI versions.
"""

from __future__ import annotations

import json
import logging
import re
import sys

import pytest
import torch

import comfy_models as cm
from comfy_models import Graph, PromptFailed, run_prompt

SIZE = 64

NAMES = {
    "MaX4ZeroCorrespondence": "MaX4Zero Correspondence",
    "MaX4ZeroMLSWarp": "MaX4Zero MLS Warp",
    "MaX4ZeroDoubleMaskInpaint": "MaX4Zero Double-Mask Inpaint",
    "MaX4ZeroCropToMask": "MaX4Zero Crop To Mask",
    "MaX4ZeroPasteBack": "MaX4Zero Paste Back",
    "MaX4ZeroMaskedExtendedAttention": "MaX4Zero Masked Extended Attention",
    "MaX4ZeroFlowView": "MaX4Zero Leffa Flow View",
}


@pytest.fixture(scope="module")
def pair():
    return cm.synthetic_pair(SIZE)


# ------------------------------------------------------------------------------------------------
# "every input name quoted in an error message is a real input of that node"
# ------------------------------------------------------------------------------------------------


def _schema(node_id: str):
    import nodes

    return nodes.NODE_CLASS_MAPPINGS[node_id].define_schema()


def quoted_name_problems(message: str, inputs: dict[str, list | None]) -> list[str]:
    """What in ``message`` quotes a name that is not an input of the node (``inputs``: name → combo options).

    Two ways a message refers to one of the node's own inputs:

    * ``name=value`` (``mode='all'``, ``threshold=None``): ``name`` must be an input, and a quoted value of a
      combo input must be one of its options, unless the message reports the value it received
      (``mode='magic' is not one of ...``);
    * ``'name'`` (a snake_case word in single quotes, e.g. ``'manual_points'``): an input or one of the node's
      combo values, unless an output is meant (``the 'matches' output of ...``).

    Another node's inputs are written without quotes (``MaX4Zero MLS Warp's manual_points``), and a JSON example
    in double quotes is not a reference.
    """
    problems = []
    options = {v for opts in inputs.values() if opts for v in opts}
    for m in re.finditer(r"(?<![\w\"'.])([a-z][a-z0-9_]*)=('([^']*)'|[^\s,;)]+)(\s+(?:is|must)\b)?", message):
        name, quoted, reported = m.group(1), m.group(3), m.group(4)
        if name not in inputs:
            problems.append(f"{m.group(0)!r}: {name!r} is not an input")
        elif quoted is not None and not reported and inputs[name] is not None and quoted not in inputs[name]:
            problems.append(f"{m.group(0)!r}: {quoted!r} is not an option of {name!r}")
    for m in re.finditer(r"(?<![=\w])'([a-z][a-z0-9_]*)'(?! output)", message):
        word = m.group(1)
        if word not in inputs and word not in options:
            problems.append(f"{m.group(0)!r} is neither an input nor an option of this node")
    return problems


def _inputs_of(node_id: str) -> dict[str, list | None]:
    return {i.id: (list(i.options) if getattr(i, "options", None) is not None else None)
            for i in _schema(node_id).inputs}


def assert_names_real(node_id: str, message: str) -> None:
    assert message.startswith(NAMES[node_id] + ":") or f"{NAMES[node_id]}:" in message, message
    problems = quoted_name_problems(message, _inputs_of(node_id))
    assert not problems, f"{message}\n" + "\n".join(problems)


def test_the_name_check_catches_the_old_correspondence_message(comfy_env):
    """The message Correspondence gave before issue 13 when no control point was left: it names inputs that do
    not exist (threshold) and an option that does not exist (mode='all'). The check must flag both."""
    old = ("MaX4Zero Correspondence: no control points: no match has score ≥ 0.5; lower the threshold or use "
           "mode='all', or try DIFT features (better for textured garments), a looser outlier filter or none "
           "(threshold=None), and check that both masks cover the garment.")
    problems = quoted_name_problems(old, _inputs_of("MaX4ZeroCorrespondence"))
    assert any("'all' is not an option of 'mode'" in p for p in problems), problems
    assert any("'threshold' is not an input" in p for p in problems), problems
    assert quoted_name_problems("MaX4Zero MLS Warp: connect the 'matches' output of MaX4Zero Correspondence, or "
                                "fill 'manual_points'", _inputs_of("MaX4ZeroMLSWarp")) == []
    assert quoted_name_problems("X: use 'strength'", _inputs_of("MaX4ZeroMLSWarp"))
    assert quoted_name_problems("X: set control_points='all'", _inputs_of("MaX4ZeroCorrespondence")) == []


def _fails(g: Graph, validate: bool = True) -> PromptFailed:
    with pytest.raises(PromptFailed) as e:
        run_prompt(g, validate=validate)
    return e.value


# ------------------------------------------------------------------------------------------------
# graph builders
# ------------------------------------------------------------------------------------------------


def _correspondence(g, pair, model=None, **over):
    inputs = dict(
        model=g.obj(model or cm.small_sd15_model(inpaint=True), "MODEL"), vae=g.obj(cm.small_vae(), "VAE"),
        positive=g.obj(cm.conditioning(1), "CONDITIONING"), reference_image=g.obj(pair["reference"], "IMAGE"),
        garment_mask=g.obj(pair["garment_mask"], "MASK"), target_image=g.obj(pair["target"], "IMAGE"),
        target_mask=g.obj(pair["target_mask"], "MASK"), mode="paper", ensemble=1, outlier_filter="none",
        outlier_threshold=5.0, control_points="all", score_threshold=0.5, seed=0)
    inputs.update(over)
    return g.node("MaX4ZeroCorrespondence", **inputs)


def _warp(g, pair, manual="[[[20, 20], [22, 21]], [[40, 20], [42, 21]], [[20, 40], [22, 41]]]", **over):
    inputs = dict(reference_image=g.obj(pair["reference"], "IMAGE"), garment_mask=g.obj(pair["garment_mask"], "MASK"),
                  target_image=g.obj(pair["target"], "IMAGE"), manual_points=manual, kind="affine", alpha=0.1,
                  stride=8, sampling="bilinear")
    inputs.update(over)
    return g.node("MaX4ZeroMLSWarp", **inputs)


def _double(g, pair, **over):
    wm = torch.zeros_like(pair["target_mask"])
    wm[:, 28:56, 20:52] = 1.0
    inputs = dict(positive=g.obj(cm.conditioning(1), "CONDITIONING"), negative=g.obj(cm.conditioning(2), "CONDITIONING"),
                  vae=g.obj(cm.small_vae(), "VAE"), target_image=g.obj(pair["target"], "IMAGE"),
                  target_mask=g.obj(pair["target_mask"], "MASK"), warped_image=g.obj(pair["reference"], "IMAGE"),
                  warped_mask=g.obj(wm, "MASK"), target_dilation=13, fringe_dilation=19)
    inputs.update(over)
    return g.node("MaX4ZeroDoubleMaskInpaint", **inputs)


def _crop(g, image, mask, **over):
    inputs = dict(image=g.obj(image, "IMAGE") if isinstance(image, torch.Tensor) else image,
                  mask=g.obj(mask, "MASK") if isinstance(mask, torch.Tensor) else mask, size=64, padding=0.1)
    inputs.update(over)
    return g.node("MaX4ZeroCropToMask", **inputs)


def _photos(h=96, w=128):
    """A person photo and a garment photo of the SAME size, each with its mask (a different region)."""
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    person = torch.stack([0.3 + 0.4 * xx / w, 0.5 + 0.2 * yy / h, 0.4 + 0 * xx], -1)[None].float()
    person_mask = ((yy > 50) & (yy < 90) & (xx > 70) & (xx < 120)).float()[None]   # lower right (torso)
    garment = torch.stack([0.9 - 0.5 * (yy // 8 % 2), 0.2 + 0 * xx, 0.2 + 0.6 * yy / h], -1)[None].float()
    garment_mask = ((yy > 5) & (yy < 45) & (xx > 5) & (xx < 55)).float()[None]     # upper left ("the face")
    return person, person_mask, garment, garment_mask


# ------------------------------------------------------------------------------------------------
# item 1: Paste Back recognises the photo its crop_info came from
# ------------------------------------------------------------------------------------------------


def test_paste_back_refuses_the_crop_info_of_another_photo_of_the_same_size(comfy_env):
    """Before: the garment crop's crop_info, same original size, was accepted and the crop landed elsewhere."""
    person, person_mask, garment, garment_mask = _photos()
    g = Graph()
    pc = _crop(g, person, person_mask)
    gc = _crop(g, garment, garment_mask)
    paste = g.node("MaX4ZeroPasteBack", original_image=g.obj(person, "IMAGE"), generated_image=pc[0],
                   crop_info=gc[2], mask=pc[1], feather=3)
    g.capture(paste[0], "out")
    err = _fails(g)
    assert err.node_type == "MaX4ZeroPasteBack"
    msg = err.message
    assert "crop_info was made from another 128x96 photo, not from original_image" in msg
    assert "connect the crop_info of the MaX4Zero Crop To Mask node whose image is this original_image" in msg
    assert_names_real("MaX4ZeroPasteBack", msg)
    # the right crop_info still pastes; an RGB copy of an RGBA photo is the same photo
    g = Graph()
    pc = _crop(g, torch.cat([person, torch.ones_like(person[..., :1])], -1), person_mask)
    paste = g.node("MaX4ZeroPasteBack", original_image=g.obj(person, "IMAGE"), generated_image=pc[0],
                   crop_info=pc[2], mask=pc[1], feather=3)
    g.capture(paste[0], "out")
    out = run_prompt(g)["out"]
    assert out.shape == person.shape and torch.equal(out[0][person_mask[0] < 0.5], person[0][person_mask[0] < 0.5])


# ------------------------------------------------------------------------------------------------
# item 3: a protect mask that removes the whole try-on region is refused before any sampling
# ------------------------------------------------------------------------------------------------


def test_protect_mask_covering_the_region_is_refused_before_sampling(comfy_env, pair):
    """Before: Double-Mask Inpaint passed an empty region on; the sampler ran and the photo came back unchanged."""
    g = Graph()
    d = _double(g, pair, protect_mask=g.obj(torch.ones(1, SIZE, SIZE), "MASK"))
    s = g.node("KSamplerAdvanced", model=g.obj(cm.small_sd15_model(inpaint=True), "MODEL"), add_noise="enable",
               noise_seed=1, steps=1, cfg=3.0, sampler_name="euler", scheduler="normal", positive=d[0], negative=d[1],
               latent_image=d[2], start_at_step=0, end_at_step=1, return_with_leftover_noise="disable")
    g.capture(s[0], "x")
    err = _fails(g)
    assert err.node_type == "MaX4ZeroDoubleMaskInpaint"  # not the sampler: nothing was sampled
    assert "protect_mask covers the whole target_mask" in err.message and "unchanged" in err.message
    assert_names_real("MaX4ZeroDoubleMaskInpaint", err.message)
    # Correspondence, given the same masks, says the same (it runs first in the full try-on)
    g = Graph()
    c = _correspondence(g, pair, protect_mask=g.obj(torch.ones(1, SIZE, SIZE), "MASK"))
    g.capture(c[0], "m")
    err = _fails(g)
    assert err.node_type == "MaX4ZeroCorrespondence" and "protect_mask covers the whole target_mask" in err.message
    assert_names_real("MaX4ZeroCorrespondence", err.message)


# ------------------------------------------------------------------------------------------------
# item 5: absurd control points
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("coord", [1e6, 1e30, -5e4])
def test_mls_warp_refuses_points_far_outside_the_images(comfy_env, pair, coord):
    """Before: coordinates of 1e6 or 1e30 gave an all-black warp with no message."""
    pts = [[[20, 20], [22, 21]], [[coord, 20], [42, 21]], [[20, 40], [22, 41]]]
    g = Graph()
    w = _warp(g, pair, manual=json.dumps(pts))
    g.capture(w[0], "x")
    err = _fails(g)
    assert err.node_type == "MaX4ZeroMLSWarp"
    assert "control point #1 has reference point" in err.message and "far outside the 64x64 reference image" in err.message
    assert_names_real("MaX4ZeroMLSWarp", err.message)


def test_mls_warp_points_with_sizes_are_checked_at_queue_time(comfy_env, pair):
    doc = {"reference_size": [64, 64], "target_size": [64, 64],
           "points": [{"reference": [10, 10], "target": [1e6, 10]}]}
    g = Graph()
    w = _warp(g, pair, manual=json.dumps(doc))
    g.capture(w[0], "x")
    err = _fails(g)
    assert err.exception_type == "validation", err
    assert "MaX4Zero MLS Warp: manual_points: control point #0 has target point" in err.message


def test_points_slightly_outside_are_fine(comfy_env, pair):
    g = Graph()
    w = _warp(g, pair, manual=json.dumps([[[-10, 5], [-6, 7]], [[70, 60], [66, 62]], [[30, 70], [32, 66]]]))
    g.capture(w[0], "x")
    assert run_prompt(g)["x"].shape == (1, SIZE, SIZE, 3)


# ------------------------------------------------------------------------------------------------
# item 6: a garment mask that looks inverted is pointed out on the node
# ------------------------------------------------------------------------------------------------


class _UiText:
    """Stands in for ``server.PromptServer.instance``: records the progress texts sent to nodes."""

    def __init__(self):
        self.texts: list[tuple[str, str]] = []

    def send_progress_text(self, text, node_id, sid=None):
        self.texts.append((str(node_id), text.decode() if isinstance(text, bytes) else text))


@pytest.fixture
def ui_text(monkeypatch):
    """The running server as the pack sees it (``sys.modules["server"].PromptServer.instance``), recording texts."""
    import types

    rec = _UiText()
    fake = types.ModuleType("server")
    fake.PromptServer = type("PromptServer", (), {"instance": rec})
    monkeypatch.setitem(sys.modules, "server", fake)
    return rec


def _inverted_warnings(caplog):
    return [r.getMessage() for r in caplog.records if "looks inverted" in r.getMessage()]


@pytest.mark.parametrize("node", ["MaX4ZeroMLSWarp", "MaX4ZeroCropToMask", "MaX4ZeroCorrespondence"])
def test_inverted_garment_mask_is_pointed_out_on_the_node(comfy_env, pair, caplog, ui_text, node):
    """LoadImage's MASK output of a cut-out garment PNG is 1 - alpha: the background. Before: no word."""
    inverted = 1.0 - pair["garment_mask"]
    g = Graph()
    if node == "MaX4ZeroMLSWarp":
        n = _warp(g, pair, garment_mask=g.obj(inverted, "MASK"))
    elif node == "MaX4ZeroCropToMask":
        n = _crop(g, pair["reference"], inverted)
    else:
        n = _correspondence(g, pair, garment_mask=g.obj(inverted, "MASK"))
    g.capture(n[0], "x")
    with caplog.at_level(logging.WARNING):
        run_prompt(g)
    logged = _inverted_warnings(caplog)
    name = "mask" if node == "MaX4ZeroCropToMask" else "garment_mask"
    assert len(logged) == 1 and logged[0].startswith(f"{NAMES[node]}: {name} looks inverted"), logged
    assert "covers 100% of the image border" in logged[0] and "InvertMask" in logged[0]
    assert (n.id, logged[0]) in ui_text.texts  # shown on the node itself, not only in the console


def test_a_normal_mask_gives_no_inverted_warning(comfy_env, pair, caplog, ui_text):
    g = Graph()
    g.capture(_warp(g, pair)[0], "x")
    g.capture(_crop(g, pair["reference"], pair["garment_mask"])[0], "y")
    with caplog.at_level(logging.WARNING):
        run_prompt(g)
    assert _inverted_warnings(caplog) == [] and ui_text.texts == []


# ------------------------------------------------------------------------------------------------
# item 7: no core node gets a 4-channel image from us; the alpha survives the final paste
# ------------------------------------------------------------------------------------------------


def test_rgba_photo_through_crop_inpaint_conditioning_and_paste(comfy_env, small_vae):
    """Before: Crop To Mask passed 4 channels on and the stock InpaintModelConditioning failed in the VAE."""
    person, person_mask, _, _ = _photos()
    alpha = torch.linspace(0.2, 1.0, person.shape[2]).expand(person.shape[1], -1)[None, ..., None]
    rgba = torch.cat([person, alpha], -1)
    g = Graph()
    c = _crop(g, rgba, person_mask)
    cond = g.node("InpaintModelConditioning", positive=g.obj(cm.conditioning(1), "CONDITIONING"),
                  negative=g.obj(cm.conditioning(2), "CONDITIONING"), vae=g.obj(small_vae, "VAE"), pixels=c[0],
                  mask=c[1], noise_mask=True)
    paste = g.node("MaX4ZeroPasteBack", original_image=g.obj(rgba, "IMAGE"), generated_image=c[0], crop_info=c[2],
                   mask=c[1], feather=3)
    g.capture(c[0], "crop")
    g.capture(cond[2], "latent")
    g.capture(paste[0], "out")
    res = run_prompt(g)
    assert res["crop"].shape == (1, 64, 64, 3)
    assert res["latent"]["samples"].shape == (1, 4, 8, 8)
    out = res["out"]
    assert out.shape == rgba.shape and torch.equal(out[..., 3], rgba[..., 3])  # alpha kept for the final image


def test_mls_warp_of_an_rgba_garment_is_rgb(comfy_env, pair):
    rgba = torch.cat([pair["reference"], pair["garment_mask"][..., None]], -1)
    g = Graph()
    w = _warp(g, pair, reference_image=g.obj(rgba, "IMAGE"))
    g.capture(w[0], "x")
    assert run_prompt(g)["x"].shape == (1, SIZE, SIZE, 3)


# ------------------------------------------------------------------------------------------------
# item 8: what needs only widget values is refused at queue time, naming node, input and fix
# ------------------------------------------------------------------------------------------------

WIDGET_CASES = [
    ("MaX4ZeroCorrespondence", {"target_dilation": 12}, "target_dilation=12 must be an odd whole number", "use 11 or 13"),
    ("MaX4ZeroCorrespondence", {"mode": "magic"}, "mode='magic' is not one of ['paper', 'dift']", "pick one of"),
    ("MaX4ZeroCorrespondence", {"control_points": "some"}, "control_points='some' is not one of", "pick one of"),
    ("MaX4ZeroCorrespondence", {"outlier_filter": "lmeds"}, "outlier_filter='lmeds' is not one of", "pick one of"),
    ("MaX4ZeroMLSWarp", {"kind": "bent"}, "kind='bent' is not one of", "pick one of"),
    ("MaX4ZeroMLSWarp", {"sampling": "bicubic"}, "sampling='bicubic' is not one of", "pick one of"),
    ("MaX4ZeroMLSWarp", {"manual_points": "{not json"}, "manual_points: the control-point JSON does not parse",
     "write e.g."),
    ("MaX4ZeroDoubleMaskInpaint", {"fringe_dilation": 18}, "fringe_dilation=18 must be an odd", "use 17 or 19"),
    ("MaX4ZeroDoubleMaskInpaint", {"target_dilation": 0}, "target_dilation=0 is outside 1..255", "give a number"),
    ("MaX4ZeroCropToMask", {"size": 100}, "size=100 must be a multiple of 8", "use 96 or 104"),
    ("MaX4ZeroCropToMask", {"size": 8}, "size=8 is outside 64..4096", "give a number from 64 to 4096"),
    ("MaX4ZeroPasteBack", {"feather": 4}, "feather=4 must be an odd whole number", "use 3 or 5"),
]


def _node_with(g: Graph, pair, node_id: str, over: dict):
    if node_id == "MaX4ZeroCorrespondence":
        return _correspondence(g, pair, **over)
    if node_id == "MaX4ZeroMLSWarp":
        return _warp(g, pair, **over)
    if node_id == "MaX4ZeroDoubleMaskInpaint":
        return _double(g, pair, **over)
    if node_id == "MaX4ZeroCropToMask":
        return _crop(g, pair["target"], pair["target_mask"], **over)
    c = _crop(g, pair["target"], pair["target_mask"])
    return g.node("MaX4ZeroPasteBack", original_image=g.obj(pair["target"], "IMAGE"), generated_image=c[0],
                  crop_info=c[2], **{"feather": 3, **over})


@pytest.mark.parametrize("node_id, over, problem, fix", WIDGET_CASES,
                         ids=[f"{c[0][8:]}-{next(iter(c[1]))}" for c in WIDGET_CASES])
def test_widget_errors_are_found_at_queue_time(comfy_env, pair, node_id, over, problem, fix):
    """Before: accepted by /prompt (0.3.64 does not check V3 combos; nothing checks odd/multiple-of-8), and found
    only when the node ran, after everything upstream (in the full try-on: both samplers and the decode)."""
    g = Graph()
    g.capture(_node_with(g, pair, node_id, over)[0], "x")
    err = _fails(g)
    assert err.exception_type == "validation", f"{err.exception_type}: {err.message}"
    assert f"{NAMES[node_id]}: {problem}" in err.message and fix in err.message, err.message
    # the node's own check says the same when validation is bypassed (a widget value that reached it anyway)
    g2 = Graph()
    g2.capture(_node_with(g2, pair, node_id, over)[0], "x")
    err2 = _fails(g2, validate=False)
    assert err2.node_type == node_id and err2.message.startswith(f"{NAMES[node_id]}: {problem}"), err2.message
    assert_names_real(node_id, err2.message)


def test_valid_widgets_pass_validation_and_a_linked_widget_is_checked_when_the_node_runs(comfy_env, pair):
    g = Graph()
    d = _double(g, pair, fringe_dilation=g.obj(18, "INT"))  # unknown at queue time
    g.capture(d[0], "x")
    err = _fails(g)
    assert err.exception_type != "validation" and err.node_type == "MaX4ZeroDoubleMaskInpaint"
    assert "fringe_dilation=18 must be an odd whole number" in err.message


def test_conditioning_of_another_model_family_is_refused_before_the_feature_pass(comfy_env, pair):
    """Before: the SDXL-width text reached the UNet and failed there with a matrix-shape error."""
    g = Graph()
    c = _correspondence(g, pair, positive=g.obj([[torch.randn(1, 77, 2048), {}]], "CONDITIONING"))
    g.capture(c[0], "m")
    err = _fails(g)
    assert err.node_type == "MaX4ZeroCorrespondence"
    assert "positive is text conditioning 2048 wide but this model's cross-attention takes 768" in err.message
    assert_names_real("MaX4ZeroCorrespondence", err.message)


# ------------------------------------------------------------------------------------------------
# item 9: messages point at the right thing
# ------------------------------------------------------------------------------------------------


def test_no_control_points_names_real_inputs(comfy_env, pair):
    """Before: "lower the threshold or use mode='all' ... (threshold=None)": inputs Correspondence does not have."""
    g = Graph()
    c = _correspondence(g, pair, control_points="deterministic", score_threshold=1.0)
    g.capture(c[0], "m")
    err = _fails(g)
    msg = err.message
    assert "no control points: no match has score ≥ 1.0" in msg
    assert "lower score_threshold (now 1.0) or set control_points='all'" in msg
    assert "threshold=None" not in msg and "mode='all'" not in msg
    assert_names_real("MaX4ZeroCorrespondence", msg)


def test_paste_back_takes_a_mask_at_the_crop_size_whatever_the_generated_size(comfy_env, pair):
    """Before: a generated image of another square size made Paste Back blame the (correct) crop-size mask."""
    g = Graph()
    c = _crop(g, pair["target"], pair["target_mask"])  # 64x64 crop
    small = g.node("ImageScale", image=c[0], upscale_method="bilinear", width=32, height=32, crop="disabled")
    paste = g.node("MaX4ZeroPasteBack", original_image=g.obj(pair["target"], "IMAGE"), generated_image=small[0],
                   crop_info=c[2], mask=c[1], feather=3)
    g.capture(paste[0], "out")
    assert run_prompt(g)["out"].shape == pair["target"].shape
    # a mask of no known size names all three sizes
    g = Graph()
    c = _crop(g, pair["target"], pair["target_mask"])
    paste = g.node("MaX4ZeroPasteBack", original_image=g.obj(pair["target"], "IMAGE"), generated_image=c[0],
                   crop_info=c[2], mask=g.obj(torch.ones(1, 48, 48), "MASK"), feather=3)
    g.capture(paste[0], "out")
    err = _fails(g)
    assert "mask is 48x48; it must be one of 64x64 (the original size, the crop size, generated_image's size)" in err.message
    assert_names_real("MaX4ZeroPasteBack", err.message)


def test_crop_to_mask_recognises_load_image_placeholder_mask(comfy_env):
    """Before: "mask is 64x64 but image is 128x96 ... crop both with 'MaX4Zero Crop To Mask'" (itself)."""
    person, _, _, _ = _photos()
    g = Graph()
    c = _crop(g, person, torch.zeros(1, 64, 64))
    g.capture(c[0], "x")
    err = _fails(g)
    assert "mask is the 64x64 empty placeholder that Load Image outputs for an image without an alpha channel" \
        in err.message
    assert "Crop To Mask'" not in err.message and "LoadImageMask" in err.message
    assert_names_real("MaX4ZeroCropToMask", err.message)


def test_paste_back_refuses_an_empty_mask(comfy_env, pair):
    g = Graph()
    c = _crop(g, pair["target"], pair["target_mask"])
    paste = g.node("MaX4ZeroPasteBack", original_image=g.obj(pair["target"], "IMAGE"), generated_image=c[0],
                   crop_info=c[2], mask=g.obj(torch.zeros(1, SIZE, SIZE), "MASK"), feather=3)
    g.capture(paste[0], "out")
    err = _fails(g)
    assert "mask is empty (no pixel above 0.5): nothing would be pasted" in err.message


def test_a_soft_mask_is_called_soft_not_empty(comfy_env, pair):
    """Issue 13 item 2 (the registration nodes' side): 0.45 everywhere is not an empty mask. Before: "is empty"."""
    g = Graph()
    c = _crop(g, pair["target"], torch.full((1, SIZE, SIZE), 0.45))
    g.capture(c[0], "x")
    err = _fails(g)
    assert "mask is soft: no pixel above 0.5 (its largest value is 0.45)" in err.message
    assert "ThresholdMask" in err.message


# Every error path below is triggered through ComfyUI; each message must name its node and only real inputs.
MESSAGE_CASES = {
    "corr-soft-garment": ("MaX4ZeroCorrespondence", lambda g, p: _correspondence(
        g, p, garment_mask=g.obj(p["garment_mask"] * 0.45, "MASK"))),
    "corr-batch": ("MaX4ZeroCorrespondence", lambda g, p: _correspondence(
        g, p, reference_image=g.obj(p["reference"].expand(2, -1, -1, -1), "IMAGE"))),
    "corr-size": ("MaX4ZeroCorrespondence", lambda g, p: _correspondence(
        g, p, target_mask=g.obj(torch.ones(1, 32, 32), "MASK"))),
    "corr-line": ("MaX4ZeroCorrespondence", lambda g, p: _correspondence(
        g, p, garment_mask=g.obj(torch.nn.functional.pad(torch.ones(1, 1, 30), (10, 24, 20, 43)), "MASK"))),
    "corr-plain-model": ("MaX4ZeroCorrespondence", lambda g, p: _correspondence(
        g, p, model=cm.small_sd15_model(inpaint=False))),
    "warp-no-points": ("MaX4ZeroMLSWarp", lambda g, p: _warp(g, p, manual="")),
    "warp-matches-type": ("MaX4ZeroMLSWarp", lambda g, p: _warp(g, p, manual="", matches=g.obj(3, "MAX4ZERO_MATCHES"))),
    "warp-image-mask": ("MaX4ZeroMLSWarp", lambda g, p: _warp(g, p, garment_mask=g.obj(p["reference"], "MASK"))),
    "double-empty": ("MaX4ZeroDoubleMaskInpaint", lambda g, p: _double(
        g, p, target_mask=g.obj(torch.zeros(1, SIZE, SIZE), "MASK"))),
    "double-size": ("MaX4ZeroDoubleMaskInpaint", lambda g, p: _double(
        g, p, warped_mask=g.obj(torch.zeros(1, 32, 32), "MASK"))),
    "crop-empty": ("MaX4ZeroCropToMask", lambda g, p: _crop(g, p["target"], torch.zeros(1, SIZE, SIZE))),
    "crop-nan": ("MaX4ZeroCropToMask", lambda g, p: _crop(g, p["target"] * float("nan"), p["target_mask"])),
    "paste-type": ("MaX4ZeroPasteBack", lambda g, p: g.node(
        "MaX4ZeroPasteBack", original_image=g.obj(p["target"], "IMAGE"), generated_image=g.obj(p["target"], "IMAGE"),
        crop_info=g.obj("box", "MAX4ZERO_CROP"), feather=3)),
    "paste-not-square": ("MaX4ZeroPasteBack", lambda g, p: g.node(
        "MaX4ZeroPasteBack", original_image=g.obj(p["target"], "IMAGE"),
        generated_image=g.obj(torch.rand(1, 64, 48, 3), "IMAGE"),
        crop_info=_crop(g, p["target"], p["target_mask"])[2], feather=3)),
}


@pytest.mark.parametrize("case", list(MESSAGE_CASES))
def test_error_messages_name_the_node_and_only_real_inputs(comfy_env, pair, case):
    node_id, build = MESSAGE_CASES[case]
    g = Graph()
    g.capture(build(g, pair)[0], "x")
    err = _fails(g, validate=False)
    assert err.node_type == node_id, (err.node_type, err.message)
    assert err.exception_type == "MaX4Zero.NodeInputError", err.exception_type
    assert_names_real(node_id, err.message)


@pytest.mark.parametrize("points, needle", [
    ("[[[20, 20], [22, 21]], [[40, 20], [42, 21]]]", "point"),  # two points: no shape to fit
    ("[[[10, 10], [10, 10]], [[20, 20], [20, 20]], [[30, 30], [30, 30]]]", "line"),  # collinear
])
def test_degenerate_manual_points_are_pointed_out_on_mls_warp(comfy_env, pair, caplog, ui_text, points, needle):
    """Before: a degenerate or folded warp, exit 0, no word (issue 11)."""
    g = Graph()
    n = _warp(g, pair, manual=points)
    g.capture(n[0], "x")
    with caplog.at_level(logging.WARNING):
        run_prompt(g)
    said = [t for nid, t in ui_text.texts if nid == n.id]
    assert said and all(t.startswith("MaX4Zero MLS Warp: manual_points:") for t in said), ui_text.texts
    assert any(needle in t for t in said), said


def test_a_good_set_of_manual_points_gives_no_warning(comfy_env, pair, ui_text):
    g = Graph()
    g.capture(_warp(g, pair)[0], "x")
    run_prompt(g)
    assert ui_text.texts == []


# ================================================================================================
# Issue 18 (hostile round 2), the stage-1 side. Each case is a small data row (node, inputs, expected message) that a
# real-server runner can replay; every test below fails on the code before issue 18.
# ================================================================================================

cm.register_object_type("MAX4ZERO_TRACE")


def _pack_schemas() -> dict:
    return {cls.define_schema().node_id: cls.define_schema() for cls in cm.pack_node_classes()}


def _widget_defaults(schema) -> dict:
    """Every widget of a node at its default (links are left out)."""
    out = {}
    for inp in schema.inputs:
        if getattr(inp, "io_type", None) in ("INT", "FLOAT", "COMBO", "STRING", "BOOLEAN"):
            default = getattr(inp, "default", None)
            if default is None and getattr(inp, "options", None):
                default = list(inp.options)[0]
            if default is not None:
                out[inp.id] = default
    return out


def _queue_only(node_id: str, **widgets) -> tuple[Graph, str]:
    """A prompt with ``node_id`` at its widget defaults (``widgets`` override them), every link an object of the right
    type, captured: for queue-time validation only (nothing is executed, so the objects can be placeholders)."""
    schema = _pack_schemas()[node_id]
    g = Graph()
    inputs = _widget_defaults(schema)
    for inp in schema.inputs:
        if inp.id not in inputs and not getattr(inp, "optional", False):
            inputs[inp.id] = g.obj(None, inp.io_type)
    inputs.update(widgets)
    n = g.node(node_id, **inputs)
    out_types = [o.io_type for o in schema.outputs]
    if out_types:
        g.capture(n[0], "x")
    return g, n.id


def _queue_errors(g: Graph) -> dict:
    """ComfyUI's queue-time verdict on a prompt: ``{node id: [error, ...]}`` (empty when it would be queued)."""
    import asyncio
    import uuid

    import execution

    ok, err, _, node_errors = asyncio.run(execution.validate_prompt(str(uuid.uuid4()), g.prompt(), None))
    return {nid: e["errors"] for nid, e in node_errors.items()} if not ok or node_errors else {}


NONFINITE = (float("nan"), float("inf"), float("-inf"))


def _number_rows() -> list[tuple[str, dict, str]]:
    """item 4: every number widget of every node, NaN and ±inf (as the API delivers JSON NaN/Infinity)."""
    rows = []
    for node_id, schema in sorted(_pack_schemas().items()):
        for inp in schema.inputs:
            if getattr(inp, "io_type", None) in ("INT", "FLOAT"):
                for v in NONFINITE:
                    rows.append((node_id, {inp.id: v}, f"{NAMES[node_id]}: {inp.id}={v!r} is not a finite number"))
    return rows


#: item 4 and its neighbours: refused at queue time, once, with the node's message.
QUEUE_TIME_ROWS = _number_rows() + [
    ("MaX4ZeroFlowView", {"step_start": 0.8, "step_end": 0.2}, "MaX4Zero Leffa Flow View: step_start=0.8 is after "
     "step_end=0.2: the view would use no recorded MEA evaluation. set step_start <= step_end"),
    ("MaX4ZeroCorrespondence", {"outlier_threshold": 200.0}, "MaX4Zero Correspondence: outlier_threshold=200.0 is "
     "outside 0.5..64.0. give a number from 0.5 to 64.0"),
]


def test_every_node_at_its_default_widgets_is_queued(comfy_env):
    for node_id in _pack_schemas():
        g, _ = _queue_only(node_id)
        assert _queue_errors(g) == {}, node_id


@pytest.mark.parametrize("node_id, widgets, message", QUEUE_TIME_ROWS,
                         ids=[f"{r[0][8:]}-{'-'.join(f'{k}={v}' for k, v in r[1].items())}" for r in QUEUE_TIME_ROWS])
def test_bad_numbers_are_refused_at_queue_time_once(comfy_env, node_id, widgets, message):
    """Before: NaN passed ComfyUI's min/max check (every comparison with NaN is false) and the node failed late or
    returned a black image; a refused widget was repeated under every input its node validates."""
    g, nid = _queue_only(node_id, **widgets)
    errors = _queue_errors(g)
    assert list(errors) == [nid], errors
    assert len(errors[nid]) == 1, [e["details"] for e in errors[nid]]  # once, not once per validated input
    assert message in errors[nid][0]["details"], errors[nid][0]["details"]
    assert errors[nid][0]["details"].count(NAMES[node_id] + ":") == 1
    assert_names_real(node_id, errors[nid][0]["details"])


STAGE1_NAN_ROWS = [r for r in QUEUE_TIME_ROWS if r[0] in NAMES and r[0] not in (
    "MaX4ZeroMaskedExtendedAttention", "MaX4ZeroFlowView") and all(v != v for v in r[1].values())]


@pytest.mark.parametrize("node_id, widgets, message", STAGE1_NAN_ROWS,
                         ids=[f"{r[0][8:]}-{next(iter(r[1]))}" for r in STAGE1_NAN_ROWS])
def test_a_bad_number_that_reaches_a_stage1_node_is_refused_with_the_same_message(comfy_env, pair, node_id, widgets,
                                                                                  message):
    """A value that bypassed queue time (validation off) gets the same message from the node, not a late error such as
    Correspondence's "threshold … or None" for a NaN outlier_threshold."""
    g = Graph()
    g.capture(_node_with(g, pair, node_id, widgets)[0], "x")
    err = _fails(g, validate=False)
    assert err.node_type == node_id and err.message.startswith(message), err.message


# ------------------------------------------------------------------------------------------------
# item 3: one rule for every mask input of every node: a soft mask (nothing above 0.5) is refused, never ignored
# ------------------------------------------------------------------------------------------------


def _soft(x: torch.Tensor) -> torch.Tensor:
    return x * 0.45


def _mea_node(g, pair, **masks):
    inputs = dict(model=g.obj(cm.small_sd15_model(), "MODEL"), vae=g.obj(cm.small_vae(), "VAE"),
                  reference=g.obj(pair["reference"], "IMAGE"), garment_mask=g.obj(pair["garment_mask"], "MASK"),
                  target_mask=g.obj(pair["target_mask"], "MASK"), positive=g.obj(cm.conditioning(3), "CONDITIONING"),
                  guidance="fused", s_mea=15.0, contrast=1.25, start=0.0, end=1.0,
                  layers="decoder 1/16 + 1/8 (paper)", reference_seed=0, background="kept")
    inputs.update({k: g.obj(v, "MASK") for k, v in masks.items()})
    return g.node("MaX4ZeroMaskedExtendedAttention", **inputs)


def _protect(pair) -> torch.Tensor:
    m = torch.zeros_like(pair["target_mask"])
    m[:, 30:40, 28:36] = 1.0  # a hand inside the target region
    return m


#: item 3: (node, mask input) → the mask to make soft; the message is "<node>: <input> is soft: ...".
SOFT_MASK_ROWS = [
    ("MaX4ZeroCorrespondence", "garment_mask"), ("MaX4ZeroCorrespondence", "target_mask"),
    ("MaX4ZeroCorrespondence", "protect_mask"), ("MaX4ZeroMLSWarp", "garment_mask"),
    ("MaX4ZeroDoubleMaskInpaint", "target_mask"), ("MaX4ZeroDoubleMaskInpaint", "warped_mask"),
    ("MaX4ZeroDoubleMaskInpaint", "protect_mask"), ("MaX4ZeroCropToMask", "mask"), ("MaX4ZeroPasteBack", "mask"),
    ("MaX4ZeroMaskedExtendedAttention", "garment_mask"), ("MaX4ZeroMaskedExtendedAttention", "target_mask"),
]


def _with_soft_mask(g, pair, node_id, name):
    hard = {"garment_mask": pair["garment_mask"], "target_mask": pair["target_mask"], "protect_mask": _protect(pair),
            "warped_mask": pair["target_mask"], "mask": pair["target_mask"]}[name]
    soft = g.obj(_soft(hard), "MASK")
    if node_id == "MaX4ZeroMaskedExtendedAttention":
        return _mea_node(g, pair, **{name: _soft(hard)})
    if node_id == "MaX4ZeroPasteBack":
        c = _crop(g, pair["target"], pair["target_mask"])
        return g.node("MaX4ZeroPasteBack", original_image=g.obj(pair["target"], "IMAGE"), generated_image=c[0],
                      crop_info=c[2], mask=soft, feather=3)
    if node_id == "MaX4ZeroCropToMask":
        return _crop(g, pair["target"], soft)
    return _node_with(g, pair, node_id, {name: soft})


def test_the_soft_mask_rows_cover_every_mask_input_of_every_node(comfy_env):
    every = {(nid, inp.id) for nid, s in _pack_schemas().items() for inp in s.inputs
             if getattr(inp, "io_type", None) == "MASK"}
    assert set(SOFT_MASK_ROWS) == every


@pytest.mark.parametrize("node_id, name", SOFT_MASK_ROWS, ids=[f"{r[0][8:]}-{r[1]}" for r in SOFT_MASK_ROWS])
def test_a_soft_mask_is_refused_on_every_mask_input(comfy_env, pair, node_id, name):
    """Before: a soft protect_mask (max 0.45) gave a result bit-identical to no protect mask, a soft warped_mask was
    taken as "nothing warped", and Paste Back called a soft mask empty; soft target and garment masks were refused."""
    g = Graph()
    g.capture(_with_soft_mask(g, pair, node_id, name)[0], "x")
    err = _fails(g)
    assert err.node_type == node_id, (err.node_type, err.message)
    assert err.message.startswith(f"{NAMES[node_id]}: {name} is soft: no pixel above 0.5 (its largest value is 0.45)")
    assert "ThresholdMask" in err.message
    assert_names_real(node_id, err.message)


# ------------------------------------------------------------------------------------------------
# item 6 (part): the "same region" check between Correspondence and Double-Mask Inpaint
# ------------------------------------------------------------------------------------------------


def _half(x: torch.Tensor, mask: bool = False) -> torch.Tensor:
    """The same crop at half the size (what a second Crop To Mask at size/2 gives)."""
    if mask:
        return torch.nn.functional.interpolate(x[:, None], scale_factor=0.5, mode="bilinear")[:, 0]
    return torch.nn.functional.interpolate(x.permute(0, 3, 1, 2), scale_factor=0.5, mode="bicubic",
                                           antialias=True).clamp(0, 1).permute(0, 2, 3, 1).contiguous()


@pytest.fixture(scope="module")
def big_pair():
    return cm.synthetic_pair(128)


def _region_case(g, p, corr_protect, double_protect, corr_half: bool, batch: int = 1):
    """Correspondence (at the crop's size, or half of it) → MLS Warp → Double-Mask Inpaint at the crop's size."""
    tgt, tm = p["target"], p["target_mask"]
    c_tgt, c_tm = (_half(tgt), _half(tm, True)) if corr_half else (tgt, tm)
    extra = {}
    if corr_protect is not None:
        extra["protect_mask"] = g.obj(_half(corr_protect, True) if corr_half else corr_protect, "MASK")
    c = _correspondence(g, p, target_image=g.obj(c_tgt, "IMAGE"), target_mask=g.obj(c_tm, "MASK"), **extra)
    w = g.node("MaX4ZeroMLSWarp", reference_image=g.obj(p["reference"], "IMAGE"),
               garment_mask=g.obj(p["garment_mask"], "MASK"), target_image=g.obj(tgt, "IMAGE"), matches=c[0],
               manual_points="", kind="affine", alpha=0.1, stride=8, sampling="bilinear")
    dextra = {"protect_mask": g.obj(double_protect, "MASK")} if double_protect is not None else {}
    b_tgt = tgt.expand(batch, -1, -1, -1).contiguous()
    return g.node("MaX4ZeroDoubleMaskInpaint", positive=g.obj(cm.conditioning(1), "CONDITIONING"),
                  negative=g.obj(cm.conditioning(2), "CONDITIONING"), vae=g.obj(cm.small_vae(), "VAE"),
                  target_image=g.obj(b_tgt, "IMAGE"), target_mask=g.obj(tm, "MASK"), warped_image=w[0],
                  warped_mask=w[1], target_dilation=13, fringe_dilation=19, matches=c[0], **dextra)


def _hand(p, batch_items=(0,)) -> torch.Tensor:
    m = torch.zeros(max(batch_items) + 1, *p["target_mask"].shape[-2:])
    for b in batch_items:
        m[b, 56:96, 52:92] = 1.0  # a 40x40 px hand inside the 128 px crop's target region (rows 48-111, cols 40-103)
    return m


#: item 6: (what, Correspondence's protect, Double-Mask's protect, Correspondence at half size, batch, expected)
REGION_ROWS = [
    ("half-size-consistent", "hand", "hand", True, 1, None),
    ("half-size-no-protect-on-correspondence", None, "hand", True, 1,
     "MaX4Zero Double-Mask Inpaint: the processed target mask differs from the one MaX4Zero Correspondence matched in"),
    ("batch-item-1-differs", None, "hand-on-item-1", False, 2,
     "MaX4Zero Double-Mask Inpaint: the processed target mask (batch item 1) differs from the one MaX4Zero "
     "Correspondence matched in"),
]


@pytest.mark.parametrize("what, corr_protect, double_protect, corr_half, batch, expected", REGION_ROWS,
                         ids=[r[0] for r in REGION_ROWS])
def test_the_same_region_is_checked_at_another_crop_size_and_for_every_batch_item(
        comfy_env, big_pair, what, corr_protect, double_protect, corr_half, batch, expected):
    """Before: skipped when Correspondence ran at another size, and only batch item 0 was compared."""
    masks = {None: None, "hand": _hand(big_pair), "hand-on-item-1": _hand(big_pair, (1,))}
    g = Graph()
    d = _region_case(g, big_pair, masks[corr_protect], masks[double_protect], corr_half, batch)
    g.capture(d[4], "t")
    if expected is None:
        assert run_prompt(g)["t"].shape == (batch, 128, 128)
        return
    err = _fails(g)
    assert err.node_type == "MaX4ZeroDoubleMaskInpaint" and err.message.startswith(expected), err.message
    assert "give both nodes the same target_mask, protect_mask and target_dilation" in err.message
    assert_names_real("MaX4ZeroDoubleMaskInpaint", err.message)


# ------------------------------------------------------------------------------------------------
# item 5: Paste Back tells crops of one photo apart, not only photos
# ------------------------------------------------------------------------------------------------

#: item 5: (which Crop To Mask's crop_info is connected, expected message or None). The generated image is made from
#: crop "torso"; crop "face" is another box of the same person photo.
PASTE_CROP_ROWS = [
    ("torso", None),
    ("face", "MaX4Zero Paste Back (node {paste}): generated_image was made from the crop of MaX4Zero Crop To Mask "
             "(node {torso}), but crop_info comes from MaX4Zero Crop To Mask (node {face}), another crop of the same "
             "photo"),
]


@pytest.mark.parametrize("crop_info_of, expected", PASTE_CROP_ROWS, ids=[r[0] for r in PASTE_CROP_ROWS])
def test_paste_back_refuses_the_crop_info_of_another_crop_of_the_same_photo(comfy_env, crop_info_of, expected):
    """Before: accepted (the photo's fingerprint matches), and the torso's result landed over the face."""
    person, person_mask, _, _ = _photos()
    face = torch.zeros_like(person_mask)
    face[:, 8:40, 20:52] = 1.0
    g = Graph()
    photo = g.obj(person, "IMAGE")
    crops = {"torso": _crop(g, photo, person_mask), "face": _crop(g, photo, face)}  # one Load Image, two crops
    generated = g.node("ImageInvert", image=crops["torso"][0])  # stands in for the stage-2 decode of the torso crop
    paste = g.node("MaX4ZeroPasteBack", original_image=photo, generated_image=generated[0],
                   crop_info=crops[crop_info_of][2], mask=crops["torso"][1], feather=3)
    g.capture(paste[0], "out")
    if expected is None:
        assert run_prompt(g)["out"].shape == person.shape
        return
    err = _fails(g)
    # refused by the Crop To Mask whose crop_info is misused: it runs before any sampler, Paste Back after them all
    assert err.node_type == "MaX4ZeroCropToMask" and err.node_id == crops["face"].id
    assert err.message.startswith(expected.format(torso=crops["torso"].id, face=crops["face"].id, paste=paste.id)), \
        err.message
    assert f"connect the crop_info output of MaX4Zero Crop To Mask (node {crops['torso'].id}) to crop_info" \
        in err.message
    assert err.message.startswith(NAMES["MaX4ZeroPasteBack"] + " (node "), err.message  # the node that is wrong, named


def test_an_all_white_target_mask_is_not_called_inverted(comfy_env, small_sd15_model, small_vae, pair, caplog):
    """Round 2: 'looks inverted: covers 100 %' appeared for an all-white or fully dilated mask, which is no inverted
    garment shape. The MEA node now says what it is."""
    g = Graph()
    mea = g.node("MaX4ZeroMaskedExtendedAttention", model=g.obj(small_sd15_model(), "MODEL"), vae=g.obj(small_vae, "VAE"),
                 reference=g.obj(pair["reference"], "IMAGE"), garment_mask=g.obj(pair["garment_mask"], "MASK"),
                 target_mask=g.obj(torch.ones_like(pair["target_mask"]), "MASK"),
                 positive=g.obj(cm.conditioning(3), "CONDITIONING"), guidance="fused", s_mea=15.0, contrast=1.25,
                 start=0.0, end=1.0, layers="decoder 1/16 + 1/8 (paper)", reference_seed=0, background="kept")
    g.capture(mea[0], "m")
    with caplog.at_level(logging.WARNING):
        run_prompt(g)
    said = [r.getMessage() for r in caplog.records if "target_mask" in r.getMessage()]
    assert said and "covers 100% of the image" in said[0] and "looks inverted" not in said[0], said
