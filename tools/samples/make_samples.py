"""Regenerate the drawn sample inputs (everything in ``example_inputs/`` except the person photo) and the points.

    python tools/samples/make_samples.py

Writes into ``example_inputs/`` (shipped in the registry archive, under the names the workflows load):
- ``max4zero_person_mask.png``: the astronaut's suit (torso, shoulders, left arm) to repaint, drawn as a
  hand-placed polygon on ``max4zero_person.png`` (512×512); the helmet she holds and her face are left out.
- ``max4zero_garment.png`` / ``max4zero_garment_mask.png``: a T-shirt drawn here (512×512) with a bold,
  asymmetric pattern (yellow diagonal sash, white stripes of unequal widths, red badge with text on one side
  only) so that the warp is easy to follow by eye.
- ``max4zero_pose.png``: an OpenPose-style skeleton of the person photo (hand-placed keypoints, OpenPose's
  colours), the control image of the LoRA + ControlNet workflow.

and next to this file ``points.json``: hand-chosen control-point pairs, garment (reference) → person
(target), in the pack's one control-point format (MLS Warp's ``manual_points``; ``registration/matches.py``).

Only Pillow is needed. The person photo is not drawn: see README.md in this folder for where it comes from.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
INPUTS = HERE.parents[1] / "example_inputs"
SIZE = 512
# Drawn at 4× and reduced, so edges are anti-aliased; masks are thresholded from the same drawing.
SS = 4

# The suit in person.png (pixel x, y at 512×512), clockwise from the left shoulder; the inner edge follows
# the rim of the helmet she holds (bottom right), which stays unrepainted like any occluder would.
PERSON_POLYGON = [
    (40, 236), (78, 214), (112, 200), (118, 168), (140, 152), (170, 160), (186, 176), (222, 188),
    (256, 174), (270, 160), (284, 164), (300, 194), (306, 228), (330, 246), (348, 268), (358, 300),
    (364, 342), (336, 356), (312, 374), (296, 398), (288, 440), (282, 480), (280, 512), (24, 512),
    (18, 440), (20, 360), (26, 290),
]

# The T-shirt outline in garment.png, clockwise from the left end of the neckline.
SHIRT_POLYGON = [
    (206, 60), (226, 88), (256, 98), (286, 88), (306, 60),  # neckline (front dip)
    (384, 84), (466, 176), (414, 214), (368, 170),  # right shoulder, sleeve, armpit
    (364, 470), (148, 470),  # right side, hem
    (144, 170), (98, 214), (46, 176), (128, 84),  # left armpit, sleeve, shoulder
]

# Control points: (name, garment (x, y), person (x, y)). Left/right are as seen in the pictures.
POINTS = [
    ("neck left", (206, 60), (178, 180)),
    ("neck right", (306, 60), (262, 176)),
    ("neck front", (256, 98), (222, 212)),
    ("shoulder left", (128, 84), (70, 226)),
    ("shoulder right", (384, 84), (318, 240)),
    ("sleeve left, outer", (46, 176), (24, 320)),
    ("sleeve left, inner", (98, 214), (78, 352)),
    ("armpit left", (144, 170), (98, 300)),
    ("armpit right", (368, 170), (322, 306)),
    ("sleeve right, outer", (466, 176), (362, 330)),
    ("chest centre", (256, 250), (214, 330)),
    ("hem left", (148, 470), (92, 506)),
    ("hem centre", (256, 470), (196, 508)),
    ("hem right", (364, 470), (300, 506)),
]


def _scaled(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    # Pixel (x, y) is the pixel's centre, so at SS× it sits at (x + 0.5)·SS − 0.5.
    return [((x + 0.5) * SS - 0.5, (y + 0.5) * SS - 0.5) for x, y in points]


def _polygon_mask(polygon: list[tuple[float, float]]) -> Image.Image:
    big = Image.new("L", (SIZE * SS, SIZE * SS), 0)
    ImageDraw.Draw(big).polygon(_scaled(polygon), fill=255)
    small = big.resize((SIZE, SIZE), Image.Resampling.BOX)
    return small.point(lambda v: 255 if v >= 128 else 0)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def make_garment() -> tuple[Image.Image, Image.Image]:
    """Return (garment RGB, garment mask L), both SIZE×SIZE."""
    s = SS
    body = Image.new("RGB", (SIZE * s, SIZE * s), (18, 104, 138))
    d = ImageDraw.Draw(body)
    # White stripes of unequal widths: their spacing shows vertical stretching.
    for y0, y1 in [(318, 332), (352, 358), (380, 404), (428, 434)]:
        d.rectangle([0, y0 * s, SIZE * s, y1 * s], fill=(245, 245, 240))
    # One diagonal sash, left shoulder to right hip: shows rotation and shear at a glance.
    d.polygon(_scaled([(120, 60), (176, 60), (420, 420), (364, 420)]), fill=(250, 200, 30))
    # Badge on the right chest only, so a mirrored or flipped warp would be obvious.
    cx, cy, r = 318, 170, 38
    d.ellipse([(cx - r) * s, (cy - r) * s, (cx + r) * s, (cy + r) * s], fill=(212, 40, 44),
              outline=(255, 255, 255), width=4 * s)
    d.text((cx * s, cy * s), "M4Z", fill=(255, 255, 255), font=_font(30 * s), anchor="mm")
    d.text((200 * s, 446 * s), "MLS", fill=(20, 20, 20), font=_font(22 * s), anchor="mm")
    # Dark collar and hem bands.
    d.line(_scaled(SHIRT_POLYGON[:5]), fill=(10, 40, 60), width=10 * s, joint="curve")
    d.rectangle([0, 458 * s, SIZE * s, 470 * s], fill=(10, 40, 60))

    shape = Image.new("L", (SIZE * s, SIZE * s), 0)
    ImageDraw.Draw(shape).polygon(_scaled(SHIRT_POLYGON), fill=255)
    background = Image.new("RGB", (SIZE * s, SIZE * s), (236, 232, 222))
    garment = Image.composite(body, background, shape)
    ImageDraw.Draw(garment).line(_scaled(SHIRT_POLYGON + SHIRT_POLYGON[:1]), fill=(10, 40, 60),
                                 width=2 * s, joint="curve")
    garment = garment.resize((SIZE, SIZE), Image.Resampling.LANCZOS)
    return garment, _polygon_mask(SHIRT_POLYGON)


# OpenPose (COCO, 18 keypoints) on the person photo, pixel (x, y); her right is the picture's left. Joints the
# photo does not show (hips, knees, ankles, her left wrist behind the helmet) are left out, as OpenPose does.
POSE_KEYPOINTS = {
    0: (222, 122),  # nose
    1: (215, 260),  # neck (between the shoulders)
    2: (95, 255),  # right shoulder
    3: (45, 410),  # right elbow
    4: (130, 492),  # right wrist (the glove at the bottom)
    5: (335, 265),  # left shoulder
    6: (352, 400),  # left elbow
    14: (203, 112),  # right eye
    15: (243, 112),  # left eye
    16: (170, 122),  # right ear
    17: (280, 120),  # left ear
}
# OpenPose's limbs (0-based keypoint pairs) and colours, in its drawing order.
POSE_LIMBS = [(1, 2), (1, 5), (2, 3), (3, 4), (5, 6), (6, 7), (1, 8), (8, 9), (9, 10), (1, 11), (11, 12),
              (12, 13), (1, 0), (0, 14), (14, 16), (0, 15), (15, 17)]
POSE_COLOURS = [(255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
                (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
                (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85)]


def make_pose(size: int = SIZE) -> Image.Image:
    """The OpenPose-style control image of the person photo: limbs at 60 % colour, joints as dots, on black."""
    s = SS
    limbs = Image.new("RGB", (size * s, size * s), (0, 0, 0))
    d = ImageDraw.Draw(limbs)
    scale = size / SIZE
    for (a, b), colour in zip(POSE_LIMBS, POSE_COLOURS):
        if a in POSE_KEYPOINTS and b in POSE_KEYPOINTS:
            (x0, y0), (x1, y1) = (_scaled([(x * scale, y * scale)])[0] for x, y in (POSE_KEYPOINTS[a], POSE_KEYPOINTS[b]))
            d.line([(x0, y0), (x1, y1)], fill=tuple(round(0.6 * c) for c in colour), width=8 * s, joint="curve")
    for i, (x, y) in POSE_KEYPOINTS.items():
        (cx, cy), r = _scaled([(x * scale, y * scale)])[0], 4 * s
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=POSE_COLOURS[i])
    return limbs.resize((size, size), Image.Resampling.LANCZOS)


def points_document() -> dict:
    """The points.json content, in the one control-point format (see README.md in this folder)."""
    return {
        "format": "max4zero-matches/1",
        "reference_size": [SIZE, SIZE],
        "target_size": [SIZE, SIZE],
        "points": [{"reference": list(ref), "target": list(tgt), "label": name} for name, ref, tgt in POINTS],
    }


def _compact_json(doc: dict) -> str:
    """One key per line and one point per line: easy to read, to edit by hand and to paste into manual_points."""
    head = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in doc.items() if key != "points"]
    rows = ",\n".join(f"    {json.dumps(p)}" for p in doc["points"])
    return "{\n" + ",\n".join(head) + ',\n  "points": [\n' + rows + "\n  ]\n}\n"


def main() -> None:
    INPUTS.mkdir(exist_ok=True)
    garment, garment_mask = make_garment()
    garment.save(INPUTS / "max4zero_garment.png", optimize=True)
    garment_mask.save(INPUTS / "max4zero_garment_mask.png", optimize=True)
    _polygon_mask(PERSON_POLYGON).save(INPUTS / "max4zero_person_mask.png", optimize=True)
    make_pose().save(INPUTS / "max4zero_pose.png", optimize=True)
    (HERE / "points.json").write_text(_compact_json(points_document()))
    print(f"wrote max4zero_garment.png, max4zero_garment_mask.png, max4zero_person_mask.png, max4zero_pose.png in "
          f"{INPUTS} and points.json in {HERE}")


if __name__ == "__main__":
    main()
