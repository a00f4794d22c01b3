"""MaX4Zero Crop To Mask and MaX4Zero Paste Back (V3 schema): the working crop around a mask and the paste of
the result into the full photo. Ids final: never rename them, their inputs or outputs.
"""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..registration import crop as geo
from . import convert as cv
from .prompt_graph import other_crop_problem
from .sockets import CATEGORY, CROP
from .stage1_checks import WidgetChecks, warn_if_inverted


class CropToMask(WidgetChecks, io.ComfyNode):
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
            # Paste Back's check that its image and its crop_info come from the same crop reads the prompt's links;
            # made here too, because this node runs before any sampler and Paste Back after all of them
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, image, mask, size, padding) -> io.NodeOutput:
        n = cls.NODE
        cls.check_widget_values(size=size, padding=padding)
        cls._check_paste_backs()
        img = cv.image_to_bchw(image, n, "image")
        m = cv.mask_to_bhw(mask, n, "mask")
        cv.check_mask_size(n, "image", img.shape[-2:], "mask", m)
        cv.check_nonempty(n, "mask", m, "the person/garment to crop around")
        warn_if_inverted(n, "mask", m)
        b = cv.broadcast_batch(n, image=img, mask=m)
        img, m = b["image"], b["mask"]
        box = geo.square_box(m[:, None], float(padding))
        info = geo.CropInfo(tuple(img.shape[-2:]), box, int(size), fingerprint=geo.fingerprint(img))
        # The crop goes to the VAE / InpaintModelConditioning, which take RGB: an alpha channel
        # is dropped here; Paste Back keeps the original's alpha.
        out = geo.crop(cv.to_rgb(img), info)
        om = geo.crop_mask(m[:, None], info)[:, 0]
        return io.NodeOutput(cv.bchw_to_image(out), om.contiguous(), info)


    @classmethod
    def _check_paste_backs(cls) -> None:
        """A Paste Back of the prompt that takes this crop's crop_info with an image generated from another crop of
        the same photo is refused now, before the expensive work, with Paste Back's own message."""
        hidden = getattr(cls, "hidden", None)
        prompt, uid = getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None)
        if not isinstance(prompt, dict) or uid is None:
            return
        for nid, node in prompt.items():
            if not isinstance(node, dict) or node.get("class_type") != PASTE_BACK_ID:
                continue
            info = (node.get("inputs") or {}).get("crop_info")
            if not (isinstance(info, list) and info and str(info[0]) == str(uid)):
                continue
            if other := other_crop_problem(prompt, nid, cls.NODE):
                raise cv.NodeInputError(f"{PasteBack.NODE} (node {nid})", *other)


PASTE_BACK_ID = "MaX4ZeroPasteBack"


class PasteBack(WidgetChecks, io.ComfyNode):
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
            # The prompt's links tell which Crop To Mask the generated image came from (another crop of the same
            # photo has the same fingerprint): prompt_graph.other_crop_problem.
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
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
        hidden = getattr(cls, "hidden", None)
        other = other_crop_problem(getattr(hidden, "prompt", None), getattr(hidden, "unique_id", None),
                                   CropToMask.NODE)
        if other:
            raise cv.NodeInputError(n, *other)
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

