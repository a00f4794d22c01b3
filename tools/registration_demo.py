"""MaX4Zero's weight-free half on real pictures: control points → Moving Least Squares warp → fringes.

Stage 1 of the method (docs/method.md §2d–2e) without a diffusion model: the control points that deep-feature
matching would produce are given by hand in a small JSON file, so nothing is downloaded.

    python tools/registration_demo.py                       # the shipped samples → demo_out/
    python tools/registration_demo.py --person P.png --person-mask M.png --garment G.png \\
        --garment-mask GM.png --points pts.json --out DIR [--kind affine|similarity|rigid] \\
        [--alpha 1.0] [--stride 1] [--mode bilinear|nearest] [--size 512] [--force]

Inputs: a person photo and its mask (white = region to repaint), a garment photo and its mask (white =
garment), and ``points.json``::

    {"reference": [[x, y], ...],      # on the garment photo
     "target":    [[x, y], ...],      # the same points on the person photo, same order and count
     "reference_size": [W, H],        # optional: image size the points were picked on
     "target_size": [W, H],           # optional (default: the size of the image file)
     "labels": ["neck left", ...]}    # optional names, one per pair

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
``mls_grid.png``. Output policy: the default ``demo_out/`` is the demo's own folder and its files are
replaced on every run; a folder given with ``--out`` must be new or empty unless ``--force``, and even then
only the files named above are replaced (nothing else is deleted, and an input file is never
overwritten).
"""

from __future__ import annotations

import argparse
import colorsys
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_import import import_pack  # noqa: E402

import_pack()
from max4zero.warping import fringe, masks, mls  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(__file__).resolve().parent / "samples"
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

    reference, target: float64 ``[K, 2]`` pixel (x, y); labels: ``K`` names.
    """

    reference: np.ndarray
    target: np.ndarray
    labels: list[str]


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


def load_image(path: Path, size: int, what: str = "image") -> tuple[Image.Image, tuple[int, int]]:
    """Open an image as RGB resized to the working size; also returns its original (W, H)."""
    image = _open(path, what)
    original = image.size
    if image.mode in ("RGBA", "LA", "P"):
        # Transparent pixels over white rather than whatever colour they happen to store.
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    image = image.convert("RGB")
    return image.resize(working_size(*original, size), Image.Resampling.LANCZOS), original


def load_mask(path: Path, image_size: tuple[int, int], size: int, what: str) -> torch.Tensor:
    """Open a mask (white = on) at the working size as a bool ``[H, W]`` tensor."""
    image = _open(path, what)
    if image.size != image_size:
        raise DemoError(
            f"{what} {path} is {image.size[0]}x{image.size[1]} but its image is {image_size[0]}x{image_size[1]}: "
            "the mask must have the same size as the image it belongs to"
        )
    if image.mode in ("RGBA", "LA"):
        # A cut-out: the alpha channel is the mask.
        image = image.getchannel("A")
    small = image.convert("L").resize(working_size(*image_size, size), Image.Resampling.BILINEAR)
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


def _declared_size(doc: dict, key: str, fallback: tuple[int, int], path: Path) -> tuple[int, int]:
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


def _scale_points(points: np.ndarray, source: tuple[float, float], dest: tuple[int, int]) -> np.ndarray:
    # Pixel centres sit at integer coordinates, so scaling keeps the image edges (−0.5, W − 0.5) fixed.
    scale = np.array([dest[0] / source[0], dest[1] / source[1]])
    return (points + 0.5) * scale - 0.5


def load_points(
    path: Path,
    reference_size: tuple[int, int],
    target_size: tuple[int, int],
    reference_working: tuple[int, int],
    target_working: tuple[int, int],
) -> ControlPoints:
    """Read ``points.json`` (format in the module docstring) and scale it to the working images.

    ``*_size`` are the images' file sizes (W, H), ``*_working`` their working sizes.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise DemoError(f"points file {path} does not exist: check the path") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DemoError(f"points file {path} is not valid JSON ({exc}): see the format in --help") from None
    if not isinstance(doc, dict) or "reference" not in doc or "target" not in doc:
        raise DemoError(
            f'{path} must be a JSON object with "reference" and "target" lists of [x, y] pairs: see --help'
        )
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
    labels = [str(name) for name in labels] or [str(i + 1) for i in range(len(reference))]

    scaled = []
    for name, points, file_size, working in (
        ("reference", reference, reference_size, reference_working),
        ("target", target, target_size, target_working),
    ):
        declared = _declared_size(doc, f"{name}_size", file_size, path)
        w, h = declared
        outside = (points[:, 0] < -0.5) | (points[:, 0] > w - 0.5) | (points[:, 1] < -0.5) | (points[:, 1] > h - 0.5)
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise DemoError(
                f"{path}: {name} point {i + 1} ({labels[i]}) at {points[i].tolist()} lies outside the "
                f"{w:g}x{h:g} image: points are pixel (x, y); set \"{name}_size\" to the size they were picked on"
            )
        scaled.append(_scale_points(points, declared, working))
    return ControlPoints(reference=scaled[0], target=scaled[1], labels=labels)


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
            f"own file names there ({', '.join(OUTPUTS.values())}; nothing else is touched)"
        )
    written = {(out / name).resolve() for name in OUTPUTS.values()}
    for path in inputs:
        if Path(path).resolve() in written:
            raise DemoError(f"input {path} would be overwritten by the demo's output: choose another --out")


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
) -> dict[str, Path]:
    """Warp the garment onto the person with MLS and write the pictures; returns {name: path}.

    ``out`` must be new or empty unless ``force`` (or it is the default ``demo_out/``).
    Raises DemoError (a ValueError) on bad input, before anything is written.
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
    target_on = load_mask(Path(person_mask), target_file_size, size, "person mask")
    reference_on = load_mask(Path(garment_mask), reference_file_size, size, "garment mask")
    pts = load_points(Path(points), reference_file_size, target_file_size, reference_img.size, target_img.size)

    # Paper-mode preprocessing (docs/method.md §1): a 1 px erosion keeps background colour off the garment's edge;
    # the dilation gives the repainted region a margin around the user's mask.
    reference_on = masks.erode(reference_on, _odd(GARMENT_ERODE_512, size))
    if not reference_on.any():
        raise DemoError(f"garment mask {garment_mask} is empty after the 1 px erosion: draw a larger garment mask")
    target_on = masks.dilate(target_on, _odd(TARGET_DILATE_512, size))

    W, H = target_img.size
    # Backward map: for every target pixel, where to read in the reference (src = target points).
    src = torch.from_numpy(pts.target).float()
    dst = torch.from_numpy(pts.reference).float()
    coords = mls.backward_map(src, dst, H, W, kind=kind, alpha=alpha, stride=stride)
    reference_t = _image_tensor(reference_img)
    warped = mls.warp(reference_t, coords, mode=mode)
    warped_on = mls.warp(reference_on[None, None].float(), coords, mode=mode)[0, 0] > 0.5
    target_t = _image_tensor(target_img)
    combined = fringe.composite(target_t, warped, warped_on, target_on)
    thin, dilated = fringe.fringe_masks(target_on, warped_on, dilation=_odd(FRINGE_DILATE_512, size))

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
        picture.save(path)
        written[name] = path
    return written


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Warp a garment onto a person with Moving Least Squares from hand-picked control points "
        "(MaX4Zero stage 1, no model weights) and write the pictures as PNGs. With no input arguments it "
        "runs on the shipped samples in tools/samples/.",
        epilog="Inputs:" + __doc__.split("Inputs:", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    inputs = parser.add_argument_group("inputs (all five, or none for the samples)")
    inputs.add_argument("--person", type=Path, help="person (target) photo")
    inputs.add_argument("--person-mask", type=Path, help="mask of the region to repaint on the person (white)")
    inputs.add_argument("--garment", type=Path, help="garment (reference) photo")
    inputs.add_argument("--garment-mask", type=Path, help="mask of the garment in its photo (white)")
    inputs.add_argument("--points", type=Path, help="JSON control points, garment -> person (format below)")
    parser.add_argument("--out", type=Path, default=None, help=f"output folder (default: {DEFAULT_OUT})")
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
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    given = {
        "--person": args.person,
        "--person-mask": args.person_mask,
        "--garment": args.garment,
        "--garment-mask": args.garment_mask,
        "--points": args.points,
    }
    try:
        if all(v is None for v in given.values()):
            files = [SAMPLES / n for n in ("person.png", "person_mask.png", "garment.png", "garment_mask.png", "points.json")]
            print(f"No inputs given: using the samples in {SAMPLES}")
        elif any(v is None for v in given.values()):
            missing = [k for k, v in given.items() if v is None]
            raise DemoError(f"missing {', '.join(missing)}: give all five inputs, or none to run on the samples")
        else:
            files = list(given.values())
        out = args.out if args.out is not None else DEFAULT_OUT
        written = run(
            *files, out=out, kind=args.kind, alpha=args.alpha, stride=args.stride, mode=args.mode,
            size=args.size, force=args.force,
        )
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"MLS {args.kind}, alpha {args.alpha:g}, stride {args.stride}, {args.mode} sampling, size {args.size}. Wrote:")
    for name, path in written.items():
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
