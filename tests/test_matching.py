"""Tests for warping.matching: mutual nearest neighbours, RANSAC filter, control points."""

from __future__ import annotations

import pytest
import torch

from max4zero.warping.matching import (
    control_points,
    dedupe_control_points,
    filter_matches,
    grid_xy,
    mutual_nearest_neighbors,
)


def naive_mnn(fa: torch.Tensor, fb: torch.Tensor, ma=None, mb=None):
    """Reference: the full masked similarity matrix, float64, argmax both ways."""
    C = fa.shape[0]
    a = fa.reshape(C, -1).double()
    b = fb.reshape(C, -1).double()
    ia = torch.arange(a.shape[1]) if ma is None else torch.nonzero(ma.reshape(-1)).flatten()
    ib = torch.arange(b.shape[1]) if mb is None else torch.nonzero(mb.reshape(-1)).flatten()
    a = a[:, ia] / a[:, ia].norm(dim=0)
    b = b[:, ib] / b[:, ib].norm(dim=0)
    S = a.T @ b
    r = S.argmax(1)
    c = S.argmax(0)
    keep = c[r] == torch.arange(len(ia))
    return ia[keep], ib[r[keep]]


def permuted_pair(C=48, Ha=12, Wa=20, Hb=20, Wb=12, noise=0.1, seed=0):
    g = torch.Generator().manual_seed(seed)
    fa = torch.randn(C, Ha, Wa, generator=g)
    perm = torch.randperm(Ha * Wa, generator=g)  # B token j is A token perm[j]
    fb = fa.reshape(C, -1)[:, perm].reshape(C, Hb, Wb) + noise * torch.randn(C, Hb, Wb, generator=g)
    return fa, fb, perm


# ---------------------------------------------------------------- mutual nearest neighbours


@pytest.mark.parametrize("chunk", [None, 3, 1000])
def test_permutation_recovered_non_square(chunk):
    fa, fb, perm = permuted_pair()
    ia, ib, score = mutual_nearest_neighbors(fa, fb, chunk=chunk)
    assert ia.dtype == ib.dtype == torch.long and score.dtype == torch.float32
    n = fa.shape[1] * fa.shape[2]
    assert (perm[ib] == ia).sum().item() >= 0.99 * n
    assert torch.all(score > 0.9) and torch.all(score <= 1.0 + 1e-5)
    assert torch.equal(ia, torch.sort(ia).values)  # documented order


def test_warp_recovered_with_masks_and_grids_of_different_size():
    """B is A shifted by (dx, dy) = (3, 4) on a bigger grid; masks restrict both sides."""
    g = torch.Generator().manual_seed(1)
    C, Ha, Wa, Hb, Wb, dx, dy = 32, 16, 10, 20, 18, 3, 4
    fa = torch.randn(C, Ha, Wa, generator=g)
    fb = torch.randn(C, Hb, Wb, generator=g)
    fb[:, dy : dy + Ha, dx : dx + Wa] = fa + 0.1 * torch.randn(C, Ha, Wa, generator=g)
    mask_a = torch.zeros(Ha, Wa, dtype=torch.bool)
    mask_a[2:14, 1:9] = True
    mask_b = torch.zeros(Hb, Wb)
    mask_b[dy : dy + Ha, dx : dx + Wa] = 1.0  # float mask, thresholded at 0.5
    ia, ib, _ = mutual_nearest_neighbors(fa, fb, mask_a, mask_b, chunk=5)
    xa, xb = grid_xy(ia, (Ha, Wa)), grid_xy(ib, (Hb, Wb))
    exact = (xb - xa == torch.tensor([dx, dy], dtype=torch.float32)).all(1)
    assert exact.sum().item() >= 0.99 * mask_a.sum().item()
    assert mask_a.reshape(-1)[ia].all() and mask_b.reshape(-1)[ib].bool().all()


def test_matches_naive_reference_and_one_to_one():
    fa, fb, _ = permuted_pair(noise=1.5, seed=3)  # heavy noise: many non-mutual tokens
    g = torch.Generator().manual_seed(5)
    ma = torch.rand(fa.shape[1:], generator=g) > 0.3
    mb = torch.rand(fb.shape[1:], generator=g) > 0.3
    ref_a, ref_b = naive_mnn(fa, fb, ma, mb)
    for chunk in (None, 3, 64):
        ia, ib, _ = mutual_nearest_neighbors(fa, fb, ma, mb, chunk=chunk)
        assert torch.equal(ia, ref_a) and torch.equal(ib, ref_b)
    assert len(set(ia.tolist())) == len(ia) and len(set(ib.tolist())) == len(ib)


def test_outside_tokens_never_matched_even_if_perfect():
    """Out-of-mask tokens are identical across A and B (cosine 1), in-mask ones only similar."""
    g = torch.Generator().manual_seed(2)
    C, H, W = 16, 8, 8
    fa = torch.randn(C, H, W, generator=g)
    fb = fa + 0.3 * torch.randn(C, H, W, generator=g)
    mask_a = torch.zeros(H, W, dtype=torch.bool)
    mask_b = torch.zeros(H, W, dtype=torch.bool)
    mask_a[2:6, 3:8] = True
    mask_b[1:7, 2:7] = True
    outside = ~(mask_a & mask_b)
    fb[:, outside] = fa[:, outside]  # perfect matches everywhere outside the masks
    # The research code's spurious top-left pair: both top-left tokens outside and identical.
    assert not mask_a[0, 0] and not mask_b[0, 0]
    ia, ib, _ = mutual_nearest_neighbors(fa, fb, mask_a, mask_b)
    assert ia.numel() > 0
    assert mask_a.reshape(-1)[ia].all(), "a token outside mask_a was matched"
    assert mask_b.reshape(-1)[ib].all(), "a token outside mask_b was matched"
    assert not ((ia == 0) & (ib == 0)).any()
    ref_a, ref_b = naive_mnn(fa, fb, mask_a, mask_b)
    assert torch.equal(ia, ref_a) and torch.equal(ib, ref_b)


def test_outside_tokens_do_not_compete():
    """An out-of-mask A token that would beat an in-mask one must not veto its match."""
    C = 4
    fa = torch.zeros(C, 1, 2)
    fb = torch.zeros(C, 1, 1)
    fa[0, 0, 0] = 1.0  # outside: identical to B's only token
    fa[:2, 0, 1] = torch.tensor([1.0, 1.0])  # inside: cosine 0.707
    fb[0, 0, 0] = 1.0
    ia, ib, s = mutual_nearest_neighbors(fa, fb, mask_a=torch.tensor([[False, True]]))
    assert ia.tolist() == [1] and ib.tolist() == [0]
    assert s.item() == pytest.approx(2**-0.5, abs=1e-6)


def test_ties_deterministic_lowest_index():
    fa = torch.ones(8, 5, 6)
    fb = torch.ones(8, 4, 3)
    mb = torch.zeros(4, 3, dtype=torch.bool)
    mb[2:, 1:] = True
    for chunk in (None, 1, 4):
        ia, ib, s = mutual_nearest_neighbors(fa, fb, None, mb, chunk=chunk)
        assert ia.tolist() == [0] and ib.tolist() == [7] and s.item() == pytest.approx(1.0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_low_precision_inputs(dtype):
    fa, fb, perm = permuted_pair(C=64, noise=0.05)
    ia, ib, score = mutual_nearest_neighbors(fa.to(dtype), fb.to(dtype), chunk=50)
    assert score.dtype == torch.float32
    assert (perm[ib] == ia).sum().item() >= 0.99 * perm.numel()


def test_mask_layouts_accepted_and_bad_shape_explained():
    fa, fb, _ = permuted_pair()
    m = torch.ones(1, 1, 12, 20)
    ia, _, _ = mutual_nearest_neighbors(fa, fb, mask_a=m)
    assert ia.numel() > 0
    with pytest.raises(ValueError, match="resize_to_grid"):
        mutual_nearest_neighbors(fa, fb, mask_a=torch.ones(24, 40))


def test_errors():
    fa, fb, _ = permuted_pair()
    with pytest.raises(ValueError, match="mask_a is empty.*garment"):
        mutual_nearest_neighbors(fa, fb, mask_a=torch.zeros(12, 20, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask_b is empty"):
        mutual_nearest_neighbors(fa, fb, mask_b=torch.zeros(20, 12))
    bad = fa.clone()
    bad[3, 4, 5] = float("nan")
    with pytest.raises(ValueError, match="feat_a contains NaN"):
        mutual_nearest_neighbors(bad, fb)
    bad = fb.clone()
    bad[0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="feat_b contains NaN or inf"):
        mutual_nearest_neighbors(fa, bad)
    with pytest.raises(ValueError, match="channels"):
        mutual_nearest_neighbors(fa, fb[:10])
    with pytest.raises(ValueError, match=r"\[C, H, W\]"):
        mutual_nearest_neighbors(fa[None], fb)


def test_nan_outside_mask_is_ignored():
    fa, fb, _ = permuted_pair()
    ma = torch.ones(12, 20, dtype=torch.bool)
    ma[0, 0] = False
    fa = fa.clone()
    fa[:, 0, 0] = float("nan")
    ia, _, _ = mutual_nearest_neighbors(fa, fb, mask_a=ma)
    assert 0 not in ia.tolist()


# ---------------------------------------------------------------- RANSAC filter


def homography_matches(n_out=30, seed=0):
    """Grid matches under x_b = 1.5 x_a + (2, 3), ``n_out`` of them moved to random cells ≥ 10 cells off."""
    g = torch.Generator().manual_seed(seed)
    grid_a, grid_b = (16, 20), (30, 36)
    idx_a = torch.randperm(16 * 20, generator=g)[:150]
    xa = grid_xy(idx_a, grid_a)
    xb = torch.round(xa * 1.5 + torch.tensor([2.0, 3.0]))
    outlier = torch.zeros(150, dtype=torch.bool)
    for i in torch.randperm(150, generator=g)[:n_out].tolist():
        while True:
            cand = torch.stack([torch.randint(0, 36, (), generator=g), torch.randint(0, 30, (), generator=g)]).float()
            if (cand - xb[i]).norm() >= 10:
                xb[i], outlier[i] = cand, True
                break
    idx_b = (xb[:, 1] * grid_b[1] + xb[:, 0]).long()
    score = torch.rand(150, generator=g)
    return idx_a, idx_b, score, grid_a, grid_b, outlier


def test_filter_removes_injected_outliers():
    idx_a, idx_b, score, ga, gb, outlier = homography_matches()
    fa, fb, fs, inl = filter_matches(idx_a, idx_b, score, ga, gb, threshold=5.0, return_inliers=True)
    assert torch.equal(inl, ~outlier)
    assert torch.equal(fa, idx_a[~outlier]) and torch.equal(fb, idx_b[~outlier]) and torch.equal(fs, score[~outlier])


def test_filter_threshold_is_in_cells():
    """Matches displaced by 3 cells are inliers at threshold 5 and outliers at threshold 2."""
    idx_a, idx_b, score, ga, gb, outlier = homography_matches(n_out=0)
    xb = grid_xy(idx_b, gb)
    moved = torch.zeros(len(idx_a), dtype=torch.bool)
    moved[::10] = True
    xb[moved, 0] += torch.where(xb[moved, 0] > 20, -3.0, 3.0)
    idx_b = (xb[:, 1] * gb[1] + xb[:, 0]).long()
    _, _, _, inl5 = filter_matches(idx_a, idx_b, score, ga, gb, threshold=5.0, return_inliers=True)
    _, _, _, inl2 = filter_matches(idx_a, idx_b, score, ga, gb, threshold=2.0, return_inliers=True)
    assert inl5.all()
    assert torch.equal(inl2, ~moved)


def test_filter_seeded_and_global_rng_untouched():
    idx_a, idx_b, score, ga, gb, _ = homography_matches(n_out=60, seed=4)
    state = torch.get_rng_state()
    r1 = filter_matches(idx_a, idx_b, score, ga, gb, seed=3, return_inliers=True)
    r2 = filter_matches(idx_a, idx_b, score, ga, gb, seed=3, return_inliers=True)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(r1, r2))


def test_filter_small_or_disabled_returns_input():
    idx_a, idx_b, score, ga, gb, _ = homography_matches()
    for n, th in ((4, 5.0), (0, 5.0), (150, None)):
        out = filter_matches(idx_a[:n], idx_b[:n], score[:n], ga, gb, threshold=th)
        assert all(torch.equal(x, y) for x, y in zip(out, (idx_a[:n], idx_b[:n], score[:n])))


def test_filter_none_survive_raises():
    g = torch.Generator().manual_seed(0)
    idx_a = torch.randperm(2500, generator=g)[:12]
    idx_b = torch.randperm(2500, generator=g)[:12]
    with pytest.raises(ValueError, match="no matches survive.*DIFT"):
        filter_matches(idx_a, idx_b, torch.ones(12), (50, 50), (50, 50), threshold=1e-3)


def test_filter_bad_input():
    idx_a, idx_b, score, ga, gb, _ = homography_matches()
    with pytest.raises(ValueError, match="one length"):
        filter_matches(idx_a, idx_b[:-1], score, ga, gb)
    with pytest.raises(ValueError, match="outside the 4x4 grid_b"):
        filter_matches(idx_a, idx_b, score, ga, (4, 4))


# ---------------------------------------------------------------- control points


def test_control_point_geometry():
    ia = torch.tensor([1 * 5 + 2])  # (col 2, row 1) of a 4x5 grid
    ib = torch.tensor([3 * 6 + 0])  # (col 0, row 3) of a 7x6 grid
    pa, pb, w = control_points(ia, ib, torch.tensor([0.7]), (4, 5), (7, 6), stride=16, mode="all")
    assert pa.dtype == pb.dtype == w.dtype == torch.float32
    assert pa.tolist() == [[32, 16], [32, 24], [40, 16], [40, 24]]
    assert pb.tolist() == [[0, 48], [0, 56], [8, 48], [8, 56]]
    assert w.tolist() == pytest.approx([0.7] * 4)
    pa, pb, _ = control_points(ia, ib, torch.tensor([0.7]), (4, 5), (7, 6), stride=8, mode="all")
    assert pa.tolist() == [[16, 8], [16, 12], [20, 8], [20, 12]]
    pa, _, _ = control_points(ia, ib, torch.tensor([0.7]), (4, 5), (7, 6), stride=1, mode="all")
    assert pa.tolist() == [[2, 1]]


def test_control_points_random_is_seeded_and_follows_score():
    n = 3000
    ia = torch.arange(n)
    ib = torch.arange(n)
    score = torch.full((n,), 0.3)
    score[:100] = 1.0
    score[100:200] = -0.2  # negative cosine: never kept
    r1 = control_points(ia, ib, score, (60, 50), (60, 50), mode="random", seed=11)
    r2 = control_points(ia, ib, score, (60, 50), (60, 50), mode="random", seed=11)
    r3 = control_points(ia, ib, score, (60, 50), (60, 50), mode="random", seed=12)
    assert all(torch.equal(x, y) for x, y in zip(r1, r2))
    assert not torch.equal(r1[0], r3[0])
    pa, pb, w = r1
    assert torch.equal(pa, pb)
    token = (pa[:, 1] // 16) * 50 + pa[:, 0] // 16
    assert (torch.bincount(token.long(), minlength=n)[:100] == 4).all()
    assert not ((token >= 100) & (token < 200)).any()
    frac = ((token >= 200).sum().item()) / (4 * (n - 200))
    assert abs(frac - 0.3) < 0.02


def test_control_points_deterministic_mode_and_errors():
    ia, ib = torch.tensor([0, 1, 2]), torch.tensor([2, 1, 0])
    score = torch.tensor([0.9, 0.4, 0.5])
    pa, pb, w = control_points(ia, ib, score, (1, 3), (1, 3), mode="deterministic", threshold=0.5)
    assert pa.shape == (8, 2) and w.tolist() == pytest.approx([0.9] * 4 + [0.5] * 4)
    assert pb[:, 0].tolist() == [32, 32, 40, 40, 0, 0, 8, 8]
    with pytest.raises(ValueError, match="no control points.*score"):
        control_points(ia, ib, score, (1, 3), (1, 3), mode="deterministic", threshold=0.95)
    with pytest.raises(ValueError, match="no control points"):
        control_points(ia, ib, torch.zeros(3), (1, 3), (1, 3), mode="random")
    with pytest.raises(ValueError, match="mode"):
        control_points(ia, ib, score, (1, 3), (1, 3), mode="paper")


def test_dedupe_control_points():
    pa = torch.tensor([[0.0, 0.0], [5.0, 5.0], [0.0, 0.0], [1.0, 2.0], [5.0, 5.0000001]])
    pb = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [4.0, 4.0], [6.0, 6.0]])
    w = torch.tensor([0.2, 0.5, 0.9, 0.1, 0.5])
    da, db, dw = dedupe_control_points(pa, pb, w, key="a")
    # (0,0): the 0.9 pair wins; (5,5): tie → first; order preserved.
    assert db.tolist() == [[2, 2], [3, 3], [4, 4]]
    assert dw.tolist() == pytest.approx([0.5, 0.9, 0.1])
    assert da.tolist() == [[5, 5], [0, 0], [1, 2]]
    da, db, dw = dedupe_control_points(pb, pa, None, key="b")
    assert db.tolist() == [[0, 0], [5, 5], [1, 2]] and dw.tolist() == [1, 1, 1]


def test_full_pipeline_on_shifted_features():
    """MNN → filter → control points on a known shift: every pixel pair is displaced by stride·shift."""
    g = torch.Generator().manual_seed(7)
    C, H, W = 32, 12, 14
    fa = torch.randn(C, H, W, generator=g)
    fb = torch.roll(fa, shifts=(2, -3), dims=(1, 2)) + 0.05 * torch.randn(C, H, W, generator=g)
    mask_a = torch.zeros(H, W, dtype=torch.bool)
    mask_a[:10, 3:] = True
    mask_b = torch.roll(mask_a, shifts=(2, -3), dims=(0, 1))
    m = mutual_nearest_neighbors(fa, fb, mask_a, mask_b)
    m = filter_matches(*m, (H, W), (H, W))
    pa, pb, w = control_points(*m, (H, W), (H, W), mode="random", seed=0)
    assert torch.allclose(pb - pa, torch.tensor([-48.0, 32.0]).expand_as(pa))
    assert len(pa) > 0.9 * 4 * mask_a.sum().item()
