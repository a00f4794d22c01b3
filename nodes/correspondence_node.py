"""MaX4Zero Correspondence (V3 schema): deep-feature matches between the garment photo and the person
(docs/method.md §2a-c). Id final: never rename it, its inputs or outputs.
"""

from __future__ import annotations

import dataclasses

from comfy_api.latest import io

from ..registration import previews as pv
from ..registration import recipe as reg
from ..warping import matching as _matching
from . import convert as cv
from .sockets import CATEGORY, MATCHES
from .stage1_checks import WidgetChecks, check_region_left, eroded_garment, single_item, warn_if_inverted


class Correspondence(WidgetChecks, io.ComfyNode):
    """Deep-feature correspondence between the garment photo and the person (docs/method.md §2a-c)."""

    NODE = "MaX4Zero Correspondence"
    WIDGETS = ("mode", "ensemble", "outlier_filter", "outlier_threshold", "control_points", "score_threshold", "seed",
               "target_dilation")

    @classmethod
    def _rules(cls, values: dict) -> None:
        if "target_dilation" in values:
            cv.check_odd(cls.NODE, "target_dilation", values["target_dilation"])

    @classmethod
    def validate_inputs(cls, mode=None, ensemble=None, outlier_filter=None, outlier_threshold=None, control_points=None,
                        score_threshold=None, seed=None, target_dilation=None):
        return cv.validation_result(lambda: cls.check_widget_values(
            mode=mode, ensemble=ensemble, outlier_filter=outlier_filter, outlier_threshold=outlier_threshold,
            control_points=control_points, score_threshold=score_threshold, seed=seed, target_dilation=target_dilation))

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
        cls.check_widget_values(mode=mode, ensemble=ensemble, outlier_filter=outlier_filter,
                                outlier_threshold=outlier_threshold, control_points=control_points,
                                score_threshold=score_threshold, seed=seed, target_dilation=target_dilation)
        ft.check_unet(model, n)
        problem = cv.conditioning_problem(positive, model, "positive")
        if problem:
            raise cv.NodeInputError(n, problem)
        ref = single_item(n, "reference_image", cv.image_to_bchw(reference_image, n, "reference_image"))
        tgt = single_item(n, "target_image", cv.image_to_bchw(target_image, n, "target_image"))
        gm = single_item(n, "garment_mask", cv.mask_to_bhw(garment_mask, n, "garment_mask"))
        tm = single_item(n, "target_mask", cv.mask_to_bhw(target_mask, n, "target_mask"))
        cv.check_mask_size(n, "reference_image", ref.shape[-2:], "garment_mask", gm)
        cv.check_mask_size(n, "target_image", tgt.shape[-2:], "target_mask", tm)
        cv.check_nonempty(n, "garment_mask", gm, "the garment in the reference photo")
        cv.check_nonempty(n, "target_mask", tm, "the region to repaint on the person")
        warn_if_inverted(n, "garment_mask", gm)
        warn_if_inverted(n, "target_mask", tm)
        pm = None
        if protect_mask is not None:
            pm = single_item(n, "protect_mask", cv.mask_to_bhw(protect_mask, n, "protect_mask"))
            cv.check_mask_size(n, "target_image", tgt.shape[-2:], "protect_mask", pm)
        tm = reg.prepare_target_mask(tm, pm, int(target_dilation)).float()
        check_region_left(n, tm)
        gm = eroded_garment(n, gm)

        spec = reg.FeatureSpec.for_mode(mode, ensemble, seed)
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

