"""Issue 17: one mask normaliser, one set of thresholds and messages, one batch rule (normal suite).

Every place that reads a mask (the nodes' ``convert.mask_to_bhw``, the morphology in ``tensors/masks.py``, the unusable
and inverted detectors, the diffusers adapter) goes through ``tensors/masks.py: mask_layout`` and the same "soft" and
"empty" thresholds; every batch check through ``tensors/shapes.py: batch_problem``.
"""

from __future__ import annotations

import pytest
import torch

from max4zero.nodes import convert as cv
from max4zero.registration import crop as geo
from max4zero.registration import recipe
from max4zero.tensors import masks as M
from max4zero.tensors.shapes import batch_problem, common_batch

# every reader of a mask, as ``reader(mask, name)``; each must accept the same layouts and refuse the same inputs
READERS = {
    "mask_to_bhw": lambda m, name: cv.mask_to_bhw(m, "MaX4Zero X", name),
    "to_bool": lambda m, name: M.to_bool(m),
    "dilate": lambda m, name: M.dilate(m, 3),
    "resize_to_grid": lambda m, name: M.resize_to_grid(m, (2, 2)),
    "unusable_mask_problem": lambda m, name: M.unusable_mask_problem(m, [(2, 2)], name),
    "inverted_mask_problem": lambda m, name: M.inverted_mask_problem(m, name),
    "binary_mask": lambda m, name: M.binary_mask(m, name),
}


def _diffusers_reader():
    pytest.importorskip("diffusers")
    from max4zero.adapters.diffusers_processor import _mask_bool

    return _mask_bool


@pytest.mark.parametrize("reader", list(READERS) + ["diffusers"])
def test_every_reader_takes_the_same_layouts(reader):
    read = _diffusers_reader() if reader == "diffusers" else READERS[reader]
    m = torch.zeros(8, 8)
    m[2:6, 2:6] = 1
    for layout in (m, m[None], m[None, None], m[None].expand(2, -1, -1)):
        read(layout, "target_mask")


@pytest.mark.parametrize("reader", list(READERS) + ["diffusers"])
@pytest.mark.parametrize("bad, needle", [
    (torch.zeros(1, 8, 8, 3), "has shape (1, 8, 8, 3), which is an IMAGE, not a MASK"),
    (torch.zeros(8), "has shape (8,), expected a MASK [batch, height, width]"),
    (torch.full((8, 8), float("nan")), "contains NaN values"),
])
def test_every_reader_refuses_the_same_inputs_with_the_same_words(reader, bad, needle):
    read = _diffusers_reader() if reader == "diffusers" else READERS[reader]
    with pytest.raises(ValueError) as e:
        read(bad, "target_mask")
    assert needle in str(e.value)


def test_one_threshold_for_empty_and_soft():
    at = torch.full((1, 8, 8), M.EMPTY_BELOW - 1e-3)  # float32: 0.05 itself rounds to just above 0.05
    above = torch.full((1, 8, 8), M.EMPTY_BELOW + 0.01)
    on = torch.full((1, 8, 8), M.ON_ABOVE + 0.01)
    assert M.soft_mask_problem(at) is None and M.unusable_mask_problem(at) is None  # empty, not soft
    assert cv.mask_to_bhw(at, "N", "m").max() == pytest.approx(M.EMPTY_BELOW - 1e-3)
    assert M.soft_mask_problem(above) is not None
    assert M.soft_mask_problem(torch.full((1, 8, 8), M.ON_ABOVE)) is not None  # on means ABOVE 0.5
    assert M.soft_mask_problem(on) is None
    # the node check, the MEA detector and the normaliser say the same words about a soft mask
    soft = torch.full((1, 8, 8), 0.45)
    words = "m is soft: no pixel above 0.5 (its largest value is 0.45)"
    with pytest.raises(cv.NodeInputError) as e:
        cv.mask_to_bhw(soft, "N", "m")
    assert str(e.value).startswith(f"N: {words}") and "ThresholdMask" in str(e.value)
    assert M.unusable_mask_problem(soft, [], "m").startswith(words)
    with pytest.raises(M.MaskError, match=r"m is soft: no pixel above 0\.5"):
        M.binary_mask(soft, "m")
    # an empty input that must select something: "empty", never "soft"
    with pytest.raises(cv.NodeInputError, match=r"m is empty \(no pixel above 0.5\)"):
        cv.check_nonempty("N", "m", torch.zeros(1, 8, 8))


def test_a_soft_batch_item_is_refused_even_next_to_a_hard_one():
    m = torch.zeros(2, 8, 8)
    m[0, 2:6, 2:6] = 1.0
    m[1] = 0.45
    with pytest.raises(cv.NodeInputError, match=r"m \(batch item 1\) is soft"):
        cv.mask_to_bhw(m, "N", "m")
    m[1] = 0.0  # an empty item is the "zero mask = no effect" contract, not a problem
    assert cv.mask_to_bhw(m, "N", "m").shape == (2, 8, 8)


def test_vanishing_after_the_erosion_is_one_sentence():
    line = torch.zeros(1, 8, 8)
    line[0, 4, 1:7] = 1.0
    problem, fix = M.eroded_away_problem("garment_mask", M.GARMENT_EROSION)
    assert M.unusable_mask_problem(line, [], "garment_mask", erode_kernel=M.GARMENT_EROSION) == M.sentence(problem, fix)
    assert not bool(recipe.eroded_garment_mask(line).any())


def test_one_batch_rule():
    assert batch_problem({"a": 1, "b": 3, "c": 3}) is None and common_batch({"a": 1, "b": 3}) == 3
    assert common_batch({"a": 1}) == 1
    assert batch_problem({"a": 2, "b": 3})[0] == "batch sizes differ (a has 2, b has 3)"
    # a fixed side (the latent being sampled) is never the shared one
    assert batch_problem({"mask": 3, "latent": 1}) is None
    assert batch_problem({"mask": 3, "latent": 1}, fixed="latent")[0] == "batch sizes differ (mask has 3, latent has 1)"
    # every batch check of the pack says it in these words
    with pytest.raises(cv.NodeInputError, match=r"batch sizes differ \(a has 2, b has 3\)"):
        cv.broadcast_batch("N", a=torch.zeros(2, 1), b=torch.zeros(3, 1))
    assert cv.mask_latent_problem((3, 64, 64), (1, 4, 8, 8)).startswith(
        "batch sizes differ (target_mask has 3, the latent being sampled has 1)")
    img = torch.rand(2, 3, 16, 16)
    info = geo.CropInfo((16, 16), (0, 0, 16, 16), 16, fingerprint=geo.fingerprint(img))
    assert geo.fingerprint_problem(info, torch.rand(3, 3, 16, 16)).startswith("batch sizes differ (original_image has 3")


def test_the_vae_ratio_is_asked_from_the_vae():
    class Vae:
        def __init__(self, r):
            self.r = r

        def spacial_compression_encode(self):
            return self.r

    assert cv.vae_ratio(Vae(16)) == 16 and cv.vae_ratio(Vae(8)) == 8
    assert cv.vae_ratio(object()) == 8 and cv.vae_ratio(Vae((4, 8))) == 8 and cv.vae_ratio(Vae(0)) == 8
