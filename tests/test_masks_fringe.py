"""Tests for tensors.masks and warping.fringe on small hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from max4zero.warping import fringe as fringe_module
from max4zero.warping.fringe import clear_latent_cells, composite, fringe_masks, latent_fringe_mask
from max4zero.tensors.masks import bbox, dilate, erode, resize_to_grid, to_bool


def grid(rows: list[str]) -> torch.Tensor:
    """'#' = on, '.' = off → bool [H, W]."""
    return torch.tensor([[c == "#" for c in r] for r in rows])


# ---------------------------------------------------------------- masks


def test_resize_nearest_picks_top_left_of_each_cell():
    m = torch.zeros(4, 6)
    m[0, 0] = m[2, 4] = m[1, 1] = 1.0
    out = resize_to_grid(m, (2, 3))
    assert out.dtype == torch.float32 and out.shape == (2, 3)
    assert out.tolist() == [[1, 0, 0], [0, 0, 1]]


def test_resize_keep_thin_keeps_straps():
    m = torch.zeros(1, 32, 48, dtype=torch.bool)
    m[0, 5, :] = True  # a 1-px horizontal strap
    m[0, :, 29] = True  # a 1-px vertical strap
    nearest = resize_to_grid(m, (4, 6))
    thin = resize_to_grid(m, (4, 6), keep_thin=True)
    assert nearest.dtype == torch.bool and nearest.shape == (1, 4, 6)
    assert not nearest.any()
    expected = torch.zeros(1, 4, 6, dtype=torch.bool)
    expected[0, 0, :] = True
    expected[0, :, 3] = True
    assert torch.equal(thin, expected)
    # superset of nearest on a generic mask; upsampling works too
    g = torch.Generator().manual_seed(0)
    r = torch.rand(2, 1, 30, 20, generator=g) > 0.8
    assert (resize_to_grid(r, 7, keep_thin=True) >= resize_to_grid(r, 7)).all()
    assert resize_to_grid(r, (60, 40)).shape == (2, 1, 60, 40)


def test_layout_and_dtype_rule():
    m = torch.zeros(2, 1, 9, 7, dtype=torch.float16)
    m[:, :, 4, 3] = 0.6  # soft value above 0.5 → on
    d = dilate(m, 3)
    assert d.shape == m.shape and d.dtype == torch.float16
    assert set(d.unique().tolist()) == {0.0, 1.0} and d.sum().item() == 2 * 9
    assert dilate(m[:, 0].to(torch.bfloat16), 3).dtype == torch.bfloat16
    u8 = (m[0, 0] > 0).to(torch.uint8) * 255
    assert dilate(u8, 3).dtype == torch.uint8 and dilate(u8, 3).sum().item() == 9
    assert to_bool(m).dtype == torch.bool and to_bool(m).shape == m.shape
    with pytest.raises(ValueError, match="multi-channel"):
        dilate(torch.zeros(1, 3, 4, 4), 3)


def test_dilate_hand_cases():
    m = grid([".....", ".....", "..#..", ".....", "....."])
    assert torch.equal(dilate(m, 3), grid([".....", ".###.", ".###.", ".###.", "....."]))
    assert dilate(m, 5).all()
    assert torch.equal(dilate(m, 1), m)
    big = torch.zeros(31, 40, dtype=torch.bool)
    big[15, 20] = True
    d = dilate(big, 13)
    assert d.sum().item() == 169 and d[9:22, 14:27].all()
    corner = torch.zeros(10, 10, dtype=torch.bool)
    corner[0, 0] = True
    assert dilate(corner, 19).sum().item() == 100


def test_erode_hand_cases():
    m = grid([".......", ".#####.", ".#####.", ".#####.", ".#####.", "......."])
    assert torch.equal(erode(m, 3), grid([".......", ".......", "..###..", "..###..", ".......", "......."]))
    # the image border does not eat into the mask
    full = torch.ones(5, 6, dtype=torch.bool)
    assert erode(full, 3).all()
    edge = grid(["###..", "###..", "###.."])
    assert torch.equal(erode(edge, 3), grid(["##...", "##...", "##..."]))
    # duality with dilation away from the border
    g = torch.Generator().manual_seed(1)
    r = torch.zeros(20, 20, dtype=torch.bool)
    r[3:17, 3:17] = torch.rand(14, 14, generator=g) > 0.3
    assert torch.equal(erode(r, 3), ~dilate(~r, 3))  # border pixels are off in r, so no border effect


def _maxpool_dilate(on: torch.Tensor, k: int) -> torch.Tensor:
    """The former implementation (square max-pool), kept as the reference the fast one must equal bit for bit."""
    import torch.nn.functional as F

    return F.max_pool2d(on.float(), kernel_size=k, stride=1, padding=k // 2) > 0.5


def _maxpool_erode(on: torch.Tensor, k: int) -> torch.Tensor:
    import torch.nn.functional as F

    return ~(F.max_pool2d((~on).float(), kernel_size=k, stride=1, padding=k // 2) > 0.5)


@pytest.mark.parametrize("shape", [(1, 1, 37, 53), (3, 1, 64, 29), (2, 1, 1, 17), (1, 1, 9, 1), (4, 1, 5, 5)])
@pytest.mark.parametrize("density", [0.02, 0.3, 0.9])
def test_dilate_and_erode_equal_the_max_pool_formulation(shape, density):
    """Separable running counts give exactly what the square max-pool gave, borders included, for every kernel
    from 1 to larger than the image (odd sizes, batches, sparse and dense masks)."""
    g = torch.Generator().manual_seed(hash((shape, density)) % 2**31)
    on = torch.rand(shape, generator=g) < density
    for k in (1, 3, 5, 7, 13, 19, 31, 75, 2 * max(shape[-2:]) + 1):
        if k == 1:
            want_d, want_e = on, on
        else:
            want_d, want_e = _maxpool_dilate(on, k), _maxpool_erode(on, k)
        assert torch.equal(dilate(on, k), want_d), (shape, density, k)
        assert torch.equal(erode(on, k), want_e), (shape, density, k)
    # Every layout and dtype gives the same pixels.
    float_mask = on.float()[:, 0]
    assert torch.equal(dilate(float_mask, 13), _maxpool_dilate(on, 13)[:, 0].float())
    assert torch.equal(erode(on[0, 0], 13), _maxpool_erode(on, 13)[0, 0])


def test_dilation_cost_does_not_grow_with_the_kernel():
    """A 101x101 dilation runs the same tensor operations on the same shapes as a 3x3 one (max_pool2d would do ~1000x
    more work). Counted, not timed: the operations each kernel size dispatches are recorded and compared (the
    measured times are bench/bench_masks.py's)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Record(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops: list[tuple[str, tuple]] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            shapes = tuple(tuple(o.shape) for o in (out if isinstance(out, (tuple, list)) else [out])
                           if isinstance(o, torch.Tensor))
            self.ops.append((str(func.overloadpacket.__name__), shapes))
            return out

    on = torch.rand(1, 1, 60, 60, generator=torch.Generator().manual_seed(3)) > 0.99
    runs = {}
    for k in (3, 101):
        with Record() as rec:
            dilate(on, k)
            erode(on, k)
        runs[k] = rec.ops
    assert not any("pool" in name or "conv" in name for name, _ in runs[101]), runs[101]
    assert runs[3] == runs[101]


def test_kernel_validation():
    m = torch.ones(4, 4)
    for k in (0, 2, 4, -3, 2.0, True):
        with pytest.raises(ValueError, match="odd"):
            dilate(m, k)
        with pytest.raises(ValueError, match="odd"):
            erode(m, k)


def test_bbox():
    m = torch.zeros(1, 20, 30)
    m[0, 5:8, 10:14] = 1
    assert bbox(m) == (10, 5, 14, 8)
    assert bbox(m, pad=2) == (8, 3, 16, 10)
    assert bbox(m, pad=0.5) == (8, 3, 16, 10)  # 0.5 × longer side 4 = 2 px
    assert bbox(m, pad=20) == (0, 0, 30, 20)  # clamped
    assert bbox(m, square=True) == (10, 5, 14, 9)
    assert bbox(m, pad=1, square=True) == (9, 4, 15, 10)
    near_edge = torch.zeros(10, 10)
    near_edge[0, 2:9] = 1
    assert bbox(near_edge, square=True) == (2, 0, 9, 7)  # shifted down, not clamped to 1 row
    batch = torch.zeros(2, 1, 10, 10, dtype=torch.bool)
    batch[0, 0, 1, 1] = batch[1, 0, 6, 8] = True
    assert bbox(batch) == (1, 1, 9, 7)  # union
    with pytest.raises(ValueError, match="empty"):
        bbox(torch.zeros(5, 5))
    with pytest.raises(ValueError, match="pad"):
        bbox(m, pad=-1)


# ---------------------------------------------------------------- fringe


def test_fringe_hand_case():
    target = grid(["......", ".####.", ".####.", ".####.", "......"]).float()
    warped = grid(["......", "..###.", "..###.", "#.....", "......"]).float()
    F, D = fringe_masks(target, warped, dilation=3)
    assert F.dtype == torch.float32 and F.shape == (5, 6)
    assert F.bool().tolist() == grid(["......", ".#....", ".#....", ".####.", "......"]).tolist()
    assert D.bool().tolist() == grid(["......", ".##...", ".####.", ".####.", "......"]).tolist()
    F1, D1 = fringe_masks(target, warped, dilation=1)
    assert torch.equal(F1, D1)


def test_fringe_default_19_non_square_batch_broadcast():
    H, W = 40, 64
    target = torch.zeros(3, 1, H, W, dtype=torch.bool)
    target[:, :, 5:35, 10:60] = True
    warped = torch.zeros(1, 1, H, W, dtype=torch.bool)  # batch 1: shared
    warped[..., 5:35, 10:40] = True
    F, D = fringe_masks(target, warped)
    assert F.shape == D.shape == (3, 1, H, W) and F.dtype == torch.bool
    expF = torch.zeros(H, W, dtype=torch.bool)
    expF[5:35, 40:60] = True
    expD = torch.zeros(H, W, dtype=torch.bool)
    expD[5:35, 31:60] = True  # grown 9 px left, clipped to the target elsewhere
    assert (F == expF).all() and (D == expD).all()
    assert (D >= F).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_fringe_low_precision(dtype):
    t = torch.zeros(2, 8, 12, dtype=dtype)
    t[:, 2:6, 2:10] = 1
    w = torch.zeros(2, 8, 12, dtype=dtype)
    w[:, 2:6, 2:6] = 1
    F, D = fringe_masks(t, w, dilation=3)
    assert F.dtype == D.dtype == dtype and F.shape == (2, 8, 12)
    assert F.sum().item() == 2 * 16 and D.sum().item() == 2 * 20


def test_fringe_errors():
    with pytest.raises(ValueError, match=r"\(4, 5\).*\(4, 6\)"):
        fringe_masks(torch.zeros(4, 5), torch.zeros(4, 6))
    with pytest.raises(ValueError, match="batch"):
        fringe_masks(torch.zeros(2, 4, 5), torch.zeros(3, 4, 5))
    with pytest.raises(ValueError, match="odd"):
        fringe_masks(torch.zeros(4, 5), torch.zeros(4, 5), dilation=18)


# ---------------------------------------------------------------- composite


def test_composite_hand_case():
    target = torch.zeros(1, 2, 3, 4)
    warped = torch.arange(24, dtype=torch.float32).reshape(1, 2, 3, 4) + 1
    tm = grid(["##..", "##..", "...."])
    wm = grid(["#.#.", "#...", "#..."]).float()
    out = composite(target, warped, wm, tm)
    keep = grid(["#...", "#...", "...."])
    assert torch.equal(out, torch.where(keep, warped, target))
    assert out[0, 1, 1, 0].item() == 17 and out[0, 0, 0, 2].item() == 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_composite_dtype_and_batch_broadcast(dtype):
    g = torch.Generator().manual_seed(0)
    target = torch.rand(3, 3, 6, 10, generator=g).to(dtype)
    warped = torch.rand(1, 3, 6, 10, generator=g)  # float32, batch 1: cast and broadcast
    tm = torch.rand(3, 6, 10, generator=g) > 0.5
    wm = (torch.rand(1, 1, 6, 10, generator=g) > 0.5).to(dtype)
    out = composite(target, warped, wm, tm)
    assert out.dtype == dtype and out.shape == (3, 3, 6, 10)
    keep = (tm & wm[:, 0].bool())[:, None]
    assert torch.equal(out, torch.where(keep, warped.to(dtype), target))


def test_composite_errors():
    img = torch.zeros(1, 3, 8, 8)
    m = torch.ones(8, 8)
    with pytest.raises(ValueError, match=r"\[B, H, W, C\]"):
        composite(torch.zeros(8, 8, 3), img, m, m)
    with pytest.raises(ValueError, match=r"\(1, 3, 8, 8\).*\(1, 3, 8, 9\)"):
        composite(img, torch.zeros(1, 3, 8, 9), m, m)
    with pytest.raises(ValueError, match=r"target_mask has shape \(7, 8\).*8x8"):
        composite(img, img, m, torch.ones(7, 8))
    with pytest.raises(ValueError, match="batch"):
        composite(torch.zeros(2, 3, 8, 8), torch.zeros(3, 3, 8, 8), m, m)


# ---------------------------------------------------------------- F on the latent grid (docs/method.md §3a)


def test_latent_fringe_mask_any_pixel_rule():
    F = torch.zeros(2, 16, 24)
    F[0, 9, 3] = 1  # one pixel: cell (1, 0)
    F[1, 0:8, 8:16] = 1  # a whole cell: (0, 1)
    F[1, 15, 23] = 1  # the last pixel: cell (1, 2)
    out = latent_fringe_mask(F, (2, 3))
    assert out.dtype == torch.float32 and out.shape == (2, 1, 2, 3)
    assert out[0, 0].tolist() == [[0, 0, 0], [1, 0, 0]]
    assert out[1, 0].tolist() == [[0, 1, 0], [0, 0, 1]]
    # every layout and dtype of a mask, the same answer; [H, W] gives batch 1
    for m in (F > 0.5, F[:, None], (F * 255).to(torch.uint8)):
        assert torch.equal(latent_fringe_mask(m, (2, 3)), out)
    assert torch.equal(latent_fringe_mask(F[0], (2, 3)), out[:1])
    # a cell is on iff any of its 8x8 pixels is on; never on without one
    g = torch.Generator().manual_seed(0)
    R = torch.rand(3, 32, 40, generator=g) > 0.97
    cells = latent_fringe_mask(R, (4, 5))
    per_cell = R.reshape(3, 4, 8, 5, 8).any(dim=(2, 4))
    assert torch.equal(cells[:, 0] > 0.5, per_cell)
    # factor 1: the mask itself
    assert torch.equal(latent_fringe_mask(R, (32, 40))[:, 0] > 0.5, R)


def test_latent_fringe_mask_survives_comfyui_resize_and_pixel_mask_does_not():
    """ComfyUI resizes a LATENT's noise_mask to the latent size bilinearly (sampler_helpers.prepare_mask):
    the identity on a mask already at that size; a pixel-size F comes out soft where it partly covers a cell."""
    F = torch.zeros(1, 1, 32, 32)
    F[..., 4:20, 12:20] = 1  # an edge through the middle of a cell row
    F[..., 24:32, 1:3] = 1  # a sliver at the left of a cell
    cells = latent_fringe_mask(F, (4, 4))
    assert cells[0, 0].tolist() == [[0, 1, 1, 0], [0, 1, 1, 0], [0, 1, 1, 0], [1, 0, 0, 0]]
    assert torch.equal(torch.nn.functional.interpolate(cells, size=(4, 4), mode="bilinear"), cells)
    soft = torch.nn.functional.interpolate(F, size=(4, 4), mode="bilinear")
    assert ((soft > 0) & (soft < 1)).any()  # partly covered cells: part composite, part noise
    assert soft[0, 0, 3, 0] == 0  # the sliver's cell: not regenerated at all


def test_fringe_starts_from_pure_noise_under_the_sampler_blend():
    """ComfyUI's first inpainting input, with the latent and mask the double-mask node now makes: inside F's
    cells noise alone (whatever the composite), outside the noised composite exactly as before."""
    g = torch.Generator().manual_seed(1)
    F = torch.zeros(1, 64, 64)
    F[0, 20:45, 11:30] = 1
    cells = latent_fringe_mask(F, (8, 8))
    noise = torch.randn(1, 4, 8, 8, generator=g)
    sigma = 14.6146
    firsts = []
    for comp in (torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g) * 3 + 1):
        lat = clear_latent_cells(comp, cells)
        x = noise * (1 + sigma**2) ** 0.5 + lat  # noise_scaling(σ_max, noise, latent_image, max_denoise=True)
        x = x * cells + (noise * sigma + lat) * (1 - cells)  # KSamplerX0Inpaint's blend
        inside = (cells > 0.5).expand_as(x)
        assert torch.equal(x[inside], (noise * (1 + sigma**2) ** 0.5)[inside])
        assert torch.equal(x[~inside], (noise * sigma + comp)[~inside])
        firsts.append(x)
    assert torch.equal(firsts[0][inside], firsts[1][inside]) and not torch.equal(firsts[0], firsts[1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_clear_latent_cells_is_exact_outside(dtype):
    g = torch.Generator().manual_seed(2)
    lat = torch.randn(2, 4, 3, 5, generator=g).to(dtype)
    cells = (torch.rand(1, 1, 3, 5, generator=g) > 0.5).float()  # batch 1 broadcasts
    out = clear_latent_cells(lat, cells)
    assert out.dtype == dtype and out.shape == lat.shape
    on = (cells > 0.5).expand_as(lat)
    assert torch.equal(out[~on], lat[~on]) and (out[on] == 0).all()
    assert out.data_ptr() != lat.data_ptr()


def test_latent_mask_errors():
    with pytest.raises(ValueError, match="integer factor"):
        latent_fringe_mask(torch.zeros(1, 20, 24), (2, 3))
    with pytest.raises(ValueError, match="integer factor"):
        latent_fringe_mask(torch.zeros(1, 16, 24), (2, 6))  # factor 8 down, 4 across
    with pytest.raises(ValueError, match=r"\[B, 1, h, w\]"):
        clear_latent_cells(torch.zeros(1, 4, 2, 3), torch.zeros(1, 1, 2, 4))
    with pytest.raises(ValueError, match="batch"):
        clear_latent_cells(torch.zeros(2, 4, 2, 3), torch.zeros(3, 1, 2, 3))


def test_fringe_docstring_examples():
    import doctest

    res = doctest.testmod(fringe_module, raise_on_error=False)
    assert res.attempted >= 4 and res.failed == 0
