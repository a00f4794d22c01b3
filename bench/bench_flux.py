"""Benchmark: MEA on a Flux-family DiT (docs/method.md §3c) — time ratio vs vanilla, extra memory, full-size estimate.

Needs a ComfyUI 0.33.0+ checkout: ``COMFYUI_PATH=/path/to/ComfyUI python bench/bench_flux.py``.

1. **Ratio vs vanilla** on the tiny test Flux (``tests/comfyui/comfy_models.small_flux_model``: hidden 128,
   2 heads, 2 double + 2 single blocks, FLUX.1 Fill layout): seconds per model evaluation of one sampling step
   at cfg 1 (the guidance-distilled setting), vanilla vs ``fused`` (cond pass with MEA + reference pass) vs
   ``paper`` (cond pass + MEA pass + reference pass) vs ``fused`` with ``reference_every`` 2 and 3 (the
   reference pass every 2nd / 3rd step, its K/V reused in between: an approximation of the paper), every
   block selected, contrast 1.25, window = every step. Sampled with ComfyUI's own ``comfy.sample.sample``
   (euler, ``--steps`` 6, divisible by 2 and 3), median of ``--repeats`` after a warm-up.
2. **Extra memory at a 4096-token image** (1024² px, 64×64 tokens): the reference K/V MEA keeps per step is
   2 (K and V) · G (garment tokens) · hidden · bytes per selected block — measured on the tiny model by
   counting the stored tensors, and stated for full-size FLUX.1 (hidden 3072) by the same formula.
   The attention working memory of MEA per block call is bounded by ``DEFAULT_CHUNK_BYTES`` (48 MB) on the
   explicit path (attention/masked_extended.py), whatever the resolution.
3. **Estimate for full-size FLUX.1 at 1024²** from per-block numbers (formula printed with the numbers).

Measured (ComfyUI 0.33.0, CPU, 1 thread, shared 2-core box): 128 px (64 tokens) vanilla 6.7 ms/step, fused
2.24x, paper 3.23x, fused every 2 1.76x, fused every 3 1.58x; 1024 px (4096 tokens) fused 2.23x, every 2 1.65x,
every 3 1.47x (an earlier run on a busier box: 2.39 / 3.28 / 1.86 / 1.71 and 2.27 / 1.70 / 1.55). Stored K/V at
4096 tokens, G = 1024: 1.0 MiB per block (tiny, float32) → FLUX.1 bf16 12 MiB per block, 108 MiB vital, 684 MiB
all 57 blocks. The ratios are the extra forwards (reference pass; paper's MEA pass) at cfg 1, plus MEA's own cost
o in the target pass: fused ≈ 1 + o + 1/N with N = ``reference_every``, o ≈ 0.24 here (every block carries MEA);
for FLUX.1 with the 9 vital blocks the estimate is o ≈ 0.014: ~2.0x, ~1.5x, ~1.35x at N = 1, 2, 3.

Usage: python bench/bench_flux.py [--size 128] [--steps 6] [--repeats 5] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _boot():
    sys.path.insert(0, str(ROOT / "tests" / "comfyui"))
    import comfy_models as cm

    cm.boot(os.environ["COMFYUI_PATH"])
    return cm


def _patched(cm, model, mode: str, size: int, garment_frac: float, reference_every: int = 1):
    mf = cm.pack_module("nodes.mea_flux")
    dit = cm.pack_module("attention.dit")
    lat_hw = (size // 8, size // 8)
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(1, 16, *lat_hw, generator=g)
    gm = torch.zeros(1, size, size, dtype=torch.bool)
    side = int(round(size * garment_frac ** 0.5))
    gm[:, :side, :side] = True
    tm = torch.zeros(1, size, size)
    tm[:, size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1.0
    dm = model.model.diffusion_model
    settings = cm.pack_module("attention.run").MeaSettings(
        mode=mode, s_mea=3.0, contrast=1.25, start=0.0, end=1.0, reference_every=reference_every,
        ref_latent=ref, ref_noise=torch.randn(ref.shape, generator=g), ref_context=None, garment_mask=gm,
        target_mask=tm,
    )
    patch = mf.FluxMeaPatch(
        blocks=dit.parse_flux_blocks("all", len(dm.double_blocks), len(dm.single_blocks)), settings=settings,
    )
    m = model.clone()
    patch.install(m)
    return m, patch


def _sample_seconds(cm, model, size: int, steps: int, repeats: int) -> float:
    import comfy.sample

    latent = torch.zeros(1, 16, size // 8, size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
    pos = cm.flux_conditioning(1)
    neg = cm.flux_conditioning(2)

    def once():
        t0 = time.perf_counter()
        with torch.no_grad():
            comfy.sample.sample(model, noise, steps, 1.0, "euler", "simple", pos, neg, latent, disable_pbar=True,
                                seed=1)
        return (time.perf_counter() - t0) / steps

    once()
    return statistics.median(once() for _ in range(repeats))


#: (guidance, reference_every) of the timed rows; every > 1 skips the reference pass between recordings
ROWS = (("fused", 1), ("paper", 1), ("fused", 2), ("fused", 3))


def _label(mode: str, every: int) -> str:
    return mode if every == 1 else f"{mode}, every {every}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--steps", type=int, default=6)  # a multiple of 2 and 3: reference_every 2 and 3 divide it
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cm = _boot()
    model = cm.small_flux_model()
    tokens = (args.size // 16) ** 2
    print(f"tiny Flux (hidden 128, 2+2 blocks, Fill layout), {args.size}px = {tokens} image tokens, cfg 1, "
          f"{args.threads} thread(s)")
    base = _sample_seconds(cm, model, args.size, args.steps, args.repeats)
    print(f"  {'vanilla':17s} {base * 1e3:8.2f} ms/step  1.00x")
    ratios = {}
    for mode, every in ROWS:
        m, _ = _patched(cm, model, mode, args.size, 0.25, every)
        s = _sample_seconds(cm, m, args.size, args.steps, args.repeats)
        ratios[(mode, every)] = s / base
        print(f"  {_label(mode, every):17s} {s * 1e3:8.2f} ms/step  {s / base:4.2f}x")
    # fused = 1 (the cond pass) + o (MEA in it) + 1/N (the reference pass, every N-th step)
    o = ratios[("fused", 1)] - 2.0
    print(f"  (fused = 1 + o + 1/N with o = {o:.2f}, MEA's own cost in the cond pass with every block selected: "
          f"expected every 2 {1 + o + 1 / 2:.2f}x, every 3 {1 + o + 1 / 3:.2f}x)")

    # memory: the reference K/V actually stored at a 4096-token image (1024 px), garment = 25 % of the reference
    size = 1024
    m, patch = _patched(cm, model, "fused", size, 0.25)
    mea_run = cm.pack_module("attention.run").WorkerState
    kept = {}
    real_keep = mea_run.keep

    def keep(self, store, sigma, step=None):
        kept["store"] = store
        return real_keep(self, store, sigma, step)

    mea_run.keep = keep
    try:
        big = _sample_seconds(cm, m, size, args.steps, 1)
    finally:
        mea_run.keep = real_keep
    big_base = _sample_seconds(cm, model, size, args.steps, 1)
    bigs = [f"fused {big / big_base:.2f}x"]
    for every in (2, 3):
        m_every, _ = _patched(cm, model, "fused", size, 0.25, every)
        bigs.append(f"{_label('fused', every)} {_sample_seconds(cm, m_every, size, args.steps, 1) / big_base:.2f}x")
    store = kept["store"]
    g_tok = int(cm.pack_module("attention.policy").token_mask(patch.settings.garment_mask, patch.ref_grid).sum())
    stored = sum(e.k.numel() * e.k.element_size() + e.v.numel() * e.v.element_size() for e in store.values())
    per_block = stored / max(1, len(store))
    print(f"at 4096 image tokens (1024 px), vs vanilla ({big_base * 1e3:.0f} ms/step): {', '.join(bigs)}; "
          f"G = {g_tok} garment tokens")
    print(f"  tiny Flux: stored K/V {stored / 2**20:.2f} MiB over {len(store)} blocks ({per_block / 2**20:.3f} MiB "
          "per block = 2*G*hidden*4 B, float32)")
    full_block = 2 * g_tok * 3072 * 2  # bf16
    print(f"  FLUX.1 (hidden 3072, bf16): {full_block / 2**20:.1f} MiB per block -> vital (9 blocks) "
          f"{9 * full_block / 2**20:.0f} MiB, all 57 blocks {57 * full_block / 2**20:.0f} MiB; plus at most "
          "48 MB attention working memory per MEA block call")
    # time estimate for full-size FLUX.1 at 1024²: L = 512 text + 4096 image tokens
    L, n_img = 512 + 4096, 4096
    r = 0.25  # share of image queries in the region
    extra_attn = r * n_img * (L + g_tok) / (L * L)
    print("estimate for FLUX.1 at 1024² (L = 4608, region 25 %, G = 1024), per MEA step at cfg 1:")
    print(f"  per selected block, attention: plain + region queries redone over (L + G) keys = "
          f"(1 + {extra_attn:.3f}) x plain attention (+ the block's own attention outside the override)")
    print("  whole step: fused ~ 2 forwards (cond with MEA + reference pass), paper ~ 3 (cond, cond with MEA, "
          "reference); the reference pass is cached per sigma, and with reference_every N runs every N-th step "
          "only: fused ~ 1 + 1/N forwards. Attention is ~1/3 of a FLUX.1 forward at 1024², "
          f"so with all 57 blocks the MEA overhead on top is ~{extra_attn / 3 * 100:.0f} % of a forward, "
          f"with the 9 vital blocks ~{extra_attn / 3 * 9 / 57 * 100:.1f} %.")
    o_vital = extra_attn / 3 * 9 / 57
    print("  fused with the vital blocks, reference_every 1 / 2 / 3: ~" + " / ".join(
        f"{1 + o_vital + 1 / n:.2f}x" for n in (1, 2, 3)) + " (estimate, not measured)")


if __name__ == "__main__":
    main()
