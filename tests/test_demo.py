"""The README's first command: tools/registration_demo.py on the shipped samples (small size, fast)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import registration_demo as demo  # tools/ is on sys.path (tests/conftest.py)
from max4zero.tensors import masks

SIZE = 96
SAMPLE_FILES = list(demo.SAMPLE_FILES)
ALL_OUTPUTS = sorted([*demo.OUTPUTS.values(), *demo.POINT_OUTPUTS.values()])


def _argv(out: Path, points: Path | None = None, *extra: str) -> list[str]:
    person, person_mask, garment, garment_mask, sample_points = SAMPLE_FILES
    return [
        "--person", str(person), "--person-mask", str(person_mask), "--garment", str(garment),
        "--garment-mask", str(garment_mask), "--points", str(points or sample_points),
        "--out", str(out), "--size", str(SIZE), *extra,
    ]


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    assert demo.main(_argv(out)) == 0
    return out


def test_writes_every_picture_at_the_working_size(sample_run: Path) -> None:
    for name in demo.OUTPUTS.values():
        path = sample_run / name
        assert path.is_file(), f"{name} missing"
        with Image.open(path) as image:
            if name == "overview.png":
                # 2×2 sheet of working-size panels plus title bands.
                assert image.width == 2 * SIZE and image.height > 2 * SIZE
            else:
                assert image.size == (SIZE, SIZE), name
    assert sorted(p.name for p in sample_run.iterdir()) == ALL_OUTPUTS


def test_composite_changes_the_person_only_inside_the_dilated_mask(sample_run: Path) -> None:
    person, size = demo.load_image(SAMPLE_FILES[0], SIZE)
    target = masks.dilate(demo.load_mask(SAMPLE_FILES[1], size, SIZE, "person mask"), demo._odd(13, SIZE)).numpy()
    person_px = np.asarray(person, dtype=np.int16)
    composite = np.asarray(Image.open(sample_run / "composite.png").convert("RGB"), dtype=np.int16)
    warped = np.asarray(Image.open(sample_run / "warped_garment.png").convert("RGB"), dtype=np.int16)
    warped_on = np.asarray(Image.open(sample_run / "warped_garment_mask.png")) > 127

    changed = (composite != person_px).any(axis=-1)
    assert not changed[~target].any(), "the composite touched pixels outside the (dilated) person mask"
    # The garment landed on the torso: most of the mask now shows the warped garment, pixel for pixel.
    inside = warped_on & target
    assert inside.sum() > 0.4 * target.sum()
    assert (composite[inside] == warped[inside]).all()
    assert changed[inside].mean() > 0.9
    # What the garment does not cover is the thin fringe, and it is untouched.
    thin = np.asarray(Image.open(sample_run / "fringe_thin.png")) > 127
    np.testing.assert_array_equal(thin, target & ~warped_on)
    assert (composite[thin] == person_px[thin]).all()
    dilated = np.asarray(Image.open(sample_run / "fringe_dilated.png")) > 127
    assert (dilated >= thin).all() and not dilated[~target].any() and dilated.sum() > thin.sum()


def test_refuses_a_non_empty_user_folder_without_force(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert demo.main(_argv(out)) == 2
    assert "--force" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    with pytest.raises(ValueError, match="not empty"):
        demo.run(*SAMPLE_FILES, out=out, size=SIZE)

    assert demo.main(_argv(out, None, "--force")) == 0
    assert (out / "keep.txt").read_text() == "user data"  # --force replaces only the demo's own names
    assert (out / "composite.png").is_file()


def test_never_overwrites_an_input(tmp_path: Path) -> None:
    own = tmp_path / "composite.png"
    Image.open(SAMPLE_FILES[0]).save(own)
    with pytest.raises(ValueError, match="would be overwritten"):
        demo.run(own, *SAMPLE_FILES[1:], out=tmp_path, size=SIZE, force=True)


def _old_format(doc: dict) -> dict:
    """The shipped points in the demo's earlier format (two lists, sizes [W, H])."""
    return {"reference": [p["reference"] for p in doc["points"]], "target": [p["target"] for p in doc["points"]],
            "reference_size": doc["reference_size"][::-1], "target_size": doc["target_size"][::-1],
            "labels": [p["label"] for p in doc["points"]]}


def test_rejects_points_with_mismatched_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = _old_format(json.loads(SAMPLE_FILES[4].read_text()))
    doc["target"] = doc["target"][:-1]
    doc.pop("labels")
    bad = tmp_path / "points.json"
    bad.write_text(json.dumps(doc))
    k = len(doc["reference"])
    with pytest.raises(ValueError, match=f"{k} reference points but {k - 1} target points"):
        demo.run(*SAMPLE_FILES[:4], bad, out=tmp_path / "out", size=SIZE)
    assert demo.main(_argv(tmp_path / "out2", bad)) == 2
    assert "same number of points" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_points_are_scaled_from_their_declared_size(tmp_path: Path) -> None:
    doc = _old_format(json.loads(SAMPLE_FILES[4].read_text()))
    points = demo.load_points(SAMPLE_FILES[4], (512, 512), (512, 512), (SIZE, SIZE), (SIZE, SIZE))
    # Pixel centres: x' = (x + 0.5) * SIZE / 512 - 0.5.
    expected = (np.asarray(doc["target"], dtype=np.float64) + 0.5) * SIZE / 512 - 0.5
    np.testing.assert_allclose(points.target, expected)
    doc["reference"][0] = [600, 10]
    outside = tmp_path / "points.json"
    outside.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match="outside the 512x512 image"):
        demo.load_points(outside, (512, 512), (512, 512), (SIZE, SIZE), (SIZE, SIZE))


def test_grid_lines_follow_the_map() -> None:
    # Identity map, spacing 4 on 8 px: the level lines x = 4 and y = 4 sit on column/row 3 (cell 0 → 1).
    x_lines, y_lines = demo.grid_lines(demo._identity(8, 8), 4.0)
    assert x_lines[:, 3].all() and x_lines.sum() == 8
    assert y_lines[3, :].all() and y_lines.sum() == 8
    # A map that doubles x has twice as many vertical lines.
    doubled = demo._identity(8, 8) * torch.tensor([2.0, 1.0])
    assert demo.grid_lines(doubled, 4.0)[0].sum() == 24  # columns 1, 3, 5


def test_partial_inputs_are_rejected(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert demo.main(["--person", str(SAMPLE_FILES[0]), "--out", str(tmp_path / "o")]) == 2
    assert "missing --person-mask" in capsys.readouterr().err


# --- inputs that used to give silently wrong output ------------------------------------------------------------


def _sample_mask() -> np.ndarray:
    return np.asarray(Image.open(SAMPLE_FILES[1]).convert("L"))


def test_an_opaque_rgba_mask_is_read_from_its_colour(tmp_path: Path) -> None:
    """White shape on black, alpha 255 everywhere: the alpha carries no shape, so it must not win."""
    grey = _sample_mask()
    rgba = np.dstack([grey, grey, grey, np.full_like(grey, 255)])
    path = tmp_path / "opaque.png"
    Image.fromarray(rgba, "RGBA").save(path)
    want = demo.load_mask(SAMPLE_FILES[1], (512, 512), SIZE, "person mask")
    got = demo.load_mask(path, (512, 512), SIZE, "person mask")
    assert torch.equal(got, want)
    assert got.float().mean() < 0.6  # not the whole image
    # Fully transparent everywhere carries no shape either.
    rgba[..., 3] = 0
    Image.fromarray(rgba, "RGBA").save(path)
    assert torch.equal(demo.load_mask(path, (512, 512), SIZE, "person mask"), want)


def test_a_mask_with_a_shape_in_its_alpha_is_read_as_comfyui_reads_it(tmp_path: Path) -> None:
    """1 − alpha, like Load Image's MASK output: the transparent pixels are the mask (what MaskEditor paints)."""
    grey = _sample_mask()
    rgba = np.dstack([np.full_like(grey, 200)] * 3 + [255 - grey])  # the region transparent, as MaskEditor saves
    path = tmp_path / "painted.png"
    Image.fromarray(rgba, "RGBA").save(path)
    want = demo.load_mask(SAMPLE_FILES[1], (512, 512), SIZE, "person mask")
    assert torch.equal(demo.load_mask(path, (512, 512), SIZE, "person mask"), want)


def test_a_cut_out_mask_is_read_inverted_and_the_demo_warns_as_the_nodes_do(tmp_path: Path) -> None:
    """A cut-out (the garment opaque) gives ComfyUI's MASK the background; the demo reads the same and says so with
    the nodes' own message (tensors/masks.py: inverted_mask_problem)."""
    from max4zero.tensors import masks

    grey = np.asarray(Image.open(SAMPLE_FILES[3]).convert("L"))  # the garment mask, white on black
    cut = tmp_path / "cutout.png"
    Image.fromarray(np.dstack([np.full_like(grey, 200)] * 3 + [grey]), "RGBA").save(cut)
    want = demo.load_mask(SAMPLE_FILES[3], (512, 512), SIZE, "garment mask")
    assert (demo.load_mask(cut, (512, 512), SIZE, "garment mask") != ~want).float().mean() < 0.02  # edges aside
    warnings: list[str] = []
    demo.run(SAMPLE_FILES[0], SAMPLE_FILES[1], SAMPLE_FILES[2], cut, SAMPLE_FILES[4], tmp_path / "out", size=SIZE,
             warn=warnings.append)
    inverted = [w for w in warnings if "looks inverted" in w and "garment mask" in w]
    assert inverted, warnings
    core = masks.inverted_mask_problem(torch.from_numpy(np.asarray(demo.mask_channel(Image.open(cut))) > 127)
                                       .float()[None], "garment mask")
    assert core and inverted[0].startswith(core)
    # the sample masks (white on black) give no such warning
    warnings.clear()
    demo.run(*SAMPLE_FILES[:5], tmp_path / "out2", size=SIZE, warn=warnings.append)
    assert not [w for w in warnings if "inverted" in w]


def test_a_16_bit_greyscale_photo_and_mask_are_scaled_not_clipped(tmp_path: Path) -> None:
    grey8 = np.asarray(Image.open(SAMPLE_FILES[0]).convert("L"))
    path = tmp_path / "photo16.png"
    Image.fromarray(grey8.astype(np.uint16) * 257).save(path)  # 16-bit greyscale, same picture
    with Image.open(path) as im:
        assert im.mode.startswith("I")
    got, size = demo.load_image(path, 512)
    want, _ = demo.load_image(SAMPLE_FILES[0], 512)
    got_px = np.asarray(got, dtype=np.int16)
    assert size == (512, 512)
    assert (got_px == 255).mean() < 0.05  # clipping turned 89 % of the pixels white
    np.testing.assert_array_equal(got_px[..., 0], np.asarray(want.convert("L"), dtype=np.int16))
    mask16 = tmp_path / "mask16.png"
    Image.fromarray((_sample_mask().astype(np.uint32) * 257 * 3 // 4).astype(np.uint16)).save(mask16)  # white = 75 % grey: "on"
    half = demo.load_mask(mask16, (512, 512), SIZE, "person mask")
    assert half.any() and half.float().mean() < 0.6
    dark = tmp_path / "dark16.png"
    Image.fromarray(np.full((512, 512), 20000, np.uint16)).save(dark)  # 30 % grey: off, not clipped to white
    with pytest.raises(ValueError, match="is empty"):
        demo.load_mask(dark, (512, 512), SIZE, "person mask")


# --- control points: one format, and warnings for degenerate sets ----------------------------------------------


def test_writes_the_points_in_the_one_format_that_the_node_reads(sample_run: Path) -> None:
    from max4zero.registration.matches import Matches

    shipped = json.loads(SAMPLE_FILES[4].read_text())
    written = json.loads((sample_run / "points.json").read_text())
    assert written == shipped  # the shipped file is already in the one format, and round-trips unchanged
    m = Matches.from_json((sample_run / "points.json").read_text())
    assert len(m) == len(shipped["points"]) and m.reference_size == (512, 512)
    crop = Matches.from_json((sample_run / "manual_points_crop512.json").read_text())
    assert crop.reference_size == crop.target_size == (512, 512)


def test_crop_points_land_where_crop_to_mask_puts_those_pixels(sample_run: Path) -> None:
    """A marker drawn at a target point on the full photo, cropped as Crop To Mask does, sits at the crop point."""
    from max4zero.registration import crop as geometry

    doc = json.loads(SAMPLE_FILES[4].read_text())
    crop = json.loads((sample_run / "manual_points_crop512.json").read_text())
    mask = torch.from_numpy(_sample_mask() > 127).float()
    info = geometry.CropInfo((512, 512), geometry.square_box(mask, 0.1), 512)
    for i in (0, 5, 13):
        x, y = doc["points"][i]["target"]
        marker = torch.zeros(1, 1, 512, 512)
        marker[..., y - 1:y + 2, x - 1:x + 2] = 1.0
        cropped = geometry.crop(marker, info, "bilinear")[0, 0]
        cy, cx = divmod(int(cropped.argmax()), cropped.shape[1])
        tx, ty = crop["points"][i]["target"]
        assert abs(cx - tx) <= 2 and abs(cy - ty) <= 2, (i, (cx, cy), (tx, ty))


def test_the_earlier_demo_format_is_read_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps(_old_format(json.loads(SAMPLE_FILES[4].read_text()))))
    assert demo.main(_argv(tmp_path / "out", old)) == 0
    assert "earlier points format" in capsys.readouterr().err
    assert json.loads((tmp_path / "out" / "points.json").read_text()) == json.loads(SAMPLE_FILES[4].read_text())


def test_a_node_style_file_with_non_square_sizes_uses_height_width(tmp_path: Path) -> None:
    doc = {"format": "max4zero-matches/1", "reference_size": [256, 512], "target_size": [512, 512],
           "points": [{"reference": [500, 250], "target": [10, 10]}]}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    pts = demo.load_points(path, (1024, 512), (512, 512), (1024, 512), (512, 512))
    np.testing.assert_allclose(pts.file_reference, [[(500 + 0.5) * 2 - 0.5, (250 + 0.5) * 2 - 0.5]])
    doc["reference"] = "x"
    doc.pop("points")
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match='"points" list'):
        demo.load_points(path, (512, 512), (512, 512), (SIZE, SIZE), (SIZE, SIZE))


def _points_file(tmp_path: Path, pairs: list[tuple[list[float], list[float]]]) -> Path:
    path = tmp_path / "pts.json"
    path.write_text(json.dumps({"format": "max4zero-matches/1", "reference_size": [512, 512], "target_size": [512, 512],
                                "points": [{"reference": a, "target": b} for a, b in pairs]}))
    return path


def _pairs(indices) -> list[tuple[list[float], list[float]]]:
    doc = json.loads(SAMPLE_FILES[4].read_text())
    return [(doc["points"][i]["reference"], doc["points"][i]["target"]) for i in indices]


@pytest.mark.parametrize("case, expect", [
    ("one", "only one distinct"),
    ("two", "only two distinct"),
    ("collinear", "lie on one line"),
    ("duplicate", "are the same garment pixel"),
    ("swapped", "turns the garment over"),
])
def test_degenerate_points_are_named_and_the_run_still_finishes(case, expect, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    pairs = {
        "one": _pairs([10]),
        "two": _pairs([3, 4]),
        "collinear": [([100, 100], [120, 200]), ([200, 200], [220, 300]), ([300, 300], [320, 400])],
        "duplicate": _pairs(range(14)) + [(_pairs([0])[0][0], [240, 220])],
        "swapped": _pairs([0, 1, 2, 4, 3, 5, 6, 7, 8, 9, 10, 11, 12, 13]),
    }[case]
    if case == "swapped":  # shoulders swapped on the target side only
        pairs = [(a, b) for (a, _), (_, b) in zip(_pairs(range(14)), pairs)]
    assert demo.main(_argv(tmp_path / "out", _points_file(tmp_path, pairs))) == 0
    err = capsys.readouterr().err
    assert expect in err and err.count("warning:") >= 1, err
    assert (tmp_path / "out" / "mls_grid.png").is_file()


def test_good_points_give_no_warning(sample_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert demo.main(_argv(tmp_path / "out")) == 0
    assert "warning" not in capsys.readouterr().err


def test_progress_lines_on_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    demo.run(*SAMPLE_FILES, out=tmp_path / "out", size=SIZE, progress=True)
    err = capsys.readouterr().err
    assert "MLS map" in err and "100 %" in err and "done" in err
    demo.run(*SAMPLE_FILES, out=tmp_path / "out2", size=SIZE)  # small: silent by default
    assert capsys.readouterr().err == ""


def test_help_answers_before_torch_is_imported() -> None:
    code = (
        "import runpy, sys\n"
        "sys.argv = ['registration_demo.py', '--help']\n"
        "try:\n    runpy.run_path(sys.argv[0] if False else %r, run_name='__main__')\n"
        "except SystemExit:\n    pass\n"
        "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')\n"
    ) % str(Path(demo.__file__))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "max4zero-matches/1" in out.stdout  # the help shows the points format
    assert out.stdout.strip().endswith("NO TORCH"), out.stdout[-500:] + out.stderr[-2000:]
