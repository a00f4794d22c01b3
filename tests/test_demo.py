"""The README's first command: tools/registration_demo.py on the shipped samples (small size, fast)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import registration_demo as demo  # tools/ is on sys.path (tests/conftest.py)
from max4zero.warping import masks

SIZE = 96
SAMPLE_FILES = [demo.SAMPLES / n for n in ("person.png", "person_mask.png", "garment.png", "garment_mask.png", "points.json")]


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
    assert sorted(p.name for p in sample_run.iterdir()) == sorted(demo.OUTPUTS.values())


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


def test_rejects_points_with_mismatched_counts(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    doc = json.loads(SAMPLE_FILES[4].read_text())
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
    doc = json.loads(SAMPLE_FILES[4].read_text())
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
