"""MaX4Zero MLS Warp and MaX4Zero Double-Mask Inpaint (V3 schema): the garment warped onto the person and the
composite + double mask for the fringe phase (docs/method.md §2d-e, §3a). Ids final: never rename them, their inputs or
outputs.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..registration import manual_points as _manual
from ..registration import previews as pv
from ..registration import recipe as reg
from ..registration.matches import Matches
from ..tensors import images as _images
from ..warping import fringe as _fringe
from ..warping import mls as _mls
from . import convert as cv
from . import point_editor as _editor
from .notify import warn_on_node
from .sockets import CATEGORY, MATCHES
from .stage1_checks import WidgetChecks, check_region_left, eroded_garment, warn_if_inverted


class MLSWarp(WidgetChecks, io.ComfyNode):
    """Moving Least Squares warp of the garment onto the target (docs/method.md §2d)."""

    NODE = "MaX4Zero MLS Warp"
    WIDGETS = ("kind", "alpha", "stride", "sampling", "manual_points", "manual_points_mode")

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
        problem = _manual.manual_points_problem(m or Matches.from_json(text, (1, 1), (1, 1)))
        if problem:
            raise cv.NodeInputError(cls.NODE, f"manual_points: {problem}")

    @classmethod
    def validate_inputs(cls, kind=None, alpha=None, stride=None, sampling=None, manual_points=None,
                        manual_points_mode=None):
        return cv.validation_result(lambda: cls.check_widget_values(
            kind=kind, alpha=alpha, stride=stride, sampling=sampling, manual_points=manual_points,
            manual_points_mode=manual_points_mode))

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="MaX4ZeroMLSWarp",
            display_name=cls.NODE,
            category=CATEGORY,
            description=(
                "Warps the garment photo onto the person with Moving Least Squares through the control points "
                "from MaX4Zero Correspondence, or through points you type in (manual_points), so a bad "
                "correspondence can be fixed by hand: after a first run, 'Edit points' on the node shows the garment "
                "and the person with the matches as numbered pairs to drag, add or delete, with a live preview of "
                "the warp. Outputs the warped garment, its mask and a preview."
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
                                '...]. Written by the point editor (Edit points, after a first run). How it combines with the '
                                'matches input: manual_points_mode.'),
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
                io.Combo.Input("manual_points_mode", options=list(_manual.MODES), default=_manual.REPLACE,
                               optional=True,
                               tooltip="How manual_points combine with the matches input: 'replace the automatic "
                               "matches' warps through manual_points alone when it is not empty (what the point "
                               "editor writes: every pair it shows); 'add to the automatic matches' warps through "
                               "the matches plus manual_points."),
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
                manual_points="", manual_points_mode=_manual.REPLACE) -> io.NodeOutput:
        n = cls.NODE
        mode = manual_points_mode or _manual.REPLACE
        cls.check_widget_values(kind=kind, alpha=alpha, stride=stride, sampling=sampling, manual_points_mode=mode)
        ref = cv.to_rgb(cv.image_to_bchw(reference_image, n, "reference_image"))  # RGB out: alpha is not warped
        gm = cv.mask_to_bhw(garment_mask, n, "garment_mask")
        tgt = cv.image_to_bchw(target_image, n, "target_image")
        cv.check_mask_size(n, "reference_image", ref.shape[-2:], "garment_mask", gm)
        b = cv.broadcast_batch(n, reference_image=ref, garment_mask=gm)
        ref, gm = b["reference_image"], b["garment_mask"]
        cv.check_nonempty(n, "garment_mask", gm, "the garment in the reference photo")
        warn_if_inverted(n, "garment_mask", gm)
        gm = eroded_garment(n, gm)
        ref_hw, tgt_hw = tuple(ref.shape[-2:]), tuple(tgt.shape[-2:])
        text = (manual_points or "").strip()
        manual = None
        if text:
            try:
                manual = Matches.from_json(text, ref_hw, tgt_hw)
            except ValueError as exc:
                raise cv.NodeInputError(n, f"manual_points: {exc}") from exc
            problem = reg.far_points_problem(manual) or _manual.manual_points_problem(manual)
            if problem:
                raise cv.NodeInputError(n, f"manual_points: {problem}")
        uses_matches = matches is not None and (manual is None or mode == _manual.ADD)
        if uses_matches and not isinstance(matches, Matches):
            raise cv.NodeInputError(n, f"matches is a {type(matches).__name__}",
                                    "connect the 'matches' output of MaX4Zero Correspondence")
        if uses_matches and len(matches) == 0:
            raise cv.NodeInputError(n, "the matches hold no control points",
                                    "loosen the Correspondence settings (outlier_filter none, control_points all)")
        if uses_matches:
            far = reg.far_points_problem(matches)
            if far:
                raise cv.NodeInputError(n, f"matches: {far}", "connect matches made for these images")
        m = _manual.combine(manual, matches, mode, ref_hw, tgt_hw)
        if m is None:
            raise cv.NodeInputError(n, "no control points: both 'matches' and 'manual_points' are empty",
                                    "connect MaX4Zero Correspondence's 'matches', or type points into manual_points "
                                    '(e.g. {"points": [{"reference": [120, 80], "target": [140, 96]}]}), or run '
                                    "once and place them with Edit points")
        if manual is not None:  # hand-made points: degenerate sets fold or collapse the warp without a word otherwise
            for warning in _manual.point_warnings(m, kind, alpha):
                warn_on_node(n, f"manual_points: {warning}")
        warped, wmask, grid = reg.warp_garment(ref, gm, m, tgt_hw, kind, alpha, int(stride), sampling)
        prev = pv.warp_preview(tgt[0], warped[0], wmask[0], grid[0])
        return io.NodeOutput(cv.bchw_to_image(warped), wmask.contiguous(), cv.bchw_to_image(prev[None]),
                             ui=_editor_ui(ref, gm, tgt, matches if isinstance(matches, Matches) else None, kind,
                                           alpha, mode))


def _editor_ui(ref: torch.Tensor, gm: torch.Tensor, tgt: torch.Tensor, matches, kind: str, alpha: float,
               mode: str) -> dict:
    """The point editor's payload (nodes/point_editor.py) with the first batch item's crops as temp previews."""
    images = {
        "garment": _editor.save_temp_png(ref[0].permute(1, 2, 0)[..., :3]),
        "garment_mask": _editor.save_temp_png(gm[0][..., None]),
        "person": _editor.save_temp_png(cv.to_rgb(tgt)[0].permute(1, 2, 0)),
    }
    payload = _editor.editor_payload(images, tuple(ref.shape[-2:]), tuple(tgt.shape[-2:]), matches, kind, alpha,
                                     mode)
    return {_editor.UI_KEY: [payload]}


def _check_same_region(node: str, matches, target: torch.Tensor, target_dilation: int) -> None:
    """Refuse to repaint another region than the one the correspondence matched in (docs/method.md §1: one processed
    mask), for every batch item, also when Correspondence ran at another size of the crop."""
    region = getattr(matches, "target_region", None)
    if region is None:
        return  # hand-made points: nothing to compare
    problem = reg.region_mismatch_problem(region, target, target_dilation)
    if problem:
        raise cv.NodeInputError(node, problem, "give both nodes the same target_mask, protect_mask and "
                                "target_dilation (the same crop, at any size)")


class DoubleMaskInpaint(WidgetChecks, io.ComfyNode):
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

        warn_if_inverted(n, "target_mask", tm)
        tmask, thin, dil = reg.double_mask(tm, wm, b.get("protect_mask"), int(target_dilation), int(fringe_dilation))
        check_region_left(n, tmask)
        _check_same_region(n, matches, tmask, int(target_dilation))

        comp = _fringe.composite(tgt.float(), wimg.float(), wm, tmask)
        comp_img = cv.bchw_to_image(comp)
        # Same pixel/mask handling as ComfyUI's InpaintModelConditioning: centre-crop to multiples of the VAE's ratio
        # (8 for every supported model family; asked from the VAE, which crops to it anyway).
        ratio = cv.vae_ratio(vae)
        pix = _images.center_crop_multiple(comp_img, ratio, (1, 2))
        d8, f8 = (_images.center_crop_multiple(m, ratio, (1, 2)) for m in (dil, thin))
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
        # a video VAE's one frame [B, C, 1, h, w] (Qwen-Image's Wan 2.1): the image's cells, the layout kept
        frame = samples.dim() == 5 and samples.shape[2] == 1
        cleared = _fringe.clear_latent_cells(samples[:, :, 0] if frame else samples, cells)
        latent = {"samples": cleared[:, :, None] if frame else cleared, "noise_mask": cells}
        concat_mask = d8.reshape(-1, 1, h8, w8)
        out = [node_helpers.conditioning_set_values(c, {"concat_latent_image": concat_latent,
                                                        "concat_mask": concat_mask}) for c in (positive, negative)]
        prev = torch.stack([pv.fringe_preview(comp[i], thin[i], dil[i]) for i in range(comp.shape[0])])
        return io.NodeOutput(out[0], out[1], latent, comp_img, tmask, thin, dil, cv.bchw_to_image(prev))

