"""Benchmark: seconds per sampling step with the MEA model patch — vanilla vs ``fused`` vs ``paper``.

Needs a ComfyUI checkout: ``COMFYUI_PATH=/path/to/ComfyUI python bench/bench_mea_sampling.py``.

Same model, same run: a random-weight UNet with the SD1.5 block layout (``--model full``: the real
SD1.5 widths, model_channels 320, 860 M parameters; ``--model small``: model_channels 32, the test
model; ``--model reduced``: the browser check's and ``bench_workflows.py``'s reduced layout, one res block per
level at 320 channels, 74 M parameters: ``--model full`` and ``--model reduced`` at one size tell how much longer
a real SD1.5 step takes than the timing table's), sampled with ComfyUI's own ``comfy.sample.sample`` (euler,
CFG 7.5, batch 1) at ``--size`` pixels. The MEA window covers every step (start 0, end 1), so every timed step is an MEA step;
paper mode adds one positive pass with MEA, both modes one reference row per step. Each mode is
sampled once untimed (warm-up, first-call allocations), then ``--repeats`` times; the median seconds
per step is reported with the ratio to vanilla and the peak memory of one sampling run above the
memory held before it (CPU: the process's resident-set high-water mark, reset through
/proc/self/clear_refs; CUDA: ``max_memory_allocated``).

Rows evaluated per step: vanilla 2 (cond + uncond), fused 3 (+ reference), paper 4 (+ reference,
+ MEA positive). By default the reference rides as one extra row in the call that needs it (fused:
[uncond, cond, ref] in one call; paper: [cond_MEA, ref]); "sep" rows force the separate batch-1
reference pass instead (one more UNet call per step: a one-row call costs ~0.6 of a two-row call,
measured with the full-width model on one CPU thread). The rest is MEA attention itself (contrast
1.25 runs the explicit, chunked path; contrast 1.0 the SDPA fast path — both are measured). "ev2":
``reference_every`` 2, the reference row only every second step (an approximation of the paper).

Goals: fused ≤ 1.5× vanilla, paper ≤ 2.0× vanilla; recording the attention for a connected flow view
("rec" rows) ≤ 1.10× the same mode unrecorded.

``--clock cpu --threads 1`` measures per-thread CPU time on one thread: stable ratios on a machine
shared with other jobs (wall time on a busy 2-core box varies by 2-4×).

Usage: python bench/bench_mea_sampling.py [--model full|small|reduced] [--size 256] [--steps 3] [--repeats 2]
       [--device cpu|cuda] [--threads N] [--clock wall|cpu] [--modes vanilla,fused]
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

from rss_probe import reset_peak, status_kib  # bench/ is this script's folder

ROOT = Path(__file__).resolve().parents[1]


def _boot(device: str) -> None:
    path = os.environ.get("COMFYUI_PATH", "").strip()
    if not path or not (Path(path) / "comfy").is_dir():
        sys.exit("COMFYUI_PATH must point at a ComfyUI checkout (this benchmark samples with ComfyUI)")
    # ComfyUI's top-level 'nodes' must win over this repository's nodes/ folder
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != str(ROOT)]
    sys.path.insert(0, str(Path(path).resolve()))
    sys.path.insert(0, str(ROOT / "tools"))
    sys.path.insert(0, str(ROOT / "tests" / "comfyui"))  # the test harness builds the random-weight models
    import comfy.cli_args

    comfy.cli_args.args.cpu = device == "cpu"
    import comfy.model_management  # noqa: F401
    from pack_import import import_pack

    import_pack()




class Peak:
    """Peak memory of a block above what was held when it started (MB)."""

    def __init__(self, device: str):
        self.device = device

    def __enter__(self):
        import torch

        gc.collect()
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            self.ok = reset_peak()
            self.base = status_kib("VmRSS") * 1024
        return self

    def __exit__(self, *exc):
        import torch

        if self.device == "cuda":
            torch.cuda.synchronize()
            self.mb = (torch.cuda.max_memory_allocated() - self.base) / 2**20
        else:
            self.mb = (status_kib("VmHWM") * 1024 - self.base) / 2**20 if self.ok else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=("full", "small", "reduced"), default="full")
    ap.add_argument("--modes", default="", help="only these rows, e.g. vanilla,fused (default: every row)")
    ap.add_argument("--size", type=int, default=256, help="image side in pixels (latent = size / 8)")
    ap.add_argument("--steps", type=int, default=3, help="sampling steps per timed run")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch default)")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu = per-thread CPU time (use with --threads 1 on a busy machine)")
    args = ap.parse_args()
    _boot(args.device)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clock == "cpu" and torch.get_num_threads() != 1:
        sys.exit("--clock cpu measures one thread: add --threads 1")
    import comfy.model_management as mm
    import comfy.sample
    import comfy_models as cm

    from max4zero.attention import policy
    from max4zero.nodes import mea_calls, mea_patch as mp

    channels = 32 if args.model == "small" else 320
    if args.model == "reduced":
        import comfy.supported_models
        from browser_support import sd15_small_unet_config

        patcher = cm._random_unet_patcher(comfy.supported_models.SD15(sd15_small_unet_config(4)), 0)
    else:
        patcher = cm.small_sd15_model(inpaint=False, model_channels=channels, cached=False)
    n_params = sum(p.numel() for p in patcher.model.diffusion_model.parameters())
    lat_side = args.size // 8
    g = torch.Generator().manual_seed(0)
    pos = [[torch.randn(1, 77, 768, generator=g), {}]]
    neg = [[torch.randn(1, 77, 768, generator=g), {}]]
    ref_latent = torch.randn(1, 4, lat_side, lat_side, generator=g)
    ref_noise = torch.randn(1, 4, lat_side, lat_side, generator=g)
    yy, xx = torch.meshgrid(torch.arange(args.size), torch.arange(args.size), indexing="ij")
    garment = ((yy - args.size / 2).abs() < args.size * 0.35) & ((xx - args.size / 2).abs() < args.size * 0.3)
    target = ((yy - args.size * 0.55).abs() < args.size * 0.3) & ((xx - args.size / 2).abs() < args.size * 0.28)
    sel = policy.LAYER_CHOICES[policy.DEFAULT_LAYERS]
    keys = mea_calls.attn1_slots(patcher.model.diffusion_model, sel.parts)

    from max4zero.attention.run import MeaSettings
    from max4zero.nodes.trace import MeaTrace, RunRegistry

    class SeparateReference(mp.MeaPatch):
        inline_reference = False  # the reference as a pass of its own, never one more row of the call

    def variant(mode: str | None, contrast: float, inline: bool = True, record: bool = False, every: int = 1):
        if mode is None:
            return patcher, None
        m = patcher.clone()
        settings = MeaSettings(
            mode=mode, s_mea=15.0, contrast=contrast, start=0.0, end=1.0, reference_every=every,
            ref_latent=ref_latent, ref_noise=ref_noise, ref_context=pos[0][0], garment_mask=garment[None],
            target_mask=target[None].float(),
        )
        registry = RunRegistry(keep_older=1000)
        trace = MeaTrace(node_key="bench", taus=(1.0,) if record else (), registry=registry)
        patch = (mp.MeaPatch if inline else SeparateReference)(settings=settings, layers=sel, attn1_keys=keys,
                                                                  trace=trace)
        patch.install(m)
        return m, registry

    clock = time.thread_time if args.clock == "cpu" else time.perf_counter

    def run(model) -> float:
        lat = torch.zeros(1, 4, lat_side, lat_side)
        noise = comfy.sample.prepare_noise(lat, 0)
        if args.device == "cuda":
            torch.cuda.synchronize()
        t0 = clock()
        comfy.sample.sample(model, noise, args.steps, 7.5, "euler", "normal", pos, neg, lat, seed=0,
                            disable_pbar=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return (clock() - t0) / args.steps

    cases = [("vanilla", None, 1.0, True), ("fused", "fused", 1.25, True), ("paper", "paper", 1.25, True),
             ("fused c=1", "fused", 1.0, True), ("paper c=1", "paper", 1.0, True),
             ("fused sep", "fused", 1.25, False), ("paper sep", "paper", 1.25, False),
             ("fused rec", "fused", 1.25, True), ("paper rec", "paper", 1.25, True),
             ("fused ev2", "fused", 1.25, True)]
    if args.modes:
        wanted = {m.strip() for m in args.modes.split(",")} | {"vanilla"}  # the ratios are to vanilla
        cases = [c for c in cases if c[0] in wanted]
    print(f"model: SD1.5 block layout ({args.model}), model_channels {channels} "
          f"({n_params / 1e6:.0f} M UNet parameters, random weights); image {args.size}x{args.size} (latent {lat_side}x{lat_side}); euler, CFG 7.5, "
          f"batch 1; {args.steps} steps x {args.repeats} repeats; device {mm.get_torch_device()}; "
          f"threads {torch.get_num_threads()}; clock {args.clock}")
    results = {}
    with torch.inference_mode():
        for name, mode, contrast, inline in cases:
            model, patch = variant(mode, contrast, inline, record=name.endswith(" rec"),
                                   every=2 if name.endswith(" ev2") else 1)
            run(model)  # warm-up (model load, first-call allocations)
            times = []
            with Peak(args.device) as peak:
                times.append(run(model))
            for _ in range(args.repeats - 1):
                times.append(run(model))
            extra = ""
            if patch is not None:  # the variant's run registry: every sampling run's counters
                runs = patch.runs()
                passes = sum(r.stats["reference_passes"] for r in runs) / len(runs)
                calls = sum(r.stats["mea_calls"] for r in runs) / len(runs) / args.steps
                extra = f"  ({passes:.0f} reference passes and {calls:.0f} MEA layer calls per run / step)"
            results[name] = (statistics.median(times), peak.mb)
            print(f"  measured {name:10s} {statistics.median(times):8.3f} s/step{extra}")
    base = results["vanilla"][0]
    # recording for a connected flow view: goal at most 10 % of a step over the same mode unrecorded
    for mode in ("fused", "paper"):
        if f"{mode} rec" not in results or mode not in results:
            continue
        rec, plain = results[f"{mode} rec"][0], results[mode][0]
        print(f"recording cost ({mode}): {rec / plain:.3f}x the unrecorded step (goal <= 1.10: "
              f"{'ok' if rec / plain <= 1.10 else 'MISS'})")
    print()
    print(f"{'mode':12s} {'s/step':>9s} {'x vanilla':>10s} {'goal':>6s} {'peak MB':>9s}")
    goals = {"fused": 1.5, "paper": 2.0, "fused c=1": 1.5, "paper c=1": 2.0, "fused sep": 1.5, "paper sep": 2.0}
    for name, (sec, mb) in results.items():
        goal = goals.get(name)
        mark = "" if goal is None else ("ok" if sec / base <= goal else "MISS")
        print(f"{name:12s} {sec:9.3f} {sec / base:10.2f} {('' if goal is None else f'{goal:.1f}'):>6s} "
              f"{mb:9.1f} {mark}")


if __name__ == "__main__":
    main()
