"""Stage-1 nodes (V3 schema): correspondence, MLS warp, double-mask inpaint, crop / paste.

Thin glue: conversions in ``convert``, logic in ``registration``, ``geometry``, ``preview``,
``features`` and ``warping/``. Ids are final (``MaX4Zero`` prefix); never rename them.
"""

from __future__ import annotations

import dataclasses

import torch
from comfy_api.latest import io

from ..warping import fringe as _fringe
from ..warping import images as _images
from ..warping import masks as _masks
from ..warping import matching as _matching
from ..warping import mls as _mls
from ..warping import point_checks as _point_checks
from . import convert as cv
from . import geometry as geo
from . import preview as pv
from . import registration as reg
from .matches import Matches
from .notify import warn_on_node
from .sockets import CROP, MATCHES

CATEGORY = "MaX4Zero"


def _one(node: str, name: str, x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] != 1:
        raise cv.NodeInputError(node, f"{name} is a batch of {x.shape[0]}, this node works on one image pair",
                                "pick one image with 'Image From Batch' (or run the workflow once per pair)")
    return x


def _eroded_garment(node: str, gm: torch.Tensor) -> torch.Tensor:
    er = _masks.erode(gm > 0.5, _masks.GARMENT_EROSION)
    if not bool(er.any()):
        raise cv.NodeInputError(node, "garment_mask vanishes after the 1-pixel erosion (it is only a thin line)",
                                "connect a mask that covers the whole garment")
    return er.float()


def _warn_if_inverted(node: str, name: str, mask: torch.Tensor) -> None:
    """Issue 13 item 6: a mask that looks inverted (background white) is legal but almost never meant: say so."""
    problem = _masks.inverted_mask_problem(mask, name)
    if problem:
        warn_on_node(node, problem)


class _WidgetChecks:
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


class Correspondence(_WidgetChecks, io.ComfyNode):
    """Deep-feature correspondence between the garment photo and the person (docs/method.md §2a-c)."""

    NODE = "MaX4Zero Correspondence"
    WIDGETS = ("mode", "outlier_filter", "control_points", "target_dilation")

    @classmethod
    def _rules(cls, values: dict) -> None:
        if "target_dilation" in values:
            cv.check_odd(cls.NODE, "target_dilation", values["target_dilation"])

    @classmethod
    def validate_inputs(cls, mode=None, outlier_filter=None, control_points=None, target_dilation=None):
        return cv.validation_result(lambda: cls.check_widget_values(
            mode=mode, outlier_filter=outlier_filter, control_points=control_points, target_dilation=target_dilation))

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MaX4ZeroCorrespondence",
            display_name=cls.NODE,
            category=CATEGORY,
            description=(
                "Finds where each part of the garment (reference) should go on the person (target) by "
                "matching UNet decoder features from YOUR model: mutual nearest neighbours inside the masks, "
                "an optional RANSAC outlier filter, then control points for the MLS warp. 'paper' mode needs an "
                "inpainting checkpoint; 'dift' works with any SD1.5/SD2/SDXL UNet and is better for textured "
                "garments."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The UNet to read features from (SD1.5/SD2/SDXL; an inpainting "
                               "checkpoint for 'paper' mode). It is not modified."),
                io.Vae.Input("vae", tooltip="The VAE of that checkpoint (encodes the images to latents)."),
                io.Conditioning.Input("positive", tooltip="Prompt for the feature pass. Paper mode: describe the "
                                      "garment. DIFT mode: connect an EMPTY prompt (CLIP Text Encode with no text)."),
                io.Image.Input("reference_image", tooltip="The garment photo (batch of 1)."),
                io.Mask.Input("garment_mask", tooltip="White where the garment is in the reference photo. It is "
                              "eroded by 1 pixel (3x3) before use, as in the paper."),
                io.Image.Input("target_image", tooltip="The person photo (batch of 1)."),
                io.Mask.Input("target_mask", tooltip="White where the garment should go on the person (the region "
                              "to repaint)."),
                io.Combo.Input("mode", options=["paper", "dift"], default="paper",
                               tooltip="paper: inpainting UNet, pure-noise latent at t=981, each image shown with its "
                               "own mask blanked, one pass. dift: clean image noised to t=261, averaged over "
                               "'ensemble' noise draws; any UNet."),
                io.Int.Input("ensemble", default=8, min=1, max=64,
                             tooltip="DIFT mode: number of noise draws averaged (4-8 is typical; cost grows "
                             "linearly). Ignored in paper mode."),
                io.Combo.Input("outlier_filter", options=list(reg.OUTLIER_FILTERS), default="ransac",
                               tooltip="ransac: drop matches that disagree with one global homography between the "
                               "two feature grids (loose; paper default). none: keep every mutual match."),
                io.Float.Input("outlier_threshold", default=5.0, min=0.5, max=64.0, step=0.5,
                               tooltip="RANSAC inlier distance in feature cells (one cell = 16 image pixels). "
                               "Paper: 5."),
                io.Combo.Input("control_points", options=list(reg.CONTROL_POINT_MODES), default="random",
                               tooltip="Each match gives up to 4 pixel pairs (offsets 0 and 8 px). random: keep each "
                               "with probability = its score (paper, seeded). deterministic: keep all 4 of "
                               "matches scoring >= score_threshold. all: keep every pair."),
                io.Float.Input("score_threshold", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Cosine-similarity cut for 'deterministic' control points."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed for the feature noise, RANSAC and the random control-point draw: same "
                             "seed, same matches. Keep 'control after generate' on 'fixed' to reuse the matches "
                             "(and skip this node) on the next queue."),
                io.Mask.Input("protect_mask", optional=True,
                              tooltip="Optional: hands, hair or objects that must not be repainted. Connect the same "
                              "mask as to MaX4Zero Double-Mask Inpaint: the target mask is processed exactly as "
                              "there (protect removed, then dilated), so the region matched is the region "
                              "repainted."),
                io.Int.Input("target_dilation", default=13, min=1, max=255, step=2, optional=True,
                             tooltip="Square dilation of the target mask before matching; must equal Double-Mask "
                             "Inpaint's target_dilation (it checks, when its 'matches' input is connected). Paper: "
                             "13. 1 = off. Odd values only."),
            ],
            outputs=[
                MATCHES.Output("matches", display_name="matches",
                                   tooltip="Control-point pairs (reference pixel -> target pixel) for MaX4Zero MLS Warp."),
                io.Image.Output("preview", display_name="preview",
                                tooltip="Reference and target side by side, one line per control point, red = "
                                "lowest score of this set, green = highest; outside the masks is dimmed."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, positive, reference_image, garment_mask, target_image, target_mask, mode, ensemble,
                outlier_filter, outlier_threshold, control_points, score_threshold, seed, protect_mask=None,
                target_dilation=13) -> io.NodeOutput:
        from . import features as ft

        n = cls.NODE
        cls.check_widget_values(mode=mode, outlier_filter=outlier_filter, control_points=control_points,
                                target_dilation=target_dilation)
        ft.check_unet(model, n)
        problem = cv.conditioning_problem(positive, model, "positive")
        if problem:
            raise cv.NodeInputError(n, problem)
        ref = _one(n, "reference_image", cv.image_to_bchw(reference_image, n, "reference_image"))
        tgt = _one(n, "target_image", cv.image_to_bchw(target_image, n, "target_image"))
        gm = _one(n, "garment_mask", cv.mask_to_bhw(garment_mask, n, "garment_mask"))
        tm = _one(n, "target_mask", cv.mask_to_bhw(target_mask, n, "target_mask"))
        cv.check_mask_size(n, "reference_image", ref.shape[-2:], "garment_mask", gm)
        cv.check_mask_size(n, "target_image", tgt.shape[-2:], "target_mask", tm)
        cv.check_nonempty(n, "garment_mask", gm, "the garment in the reference photo")
        cv.check_nonempty(n, "target_mask", tm, "the region to repaint on the person")
        _warn_if_inverted(n, "garment_mask", gm)
        _warn_if_inverted(n, "target_mask", tm)
        pm = None
        if protect_mask is not None:
            pm = _one(n, "protect_mask", cv.mask_to_bhw(protect_mask, n, "protect_mask"))
            cv.check_mask_size(n, "target_image", tgt.shape[-2:], "protect_mask", pm)
        tm = reg.prepare_target_mask(tm, pm, int(target_dilation)).float()
        _check_region_left(n, tm)
        gm = _eroded_garment(n, gm)

        spec = ft.FeatureSpec(mode=mode, t=ft.PAPER_T if mode == "paper" else ft.DIFT_T,
                              ensemble=int(ensemble) if mode == "dift" else 1, seed=int(seed))
        feats, works = ft.pair_features(model, vae, positive, [(ref, gm), (tgt, tm)], spec, n)
        grids = [reg.grid_mask(m, tuple(f.shape[-2:])) for m, f in ((gm, feats[0]), (tm, feats[1]))]
        try:
            matches = reg.matches_from_features(
                feats[0], feats[1], grids[0], grids[1], works[0], works[1], tuple(ref.shape[-2:]),
                tuple(tgt.shape[-2:]), outlier_filter, outlier_threshold, control_points, score_threshold, seed)
        except _matching.NoMatchError as exc:
            raise cv.NodeInputError(n, exc.detail or str(exc), _no_match_fix(exc, mode, outlier_filter,
                                                                             control_points, score_threshold)) from exc
        except ValueError as exc:
            raise cv.NodeInputError(n, str(exc)) from exc
        matches = dataclasses.replace(matches, target_region=tm[0] > 0.5)
        prev = pv.match_preview(ref[0], tgt[0], matches.reference_points, matches.target_points, matches.scores,
                                gm[0], tm[0])
        return io.NodeOutput(matches, cv.bchw_to_image(prev[None]))


def _check_region_left(node: str, processed: torch.Tensor) -> None:
    """Issue 13 item 3: refuse, before any sampling, a protect_mask that removes the whole try-on region."""
    if not bool((processed > 0.5).any()):
        raise cv.NodeInputError(
            node, "protect_mask covers the whole target_mask: nothing is left to repaint, so the result would be "
            "the input photo unchanged", "protect_mask should cover only what must be kept inside the region (hands, "
            "hair, objects), white = keep; check that it is not inverted, or disconnect it")


def _no_match_fix(exc: "_matching.NoMatchError", mode: str, outlier_filter: str, control_points: str,
                  score_threshold: float) -> str:
    """What to change on MaX4Zero Correspondence when no control point is left (names its real inputs only)."""
    tips = []
    if exc.stage == "control_points" and control_points == "random":
        tips.append("set control_points='all' (the random draw keeps a point with probability = its score, and "
                    "every draw failed), or try another seed")
    elif exc.stage == "control_points":
        tips.append(f"lower score_threshold (now {score_threshold}) or set control_points='all'")
    if exc.stage == "ransac" or outlier_filter == "ransac":
        tips.append("set outlier_filter='none' or raise outlier_threshold")
    if mode == "paper":
        tips.append("try mode='dift' (better for textured garments; connect an empty prompt)")
    tips.append("check that garment_mask covers the garment and target_mask the region to repaint, or type points "
                "into MaX4Zero MLS Warp's manual_points")
    return "; ".join(tips)


class MLSWarp(_WidgetChecks, io.ComfyNode):
    """Moving Least Squares warp of the garment onto the target (docs/method.md §2d)."""

    NODE = "MaX4Zero MLS Warp"
    WIDGETS = ("kind", "sampling", "manual_points")

    @classmethod
    def _rules(cls, values: dict) -> None:
        text = (values.get("manual_points") or "").strip() if isinstance(values.get("manual_points"), str) else ""
        if not text:
            return
        try:
            m = Matches.from_json(text)  # sizes given in the JSON: the points can be checked now
        except ValueError:
            m = None
        try:
            if m is None:
                Matches.from_json(text, (1, 1), (1, 1))  # syntax only; the image sizes are known when it runs
        except ValueError as exc:
            raise cv.NodeInputError(cls.NODE, f"manual_points: {exc}") from exc
        problem = reg.far_points_problem(m) if m is not None else None
        if problem:
            raise cv.NodeInputError(cls.NODE, f"manual_points: {problem}")

    @classmethod
    def validate_inputs(cls, kind=None, sampling=None, manual_points=None):
        return cv.validation_result(lambda: cls.check_widget_values(
            kind=kind, sampling=sampling, manual_points=manual_points))

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MaX4ZeroMLSWarp",
            display_name=cls.NODE,
            category=CATEGORY,
            description=(
                "Warps the garment photo onto the person with Moving Least Squares through the control points "
                "from MaX4Zero Correspondence, or through points you type in (manual_points), so a bad "
                "correspondence can be fixed by hand. Outputs the warped garment, its mask and a preview."
            ),
            inputs=[
                io.Image.Input("reference_image", tooltip="The garment photo (the one the matches were made on, or "
                               "a resized copy: points are rescaled)."),
                io.Mask.Input("garment_mask", tooltip="White where the garment is in the reference; eroded by 1 "
                              "pixel (3x3) and warped along with the image."),
                io.Image.Input("target_image", tooltip="The person photo: sets the output size (and is shown under "
                               "the preview)."),
                MATCHES.Input("matches", optional=True,
                                  tooltip="Control points from MaX4Zero Correspondence. Optional when manual_points "
                                  "is filled in."),
                io.String.Input("manual_points", optional=True, multiline=True, default="",
                                tooltip='Optional hand-made control points as JSON, in reference/target pixels: '
                                '{"points": [{"reference": [x, y], "target": [x, y]}, ...]} or [[[xr, yr], [xt, yt]], '
                                '...]. When not empty it REPLACES the matches input.'),
                io.Combo.Input("kind", options=list(reg.MLS_KINDS), default="affine",
                               tooltip="MLS deformation: affine (paper; can shear and scale per axis), similarity "
                               "(rotation + uniform scale), rigid (rotation only, most shape-preserving)."),
                io.Float.Input("alpha", default=0.1, min=0.01, max=4.0, step=0.01,
                               tooltip="Weight falloff w = 1/|p - v|^(2 alpha). Paper: 0.1 (smooth, global); 1 "
                               "follows each control point closely."),
                io.Int.Input("stride", default=_mls.DEFAULT_STRIDE, min=1, max=32,
                             tooltip="Evaluate MLS every N pixels and interpolate (1 = exact at every pixel). The "
                             f"default {_mls.DEFAULT_STRIDE} stays within 0.06 px (p99) of exact at alpha 0.1; with "
                             "alpha 1 use 4 or less (the map follows the points more closely)."),
                io.Combo.Input("sampling", options=list(reg.SAMPLINGS), default="bilinear",
                               tooltip="How the garment is read: bilinear (smoother) or nearest (paper)."),
            ],
            outputs=[
                io.Image.Output("warped_image", display_name="warped_image",
                                tooltip="The garment photo warped to the target's size (black where nothing maps)."),
                io.Mask.Output("warped_mask", display_name="warped_mask",
                               tooltip="The garment mask warped the same way (0/1)."),
                io.Image.Output("preview", display_name="preview",
                                tooltip="The warped garment over the target, with the reference's 16-px grid carried "
                                "through the warp (magenta)."),
            ],
        )

    @classmethod
    def execute(cls, reference_image, garment_mask, target_image, kind, alpha, stride, sampling, matches=None,
                manual_points="") -> io.NodeOutput:
        n = cls.NODE
        cls.check_widget_values(kind=kind, sampling=sampling)
        ref = cv.to_rgb(cv.image_to_bchw(reference_image, n, "reference_image"))  # RGB out: alpha is not warped
        gm = cv.mask_to_bhw(garment_mask, n, "garment_mask")
        tgt = cv.image_to_bchw(target_image, n, "target_image")
        cv.check_mask_size(n, "reference_image", ref.shape[-2:], "garment_mask", gm)
        b = cv.broadcast_batch(n, reference_image=ref, garment_mask=gm)
        ref, gm = b["reference_image"], b["garment_mask"]
        cv.check_nonempty(n, "garment_mask", gm, "the garment in the reference photo")
        _warn_if_inverted(n, "garment_mask", gm)
        gm = _eroded_garment(n, gm)
        ref_hw, tgt_hw = tuple(ref.shape[-2:]), tuple(tgt.shape[-2:])
        text = (manual_points or "").strip()
        if text:
            try:
                m = Matches.from_json(text, ref_hw, tgt_hw)
            except ValueError as exc:
                raise cv.NodeInputError(n, f"manual_points: {exc}") from exc
        elif matches is not None:
            if not isinstance(matches, Matches):
                raise cv.NodeInputError(n, f"matches is a {type(matches).__name__}",
                                        "connect the 'matches' output of MaX4Zero Correspondence")
            m = matches
        else:
            raise cv.NodeInputError(n, "no control points: both 'matches' and 'manual_points' are empty",
                                    "connect MaX4Zero Correspondence's 'matches', or type points into manual_points "
                                    '(e.g. {"points": [{"reference": [120, 80], "target": [140, 96]}]})')
        if len(m) == 0:
            raise cv.NodeInputError(n, "the matches hold no control points",
                                    "loosen the Correspondence settings (outlier_filter none, control_points all)")
        far = reg.far_points_problem(m)
        if far:
            raise cv.NodeInputError(n, f"manual_points: {far}" if text else f"matches: {far}",
                                    "" if text else "connect matches made for these images")
        if text:  # hand-typed points: degenerate sets fold or collapse the warp without a word otherwise
            for warning in _point_checks.control_point_warnings(m.reference_points, m.target_points):
                warn_on_node(n, f"manual_points: {warning}")
        warped, wmask, grid = reg.warp_garment(ref, gm, m, tgt_hw, kind, alpha, int(stride), sampling)
        prev = pv.warp_preview(tgt[0], warped[0], wmask[0], grid[0])
        return io.NodeOutput(cv.bchw_to_image(warped), wmask.contiguous(), cv.bchw_to_image(prev[None]))


def _check_same_region(node: str, matches, target: torch.Tensor) -> None:
    """Refuse to repaint another region than the one the correspondence matched in (docs/method.md §1: one processed mask)."""
    region = getattr(matches, "target_region", None)
    if region is None or tuple(region.shape) != tuple(target.shape[-2:]):
        return  # hand-made points, or matches made at another size: nothing to compare
    if not torch.equal(region, target[0] > 0.5):
        differ = int((region != (target[0] > 0.5)).sum())
        raise cv.NodeInputError(
            node, f"the processed target mask differs from the one MaX4Zero Correspondence matched in ({differ} "
            "pixels)", "give both nodes the same target_mask, protect_mask and target_dilation")


class DoubleMaskInpaint(_WidgetChecks, io.ComfyNode):
    """Composite + double mask for the fringe phase (docs/method.md §2e, §3a)."""

    NODE = "MaX4Zero Double-Mask Inpaint"
    WIDGETS = ("target_dilation", "fringe_dilation")

    @classmethod
    def _rules(cls, values: dict) -> None:
        for name in cls.WIDGETS:
            if name in values:
                cv.check_odd(cls.NODE, name, values[name])

    @classmethod
    def validate_inputs(cls, target_dilation=None, fringe_dilation=None):
        return cv.validation_result(lambda: cls.check_widget_values(
            target_dilation=target_dilation, fringe_dilation=fringe_dilation))

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MaX4ZeroDoubleMaskInpaint",
            display_name=cls.NODE,
            category=CATEGORY,
            description=(
                "Pastes the warped garment into the target mask and prepares inpainting of what the warp did not "
                "cover: the model's mask channel gets the dilated fringe D (so it sees context), while the latent's "
                "noise mask is the thin fringe F on the latent grid (so only F is generated) and the latent is "
                "emptied there (so F starts from pure noise, as in the paper). Connect positive/negative/latent to a "
                "stock KSamplerAdvanced with an inpainting model (paper: steps 0 -> 35 of 50, cfg 12, add_noise "
                "enable)."
            ),
            inputs=[
                io.Conditioning.Input("positive", tooltip="Garment prompt (from CLIP Text Encode)."),
                io.Conditioning.Input("negative", tooltip="Negative prompt."),
                io.Vae.Input("vae", tooltip="VAE of the inpainting checkpoint."),
                io.Image.Input("target_image", tooltip="The person photo."),
                io.Mask.Input("target_mask", tooltip="Region to repaint on the person (before preprocessing)."),
                io.Image.Input("warped_image", tooltip="warped_image from MaX4Zero MLS Warp (same size as the target)."),
                io.Mask.Input("warped_mask", tooltip="warped_mask from MaX4Zero MLS Warp."),
                io.Mask.Input("protect_mask", optional=True,
                              tooltip="Optional: hands, hair or objects that must not be repainted; removed from the "
                              "target mask before it is dilated (paper order)."),
                io.Int.Input("target_dilation", default=13, min=1, max=255, step=2,
                             tooltip="Square dilation of the target mask (after removing protect_mask). Paper: 13 "
                             "(13x13). 1 = off. Odd values only."),
                io.Int.Input("fringe_dilation", default=19, min=1, max=255, step=2,
                             tooltip="Square dilation of the thin fringe F into D (kept inside the target mask). "
                             "Paper: 19. 1 = D equals F. Odd values only."),
                MATCHES.Input("matches", optional=True,
                                  tooltip="Optional (recommended): the matches of MaX4Zero Correspondence. This node "
                                  "then checks that the target region it repaints is the one the correspondence "
                                  "matched in (same target_mask, protect_mask and target_dilation on both nodes)."),
            ],
            outputs=[
                io.Conditioning.Output("inpaint_positive", display_name="positive",
                                       tooltip="Positive with the inpaint image (composite, D greyed) and mask D."),
                io.Conditioning.Output("inpaint_negative", display_name="negative",
                                       tooltip="Negative with the same inpaint image and mask."),
                io.Latent.Output("latent", display_name="latent",
                                 tooltip="The composite encoded, with noise_mask = F at latent resolution (1 in "
                                 "every latent cell, 8x8 pixels, that F touches; 0 elsewhere) and the latent set to 0 "
                                 "in those cells: only F is regenerated, starting from pure noise; every other cell "
                                 "keeps the composite exactly."),
                io.Image.Output("composite", display_name="composite",
                                tooltip="Warped garment inside (warped mask AND target mask), the person elsewhere."),
                io.Mask.Output("processed_target_mask", display_name="target_mask",
                               tooltip="The preprocessed target mask (protect removed, dilated): use it for the MEA "
                               "stage and for pasting back."),
                io.Mask.Output("fringe", display_name="fringe",
                               tooltip="Thin fringe F = target mask minus warped mask: what gets generated."),
                io.Mask.Output("dilated_fringe", display_name="dilated_fringe",
                               tooltip="Dilated fringe D: the inpainting model's mask channel."),
                io.Image.Output("preview", display_name="preview",
                                tooltip="Composite with F tinted red and the context ring D minus F tinted yellow."),
            ],
        )

    @classmethod
    def execute(cls, positive, negative, vae, target_image, target_mask, warped_image, warped_mask, target_dilation,
                fringe_dilation, protect_mask=None, matches=None) -> io.NodeOutput:
        import node_helpers

        n = cls.NODE
        cls.check_widget_values(target_dilation=target_dilation, fringe_dilation=fringe_dilation)
        tgt = cv.image_to_bchw(target_image, n, "target_image")
        tm = cv.mask_to_bhw(target_mask, n, "target_mask")
        wimg = cv.image_to_bchw(warped_image, n, "warped_image")
        wm = cv.mask_to_bhw(warped_mask, n, "warped_mask")
        pm = cv.mask_to_bhw(protect_mask, n, "protect_mask") if protect_mask is not None else None
        hw = tgt.shape[-2:]
        cv.check_mask_size(n, "target_image", hw, "target_mask", tm)
        cv.check_same_size(n, "target_image", hw, "warped_image", wimg.shape[-2:])
        cv.check_same_size(n, "target_image", hw, "warped_mask", wm.shape[-2:])
        if pm is not None:
            cv.check_mask_size(n, "target_image", hw, "protect_mask", pm)
        tgt, wimg = cv.to_rgb(tgt), cv.to_rgb(wimg)  # the VAE takes RGB; alpha plays no part here
        extra = {"protect_mask": pm} if pm is not None else {}
        b = cv.broadcast_batch(n, target_image=tgt, target_mask=tm, warped_image=wimg, warped_mask=wm, **extra)
        tgt, tm, wimg, wm = b["target_image"], b["target_mask"], b["warped_image"], b["warped_mask"]
        cv.check_nonempty(n, "target_mask", tm, "the region to repaint on the person")

        _warn_if_inverted(n, "target_mask", tm)
        tmask, thin, dil = reg.double_mask(tm, wm, b.get("protect_mask"), int(target_dilation), int(fringe_dilation))
        _check_region_left(n, tmask)
        _check_same_region(n, matches, tmask)

        comp = _fringe.composite(tgt.float(), wimg.float(), wm, tmask)
        comp_img = cv.bchw_to_image(comp)
        # Same pixel/mask handling as ComfyUI's InpaintModelConditioning: centre-crop to multiples of 8.
        pix = _images.center_crop_multiple(comp_img, 8, (1, 2))
        d8, f8 = (_images.center_crop_multiple(m, 8, (1, 2)) for m in (dil, thin))
        h8, w8 = int(pix.shape[1]), int(pix.shape[2])
        concat_latent = vae.encode(cv.bchw_to_image(_images.grey_out(pix.permute(0, 3, 1, 2), d8)))
        samples = vae.encode(pix)
        # docs/method.md §3a: F starts from pure noise. The noise mask is F on the latent grid, hard (a bilinear resize
        # of a pixel-size F would hand partly covered cells a share of the composite), and the latent is 0
        # there, so the sampler's first input inside F is noise alone; outside, the composite is untouched.
        try:
            cells = _fringe.latent_fringe_mask(f8, tuple(samples.shape[-2:]))
        except ValueError as exc:
            raise cv.NodeInputError(n, f"the VAE's latent does not fit the image: {exc}",
                                    "use the VAE of an SD1.5/SD2/SDXL inpainting checkpoint") from exc
        latent = {"samples": _fringe.clear_latent_cells(samples, cells), "noise_mask": cells}
        concat_mask = d8.reshape(-1, 1, h8, w8)
        out = [node_helpers.conditioning_set_values(c, {"concat_latent_image": concat_latent,
                                                        "concat_mask": concat_mask}) for c in (positive, negative)]
        prev = torch.stack([pv.fringe_preview(comp[i], thin[i], dil[i]) for i in range(comp.shape[0])])
        return io.NodeOutput(out[0], out[1], latent, comp_img, tmask, thin, dil, cv.bchw_to_image(prev))


class CropToMask(_WidgetChecks, io.ComfyNode):
    """Padded square crop around a mask, resized to the model's working size (docs/method.md §1, in the wild)."""

    NODE = "MaX4Zero Crop To Mask"
    WIDGETS = ("size", "padding")

    @classmethod
    def _rules(cls, values: dict) -> None:
        size = values.get("size")
        if size is not None and int(size) % 8:
            raise cv.NodeInputError(cls.NODE, f"size={size} must be a multiple of 8 (latents are 1/8 of the image)",
                                    f"use {max(64, int(size) // 8 * 8)} or {max(64, int(size) // 8 * 8 + 8)}")

    @classmethod
    def validate_inputs(cls, size=None, padding=None):
        return cv.validation_result(lambda: cls.check_widget_values(size=size, padding=padding))

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MaX4ZeroCropToMask",
            display_name=cls.NODE,
            category=CATEGORY,
            description=(
                "Crops a padded square around the mask and resizes it to the model's working size (512 for SD1.5/"
                "SD2-inpainting, 1024 for SDXL), for photos where the person or garment is small. Use it on the "
                "target (with the target mask) and on the reference (with the garment mask); paste the result "
                "back with MaX4Zero Paste Back. Any image size and aspect."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Photo to crop (target or reference)."),
                io.Mask.Input("mask", tooltip="Region to centre the crop on (target mask or garment mask); for a "
                              "batch, the crop covers all masks."),
                io.Int.Input("size", default=512, min=64, max=4096, step=8,
                             tooltip="Side of the square crop in pixels: the model's native size."),
                io.Float.Input("padding", default=0.1, min=0.0, max=2.0, step=0.01,
                               tooltip="Context added on each side, as a fraction of the mask's longer side."),
            ],
            outputs=[
                io.Image.Output("cropped_image", display_name="image", tooltip="The square crop at size x size."),
                io.Mask.Output("cropped_mask", display_name="mask", tooltip="The mask cropped the same way."),
                CROP.Output("crop_info", display_name="crop_info",
                                tooltip="Where the crop came from: connect to MaX4Zero Paste Back."),
            ],
        )

    @classmethod
    def execute(cls, image, mask, size, padding) -> io.NodeOutput:
        n = cls.NODE
        cls.check_widget_values(size=size, padding=padding)
        img = cv.image_to_bchw(image, n, "image")
        m = cv.mask_to_bhw(mask, n, "mask")
        cv.check_mask_size(n, "image", img.shape[-2:], "mask", m)
        cv.check_nonempty(n, "mask", m, "the person/garment to crop around")
        _warn_if_inverted(n, "mask", m)
        b = cv.broadcast_batch(n, image=img, mask=m)
        img, m = b["image"], b["mask"]
        box = geo.square_box(m[:, None], float(padding))
        info = geo.CropInfo(tuple(img.shape[-2:]), box, int(size), fingerprint=geo.fingerprint(img))
        # Issue 13 item 7: the crop goes to the VAE / InpaintModelConditioning, which take RGB: an alpha channel
        # is dropped here; Paste Back keeps the original's alpha.
        out = geo.crop(cv.to_rgb(img), info)
        om = geo.crop_mask(m[:, None], info)[:, 0]
        return io.NodeOutput(cv.bchw_to_image(out), om.contiguous(), info)


class PasteBack(_WidgetChecks, io.ComfyNode):
    """Paste a generated crop back into the full photo (docs/method.md §3 Finish)."""

    NODE = "MaX4Zero Paste Back"
    WIDGETS = ("feather",)

    @classmethod
    def _rules(cls, values: dict) -> None:
        if "feather" in values:
            cv.check_odd(cls.NODE, "feather", values["feather"])

    @classmethod
    def validate_inputs(cls, feather=None):
        return cv.validation_result(lambda: cls.check_widget_values(feather=feather))

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MaX4ZeroPasteBack",
            display_name=cls.NODE,
            category=CATEGORY,
            description=(
                "Pastes the generated crop back into the original photo, only inside the mask (the dilated target "
                "mask), with a feathered seam that lies inside the mask: every pixel outside the mask is the "
                "original pixel, exactly."
            ),
            inputs=[
                io.Image.Input("original_image", tooltip="The full photo that was cropped."),
                io.Image.Input("generated_image", tooltip="The generated (decoded) crop."),
                CROP.Input("crop_info", tooltip="crop_info from MaX4Zero Crop To Mask."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Where pasting is allowed, at the original size or at the crop size (e.g. "
                              "target_mask from MaX4Zero Double-Mask Inpaint). Not connected: the whole crop."),
                io.Int.Input("feather", default=3, min=1, max=255, step=2,
                             tooltip="Seam blur in original pixels (odd; paper: 3 = 3x3). 1 = hard edge."),
            ],
            outputs=[
                io.Image.Output("pasted_image", display_name="image", tooltip="The full photo with the result pasted in."),
            ],
        )

    @classmethod
    def execute(cls, original_image, generated_image, crop_info, feather, mask=None) -> io.NodeOutput:
        n = cls.NODE
        if not isinstance(crop_info, geo.CropInfo):
            raise cv.NodeInputError(n, f"crop_info is a {type(crop_info).__name__}",
                                    "connect the crop_info output of MaX4Zero Crop To Mask")
        cls.check_widget_values(feather=feather)
        orig = cv.image_to_bchw(original_image, n, "original_image")
        gen = cv.image_to_bchw(generated_image, n, "generated_image")
        problem = geo.fingerprint_problem(crop_info, orig, "original_image")
        if problem:
            raise cv.NodeInputError(n, problem, "connect the crop_info of the MaX4Zero Crop To Mask node whose image "
                                    "is this original_image (the person's crop, not the garment's)")
        S = int(crop_info.size)
        if gen.shape[-1] != gen.shape[-2]:
            raise cv.NodeInputError(n, f"generated_image is {gen.shape[-1]}x{gen.shape[-2]}, not square (the crop was "
                                    f"{S}x{S})", "connect the decoded result of the cropped image")
        m = None
        if mask is not None:
            m = cv.mask_to_bhw(mask, n, "mask")
            sizes: dict = {}
            for hw, what in ((tuple(orig.shape[-2:]), "the original size"), ((S, S), "the crop size"),
                             (tuple(gen.shape[-2:]), "generated_image's size")):
                sizes.setdefault(hw, []).append(what)
            if tuple(m.shape[-2:]) not in sizes:
                listed = " or ".join(f"{w}x{h} ({', '.join(what)})" for (h, w), what in sizes.items())
                raise cv.NodeInputError(n, f"mask is {m.shape[-1]}x{m.shape[-2]}; it must be one of {listed}",
                                        "connect the target mask of the full photo or of the crop")
            _check_paste_region(n, m, crop_info, tuple(orig.shape[-2:]))
            m = m[:, None]
        b = cv.broadcast_batch(n, original_image=orig, generated_image=gen,
                               **({"mask": m} if m is not None else {}))
        out = geo.paste(b["original_image"], b["generated_image"], crop_info, b.get("mask"), int(feather))
        return io.NodeOutput(cv.bchw_to_image(out))


def _check_paste_region(node: str, mask: torch.Tensor, info: geo.CropInfo, original_hw: tuple) -> None:
    """Refuse a paste that would change nothing: an empty mask, or (at the original size) none of it in the crop."""
    if not bool((mask > 0.5).any()):
        raise cv.NodeInputError(node, "mask is empty (no pixel above 0.5): nothing would be pasted and the photo "
                                "would come back unchanged", "connect the processed target mask (Double-Mask "
                                "Inpaint's target_mask), or leave mask unconnected to paste the whole crop")
    if tuple(mask.shape[-2:]) == tuple(original_hw):
        x0, y0, x1, y1 = info.inside()
        if not bool((mask[..., y0:y1, x0:x1] > 0.5).any()):
            raise cv.NodeInputError(node, f"mask has no pixel inside the crop box ({x0}, {y0})-({x1}, {y1}): nothing "
                                    "would be pasted", "connect the crop_info and mask of the same photo (the "
                                    "person's crop and its target mask)")


NODES = [Correspondence, MLSWarp, DoubleMaskInpaint, CropToMask, PasteBack]
