"""Two Masked Extended Attention nodes in a row (a top from one photo, trousers from another), in real ComfyUI.

What a chain means (docs/method.md §3b, "Chains"): each node acts on the queries of its own target region and reads
its own garment; a reference pass never reads another node's garment. In fused guidance two chained regions must
not overlap (refused before the first step: one node would overwrite the other there); in paper guidance the MEA
terms add up. Before, a fused chain was non-deterministic and sometimes NaN (one node's replace left the other's
reference row of a ``torch.empty`` buffer unwritten), and a chain with a batch-2 mask failed inside the sampler.
"""

from __future__ import annotations

import pytest
import torch

import comfy_models as cm
from comfy_models import Graph, PromptFailed, run_prompt
from test_mea_nodes import SIZE, _mea, _sampler


@pytest.fixture(scope="module")
def pair():
    return cm.synthetic_pair(SIZE)


def _halves(pair, batch: int = 1):
    """Two non-overlapping target regions: the mask's top half and its bottom half."""
    tm = pair["target_mask"][:1].expand(batch, -1, -1).clone()
    top, bottom = tm.clone(), tm.clone()
    top[:, SIZE // 2 :] = 0
    bottom[:, : SIZE // 2] = 0
    return top, bottom


def _second_reference(pair):
    return torch.flip(pair["reference"], dims=[2])  # another garment photo (mirrored)


def _chain(g, model_link, vae, pair, guidance, top, bottom, **over):
    first = _mea(g, model_link, vae, pair, guidance=guidance, target_mask=top, **over)
    second = _mea(g, first[0], vae, pair, guidance=guidance, target_mask=bottom,
                  reference=_second_reference(pair), **over)
    return first, second


@pytest.mark.parametrize("guidance", ["fused", "paper"])
def test_chain_is_deterministic_finite_and_each_node_acts(comfy_env, small_sd15_model, small_vae, pair, guidance):
    model = small_sd15_model()
    top, bottom = _halves(pair)
    outs = []
    for _ in range(3):  # three prompts, nothing cached (a fresh executor each)
        g = Graph()
        m = g.obj(model, "MODEL")
        first, second = _chain(g, m, small_vae, pair, guidance, top, bottom)
        g.capture(_sampler(g, second[0])[0], "chain")
        g.capture(_sampler(g, first[0])[0], "first_only")
        g.capture(_sampler(g, _mea(g, m, small_vae, pair, guidance=guidance, target_mask=bottom,
                                   reference=_second_reference(pair))[0])[0], "second_only")
        g.capture(_sampler(g, m)[0], "stock")
        res = run_prompt(g)
        outs.append({k: res[k]["samples"] for k in ("chain", "first_only", "second_only", "stock")})
    for o in outs[1:]:
        assert torch.equal(o["chain"], outs[0]["chain"])
    o = outs[0]
    assert torch.isfinite(o["chain"]).all()
    for alone in ("first_only", "second_only", "stock"):
        assert not torch.equal(o["chain"], o[alone]), alone  # both nodes act
    # each node reads its own garment and never its reference pass through the other's
    stats = cm.mea_run(first.id, o["chain"]).stats
    assert stats["mea_calls"] > 0 and cm.mea_run(second.id, o["chain"]).stats["mea_calls"] > 0


def test_an_inactive_node_in_a_chain_changes_nothing(comfy_env, small_sd15_model, small_vae, pair):
    """Zero mask = no effect holds in a chain: the other node's result bit for bit, in either position."""
    model = small_sd15_model()
    top, _ = _halves(pair)
    empty = torch.zeros_like(top)
    g = Graph()
    m = g.obj(model, "MODEL")
    alone = _mea(g, m, small_vae, pair, target_mask=top)
    inactive_after = _mea(g, alone[0], small_vae, pair, target_mask=empty)
    inactive_first = _mea(g, m, small_vae, pair, target_mask=empty)
    active_after = _mea(g, inactive_first[0], small_vae, pair, target_mask=top)
    for name, node in (("alone", alone), ("inactive_after", inactive_after), ("active_after", active_after)):
        g.capture(_sampler(g, node[0])[0], name)
    res = run_prompt(g)
    assert torch.equal(res["inactive_after"]["samples"], res["alone"]["samples"])
    assert torch.equal(res["active_after"]["samples"], res["alone"]["samples"])


def test_fused_chain_with_overlapping_regions_is_refused_before_sampling(comfy_env, small_sd15_model, small_vae,
                                                                        pair):
    model = small_sd15_model().clone()
    import comfy.patcher_extension

    calls = []
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "count",
                               lambda executor, *a, **k: calls.append(1) or executor(*a, **k))
    g = Graph()
    first, second = _chain(g, g.obj(model, "MODEL"), small_vae, pair, "fused", pair["target_mask"],
                           pair["target_mask"])
    g.capture(_sampler(g, second[0])[0], "x")
    with pytest.raises(PromptFailed) as e:
        run_prompt(g)
    msg = e.value.message
    assert "target masks overlap" in msg and f"node #{first.id}" in msg and f"node #{second.id}" in msg
    assert "'paper'" in msg and calls == []  # refused before any model call
    # paper: the terms add up, overlap allowed
    g = Graph()
    first, second = _chain(g, g.obj(small_sd15_model(), "MODEL"), small_vae, pair, "paper", pair["target_mask"],
                           pair["target_mask"])
    g.capture(_sampler(g, second[0])[0], "x")
    assert torch.isfinite(run_prompt(g)["x"]["samples"]).all()


@pytest.mark.parametrize("guidance", ["fused", "paper"])
def test_chain_with_a_batch_of_two_and_one_mask_per_latent(comfy_env, small_sd15_model, small_vae, pair, guidance):
    model = small_sd15_model()
    top, bottom = _halves(pair, batch=2)
    top[1] = torch.flip(top[1], dims=[1])  # item 1: its own region
    g = Graph()
    first, second = _chain(g, g.obj(model, "MODEL"), small_vae, pair, guidance, top, bottom)
    g.capture(_sampler(g, second[0], batch=2)[0], "x")
    out = run_prompt(g)["x"]["samples"]
    assert out.shape == (2, 4, SIZE // 8, SIZE // 8) and torch.isfinite(out).all()
