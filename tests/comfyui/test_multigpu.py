"""Masked Extended Attention under ComfyUI's MultiGPU work split ("MultiGPU CFG Split", ComfyUI 0.33+), on CPU.

``MultiGPU_WorkUnits`` deep-clones the patched model once per extra device and ComfyUI then runs each step's
cond/uncond work units in its ``MultiGPUThreadPool``, one thread per device. There is no GPU here, so the test
makes ComfyUI's device list hold two CPU devices: ``torch.device("cpu")`` and ``torch.device("cpu", 1)`` are
different keys to ComfyUI's scheduler and thread pool, while tensors made on either land on the CPU. That is the
only thing patched (``comfy.model_management.get_all_torch_devices``), and only for these tests: the deep clones,
the scheduler and the thread pool are ComfyUI's own.

What must hold: MEA (fused and paper, UNet and Flux, with and without the Flow View) gives the result it gives on
one device (to float tolerance: the split changes the batch of each UNet call; bit for bit where the work units
land the same, e.g. a single cond unit at cfg 1), in either node order, and the run's state is written per thread
(each worker state by the one thread that made it; the pack checks that on every write).
"""

from __future__ import annotations

import gc
import threading

import pytest
import torch

import comfy_models as cm
from comfy_models import Graph, PromptFailed, run_prompt
from test_mea_nodes import FLOW, SIZE, _mea, _sampler


def _has_multigpu() -> bool:
    """Whether this ComfyUI has the MultiGPU work split; registers its node for the harness's prompts (the harness
    loads ComfyUI's core nodes and this pack, not ``comfy_extras``)."""
    try:
        import comfy.multigpu  # noqa: F401
        from comfy_extras.nodes_multigpu import MultiGPUCFGSplitNode
    except ImportError:
        return False
    import nodes

    nodes.NODE_CLASS_MAPPINGS.setdefault("MultiGPU_WorkUnits", MultiGPUCFGSplitNode)
    return True


pytestmark = pytest.mark.skipif("not _has_multigpu()", reason="this ComfyUI has no MultiGPU CFG Split "
                                "(MultiGPU_WorkUnits, ComfyUI 0.33+)")

DEVICES = [torch.device("cpu"), torch.device("cpu", 1)]


@pytest.fixture
def two_cpu_devices(comfy_env, monkeypatch):
    """ComfyUI's device list with two CPU devices (see the module docstring); the pack's worker states recorded."""
    import comfy.model_management as mm

    # start from nothing loaded: MultiGPU's reuse_loaded scan (ComfyUI's) trips over loaded-model entries whose
    # patcher the earlier tests' prompts already freed (ComfyUI logs them as leaks; its server never frees a
    # patcher it loaded this way). Harness hygiene only: drop those dead entries, then unload the rest.
    # (collect first: a patcher held only in a reference cycle dies at the next collection, which could come
    # during this test's prompt and leave a dead entry behind the filter)
    gc.collect()
    mm.current_loaded_models[:] = [m for m in mm.current_loaded_models if m.model is not None]
    mm.unload_all_models()
    monkeypatch.setattr(mm, "get_all_torch_devices", lambda exclude_current=False: list(DEVICES))
    workers = []
    ws = cm.pack_module("attention.run").WorkerState
    real_init = ws.__init__

    def init(self, run, device):
        real_init(self, run, device)
        workers.append((id(run), str(device), threading.get_ident()))

    monkeypatch.setattr(ws, "__init__", init)
    return workers


@pytest.fixture(scope="module")
def pair():
    return cm.synthetic_pair(SIZE)


def _split(g: Graph, model_link):
    return g.node("MultiGPU_WorkUnits", model=model_link, max_gpus=2)[0]


@pytest.mark.parametrize("guidance", ["fused", "paper"])
@pytest.mark.parametrize("order", ["mea_then_split", "split_then_mea"])
def test_unet_mea_under_multigpu_matches_one_device(two_cpu_devices, small_sd15_model, small_vae, pair, guidance,
                                                    order):
    model = small_sd15_model()
    g = Graph()
    m = g.obj(model, "MODEL")
    # how far ComfyUI's own split moves plain sampling (float order of the split batches): the tolerance scale.
    # One prompt for everything: a patcher freed between prompts trips MultiGPU's reuse_loaded scan (ComfyUI's)
    g.capture(_sampler(g, _split(g, m))[0], "stock_split")
    one = _mea(g, m, small_vae, pair, guidance=guidance)
    if order == "mea_then_split":
        mea = _mea(g, m, small_vae, pair, guidance=guidance)
        split_model = _split(g, mea[0])
    else:
        mea = _mea(g, _split(g, m), small_vae, pair, guidance=guidance)
        split_model = mea[0]
    s_one = _sampler(g, one[0])
    s_split = _sampler(g, split_model)
    g.capture(s_one[0], "one")
    g.capture(s_split[0], "split")
    g.capture(_sampler(g, m)[0], "stock")
    view = g.node(FLOW, trace=mea[1], reference=g.obj(pair["reference"], "IMAGE"), samples=s_split[0],
                  layers="all MEA layers", step_start=0.0, step_end=1.0, tau=1.0, mode="absolute")
    g.capture(view[2], "reliance")
    two_cpu_devices.clear()
    res = run_prompt(g)
    a, b, stock = res["one"]["samples"], res["split"]["samples"], res["stock"]["samples"]
    gap = float((stock - res["stock_split"]["samples"]).abs().max())
    assert (a - stock).abs().max() > 1e-3  # MEA acted
    err = float((a - b).abs().max())
    print(f"[multigpu {guidance} {order}] MEA split vs one device {err:.3g}; vanilla split gap {gap:.3g}")
    assert err <= max(10 * gap, 1e-4), f"MEA on two devices differs from one device by {err:.3g} (split gap {gap:.3g})"
    # MEA ran inside ComfyUI's thread pool, and every worker state belongs to one thread
    main = threading.get_ident()
    split_run = cm.mea_run(mea.id, b)
    one_run = cm.mea_run(one.id, a)
    assert any(t != main for _, _, t in two_cpu_devices), two_cpu_devices
    assert len(set(two_cpu_devices)) == len(two_cpu_devices)  # one state per run, device and thread
    assert split_run.stats["mea_calls"] == one_run.stats["mea_calls"] > 0
    assert split_run.stats["reference_passes"] == one_run.stats["reference_passes"]
    assert res["reliance"].max() > 0  # the flow view renders the split run's records
    assert len(split_run.records[1.0]) == len(cm.mea_run(mea.id, b).records[1.0]) > 0


def test_a_single_work_unit_is_bit_identical_to_one_device(two_cpu_devices, small_sd15_model, small_vae, pair):
    """cfg 1, fused: one cond unit per step, which ComfyUI puts on the first device: same computation, same bits."""
    model = small_sd15_model()
    g = Graph()
    m = g.obj(model, "MODEL")
    one = _mea(g, m, small_vae, pair)
    mea = _mea(g, m, small_vae, pair)
    g.capture(_sampler(g, one[0], cfg=1.0)[0], "one")
    g.capture(_sampler(g, _split(g, mea[0]), cfg=1.0)[0], "split")
    res = run_prompt(g)
    assert torch.equal(res["one"]["samples"], res["split"]["samples"])


def test_a_state_shared_across_threads_is_caught(two_cpu_devices, small_sd15_model, small_vae, pair, monkeypatch):
    """The plausible wrong design — one state per run, written by every thread — fails on the pack's own check."""
    run_cls = cm.pack_module("attention.run").MeaRun
    shared = {}

    def one_state(self, device):
        if id(self) not in shared:
            shared[id(self)] = cm.pack_module("attention.run").WorkerState(self, device)
        return shared[id(self)]

    monkeypatch.setattr(run_cls, "worker", one_state)
    g = Graph()
    mea = _mea(g, g.obj(small_sd15_model(), "MODEL"), small_vae, pair, guidance="paper")
    g.capture(_sampler(g, _split(g, mea[0]))[0], "split")
    with pytest.raises(PromptFailed, match="written from another thread"):
        run_prompt(g)


@pytest.mark.parametrize("guidance", ["fused", "paper"])
def test_flux_mea_under_multigpu_matches_one_device(two_cpu_devices, guidance):
    if cm.pack_module("nodes.mea_flux").flux_hook_problem() is not None:
        pytest.skip("this ComfyUI's Flux blocks have no attention hook")
    from test_flux_mea import _mea as flux_mea, _sampler as flux_sampler

    model = cm.small_flux_model()
    g = Graph()
    m = g.obj(model, "MODEL")
    g.capture(flux_sampler(g, m, cfg=3.5, steps=2)[0], "stock_one")
    g.capture(flux_sampler(g, _split(g, m), cfg=3.5, steps=2)[0], "stock_split")
    one = flux_mea(g, m, guidance=guidance)
    mea = flux_mea(g, m, guidance=guidance)
    g.capture(flux_sampler(g, one[0], cfg=3.5, steps=2)[0], "one")
    s_split = flux_sampler(g, _split(g, mea[0]), cfg=3.5, steps=2)
    g.capture(s_split[0], "split")
    res = run_prompt(g)
    gap = float((res["stock_one"]["samples"] - res["stock_split"]["samples"]).abs().max())
    a, b = res["one"]["samples"], res["split"]["samples"]
    assert (a - res["stock_one"]["samples"]).abs().max() > 1e-4
    err = float((a - b).abs().max())
    print(f"[multigpu flux {guidance}] MEA split vs one device {err:.3g}; vanilla split gap {gap:.3g}")
    assert err <= max(10 * gap, 1e-4), f"{err:.3g} vs split gap {gap:.3g}"
    assert cm.mea_run(mea.id, b).stats["mea_calls"] == cm.mea_run(one.id, a).stats["mea_calls"] > 0
    assert any(t != threading.get_ident() for _, _, t in two_cpu_devices)
