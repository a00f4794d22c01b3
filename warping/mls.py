"""Moving Least Squares image deformation (Schaefer, McPhail, Warren 2006) and map-based warping.

Coordinates are **pixel (x, y)**: ``x`` is the column, ``y`` the row, and the *centre* of the pixel
in column ``j`` / row ``i`` is ``(x=j, y=i)``. So an image of width ``W`` spans ``x`` in
``[-0.5, W - 0.5]`` and the last pixel centre is ``x = W - 1``.

Public API
----------
* :func:`mls_deform` -- evaluate the MLS map taking control points ``src`` to ``dst`` at arbitrary
  points (affine, similarity or rigid; weights ``w_i = 1 / |p_i - v|^(2 alpha)``).
* :func:`backward_map` -- the ``[H, W, 2]`` sampling map for every output pixel (exact, or on a
  coarse grid upsampled bilinearly).
* :func:`warp` -- sample images or masks through such a map (``grid_sample``, zeros outside).

Paper use (SPEC 2d): ``backward_map(src=target_points, dst=reference_points, H, W, "affine",
alpha=0.1)`` gives, for every target pixel, where to read the reference; then
``warp(reference, map, "nearest")`` (paper mode) or ``"bilinear"``.

How it is computed
------------------
The public vectorised code evaluates MLS with whole-image arrays per control point
(``[K, H, W]`` and larger), which costs ``O(K H W)`` memory. Here every variant is written with
per-point weighted moments of the control points, evaluated chunk by chunk over the points so that
only a few ``[chunk, K]`` arrays exist at once (about 1 MiB each). With ``d_i = p_i - v`` (control
points *relative to the evaluated point*, which keeps float32 cancellation small) and
``W = sum w_i``::

    m   = sum w_i d_i / W                 = p* - v
    C   = sum w_i d_i d_i^T / W - m m^T   = sum w_i p^_i p^_i^T / W     (2x2)
    q*  = sum w_i q_i / W
    D   = sum w_i d_i q_i^T / W - m q*^T  = sum w_i p^_i q^_i^T / W     (2x2)

* affine:      ``f(v) = (v - p*) C^-1 D + q*``
* similarity:  with complex numbers ``c = sum w conj(p^) q^ / W = (D00 + D11) + i (D01 - D10)``
  and ``mu = trace C``: ``f(v) = (v - p*) c / mu + q*`` (the paper's ``A_i`` / ``mu_s`` form).
* rigid:       ``f(v) = (v - p*) c / |c| + q*`` (equal to the paper's ``|v - p*| f_r / |f_r| + q*``).

Weights are rescaled per point to ``(d_min^2 / |d_i|^2)^alpha`` in ``(0, 1]`` -- MLS is invariant
to a common factor -- so no weight overflows even for points a hair away from a control point.

Degenerate cases (never NaN)
----------------------------
* A point that coincides exactly with control point(s) maps exactly to their ``dst`` (the mean of
  the ``dst`` of all coinciding ``src``, should ``src`` contain duplicates).
* ``K == 1``, or all weighted ``src`` identical (``trace C`` at round-off level): **translation**,
  ``f(v) = v - p* + q*``.
* affine with a singular ``C`` (``K == 2``, collinear ``src``; tested against round-off level,
  i.e. ``det C <= 256 eps (|d|^2 mean) trace C``): falls back to the **similarity** solution, which
  still interpolates two points exactly. Near-collinear but not singular configurations keep the
  (steep) affine solution.
* rigid with ``c`` at round-off level (e.g. all ``dst`` identical): no rotation (``c/|c| := 1``).

Precision
---------
Arithmetic runs in float32, or float64 when any of ``points``/``src``/``dst`` is float64. fp16/bf16
inputs are promoted to float32 and **the result stays float32**: fp16 cannot even represent every
pixel position above 2048 and has 0.25-0.5 px steps at 512-1024, bf16 is 8x coarser; the map is
consumed by :func:`warp`, which samples in float32 anyway. Measured float32 error against a float64
evaluation at 512x512 with 16-256 random control points: well below 1e-3 px (see
``bench/bench_mls.py``, column ``exact err``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["mls_deform", "backward_map", "warp", "KINDS", "DEFAULT_STRIDE"]

KINDS = ("affine", "similarity", "rigid")

#: Coarse-grid stride the nodes use by default. At 512x512 with 16-256 random control points of
#: every kind and alpha in {0.1, 1} the upsampled map is within p99 <= 0.25 px of the exact one
#: (measured by ``bench/bench_mls.py``; see :func:`backward_map`).
DEFAULT_STRIDE = 4

# Elements of one [chunk, K] intermediate: 2**16 float32 = 256 KiB, so the ~7 live intermediates of a
# chunk stay in L2 and the working memory is a few MiB whatever the image size and K.
_CHUNK_ELEMS = 1 << 16


# --------------------------------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------------------------------


def _as_coords(x: Any, name: str, *, min_rows: int) -> torch.Tensor:
    """Return ``x`` as a real ``[N, 2]`` tensor, raising ValueError that says what to fix."""
    if not isinstance(x, torch.Tensor):
        try:
            x = torch.as_tensor(x)
        except Exception as exc:  # noqa: BLE001 - re-raised with a message that says what to do
            raise ValueError(
                f"{name} must be a tensor (or array-like) of shape [N, 2] with (x, y) pixel coordinates; "
                f"could not convert {type(x).__name__}: {exc}"
            ) from exc
    if x.ndim != 2 or x.shape[1] != 2:
        raise ValueError(
            f"{name} must have shape [N, 2] with (x, y) pixel coordinates, got shape {tuple(x.shape)}"
            + (": pass a 2-D tensor, e.g. x.reshape(-1, 2)" if x.numel() % 2 == 0 and x.numel() else "")
        )
    if x.dtype == torch.bool or x.is_complex():
        raise ValueError(f"{name} must hold real numbers (float or int), got dtype {x.dtype}")
    if x.shape[0] < min_rows:
        raise ValueError(
            f"{name} has {x.shape[0]} points; MLS needs at least {min_rows} control point: "
            "check that the matching step kept some matches (lower its thresholds or masks)"
        )
    if x.is_floating_point():
        bad = ~torch.isfinite(x).all(dim=1)
        if bool(bad.any()):
            rows = bad.nonzero().flatten()[:5].tolist()
            raise ValueError(
                f"{name} contains NaN or inf (rows {rows}{'...' if int(bad.sum()) > 5 else ''}): "
                "drop or fix those points before calling"
            )
    return x


def _check_kind_alpha(kind: str, alpha: float) -> float:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    try:
        alpha = float(alpha)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}") from exc
    if not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(
            f"alpha must be a finite number > 0 (weights are 1/|p - v|^(2 alpha)); got {alpha}. "
            "Paper mode uses 0.1, Schaefer et al. use 1"
        )
    return alpha


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------------
# core
# --------------------------------------------------------------------------------------------------


def _mls_into(out: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, kind: str, alpha: float) -> None:
    """Evaluate MLS at ``v`` [N, 2] and write it to ``out`` [N, 2] (all same dtype/device).

    ``src``/``dst`` [K, 2] are the raw control points (compute dtype).
    """
    n_pts, k = v.shape[0], src.shape[0]
    dtype, device = v.dtype, v.device
    eps = torch.finfo(dtype).eps

    # MLS commutes with translations of (v, p) and of q: centring keeps magnitudes (and thus float32
    # round-off in the moment differences) small. Affine and similarity MLS are linear in q and
    # reproduce the identity, so f(v) = v + MLS_u(v) with the displacements u = q - p: usually much
    # smaller than q, which cuts the float32 error several-fold. Rigid is not linear in q.
    relative = kind != "rigid"
    p0 = src.mean(0)
    u = dst - src if relative else dst
    q0 = u.mean(0)
    p = src - p0
    q = u - q0
    px = p[:, 0].contiguous()
    py = p[:, 1].contiguous()
    # rows: qx, qy, |q|^2 -> one small GEMM gives sum w q and sum w d q^T (and the q spread for rigid)
    qt = torch.stack([q[:, 0], q[:, 1], (q * q).sum(1)]).contiguous()  # [3, K]

    chunk = max(1, _CHUNK_ELEMS // k)
    dbuf = torch.empty(2, min(chunk, n_pts), k, dtype=dtype, device=device)
    ebuf = torch.empty(3, min(chunk, n_pts), k, dtype=dtype, device=device)

    for s in range(0, n_pts, chunk):
        e_ = min(s + chunk, n_pts)
        n = e_ - s
        vc = v[s:e_] - p0  # [n, 2]
        D = dbuf[:, :n]
        E = ebuf[:, :n]
        torch.sub(px, vc[:, :1], out=D[0])  # d = p - v  [n, K]
        torch.sub(py, vc[:, 1:], out=D[1])
        w = E[0]
        torch.mul(D[0], D[0], out=w)
        w.addcmul_(D[1], D[1])  # |d|^2
        d2min = w.amin(dim=1, keepdim=True)  # [n, 1]
        hit = d2min[:, 0] == 0
        exact = None
        if bool(hit.any()):
            # infinite weight: the point *is* a control point -> its dst, exactly (mean of duplicates)
            hrows = hit.nonzero().flatten()
            hm = (w[hrows] == 0).to(dtype)  # [h, K]
            exact = (hrows, (hm @ dst) / hm.sum(1, keepdim=True))
            d2min = torch.where(d2min > 0, d2min, torch.ones_like(d2min))  # keep the hit rows finite-ish
        # w = (d2min / d2)^alpha in (0, 1]; exp/log is ~5x faster than pow on CPU
        if alpha == 1.0:
            torch.reciprocal(w, out=w).mul_(d2min)
        else:
            torch.log(w, out=w)
            w.sub_(d2min.log()).mul_(-alpha).exp_()
        torch.mul(w, D[0], out=E[1])
        torch.mul(w, D[1], out=E[2])

        S = E.sum(dim=2)  # [3, n]: W, sum w dx, sum w dy
        M2 = torch.einsum("ank,bnk->nab", E[1:3], D)  # [n, 2, 2]: sum w d_a d_b
        G = torch.mm(qt, E.reshape(3 * n, k).t()).view(3, 3, n)  # [qx|qy|q2, w|wdx|wdy, n]

        W = S[0]
        mx, my = S[1] / W, S[2] / W
        cxx = M2[:, 0, 0] / W - mx * mx
        cxy = M2[:, 0, 1] / W - mx * my
        cyy = M2[:, 1, 1] / W - my * my
        qsx, qsy = G[0, 0] / W, G[1, 0] / W
        dxx = G[0, 1] / W - mx * qsx
        dxy = G[1, 1] / W - mx * qsy
        dyx = G[0, 2] / W - my * qsx
        dyy = G[1, 2] / W - my * qsy
        s2 = (M2[:, 0, 0] + M2[:, 1, 1]) / W  # raw spread about v: scale of round-off in C
        tr = cxx + cyy
        ex, ey = -mx, -my  # v - p*

        translate = tr <= 64 * eps * s2
        c_re = dxx + dyy
        c_im = dxy - dyx
        if kind == "rigid":
            q2 = G[2, 0] / W  # raw spread of q about the global centre
            cabs = torch.sqrt(c_re * c_re + c_im * c_im)
            no_rot = translate | (cabs <= 64 * eps * torch.sqrt(s2 * q2))
            safe = torch.where(no_rot, torch.ones_like(cabs), cabs)
            zr = torch.where(no_rot, torch.ones_like(cabs), c_re / safe)
            zi = torch.where(no_rot, torch.zeros_like(cabs), c_im / safe)
            fx = ex * zr - ey * zi
            fy = ex * zi + ey * zr
        else:
            safe_tr = torch.where(translate, torch.ones_like(tr), tr)
            zr = torch.where(translate, torch.ones_like(tr), c_re / safe_tr)
            zi = torch.where(translate, torch.zeros_like(tr), c_im / safe_tr)
            fx = ex * zr - ey * zi
            fy = ex * zi + ey * zr
            if kind == "affine":
                det = cxx * cyy - cxy * cxy
                ok = (~translate) & (det > 256 * eps * s2 * tr)
                sdet = torch.where(ok, det, torch.ones_like(det))
                rx = (ex * cyy - ey * cxy) / sdet  # (v - p*) C^-1
                ry = (ey * cxx - ex * cxy) / sdet
                fx = torch.where(ok, rx * dxx + ry * dyx, fx)
                fy = torch.where(ok, rx * dxy + ry * dyy, fy)
        o = out[s:e_]
        torch.add(fx, qsx + q0[0], out=o[:, 0])
        torch.add(fy, qsy + q0[1], out=o[:, 1])
        if relative:
            o += v[s:e_]
        if exact is not None:
            o[exact[0]] = exact[1]


def mls_deform(
    points: torch.Tensor,
    src: torch.Tensor,
    dst: torch.Tensor,
    kind: str = "affine",
    alpha: float = 1.0,
) -> torch.Tensor:
    """Evaluate the Moving Least Squares map taking ``src`` to ``dst`` at ``points``.

    Args:
        points: ``[N, 2]`` (x, y) pixel coordinates where the map is evaluated (``N`` may be 0).
        src: ``[K, 2]`` control points ``p_i`` (``K >= 1``).
        dst: ``[K, 2]`` their images ``q_i``.
        kind: ``"affine"``, ``"similarity"`` (rotation + uniform scale) or ``"rigid"`` (rotation).
        alpha: weight exponent, ``w_i = 1 / |p_i - v|^(2 alpha)``, ``> 0``.

    Returns:
        ``[N, 2]`` mapped (x, y), float32 (float64 if any input is float64; fp16/bf16 inputs give
        float32, see module docstring), on ``points``' device.

    The map interpolates: a point equal to ``src[i]`` maps exactly to ``dst[i]``. Memory is
    ``O(K)`` per point chunk, never ``O(N K)``. Degenerate configurations fall back as described in
    the module docstring (translation / similarity), never to NaN.

    Raises:
        ValueError: wrong shapes, mismatched ``K``, no control point, NaN/inf, unknown ``kind``,
            ``alpha <= 0``.
    """
    points = _as_coords(points, "points", min_rows=0)
    src = _as_coords(src, "src", min_rows=1)
    dst = _as_coords(dst, "dst", min_rows=1)
    if src.shape[0] != dst.shape[0]:
        raise ValueError(
            f"src and dst must pair up: src has {src.shape[0]} points, dst has {dst.shape[0]}; "
            "pass matched control points (row i of src goes to row i of dst)"
        )
    alpha = _check_kind_alpha(kind, alpha)
    dtype = _compute_dtype(points, src, dst)
    device = points.device
    v = points.to(device=device, dtype=dtype)
    p = src.to(device=device, dtype=dtype)
    q = dst.to(device=device, dtype=dtype)
    out = torch.empty(v.shape[0], 2, dtype=dtype, device=device)
    if v.shape[0]:
        _mls_into(out, v, p, q, kind, alpha)
    return out


def _axis(n: int, stride: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Sample positions 0..n-1 every <= ``stride`` px, evenly spaced, first and last included."""
    if stride == 1 or n <= 2:
        return torch.arange(n, dtype=dtype, device=device)
    m = -(-(n - 1) // stride) + 1  # ceil((n-1)/stride) intervals
    return torch.linspace(0, n - 1, m, dtype=dtype, device=device)


def backward_map(
    src: torch.Tensor,
    dst: torch.Tensor,
    height: int,
    width: int,
    kind: str = "affine",
    alpha: float = 1.0,
    stride: int = 1,
) -> torch.Tensor:
    """For every pixel of an ``height x width`` output, the source (x, y) to sample.

    ``map[i, j] = mls_deform((x=j, y=i), src, dst)``: so pass ``src`` = points in the *output*
    (target) image and ``dst`` = where they are in the *source* (reference) image, then feed the map
    to :func:`warp` with the source image.

    Args:
        src, dst: ``[K, 2]`` control points, (x, y) pixels.
        height, width: output size (``>= 1``).
        kind, alpha: as in :func:`mls_deform`.
        stride: 1 = exact MLS at every pixel. ``s > 1`` evaluates MLS on a grid every ``<= s`` px
            (evenly spaced, first and last row/column included) and upsamples it bilinearly
            (``align_corners=True``, so grid nodes are exact). Measured at 512x512, 16/64/256 random
            control points, alpha 0.1 and 1, every kind (``bench/bench_mls.py``): stride 4 gives
            p99 <= 0.1 px and stride 8 p99 <= 0.4 px from the exact map; the maximum error sits
            next to control points, where MLS bends sharply (a few px for alpha = 1 at stride 8).
            Cost drops about ``s^2``-fold.

    Returns:
        ``[height, width, 2]`` float32 (float64 if ``src``/``dst`` are float64), on ``src``'s device.
    """
    src = _as_coords(src, "src", min_rows=1)
    dst = _as_coords(dst, "dst", min_rows=1)
    if src.shape[0] != dst.shape[0]:
        raise ValueError(
            f"src and dst must pair up: src has {src.shape[0]} points, dst has {dst.shape[0]}; "
            "pass matched control points (row i of src goes to row i of dst)"
        )
    alpha = _check_kind_alpha(kind, alpha)
    for name, val in (("height", height), ("width", width)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 1:
            raise ValueError(f"{name} must be an int >= 1 (output size in pixels), got {val!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
        raise ValueError(
            f"stride must be an int >= 1 (1 = exact; {DEFAULT_STRIDE} = fast coarse grid), got {stride!r}"
        )
    dtype = _compute_dtype(src, dst)
    device = src.device
    p = src.to(dtype=dtype)
    q = dst.to(device=device, dtype=dtype)
    ys = _axis(height, stride, dtype, device)
    xs = _axis(width, stride, dtype, device)
    gy, gx = torch.meshgrid(ys, xs, indexing="ij")
    v = torch.stack([gx.reshape(-1), gy.reshape(-1)], dim=1)
    coarse = torch.empty_like(v)
    _mls_into(coarse, v, p, q, kind, alpha)
    coarse = coarse.view(ys.numel(), xs.numel(), 2)
    if ys.numel() == height and xs.numel() == width:
        return coarse
    # Interpolate the displacement, not the absolute position: same result in exact arithmetic
    # (bilinear reproduces the identity) but smaller numbers to round.
    disp = (coarse - torch.stack([gx, gy], dim=-1)).permute(2, 0, 1)[None]
    up = F.interpolate(disp, size=(height, width), mode="bilinear", align_corners=True)[0].permute(1, 2, 0)
    fy, fx = torch.meshgrid(
        torch.arange(height, dtype=dtype, device=device),
        torch.arange(width, dtype=dtype, device=device),
        indexing="ij",
    )
    up[..., 0] += fx
    up[..., 1] += fy
    return up.contiguous()


def warp(image: torch.Tensor, backward_map: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Sample ``image`` at the (x, y) source pixels given by ``backward_map``.

    Args:
        image: ``[B, C, Hs, Ws]`` floating point (images or masks; fp16/bf16/fp32/fp64).
        backward_map: ``[H, W, 2]`` (shared by the batch) or ``[B, H, W, 2]`` (or ``[1, H, W, 2]``),
            source pixel coordinates (x, y) with pixel centres at integers (as from
            :func:`backward_map`).
        mode: ``"bilinear"`` or ``"nearest"`` (paper mode; exact for integer maps).

    Returns:
        ``[B, C, H, W]`` in ``image``'s dtype and device.

    Implemented with ``grid_sample(align_corners=True, padding_mode="zeros")``: with
    ``align_corners=True`` the normalised -1/+1 are the centres of the first/last pixels, which is
    exactly the integer-centre convention here. Samples outside the source read 0 (for a mask:
    outside the garment); bilinear fades to 0 over the half pixel beyond the border. fp16/bf16 are
    sampled in float32 and cast back. Coordinates round half-to-even in ``nearest`` mode.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 4:
        raise ValueError(
            f"image must be a [B, C, H, W] tensor, got "
            f"{tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__}: "
            "add batch/channel dims, e.g. mask[None, None] or comfy_image.permute(0, 3, 1, 2)"
        )
    if not image.is_floating_point():
        raise ValueError(f"image must be floating point, got {image.dtype}: convert it with .float()")
    if mode not in ("bilinear", "nearest"):
        raise ValueError(f"mode must be 'bilinear' or 'nearest', got {mode!r}")
    if not isinstance(backward_map, torch.Tensor) or backward_map.ndim not in (3, 4) or backward_map.shape[-1] != 2:
        raise ValueError(
            "backward_map must be [H, W, 2] or [B, H, W, 2] (x, y) source coordinates, got "
            f"{tuple(backward_map.shape) if isinstance(backward_map, torch.Tensor) else type(backward_map).__name__}"
        )
    if not backward_map.is_floating_point():
        backward_map = backward_map.float()
    b, c, hs, ws = image.shape
    grid = backward_map if backward_map.ndim == 4 else backward_map[None]
    if grid.shape[0] not in (1, b):
        raise ValueError(
            f"backward_map has batch {grid.shape[0]} but image has batch {b}: pass one map per image or a single [H, W, 2] map"
        )
    if not bool(torch.isfinite(grid).all()):
        raise ValueError("backward_map contains NaN or inf: rebuild it from finite control points")
    work = torch.float64 if image.dtype == torch.float64 else torch.float32
    img = image.to(work)
    grid = grid.to(device=image.device, dtype=work)
    # align_corners=True cannot express "outside" along a size-1 axis (every coordinate maps to the
    # one pixel), so give such images a zero border and shift the coordinates onto it.
    pad = 1 if (hs == 1 or ws == 1) else 0
    if pad:
        img = F.pad(img, (1, 1, 1, 1))
    hs_p, ws_p = hs + 2 * pad, ws + 2 * pad
    gx = (2 * (grid[..., 0] + pad) - (ws_p - 1)) / (ws_p - 1)  # exact -1/+1 at the edge centres
    gy = (2 * (grid[..., 1] + pad) - (hs_p - 1)) / (hs_p - 1)
    norm = torch.stack([gx, gy], dim=-1)
    if norm.shape[0] != b:
        norm = norm.expand(b, -1, -1, -1)
    out = F.grid_sample(img, norm, mode=mode, padding_mode="zeros", align_corners=True)
    return out.to(image.dtype)
