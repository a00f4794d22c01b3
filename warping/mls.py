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

Paper use (docs/method.md §2d): ``backward_map(src=target_points, dst=reference_points, H, W, "affine",
alpha=0.1)`` gives, for every target pixel, where to read the reference; then
``warp(reference, map, "nearest")`` (paper mode) or ``"bilinear"``.

How it is computed
------------------
The public vectorised code evaluates MLS with whole-image arrays per control point
(``[K, H, W]`` and larger), which costs ``O(K H W)`` memory. Here every variant is written with
per-point weighted moments of the control points, evaluated chunk by chunk over the points so that
only a few ``[K, chunk]`` arrays exist at once (512 KiB each; a few MiB in all). With ``d_i`` the
control points relative to the control point nearest to ``v`` (which then contributes exactly 0,
so float32 keeps the other points' influence even when the nearest weight dominates), the values
taken as displacements ``u_i = q_i - p_i`` (see below) and ``W = sum w_i``::

    m   = sum w_i d_i / W                 (p* relative to the nearest control point)
    C   = sum w_i d_i d_i^T / W - m m^T   = sum w_i p^_i p^_i^T / W     (2x2)
    u*  = sum w_i u_i / W
    D   = sum w_i d_i u_i^T / W - m u*^T  = sum w_i p^_i u^_i^T / W     (2x2)

All of them come out of one small GEMM per chunk (``[3, K] x [K, 6 chunk]``). Then, with complex
numbers for the 2-D rotation-scales, ``c_u = (D00 + D11) + i (D01 - D10)`` and ``mu = trace C``:

* affine:      ``f(v) = v + (v - p*) C^-1 D + u*``             (= ``(v - p*) C^-1 sum w p^T q^ + q*``)
* similarity:  ``f(v) = v + (v - p*) c_u / mu + u*``           (the paper's ``A_i`` / ``mu_s`` form)
* rigid:       ``f(v) = v + (v - p*) (c / |c| - 1) + u*``, ``c = mu + c_u = sum w conj(p^) q^``
  (equal to the paper's ``|v - p*| f_r / |f_r| + q*``).

Affine and similarity MLS are linear in ``q`` and reproduce the identity, and for rigid
``c = mu + c_u``; so all three are evaluated on displacements, usually much smaller numbers than
positions (several-fold smaller float32 error). Weights are rescaled per point to
``(d_min^2 / |p_i - v|^2)^alpha`` in ``(0, 1]`` -- MLS is invariant to a common factor -- so no
weight overflows, whatever alpha and however close ``v`` is to a control point.

Degenerate cases (never NaN)
----------------------------
* A point that coincides exactly with control point(s) maps exactly to their ``dst`` (the mean of
  the ``dst`` of all coinciding ``src``, should ``src`` contain duplicates).
* ``K == 1``, or all weighted ``src`` at one spot (``trace C`` at round-off level): **translation**,
  ``f(v) = v - p* + q*``.
* affine with a singular ``C`` (``K == 2``, collinear ``src``; tested against round-off level,
  ``det C <= 256 eps trace(C) sum w |d|^2 / W``): falls back to the **similarity** solution, which
  still interpolates two points exactly. Near-collinear but regular configurations keep the (steep)
  affine solution.
* rigid with ``c`` at round-off level (e.g. all ``dst`` identical): no rotation (``c / |c| := 1``).

Precision
---------
Arithmetic runs in float32, or float64 when any of ``points``/``src``/``dst`` is float64. fp16/bf16
inputs are promoted to float32 and **the result stays float32**: fp16 cannot even represent every
pixel position above 2048 and has 0.25-0.5 px steps at 512-1024, bf16 is 8x coarser; the map is
consumed by :func:`warp`, which samples in float32 anyway. Measured float32 error against float64
at 512x512, K = 16-256, every kind, alpha 0.1-2: <= 2.5e-4 px (``bench/bench_mls.py``, column
``exact err``; ``tests/test_mls.py`` checks <= 1e-3 px against the paper's formulas). At 1024 px
with a 1.7x scale between ``src`` and ``dst`` the worst case seen was 2e-3 px (affine, alpha 0.1,
K = 16: an ill-conditioned C amplifies round-off far from all control points).

Threads and devices
-------------------
All tensors stay on the device of ``points`` (``mls_deform``) or ``src`` (``backward_map``);
accelerators get larger chunks. The functions never change torch's global thread count: the point
loop is thousands of small ops, so on a small CPU that other processes also load, one thread
(``torch.set_num_threads(1)`` in the caller, as ``bench/bench_mls.py --threads 1`` does) can be
faster and steadier than several.
"""

from __future__ import annotations

import math
import operator
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

__all__ = ["mls_deform", "backward_map", "warp", "KINDS", "DEFAULT_STRIDE"]

KINDS = ("affine", "similarity", "rigid")

#: Coarse-grid stride for paper mode (alpha = 0.1), the nodes' default: p99 <= 0.05 px from the
#: exact map at 512x512 with 16-256 control points of every kind (see :func:`backward_map`).
DEFAULT_STRIDE = 8

# Elements of one [K, chunk] intermediate on CPU: 2**17 float32 = 512 KiB; a chunk holds 8 of them
# (4 MiB): large enough that per-op Python overhead is negligible, small enough to stay in cache.
_CHUNK_ELEMS = 1 << 17
# Points whose moments ([3, 6] floats each) are buffered before solving: 4.5 MiB.
_BLOCK_CPU = 1 << 16
# Control points per partial sum of the moment GEMM (precision, see _moments).
_GEMM_BLOCK = 32
_CHUNK_ELEMS_ACCEL = 1 << 22
_BLOCK_ACCEL = 1 << 18


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


def _as_int(val: Any, name: str, what: str) -> int:
    """``val`` as a Python int >= 1 (ints, numpy/torch integer scalars), else ValueError."""
    if isinstance(val, bool):
        raise ValueError(f"{name} must be {what}, got {val!r}")
    try:
        out = operator.index(val)
    except TypeError:
        raise ValueError(f"{name} must be {what}, got {val!r}") from None
    if out < 1:
        raise ValueError(f"{name} must be {what}, got {val!r}")
    return out


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# --------------------------------------------------------------------------------------------------
# core
# --------------------------------------------------------------------------------------------------


class _Setup(NamedTuple):
    """Per-call constants shared by all point blocks (centred coordinates, see _mls_into)."""

    kind: str
    alpha: float
    p0: torch.Tensor  # [2] centre of src
    u0: torch.Tensor  # [2] mean displacement
    pt: torch.Tensor  # [2, K] centred src, transposed
    table: torch.Tensor  # [3, K]: 1, ux, uy of the centred displacements u = dst - src - u0
    dst: torch.Tensor  # [K, 2] raw dst (exact values at control points)
    sub_elems: int  # elements of one [K, chunk] intermediate


def _moments(mom: torch.Tensor, rel: torch.Tensor, v: torch.Tensor, c: _Setup, hits: list) -> None:
    """Weighted moments of the control points for the points ``v`` [n, 2].

    Writes ``mom`` [3, 6, n]: ``mom[t, r] = sum_k table[t, k] f_r[k]`` with
    ``f = (w, w dx, w dy, w dx^2, w dx dy, w dy^2)`` and ``table = (1, ux, uy)``, so every
    moment comes out of one small GEMM per chunk; and ``rel`` [2, n] = ``p_nn - v``.

    ``d = p - p_nn`` is taken relative to the control point nearest to ``v``: that point then adds
    exactly nothing to the moments, so when its weight dominates (``v`` close to it, large alpha)
    the others' small contributions are not lost in float round-off (with ``d = p - v`` the map
    near a control point degenerated to a translation for alpha = 2). Weights are rescaled per
    point to ``(d2min / d2)^alpha`` in (0, 1]. Points that coincide with a control point are
    appended to ``hits`` as (row indices, exact values).
    """
    n_all, k = v.shape[0], c.pt.shape[1]
    step = max(1, c.sub_elems // k)
    # Layout [K, ..., n]: points are the contiguous axis, so the reductions over K (min) run
    # vectorised across points and the moments are one GEMM [3, K] x [K, 6 n] without copies.
    for s in range(0, n_all, step):
        e = min(s + step, n_all)
        n = e - s
        vt = (v[s:e] - c.p0).t()  # [2, n]
        d = torch.sub(c.pt[:, :, None], vt[:, None, :])  # [2, K, n]: p - v
        f = torch.empty(k, 6, n, dtype=d.dtype, device=d.device)
        w = f[:, 0]  # [K, n]
        torch.mul(d[0], d[0], out=w)
        w.addcmul_(d[1], d[1])  # |p - v|^2
        d2min, nn = w.min(dim=0)  # [n]
        hit = d2min == 0
        if bool(hit.any()):
            # infinite weight: the point *is* a control point -> its dst exactly (mean of duplicates)
            cols = hit.nonzero().flatten()
            on = (w[:, cols] == 0).to(w.dtype)  # [K, h]
            hits.append((cols + s, (on.t() @ c.dst) / on.sum(0)[:, None]))
            d2min = torch.where(hit, torch.ones_like(d2min), d2min)  # hit columns: discarded later
        if c.alpha == 1.0:
            torch.reciprocal(w, out=w).mul_(d2min)
        else:  # exp/log is ~5x faster than pow on CPU
            torch.log(w, out=w)
            torch.add(d2min.log() * c.alpha, w, alpha=-c.alpha, out=w).exp_()
        pn = c.pt[:, nn]  # [2, n] nearest control point
        torch.sub(pn, vt, out=rel[:, s:e])
        torch.sub(c.pt[:, :, None], pn[:, None, :], out=d)  # d = p - p_nn
        torch.mul(w[:, None], d.transpose(0, 1), out=f[:, 1:3])  # w dx, w dy
        torch.mul(f[:, 1], d[0], out=f[:, 3])  # w dx^2
        torch.mul(f[:, 1:3], d[1][:, None], out=f[:, 4:6])  # w dx dy, w dy^2
        # The GEMM in blocks of control points: float32 sums of hundreds of mixed-sign terms in
        # one accumulator lost up to 8e-4 px at K = 256; partial sums of 32 keep it near 2e-4.
        fk = f.view(k, 6 * n)
        acc = torch.mm(c.table[:, :_GEMM_BLOCK], fk[:_GEMM_BLOCK])
        for j in range(_GEMM_BLOCK, k, _GEMM_BLOCK):
            acc.add_(torch.mm(c.table[:, j : j + _GEMM_BLOCK], fk[j : j + _GEMM_BLOCK]))
        mom[:, :, s:e] = acc.view(3, 6, n)


class _Moments:
    """The weighted moments of one block of points, as the kinds' formulas use them ([n] each).

    p*, u* are the weighted centroids of the source points and of the displacements u = q − p, C the
    weighted covariance of p̂ = p − p*, D_u the cross moment of p̂ and û; ``translate`` marks points whose
    weighted sources sit at one spot (K = 1, duplicates), where only the translation is defined.
    """

    def __init__(self, mom: torch.Tensor, rel: torch.Tensor) -> None:
        self.eps = torch.finfo(mom.dtype).eps
        self.mom = mom
        W = self.W = mom[0, 0]
        self.mx, self.my = mom[0, 1] / W, mom[0, 2] / W  # p* - p_nn
        self.cxx = mom[0, 3] / W - self.mx * self.mx  # C = sum w p^ p^T / W
        self.cxy = mom[0, 4] / W - self.mx * self.my
        self.cyy = mom[0, 5] / W - self.my * self.my
        self.usx, self.usy = mom[1, 0] / W, mom[2, 0] / W  # u* (centred)
        self.dxx = mom[1, 1] / W - self.mx * self.usx  # D_u = sum w p^ u^T / W
        self.dxy = mom[2, 1] / W - self.mx * self.usy
        self.dyx = mom[1, 2] / W - self.my * self.usx
        self.dyy = mom[2, 2] / W - self.my * self.usy
        self.s2 = (mom[0, 3] + mom[0, 5]) / W  # spread about p_nn: the scale of round-off in C
        self.tr = self.cxx + self.cyy  # mu
        self.ex, self.ey = -(rel[0] + self.mx), -(rel[1] + self.my)  # v - p*
        self.translate = self.tr <= 64 * self.eps * self.s2
        self.c_re = self.dxx + self.dyy  # c_u = sum w conj(p^) u^ / W
        self.c_im = self.dxy - self.dyx
        self.one, self.zero = torch.ones_like(self.tr), torch.zeros_like(self.tr)

    def rotate(self, zr: torch.Tensor, zi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(v − p*)·z for the complex number z = zr + i·zi."""
        return self.ex * zr - self.ey * zi, self.ex * zi + self.ey * zr


def _similarity(m: _Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """Similarity: the displacement part is (v − p*)·c_u/μ; translation only where the sources coincide."""
    safe = torch.where(m.translate, m.one, m.tr)
    zr = torch.where(m.translate, m.zero, m.c_re / safe)
    zi = torch.where(m.translate, m.zero, m.c_im / safe)
    return m.rotate(zr, zi)


def _rigid(m: _Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """Rigid: the rotation c/|c| of c = μ + c_u, minus the identity; none when c is round-off."""
    cr = m.tr + m.c_re
    cabs = torch.sqrt(cr * cr + m.c_im * m.c_im)
    # round-off scale of c: mu, c_u and the raw terms D_u was computed from
    mom, W = m.mom, m.W
    raw = (mom[1, 1].abs() + mom[2, 2].abs() + mom[2, 1].abs() + mom[1, 2].abs()) / W
    raw = raw + (m.mx.abs() + m.my.abs()) * (m.usx.abs() + m.usy.abs())
    no_rot = m.translate | (cabs <= 64 * m.eps * (m.s2 + raw))
    safe = torch.where(no_rot, m.one, cabs)
    zr = torch.where(no_rot, m.zero, cr / safe - 1)
    zi = torch.where(no_rot, m.zero, m.c_im / safe)
    return m.rotate(zr, zi)


def _affine(m: _Moments) -> tuple[torch.Tensor, torch.Tensor]:
    """Affine: (v − p*) C⁻¹ D_u; where C is singular (few or collinear points) the similarity answer."""
    fx, fy = _similarity(m)
    det = m.cxx * m.cyy - m.cxy * m.cxy
    ok = (~m.translate) & (det > 256 * m.eps * m.s2 * m.tr)
    sdet = torch.where(ok, det, m.one)
    rx = (m.ex * m.cyy - m.ey * m.cxy) / sdet  # (v - p*) C^-1
    ry = (m.ey * m.cxx - m.ex * m.cxy) / sdet
    return torch.where(ok, rx * m.dxx + ry * m.dyx, fx), torch.where(ok, rx * m.dxy + ry * m.dyy, fy)


#: one entry per MLS kind: moments → the displacement field's non-translation part (fx, fy) [n] each
_DISPLACEMENT = {"affine": _affine, "similarity": _similarity, "rigid": _rigid}


def _solve(out: torch.Tensor, v: torch.Tensor, mom: torch.Tensor, rel: torch.Tensor, c: _Setup) -> None:
    """Turn moments [3, 6, n] and ``rel`` [2, n] of points ``v`` [n, 2] into MLS values ``out`` [n, 2].

    Works on the displacement field u = q - p: ``f(v) = v + (v - p*) Z + u*`` with Z = C^-1 D_u
    (affine), the complex number c_u / mu (similarity) or c / |c| - 1, c = mu + c_u (rigid).
    """
    m = _Moments(mom, rel)
    fx, fy = _DISPLACEMENT[c.kind](m)
    torch.add(fx, m.usx + c.u0[0], out=out[:, 0])
    torch.add(fy, m.usy + c.u0[1], out=out[:, 1])
    out += v


def _block(out: torch.Tensor, v: torch.Tensor, c: _Setup) -> None:
    """MLS for one block of points ``v`` [n, 2] into ``out`` [n, 2]."""
    mom = torch.empty(3, 6, v.shape[0], dtype=v.dtype, device=v.device)
    rel = torch.empty(2, v.shape[0], dtype=v.dtype, device=v.device)
    hits: list = []
    _moments(mom, rel, v, c, hits)
    _solve(out, v, mom, rel, c)
    for rows, vals in hits:
        out[rows] = vals


def _mls_into(out: torch.Tensor, v: torch.Tensor, src: torch.Tensor, dst: torch.Tensor, kind: str, alpha: float) -> None:
    """Evaluate MLS at ``v`` [N, 2] and write it to ``out`` [N, 2] (all same dtype/device).

    ``src``/``dst`` [K, 2] are the raw control points (compute dtype).
    """
    # MLS commutes with translations of (v, p) and of q, so coordinates are centred. And every kind
    # can be evaluated on the displacements u = q - p (affine and similarity are linear in q and
    # reproduce the identity; for rigid c = mu + c_u): f(v) = v + (small correction). Displacements
    # are usually much smaller than positions, which cuts the float32 error several-fold.
    u = dst - src
    p0, u0 = src.mean(0), u.mean(0)
    p, uc = src - p0, u - u0
    cpu = v.device.type == "cpu"
    c = _Setup(
        kind=kind,
        alpha=alpha,
        p0=p0,
        u0=u0,
        pt=p.t().contiguous(),
        table=torch.stack([torch.ones_like(uc[:, 0]), uc[:, 0], uc[:, 1]]).contiguous(),
        dst=dst,
        sub_elems=_CHUNK_ELEMS if cpu else _CHUNK_ELEMS_ACCEL,
    )
    block = _BLOCK_CPU if cpu else _BLOCK_ACCEL
    for s in range(0, v.shape[0], block):
        _block(out[s : s + block], v[s : s + block], c)




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

    The map interpolates: a point equal to ``src[i]`` maps exactly to ``dst[i]``. Working memory is
    a few MiB of ``[K, chunk]`` blocks plus the output, never ``O(N K)``. Degenerate configurations
    fall back as described in the module docstring (translation / similarity), never to NaN.

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
            (``align_corners=True``, so grid nodes are exact); cost drops about ``s^2``-fold.
            Error against the exact map, measured at 512x512 on a realistic registration field
            (rotation + scale + smooth bend + 1 px jitter; ``bench/bench_mls.py --alpha A
            --stride S``), K = 16/64/256, all kinds, p99 (max) in px:

            ========  ==========================  ==========================
            stride    alpha = 0.1 (paper mode)    alpha = 1
            ========  ==========================  ==========================
            4         <= 0.014 (0.2-3.5)          <= 0.17 (0.2-1.4); rigid K=256: 0.46
            8         <= 0.051 (0.2-4.0)          <= 0.55 (0.5-1.9); rigid K=256: 1.5
            16        <= 0.14 (0.3-5.1)           up to 3.6
            ========  ==========================  ==========================

            The maxima sit right next to control points (alpha = 0.1 MLS has a cusp there); with
            alpha = 1 the map varies on the scale of the control-point spacing, so dense control
            points need a small stride. :data:`DEFAULT_STRIDE` = 8 is for paper mode.

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
    height = _as_int(height, "height", "an int >= 1 (output size in pixels)")
    width = _as_int(width, "width", "an int >= 1 (output size in pixels)")
    stride = _as_int(stride, "stride", f"an int >= 1 (1 = exact; {DEFAULT_STRIDE} = fast coarse grid)")
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
    # Bilinear interpolation reproduces the identity part of the map exactly, so interpolating
    # the absolute positions costs only float32 rounding (~1e-4 px at 512) and saves passes.
    up = F.interpolate(coarse.permute(2, 0, 1)[None], size=(height, width), mode="bilinear", align_corners=True)
    return up[0].permute(1, 2, 0).contiguous()


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
    # one reduction instead of an isfinite pass: NaN/inf survive a float64 sum
    if not bool(torch.isfinite(grid.sum(dtype=torch.float64))):
        raise ValueError("backward_map contains NaN or inf: rebuild it from finite control points")
    work = torch.float64 if image.dtype == torch.float64 else torch.float32
    img = image.to(work)
    # align_corners=True cannot express "outside" along a size-1 axis (every coordinate maps to
    # the one pixel), so give such images a zero border and shift the coordinates onto it.
    pad = 1 if (hs == 1 or ws == 1) else 0
    if pad:
        img = F.pad(img, (1, 1, 1, 1))
    hs_p, ws_p = hs + 2 * pad, ws + 2 * pad
    # pixel x -> normalised (2 (x + pad) - (Ws - 1)) / (Ws - 1): -1 / +1 at the first / last centre
    scale = torch.tensor([2.0 / (ws_p - 1), 2.0 / (hs_p - 1)], dtype=work, device=image.device)
    offset = torch.tensor(
        [2.0 * pad / (ws_p - 1) - 1.0, 2.0 * pad / (hs_p - 1) - 1.0], dtype=work, device=image.device
    )
    norm = torch.addcmul(offset, grid.to(device=image.device, dtype=work), scale)
    if norm.shape[0] != b:
        norm = norm.expand(b, -1, -1, -1)
    out = F.grid_sample(img, norm, mode=mode, padding_mode="zeros", align_corners=True)
    return out.to(image.dtype)
