"""Flow-view run lookup (nodes/trace.py): runs filed by their result, found again, or explained."""

from __future__ import annotations

import torch

from max4zero.nodes.trace import RunRegistry, MeaTrace, find_traced_run, samples_key


def _sampled(trace: MeaTrace, registry: RunRegistry, latent: torch.Tensor, n_records: int = 0) -> str:
    trace.begin_run(torch.tensor([2.0, 1.0, 0.0]))
    if trace.capture is not None:
        for _ in range(n_records):
            trace.capture_for(layer=("output", 6, 0), step=0, sigma=1.0, query_hw=(2, 2), ref_hw=(2, 2))
            trace.capture.add(torch.zeros(1, 4, 2), torch.ones(1, 4))
    key = samples_key(latent)
    trace.end_run(key, registry)
    return key


def test_key_is_exact_and_shape_aware():
    a = torch.arange(16.0).reshape(1, 1, 4, 4)
    assert samples_key(a) == samples_key(a.clone())
    assert samples_key(a) != samples_key(a.reshape(1, 1, 2, 8))
    b = a.clone()
    b[0, 0, 3, 3] = torch.nextafter(b[0, 0, 3, 3], torch.tensor(100.0))
    assert samples_key(a) != samples_key(b)
    assert samples_key(a.half()) == samples_key(a.half().float())  # keyed on values, whatever the dtype


def test_recorded_run_is_found_and_others_are_explained():
    reg = RunRegistry()
    trace = MeaTrace(enabled=True, tau=1.0)
    key = _sampled(trace, reg, torch.ones(1, 4, 2, 2), n_records=2)
    run, problem, fix = find_traced_run(trace, key, 1.0, reg)
    assert run is not None and len(run.records) == 2 and problem == fix == ""

    run, problem, fix = find_traced_run(trace, key, 2.0, reg)
    assert run is None and "tau=1.0" in problem and "tau=2.0" in problem and "seed" in fix
    assert trace.tau == 2.0  # armed at the view's tau for the next run

    quiet = MeaTrace(enabled=False)
    qkey = _sampled(quiet, reg, torch.zeros(1, 4, 2, 2))
    run, problem, fix = find_traced_run(quiet, qkey, 1.0, reg)
    assert run is None and "no Flow View was connected" in problem and "Unload Models" in fix
    assert quiet.enabled and quiet.capture is not None  # armed: re-sampling records

    run, problem, _ = find_traced_run(MeaTrace(enabled=True), samples_key(torch.full((1, 4, 2, 2), 5.0)), 1.0, reg)
    assert run is None and "not made by a sampler" in problem


def test_a_run_is_never_mixed_up_with_another():
    reg = RunRegistry()
    trace = MeaTrace(enabled=True)
    k1 = _sampled(trace, reg, torch.ones(1, 4, 2, 2), n_records=1)
    k2 = _sampled(trace, reg, torch.ones(1, 4, 2, 2) * 2, n_records=3)  # the trace was cleared in between
    assert len(find_traced_run(trace, k1, 1.0, reg)[0].records) == 1
    assert len(find_traced_run(trace, k2, 1.0, reg)[0].records) == 3


def test_registry_is_bounded_and_least_recently_used_goes_first():
    reg = RunRegistry(capacity=2)
    trace = MeaTrace(enabled=True)
    keys = [_sampled(trace, reg, torch.full((1, 1, 1, 1), float(i))) for i in range(3)]
    assert len(reg) == 2 and reg.get(keys[0]) is None and reg.get(keys[2]) is not None
    reg.get(keys[1])  # touched: survives the next insertion
    _sampled(trace, reg, torch.full((1, 1, 1, 1), 9.0))
    assert reg.get(keys[1]) is not None and reg.get(keys[2]) is None
