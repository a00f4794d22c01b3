"""The Leffa flow view under ComfyUI's caches: it shows the run that made its samples, or says why not.

One executor is kept across prompts, as the server keeps it, with each output-cache kind this ComfyUI has
(``CLASSIC`` everywhere, ``RAM_PRESSURE`` since 2026). Cases:

* the known limit: a result sampled while no view was connected is reused from the cache when a view is
  added; the view says so, asks for a recording, names the fix, and each half of that fix, followed, makes it
  render;
* the RAM-pressure cache drops the MEA node's output (its trace object with it) but keeps the sampler's
  result: the view still shows the attention of the run that made those samples;
* two sampling runs through one MEA model: each view shows its own run, never the other one.
"""

from __future__ import annotations

import copy

import pytest
import torch

import comfy_models as cm
from comfy_models import Graph, PromptFailed, run_prompt
from test_mea_nodes import FLOW, SIZE, _mea, _sampler

CACHE_KINDS = cm.cache_types()  # conftest booted ComfyUI before collecting this module


@pytest.fixture(scope="module")
def pair():
    return cm.synthetic_pair(SIZE)


def _view(g: Graph, trace_link, samples_link, pair, tau=1.0, node_id=None):
    return g.node(FLOW, node_id=node_id, trace=trace_link, reference=g.obj(pair["reference"], "IMAGE"),
                  samples=samples_link, layers="all MEA layers", step_start=0.0, step_end=1.0, tau=tau,
                  mode="absolute")


def _base(small_sd15_model, small_vae, pair):
    """MEA → sampler, no view. Returns (graph, mea ref, sampler ref)."""
    g = Graph()
    mea = _mea(g, g.obj(small_sd15_model(), "MODEL"), small_vae, pair, start=0.5)
    samp = _sampler(g, mea[0])
    g.node("TestHarnessCapture", node_id="cap", value=samp[0], name="latent")
    return g, mea, samp


def _with_view(prompt: dict, view_prompt: dict) -> dict:
    out = copy.deepcopy(prompt)
    out.update(view_prompt)
    return out


def _view_prompt(g: Graph, mea, samp, pair, tau=1.0) -> tuple[dict, str]:
    """The base graph plus a view (node id 'view'); returns (prompt, view id)."""
    view = _view(g, mea[1], samp[0], pair, tau=tau, node_id="view")
    return g.prompt(), view.id


@pytest.mark.parametrize("cache_kind", CACHE_KINDS)
def test_view_added_after_a_cached_run_says_why_and_each_fix_works(comfy_env, small_sd15_model, small_vae, pair,
                                                                   cache_kind):
    g, mea, samp = _base(small_sd15_model, small_vae, pair)
    plain = g.prompt()
    with_view, view_id = _view_prompt(g, mea, samp, pair)
    executor = cm.new_executor(cm.StubServer(), cache_kind)

    first = run_prompt(plain, executor=executor)
    trace = first.output(mea.id, 1)
    assert not trace.enabled  # nothing consumed the trace: recording off, free

    with pytest.raises(PromptFailed) as e:
        run_prompt(with_view, executor=executor)
    msg = e.value.message
    assert e.value.node_id == view_id
    assert "no attention was recorded" in msg and "cached" in msg
    assert "Unload Models and Execution Cache" in msg and "changing the sampler's seed" in msg
    assert not trace.enabled and trace.recording_taus() == (1.0,)  # the view asked the registry, not the trace

    # fix 1: a new seed re-samples with the (cached) MEA model, which reads the request and records
    reseeded = copy.deepcopy(with_view)
    reseeded[samp.id]["inputs"]["noise_seed"] = 8
    res = run_prompt(reseeded, executor=executor)
    assert res.output(mea.id, 1) is trace  # the MEA node was not run again: the request did it
    flow = res.output(view_id, 0)
    assert flow.shape == (1, SIZE, SIZE, 3) and flow.max() > 0

    # fix 2: 'Unload Models and Execution Cache' (POST /free {"free_memory": true} resets the executor)
    executor2 = cm.new_executor(cm.StubServer(), cache_kind)
    run_prompt(plain, executor=executor2)
    with pytest.raises(PromptFailed, match="no attention was recorded"):
        run_prompt(with_view, executor=executor2)
    executor2.reset()
    res2 = run_prompt(with_view, executor=executor2)
    assert res2.output(view_id, 0).max() > 0
    # same seed, same image: the fix shows the attention of the very result the user was looking at
    assert torch.equal(res2.output(samp.id, 0)["samples"], first["latent"]["samples"])


@pytest.mark.parametrize("cache_kind", CACHE_KINDS)
def test_view_survives_the_mea_output_being_dropped_from_the_cache(comfy_env, small_sd15_model, small_vae, pair,
                                                                   cache_kind):
    g, mea, samp = _base(small_sd15_model, small_vae, pair)
    with_view, view_id = _view_prompt(g, mea, samp, pair)
    executor = cm.new_executor(cm.StubServer(), cache_kind)
    res1 = run_prompt(with_view, executor=executor)
    flow1 = res1.output(view_id, 0)
    trace1 = res1.output(mea.id, 1)
    sampled1 = res1.output(samp.id, 0)

    # RAM pressure: the MEA node's output (an old ModelPatcher goes first) and the view's output are dropped,
    # the sampler's result stays
    assert cm.evict_outputs(executor, mea.id) and cm.evict_outputs(executor, view_id)
    res2 = run_prompt(with_view, executor=executor)
    assert res2.output(mea.id, 1) is not trace1  # the MEA node ran again: a fresh trace (it holds no records)
    assert res2.output(samp.id, 0) is sampled1  # the sampler did not: its cached result was reused
    assert torch.equal(res2.output(view_id, 0), flow1)  # the view found the run that made those samples


def test_each_view_shows_the_run_that_made_its_samples(comfy_env, small_sd15_model, small_vae, pair):
    g = Graph()
    mea = _mea(g, g.obj(small_sd15_model(), "MODEL"), small_vae, pair, start=0.5)
    views = {}
    for seed in (7, 8):
        samp = _sampler(g, mea[0], seed=seed)
        views[seed] = _view(g, mea[1], samp[0], pair)
        g.capture(views[seed][0], f"flow{seed}")
    res = run_prompt(g)
    a, b = res["flow7"], res["flow8"]
    assert a.max() > 0 and b.max() > 0 and not torch.equal(a, b)

    # a sampler whose model is NOT the MEA output: its samples were never traced
    g2 = Graph()
    mea2 = _mea(g2, g2.obj(small_sd15_model(), "MODEL"), small_vae, pair, start=0.5)
    plain = _sampler(g2, g2.obj(small_sd15_model(), "MODEL"), seed=9)
    g2.capture(_view(g2, mea2[1], plain[0], pair)[0], "flow")
    g2.capture(_sampler(g2, mea2[0])[0], "latent")  # the MEA model samples too, but not these samples
    with pytest.raises(PromptFailed, match="no sampling run with a model from MEA node"):
        run_prompt(g2)


def test_view_at_another_tau_names_the_fix_and_the_fix_works(comfy_env, small_sd15_model, small_vae, pair):
    g, mea, samp = _base(small_sd15_model, small_vae, pair)
    with_view, view_id = _view_prompt(g, mea, samp, pair, tau=1.0)
    executor = cm.new_executor(cm.StubServer())
    run_prompt(with_view, executor=executor)
    other_tau = copy.deepcopy(with_view)
    other_tau[view_id]["inputs"]["tau"] = 2.0  # only the view changed: sampling is cached
    with pytest.raises(PromptFailed, match="recorded at tau=1, this view asks for tau=2"):
        run_prompt(other_tau, executor=executor)
    other_tau[samp.id]["inputs"]["noise_seed"] = 8
    assert run_prompt(other_tau, executor=executor).output(view_id, 0).max() > 0


# ------------------------------------------------------------------------------------------------
# wirings that used to loop: each message's advice, followed, ends with a rendered view
# ------------------------------------------------------------------------------------------------


def test_two_views_at_different_tau_on_one_mea_node_both_render(comfy_env, small_sd15_model, small_vae, pair):
    """Before: one τ was recorded, so one view always failed, and re-sampling only moved the failure."""
    g, mea, samp = _base(small_sd15_model, small_vae, pair)
    v1 = _view(g, mea[1], samp[0], pair, tau=1.0)
    v2 = _view(g, mea[1], samp[0], pair, tau=2.0)
    g.capture(v1[0], "tau1")
    g.capture(v2[0], "tau2")
    res = run_prompt(g)
    assert res["tau1"].max() > 0 and res["tau2"].max() > 0 and not torch.equal(res["tau1"], res["tau2"])
    assert res.output(mea.id, 1).taus == (1.0, 2.0)  # both recorded in the one sampling run


def test_a_view_on_another_mea_node_s_samples_names_both_and_rewiring_renders(comfy_env, small_sd15_model,
                                                                             small_vae, pair):
    """Before: 'made while no Flow View was connected', and both advised fixes looped forever."""
    g = Graph()
    m = g.obj(small_sd15_model(), "MODEL")
    a = _mea(g, m, small_vae, pair, start=0.5)
    b = _mea(g, m, small_vae, pair, start=0.5, contrast=1.0)
    s_a, s_b = _sampler(g, a[0]), _sampler(g, b[0], seed=8)
    g.capture(s_a[0], "a")
    view = _view(g, a[1], s_b[0], pair, node_id="view")  # trace of A, samples of B
    prompt = g.prompt()
    executor = cm.new_executor(cm.StubServer())
    with pytest.raises(PromptFailed) as e:
        run_prompt(prompt, executor=executor)
    msg = e.value.message
    assert f"MEA node #{a.id}" in msg and f"MEA node #{b.id}" in msg and "same MEA node" in msg
    assert "change that sampler's seed" in msg  # B's run recorded nothing for a view
    rewired = copy.deepcopy(prompt)
    rewired[view.id]["inputs"]["trace"] = [b.id, 1]  # the fix: the trace of the node whose model sampled ...
    rewired[s_b.id]["inputs"]["noise_seed"] = 9  # ... and a new seed for that sampler
    assert run_prompt(rewired, executor=executor).output(view.id, 0).max() > 0


def test_many_mea_sampling_runs_in_one_prompt_before_the_view(comfy_env, small_sd15_model, small_vae, pair):
    """Before: the registry kept 8 runs, so a prompt with more MEA samplers than that lost the view's run."""
    g = Graph()
    mea = _mea(g, g.obj(small_sd15_model(), "MODEL"), small_vae, pair, start=0.5)
    first = _sampler(g, mea[0], seed=100)
    for seed in range(12):  # all of these sample before the view runs (the view needs only the first)
        g.capture(_sampler(g, mea[0], seed=seed)[0], f"other{seed}")
    g.capture(first[0], "first")
    view = _view(g, mea[1], first[0], pair)
    g.capture(view[0], "flow")
    res = run_prompt(g)
    assert res["flow"].max() > 0


def test_no_op_report_is_quiet_for_a_run_that_stops_before_the_window(comfy_env, small_sd15_model, small_vae, pair):
    """The MEA model also feeding stage 1 (steps before the window, leftover noise for stage 2) is not a mistake:
    no 'did nothing' there; the stage that reaches the window acts."""
    said = []
    g = Graph()
    mea = _mea(g, g.obj(small_sd15_model(), "MODEL"), small_vae, pair, start=0.7, end=1.0)
    stage1 = g.node("KSamplerAdvanced", model=mea[0], add_noise="enable", noise_seed=1, steps=10, cfg=5.0,
                    sampler_name="euler", scheduler="normal", positive=g.obj(cm.conditioning(1), "CONDITIONING"),
                    negative=g.obj(cm.conditioning(2), "CONDITIONING"),
                    latent_image=g.obj({"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)}, "LATENT"),
                    start_at_step=0, end_at_step=3, return_with_leftover_noise="enable")
    g.capture(stage1[0], "s1")
    import logging

    class Catch(logging.Handler):
        def emit(self, record):
            said.append(record.getMessage())

    handler = Catch()
    logging.getLogger().addHandler(handler)
    try:
        res = run_prompt(g)
    finally:
        logging.getLogger().removeHandler(handler)
    assert not [m for m in said if "did nothing" in m], said
    assert cm.mea_run(mea.id, res["s1"]["samples"]).stats["calls"] == 0
