"""Benchmark: square mask dilation/erosion, separable running counts (``tensors.masks``) vs ``max_pool2d``.

Run from the repository root (needs only torch; about 1 minute on 2 CPU cores)::

    python bench/bench_masks.py            # 512, 1024 and 2000 px; the demo's kernels at each size
    python bench/bench_masks.py --quick    # 512 and 1024 px only

What is compared, on a person-like mask (a filled ellipse) at each working size ``S`` with the kernels the
demo uses there (``tools/registration_demo.py``: 13×13 target dilation and 19×19 fringe dilation at 512 px,
scaled with ``S``), plus a 3×3 erosion:

* **baseline**: the former implementation, ``F.max_pool2d(mask.float(), k, stride=1, padding=k // 2)``
  (k² work per pixel: ~35 s of the 72 s a 2000 px demo took).
* **ours**: ``masks.dilate`` / ``masks.erode`` (a running box count along rows, then along columns: the
  same pixels, a cost that does not depend on k).

Each row prints best-of-N seconds for both, the ratio baseline / ours, and whether the results are
bit-identical (they must be: ``tests/test_masks_fringe.py`` checks it on random masks).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from pack_import import import_pack  # noqa: E402

import_pack()
from max4zero.tensors import masks  # noqa: E402


def _odd(kernel_512: int, size: int) -> int:
    k = max(1, round(kernel_512 * size / 512))
    return k if k % 2 == 1 else k + 1


def ellipse(size: int) -> torch.Tensor:
    y = torch.linspace(-1, 1, size)[:, None]
    x = torch.linspace(-1, 1, size)[None, :]
    return ((x / 0.6) ** 2 + (y / 0.8) ** 2 <= 1.0)[None, None]


def baseline(on: torch.Tensor, k: int, op: str) -> torch.Tensor:
    if op == "dilate":
        return F.max_pool2d(on.float(), kernel_size=k, stride=1, padding=k // 2) > 0.5
    return ~(F.max_pool2d((~on).float(), kernel_size=k, stride=1, padding=k // 2) > 0.5)


def best_of(fn, repeats: int) -> tuple[float, torch.Tensor]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return min(times), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="512 and 1024 px only")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = (512, 1024) if args.quick else (512, 1024, 2000)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'size':>5} {'op':>7} {'kernel':>7} {'baseline s':>11} {'ours s':>9} {'ratio':>7}  identical")
    ok = True
    for size in sizes:
        on = ellipse(size)
        for op, k512 in (("dilate", 13), ("dilate", 19), ("erode", 3)):
            k = _odd(k512, size)
            fn = masks.dilate if op == "dilate" else masks.erode
            repeats = 1 if (size >= 2000 and k > 25) else 3
            t_base, ref = best_of(lambda: baseline(on, k, op), repeats)
            t_ours, got = best_of(lambda: fn(on, k), 3)
            same = torch.equal(ref, got)
            ok &= same
            print(f"{size:>5} {op:>7} {k:>4}x{k:<2} {t_base:>11.3f} {t_ours:>9.3f} {t_base / t_ours:>6.1f}x  {same}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
