"""Picture of the Leffa flow views on a KNOWN attention pattern (no model weights needed).

The sample garment and person from ``tools/samples`` and their control points give an MLS warp
(``warping.mls``). Reference keys and target queries are built as Fourier features of token positions so
that each target token inside the mask attends, sharply, to the reference tokens around the position the
MLS warp sends it to. ``attention.flow`` then recovers that warp from queries and keys alone, never
materialising the attention map. The sheet shows what each Flow View map means:
person + mask, garment, flow colour wheel, attention-warped garment, reliance and the end-point error
against the MLS warp (near zero, since the attention was built from it).

    python tools/flow_view_example.py docs/flow_view_example.jpg
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parent))
from pack_import import import_pack  # noqa: E402

import_pack()
from max4zero.attention import flow as fl  # noqa: E402
from max4zero.warping import masks, mls  # noqa: E402

SAMPLES = Path(__file__).resolve().parent / "samples"
INPUTS = Path(__file__).resolve().parents[1] / "example_inputs"
SIZE = 256  # image side; tokens are 1/8 of it, like SD's 1/8 grid
TOK = SIZE // 8
TILE = 256


def _image(name: str, mask: bool = False) -> torch.Tensor:
    im = Image.open(INPUTS / f"max4zero_{name}").convert("L" if mask else "RGB").resize((SIZE, SIZE), Image.BILINEAR)
    a = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)
    return (a > 0.5).float() if mask else a.permute(2, 0, 1)


def _fourier(xy: torch.Tensor, n_freq: int = 16) -> torch.Tensor:
    """[N, 2] positions in [-1, 1] → [N, 4·n_freq] features whose dot product peaks at equal positions."""
    freqs = math.pi * torch.linspace(0.5, 6.0, n_freq)
    ang = xy[:, :, None] * freqs  # [N, 2, F]
    return torch.cat([ang.sin(), ang.cos()], -1).flatten(1)


def main(out: str) -> None:
    pts = json.loads((SAMPLES / "points.json").read_text())  # the one control-point format, sizes [h, w]
    ref_h, ref_w = pts.get("reference_size", [SIZE, SIZE])
    tgt_h, tgt_w = pts.get("target_size", [SIZE, SIZE])
    ref_pts = torch.tensor([p["reference"] for p in pts["points"]], dtype=torch.float64) * torch.tensor(
        [SIZE / ref_w, SIZE / ref_h])
    tgt_pts = torch.tensor([p["target"] for p in pts["points"]], dtype=torch.float64) * torch.tensor(
        [SIZE / tgt_w, SIZE / tgt_h])
    person, garment = _image("person.png"), _image("garment.png")
    pmask, gmask = _image("person_mask.png", True), _image("garment_mask.png", True)

    # The known answer: MLS backward map at token resolution, as a flow in [-1, 1].
    bmap = mls.backward_map(tgt_pts, ref_pts, SIZE, SIZE, kind="affine", alpha=1.0, stride=1)
    mls_flow = fl.pixel_map_to_flow(bmap, (SIZE, SIZE))
    mls_tok = fl.resize_flow(mls_flow[None], TOK)[0]  # [TOK, TOK, 2]

    # Attention that encodes it: keys at reference token positions, queries at their MLS targets.
    k_ref = _fourier(fl.identity_flow(TOK).reshape(-1, 2))[None]  # [1, T_ref, D]
    q = _fourier(mls_tok.reshape(-1, 2))[None] * 3.0  # sharper softmax
    ref_keys = masks.resize_to_grid(gmask[None], TOK)[0].reshape(1, -1).bool()
    query_mask = masks.resize_to_grid(pmask[None], TOK)[0].reshape(1, -1).bool()
    k_tgt = torch.zeros_like(q) - 1.0  # target keys far from every query: reliance comes from the garment
    stats = fl.reference_flow_from_qk(q, k_ref, ref_keys, heads=1, ref_hw=TOK, k_tgt=k_tgt)
    flow = stats.flow.reshape(TOK, TOK, 2)
    inside = query_mask.reshape(TOK, TOK)
    mass = stats.mass.reshape(TOK, TOK) * inside
    flow = torch.where(inside[..., None], flow, fl.identity_flow(TOK))

    color = fl.flow_to_color(flow, "absolute", brightness=inside.float())
    warped = fl.warp_by_flow(garment[None], flow, size=SIZE)[0]
    epe = fl.end_point_error(flow, mls_tok, size=SIZE, pixel_size=(SIZE, SIZE)) * masks.resize_to_grid(
        pmask[None], SIZE)[0]
    print(f"end-point error inside the mask vs the MLS warp: median "
          f"{epe[pmask > 0].median():.2f} px, p95 {epe[pmask > 0].quantile(0.95):.2f} px (of {SIZE})")

    def tile(x: torch.Tensor) -> Image.Image:
        x = x.detach().float()
        if x.dim() == 2:
            x = x[None].expand(3, -1, -1)
        if x.shape[0] == 3:
            x = x.permute(1, 2, 0)
        arr = (x.clamp(0, 1).numpy() * 255).astype(np.uint8)
        return Image.fromarray(arr).resize((TILE, TILE), Image.NEAREST)

    warped_on_person = torch.where(pmask[None] > 0, warped, person * 0.35)
    tiles = [
        ("person + try-on mask", tile(person * (0.45 + 0.55 * pmask[None]))),
        ("garment (reference)", tile(garment * (0.45 + 0.55 * gmask[None]))),
        ("flow (absolute; hue = direction)", tile(color)),
        ("garment warped by the attention", tile(warped_on_person)),
        ("reliance on the garment", tile(mass)),
        ("end-point error vs MLS (white = 8 px)", tile(epe / 8.0)),
    ]
    sheet = Image.new("RGB", (3 * TILE, 2 * (TILE + 20)), (24, 24, 24))
    draw = ImageDraw.Draw(sheet)
    for i, (title, im) in enumerate(tiles):
        x, y = (i % 3) * TILE, (i // 3) * (TILE + 20)
        draw.text((x + 6, y + 4), title, fill=(235, 235, 235))
        sheet.paste(im, (x, y + 20))
    sheet.save(out, quality=88)
    print("wrote", out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "flow_view_example.jpg")
