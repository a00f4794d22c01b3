"""The shipped two-stage workflows' sampler chain, run through ComfyUI's own KSamplerAdvanced pair.

The model is a stub that predicts x0 perfectly (its APPLY_MODEL wrapper returns a fixed clean latent whatever
it is given), so anything left in the final latent besides that x0 comes from the wiring alone. The sampler
settings and the stage-2 noise mask are read from each workflow file: what is tested is what ships.
"""

from __future__ import annotations

import json

import pytest
import torch

import comfy_models as cm
import make_workflows  # tools/ is on sys.path (tests/conftest.py)
from comfy_models import Graph, run_prompt

NAME = {k: make_workflows.workflow_name(k) for k in make_workflows.WORKFLOW_TITLES}
TWO_STAGE = (NAME["full"], NAME["lora_controlnet"], NAME["sdxl"], NAME["flux_fill"])
FLUX = {NAME["flux_fill"]}  # sampled by a Flux model: 16 latent channels, flow matching, cfg 1
LATENT = 8  # 64 px


def _workflow(name: str) -> dict:
    return json.loads((cm.PACK_ROOT / "workflows" / f"{name}.json").read_text(encoding="utf-8"))


def _samplers(wf: dict) -> tuple[dict, dict]:
    """The two KSamplerAdvanced widget dicts, stage 1 first."""
    keys = ("add_noise", "noise_seed", "control", "steps", "cfg", "sampler_name", "scheduler", "start_at_step",
            "end_at_step", "return_with_leftover_noise")
    nodes = [dict(zip(keys, n["widgets_values"])) for n in wf["nodes"] if n["type"] == "KSamplerAdvanced"]
    s1, s2 = sorted(nodes, key=lambda w: w["start_at_step"])
    for w in (s1, s2):
        w.pop("control")
    return s1, s2


def _stage_two_mask(wf: dict) -> torch.Tensor:
    """The MASK the workflow gives SetLatentNoiseMask (SolidMask: value, width, height)."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    setter = next(n for n in wf["nodes"] if n["type"] == "SetLatentNoiseMask")
    lid = next(i["link"] for i in setter["inputs"] if i["name"] == "mask")
    src = nodes[next(lk for lk in wf["links"] if lk[0] == lid)[1]]
    assert src["type"] == "SolidMask", f"stage 2's noise mask comes from {src['type']}"
    value, width, height = src["widgets_values"][:3]
    return torch.full((1, height, width), float(value))


def _base_model(flux: bool):
    return cm.small_flux_model() if flux else cm.small_sd15_model()


def _x0_stub(x0: torch.Tensor, flux: bool = False):
    """A clone of the small SD1.5 (or Flux) model whose prediction is always ``x0`` (internal latent space)."""
    import comfy.patcher_extension

    patcher = _base_model(flux).clone()

    def predict_x0(executor, x, *args, **kwargs):
        return x0.to(x).expand_as(x).clone()

    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "x0_stub", predict_x0)
    return patcher


def _run_chain(wf: dict, stage_two_mask: torch.Tensor, flux: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Stage 1 (noise mask = a thin fringe) → SetLatentNoiseMask(stage_two_mask) → stage 2. Returns
    (final LATENT samples, the x0 the stub predicts, as a LATENT)."""
    ch = 16 if flux else 4
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(1, ch, LATENT, LATENT, generator=g)
    model = _x0_stub(x0, flux)
    composite = _base_model(flux).model.process_latent_out(torch.randn(1, ch, LATENT, LATENT, generator=g))
    conditioning = cm.flux_conditioning if flux else cm.conditioning
    fringe = torch.zeros(1, 1, LATENT * 8, LATENT * 8)
    fringe[..., 24:40, 16:48] = 1.0  # the thin fringe F (stage 1 regenerates only this)
    s1w, s2w = _samplers(wf)
    graph = Graph()
    m = graph.obj(model, "MODEL")
    pos, neg = graph.obj(conditioning(1), "CONDITIONING"), graph.obj(conditioning(2), "CONDITIONING")
    s1 = graph.node("KSamplerAdvanced", model=m, positive=pos, negative=neg,
                    latent_image=graph.obj({"samples": composite, "noise_mask": fringe}, "LATENT"), **s1w)
    lat2 = graph.node("SetLatentNoiseMask", samples=s1[0], mask=graph.obj(stage_two_mask, "MASK"))
    s2 = graph.node("KSamplerAdvanced", model=m, positive=pos, negative=neg, latent_image=lat2[0], **s2w)
    graph.capture(s1[0], "stage1")
    graph.capture(s2[0], "final")
    res = run_prompt(graph)
    x0_latent = _base_model(flux).model.process_latent_out(x0)
    return res["final"]["samples"], x0_latent


@pytest.mark.parametrize("name", TWO_STAGE)
def test_final_latent_carries_no_stage_one_noise(comfy_env, name):
    wf = _workflow(name)
    s1w, s2w = _samplers(wf)
    # the split the method prescribes: stage 1 keeps its leftover noise, stage 2 adds none
    assert s1w["return_with_leftover_noise"] == "enable" and s2w["add_noise"] == "disable"
    assert s1w["end_at_step"] == s2w["start_at_step"] and s1w["steps"] == s2w["steps"]
    final, x0 = _run_chain(wf, _stage_two_mask(wf), flux=name in FLUX)
    assert (final - x0).abs().max() < 1e-3, float((final - x0).abs().max())


def test_a_target_region_noise_mask_in_stage_two_would_leave_noise(comfy_env):
    """The check above can fail: the old wiring (stage-2 noise mask = the target region) keeps the stage-1 latent,
    noisy at step 35, outside the region."""
    wf = _workflow(NAME["full"])
    region = torch.zeros(1, LATENT * 8, LATENT * 8)
    region[:, 16:56, 8:56] = 1.0
    final, x0 = _run_chain(wf, region)
    outside = region[:, ::8, ::8].expand(4, -1, -1)[None] < 0.5
    assert (final - x0)[outside].std() > 0.3


def test_flux_chain_is_the_sd_chain_on_a_flow_schedule(comfy_env):
    """The Flux workflow keeps the method's split on its own schedule (euler 28 at cfg 1, 70 % / 30 %), and the
    same wrong stage-2 mask leaves Flux noise too (the Flux check above can fail)."""
    wf = _workflow(NAME["flux_fill"])
    s1w, s2w = _samplers(wf)
    assert (s1w["sampler_name"], s1w["scheduler"], s1w["cfg"], s1w["steps"]) == ("euler", "simple", 1.0, 28)
    assert s1w["end_at_step"] == 20  # 70 % of 28, rounded
    region = torch.zeros(1, LATENT * 8, LATENT * 8)
    region[:, 16:56, 8:56] = 1.0
    final, x0 = _run_chain(wf, region, flux=True)
    outside = region[:, ::8, ::8].expand(16, -1, -1)[None] < 0.5
    assert (final - x0)[outside].std() > 0.1
