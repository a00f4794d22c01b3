"""Flow-view run lookup (nodes/trace.py): runs filed by MEA node and result, found again, or explained with a fix
that works (a request for the next run, or naming both nodes)."""

from __future__ import annotations

import torch

from max4zero.attention.run import MeaRun, MeaSettings
from max4zero.nodes import trace as tr
from max4zero.nodes.trace import MeaTrace, RunRegistry, find_traced_run, samples_key


def _settings():
    return MeaSettings(mode="fused", s_mea=15.0, contrast=1.0, start=0.0, end=1.0, reference_every=1,
                       ref_latent=torch.zeros(1, 4, 2, 2), ref_noise=torch.zeros(1, 4, 2, 2), ref_context=None,
                       garment_mask=torch.ones(1, 4, 4, dtype=torch.bool), target_mask=torch.ones(1, 4, 4))


def _sampled(trace: MeaTrace, latent: torch.Tensor, n_records: int = 0, prompt: str = "p1", monkeypatch=None) -> str:
    """One sampling run of ``trace``'s node, as the patch runs it: a MeaRun at the trace's τs, filed at the end."""
    run = MeaRun(_settings(), trace.recording_taus())
    state = run.worker("cpu")
    for _ in range(n_records):
        for cap in state.captures_for(layer=("output", 6, 0), step=0, sigma=1.0, query_hw=(2, 2), ref_hw=(2, 2)):
            cap.add(torch.zeros(1, 4, 2), torch.ones(1, 4))
    key = samples_key(latent)
    if monkeypatch is not None:
        monkeypatch.setattr(tr, "current_prompt_id", lambda: prompt)
    trace.file_run(run, key, torch.tensor([2.0, 1.0, 0.0]))
    return key


def test_key_is_exact_and_shape_aware():
    a = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert samples_key(a) == samples_key(a.clone())
    assert samples_key(a) != samples_key(a.reshape(1, 1, 2, 8))
    b = a.clone()
    b[0, 0, 3, 3] = torch.nextafter(b[0, 0, 3, 3], torch.tensor(100.0))
    assert samples_key(a) != samples_key(b)
    assert samples_key(a.half()) == samples_key(a.half().float())  # keyed on values, whatever the dtype


def test_recorded_run_is_found_and_other_taus_are_requested():
    reg = RunRegistry()
    trace = MeaTrace(node_key="4", node_id="4", taus=[1.0], registry=reg)
    key = _sampled(trace, torch.ones(1, 4, 2, 2), n_records=2)
    run, problem, fix = find_traced_run(trace, key, 1.0)
    assert run is not None and len(run.records[1.0]) == 2 and problem == fix == ""
    assert run.stats["calls"] == 0 and set(run.stats) >= {"reference_passes", "mea_calls"}

    run, problem, fix = find_traced_run(trace, key, 2.0)
    assert run is None and "tau=1" in problem and "tau=2" in problem and "seed" in fix
    assert trace.recording_taus() == (1.0, 2.0)  # the next run of node 4 records both: following the fix works
    key2 = _sampled(trace, torch.ones(1, 4, 2, 2) * 2, n_records=1)
    assert find_traced_run(trace, key2, 2.0)[0] is not None
    assert reg.requested("4") == set()  # fulfilled


def test_unrecorded_run_asks_for_a_recording_and_says_why():
    reg = RunRegistry()
    quiet = MeaTrace(node_key="5", node_id="5", registry=reg)
    qkey = _sampled(quiet, torch.zeros(1, 4, 2, 2))
    run, problem, fix = find_traced_run(quiet, qkey, 1.0)
    assert run is None and "no attention was recorded" in problem and "Unload Models" in fix and "seed" in fix
    assert "cached" in problem
    assert quiet.recording_taus() == (1.0,)  # requested: a re-sample with this cached MEA output records


def test_samples_of_another_mea_node_are_refused_naming_it():
    reg = RunRegistry()
    a = MeaTrace(node_key="11", node_id="11", taus=[1.0], registry=reg)
    b = MeaTrace(node_key="12", node_id="12", taus=[1.0], registry=reg)
    key_b = _sampled(b, torch.ones(1, 4, 2, 2), n_records=1)
    run, problem, fix = find_traced_run(a, key_b, 1.0)
    assert run is None and "MEA node #12" in problem and "MEA node #11" in problem and "same MEA node" in fix
    assert reg.requested("11") == set()  # re-sampling node 11 would not help
    assert "seed" not in fix  # node 12 recorded at this tau: rewiring alone renders
    quiet_b = MeaTrace(node_key="13", node_id="13", registry=reg)
    key_q = _sampled(quiet_b, torch.full((1, 4, 2, 2), 3.0))
    run, problem, fix = find_traced_run(a, key_q, 1.0)
    assert "MEA node #13" in problem and "change that sampler's seed" in fix and reg.requested("13") == {1.0}


def test_identical_latents_of_two_nodes_are_never_mixed_up():
    reg = RunRegistry()
    a = MeaTrace(node_key="1", taus=[1.0], registry=reg)
    b = MeaTrace(node_key="2", taus=[1.0], registry=reg)
    same = torch.ones(1, 4, 2, 2)
    _sampled(a, same, n_records=1)
    key = _sampled(b, same, n_records=3)
    assert len(find_traced_run(a, key, 1.0)[0].records[1.0]) == 1
    assert len(find_traced_run(b, key, 1.0)[0].records[1.0]) == 3


def test_nothing_found_names_the_causes_and_requests():
    reg = RunRegistry()
    trace = MeaTrace(node_key="3", node_id="3", taus=[1.0], registry=reg)
    run, problem, fix = find_traced_run(trace, samples_key(torch.full((1, 4, 2, 2), 5.0)), 1.0)
    assert run is None and "no sampling run" in problem and "ran no step" in problem and "LATENT output" in fix
    assert reg.requested("3") == {1.0}


def test_registry_keeps_every_run_of_the_newest_prompt(monkeypatch):
    reg = RunRegistry(keep_older=2)
    trace = MeaTrace(node_key="9", taus=[1.0], registry=reg)
    old = [_sampled(trace, torch.full((1, 1, 1, 1), float(i)), prompt="old", monkeypatch=monkeypatch) for i in range(3)]
    assert len(reg) == 3  # all of the newest prompt, whatever keep_older says
    new = [_sampled(trace, torch.full((1, 1, 1, 1), 10.0 + i), prompt="new", monkeypatch=monkeypatch)
           for i in range(12)]
    assert all(reg.get(k, "9") is not None for k in new)  # more runs than keep_older in one prompt: none lost
    assert reg.get(old[0], "9") is None and reg.get(old[2], "9") is not None  # older prompts: the last 2
    assert len(reg) == 14
