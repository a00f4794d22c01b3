"""Benchmark: MLS backward map + warp, ours (torch) vs the vectorised NumPy formulation.

Run (from the repository root, about 2-3 minutes on 2 CPU cores; needs only torch and numpy)::

    python bench/bench_mls.py                 # 512x512, K = 16/64/256, every kind, alpha = 0.1 (paper mode)
    python bench/bench_mls.py --tracemalloc   # + NumPy tracemalloc peak as a cross-check of the RSS method
    python bench/bench_mls.py --alpha 1.0 --stride 4   # Schaefer et al.'s alpha (needs a finer stride)
    python bench/bench_mls.py --quick         # K = 16/64 only, one repeat (about 1 minute)

What is compared (per kind and number of control points K, at 512x512, one 3-channel float32
image, paper-mode nearest sampling for both):

* **baseline**: the vectorised NumPy formulation used by public MLS code (e.g. the layout of
  Jarvis73/Moving-Least-Squares, re-written here): whole-image float32 arrays for every control
  point -- weights ``[K, H, W]``, centred points ``[K, 2, H, W]``, per-point 2x2 products
  ``[K, 2, 2, H, W]`` -- then nearest-pixel indexing with out-of-range -> 0.
* **exact**: ``backward_map(..., stride=1)`` + ``warp(..., "nearest")``.
* **coarse**: ``backward_map(..., stride=DEFAULT_STRIDE)`` + ``warp``.

Control points: a realistic registration field -- K points uniform in [40, 472]^2, mapped by a
rotation (6 deg) + scale 0.85 + translation, a smooth sinusoidal bend (8 / 6 px) and 1 px matching
jitter (seeded).

Measurements (every variant runs in its own fresh Python process, so nothing freed by an earlier
measurement is reused, and after a small warm-up call):

* time: best of N runs (``time.perf_counter``), map + warp; 2 runs of the baseline (1 for K=256),
  3 of exact, 5 of coarse.
* peak memory: the process's resident-set high-water mark (``VmHWM``) is reset to the current RSS
  (``echo 5 > /proc/self/clear_refs``, Linux >= 4.0) right before the first run; reported is
  ``VmHWM - VmRSS(before)``, the extra resident memory the call needed, measured the same way for
  NumPy and torch (``tracemalloc`` sees NumPy's buffers but not torch's allocator; ``--tracemalloc``
  prints the NumPy figure as a cross-check: they agree within 5 %). Where clear_refs is unavailable
  it falls back to ``tracemalloc`` and says so (then torch is not counted: not a fair ratio).
* accuracy: against a float64 evaluation of the same MLS (itself checked against the paper's
  per-pixel formulas in tests/test_mls.py): max error of exact float32 and of the baseline, p99 and
  max error of the coarse map, in px.

Goals (issue 2): exact >= 1.5x faster than baseline with <= 1/4 of its peak memory and <= 1e-3 px
error; coarse >= 20x faster with p99 <= 0.25 px. The load average is printed: timings taken while
other processes compete for the cores are noisy, torch's two threads more than NumPy's one (its
intra-op threads wait for each other at every op).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from pack_import import import_pack  # noqa: E402

import_pack()
from max4zero.warping.mls import DEFAULT_STRIDE, backward_map, warp  # noqa: E402

# ------------------------------------------------------------------------------------------------
# baseline: whole-image arrays per control point (written for this benchmark)
# ------------------------------------------------------------------------------------------------


def np_mls_map(p: np.ndarray, q: np.ndarray, h: int, w: int, kind: str, alpha: float) -> np.ndarray:
    """MLS backward map ``[2, H, W]`` (x, y) with ``[K, H, W]``-sized float32 intermediates."""
    f32 = np.float32
    k = p.shape[0]
    vy, vx = np.meshgrid(np.arange(h, dtype=f32), np.arange(w, dtype=f32), indexing="ij")
    v = np.stack([vx, vy])  # [2, H, W]
    pr = p.astype(f32).reshape(k, 2, 1, 1)
    qr = q.astype(f32).reshape(k, 2, 1, 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        wt = 1.0 / np.sum((pr - v) ** 2, axis=1) ** f32(alpha)  # [K, H, W]
    wt[np.isinf(wt)] = f32(2**31 - 1)
    wsum = wt.sum(0)
    pstar = np.sum(wt[:, None] * pr, axis=0) / wsum  # [2, H, W]
    qstar = np.sum(wt[:, None] * qr, axis=0) / wsum
    phat = pr - pstar  # [K, 2, H, W]
    qhat = qr - qstar
    vp = v - pstar  # [2, H, W]
    if kind == "affine":
        m = np.sum(phat[:, :, None] * wt[:, None, None] * phat[:, None, :], axis=0)  # [2, 2, H, W]
        det = m[0, 0] * m[1, 1] - m[0, 1] * m[1, 0]
        sing = np.abs(det) < 1e-8
        det[sing] = np.inf
        inv = np.stack([np.stack([m[1, 1], -m[0, 1]]), np.stack([-m[1, 0], m[0, 0]])]) / det  # [2, 2, H, W]
        left = np.sum(vp[:, None] * inv, axis=0)  # (v - p*) M^-1: [2, H, W]
        a = np.sum(left[None] * wt[:, None] * phat, axis=1)  # [K, H, W]
        out = np.sum(a[:, None] * qhat, axis=0) + qstar
        out[:, sing] = (v - pstar + qstar)[:, sing]
        return out
    # similarity / rigid: A_i = w_i [p^_i; -p^_i_perp] [v - p*; -(v - p*)_perp]^T  as [K, H, W, 2, 2]
    left = np.stack([phat, np.stack([phat[:, 1], -phat[:, 0]], axis=1)], axis=1)  # [K, 2, 2, H, W]
    right = np.stack([vp, np.stack([vp[1], -vp[0]])])  # [2, 2, H, W]
    a = np.matmul(
        (wt[:, None, None] * left).transpose(0, 3, 4, 1, 2), right.transpose(2, 3, 1, 0)[None]
    )  # [K, H, W, 2, 2]
    fr = np.matmul(qhat.transpose(0, 2, 3, 1)[:, :, :, None, :], a).sum(0)[:, :, 0].transpose(2, 0, 1)  # [2, H, W]
    if kind == "similarity":
        mu = np.sum(wt * np.sum(phat**2, axis=1), axis=0)
        return fr / mu + qstar
    norm = np.sqrt(np.sum(fr**2, axis=0))
    return np.sqrt(np.sum(vp**2, axis=0)) * fr / norm + qstar


def np_warp_nearest(image: np.ndarray, m: np.ndarray) -> np.ndarray:
    """``image`` [C, Hs, Ws] sampled at the rounded ``m`` [2, H, W]; outside -> 0."""
    xi = np.rint(m[0]).astype(np.int64)
    yi = np.rint(m[1]).astype(np.int64)
    ok = (xi >= 0) & (xi < image.shape[2]) & (yi >= 0) & (yi < image.shape[1])
    out = image[:, np.clip(yi, 0, image.shape[1] - 1), np.clip(xi, 0, image.shape[2] - 1)]
    out[:, ~ok] = 0
    return out


# ------------------------------------------------------------------------------------------------
# measurement (each variant runs in its own fresh process, see the module docstring)
# ------------------------------------------------------------------------------------------------


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def control_points(k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    src = rng.uniform(40, 472, (k, 2))
    th, s = math.radians(6), 0.85
    rot = s * np.array([[math.cos(th), -math.sin(th)], [math.sin(th), math.cos(th)]])
    dst = (src - 256) @ rot.T + 256 + np.array([20.0, -12.0])
    dst[:, 0] += 8 * np.sin(src[:, 1] / 512 * 2 * math.pi)
    dst[:, 1] += 6 * np.sin(src[:, 0] / 512 * 2 * math.pi + 1)
    dst += rng.normal(0, 1, (k, 2))
    return src.astype(np.float32), dst.astype(np.float32)


def child(args: argparse.Namespace) -> None:
    """Run one variant: print a JSON line with time and peak memory; save the map to args.out."""
    hw, k = args.size, args.child_k
    src, dst = control_points(k)
    img_np = np.random.default_rng(1).random((3, hw, hw), dtype=np.float32)
    img_t = torch.from_numpy(img_np.copy())[None]
    s_t, d_t = torch.from_numpy(src), torch.from_numpy(dst)
    kind, alpha, variant = args.child_kind, args.alpha, args.child
    holder: dict[str, object] = {}

    if variant == "base":

        def run(h: int = hw) -> None:
            m = np_mls_map(src, dst, h, h, kind, alpha)
            holder["img"] = np_warp_nearest(img_np[:, :h, :h], m)
            holder["m"] = np.moveaxis(m, 0, -1)

    else:
        stride = 1 if variant == "exact" else args.stride

        def run(h: int = hw) -> None:
            m = backward_map(s_t, d_t, h, h, kind, alpha, stride=stride)
            holder["img"] = warp(img_t[..., :h, :h], m, "nearest")
            holder["m"] = m.numpy()

    run(16)  # warm-up: first-call initialisation (thread pools, code paths) is not what we measure
    holder.clear()
    gc.collect()
    hwm = _reset_hwm()
    before = _status_kib("VmRSS")
    tm = 0.0
    if not hwm:
        tracemalloc.start()
    t0 = time.perf_counter()
    run()
    times = [time.perf_counter() - t0]
    if hwm:
        peak = (_status_kib("VmHWM") - before) / 1024
    else:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    np.save(args.out, holder["m"])
    holder.clear()
    for _ in range(args.repeats - 1):
        gc.collect()
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
        holder.clear()
    if args.tracemalloc and variant == "base":
        gc.collect()
        tracemalloc.start()
        run()
        tm = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    print(json.dumps({"time": min(times), "peak": peak, "tm": tm, "hwm": hwm}))


def spawn(args: argparse.Namespace, variant: str, kind: str, k: int, repeats: int, out: str) -> dict:
    cmd = [
        sys.executable, __file__, "--child", variant, "--child-kind", kind, "--child-k", str(k),
        "--size", str(args.size), "--alpha", str(args.alpha), "--stride", str(args.stride),
        "--repeats", str(repeats), "--out", out,
    ] + (["--threads", str(args.threads)] if args.threads else []) + (["--tracemalloc"] if args.tracemalloc else [])
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{variant} {kind} K={k} failed:\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--points", type=int, nargs="+", default=[16, 64, 256])
    ap.add_argument("--kinds", nargs="+", default=["affine", "similarity", "rigid"])
    ap.add_argument("--alpha", type=float, default=0.1)
    ap.add_argument("--stride", type=int, default=DEFAULT_STRIDE)
    ap.add_argument("--quick", action="store_true", help="K = 16/64, one repeat")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch CPU threads (0 = torch's default); 1 is steadier on a small machine other work also loads")
    ap.add_argument("--tracemalloc", action="store_true", help="one more baseline run under tracemalloc (cross-check)")
    ap.add_argument("--child", choices=["base", "exact", "coarse"], help=argparse.SUPPRESS)
    ap.add_argument("--child-kind", help=argparse.SUPPRESS)
    ap.add_argument("--child-k", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        child(args)
        return
    if args.quick:
        args.points = [p for p in args.points if p <= 64]
    hw = args.size
    print(
        f"MLS backward map + nearest warp, {hw}x{hw}, 3-channel float32 image, alpha={args.alpha}, "
        f"coarse stride={args.stride}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"numpy {np.__version__}; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        flush=True,
    )
    head = (
        f"{'kind':10s} {'K':>4s} | {'base s':>7s} {'MiB':>6s}{' (tm)' if args.tracemalloc else ''} {'err':>7s} | "
        f"{'exact s':>7s} {'MiB':>5s} {'err':>7s} {'speed':>6s} {'mem':>6s} | {'coarse s':>8s} {'MiB':>5s} "
        f"{'speed':>6s} {'p99':>6s} {'max':>5s}"
    )
    print(head)
    print("-" * len(head))
    fails = []
    hwm_all = True
    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "map.npy")
        for kind in args.kinds:
            for k in args.points:
                src, dst = control_points(k)
                ref = backward_map(
                    torch.from_numpy(src).double(), torch.from_numpy(dst).double(), hw, hw, kind, args.alpha
                ).numpy()  # [H, W, 2] float64

                def err(path: str) -> np.ndarray:
                    return np.linalg.norm(np.load(path).astype(np.float64) - ref, axis=-1).ravel()

                rb = spawn(args, "base", kind, k, 1 if (args.quick or k >= 256) else 2, out)
                eb = float(np.nanmax(err(out)))
                re_ = spawn(args, "exact", kind, k, 1 if args.quick else 3, out)
                ee = float(err(out).max())
                rc = spawn(args, "coarse", kind, k, 1 if args.quick else 5, out)
                ec = err(out)
                p99 = float(np.quantile(ec, 0.99))
                hwm_all &= bool(rb["hwm"] and re_["hwm"] and rc["hwm"])
                sp_e, sp_c = rb["time"] / re_["time"], rb["time"] / rc["time"]
                mem_r = re_["peak"] / rb["peak"]
                tm = f" {rb['tm']:5.0f}" if args.tracemalloc else ""
                print(
                    f"{kind:10s} {k:4d} | {rb['time']:7.3f} {rb['peak']:6.0f}{tm} {eb:7.1e} | {re_['time']:7.3f} "
                    f"{re_['peak']:5.1f} {ee:7.1e} {sp_e:5.1f}x {mem_r:6.3f} | {rc['time']:8.4f} {rc['peak']:5.1f} "
                    f"{sp_c:5.0f}x {p99:6.3f} {ec.max():5.2f}",
                    flush=True,
                )
                if sp_e < 1.5 or mem_r > 0.25 or ee > 1e-3:
                    fails.append(f"{kind} K={k}: exact {sp_e:.1f}x, mem ratio {mem_r:.3f}, err {ee:.1e} px")
                if sp_c < 20 or p99 > 0.25:
                    fails.append(f"{kind} K={k}: coarse {sp_c:.0f}x, p99 {p99:.3f} px")
    print(
        "base = NumPy baseline, exact = ours stride 1, coarse = ours stride "
        f"{args.stride}; s = best wall time (map + warp); MiB = peak "
        + ("RSS above the pre-call RSS" if hwm_all else "traced allocation (tracemalloc; torch not traced!)")
        + (", (tm) = baseline tracemalloc peak" if args.tracemalloc else "")
        + "; speed = baseline s / ours; mem = exact MiB / base MiB; err, p99, max: px from float64"
    )
    print(f"load average after: {os.getloadavg()[0]:.1f}")
    print("all goals met" if not fails else "GOALS NOT MET:\n  " + "\n  ".join(fails))


if __name__ == "__main__":
    main()
