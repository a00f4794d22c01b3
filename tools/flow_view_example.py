"""Picture of the Leffa flow views on a KNOWN attention pattern (no model weights needed).

    python tools/flow_view_example.py                 # writes docs/flow_view_example.jpg (the README's picture)
    python tools/flow_view_example.py OUT.jpg         # anywhere else

The sample garment and person (``example_inputs/``) and their control points (``tools/samples/points.json``)
give an MLS warp (``warping.mls``), at the Flow View's usual size: 512 px crops, attention on the 1/8 token grid
(64 × 64). Reference keys and person queries are built as Fourier features of token positions, so that each
person token inside the try-on mask attends sharply to the garment tokens around the place the MLS warp sends
it to. ``attention.flow`` then recovers that warp from the queries and keys alone, never building the attention
map. The sheet shows what each Flow View map means:

* person + try-on mask, garment + garment mask;
* **flow**, the colour wheel of where each person pixel reads the garment (absolute mode: the colour names a
  place on the garment; the inset is the legend, the garment painted in the same colours);
* **garment warped by the attention**;
* **reliance**: the share of each pixel's attention that goes to the garment (the rest goes to the person's
  own tokens). This pattern is built to read the garment only: the person's own keys are neutral (every
  logit 0), so reliance is close to 1 all over the mask (median above 0.99, a little lower at its far
  edges). On a real run, low reliance marks pixels the model paints from the person's own context. (The
  dark specks an earlier version of this picture showed came from its construction, not from the flow: it
  used one constant vector as every person key, whose logit then varied from query to query with the
  Fourier features, pulling some queries towards the person's own tokens at random places.)
* **end-point error** against the MLS warp, on the node's own scale: white = ``epe_scale_px`` = 32 garment
  pixels (the Flow View's default), as its ``disagreement`` output shows it.

What the numbers say (printed, and under the last panel): where the MLS warp lands ON the garment, the attention
gives it back to within about half a token (the token grid is 8 px: median about 4 px, p95 about 13 px);
where the warp lands OFF the garment (outside its mask: about a quarter of the try-on mask here, along the
mask's outline and over the left sleeve, where the hand-picked points stretch the shirt beyond its edge), the
attention cannot follow, since garment tokens outside the mask get zero weight, so the flow stops at the
garment's edge and the error there is tens of pixels (median about 90 px). That is what the disagreement map
is for: on a real run it shows where the attention and the registration part ways.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_import import import_pack  # noqa: E402

import_pack()
from max4zero.attention import flow as fl  # noqa: E402
from max4zero.tensors import masks  # noqa: E402
from max4zero.warping import mls  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = Path(__file__).resolve().parent / "samples"
INPUTS = ROOT / "example_inputs"
DEFAULT_OUT = ROOT / "docs" / "flow_view_example.jpg"
SIZE = 512  # the crop size of the workflows
TOK = SIZE // 8  # the 1/8 token grid
TILE = 320
EPE_SCALE_PX = 32.0  # the Flow View node's default epe_scale_px: white in its disagreement map


def _image(name: str, mask: bool = False) -> torch.Tensor:
    im = Image.open(INPUTS / f"max4zero_{name}").convert("L" if mask else "RGB").resize((SIZE, SIZE), Image.BILINEAR)
    a = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    return (a > 0.5).float() if mask else a.permute(2, 0, 1)


def _fourier(xy: torch.Tensor, n_freq: int = 16) -> torch.Tensor:
    """[N, 2] positions in [-1, 1] → [N, 4·n_freq] features whose dot product peaks at equal positions."""
    freqs = math.pi * torch.linspace(0.5, 6.0, n_freq)
    ang = xy[:, :, None] * freqs  # [N, 2, F]
    return torch.cat([ang.sin(), ang.cos()], -1).flatten(1)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def compute() -> dict:
    """Every map of the sheet and the numbers (see the module docstring)."""
    pts = json.loads((SAMPLES / "points.json").read_text())  # the one control-point format, sizes [h, w]
    ref_h, ref_w = pts.get("reference_size", [SIZE, SIZE])
    tgt_h, tgt_w = pts.get("target_size", [SIZE, SIZE])
    scale_r = torch.tensor([SIZE / ref_w, SIZE / ref_h], dtype=torch.float64)
    scale_t = torch.tensor([SIZE / tgt_w, SIZE / tgt_h], dtype=torch.float64)
    ref_pts = (torch.tensor([p["reference"] for p in pts["points"]], dtype=torch.float64) + 0.5) * scale_r - 0.5
    tgt_pts = (torch.tensor([p["target"] for p in pts["points"]], dtype=torch.float64) + 0.5) * scale_t - 0.5
    person, garment = _image("person.png"), _image("garment.png")
    pmask, gmask = _image("person_mask.png", True), _image("garment_mask.png", True)

    # The known answer: MLS backward map, as a flow in [-1, 1], at pixel and token resolution.
    bmap = mls.backward_map(tgt_pts, ref_pts, SIZE, SIZE, kind="affine", alpha=1.0, stride=1)
    mls_flow = fl.pixel_map_to_flow(bmap, (SIZE, SIZE))
    mls_tok = fl.resize_flow(mls_flow[None], TOK)[0]  # [TOK, TOK, 2]

    # Attention that encodes it: keys at garment token positions, queries at their MLS targets; the person's own
    # keys are neutral (logit 0), so reliance measures only how well some garment token matches.
    k_ref = _fourier(fl.identity_flow(TOK).reshape(-1, 2))[None]  # [1, T_ref, D]
    q = _fourier(mls_tok.reshape(-1, 2))[None] * 3.0  # sharper softmax
    ref_keys = masks.resize_to_grid(gmask[None], TOK)[0].reshape(1, -1).bool()
    query_mask = masks.resize_to_grid(pmask[None], TOK)[0].reshape(1, -1).bool()
    k_tgt = torch.zeros_like(q)
    stats = fl.reference_flow_from_qk(q, k_ref, ref_keys, heads=1, ref_hw=TOK, k_tgt=k_tgt)
    inside = query_mask.reshape(TOK, TOK)
    flow = torch.where(inside[..., None], stats.flow.reshape(TOK, TOK, 2), fl.identity_flow(TOK))
    mass = stats.mass.reshape(TOK, TOK) * inside

    color = fl.flow_to_color(flow, "absolute", brightness=inside.float())
    warped = fl.warp_by_flow(garment[None], flow, size=SIZE)[0]
    on = pmask > 0
    epe = fl.end_point_error(flow, mls_tok, size=SIZE, pixel_size=(SIZE, SIZE)) * on
    # Where the MLS warp lands on the garment (its mask, read where the warp points) and where it lands off it.
    lands_on = mls.warp(gmask[None, None], bmap.float(), mode="nearest")[0, 0] > 0.5
    on_garment, off_garment = on & lands_on, on & ~lands_on
    numbers = {
        "on_median": float(epe[on_garment].median()), "on_p95": float(epe[on_garment].quantile(0.95)),
        "off_median": float(epe[off_garment].median()) if off_garment.any() else 0.0,
        "off_share": float(off_garment.sum() / on.sum()),
        "reliance_on": float(torch.nn.functional.interpolate(mass[None, None], size=SIZE, mode="nearest")[0, 0][
            on_garment].median()),
    }
    return {"person": person, "garment": garment, "pmask": pmask, "gmask": gmask, "color": color,
            "warped": warped, "mass": mass, "epe": epe, "numbers": numbers}


def _tile(x: torch.Tensor) -> Image.Image:
    x = x.detach().float()
    if x.dim() == 2:
        x = x[None].expand(3, -1, -1)
    if x.shape[0] == 3:
        x = x.permute(1, 2, 0)
    arr = (x.clamp(0, 1).numpy() * 255).astype(np.uint8)
    return Image.fromarray(arr).resize((TILE, TILE), Image.NEAREST)


def _legend(gmask: torch.Tensor, side: int) -> Image.Image:
    """The colour wheel of absolute mode on the garment: each garment place in the colour the flow gives it."""
    wheel = fl.flow_to_color(fl.identity_flow(side), "absolute")  # [side, side, 3]
    small = masks.resize_to_grid(gmask[None], side)[0] > 0.5
    dimmed = torch.where(small[..., None], wheel, wheel * 0.35)
    im = Image.fromarray((dimmed.numpy() * 255).astype(np.uint8))
    ImageDraw.Draw(im).rectangle([0, 0, side - 1, side - 1], outline=(235, 235, 235))
    return im


def sheet(maps: dict) -> Image.Image:
    n = maps["numbers"]
    warped_on_person = torch.where(maps["pmask"][None] > 0, maps["warped"], maps["person"] * 0.35)
    flow_tile = _tile(maps["color"])
    legend = _legend(maps["gmask"], 96)
    flow_tile.paste(legend, (TILE - legend.width - 6, 6))
    panels = [
        ("person + try-on mask", _tile(maps["person"] * (0.45 + 0.55 * maps["pmask"][None])),
         "the region the attention may repaint"),
        ("garment (reference) + its mask", _tile(maps["garment"] * (0.45 + 0.55 * maps["gmask"][None])),
         "only tokens inside the mask can be read"),
        ("flow: where each pixel reads", flow_tile,
         "colour = place on the garment (inset: legend)"),
        ("garment warped by the attention", _tile(warped_on_person),
         "the flow applied to the garment photo"),
        ("reliance on the garment", _tile(maps["mass"]),
         f"median {n['reliance_on']:.3f}: this pattern reads only the garment (person keys neutral); "
         "on a real run, dark = painted from the person's own context"),
        (f"end-point error vs MLS (white = {EPE_SCALE_PX:g} px)", _tile(maps["epe"] / EPE_SCALE_PX),
         f"on the garment: median {n['on_median']:.1f} px, p95 {n['on_p95']:.1f} px; off it "
         f"({100 * n['off_share']:.0f} % of the mask): median {n['off_median']:.0f} px"),
    ]
    title_h, foot_h = 24, 36
    out = Image.new("RGB", (3 * TILE, 2 * (TILE + title_h + foot_h)), (24, 24, 24))
    draw = ImageDraw.Draw(out)
    big, small = _font(15), _font(12)
    for i, (title, im, foot) in enumerate(panels):
        x, y = (i % 3) * TILE, (i // 3) * (TILE + title_h + foot_h)
        draw.text((x + 6, y + 4), title, fill=(235, 235, 235), font=big)
        out.paste(im, (x, y + title_h))
        words, line, lines = foot.split(), "", []
        for w in words:  # wrap the caption to the tile width
            trial = f"{line} {w}".strip()
            if draw.textlength(trial, font=small) > TILE - 12 and line:
                lines.append(line)
                line = w
            else:
                line = trial
        lines.append(line)
        for j, text in enumerate(lines[:2]):
            draw.text((x + 6, y + title_h + TILE + 3 + 15 * j), text, fill=(200, 200, 200), font=small)
    return out


def main(out: str | Path = DEFAULT_OUT) -> dict:
    maps = compute()
    n = maps["numbers"]
    print(f"end-point error vs the MLS warp (px, at {SIZE} px; the token grid is {SIZE // TOK} px):")
    print(f"  where the warp lands on the garment: median {n['on_median']:.2f}, p95 {n['on_p95']:.2f}")
    print(f"  where it lands off the garment ({100 * n['off_share']:.1f} % of the try-on mask): median "
          f"{n['off_median']:.2f} (the attention stops at the garment's edge: tokens outside its mask get no weight)")
    sheet(maps).save(out, quality=90)
    print("wrote", out)
    return n


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else DEFAULT_OUT)
