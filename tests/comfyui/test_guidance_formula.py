"""The guidance formula, checked where it runs: ComfyUI's own sampler, one Euler step (docs/method.md §3b, Guidance).

What is checked
---------------
One Euler step from σ_max to 0 (``steps=1``, sampler ``euler``, scheduler ``normal``: sigmas
``[σ_max, 0]``) returns the guided denoised prediction x̂0 itself: ``x + (x − D)/σ·(0 − σ) = D``. ComfyUI's
CFG works on x̂0, and every branch shares x and σ, so the method's formula on ε holds on x̂0 as well (module
docstring of ``nodes/mea_patch.py``). With one seed, therefore, the stock ``KSamplerAdvanced`` output is

* paper: ``u + cfg·(c − u) + s_mea·M⊙(mea − u)``
* fused: ``u + cfg·(c_MEA − u)``

(all in the sampler's output space, ``process_latent_out`` of x̂0: an affine map, the weights of each
formula sum to 1, so it commutes). The oracle does not use the code under test's guidance function:

* ``u``, ``c``: the UNPATCHED model sampled the same way at cfg = 1 with the negative, resp. the
  positive, as its positive (at cfg = 1 ComfyUI runs the positive pass only, so that is the bare
  prediction). Pure ComfyUI, no pack code.
* ``mea``: the MEA positive prediction, obtained by replaying the positive model call that ComfyUI made
  (x, t, c_crossattn, c_concat, recorded by a pass-through APPLY_MODEL observer) through the paper
  patch's ``apply_model`` with the MEA-pass flag, as the patch's extra pass does — the attention part of
  the pack, but none of the guidance wiring (no post-CFG function, no ``cond_or_uncond`` row choice).
  For the fused check it is the same tensor (c_MEA: positive text with MEA on), so the fused cfg = 1 run
  (the sampler through the FUSED patch) is compared with a prediction made through the PAPER patch.
* ``M``: the target mask at latent size, nearest neighbour (``F.interpolate(mode="nearest")`` of the
  mask thresholded at 0.5), computed here; asserted to be neither empty nor full.

cfg = 1
-------
ComfyUI skips the negative pass at cfg = 1 (``sampling_function``: ``uncond_ = None`` unless
``model_options["disable_cfg1_optimization"]``). The paper patch sets that switch (paper mode, non-empty masks),
so ``u`` is computed and the formula is the method's (docs/method.md §3b) at cfg = 1 too: ``c + s_mea·M⊙(mea − u)`` (see
:data:`CFG1_BASE`). Fused at cfg = 1 is ``c_MEA``.

cond/uncond orders (all made by ComfyUI's sampler, verified from the recorded calls)
------------------------------------------------------------------------------------
``comfy.samplers._calc_cond_batch`` (0.3.64 and 0.33) lists the positive's entries, then the negative's,
takes the first entry and every entry that can be concatenated with it, and pops them in REVERSE order:

* ``uncond_first``: plain conditionings → one call, ``cond_or_uncond == [1, 0]``.
* ``cond_first``: the positive marked ``"default": True`` (what ComfyUI's hook nodes' "set default
  combine" produce): default entries are appended after the other entries by ``finalize_default_conds``,
  so the list is [negative, positive] and the call is ``[0, 1]``.
* ``split``: a negative of 78 tokens (``CONDCrossAttn.can_concat`` refuses lcm padding > 4×) → two calls,
  ``[0]`` then ``[1]`` (the same as ComfyUI splitting a batch under memory pressure).

Each wrong wiring must make the check fail (``test_wrong_wiring_is_caught``): MEA in the paper mode's
normal passes, the post-CFG base taken as ``cond_denoised``, the mask M ignored, and (order-sensitive)
MEA rows chosen by position instead of ``cond_or_uncond``. The mutants are monkeypatched onto the pack
AS COMFYUI LOADED IT (``comfy_models.pack_module``), before the MEA node installs the patch (the wrapper
and post-CFG function are bound methods taken at install time).
"""

from __future__ import annotations

import functools
import uuid

import pytest
import torch
import torch.nn.functional as F

import comfy_models as cm
from comfy_models import Graph, run_prompt

SIZE = 64  # 8x8 latent
S_MEA = 15.0
CFGS = (1.0, 5.0)
ORDERS = ("uncond_first", "cond_first", "split")
TOL = 1e-4  # relative to the magnitude of the expected x̂0 (float32, one UNet call per branch)
MEA = "MaX4ZeroMaskedExtendedAttention"

#: Base of the paper MEA term at cfg = 1: the negative prediction, as the method's formula says (the patch keeps the
#: negative pass at cfg = 1; see the module docstring).
CFG1_BASE = "u"


def _mp():
    return cm.pack_module("nodes.mea_patch")


# ------------------------------------------------------------------------------------------------
# sampling
# ------------------------------------------------------------------------------------------------


def _observer(records: list):
    """Pass-through APPLY_MODEL wrapper recording what ComfyUI's calc_cond_batch hands the model."""
    key = _mp().MEA_PASS_KEY

    def observe(executor, *args, **kwargs):
        x = args[0] if args else kwargs["x"]
        t = args[1] if len(args) > 1 else kwargs["t"]
        to = kwargs.get("transformer_options") or (args[5] if len(args) > 5 else {})
        cc = kwargs.get("c_concat", args[2] if len(args) > 2 else None)
        ca = kwargs.get("c_crossattn", args[3] if len(args) > 3 else None)
        records.append({
            "cou": list(to.get("cond_or_uncond") or []), "mea_pass": key in to, "rows": int(x.shape[0]),
            "x": x.detach().clone(), "t": t.detach().clone(),
            "c_concat": None if cc is None else cc.detach().clone(),
            "c_crossattn": None if ca is None else ca.detach().clone(),
        })
        return executor(*args, **kwargs)

    return observe


def _observed(base, records: list, disable_cfg1: bool = False):
    import comfy.patcher_extension as pe

    m = base.clone()
    m.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test_guidance_observer", _observer(records))
    if disable_cfg1:
        m.model_options["disable_cfg1_optimization"] = True
    return m


def _mea_node(g: Graph, model_link, pair, vae, mode: str):
    return g.node(
        MEA, model=model_link, vae=g.obj(vae, "VAE"), reference=g.obj(pair["reference"], "IMAGE"),
        garment_mask=g.obj(pair["garment_mask"], "MASK"), target_mask=g.obj(pair["target_mask"], "MASK"),
        positive=g.obj(cm.conditioning(3), "CONDITIONING"), guidance=mode, s_mea=S_MEA, contrast=1.25,
        start=0.0, end=1.0, layers="decoder 1/16 + 1/8 (paper)", reference_seed=0, background="kept",
    )


def _ksampler(g: Graph, model_link, positive, negative, latent, cfg: float):
    return g.node(
        "KSamplerAdvanced", model=model_link, add_noise="enable", noise_seed=11, steps=1, cfg=cfg,
        sampler_name="euler", scheduler="normal", positive=g.obj(positive, "CONDITIONING"),
        negative=g.obj(negative, "CONDITIONING"), latent_image=g.obj(latent, "LATENT"),
        start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable",
    )


@functools.lru_cache(maxsize=None)
def _inputs(kind: str, order: str):
    """(base model, positive, negative, latent, pair, vae) for a model kind and a cond/uncond order."""
    pair = cm.synthetic_pair(SIZE)
    vae = cm.small_vae()
    base = cm.small_sd15_model(inpaint=(kind == "inpaint"))
    pos = cm.conditioning(1)
    neg = cm.conditioning(2, tokens=78 if order == "split" else 77)
    latent = {"samples": torch.zeros(1, 4, SIZE // 8, SIZE // 8)}
    if kind == "inpaint":  # stock InpaintModelConditioning, no noise mask: the whole latent is denoised
        import nodes

        pos, neg, latent = nodes.InpaintModelConditioning().encode(
            pos, neg, pair["target"], vae, pair["target_mask"], noise_mask=False
        )
    if order == "cond_first":
        pos = [[t, {**d, "default": True}] for t, d in pos]
    return base, pos, neg, latent, pair, vae


def _sample(kind: str, order: str, runs: dict) -> dict:
    """Run ``runs`` ({name: (mode or "stock", cfg, which positive, disable_cfg1)}) in one prompt.

    Returns {name: {"out": sampled latent, "calls": recorded model calls, "patched": MEA-patched model}}.
    """
    base, pos, neg, latent, pair, vae = _inputs(kind, order)
    g = Graph()
    recs: dict[str, list] = {}
    for name, (mode, cfg, positive, disable_cfg1) in runs.items():
        recs[name] = []
        link = g.obj(_observed(base, recs[name], disable_cfg1), "MODEL")
        if mode != "stock":
            mea = _mea_node(g, link, pair, vae, mode)
            g.capture(mea[0], f"{name}/patched")
            link = mea[0]
        g.capture(_ksampler(g, link, pos if positive == "pos" else neg, neg, latent, cfg)[0], name)
    res = run_prompt(g)
    return {
        name: {"out": res[name]["samples"], "calls": recs[name], "patched": res.captured.get(f"{name}/patched")}
        for name in runs
    }


GUIDED_RUNS = {
    "c": ("stock", 1.0, "pos", False),
    "u": ("stock", 1.0, "neg", False),
    "stock5": ("stock", 5.0, "pos", False),
    "paper1": ("paper", 1.0, "pos", False),
    "paper1_full": ("paper", 1.0, "pos", True),  # disable_cfg1_optimization: the negative pass runs
    "paper5": ("paper", 5.0, "pos", False),
    "fused1": ("fused", 1.0, "pos", False),
    "fused5": ("fused", 5.0, "pos", False),
}


@functools.lru_cache(maxsize=None)
def _case(kind: str, order: str) -> dict:
    """Sampled outputs (unmutated pack) plus the oracle: u, c, mea, M."""
    out = _sample(kind, order, GUIDED_RUNS)
    c_call = out["c"]["calls"]
    assert len(c_call) == 1 and c_call[0]["cou"] == [0], c_call  # cfg 1, stock: one positive call
    call = c_call[0]
    patched = out["paper5"]["patched"]
    mea_x0 = _replay(patched, call, mea_pass=True)
    stock_x0 = _replay(_inputs(kind, order)[0], call, mea_pass=False)
    model = patched.model
    mask = (_inputs(kind, order)[4]["target_mask"] > 0.5).float()[:, None]
    M = F.interpolate(mask, size=call["x"].shape[-2:], mode="nearest")
    return {
        "runs": out,
        "u": out["u"]["out"],
        "c": out["c"]["out"],
        "mea": model.process_latent_out(mea_x0),
        "c_replayed": model.process_latent_out(stock_x0),
        "M": M,
        "x": call["x"],
        "sigma": float(call["t"].flatten()[0]),
    }


def _replay(patcher, call: dict, mea_pass: bool) -> torch.Tensor:
    """The recorded positive call through ``patcher``'s model; with the paper MEA-pass flag if asked."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher])
    to = {"cond_or_uncond": [0], "uuids": [uuid.uuid4()], "sigmas": call["t"]}
    if mea_pass:
        wrapper = patcher.wrappers["apply_model"]["max4zero_mea"][0]  # the paper patch's bound wrapper
        patch = wrapper.__self__
        assert patch.settings.mode == "paper"
        to["wrappers"] = {"apply_model": {"max4zero_mea": [wrapper]}}
        to[_mp().MEA_PASS_KEY] = patch.id
    with torch.no_grad():
        return patcher.model.apply_model(
            call["x"], call["t"], c_concat=call["c_concat"], c_crossattn=call["c_crossattn"], transformer_options=to
        )


# ------------------------------------------------------------------------------------------------
# the formula
# ------------------------------------------------------------------------------------------------


def _close(name: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    err = float((actual - expected).abs().max())
    tol = TOL * max(1.0, float(expected.abs().max()))
    assert err <= tol, f"{name}: max |sampled − formula| = {err:.4g} > tol {tol:.3g}"


def paper_expected(case: dict, cfg: float, full_cfg1: bool = False) -> torch.Tensor:
    u, c, mea, M = case["u"], case["c"], case["mea"], case["M"]
    cfg_term = u + cfg * (c - u)
    if cfg == 1.0 and not full_cfg1:
        base = {"c": c, "u": u}[CFG1_BASE]  # ComfyUI skipped the negative pass (see module docstring)
    else:
        base = u
    return cfg_term + S_MEA * M * (mea - base)


def fused_expected(case: dict, cfg: float) -> torch.Tensor:
    u, mea = case["u"], case["mea"]  # mea is c_MEA: the positive prediction with MEA on
    return u + cfg * (mea - u)


def guidance_checks(case: dict, runs: dict, modes=("paper", "fused")) -> dict:
    """{check label: None if the sampled run matches its formula, else the failure message}."""
    checks = {}
    for mode in modes:
        for cfg in CFGS:
            tag = f"{cfg:g}"
            if mode == "paper":
                checks[f"paper cfg={tag}"] = (runs[f"paper{tag}"]["out"], paper_expected(case, cfg))
                if cfg == 1.0 and "paper1_full" in runs:
                    checks["paper cfg=1 (disable_cfg1_optimization)"] = (
                        runs["paper1_full"]["out"], paper_expected(case, cfg, full_cfg1=True)
                    )
            else:
                checks[f"fused cfg={tag}"] = (runs[f"fused{tag}"]["out"], fused_expected(case, cfg))
    result = {}
    for label, (actual, expected) in checks.items():
        try:
            _close(label, actual, expected)
            result[label] = None
        except AssertionError as exc:
            result[label] = str(exc)
    return result


def check_guidance(case: dict, runs: dict, modes=("paper", "fused")) -> None:
    """Raise AssertionError unless every sampled run in ``runs`` matches its formula."""
    failed = [msg for msg in guidance_checks(case, runs, modes).values() if msg is not None]
    assert not failed, "; ".join(failed)


# ------------------------------------------------------------------------------------------------
# tests
# ------------------------------------------------------------------------------------------------

EXPECTED_CALLS = {  # cond_or_uncond of the normal passes at cfg 5, in call order
    "uncond_first": [[1, 0]],
    "cond_first": [[0, 1]],
    "split": [[0], [1]],
}


@pytest.mark.parametrize("order", ORDERS)
def test_one_euler_step_and_the_orders_the_sampler_makes(comfy_env, order):
    """Harness facts the formula check rests on (plain SD1.5 model)."""
    import comfy.samplers

    case = _case("plain", order)
    runs = case["runs"]
    base = _inputs("plain", order)[0]
    sigmas = comfy.samplers.calculate_sigmas(base.get_model_object("model_sampling"), "normal", 1)
    assert sigmas.shape == (2,) and float(sigmas[-1]) == 0.0
    assert abs(float(sigmas[0]) - float(base.get_model_object("model_sampling").sigma_max)) < 1e-3
    assert abs(case["sigma"] - float(sigmas[0])) < 1e-3
    # one step returns x̂0: the sampled c equals the replayed stock prediction
    _close("stock c vs replayed x̂0", case["c"], case["c_replayed"])
    # every run saw the same x at the same sigma (one seed)
    for name, run in runs.items():
        for call in run["calls"]:
            per = call["rows"] // max(1, len(call["cou"]))
            assert torch.equal(call["x"][:per], case["x"]), name
    # the orders
    for name in ("stock5", "paper5", "fused5"):
        normal = [c["cou"] for c in runs[name]["calls"] if not c["mea_pass"]]
        assert normal == EXPECTED_CALLS[order], (name, normal)
    for name in ("c", "u", "fused1"):  # cfg 1: the negative pass is skipped
        assert [c["cou"] for c in runs[name]["calls"] if not c["mea_pass"]] == [[0]], name
    for name in ("paper1", "paper1_full"):  # paper keeps the negative pass at cfg 1: its base is u
        assert [c["cou"] for c in runs[name]["calls"] if not c["mea_pass"]] == EXPECTED_CALLS[order], name
    for name in ("paper1", "paper1_full", "paper5"):  # exactly one extra MEA pass, positive only
        assert [c["cou"] for c in runs[name]["calls"] if c["mea_pass"]] == [[0]], name
    for name in ("stock5", "fused1", "fused5"):
        assert not any(c["mea_pass"] for c in runs[name]["calls"]), name


@pytest.mark.parametrize("kind", ("plain", "inpaint"))
@pytest.mark.parametrize("order", ORDERS)
def test_guidance_formula_through_the_sampler(comfy_env, kind, order):
    case = _case(kind, order)
    # the terms are not trivial, so each would be missed if dropped
    assert 0 < float(case["M"].mean()) < 1
    assert float((case["mea"] - case["c"]).abs().max()) > 1e-2
    assert float((case["c"] - case["u"]).abs().max()) > 1e-2
    for base in ("u", "c"):  # the MEA term is not zero outside M, so ignoring M shows
        assert float((case["mea"] - case[base]).mul(1 - case["M"]).abs().max()) > 1e-2, base
    check_guidance(case, case["runs"])
    # the patch keeps the negative pass at cfg 1 by itself: the same result as with ComfyUI's switch set by hand
    _close("paper cfg=1 vs the switch set by hand", case["runs"]["paper1"]["out"], case["runs"]["paper1_full"]["out"])


# -- the check can fail: wrong wirings --------------------------------------------------------------


def _mutant_mea_in_normal_passes(mp, monkeypatch):
    """1: paper mode also applies MEA in its normal passes (positive rows, as fused does)."""
    original = mp.rows_with_mea

    def rows(mode, cond_or_uncond, n_rows, mea_pass):
        if mode == "paper" and not mea_pass:
            return original("fused", cond_or_uncond, n_rows, False)
        return original(mode, cond_or_uncond, n_rows, mea_pass)

    monkeypatch.setattr(mp, "rows_with_mea", rows)


def _mutant_base_is_cond(mp, monkeypatch):
    """2: the post-CFG base is cond_denoised instead of uncond_denoised."""
    monkeypatch.setattr(mp, "guidance_base", lambda uncond, cond: cond)


def _mutant_mask_ignored(mp, monkeypatch):
    """3: M ignored (all ones)."""

    def latent_mask(self, x):
        return torch.ones(1, 1, *x.shape[-2:], dtype=x.dtype, device=x.device)

    monkeypatch.setattr(cm.pack_module("attention.run").WorkerState, "latent_mask", latent_mask)


def _mutant_rows_by_position(mp, monkeypatch):
    """4: MEA rows = the last chunk (assumes ComfyUI's usual [uncond, cond]) instead of cond_or_uncond."""
    original = mp.rows_with_mea

    def rows(mode, cond_or_uncond, n_rows, mea_pass):
        if mode == "paper":
            return original(mode, cond_or_uncond, n_rows, mea_pass)
        per = n_rows // max(1, len(cond_or_uncond or [0]))
        return list(range(n_rows - per, n_rows))

    monkeypatch.setattr(mp, "rows_with_mea", rows)


MUTANTS = {
    "mea_in_paper_normal_passes": (_mutant_mea_in_normal_passes, "paper"),
    "post_cfg_base_is_cond": (_mutant_base_is_cond, "paper"),
    "mask_ignored": (_mutant_mask_ignored, "paper"),
    "mea_rows_by_position": (_mutant_rows_by_position, "fused"),
}
#: checks a mutant cannot fail, and why: they must still pass (so the check is not failing for another reason)
MUTANT_INVISIBLE = {
    # cfg 1: a single positive chunk, its last chunk is the positive one
    ("mea_rows_by_position", "fused cfg=1"),
    # [uncond, cond]: the last chunk happens to be the positive one
    ("mea_rows_by_position", "fused cfg=5", "uncond_first"),
}


def _invisible(mutant: str, label: str, order: str) -> bool:
    return (mutant, label) in MUTANT_INVISIBLE or (mutant, label, order) in MUTANT_INVISIBLE


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("mutant", list(MUTANTS))
def test_wrong_wiring_is_caught(comfy_env, monkeypatch, mutant, order):
    """Each wrong wiring, monkeypatched into the pack as ComfyUI loaded it, fails the formula check."""
    case = _case("plain", order)  # oracle from the unmutated pack
    install, mode = MUTANTS[mutant]
    install(_mp(), monkeypatch)
    runs = _sample("plain", order, {k: v for k, v in GUIDED_RUNS.items() if v[0] == mode})
    results = guidance_checks(case, runs, modes=(mode,))
    for label, msg in results.items():
        print(f"[{mutant} / {order}] {msg or label + ': passes (cannot see this mutant)'}")
        if _invisible(mutant, label, order):
            assert msg is None, msg
        else:
            assert msg is not None, f"{mutant} survives '{label}' in order {order}"
    if all(_invisible(mutant, label, order) for label in results):
        check_guidance(case, runs, modes=(mode,))  # this order cannot see it (the reason the orders are tested)
    else:
        with pytest.raises(AssertionError):
            check_guidance(case, runs, modes=(mode,))
