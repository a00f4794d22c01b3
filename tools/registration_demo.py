"""MaX4Zero's weight-free half on real pictures: control points → Moving Least Squares warp → fringes.

Stage 1 of the method (docs/method.md §2d–2e) without a diffusion model: the control points that deep-feature
matching would produce are given by hand in a small JSON file, so nothing is downloaded.

    python tools/registration_demo.py                       # the shipped samples → demo_out/
    python tools/registration_demo.py --person P.png --person-mask M.png --garment G.png \\
        --garment-mask GM.png --points pts.json --out DIR [--kind affine|similarity|rigid] \\
        [--alpha 1.0] [--stride 1] [--mode bilinear|nearest] [--size 512] [--force]

Inputs: a person photo and its mask (white = region to repaint), a garment photo and its mask (white =
garment), and ``points.json``, the control points in the pack's one control-point format (the format of
MLS Warp's ``manual_points`` and of the Correspondence node's matches, ``registration/matches.py``)::

    {"format": "max4zero-matches/1",
     "reference_size": [H, W],                   # size of the garment photo the points were picked on
     "target_size": [H, W],                      # size of the person photo
     "points": [{"reference": [x, y],            # on the garment photo
                 "target": [x, y],               # the same garment point on the person photo
                 "label": "neck left"}, ...]}    # "label" optional (the node ignores it), as is "score"

Sizes are [height, width]; left out, they default to the size of the image file. The demo's earlier
format, ``{"reference": [[x, y], ...], "target": [[x, y], ...], "reference_size": [W, H], ...}`` (sizes
[width, height]), is still read, with a note; the demo writes every points file it reads back in the one
format (``points.json`` in the output folder), so it pastes into MLS Warp's ``manual_points``.

Masks are read as ComfyUI reads them (README "Masks"): white = on. A mask file without a shape in its alpha is
read from its colour, like Load Image (as Mask) with channel red, which the workflows use. When its alpha carries
a shape (some pixels transparent, some opaque), the mask is 1 − alpha, the transparent pixels, like Load Image's
MASK output and what ComfyUI's MaskEditor paints; a cut-out PNG (garment opaque, background transparent) is
therefore read inverted, and the demo warns as the nodes do (``tensors/masks.py: inverted_mask_problem``).
16-bit greyscale images are scaled to 8 bits, not clipped.

Control points that give a degenerate or folded warp (fewer than 3, all on one line, one garment point sent
to two places, a mirrored garment, or a map that turns the garment over) are named on stderr with what to
do (``warping/point_checks.py``); the demo still writes its pictures, so the problem can be seen.

Coordinates are pixel (x, y) with (0, 0) the centre of the top-left pixel. Both images are resized so
that their longer side is ``--size`` (aspect kept) and the points are scaled with them.

Masks are prepared as in paper mode (docs/method.md §1): garment mask eroded 3×3, person mask dilated 13×13,
fringe dilation 19×19; these sizes are for 512 px and scale with ``--size``. The MLS defaults are the
paper's (affine, exact map) except two: ``alpha`` is 1, not 0.1, because with 0.1 the weights barely fall
off and a dozen hand-picked points give one nearly global affine map (the paper has hundreds of feature
matches); sampling is bilinear, not nearest (docs/method.md §2d: bilinear is better). ``--alpha 0.1 --mode nearest``
is paper mode.

Writes into ``--out`` (default ``demo_out/`` in the repository): ``overview.png`` (points reference ↔
target, the MLS grid, the composite with its fringes), ``warped_garment.png``,
``warped_garment_mask.png``, ``composite.png``, ``fringe_thin.png`` (F), ``fringe_dilated.png`` (D),
``mls_grid.png``, and two points files in the one format: ``points.json`` (the points as used, in the
pixels of the photo files) and ``manual_points_crop512.json`` (the same points in the pixels of the 512 px
crops that Crop To Mask makes in the shipped workflows, padding 0.1: paste it into MLS Warp's
``manual_points`` there). Output policy: the default ``demo_out/`` is the demo's own folder and its files are
replaced on every run; a folder given with ``--out`` must be new or empty unless ``--force``, and even then
only the files named above are replaced (nothing else is deleted, and an input file is never
overwritten). Runs at a large ``--size`` print their progress on stderr.
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line (defined before torch is imported, so ``--help`` answers at once)."""
    parser = argparse.ArgumentParser(
        description="Warp a garment onto a person with Moving Least Squares from hand-picked control points "
        "(MaX4Zero stage 1, no model weights) and write the pictures as PNGs. With no input arguments it "
        "runs on the shipped samples (example_inputs/ and tools/samples/points.json).",
        epilog="Inputs:" + __doc__.split("Inputs:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inputs = parser.add_argument_group("inputs (all five, or none for the samples)")
    inputs.add_argument("--person", type=Path, help="person (target) photo")
    inputs.add_argument("--person-mask", type=Path, help="mask of the region to repaint on the person (white)")
    inputs.add_argument("--garment", type=Path, help="garment (reference) photo")
    inputs.add_argument("--garment-mask", type=Path, help="mask of the garment in its photo (white)")
    inputs.add_argument("--points", type=Path, help="JSON control points, garment -> person (format below)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default: demo_out/ in the repository)")
    parser.add_argument("--force", action="store_true", help="write into a non-empty --out (replaces only the demo's own file names)")
    parser.add_argument("--kind", choices=["affine", "similarity", "rigid"], default="affine", help="MLS kind (paper: affine)")
    parser.add_argument(
        "--alpha", type=float, default=1.0,
        help="MLS weight exponent, w = 1/d^(2 alpha). Default 1 (Schaefer et al.) follows a dozen hand-picked "
        "points; paper mode uses 0.1 with hundreds of feature matches, which is nearly one global map",
    )
    parser.add_argument("--stride", type=int, default=1, help="evaluate MLS every N pixels and upsample (1 = exact)")
    parser.add_argument("--mode", choices=["bilinear", "nearest"], default="bilinear", help="sampling (paper: nearest)")
    parser.add_argument("--size", type=int, default=512, help="working size: longer side in pixels (paper: 512)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines, even on large runs")
    return parser.parse_args(argv)


_CLI_ARGS: Optional[argparse.Namespace] = None
if __name__ == "__main__":
    # --help and usage errors answer before torch is imported (several seconds on a cold start).
    _CLI_ARGS = parse_args()

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_import import import_pack  # noqa: E402

import_pack()
from max4zero.registration import crop as geometry  # noqa: E402  (pure: no ComfyUI import)
from max4zero.registration.matches import FORMAT as POINTS_FORMAT  # noqa: E402
from max4zero.registration.matches import Matches  # noqa: E402
from max4zero.tensors import masks  # noqa: E402
from max4zero.warping import fringe, mls, point_checks  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(__file__).resolve().parent / "samples"
# The sample photos and masks live in example_inputs/ (shipped in the registry archive, under the names the
# workflows load); the control points are the demo's own.
EXAMPLE_INPUTS = ROOT / "example_inputs"
SAMPLE_FILES = (
    EXAMPLE_INPUTS / "max4zero_person.png",
    EXAMPLE_INPUTS / "max4zero_person_mask.png",
    EXAMPLE_INPUTS / "max4zero_garment.png",
    EXAMPLE_INPUTS / "max4zero_garment_mask.png",
    SAMPLES / "points.json",
)
DEFAULT_OUT = ROOT / "demo_out"

# Output names, in the order they are written and listed.
OUTPUTS = {
    "overview": "overview.png",
    "warped_garment": "warped_garment.png",
    "warped_garment_mask": "warped_garment_mask.png",
    "composite": "composite.png",
    "fringe_thin": "fringe_thin.png",
    "fringe_dilated": "fringe_dilated.png",
    "mls_grid": "mls_grid.png",
}
# The points files written next to the pictures (the one control-point format).
POINT_OUTPUTS = {
    "points": "points.json",
    "points_crop512": "manual_points_crop512.json",
}
# Crop To Mask in the shipped workflows (tools/make_workflows.py): size 512, padding 0.1.
WORKFLOW_CROP_SIZE = 512
WORKFLOW_CROP_PADDING = 0.1
# From this many working pixels on, progress lines are printed (the exact MLS map then takes seconds).
PROGRESS_PIXELS = 1024 * 1024

# Paper-mode kernel sides at the 512 px working size (docs/method.md §1, §2e).
GARMENT_ERODE_512 = 3
TARGET_DILATE_512 = 13
FRINGE_DILATE_512 = 19

# Colours of the pictures (RGB).
GRID_X = (0, 230, 255)  # lines of constant reference x
GRID_Y = (255, 60, 200)  # lines of constant reference y
THIN_FRINGE = (255, 40, 40)
DILATED_FRINGE = (255, 210, 0)
OUTLINE = (255, 255, 0)


class DemoError(ValueError):
    """Bad demo input; the message says what is wrong and what to do."""


@dataclass(frozen=True)
class ControlPoints:
    """Matched pixel positions, scaled to the working images.

    reference, target: float64 ``[K, 2]`` pixel (x, y); labels: ``K`` names. file_reference, file_target: the
    same points in the pixels of the image files (what the demo writes back). notes: remarks about the file
    (e.g. that it uses the demo's earlier format).
    """

    reference: np.ndarray
    target: np.ndarray
    labels: list[str]
    file_reference: np.ndarray | None = None
    file_target: np.ndarray | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------------------
# Loading


def working_size(width: int, height: int, size: int) -> tuple[int, int]:
    """(W, H) with the longer side ``size`` and the aspect kept."""
    scale = size / max(width, height)
    return max(1, round(width * scale)), max(1, round(height * scale))


def _open(path: Path, what: str) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except FileNotFoundError:
        raise DemoError(f"{what} file {path} does not exist: check the path") from None
    except OSError as exc:
        raise DemoError(f"{what} file {path} is not an image Pillow can read ({exc}): give a PNG or JPEG") from None
    return image


#: Pillow modes of one-channel images with more than 8 bits (16-bit PNG/TIFF greyscale opens as I;16 or I).
_WIDE_GREY = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def _to_8bit(image: Image.Image) -> Image.Image:
    """16-bit (or 32-bit integer / float) greyscale → 8-bit L, scaled rather than clipped.

    ``convert("L")``/``convert("RGB")`` clip such images at 255, so a 16-bit photo (0..65535) turns almost
    white. Integer images are scaled by 255/65535 when any value exceeds 255 (8-bit data stored in a wide
    mode stays as it is); float images in [0, 1] are scaled by 255.
    """
    if image.mode not in _WIDE_GREY and image.mode != "F":
        return image
    a = np.asarray(image).astype(np.float64)
    if image.mode == "F":
        top = 1.0 if a.size and np.nanmax(a) <= 1.0 else 255.0
    else:
        top = 65535.0 if a.size and a.max() > 255 else 255.0
    return Image.fromarray(np.clip(np.round(a * (255.0 / top)), 0, 255).astype(np.uint8), "L")


def load_image(path: Path, size: int, what: str = "image") -> tuple[Image.Image, tuple[int, int]]:
    """Open an image as RGB resized to the working size; also returns its original (W, H)."""
    image = _to_8bit(_open(path, what))
    original = image.size
    if image.mode in ("RGBA", "LA", "P", "PA"):
        # Transparent pixels over white rather than whatever colour they happen to store.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    return image.resize(working_size(*original, size), Image.Resampling.LANCZOS), original


def mask_channel(image: Image.Image) -> Image.Image:
    """The 8-bit L image a mask file stands for (white = on), as ComfyUI reads it.

    When the alpha channel carries a shape (some pixels transparent, some opaque) the mask is 1 − alpha: the
    transparent pixels, as Load Image's MASK output gives them and as ComfyUI's MaskEditor paints. An alpha that
    is the same everywhere, e.g. an opaque white-on-black RGBA mask, says nothing, so the colour is used, as Load
    Image (as Mask) does. 16-bit greyscale is scaled to 8 bits (see :func:`_to_8bit`).
    """
    image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA") if "transparency" in image.info else image.convert("RGB")
    if image.mode in ("RGBA", "LA", "PA"):
        alpha = np.asarray(image.getchannel("A"))
        if (alpha > 127).any() and (alpha <= 127).any():
            return Image.fromarray(255 - alpha, "L")
        image = image.convert("RGB") if image.mode == "RGBA" else image.getchannel(0)
    return image.convert("L")


def load_mask_full(path: Path, image_size: tuple[int, int], what: str) -> torch.Tensor:
    """A mask file (white = on) at its own size as a bool ``[H, W]`` tensor, checked against its image."""
    image = _open(path, what)
    if image.size != image_size:
        raise DemoError(
            f"{what} {path} is {image.size[0]}x{image.size[1]} but its image is {image_size[0]}x{image_size[1]}: "
            "the mask must have the same size as the image it belongs to"
        )
    on = torch.from_numpy(np.asarray(mask_channel(image)) > 127)
    if not on.any():
        raise DemoError(
            f"{what} {path} is empty (no pixel brighter than mid-grey): white marks the region, black the rest"
        )
    return on


def load_mask(path: Path, image_size: tuple[int, int], size: int, what: str) -> torch.Tensor:
    """Open a mask (white = on) at the working size as a bool ``[H, W]`` tensor."""
    image = _open(path, what)
    if image.size != image_size:
        raise DemoError(
            f"{what} {path} is {image.size[0]}x{image.size[1]} but its image is {image_size[0]}x{image_size[1]}: "
            "the mask must have the same size as the image it belongs to"
        )
    small = mask_channel(image).resize(working_size(*image_size, size), Image.Resampling.BILINEAR)
    on = torch.from_numpy(np.asarray(small) > 127)
    if not on.any():
        raise DemoError(
            f"{what} {path} is empty (no pixel brighter than mid-grey): white marks the region, black the rest"
        )
    return on


def _pairs(value: object, key: str, path: Path) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        array = None
    if array is None or array.ndim != 2 or array.shape[1] != 2 or len(array) == 0:
        raise DemoError(f'{path}: "{key}" must be a non-empty list of [x, y] pairs, e.g. [[120, 80], [300, 95]]')
    if not np.isfinite(array).all():
        raise DemoError(f'{path}: "{key}" contains a non-finite coordinate (NaN or infinity): fix the file')
    return array


def _declared_size(doc: dict, key: str, fallback: tuple[int, int], path: Path) -> tuple[float, float]:
    """The earlier demo format's ``[width, height]``."""
    if key not in doc:
        return fallback
    value = doc[key]
    if (
        not isinstance(value, (list, tuple))
        or len(value) != 2
        or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v > 0 for v in value)
    ):
        raise DemoError(f'{path}: "{key}" must be [width, height] in pixels, got {value!r}')
    return float(value[0]), float(value[1])


def _scale_points(points: np.ndarray, source: tuple[float, float], dest: tuple[float, float]) -> np.ndarray:
    # Pixel centres sit at integer coordinates, so scaling keeps the image edges (−0.5, W − 0.5) fixed.
    scale = np.array([dest[0] / source[0], dest[1] / source[1]])
    return (points + 0.5) * scale - 0.5


def _read_old_format(doc: dict, path: Path, reference_size, target_size):
    """The demo's earlier format: two lists of [x, y] and sizes as [W, H]. Returns (ref, tgt, labels, sizes)."""
    reference = _pairs(doc["reference"], "reference", path)
    target = _pairs(doc["target"], "target", path)
    if len(reference) != len(target):
        raise DemoError(
            f"{path} has {len(reference)} reference points but {len(target)} target points: the lists are "
            "pairs in the same order, so give both the same number of points"
        )
    labels = doc.get("labels", [])
    if not isinstance(labels, list) or (labels and len(labels) != len(reference)):
        raise DemoError(f'{path}: "labels" must be a list with one name per pair ({len(reference)}), or be left out')
    sizes = (_declared_size(doc, "reference_size", reference_size, path),
             _declared_size(doc, "target_size", target_size, path))
    return reference, target, [str(name) for name in labels], sizes


def _read_format(doc, path: Path, reference_size, target_size):
    """The one format (registration/matches.py), parsed by the node's own parser. Returns (ref, tgt, labels, sizes)."""
    try:
        m = Matches.from_json(doc, (reference_size[1], reference_size[0]), (target_size[1], target_size[0]))
    except ValueError as exc:
        raise DemoError(f"{path}: {exc}") from None
    entries = doc["points"] if isinstance(doc, dict) else doc
    labels = [str(p.get("label", "")) if isinstance(p, dict) else "" for p in entries]
    if not any(labels):
        labels = []
    sizes = tuple((float(w), float(h)) for h, w in (m.reference_size, m.target_size))
    return (m.reference_points.double().numpy(), m.target_points.double().numpy(), labels, sizes)


def load_points(
    path: Path,
    reference_size: tuple[int, int],
    target_size: tuple[int, int],
    reference_working: tuple[int, int],
    target_working: tuple[int, int],
) -> ControlPoints:
    """Read a points file (format in the module docstring) and scale it to the working images.

    ``*_size`` are the images' file sizes (W, H), ``*_working`` their working sizes.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DemoError(f"points file {path} does not exist: check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DemoError(f"points file {path} is not valid JSON ({exc}): see the format in --help") from None
    notes = []
    if isinstance(doc, dict) and "points" not in doc and "reference" in doc and "target" in doc:
        reference, target, labels, sizes = _read_old_format(doc, path, reference_size, target_size)
        notes.append(
            f"{path} uses the demo's earlier points format (two lists, sizes as [width, height]); it was read "
            f"as such. The pack's one format ({POINTS_FORMAT}, sizes as [height, width]) is what MLS Warp's "
            "manual_points reads: the output folder's points.json holds these points in it."
        )
    elif isinstance(doc, list) or (isinstance(doc, dict) and "points" in doc):
        reference, target, labels, sizes = _read_format(doc, path, reference_size, target_size)
    else:
        raise DemoError(
            f'{path} must be a JSON object with a "points" list, e.g. {{"format": "{POINTS_FORMAT}", '
            '"points": [{"reference": [120, 80], "target": [140, 96]}]}: see --help'
        )
    labels = labels or [str(i + 1) for i in range(len(reference))]

    scaled, in_files = [], []
    for name, points, file_size, working, declared in (
        ("reference", reference, reference_size, reference_working, sizes[0]),
        ("target", target, target_size, target_working, sizes[1]),
    ):
        w, h = declared
        outside = (points[:, 0] < -0.5) | (points[:, 0] > w - 0.5) | (points[:, 1] < -0.5) | (points[:, 1] > h - 0.5)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise DemoError(
                f"{path}: {name} point {i + 1} ({labels[i]}) at {points[i].tolist()} lies outside the "
                f"{w:g}x{h:g} image: points are pixel (x, y); set \"{name}_size\" to the size they were picked on"
            )
        scaled.append(_scale_points(points, declared, working))
        in_files.append(_scale_points(points, declared, file_size))
    return ControlPoints(reference=scaled[0], target=scaled[1], labels=labels, file_reference=in_files[0],
                         file_target=in_files[1], notes=notes)


def points_document(reference: np.ndarray, target: np.ndarray, reference_size: tuple[int, int],
                    target_size: tuple[int, int], labels: Sequence[str] | None = None) -> dict:
    """A points file in the one format; ``*_size`` are (W, H), written as [height, width]."""
    def xy(p) -> list[float]:
        return [round(float(v), 2) + 0.0 for v in p]

    points = []
    for i, (a, b) in enumerate(zip(reference, target)):
        entry = {"reference": xy(a), "target": xy(b)}
        if labels and labels[i] != str(i + 1):
            entry["label"] = labels[i]
        points.append(entry)
    return {"format": POINTS_FORMAT, "reference_size": [int(reference_size[1]), int(reference_size[0])],
            "target_size": [int(target_size[1]), int(target_size[0])], "points": points}


def points_json(doc: dict) -> str:
    """One key per line and one point per line: easy to read, edit and paste."""
    head = [f'  {json.dumps(k)}: {json.dumps(v)}' for k, v in doc.items() if k != "points"]
    rows = ",\n".join(f"    {json.dumps(p)}" for p in doc["points"])
    return "{\n" + ",\n".join(head) + ',\n  "points": [\n' + rows + "\n  ]\n}\n"


def crop_points(points: np.ndarray, box: tuple[int, int, int, int], size: int) -> np.ndarray:
    """Pixel (x, y) in a photo → pixel (x, y) in its Crop To Mask crop (``box`` in photo pixels, ``size`` px)."""
    x0, y0, x1, _ = box
    return (points - np.array([x0, y0]) + 0.5) * (size / (x1 - x0)) - 0.5


# ----------------------------------------------------------------------------------------------------------
# Registration


def _odd(kernel_512: int, size: int) -> int:
    """Paper kernel side at 512 px → the same physical size at ``size`` px (odd, ≥ 1)."""
    k = max(1, round(kernel_512 * size / 512))
    return k if k % 2 == 1 else k + 1


def _image_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → float32 ``[1, 3, H, W]`` in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None].contiguous()


def _to_pil(image: torch.Tensor) -> Image.Image:
    """``[1, 3, H, W]`` in [0, 1] → PIL RGB."""
    array = (image[0].permute(1, 2, 0).clamp(0, 1) * 255.0).round().to(torch.uint8).numpy()
    return Image.fromarray(array, "RGB")


def _mask_pil(mask: torch.Tensor) -> Image.Image:
    """bool ``[H, W]`` → black/white PIL L."""
    return Image.fromarray(mask.numpy().astype(np.uint8) * 255, "L")


# ----------------------------------------------------------------------------------------------------------
# Pictures


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the small bitmap font
        return ImageFont.load_default()


def _colours(n: int) -> list[tuple[int, int, int]]:
    """``n`` distinct saturated colours (golden-angle hues), so neighbouring pairs differ."""
    out = []
    for i in range(n):
        r, g, b = colorsys.hsv_to_rgb((i * 0.618034) % 1.0, 0.85, 1.0)
        out.append((round(r * 255), round(g * 255), round(b * 255)))
    return out


def _edge(mask: torch.Tensor) -> torch.Tensor:
    """Inner one-pixel outline of a bool ``[H, W]`` mask."""
    return mask & ~masks.erode(mask, 3)


def _tint(image: Image.Image, mask: torch.Tensor, colour: tuple[int, int, int], amount: float) -> Image.Image:
    """Blend ``colour`` into ``image`` by ``amount`` where ``mask``."""
    solid = Image.new("RGB", image.size, colour)
    return Image.composite(Image.blend(image, solid, amount), image, _mask_pil(mask))


def _paint(image: Image.Image, mask: torch.Tensor, colour: tuple[int, int, int]) -> Image.Image:
    return Image.composite(Image.new("RGB", image.size, colour), image, _mask_pil(mask))


def _dim(image: Image.Image, amount: float = 0.45) -> Image.Image:
    return Image.blend(image, Image.new("RGB", image.size, (0, 0, 0)), amount)


def grid_lines(coords: torch.Tensor, spacing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the lines of a regular grid of the reference fall in the target.

    Args:
        coords: ``[H, W, 2]`` reference (x, y) for every pixel (identity for the reference itself, the
            MLS backward map for the target).
        spacing: grid step in reference pixels.

    Returns:
        ``(x_lines, y_lines)`` bool ``[H, W]``: pixels where ``x / spacing`` (resp. ``y``) crosses an
        integer between a pixel and its right or lower neighbour, i.e. one-pixel-wide level lines that
        stay connected however much the map stretches.
    """
    out = []
    for c in (0, 1):
        cell = torch.floor(coords[..., c] / spacing)
        line = torch.zeros(cell.shape, dtype=torch.bool)
        line[:, :-1] |= cell[:, :-1] != cell[:, 1:]
        line[:-1, :] |= cell[:-1, :] != cell[1:, :]
        out.append(line)
    return out[0], out[1]


def _identity(width: int, height: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij")
    return torch.stack([xs, ys], dim=-1)


def _draw_grid(image: Image.Image, coords: torch.Tensor, spacing: float) -> Image.Image:
    x_lines, y_lines = grid_lines(coords, spacing)
    return _paint(_paint(image, x_lines, GRID_X), y_lines, GRID_Y)


def _dot(draw: ImageDraw.ImageDraw, xy: Sequence[float], radius: float, colour: tuple[int, int, int]) -> None:
    x, y = xy
    draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=colour, outline=(0, 0, 0), width=max(1, round(radius / 3)))


def _label(draw: ImageDraw.ImageDraw, xy: tuple[float, float], text: str, font, size: int) -> None:
    try:
        draw.text(xy, text, fill=(255, 255, 255), font=font, stroke_width=max(1, size // 12), stroke_fill=(0, 0, 0))
    except (AttributeError, TypeError, ValueError):  # old Pillow's bitmap font cannot stroke
        draw.text(xy, text, fill=(255, 255, 255), font=font)


def overview(
    reference: Image.Image,
    reference_mask: torch.Tensor,
    target: Image.Image,
    target_mask: torch.Tensor,
    points: ControlPoints,
    grid_picture: Image.Image,
    composite_picture: Image.Image,
    spacing: float,
) -> Image.Image:
    """2×2 sheet: reference with its grid and points | target with its points (pairs joined by lines);
    the reference grid carried onto the target by MLS | the composite with F (red) and D∖F (yellow)."""
    cell_w = max(reference.width, target.width)
    cell_h = max(reference.height, target.height)
    title = max(12, cell_h // 24)
    font = _font(title)
    sheet = Image.new("RGB", (2 * cell_w, 2 * (cell_h + title + 8)), (24, 24, 24))

    ref_panel = _draw_grid(_dim(reference, 0.25), _identity(reference.width, reference.height), spacing)
    ref_panel = _paint(ref_panel, _edge(reference_mask), OUTLINE)
    tgt_panel = _paint(target, _edge(target_mask), OUTLINE)
    panels = [
        (ref_panel, "reference (garment) + regular grid"),
        (tgt_panel, "target (person) + mask outline"),
        (grid_picture, "MLS: the reference grid carried onto the target"),
        (composite_picture, "composite; red = thin fringe F, yellow = D - F"),
    ]
    origins = []
    draw = ImageDraw.Draw(sheet)
    for i, (panel, name) in enumerate(panels):
        x0 = (i % 2) * cell_w + (cell_w - panel.width) // 2
        y0 = (i // 2) * (cell_h + title + 8) + title + 8
        sheet.paste(panel, (x0, y0))
        draw.text(((i % 2) * cell_w + 6, y0 - title - 4), name, fill=(235, 235, 235), font=font)
        origins.append((x0, y0))

    radius = max(3.0, cell_h / 110)
    colours = _colours(len(points.labels))
    (rx, ry), (tx, ty) = origins[0], origins[1]
    for i, colour in enumerate(colours):
        a = (rx + points.reference[i, 0], ry + points.reference[i, 1])
        b = (tx + points.target[i, 0], ty + points.target[i, 1])
        draw.line([a, b], fill=colour, width=max(1, round(radius / 2)))
    small = _font(max(10, title * 3 // 4))
    for i, colour in enumerate(colours):
        a = (rx + points.reference[i, 0], ry + points.reference[i, 1])
        b = (tx + points.target[i, 0], ty + points.target[i, 1])
        gx, gy = origins[2]
        c = (gx + points.target[i, 0], gy + points.target[i, 1])
        for xy in (a, b, c):
            _dot(draw, xy, radius, colour)
        _label(draw, (a[0] + radius + 1, a[1] - radius), str(i + 1), small, title)
        _label(draw, (b[0] + radius + 1, b[1] - radius), str(i + 1), small, title)
    return sheet


# ----------------------------------------------------------------------------------------------------------
# The run


def _check_out(out: Path, force: bool, inputs: Sequence[Path], own_folder: bool) -> None:
    if out.exists() and not out.is_dir():
        raise DemoError(f"--out {out} exists and is not a folder: give a new or empty folder")
    if out.is_dir() and any(out.iterdir()) and not (force or own_folder):
        raise DemoError(
            f"--out {out} is not empty: give a new or empty folder, or add --force to replace the demo's "
            f"own file names there ({', '.join([*OUTPUTS.values(), *POINT_OUTPUTS.values()])}; nothing else "
            "is touched)"
        )
    written = {(out / name).resolve() for name in [*OUTPUTS.values(), *POINT_OUTPUTS.values()]}
    for path in inputs:
        if Path(path).resolve() in written:
            raise DemoError(f"input {path} would be overwritten by the demo's output: choose another --out")


class _Progress:
    """Progress lines on stderr (``step``), each with the seconds since the run started; silent when off."""

    def __init__(self, on: bool) -> None:
        self.on, self.t0 = on, time.perf_counter()

    def __call__(self, text: str) -> None:
        if self.on:
            print(f"  [{time.perf_counter() - self.t0:5.1f} s] {text}", file=sys.stderr, flush=True)


def _backward_map(src: torch.Tensor, dst: torch.Tensor, H: int, W: int, kind: str, alpha: float, stride: int,
                  progress: _Progress) -> torch.Tensor:
    """``mls.backward_map``; an exact map of a large image is evaluated in bands of rows, with a progress line each."""
    if stride > 1 or not progress.on:
        progress(f"MLS map, {W}x{H}, every {stride} px ...")
        return mls.backward_map(src, dst, H, W, kind=kind, alpha=alpha, stride=stride)
    out = torch.empty(H, W, 2)
    bands = 10
    xs = torch.arange(W, dtype=torch.float32)
    for b in range(bands):
        y0, y1 = H * b // bands, H * (b + 1) // bands
        gy, gx = torch.meshgrid(torch.arange(y0, y1, dtype=torch.float32), xs, indexing="ij")
        band = torch.stack([gx.reshape(-1), gy.reshape(-1)], 1)
        out[y0:y1] = mls.mls_deform(band, src, dst, kind=kind, alpha=alpha).view(y1 - y0, W, 2)
        progress(f"MLS map, {W}x{H}, exact at every pixel: {100 * (b + 1) // bands} % "
                 "(--stride 4 is about 16x faster)")
    return out


def _warn(text: str) -> None:
    print(f"warning: {text}", file=sys.stderr)


def run(
    person: Path,
    person_mask: Path,
    garment: Path,
    garment_mask: Path,
    points: Path,
    out: Path,
    kind: str = "affine",
    alpha: float = 1.0,
    stride: int = 1,
    mode: str = "bilinear",
    size: int = 512,
    force: bool = False,
    warn: Callable[[str], None] = _warn,
    progress: Optional[bool] = None,
) -> dict[str, Path]:
    """Warp the garment onto the person with MLS and write the pictures and points files; returns {name: path}.

    ``out`` must be new or empty unless ``force`` (or it is the default ``demo_out/``).
    Raises DemoError (a ValueError) on bad input, before anything is written. Notes and warnings about the
    control points go to ``warn`` (stderr by default); the run goes on, so the result can be looked at.
    ``progress``: print progress lines on stderr (None: only when the working image has at least
    :data:`PROGRESS_PIXELS` pixels).
    """
    if kind not in ("affine", "similarity", "rigid"):
        raise DemoError(f"--kind must be affine, similarity or rigid, got {kind!r}")
    if mode not in ("bilinear", "nearest"):
        raise DemoError(f"--mode must be bilinear or nearest, got {mode!r}")
    if not (isinstance(size, int) and 16 <= size <= 4096):
        raise DemoError(f"--size must be an integer between 16 and 4096 (pixels of the longer side), got {size!r}")
    if not (isinstance(stride, int) and stride >= 1):
        raise DemoError(f"--stride must be a positive integer (1 = exact MLS at every pixel), got {stride!r}")
    if not (math.isfinite(alpha) and alpha > 0):
        raise DemoError(f"--alpha must be a positive number (paper: 0.1), got {alpha!r}")
    out = Path(out)
    inputs = [Path(p) for p in (person, person_mask, garment, garment_mask, points)]
    _check_out(out, force, inputs, own_folder=out.resolve() == DEFAULT_OUT.resolve())

    target_img, target_file_size = load_image(Path(person), size, "person image")
    reference_img, reference_file_size = load_image(Path(garment), size, "garment image")
    step = _Progress(progress if progress is not None else target_img.width * target_img.height >= PROGRESS_PIXELS)
    step(f"loaded the photos ({target_file_size[0]}x{target_file_size[1]} person, working size {size})")
    target_full = load_mask_full(Path(person_mask), target_file_size, "person mask")
    reference_full = load_mask_full(Path(garment_mask), reference_file_size, "garment mask")
    target_on = load_mask(Path(person_mask), target_file_size, size, "person mask")
    reference_on = load_mask(Path(garment_mask), reference_file_size, size, "garment mask")
    for name, on in (("person mask", target_full), ("garment mask", reference_full)):
        problem = masks.inverted_mask_problem(on.float()[None], name)  # the nodes' own check and words
        if problem:
            warn(f"{problem}. In this demo: save the mask white on black, or with the region transparent (as "
                 "ComfyUI's MaskEditor paints it)")
    pts = load_points(Path(points), reference_file_size, target_file_size, reference_img.size, target_img.size)
    for note in pts.notes:
        warn(note)
    for text in point_checks.control_point_warnings(pts.file_reference, pts.file_target, pts.labels):
        warn(text)

    # Paper-mode preprocessing (docs/method.md §1): a 1 px erosion keeps background colour off the garment's edge;
    # the dilation gives the repainted region a margin around the user's mask.
    reference_on = masks.erode(reference_on, _odd(GARMENT_ERODE_512, size))
    if not reference_on.any():
        raise DemoError(f"garment mask {garment_mask} is empty after the 1 px erosion: draw a larger garment mask")
    target_on = masks.dilate(target_on, _odd(TARGET_DILATE_512, size))
    step("masks prepared")

    W, H = target_img.size
    # Backward map: for every target pixel, where to read in the reference (src = target points).
    src = torch.from_numpy(pts.target).float()
    dst = torch.from_numpy(pts.reference).float()
    coords = _backward_map(src, dst, H, W, kind, alpha, stride, step)
    folded = point_checks.fold_warning(point_checks.fold_fraction(coords, target_on), picture="mls_grid.png")
    if folded:
        warn(folded)
    reference_t = _image_tensor(reference_img)
    warped = mls.warp(reference_t, coords, mode=mode)
    warped_on = mls.warp(reference_on[None, None].float(), coords, mode=mode)[0, 0] > 0.5
    target_t = _image_tensor(target_img)
    combined = fringe.composite(target_t, warped, warped_on, target_on)
    thin, dilated = fringe.fringe_masks(target_on, warped_on, dilation=_odd(FRINGE_DILATE_512, size))
    step("warped and composited")

    spacing = size / 16
    grid_picture = _draw_grid(_dim(target_img), coords, spacing)
    grid_picture = _paint(grid_picture, _edge(warped_on), OUTLINE)
    draw = ImageDraw.Draw(grid_picture)
    for colour, xy in zip(_colours(len(pts.labels)), pts.target):
        _dot(draw, xy, max(3.0, size / 110), colour)
    composite_img = _to_pil(combined)
    fringe_picture = _tint(_tint(composite_img, dilated & ~thin, DILATED_FRINGE, 0.55), thin, THIN_FRINGE, 0.7)

    pictures = {
        "overview": overview(reference_img, reference_on, target_img, target_on, pts, grid_picture, fringe_picture, spacing),
        "warped_garment": _to_pil(warped),
        "warped_garment_mask": _mask_pil(warped_on),
        "composite": composite_img,
        "fringe_thin": _mask_pil(thin),
        "fringe_dilated": _mask_pil(dilated),
        "mls_grid": grid_picture,
    }
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, picture in pictures.items():
        path = out / OUTPUTS[name]
        step(f"writing {path.name}")
        picture.save(path)
        written[name] = path

    # The points in the one format: as used (photo pixels), and in the workflows' Crop To Mask crops.
    ref_box = geometry.square_box(reference_full.float(), WORKFLOW_CROP_PADDING)
    tgt_box = geometry.square_box(target_full.float(), WORKFLOW_CROP_PADDING)
    documents = {
        "points": points_document(pts.file_reference, pts.file_target, reference_file_size, target_file_size,
                                  pts.labels),
        "points_crop512": points_document(
            crop_points(pts.file_reference, ref_box, WORKFLOW_CROP_SIZE),
            crop_points(pts.file_target, tgt_box, WORKFLOW_CROP_SIZE),
            (WORKFLOW_CROP_SIZE, WORKFLOW_CROP_SIZE), (WORKFLOW_CROP_SIZE, WORKFLOW_CROP_SIZE), pts.labels),
    }
    for name, doc in documents.items():
        path = out / POINT_OUTPUTS[name]
        path.write_text(points_json(doc))
        written[name] = path
    step("done")
    return written


def main(argv: Sequence[str] | None = None, args: Optional[argparse.Namespace] = None) -> int:
    args = args if args is not None else parse_args(argv)
    given = {
        "--person": args.person,
        "--person-mask": args.person_mask,
        "--garment": args.garment,
        "--garment-mask": args.garment_mask,
        "--points": args.points,
    }
    try:
        if all(v is None for v in given.values()):
            files = list(SAMPLE_FILES)
            print(f"No inputs given: using the samples in {EXAMPLE_INPUTS} and {SAMPLES / 'points.json'}")
        elif any(v is None for v in given.values()):
            missing = [k for k, v in given.items() if v is None]
            raise DemoError(f"missing {', '.join(missing)}: give all five inputs, or none to run on the samples")
        else:
            files = list(given.values())
        out = args.out if args.out is not None else DEFAULT_OUT
        written = run(
            *files, out=out, kind=args.kind, alpha=args.alpha, stride=args.stride, mode=args.mode,
            size=args.size, force=args.force, progress=False if args.quiet else None,
        )
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"MLS {args.kind}, alpha {args.alpha:g}, stride {args.stride}, {args.mode} sampling, size {args.size}. Wrote:")
    for name, path in written.items():
        print(f"  {path}")
    print(f"Paste {written['points_crop512'].name} into MLS Warp's manual_points in the shipped workflows "
          "(their Crop To Mask crops at 512 px).")
    return 0


if __name__ == "__main__":
    sys.exit(main(args=_CLI_ARGS))
