"""A sampling run in which MEA changed nothing although its masks are not empty is reported, never silent."""

from __future__ import annotations

import logging

import pytest
import torch

import comfy_models as cm
from comfy_models import Graph, PromptFailed, run_prompt
from test_mea_nodes import MEA, SIZE, _mea, _sampler


@pytest.fixture(scope="module")
def pair():
    return cm.synthetic_pair(SIZE)


def _run(small_sd15_model, small_vae, pair, caplog, sampler_over=None, **mea_over):
    g = Graph()
    mea = _mea(g, g.obj(small_sd15_model(), "MODEL"), small_vae, pair, **mea_over)
    samp = _sampler(g, mea[0])
    for k, v in (sampler_over or {}).items():
        g.nodes[samp.id]["inputs"][k] = v
    g.capture(samp[0], "x")
    with caplog.at_level(logging.WARNING):
        run_prompt(g)
    return [r.getMessage() for r in caplog.records if "did nothing in this sampling run" in r.getMessage()]


def test_window_that_no_step_reaches_is_reported(comfy_env, small_sd15_model, small_vae, pair, caplog):
    msgs = _run(small_sd15_model, small_vae, pair, caplog, sampler_over={"end_at_step": 1}, start=0.8, end=1.0)
    assert len(msgs) == 1 and "MEA window (start=0.8, end=1.0)" in msgs[0] and "Set start/end" in msgs[0]


def test_target_mask_that_vanishes_at_the_token_grid_is_refused_before_sampling(comfy_env, small_sd15_model,
                                                                                small_vae, pair, caplog):
    line = torch.zeros(1, SIZE, SIZE)
    line[:, 33, 10:50] = 1.0  # a one-pixel line: nearest sampling at 1/8 and 1/16 misses it
    with pytest.raises(PromptFailed) as e:
        _run(small_sd15_model, small_vae, pair, caplog, target_mask=line)
    assert e.value.message.startswith("MaX4Zero Masked Extended Attention:")
    assert "vanishes at the attention token grids" in e.value.message and e.value.node_type == MEA


def test_a_run_that_used_mea_reports_nothing(comfy_env, small_sd15_model, small_vae, pair, caplog):
    assert _run(small_sd15_model, small_vae, pair, caplog) == []
