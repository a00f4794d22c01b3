"""Benchmark: chunked mutual nearest neighbours vs a naive full-similarity-matrix baseline.

Default case (issue 2): 4096 × 4096 tokens × 1280 channels, float32 inputs (SD's 1/16 decoder
feature at 1024², no masks). Goal: peak memory ≤ 100 MB above the inputs.

Each measurement runs in a FRESH subprocess so peaks do not leak between runs:

* CPU: torch's CPU allocator keeps no statistics and tracemalloc does not see it, so the worker
  reads the kernel's resident-set counters. After building the inputs it resets the peak
  (``echo 5 > /proc/self/clear_refs``, Linux ≥ 4.0), notes ``VmRSS``, runs once, and reports
  ``VmHWM − VmRSS_before``: everything the call made resident (matrices, BLAS buffers). If the
  reset is not allowed it reports ``VmHWM`` minus the RSS before the inputs existed, minus their size.
* CUDA (``--device cuda``): ``torch.cuda.max_memory_allocated`` above the inputs.

The worker runs one small warm-up first (BLAS thread pools, lazy imports) so neither side pays it.

Usage: python bench/bench_matching.py [--tokens 4096] [--channels 1280] [--repeats 3] [--device cpu] [--masked]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from pack_import import import_pack  # noqa: E402

import_pack()

import torch  # noqa: E402

from max4zero.warping.matching import mutual_nearest_neighbors  # noqa: E402

MB = 1e6


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


@torch.no_grad()
def naive_mnn(fa: torch.Tensor, fb: torch.Tensor, ma=None, mb=None):
    """Baseline: gather the masked tokens, normalise, materialise S = Aᵀ B in full, argmax both ways."""
    C = fa.shape[0]
    a = fa.reshape(C, -1).float()
    b = fb.reshape(C, -1).float()
    ia_all = torch.nonzero(ma.reshape(-1)).flatten() if ma is not None else torch.arange(a.shape[1])
    ib_all = torch.nonzero(mb.reshape(-1)).flatten() if mb is not None else torch.arange(b.shape[1])
    a = torch.nn.functional.normalize(a[:, ia_all], dim=0)
    b = torch.nn.functional.normalize(b[:, ib_all], dim=0)
    S = a.T @ b
    sr, r = S.max(dim=1)
    c = S.argmax(dim=0)
    keep = torch.nonzero(c[r] == torch.arange(S.shape[0], device=S.device)).flatten()
    return ia_all[keep], ib_all[r[keep]], sr[keep]


def disk_mask(h: int, w: int, device: str) -> torch.Tensor:
    """A centred ellipse covering about 60 % of the grid (a garment-like mask)."""
    y = torch.linspace(-1, 1, h, device=device)[:, None]
    x = torch.linspace(-1, 1, w, device=device)[None, :]
    return x**2 + y**2 <= 0.77


def _side(n: int) -> tuple[int, int]:
    h = int(n**0.5)
    while n % h:
        h -= 1
    return h, n // h


def worker(method: str, tokens: int, channels: int, device: str, seed: int, masked: bool) -> dict:
    fn = mutual_nearest_neighbors if method == "chunked" else naive_mnn
    warm = torch.randn(channels, 8, 8, device=device)
    fn(warm, warm.clone())
    del warm
    cuda = device.startswith("cuda")
    rss0 = 0 if cuda else _status_kb("VmRSS")
    g = torch.Generator(device=device).manual_seed(seed)
    h, w = _side(tokens)
    fa = torch.randn(channels, h, w, generator=g, device=device)
    fb = torch.randn(channels, h, w, generator=g, device=device)
    ma = mb = None
    if masked:
        ma = disk_mask(h, w, device)
        mb = ma.roll(w // 8, dims=1)
    input_bytes = fa.nbytes + fb.nbytes
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            reset = True
            base = _status_kb("VmRSS") * 1024
        except OSError:
            reset = False
            base = rss0 * 1024 + input_bytes
    t = time.perf_counter()
    ia, ib, s = fn(fa, fb, ma, mb)
    if cuda:
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
        how = "cuda max_memory_allocated"
    else:
        peak = _status_kb("VmHWM") * 1024 - base
        how = "VmHWM after clear_refs" if reset else "VmHWM minus pre-input RSS and input size"
    return {
        "method": method,
        "seconds": dt,
        "peak_above_inputs_bytes": peak,
        "input_bytes": input_bytes,
        "matches": int(ia.numel()),
        "checksum": int(ia.sum()) + int(ib.sum()),
        "how": how,
    }


def run_worker(method: str, args) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        method,
        "--tokens",
        str(args.tokens),
        "--channels",
        str(args.channels),
        "--device",
        args.device,
    ] + (["--masked"] if args.masked else [])
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=dict(os.environ))
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--channels", type=int, default=1280)
    p.add_argument("--repeats", type=int, default=3, help="fresh processes per method; the best time and worst peak are kept")
    p.add_argument("--device", default="cpu")
    p.add_argument("--masked", action="store_true", help="ellipse masks (~60%% of tokens) on both sides")
    p.add_argument("--worker", choices=["chunked", "naive"], help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.tokens, args.channels, args.device, args.seed, args.masked)))
        return

    print(
        f"mutual nearest neighbours: {args.tokens} x {args.tokens} tokens x {args.channels} channels, float32, "
        f"{'masked (~60% of tokens each side)' if args.masked else 'no masks'}, "
        f"{args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    results: dict[str, list[dict]] = {"chunked": [], "naive": []}
    for _ in range(args.repeats):
        for method in results:  # interleaved so machine noise hits both alike
            results[method].append(run_worker(method, args))
    best = {}
    for method, rs in results.items():
        t = min(r["seconds"] for r in rs)
        peak = max(r["peak_above_inputs_bytes"] for r in rs)
        best[method] = (t, peak)
        print(
            f"  {method:8s} time {t:7.3f} s (best of {len(rs)})   peak above inputs {peak / MB:8.1f} MB "
            f"(worst of {len(rs)}; inputs {rs[0]['input_bytes'] / MB:.1f} MB; {rs[0]['how']})   "
            f"matches {rs[0]['matches']}"
        )
    same = {r["checksum"] for rs in results.values() for r in rs}
    print(f"  same matches in both: {'yes' if len(same) == 1 else 'NO'}")
    (tc, pc), (tn, pn) = best["chunked"], best["naive"]
    print(f"  ratio time   chunked / naive: {tc / tn:.2f}x  (naive / chunked {tn / tc:.2f}x)")
    print(f"  ratio memory chunked / naive: {pc / pn:.2f}x  (naive / chunked {pn / pc:.2f}x)")
    goal = 100 * MB
    print(f"  goal peak <= 100 MB above inputs: {'met' if pc <= goal else 'NOT met'} ({pc / MB:.1f} MB)")


if __name__ == "__main__":
    main()
