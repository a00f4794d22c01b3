"""Deep-feature matching for the initial registration (docs/method.md §2b, §2c).

Pipeline: :func:`mutual_nearest_neighbors` on two feature maps → optional
:func:`filter_matches` (RANSAC homography on token-grid coordinates) → :func:`control_points`
(token matches → pixel control-point pairs for the MLS warp) → optionally
:func:`dedupe_control_points`.

Indices are over row-major flattened grids: token ``(row, col)`` of a ``[H, W]`` grid has index
``row * W + col``; grid coordinates are ``(x, y) = (col, row)``.
"""

from __future__ import annotations

import inspect
from typing import Optional, Sequence

import torch

from ..tensors.shapes import as_hw

__all__ = [
    "NoMatchError",
    "mutual_nearest_neighbors",
    "filter_matches",
    "control_points",
    "dedupe_control_points",
    "grid_xy",
]

# Elements of one [chunk, Nb] similarity block when ``chunk`` is automatic: 4 Mi float32 = 16 MiB,
# large enough that the matmul runs at full BLAS speed, small enough for the ≤100 MB goal at
# 4096×4096 tokens.
_BLOCK_ELEMS = 1 << 22

class NoMatchError(ValueError):
    """No usable match is left. ``stage`` says where it was lost, so a caller can word its own advice:

    * ``"mutual"``: no mutual nearest neighbour inside the masks;
    * ``"ransac"``: the outlier filter kept none;
    * ``"control_points"``: matches exist but none gave a control point (``detail`` says why).
    """

    def __init__(self, message: str, stage: str, detail: str = ""):
        super().__init__(message)
        self.stage = stage
        self.detail = detail


_NO_MATCH_HINT = (
    "try DIFT features (better for textured garments), a looser outlier filter or none "
    "(threshold=None), and check that both masks cover the garment"
)


def _grid_mask(mask: Optional[torch.Tensor], hw: tuple[int, int], name: str) -> Optional[torch.Tensor]:
    """Validate a token-grid mask and return it as bool ``[H*W]`` (or None)."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {hw}, got {type(mask).__name__}")
    m = mask
    while m.ndim > 2 and m.shape[0] == 1:
        m = m[0]
    if tuple(m.shape) != tuple(hw):
        raise ValueError(
            f"{name} has shape {tuple(mask.shape)} but the feature grid is {hw[0]}x{hw[1]}: "
            "resize the mask to the feature grid first (tensors.masks.resize_to_grid)"
        )
    if m.dtype != torch.bool:
        if m.is_floating_point() and torch.isnan(m).any():
            raise ValueError(f"{name} contains NaN: check the node that produced it")
        m = m > 0.5
    return m.reshape(-1)


def _check_feat(feat: torch.Tensor, name: str) -> None:
    if not isinstance(feat, torch.Tensor) or feat.ndim != 3:
        shape = tuple(feat.shape) if isinstance(feat, torch.Tensor) else type(feat).__name__
        raise ValueError(f"{name} must be a [C, H, W] feature map, got {shape}: drop the batch dimension (feat[0])")
    if not (feat.is_floating_point()):
        raise ValueError(f"{name} must be a floating tensor, got {feat.dtype}")
    if feat.numel() == 0:
        raise ValueError(f"{name} is empty (shape {tuple(feat.shape)})")


@torch.no_grad()
def mutual_nearest_neighbors(
    feat_a: torch.Tensor,
    feat_b: torch.Tensor,
    mask_a: Optional[torch.Tensor] = None,
    mask_b: Optional[torch.Tensor] = None,
    chunk: Optional[int] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mutual nearest neighbours of two feature maps under cosine similarity, restricted to masks.

    Token ``i`` of A and ``j`` of B match when ``j`` is the most similar B token (inside
    ``mask_b``) to ``i`` AND ``i`` is the most similar A token (inside ``mask_a``) to ``j``.
    Tokens outside a mask are never matched and never compete (unlike the research code, which
    filled out-of-mask similarities with ``min(S)`` and so could pair two out-of-mask top-left
    tokens). Mutual NN is one-to-one: no index appears twice in ``index_a`` or in ``index_b``.

    Args:
        feat_a: ``[C, Ha, Wa]`` features (any float dtype; computed in float32, L2-normalised along C;
            an all-zero vector has similarity 0 with everything).
        feat_b: ``[C, Hb, Wb]`` features, same C and device.
        mask_a: optional ``[Ha, Wa]`` mask at the feature grid (bool, or float thresholded at 0.5;
            leading singleton dims are accepted). None = all tokens.
        mask_b: same for B.
        chunk: A tokens per similarity block; at most a ``[chunk, Nb_in_mask]`` float32 block exists
            at once. None picks ``max(1, 4Mi // Nb_in_mask)`` (a 16 MiB block).

    Returns:
        ``(index_a, index_b, score)``: ``LongTensor[M]``, ``LongTensor[M]`` (row-major flat indices
        into the A and B grids) and ``FloatTensor[M]`` (float32 cosine similarity), sorted by
        ``index_a``, on ``feat_a``'s device.

    Ties: the lowest index wins, in both directions, so results are deterministic for a given
    input and ``chunk``.

    Memory: besides the inputs, one ``[chunk, Nb]`` float32 block, one ``[chunk, C]`` slice of A
    when A needs a gather (mask) or a float32 conversion, and a ``C × Nb`` float32 copy of B only
    when B needs one (mask or non-float32 dtype). Float32 unmasked 4096×4096×1280: ≈ 25 MB.

    Raises:
        ValueError: wrong shapes, empty mask, NaN/inf features, no match.
    """
    _check_feat(feat_a, "feat_a")
    _check_feat(feat_b, "feat_b")
    C, Ha, Wa = feat_a.shape
    Cb, Hb, Wb = feat_b.shape
    if C != Cb:
        raise ValueError(
            f"feat_a has {C} channels but feat_b has {Cb}: both must come from the same network layer"
        )
    if feat_a.device != feat_b.device:
        raise ValueError(f"feat_a is on {feat_a.device} but feat_b on {feat_b.device}: move them to one device")
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int or None, got {chunk!r}")
    device = feat_a.device
    ma = _grid_mask(mask_a, (Ha, Wa), "mask_a")
    mb = _grid_mask(mask_b, (Hb, Wb), "mask_b")
    for m, name, hw, what in ((ma, "mask_a", (Ha, Wa), "A"), (mb, "mask_b", (Hb, Wb), "B")):
        if m is not None and not bool(m.any()):
            raise ValueError(
                f"{name} is empty at the {hw[0]}x{hw[1]} feature grid: no token of {what} can be matched. "
                "Connect a mask that covers the garment (reference) / the region to repaint (target); "
                "a thin mask may vanish when resized: use resize_to_grid(..., keep_thin=True)"
            )
    idx_a = torch.nonzero(ma.to(device)).flatten() if ma is not None else None
    idx_b = torch.nonzero(mb.to(device)).flatten() if mb is not None else None

    flat_a = feat_a.reshape(C, Ha * Wa)
    flat_b = feat_b.reshape(C, Hb * Wb)
    # B: selected and float32 once ([C, nb]); a float32 unmasked input is used in place, no copy.
    # Neither side is normalised in a copy: each block of dot products is divided by the two norm
    # vectors in place, so the only large temporaries are one [n, C] slice of A (when it needs a
    # dtype conversion or gather) and the [n, nb] block.
    b = (flat_b.index_select(1, idx_b) if idx_b is not None else flat_b).to(torch.float32)
    b_norm = torch.linalg.vector_norm(b, dim=0)
    if not bool(torch.isfinite(b_norm).all()):
        raise ValueError("feat_b contains NaN or inf (inside mask_b): check the feature extractor / model dtype")
    b_norm = b_norm.clamp_min_(1e-12)[None, :]
    nb = b.shape[1]
    na = idx_a.numel() if idx_a is not None else Ha * Wa
    step = chunk if chunk is not None else max(1, _BLOCK_ELEMS // nb)

    row_best = torch.empty(na, dtype=torch.long, device=device)
    row_val = torch.empty(na, dtype=torch.float32, device=device)
    col_val = torch.full((nb,), -float("inf"), dtype=torch.float32, device=device)
    col_best = torch.zeros(nb, dtype=torch.long, device=device)
    # One block buffer for all chunks: allocating and freeing a fresh block per chunk lets small
    # allocations fragment the freed space, and the peak then holds two blocks.
    buf = torch.empty((min(step, na), nb), dtype=torch.float32, device=device)
    for s in range(0, na, step):
        e = min(na, s + step)
        a = flat_a[:, s:e] if idx_a is None else flat_a.index_select(1, idx_a[s:e])
        a = a.t().to(torch.float32)  # [n, C]
        a_norm = torch.linalg.vector_norm(a, dim=1)
        if not bool(torch.isfinite(a_norm).all()):
            raise ValueError("feat_a contains NaN or inf (inside mask_a): check the feature extractor / model dtype")
        block = torch.matmul(a, b, out=buf[: e - s])  # [n, nb] dot products
        del a
        block.div_(a_norm.clamp_min_(1e-12)[:, None]).div_(b_norm)  # → cosine similarities
        row_val[s:e], row_best[s:e] = block.max(dim=1)
        v, i = block.max(dim=0)
        # Strict ">" keeps the earlier (lower) A index on ties across blocks.
        better = v > col_val
        col_val = torch.where(better, v, col_val)
        col_best = torch.where(better, i + s, col_best)

    local_a = torch.arange(na, device=device)
    mutual = col_best[row_best] == local_a
    la = local_a[mutual]
    lb = row_best[mutual]
    score = row_val[mutual]
    if la.numel() == 0:
        raise NoMatchError(f"no mutual nearest neighbours were found between the masked features: {_NO_MATCH_HINT}",
                           "mutual", "no mutual nearest neighbours were found between the masked features")
    index_a = idx_a[la] if idx_a is not None else la
    index_b = idx_b[lb] if idx_b is not None else lb
    return index_a, index_b.to(device), score


def grid_xy(index: torch.Tensor, grid: Sequence[int]) -> torch.Tensor:
    """Row-major flat indices of an ``(H, W)`` grid → float32 ``[M, 2]`` ``(x, y) = (col, row)``."""
    _, W = as_hw(grid, "grid", square_ok=False)
    index = index.long()
    return torch.stack([index % W, torch.div(index, W, rounding_mode="floor")], dim=1).to(torch.float32)


def _check_triple(index_a: torch.Tensor, index_b: torch.Tensor, score: torch.Tensor, grid_a, grid_b) -> None:
    if not (index_a.ndim == index_b.ndim == score.ndim == 1) or not (
        index_a.shape[0] == index_b.shape[0] == score.shape[0]
    ):
        raise ValueError(
            f"index_a, index_b, score must be 1-D of one length, got {tuple(index_a.shape)}, "
            f"{tuple(index_b.shape)}, {tuple(score.shape)}: pass mutual_nearest_neighbors' output unchanged"
        )
    for idx, grid, name in ((index_a, grid_a, "a"), (index_b, grid_b, "b")):
        h, w = as_hw(grid, f"grid_{name}", square_ok=False)
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= h * w):
            raise ValueError(
                f"index_{name} has values outside the {h}x{w} grid_{name}: pass the feature grid size the "
                "indices came from"
            )


def _ransac_class():
    try:
        from kornia.geometry.ransac import RANSAC
    except ImportError as exc:  # pragma: no cover - kornia is a ComfyUI dependency
        raise ImportError("filter_matches needs kornia (pip install kornia), or pass threshold=None") from exc
    return RANSAC


def filter_matches(
    index_a: torch.Tensor,
    index_b: torch.Tensor,
    score: torch.Tensor,
    grid_a: Sequence[int],
    grid_b: Sequence[int],
    threshold: Optional[float] = 5.0,
    seed: int = 0,
    max_iter: int = 10,
    confidence: float = 0.99,
    return_inliers: bool = False,
):
    """Remove matches inconsistent with one global homography between the token grids (RANSAC).

    A homography H from A's grid ``(x, y)`` to B's is fitted with kornia's RANSAC; a match is kept
    when ``|H(x_a) − x_b| ≤ threshold`` cells (one-way transfer error, Euclidean, in B's grid
    cells). kornia ≥ 0.8 takes ``inl_th`` in those units (not squared; checked against kornia
    0.9.0); the final inlier mask is recomputed here from the returned model at exactly
    ``threshold`` cells, so the meaning does not depend on the kornia version.

    Deterministic: the RANSAC draws come from a generator seeded with ``seed``; torch's global RNG
    state is restored afterwards (``fork_rng``), and kornia's own ``seed`` is used when available.

    Args:
        index_a, index_b, score: the output of :func:`mutual_nearest_neighbors`, ``[M]`` each.
        grid_a, grid_b: ``(H, W)`` of the token grids the indices refer to.
        threshold: inlier threshold in cells (paper: 5, loose and global). None → no filtering.
        seed: RANSAC seed.
        max_iter, confidence: passed to kornia's RANSAC.
        return_inliers: also return the bool ``[M]`` inlier mask.

    Returns:
        ``(index_a, index_b, score)`` restricted to the inliers, same order; plus the mask if
        ``return_inliers``. With fewer than 5 matches the input is returned unchanged (a
        homography fits any 4 points exactly, so there is nothing to test; kornia needs more
        inliers than its 4-point sample).

    Raises:
        ValueError: RANSAC finds no model or no match survives.
    """
    _check_triple(index_a, index_b, score, grid_a, grid_b)
    M = index_a.shape[0]
    keep_all = torch.ones(M, dtype=torch.bool, device=index_a.device)
    if threshold is None or M < 5:
        return (index_a, index_b, score, keep_all) if return_inliers else (index_a, index_b, score)
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not threshold > 0:
        raise ValueError(f"threshold must be a positive number of grid cells or None, got {threshold!r}")
    xa = grid_xy(index_a.cpu(), grid_a).double()
    xb = grid_xy(index_b.cpu(), grid_b).double()
    RANSAC = _ransac_class()
    kwargs = dict(model_type="homography", inl_th=float(threshold), max_iter=max_iter, confidence=confidence)
    if "seed" in inspect.signature(RANSAC.__init__).parameters:
        kwargs["seed"] = int(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model, _ = RANSAC(**kwargs)(xa, xb)
    if not bool(torch.isfinite(model).all()) or float(model.abs().sum()) == 0.0:
        detail = (f"no matches survive the outlier filter: RANSAC found no homography supported by more than 4 of "
                  f"the {M} matches within {threshold} cells")
        raise NoMatchError(f"{detail}; {_NO_MATCH_HINT}", "ransac", detail)
    inliers = _transfer_error(model, xa, xb) <= float(threshold)
    if not bool(inliers.any()):
        detail = f"no matches survive the outlier filter ({M} in, 0 out)"
        raise NoMatchError(f"{detail}: {_NO_MATCH_HINT}", "ransac", detail)
    inliers = inliers.to(index_a.device)
    out = (index_a[inliers], index_b[inliers], score[inliers])
    return (*out, inliers) if return_inliers else out


def _transfer_error(model: torch.Tensor, xa: torch.Tensor, xb: torch.Tensor) -> torch.Tensor:
    """Euclidean one-way transfer error ``|H(xa) − xb|`` ``[M]``; inf where H sends a point to infinity."""
    h = model.to(torch.float64)
    p = torch.cat([xa, torch.ones_like(xa[:, :1])], dim=1) @ h.T
    w = p[:, 2:]
    proj = p[:, :2] / torch.where(w.abs() > 1e-12, w, torch.full_like(w, float("nan")))
    err = torch.linalg.vector_norm(proj - xb, dim=1)
    return torch.nan_to_num(err, nan=float("inf"))


_MODES = ("random", "deterministic", "all")


def control_points(
    index_a: torch.Tensor,
    index_b: torch.Tensor,
    score: torch.Tensor,
    grid_a: Sequence[int],
    grid_b: Sequence[int],
    stride: int = 16,
    mode: str = "random",
    seed: int = 0,
    threshold: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token matches → pixel control-point pairs for the MLS warp (docs/method.md §2c).

    Each match ``(col, row)`` in A ↔ ``(col', row')`` in B gives up to 4 pairs, one per offset
    ``(ox, oy)`` in ``(0, 0), (0, s/2), (s/2, 0), (s/2, s/2)`` with ``s = stride`` (16 → offsets
    0 and 8, as the paper): ``a = (col·s + ox, row·s + oy)``, ``b = (col'·s + ox, row'·s + oy)``.

    Modes:
        ``"random"`` (paper): each sub-point kept independently with probability ``score``
        (clamped to [0, 1]), drawn from a ``torch.Generator`` seeded with ``seed`` — same seed,
        same points. ``"deterministic"``: all 4 sub-points of matches with ``score ≥ threshold``.
        ``"all"``: every sub-point.

    Returns:
        ``(points_a [K, 2], points_b [K, 2], weights [K])``, float32 pixel ``(x, y)``; the weight
        is the match's score. Ordered by match, then offset. With ``stride < 2`` the 4 offsets
        coincide and only ``(0, 0)`` is emitted.

    Raises:
        ValueError: bad mode/stride, or no point kept.
    """
    _check_triple(index_a, index_b, score, grid_a, grid_b)
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(f"stride must be a positive int (pixels per token, 16 for SD's 1/16 features), got {stride!r}")
    device = index_a.device
    half = stride / 2.0
    offsets = [(0.0, 0.0), (0.0, half), (half, 0.0), (half, half)] if stride >= 2 else [(0.0, 0.0)]
    off = torch.tensor(offsets, dtype=torch.float32, device=device)  # [S, 2]
    M, S = index_a.shape[0], off.shape[0]
    pa = (grid_xy(index_a, grid_a).to(device) * stride)[:, None, :] + off[None]  # [M, S, 2]
    pb = (grid_xy(index_b, grid_b).to(device) * stride)[:, None, :] + off[None]
    sc = score.to(device=device, dtype=torch.float32)
    if mode == "random":
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        u = torch.rand((M, S), generator=gen).to(device)
        keep = u < sc.clamp(0.0, 1.0)[:, None]
    elif mode == "deterministic":
        keep = (sc >= float(threshold))[:, None].expand(M, S)
    else:
        keep = torch.ones((M, S), dtype=torch.bool, device=device)
    w = sc[:, None].expand(M, S)
    points_a, points_b, weights = pa[keep], pb[keep], w[keep]
    if points_a.shape[0] == 0:
        detail = "every random draw rejected its point (scores are low)" if mode == "random" else (
            f"no match has score ≥ {threshold}" if mode == "deterministic" else "there are no matches"
        )
        raise NoMatchError(f"no control points: {detail}; lower the threshold or use mode='all', or {_NO_MATCH_HINT}",
                           "control_points", f"no control points: {detail}")
    return points_a.contiguous(), points_b.contiguous(), weights.contiguous()


def dedupe_control_points(
    points_a: torch.Tensor,
    points_b: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    key: str = "a",
    decimals: int = 3,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop control pairs whose ``key`` point repeats another's.

    MLS interpolates its control points, so two pairs with the same point on the evaluated side and
    different partners make its system singular there. Points are compared after rounding to
    ``decimals`` decimals of a pixel. Among duplicates the pair with the highest weight is kept
    (the first one on ties, or the first one when ``weights`` is None); survivors keep their
    original order.

    Args:
        points_a, points_b: ``[K, 2]`` pixel pairs.
        weights: ``[K]`` or None (returned as ones).
        key: ``"a"``, ``"b"`` or ``"both"`` (``"both"`` dedupes on a, then on b). For MLS in paper
            use (``src`` = target points) pass the side given as ``src``.
        decimals: comparison precision.

    Returns:
        ``(points_a, points_b, weights)`` with duplicates removed.
    """
    if points_a.ndim != 2 or points_a.shape[1] != 2 or points_a.shape != points_b.shape:
        raise ValueError(
            f"points_a and points_b must both be [K, 2], got {tuple(points_a.shape)} and {tuple(points_b.shape)}"
        )
    if weights is None:
        weights = torch.ones(points_a.shape[0], dtype=torch.float32, device=points_a.device)
    if weights.shape != points_a.shape[:1]:
        raise ValueError(f"weights must be [K] = [{points_a.shape[0]}], got {tuple(weights.shape)}")
    if key not in ("a", "b", "both"):
        raise ValueError(f"key must be 'a', 'b' or 'both', got {key!r}")
    if key == "both":
        pa, pb, w = dedupe_control_points(points_a, points_b, weights, "a", decimals)
        return dedupe_control_points(pa, pb, w, "b", decimals)
    pts = points_a if key == "a" else points_b
    K = pts.shape[0]
    if K == 0:
        return points_a, points_b, weights
    q = torch.round(pts.double() * 10**decimals)
    _, group = torch.unique(q, dim=0, return_inverse=True)
    # Order by (group, -weight, position) so the first row of each group is the one to keep.
    # Stable sorts from the least to the most significant key, starting from position order.
    order = torch.argsort(-weights.to(device=pts.device, dtype=torch.float64), stable=True)
    order = order[torch.argsort(group[order], stable=True)]
    g = group[order]
    first = torch.ones_like(g, dtype=torch.bool)
    first[1:] = g[1:] != g[:-1]
    kept = torch.sort(order[first]).values
    return points_a[kept], points_b[kept], weights[kept]
