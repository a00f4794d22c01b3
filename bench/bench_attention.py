"""Benchmark Masked Extended Attention against plain self-attention at SD1.5 shapes.

Prints, per token grid (heads 8; d 40/80/160 as SD1.5's 64²/32²/16² grids; 128² = a 1024² image),
ratios against plain self-attention measured in the same run:

* time: fast path (contrast 1), contrast path (1.25), contrast + capture (flow + mass), and the
  capture overhead over the contrast path;
* peak extra memory (MB) of each path over plain self-attention's own peak. On CPU this is the
  process's peak resident set (VmHWM reset through /proc/self/clear_refs, big allocations forced to
  mmap so freed memory really leaves); on CUDA ``max_memory_allocated``.

Goals (issue 3): fast ≤ 1.5× plain time at 40 % garment coverage; contrast/capture extra memory
≤ 64 MB per layer at any resolution; capture ≤ 10 % over the contrast path.

Usage: python bench/bench_attention.py [--device cpu|cuda] [--region 0.4] [--garment 0.4] [--quick] [--portable]
       [--threads 1 --clock cpu]   (per-thread CPU time: stable ratios on a machine shared with others)
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Callable, Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from rss_probe import reset_peak, status_kib  # noqa: E402  (bench/ is the script's folder)
from pack_import import import_pack  # noqa: E402

import_pack()

import torch  # noqa: E402

from max4zero.attention.flow import AttentionCapture  # noqa: E402
from max4zero.attention import masked_extended as mea  # noqa: E402
from max4zero.attention.masked_extended import masked_extended_attention, plain_attention  # noqa: E402

MB = 1024 * 1024




def peak_extra_mb(fn: Callable[[], torch.Tensor], device: str, cpu_probe: bool) -> float:
    """Peak memory above what was held before the call, result included."""
    gc.collect()
    if device == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak / MB
    if not cpu_probe:
        return float("nan")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    base = status_kib("VmRSS")
    out = fn()
    peak = status_kib("VmHWM") - base
    del out
    return peak / 1024


def timed_all(fns: Dict[str, Callable[[], torch.Tensor]], repeats: int, device: str, clock: Callable[[], float]) -> Dict[str, float]:
    """Best-of-``repeats`` seconds per function after one warm-up each.

    The functions are interleaved round-robin and the minimum is kept, so load from other
    processes on a shared machine skews the ratios as little as possible.
    """
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = clock()
            fn()
            if device == "cuda":
                torch.cuda.synchronize()
            best[name] = min(best[name], clock() - t0)
    return best


def make_inputs(side: int, d: int, heads: int, region: float, garment: float, device: str, dtype: torch.dtype, seed: int = 0):
    """Target and reference of side² tokens; region/garment masks are centred blobs of that coverage."""
    g = torch.Generator().manual_seed(seed)
    t = side * side
    c = heads * d
    # logits of realistic size: unit-variance projections scaled like a trained layer's (≈ N(0, 1)·√d spread)
    q, k, v = (torch.randn(1, t, c, generator=g) for _ in range(3))
    k_ref, v_ref = (torch.randn(1, t, c, generator=g) for _ in range(2))

    def blob(frac: float) -> torch.Tensor:
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        r = torch.maximum((ys - side / 2 + 0.5).abs(), (xs - side / 2 + 0.5).abs())
        order = r.flatten().argsort(stable=True)
        m = torch.zeros(t, dtype=torch.bool)
        m[order[: int(round(frac * t))]] = True
        return m.view(1, t)

    to = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return to(q), to(k), to(v), to(k_ref), to(v_ref), blob(garment).to(device), blob(region).to(device)


def bench_case(side: int, d: int, repeats: int, args, cpu_probe: bool) -> Dict[str, float]:
    heads = 8
    dtype = torch.float16 if args.half else torch.float32
    q, k, v, kr, vr, rm, qm = make_inputs(side, d, heads, args.region, args.garment, args.device, dtype)
    cap = AttentionCapture()
    cap.set_context(ref_hw=(side, side), query_hw=(side, side))
    cap_ent = AttentionCapture(want_entropy=True)
    cap_ent.set_context(ref_hw=(side, side), query_hw=(side, side))

    def with_capture(c: AttentionCapture) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            c.clear()
            return masked_extended_attention(q, k, v, kr, vr, rm, qm, heads, contrast=1.25, capture=c)

        return run

    fns: Dict[str, Callable[[], torch.Tensor]] = {
        "plain": lambda: plain_attention(q, k, v, heads),
        "fast": lambda: masked_extended_attention(q, k, v, kr, vr, rm, qm, heads),
        "contrast": lambda: masked_extended_attention(q, k, v, kr, vr, rm, qm, heads, contrast=1.25),
        "capture": with_capture(cap),
        "capture+ent": with_capture(cap_ent),
    }
    res: Dict[str, float] = {f"t_{n}": t for n, t in timed_all(fns, repeats, args.device, args.clock_fn).items()}
    for name, fn in fns.items():
        res[f"m_{name}"] = peak_extra_mb(fn, args.device, cpu_probe)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--region", type=float, default=0.4, help="fraction of target queries in the try-on region")
    p.add_argument("--garment", type=float, default=0.4, help="fraction of reference tokens kept (garment)")
    p.add_argument("--half", action="store_true", help="float16 inputs (CUDA)")
    p.add_argument("--quick", action="store_true", help="skip the 128² grid")
    p.add_argument(
        "--portable",
        action="store_true",
        help="do not reuse the CPU kernel's log-sum-exp (the path CUDA takes: concatenated KV / chunked LSE)",
    )
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    p.add_argument(
        "--clock",
        choices=["auto", "wall", "cpu"],
        default="auto",
        help="cpu = this thread's CPU time (robust on a loaded machine; needs --threads 1); auto = cpu when --threads 1",
    )
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.portable:
        mea.USE_KERNEL_LSE = False
    if args.clock == "auto":
        args.clock = "cpu" if (args.device == "cpu" and torch.get_num_threads() == 1) else "wall"
    if args.clock == "cpu" and (args.device != "cpu" or torch.get_num_threads() != 1):
        p.error("--clock cpu measures one thread: use it with --device cpu --threads 1")
    args.clock_fn = time.thread_time if args.clock == "cpu" else time.perf_counter
    cpu_probe = args.device == "cpu" and reset_peak()

    # (grid side, head dim, repeats): SD1.5 64²/32²/16² at 512², and 128² tokens at 1024²
    cases: List[Tuple[int, int, int]] = [(16, 160, 20), (32, 80, 10), (64, 40, 5)]
    if not args.quick:
        cases.append((128, 40, 1))
    print(
        f"device {args.device}, threads {torch.get_num_threads()}, clock {args.clock}, heads 8, batch 1, "
        f"region {args.region:.0%}, garment {args.garment:.0%}, dtype {'fp16' if args.half else 'fp32'}, "
        f"{'portable path' if args.portable else 'kernel LSE reused where available'}"
    )
    head = (
        f"{'tokens':>8} {'d':>4} {'plain ms':>9} | {'fast×':>6} {'contr×':>7} {'capt×':>6} {'capt/contr':>10}"
        f" {'+ent/contr':>10} | {'plainMB':>8} {'fast+MB':>8} {'contr+MB':>9} {'capt+MB':>8}"
    )
    print(head)
    print("-" * len(head))
    ok = True
    for side, d, reps in cases:
        r = bench_case(side, d, reps, args, cpu_probe)
        tp = r["t_plain"]
        extra = {n: r[f"m_{n}"] - r["m_plain"] for n in ("fast", "contrast", "capture")}
        print(
            f"{side:>5}²   {d:>4} {tp * 1e3:>9.1f} | {r['t_fast'] / tp:>6.2f} {r['t_contrast'] / tp:>7.2f}"
            f" {r['t_capture'] / tp:>6.2f} {r['t_capture'] / r['t_contrast']:>10.3f}"
            f" {r['t_capture+ent'] / r['t_contrast']:>10.3f} | {r['m_plain']:>8.1f} {extra['fast']:>8.1f}"
            f" {extra['contrast']:>9.1f} {extra['capture']:>8.1f}"
        )
        sys.stdout.flush()
        ok &= r["t_fast"] / tp <= 1.5
        ok &= max(extra["contrast"], extra["capture"]) <= 64
        ok &= r["t_capture"] / r["t_contrast"] <= 1.10
    print("ratios: time of the path / plain self-attention; MB: peak above plain's peak (plainMB = plain's own)")
    print("all goals met" if ok else "SOME GOAL MISSED (fast ≤1.5×, contrast/capture ≤64 MB extra, capture ≤1.10× contrast)")


if __name__ == "__main__":
    main()
