"""Regenerate the demo's drawn sample inputs (everything here except ``person.png``).

    python tools/samples/make_samples.py

Writes, next to this file:
- ``person_mask.png``: the astronaut's suit (torso, shoulders, left arm) to repaint, drawn as a hand-placed
  polygon on ``person.png`` (512×512); the helmet she holds and her face are left out.
- ``garment.png`` / ``garment_mask.png``: a T-shirt drawn here (512×512) with a bold, asymmetric pattern
  (yellow diagonal sash, white stripes of unequal widths, red badge with text on one side only) so that
  the warp is easy to follow by eye.
- ``points.json``: hand-chosen control-point pairs, garment (reference) → person (target).

Only Pillow is needed. ``person.png`` is not drawn: see README.md in this folder for where it comes from.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

HERE = Path(__file__).resolve().parent
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


def points_document() -> dict:
    """The points.json content (see README.md in this folder for the format)."""
    return {
        "reference": [list(ref) for _, ref, _ in POINTS],
        "target": [list(tgt) for _, _, tgt in POINTS],
        "reference_size": [SIZE, SIZE],
        "target_size": [SIZE, SIZE],
        "labels": [name for name, _, _ in POINTS],
    }


def _compact_json(doc: dict) -> str:
    """One key per line, one list per line: easy to read and to edit by hand."""
    lines = [f"  {json.dumps(key)}: {json.dumps(value)}" for key, value in doc.items()]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> None:
    garment, garment_mask = make_garment()
    garment.save(HERE / "garment.png", optimize=True)
    garment_mask.save(HERE / "garment_mask.png", optimize=True)
    _polygon_mask(PERSON_POLYGON).save(HERE / "person_mask.png", optimize=True)
    (HERE / "points.json").write_text(_compact_json(points_document()))
    print(f"wrote garment.png, garment_mask.png, person_mask.png, points.json in {HERE}")


if __name__ == "__main__":
    main()
