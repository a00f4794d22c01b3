"""Tests for warping.mls: MLS maps (affine / similarity / rigid), backward maps and warping."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import max4zero.warping.mls as mls_mod
from max4zero.warping.mls import backward_map, mls_deform, warp

KINDS = ("affine", "similarity", "rigid")


# --------------------------------------------------------------------------------------------------
# reference: Schaefer, McPhail, Warren 2006, one point at a time, float64, straight from the paper
# --------------------------------------------------------------------------------------------------


def _perp(a: np.ndarray) -> np.ndarray:
    return np.array([-a[1], a[0]])  # paper: (x, y)^perp = (-y, x)


def ref_mls(v: np.ndarray, p: np.ndarray, q: np.ndarray, kind: str, alpha: float) -> np.ndarray:
    """MLS at one point ``v`` [2] for control points ``p -> q`` [K, 2] (row vectors, as in the paper)."""
    w = 1.0 / np.sum((p - v) ** 2, axis=1) ** alpha  # w_i = 1 / |p_i - v|^(2 alpha)
    p_star = (w[:, None] * p).sum(0) / w.sum()
    q_star = (w[:, None] * q).sum(0) / w.sum()
    ph, qh = p - p_star, q - q_star
    if kind == "affine":  # eq. (3): (v - p*) (sum_i p^_i^T w_i p^_i)^-1 sum_j w_j p^_j^T q^_j + q*
        a = np.einsum("i,ij,ik->jk", w, ph, ph)
        b = np.einsum("i,ij,ik->jk", w, ph, qh)
        return (v - p_star) @ np.linalg.inv(a) @ b + q_star
    vp = v - p_star
    right = np.stack([vp, -_perp(vp)])  # [v - p*; -(v - p*)^perp]
    left = np.stack([ph, -np.stack([-ph[:, 1], ph[:, 0]], 1)], 1)  # [K, 2, 2]: [p^_i; -p^_i^perp]
    a_i = w[:, None, None] * left @ right.T  # A_i = w_i [p^_i; -p^_i^perp] [v - p*; -(v - p*)^perp]^T
    total = np.einsum("ij,ijk->k", qh, a_i)  # sum_i q^_i A_i
    if kind == "similarity":  # eq. (5) with mu_s = sum_i w_i p^_i p^_i^T
        mu_s = float(np.sum(w * np.sum(ph * ph, 1)))
        return total / mu_s + q_star
    # rigid, eq. (8): f_r(v) = |v - p*| f->_r(v) / |f->_r(v)| + q*
    return np.linalg.norm(vp) * total / np.linalg.norm(total) + q_star


def _rot(theta: float) -> np.ndarray:
    return np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])


def _transform_of_kind(kind: str, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(A, t) with x -> x @ A.T + t: a random transform that MLS of ``kind`` must reproduce."""
    theta = rng.uniform(-1.0, 1.0)
    if kind == "affine":
        a = _rot(theta) @ np.diag(rng.uniform(0.6, 1.6, 2)) @ np.array([[1.0, rng.uniform(-0.4, 0.4)], [0.0, 1.0]])
    elif kind == "similarity":
        a = rng.uniform(0.5, 1.8) * _rot(theta)
    else:
        a = _rot(theta)
    return a, rng.uniform(-40, 40, 2)


def _grid_points(h: int, w: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    return torch.stack([xs.flatten(), ys.flatten()], 1)


# --------------------------------------------------------------------------------------------------
# mls_deform
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", [0.1, 1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_reproduces_transform_of_its_kind(kind: str, alpha: float) -> None:
    rng = np.random.default_rng(7)
    a, t = _transform_of_kind(kind, rng)
    src = rng.uniform(0, 120, (15, 2))
    dst = src @ a.T + t
    # every pixel of a 96x128 image, plus points far outside the control points' hull
    pts = torch.cat([_grid_points(96, 128), torch.tensor(rng.uniform(-500, 600, (200, 2)))])
    out = mls_deform(pts, torch.tensor(src), torch.tensor(dst), kind, alpha)
    expect = pts @ torch.tensor(a.T) + torch.tensor(t)
    assert out.dtype == torch.float64
    assert (out - expect).norm(dim=1).max().item() <= 1e-4


def test_kinds_are_distinct() -> None:
    # a sheared (non-similarity) transform: only affine reproduces it, so the kinds must differ
    rng = np.random.default_rng(3)
    a = np.array([[1.3, 0.4], [0.0, 0.7]])
    src = rng.uniform(0, 100, (10, 2))
    dst = src @ a.T
    pts = torch.tensor(rng.uniform(0, 100, (50, 2)))
    expect = pts @ torch.tensor(a.T)
    err = {k: (mls_deform(pts, torch.tensor(src), torch.tensor(dst), k, 1.0) - expect).norm(dim=1).max().item() for k in KINDS}
    assert err["affine"] <= 1e-6
    assert err["similarity"] > 0.1 and err["rigid"] > 0.1
    assert abs(err["similarity"] - err["rigid"]) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("alpha", [0.1, 1.0, 4.0])
@pytest.mark.parametrize("kind", KINDS)
def test_interpolates_control_points(kind: str, alpha: float, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(1)
    src = (torch.rand(40, 2, generator=g) * 500).to(dtype)
    dst = (src + torch.randn(40, 2, generator=g) * 20).to(dtype)
    out = mls_deform(src, src, dst, kind, alpha)
    assert torch.equal(out, dst)  # exactly, not just closely
    # integer control points through backward_map: the map at those pixels is exactly dst
    srci = torch.randint(0, 64, (12, 2), generator=g).to(dtype).unique(dim=0)
    dsti = srci * 1.5 + torch.randn(srci.shape[0], 2, generator=g).to(dtype)
    m = backward_map(srci, dsti, 64, 64, kind, alpha)
    got = m[srci[:, 1].long(), srci[:, 0].long()]
    assert torch.equal(got, dsti)


@pytest.mark.parametrize("kind", KINDS)
def test_continuous_at_control_points(kind: str) -> None:
    g = torch.Generator().manual_seed(2)
    src = torch.rand(20, 2, generator=g, dtype=torch.float64) * 200
    dst = src + torch.randn(20, 2, generator=g, dtype=torch.float64) * 10
    near = src + 1e-3
    out = mls_deform(near, src, dst, kind, 1.0)
    assert (out - dst).norm(dim=1).max().item() < 1e-2


@pytest.mark.parametrize("alpha", [0.1, 1.0])
@pytest.mark.parametrize("kind", KINDS)
def test_fast_path_matches_paper_reference(kind: str, alpha: float) -> None:
    """float32 fast path (stride 1) vs the float64 per-pixel paper formulas: <= 1e-3 px."""
    rng = np.random.default_rng(11)
    h, w = 384, 512
    k = 24
    src = rng.uniform(20, 490, (k, 2)) + 0.37  # never on an integer pixel (reference has no hit rule)
    src[:, 1] *= h / w
    dst = src * 0.9 + rng.normal(0, 8, (k, 2)) + np.array([15.0, -10.0])
    ii = rng.integers(0, h, 256)
    jj = rng.integers(0, w, 256)
    # pixel centres (x=j, y=i); backward_map(stride=1) is this same evaluation on the full grid
    # (test_stride_one_is_exact_and_handles_tiny_sizes)
    pix = torch.tensor(np.stack([jj, ii], 1), dtype=torch.float32)
    got = mls_deform(pix, torch.tensor(src, dtype=torch.float32), torch.tensor(dst, dtype=torch.float32), kind, alpha)
    assert got.dtype == torch.float32
    src32 = torch.tensor(src, dtype=torch.float32).double().numpy()  # what the fast path actually saw
    dst32 = torch.tensor(dst, dtype=torch.float32).double().numpy()
    worst = 0.0
    for n, (i, j) in enumerate(zip(ii, jj)):
        ref = ref_mls(np.array([j, i], dtype=np.float64), src32, dst32, kind, alpha)
        worst = max(worst, float(np.linalg.norm(got[n].double().numpy() - ref)))
    assert worst <= 1e-3


@pytest.mark.parametrize("kind", KINDS)
def test_mls_deform_float64_matches_reference_tightly(kind: str) -> None:
    rng = np.random.default_rng(5)
    src = rng.uniform(0, 300, (9, 2))
    dst = src + rng.normal(0, 15, (9, 2))
    pts = rng.uniform(-50, 350, (100, 2))
    out = mls_deform(torch.tensor(pts), torch.tensor(src), torch.tensor(dst), kind, 1.0).numpy()
    ref = np.stack([ref_mls(v, src, dst, kind, 1.0) for v in pts])
    assert np.abs(out - ref).max() <= 1e-8


@pytest.mark.parametrize("kind", KINDS)
def test_float32_precise_next_to_control_points(kind: str) -> None:
    """alpha = 2 and points a fraction of a pixel from a control point: the nearest weight dominates
    by ~1e10, yet the others still set the local Jacobian (no silent fallback to a translation)."""
    rng = np.random.default_rng(12)
    src = rng.uniform(0, 1000, (64, 2))
    dst = src * 1.7 + rng.normal(0, 15, (64, 2)) + 300  # scale change: local Jacobian far from I
    src32 = torch.tensor(src, dtype=torch.float32)
    dst32 = torch.tensor(dst, dtype=torch.float32)
    offs = rng.normal(0, 1, (64, 2)) * rng.uniform(0.02, 0.5, (64, 1))
    pts = src32 + torch.tensor(offs, dtype=torch.float32)
    got = mls_deform(pts, src32, dst32, kind, 2.0).double().numpy()
    p64, q64 = src32.double().numpy(), dst32.double().numpy()
    ref = np.stack([ref_mls(v, p64, q64, kind, 2.0) for v in pts.double().numpy()])
    assert np.linalg.norm(got - ref, axis=1).max() <= 1e-3
    # and the fallback would have been visibly wrong there
    translated = pts.double().numpy() - p64 + q64
    assert np.linalg.norm(translated - ref, axis=1).max() > 0.05


def _smooth_field(k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    src = 40 + torch.rand(k, 2, generator=g, dtype=torch.float64) * 432
    rot = torch.tensor(_rot(0.1) * 0.85)
    dst = (src - 256) @ rot.T + 256 + torch.tensor([20.0, -12.0], dtype=torch.float64)
    dst[:, 0] += 8 * torch.sin(src[:, 1] / 512 * 2 * math.pi)
    dst[:, 1] += 6 * torch.sin(src[:, 0] / 512 * 2 * math.pi + 1)
    dst += torch.randn(k, 2, generator=g, dtype=torch.float64)
    return src.float(), dst.float()


@pytest.mark.parametrize("kind", KINDS)
def test_coarse_stride_error_bound(kind: str) -> None:
    src, dst = _smooth_field(48, seed=4)
    exact = backward_map(src, dst, 385, 449, kind, 0.1)
    coarse = backward_map(src, dst, 385, 449, kind, 0.1, stride=mls_mod.DEFAULT_STRIDE)
    err = (coarse - exact).norm(dim=-1).flatten()
    assert torch.quantile(err[::3], 0.99).item() <= 0.25
    assert err.max().item() < 5.0
    # (384, 448) are multiples of 8 (and 4): grid nodes land on pixels and carry exact values there
    nodes = (coarse - exact)[:: mls_mod.DEFAULT_STRIDE, :: mls_mod.DEFAULT_STRIDE]
    assert nodes.abs().max().item() <= 2e-4
    # and a larger stride is measurably worse (the coarse path really is coarse)
    err32 = (backward_map(src, dst, 385, 449, kind, 0.1, stride=32) - exact).norm(dim=-1)
    assert err32.mean() > err.mean()


def test_stride_one_is_exact_and_handles_tiny_sizes() -> None:
    src, dst = _smooth_field(10, seed=0)
    pts = _grid_points(7, 5).float()
    m = backward_map(src, dst, 7, 5, "affine", 1.0)
    assert torch.equal(m.reshape(-1, 2), mls_deform(pts, src, dst, "affine", 1.0))
    for h, w in [(1, 1), (1, 9), (9, 1), (2, 3)]:
        mm = backward_map(src, dst, h, w, "rigid", 0.1, stride=8)
        assert mm.shape == (h, w, 2) and torch.isfinite(mm).all()
    # numpy / torch integer scalars are fine as sizes and strides
    assert backward_map(src, dst, np.int64(6), torch.tensor(4), stride=np.int32(2)).shape == (6, 4, 2)


def test_chunking_does_not_change_results(monkeypatch: pytest.MonkeyPatch) -> None:
    g = torch.Generator().manual_seed(9)
    src = torch.randint(0, 30, (17, 2), generator=g).float().unique(dim=0)
    dst = src + torch.randn(src.shape[0], 2, generator=g) * 3
    pts = _grid_points(30, 30).float()  # includes every control point: hits in several chunks
    full = {kind: mls_deform(pts, src, dst, kind, 1.0) for kind in KINDS}
    # chunks of 5 points and blocks of 97 points: boundaries everywhere
    monkeypatch.setattr(mls_mod, "_CHUNK_ELEMS", 5 * src.shape[0] + 3)
    monkeypatch.setattr(mls_mod, "_BLOCK_CPU", 97)
    for kind in KINDS:
        chunked = mls_deform(pts, src, dst, kind, 1.0)
        assert torch.allclose(full[kind], chunked, atol=1e-4, rtol=0), kind


# ---- degenerate configurations --------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_single_point_is_a_translation(kind: str) -> None:
    pts = torch.tensor([[0.0, 0.0], [3.5, -2.0], [100.0, 40.0], [5.0, 5.0]])
    out = mls_deform(pts, torch.tensor([[5.0, 5.0]]), torch.tensor([[7.0, 9.0]]), kind, 1.0)
    assert torch.allclose(out, pts + torch.tensor([2.0, 4.0]), atol=1e-5)


@pytest.mark.parametrize("kind", ["affine", "similarity"])
def test_two_points_give_the_similarity_through_them(kind: str) -> None:
    src = torch.tensor([[10.0, 20.0], [50.0, 35.0]], dtype=torch.float64)
    dst = torch.tensor([[0.0, 0.0], [20.0, 60.0]], dtype=torch.float64)
    pts = torch.tensor(np.random.default_rng(0).uniform(-100, 200, (64, 2)))
    z = complex(*(dst[1] - dst[0]).tolist()) / complex(*(src[1] - src[0]).tolist())
    rel = (pts - src[0]).numpy()
    expect = np.stack([(complex(*r) * z).real for r in rel]), np.stack([(complex(*r) * z).imag for r in rel])
    expect = torch.tensor(np.stack(expect, 1)) + dst[0]
    out = mls_deform(pts, src, dst, kind, 1.0)
    assert (out - expect).abs().max().item() <= 1e-8


@pytest.mark.parametrize("alpha", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", KINDS)
def test_degenerate_configurations_stay_finite(kind: str, dtype: torch.dtype, alpha: float) -> None:
    pts = torch.cat([_grid_points(20, 20), torch.tensor([[1e5, -1e5], [0.5, 0.5]], dtype=torch.float64)]).to(dtype)
    cases = {
        "K=1": ([[5.0, 5.0]], [[7.0, 9.0]]),
        "K=2": ([[0.0, 0.0], [10.0, 10.0]], [[1.0, 1.0], [21.0, 11.0]]),
        "collinear": ([[0.0, 0.0], [5.0, 5.0], [10.0, 10.0], [15.0, 15.0]], [[1.0, 1.0], [5.0, 8.0], [21.0, 11.0], [30.0, 2.0]]),
        "duplicates": ([[5.0, 5.0], [5.0, 5.0], [0.0, 9.0]], [[1.0, 1.0], [3.0, 3.0], [0.0, 0.0]]),
        "same dst": ([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]], [[4.0, 4.0]] * 3),
        "all src equal": ([[3.0, 3.0]] * 3, [[1.0, 0.0], [2.0, 0.0], [3.0, 0.0]]),
        "near-coincident": ([[5.0, 5.0], [5.0 + 1e-6, 5.0], [9.0, 2.0]], [[1.0, 1.0], [1.0, 1.0], [3.0, 7.0]]),
    }
    for name, (s, d) in cases.items():
        s_t, d_t = torch.tensor(s, dtype=dtype), torch.tensor(d, dtype=dtype)
        out = mls_deform(pts, s_t, d_t, kind, alpha)
        assert torch.isfinite(out).all(), name
        # the row (5, 5) of the grid is a control point of most cases: duplicates map to their mean
        if name == "duplicates":
            assert torch.equal(out[5 * 20 + 5], torch.tensor([2.0, 2.0], dtype=dtype))
        m = backward_map(s_t, d_t, 12, 16, kind, alpha, stride=4)
        assert torch.isfinite(m).all(), name


def test_collinear_affine_falls_back_to_similarity() -> None:
    src = torch.tensor([[0.0, 0.0], [5.0, 5.0], [10.0, 10.0], [15.0, 15.0]], dtype=torch.float64)
    dst = torch.tensor([[1.0, 1.0], [5.0, 8.0], [21.0, 11.0], [30.0, 2.0]], dtype=torch.float64)
    pts = _grid_points(16, 16) + 0.25
    a = mls_deform(pts, src, dst, "affine", 1.0)
    s = mls_deform(pts, src, dst, "similarity", 1.0)
    assert torch.allclose(a, s, atol=1e-9)
    # off the line, a genuine affine solution differs (the fallback is not always taken)
    src2 = src.clone()
    src2[1, 1] += 3.0
    assert not torch.allclose(mls_deform(pts, src2, dst, "affine", 1.0), mls_deform(pts, src2, dst, "similarity", 1.0), atol=1e-3)


def test_dtypes_and_devices() -> None:
    src = torch.tensor([[1.0, 2.0], [30.0, 5.0], [12.0, 25.0]])
    dst = src + 1.5
    pts = torch.tensor([[3.0, 4.0], [10.0, 10.0]])
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        out = mls_deform(pts.to(dt), src.to(dt), dst.to(dt))
        assert out.dtype == torch.float32
    assert mls_deform(pts, src.double(), dst).dtype == torch.float64
    assert backward_map(src.double(), dst.double(), 4, 4).dtype == torch.float64
    # ints and plain lists are accepted
    out = mls_deform([[3, 4], [10, 10]], src.tolist(), dst.tolist())
    assert torch.allclose(out, pts + 1.5, atol=1e-5)
    assert mls_deform(torch.zeros(0, 2), src, dst).shape == (0, 2)


def test_torch_thread_count_is_restored() -> None:
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        src, dst = _smooth_field(6, seed=1)
        m = backward_map(src, dst, 32, 32, "rigid", 0.1, stride=4)
        assert torch.get_num_threads() == 2
        warp(torch.rand(1, 1, 32, 32), m)
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError):
            warp(torch.rand(1, 1, 32, 32), torch.full((4, 4, 2), float("nan")))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


# ---- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda s, d, p: mls_deform(p, s, d[:2]), "pair up"),
        (lambda s, d, p: mls_deform(p, s[:0], d[:0]), "at least 1 control point"),
        (lambda s, d, p: mls_deform(p, s[:, :1], d), r"\[N, 2\]"),
        (lambda s, d, p: mls_deform(p.flatten(), s, d), r"\[N, 2\]"),
        (lambda s, d, p: mls_deform(torch.tensor([[0.0, float("nan")]]), s, d), "NaN or inf"),
        (lambda s, d, p: mls_deform(p, s, torch.tensor([[0.0, 0.0], [1.0, float("inf")], [2.0, 2.0]])), "dst contains NaN"),
        (lambda s, d, p: mls_deform(p, s, d, kind="perspective"), "kind must be one of"),
        (lambda s, d, p: mls_deform(p, s, d, alpha=0.0), "alpha must be"),
        (lambda s, d, p: mls_deform(p, s, d, alpha=-1.0), "alpha must be"),
        (lambda s, d, p: mls_deform(p, s, d, alpha=float("nan")), "alpha must be"),
        (lambda s, d, p: mls_deform(p, s.bool(), d), "real numbers"),
        (lambda s, d, p: backward_map(s, d, 8, 8, stride=0), "stride must be"),
        (lambda s, d, p: backward_map(s, d, 8, 8, stride=2.5), "stride must be"),
        (lambda s, d, p: backward_map(s, d, 0, 8), "height must be"),
        (lambda s, d, p: backward_map(s, d, 8, 8.0), "width must be"),
        (lambda s, d, p: backward_map(s, d[:1], 8, 8), "pair up"),
        (lambda s, d, p: backward_map(s, d, 8, 8, kind="Affine"), "kind must be one of"),
    ],
)
def test_validation_errors(call, match: str) -> None:
    s = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    d = s + 1
    p = torch.tensor([[1.0, 1.0]])
    with pytest.raises(ValueError, match=match):
        call(s, d, p)


# --------------------------------------------------------------------------------------------------
# warp
# --------------------------------------------------------------------------------------------------


def _identity_map(h: int, w: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=dtype), torch.arange(w, dtype=dtype), indexing="ij")
    return torch.stack([xs, ys], -1)


@pytest.mark.parametrize("mode", ["nearest", "bilinear"])
def test_integer_shift_is_exact_and_outside_is_zero(mode: str) -> None:
    g = torch.Generator().manual_seed(0)
    img = torch.rand(2, 3, 13, 17, generator=g) + 0.5  # no zeros in the source
    dx, dy = 4, -3
    m = _identity_map(13, 17) + torch.tensor([dx, dy], dtype=torch.float32)
    out = warp(img, m, mode=mode)
    assert out.shape == (2, 3, 13, 17)
    # out[i, j] = img[i + dy, j + dx] where that exists, else 0
    expect = torch.zeros_like(img)
    expect[:, :, 3:, : 17 - 4] = img[:, :, : 13 - 3, 4:]
    if mode == "nearest":
        assert torch.equal(out, expect)
    else:
        assert torch.allclose(out, expect, atol=1e-5)


def test_half_pixel_shift_bilinear_averages_neighbours() -> None:
    img = torch.arange(12, dtype=torch.float32).reshape(1, 1, 3, 4)
    m = _identity_map(3, 4) + torch.tensor([0.5, 0.0])
    out = warp(img, m)
    assert torch.allclose(out[0, 0, :, :3], (img[0, 0, :, :3] + img[0, 0, :, 1:]) / 2)
    # beyond the last pixel centre, bilinear fades towards the zero outside
    assert torch.allclose(out[0, 0, :, 3], img[0, 0, :, 3] / 2)


def test_warp_non_square_sizes_and_per_batch_maps() -> None:
    g = torch.Generator().manual_seed(1)
    img = torch.rand(2, 1, 10, 30, generator=g)
    # output 7x5, different map per batch element; every sample lands on a pixel centre
    m0 = torch.stack([torch.randint(0, 30, (7, 5), generator=g), torch.randint(0, 10, (7, 5), generator=g)], -1).float()
    m1 = torch.stack([torch.randint(0, 30, (7, 5), generator=g), torch.randint(0, 10, (7, 5), generator=g)], -1).float()
    out = warp(img, torch.stack([m0, m1]), mode="nearest")
    assert out.shape == (2, 1, 7, 5)
    for b, m in enumerate((m0, m1)):
        assert torch.equal(out[b, 0], img[b, 0][m[..., 1].long(), m[..., 0].long()])
    # a single [H, W, 2] map is shared by the batch; [1, H, W, 2] as well
    shared = warp(img, m0, mode="nearest")
    assert torch.equal(shared[1, 0], img[1, 0][m0[..., 1].long(), m0[..., 0].long()])
    assert torch.equal(warp(img, m0[None], mode="nearest"), shared)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_warp_low_and_high_precision_inputs(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    img = torch.rand(2, 3, 16, 24, generator=g)
    src, dst = _smooth_field(8, seed=3)
    m = backward_map(src / 20, dst / 20, 12, 20, "affine", 0.1)
    ref = warp(img, m)
    out = warp(img.to(dtype), m)
    assert out.dtype == dtype and out.shape == (2, 3, 12, 20)
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float64: 1e-6}[dtype]
    assert torch.allclose(out.float(), ref, atol=tol)
    assert torch.equal(warp(img.to(dtype), m, "nearest"), warp(img, m, "nearest").to(dtype))


def test_warp_mask_out_of_bounds_and_size_one_axes() -> None:
    mask = torch.ones(1, 1, 1, 6)  # a one-row source: "outside" must still read 0
    m = _identity_map(3, 6) + torch.tensor([0.0, -1.0])  # rows -1, 0, 1 of the source
    out = warp(mask, m, "nearest")
    assert torch.equal(out[0, 0], torch.tensor([[0.0] * 6, [1.0] * 6, [0.0] * 6]))
    far = torch.full((4, 4, 2), -50.0)
    assert torch.equal(warp(torch.ones(1, 2, 8, 8), far), torch.zeros(1, 2, 4, 4))


def test_identity_mls_warp_reproduces_image() -> None:
    g = torch.Generator().manual_seed(3)
    img = torch.rand(1, 3, 40, 56, generator=g)
    src = torch.rand(10, 2, generator=g) * torch.tensor([55.0, 39.0])
    for kind in KINDS:
        m = backward_map(src, src.clone(), 40, 56, kind, 0.1, stride=4)
        assert torch.allclose(warp(img, m), img, atol=1e-4)


@pytest.mark.parametrize(
    "args, match",
    [
        ((torch.rand(3, 8, 8), torch.zeros(8, 8, 2)), r"\[B, C, H, W\]"),
        ((torch.randint(0, 2, (1, 1, 8, 8)), torch.zeros(8, 8, 2)), "floating point"),
        ((torch.rand(1, 1, 8, 8), torch.zeros(8, 8, 3)), "backward_map must be"),
        ((torch.rand(2, 1, 8, 8), torch.zeros(3, 8, 8, 2)), "batch"),
        ((torch.rand(1, 1, 8, 8), torch.full((8, 8, 2), float("nan"))), "NaN"),
        ((torch.rand(1, 1, 8, 8), torch.zeros(8, 8, 2), "bicubic"), "mode must be"),
    ],
)
def test_warp_validation(args, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        warp(*args)
