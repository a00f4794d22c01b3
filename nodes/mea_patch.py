"""Masked Extended Attention as a ComfyUI model patch (docs/method.md §3b): reference pass, attn1 chaining, guidance.

How it hooks into ComfyUI (0.3.64 and 0.33.0):

* **APPLY_MODEL wrapper** (:meth:`MeaPatch.apply_model_wrapper`). It sees the exact noisy batch ``x`` at
  sigma ``t`` of every model call. When a call needs MEA (sigma inside the window and, in ``fused`` mode,
  the call holds positive rows; in ``paper`` mode, the call is the extra MEA pass) it

  1. evaluates the UNet on the *reference*: its latent noised to the CURRENT sigma with fixed seeded
     noise, the model's own conditioning layout (an inpainting model gets an all-zero mask channel and
     the reference itself as masked image, so it reconstructs itself), the node's positive text, no
     ControlNet residuals (those belong to the target image), and every other model input (``y`` …)
     of a positive row of the call. When ComfyUI's chunk layout allows it (one-row chunks, e.g. batch 1
     with CFG, or a single chunk, e.g. the paper mode's extra pass) the reference rides in the same
     call as one extra row — the paper's [target ; reference] batch — and the attn1 replaces read its
     K/V in the same forward (one UNet call instead of two: a one-row call costs ~0.6 of a two-row
     one). Otherwise a separate batch-1 reference pass runs first with the attn1 replaces in *record*
     mode. Either way the reference K/V are kept per sigma, so cond and uncond split into separate
     calls never compute them twice. With ``reference_every`` = N > 1 (opt-in, not the paper) they also
     serve the next N − 1 sampler steps, which then run no reference at all (``attention/policy.py:
     reuse_reference``).
  2. runs the real call with the attn1 replaces in *use* mode (:mod:`.mea_replace`).

  The attn1 replaces are put into a COPY of the call's ``transformer_options`` only for such calls.
  Every other call (outside the window, negative-only calls, an empty mask) gets the untouched
  arguments, so the result is bit-identical to unpatched sampling there.
* **Chaining.** The replaces are installed at run time over whatever ``patches_replace["attn1"]`` holds
  in that call (patches from packs applied before or after this node). An existing replace at the same
  key — or at the 2-tuple ``(block, number)`` key that ComfyUI falls back to, which our 3-tuple key
  would otherwise shadow — is wrapped: it computes the plain part (rows and queries without MEA, and the
  reference pass) and MEA replaces only the queries inside the try-on region. Nothing is overwritten:
  ``model_options`` of the input MODEL are never touched (the node patches a ``clone()``), other
  wrappers and post-CFG functions are kept (wrappers and post-CFG functions are lists).
* **Layer selection by token grid**: the replaces are installed on every attn1 slot of the chosen UNet
  parts; at each call the layer's grid is compared with the latent's (``activations_shape`` vs
  ``original_shape``), so "decoder at 1/16 and 1/8 of the image" means output blocks 6–11 on SD1.5/SD2
  and the 1/16 output blocks on SDXL (which has no attention at 1/8), without block numbers.
* **Guidance.**

  - ``fused``: MEA runs inside the positive rows of the normal pass (``cond_or_uncond`` value 0);
    ε = ε_u + s_txt·(ε_c,MEA − ε_u) is ComfyUI's own CFG. Cost: one reference row per step.
  - ``paper`` (three branches): ε = ε_u + s_txt·(ε_c − ε_u) + s_mea·M⊙(ε_MEA − ε_u). The normal cond and
    uncond passes run WITHOUT MEA; a post-CFG function runs one extra positive pass WITH MEA (flagged in
    ``transformer_options``) and adds the last term. ComfyUI's CFG works on denoised predictions
    x̂0 = x − σ·ε (EPS; v-prediction is affine in the model output too, with the same x-dependent offset
    for every branch). Every branch shares x and σ, so differences of x̂0 are −σ times differences of ε
    and the same linear formula holds for x̂0: x̂0 = x̂0_cfg + s_mea·M⊙(x̂0_MEA − x̂0_u). With cfg = 1
    ComfyUI would skip the negative pass; the patch sets ComfyUI's ``disable_cfg1_optimization`` (paper mode,
    non-empty masks only), so the negative pass runs and the base stays x̂0_u, as the formula says (one more
    pass per step at cfg 1; cfg 1 with a guidance-distilled model is where that matters).

* **Per-run state.** :class:`MeaPatch` holds the node's settings and is shared by every clone of the
  patched MODEL. Each sampling run gets its own :class:`MeaRun` (reference K/V per sigma, masks per grid,
  what MEA did), made by the OUTER_SAMPLE wrapper and carried in that run's ``transformer_options``, as
  ComfyUI's ``nodes_easycache.py`` does: two samplers (or two devices) using one patched MODEL never share
  a reference store.

Where things live: the method's policy (layers, rows, window, guidance, masks at token level) is in
``attention/policy.py``; ComfyUI call plumbing in :mod:`.mea_calls`; the attn1 replace in :mod:`.mea_replace`.
This module only wires them into ComfyUI's wrappers; it imports ComfyUI lazily, inside the functions that
run during sampling.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any, Callable, Optional, Sequence

import torch

from ..attention.policy import (
    GUIDANCE_MODES,
    LayerSelection,
    check_reference_every,
    guidance_base,
    in_window,
    nearest_step,
    no_op_reason,
    paper_guidance,
    reuse_reference,
    row_mask_index,
    rows_with_mea,
    token_mask,
)
from ..tensors.masks import token_grids, unusable_mask_problem
from .convert import NodeInputError, mask_latent_problem
from .mea_calls import (
    append_row,
    bind_apply_model_args,
    latent_output_key,
    pad_control,
    reference_concat,
    reference_context,
    slice_row,
)
from .mea_replace import Attn1Replace, CallRows

log = logging.getLogger(__name__)

__all__ = ["MEA_PASS_KEY", "BACKGROUND_CHOICES", "MeaRun", "MeaPatch"]

#: transformer_options key that marks the paper mode's extra MEA pass (value: the patch's id).
MEA_PASS_KEY = "max4zero_mea_pass"

BACKGROUND_CHOICES = ("kept", "neutralised")


class MeaRun:
    """What one sampling run of a patched model knows: the last recorded reference K/V with the sigma and
    schedule step it was recorded at, the masks at each token grid and device, the window in sigma, and what
    MEA did (for the no-op report)."""

    def __init__(self, patch: "MeaPatch") -> None:
        self.patch = patch
        self.store: dict[tuple, Any] = {}
        self.store_sigma: Optional[float] = None
        self.store_step: Optional[int] = None
        self.stats = {"calls": 0, "layers": 0, "effective": 0}
        self._masks: dict[tuple, torch.Tensor] = {}
        self._windows: dict[int, tuple[float, float]] = {}

    def stored(self, sigma: float, step: Optional[int] = None) -> Optional[dict]:
        """The recorded reference K/V a call at ``sigma`` (schedule index ``step``) may use, or None (run a new
        reference pass): those recorded at ``sigma``, or, with the patch's ``reference_every`` > 1, those
        recorded fewer than that many steps ago (``attention/policy.py: reuse_reference``)."""
        if not self.store:
            return None
        reuse = reuse_reference(self.store_step, self.store_sigma, step, sigma, self.patch.reference_every)
        return self.store if reuse else None

    def keep(self, store: dict, sigma: float, step: Optional[int] = None) -> None:
        """Remember the reference K/V just recorded at ``sigma`` (schedule index ``step``, None if unknown)."""
        self.store, self.store_sigma, self.store_step = store, sigma, step

    def in_window(self, model_sampling: Any, sigma: float) -> bool:
        key = id(model_sampling)
        if key not in self._windows:
            self._windows[key] = (
                float(model_sampling.percent_to_sigma(self.patch.start)),
                float(model_sampling.percent_to_sigma(self.patch.end)),
            )
        return in_window(sigma, *self._windows[key])

    def grid_mask(self, which: str, hw: tuple[int, int], device: Any) -> torch.Tensor:
        """Garment or target mask at a token grid, flattened: [B or 1, h·w] bool on ``device`` (cached)."""
        key = (which, hw, str(device))
        m = self._masks.get(key)
        if m is None:
            src = self.patch.garment_mask if which == "garment" else self.patch.target_mask
            m = self._masks[key] = token_mask(src, hw).to(device)
        return m

    def latent_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Target mask at latent size as float [B or 1, 1, h, w] on x's device (paper guidance M)."""
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        m = self.grid_mask("target", hw, x.device).view(-1, 1, *hw)
        if m.shape[0] not in (1, x.shape[0]):
            row_mask_index(range(x.shape[0]), x.shape[0], 1, m.shape[0])  # raises the clear error
        return m.to(x.dtype)

    def note_call(self) -> None:
        self.stats["calls"] += 1

    def note_layer(self, effective: bool) -> None:
        self.stats["layers"] += 1
        self.stats["effective"] += int(effective)


class MeaPatch:
    """One MEA node's patch: its settings and the ComfyUI wrappers; installed on a clone by :meth:`install`.

    Args:
        mode: ``"paper"`` or ``"fused"`` (see the module docstring).
        s_mea: weight of the MEA branch in paper mode (15 in the paper); unused in fused mode.
        contrast: attention contrast on the reference half (1.25 paper, 1.0 = off).
        start, end: schedule fractions (``percent_to_sigma``) of the MEA window, 0 ≤ start ≤ end ≤ 1.
        layers: :class:`~max4zero.attention.policy.LayerSelection`.
        attn1_keys: the slots to wrap (:func:`~max4zero.nodes.mea_calls.attn1_slots` for ``layers.parts``).
        ref_latent: [1, C, h, w] reference latent, already ``process_latent_in``-scaled.
        ref_noise: [1, C, h, w] fixed noise for re-noising it to each sigma.
        ref_context: [1, L, D] text conditioning of the reference pass, or None (use a positive row's).
        garment_mask: [1, H, W] bool garment pixels of the reference (after erosion), any resolution.
        target_mask: [B or 1, H, W] float try-on region of the target, any resolution of the same aspect.
        trace: a :class:`~max4zero.nodes.trace.MeaTrace` to record attention into, or None.
        reference_every: a reference pass at the first MEA step, then once at least this many sampler steps
            have passed since the last one; the steps between reuse its K/V (recorded at an earlier, noisier
            sigma). 1 (default) = the paper, every step. ``attention/policy.py: reuse_reference``.
    """

    def __init__(
        self,
        *,
        mode: str,
        s_mea: float,
        contrast: float,
        start: float,
        end: float,
        layers: LayerSelection,
        attn1_keys: Sequence[tuple],
        ref_latent: torch.Tensor,
        ref_noise: torch.Tensor,
        ref_context: Optional[torch.Tensor],
        garment_mask: torch.Tensor,
        target_mask: torch.Tensor,
        trace: Any = None,
        reference_every: int = 1,
    ) -> None:
        if mode not in GUIDANCE_MODES:
            raise ValueError(f"mode must be one of {GUIDANCE_MODES}, got {mode!r}")
        if not (0.0 <= start <= end <= 1.0):
            raise ValueError(f"need 0 ≤ start ≤ end ≤ 1, got start={start}, end={end}")
        self.mode = mode
        self.s_mea = float(s_mea)
        self.contrast = float(contrast)
        self.start = float(start)
        self.end = float(end)
        self.layers = layers
        self.attn1_keys = [tuple(k) for k in attn1_keys]
        self.ref_latent = ref_latent
        self.ref_noise = ref_noise
        self.ref_context = ref_context
        self.garment_mask = garment_mask.bool()
        self.target_mask = target_mask.float()
        self.trace = trace
        self.reference_every = check_reference_every(reference_every)
        self.id = uuid.uuid4().hex
        self.ref_uuid = uuid.uuid4()
        #: transformer_options key of this patch's per-run state
        self.run_key = f"max4zero_mea_run:{self.id}"
        self.active = bool(self.garment_mask.any()) and bool((self.target_mask > 0.5).any())
        if mode == "paper" and self.s_mea == 0.0:
            self.active = False
        #: run the reference as one extra row of the call that needs it when the batch layout allows
        #: (one UNet call instead of two; same result up to float rounding), else as a separate pass
        self.inline_reference = True
        self.reference_passes = 0  # counters for tests and the benchmark
        self.mea_calls = 0
        #: where the no-op report goes: ``fn(text)``; the node shows it on itself too (``nodes/notify.py``)
        self.warn: Callable[[str], None] = lambda text: log.warning("MaX4Zero Masked Extended Attention: %s", text)
        self._loose: Optional[MeaRun] = None  # state of model calls made outside a sampling run

    #: the node input the no-op report names when no selected layer was reached (Flux: ``flux_blocks``)
    layer_input = "layers"

    def __deepcopy__(self, memo: dict) -> "MeaPatch":
        # ModelPatcher.clone() (0.3.64) deep-copies model_options, which hold our post-CFG function: keep one
        # patch (settings, reference latent, trace). Per-run state is not here but in MeaRun.
        return self

    # -- installation ------------------------------------------------------------------------

    def install(self, patcher: Any) -> Any:
        """Register the wrappers (and the post-CFG function in paper mode) on ``patcher`` (a clone)."""
        from comfy.patcher_extension import WrappersMP

        patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "max4zero_mea", self.outer_sample_wrapper)
        patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "max4zero_mea", self.apply_model_wrapper)
        if self.mode == "paper" and self.active:
            # The third branch is based on eps_u (docs/method.md §3b): at cfg 1 ComfyUI would skip the negative
            # pass, so keep it.
            patcher.set_model_sampler_post_cfg_function(self.post_cfg_function, disable_cfg1_optimization=True)
        return patcher

    def run_of(self, transformer_options: dict) -> MeaRun:
        """The sampling run a model call belongs to (outside a run: one state kept until :meth:`reset`)."""
        run = transformer_options.get(self.run_key)
        if run is None:
            if self._loose is None:
                self._loose = MeaRun(self)
            run = self._loose
        return run

    def reset(self) -> None:
        """Forget the state of model calls made outside a sampling run."""
        self._loose = None

    # -- the wrappers -------------------------------------------------------------------------

    def outer_sample_wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """Per sampling run: a fresh :class:`MeaRun` in the run's options, the trace started and the run
        filed under its result, the no-op report; the run's state goes when the run ends."""
        noise = args[0] if args else kwargs.get("noise")
        if self.active and isinstance(noise, torch.Tensor) and noise.dim() == 4:
            self.check_latent(tuple(noise.shape))
        guider = executor.class_obj
        run = MeaRun(self)
        options = getattr(guider, "model_options", None)
        to = options.setdefault("transformer_options", {}) if isinstance(options, dict) else None
        if to is not None:
            to[self.run_key] = run
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        if self.trace is not None:
            self.trace.begin_run(sigmas)
        try:
            out = executor(*args, **kwargs)
            if self.trace is not None:
                self.trace.end_run(latent_output_key(out))
            self._report_no_op(run, sigmas)
            return out
        finally:
            if to is not None:
                to.pop(self.run_key, None)

    def check_latent(self, latent_shape: tuple) -> None:
        """Before the first step: the target mask must fit the latent being sampled (batch, aspect) and keep a
        token at the grids the chosen layers use. The sampler reports it; the message names this node."""
        problem = mask_latent_problem(tuple(self.target_mask.shape), latent_shape, "target_mask")
        problem = problem or unusable_mask_problem(
            self.target_mask, token_grids(latent_shape[-2:], sorted(self.layers.levels), ratio=1), "target_mask")
        if problem:
            raise NodeInputError("MaX4Zero Masked Extended Attention", problem)

    def _report_no_op(self, run: MeaRun, sigmas: Any) -> None:
        """A run that applied MEA nowhere although the masks are not empty: say why, once, and the fix."""
        if not self.active or run.stats["effective"]:
            return
        reason = no_op_reason(run.stats, self.start, self.end, sigmas, self.layer_input)
        self.warn(f"did nothing in this sampling run: {reason[0]}. {reason[1]}")

    def post_cfg_function(self, args: dict) -> torch.Tensor:
        """Paper mode: one extra positive pass with MEA; add s_mea·M⊙(x̂0_MEA − x̂0_u)."""
        denoised = args["denoised"]
        cond = args.get("cond")
        if not self.active or cond is None:
            return denoised
        model = args["model"]
        sigma = args["sigma"]
        options = dict(args["model_options"])
        run = self.run_of(options.get("transformer_options", {}))
        if not run.in_window(model.model_sampling, float(sigma.flatten()[0])):
            return denoised
        import comfy.samplers

        to = dict(options.get("transformer_options", {}))
        to[MEA_PASS_KEY] = self.id
        options["transformer_options"] = to
        x = args["input"]
        (x0_mea,) = comfy.samplers.calc_cond_batch(model, [cond], x, sigma, options)
        base = guidance_base(args.get("uncond_denoised") if args.get("uncond") is not None else None,
                             args["cond_denoised"])
        return paper_guidance(denoised, base, x0_mea, run.latent_mask(x), self.s_mea)

    def mea_call(self, executor: Any, args: Sequence[Any], kwargs: dict) -> Optional[tuple]:
        """``(named, extra, run, call, cou)`` of a model call that carries MEA (rows chosen by the guidance mode,
        sigma inside the window), or None: the call passes through untouched. Shared by every host adapter."""
        if not self.active:
            return None
        named, extra = bind_apply_model_args(args, kwargs)
        to = named["transformer_options"]
        mea_pass = to.get(MEA_PASS_KEY) == self.id
        cou = list(to.get("cond_or_uncond") or [0])
        n = int(named["x"].shape[0])
        rows = rows_with_mea(self.mode, cou, n, mea_pass)
        if not rows:
            return None
        sigma = float(named["t"].flatten()[0])
        run = self.run_of(to)
        if not run.in_window(executor.class_obj.model_sampling, sigma):
            return None
        run.note_call()
        call = CallRows(rows=rows, mask_index=row_mask_index(rows, n, len(cou), int(self.target_mask.shape[0])),
                        n_rows=n, sigma=sigma, step=nearest_step(to.get("sample_sigmas"), sigma))
        return named, extra, run, call, cou

    def apply_model_wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Reference pass + MEA for calls that need it; every other call passes through untouched."""
        found = self.mea_call(executor, args, kwargs)
        if found is None:
            return executor(*args, **kwargs)
        named, extra, run, call, cou = found
        base_model, n = executor.class_obj, call.n_rows
        store = run.stored(call.sigma, call.step)
        # Without usable K/V the reference runs (as an extra row of this call when the layout allows); with
        # them (same sigma, or reused within reference_every steps) this call has no reference row at all.
        if store is None and self.inline_reference and self.can_inline(named, cou, n):
            return self._inline_call(executor, base_model, run, named, extra, call, cou)
        if store is None:
            store = self._reference(executor, base_model, run, named, extra, call)
        use_to = self.with_replaces(named["transformer_options"],
                                    lambda key, prev: Attn1Replace(self, run, key, prev, "use", call, store))
        return executor(named["x"], named["t"], named["c_concat"], named["c_crossattn"], named["control"], use_to,
                        **extra)

    # -- the reference ------------------------------------------------------------------------

    def _reference_inputs(self, base_model: Any, named: dict, extra: dict, row: int, n: int) -> dict:
        """x, t, c_concat, c_crossattn and extra kwargs of the reference row (batch 1)."""
        x, t = named["x"], named["t"]
        lat = self.ref_latent.to(device=x.device, dtype=x.dtype)
        noise = self.ref_noise.to(device=x.device, dtype=x.dtype)
        t_ref = t[row : row + 1] if t.dim() > 0 and t.shape[0] == n else t.reshape(-1)[:1]
        x_ref = base_model.model_sampling.noise_scaling(t_ref.to(x.dtype), noise, lat)

        c_concat = named["c_concat"]
        concat_ref = None
        if c_concat is not None:
            keys = tuple(getattr(base_model, "concat_keys", ()))
            if not keys:
                raise ValueError(
                    "MaX4Zero Masked Extended Attention: this model takes extra input channels that are not "
                    "an inpainting mask/image, so the reference pass cannot be built; use an SD1.5/SD2/SDXL "
                    "checkpoint (plain or inpainting)"
                )
            concat_ref = reference_concat(keys, lat)
        ctx_ref = reference_context(self.ref_context, slice_row(named["c_crossattn"], n, row))
        return {
            "x": x_ref, "t": t_ref, "c_concat": concat_ref, "c_crossattn": ctx_ref,
            "extra": {k: slice_row(v, n, row) for k, v in extra.items()},
        }

    def _reference(self, executor: Any, base_model: Any, run: MeaRun, named: dict, extra: dict,
                   call: CallRows) -> dict:
        """Separate reference pass (batch 1, inputs from the call's first MEA row) recording K/V of the selected
        layers; kept in the run with the call's sigma and step."""
        ref = self._reference_inputs(base_model, named, extra, call.rows[0], call.n_rows)
        store: dict[tuple, Any] = {}
        to = dict(named["transformer_options"])
        to.pop(MEA_PASS_KEY, None)
        to["cond_or_uncond"] = [0]
        to["uuids"] = [self.ref_uuid]
        to["sigmas"] = ref["t"]
        ref_to = self.with_replaces(to, lambda key, prev: Attn1Replace(self, run, key, prev, "record", store=store))
        executor(ref["x"], ref["t"], ref["c_concat"], ref["c_crossattn"], None, ref_to, **ref["extra"])
        self.reference_passes += 1
        run.keep(store, call.sigma, call.step)
        return store

    def can_inline(self, named: dict, cou: list, n: int) -> bool:
        """Whether the reference can ride in the call as one extra row (the paper's [target ; ref] batch).

        One row more must keep ComfyUI's chunk layout (equal chunks per ``cond_or_uncond`` entry, which
        other packs' patches rely on): either every chunk is one row (the row becomes a new positive
        chunk) or there is a single chunk (it grows by one). Spatial size, text length and ControlNet
        residuals must be stackable; otherwise a separate reference pass runs.
        """
        x, t, ctx = named["x"], named["t"], named["c_crossattn"]
        per = n // max(1, len(cou))
        if not (per == 1 or len(cou) == 1):
            return False
        if tuple(self.ref_latent.shape[-2:]) != tuple(x.shape[-2:]) or not (t.dim() == 1 and t.shape[0] == n):
            return False
        if not isinstance(ctx, torch.Tensor) or ctx.shape[0] != n:
            return False
        if self.ref_context is not None and tuple(self.ref_context.shape[1:]) != tuple(ctx.shape[1:]):
            return False
        control = named["control"]
        return control is None or isinstance(control, dict)

    def _inline_call(self, executor: Any, base_model: Any, run: MeaRun, named: dict, extra: dict,
                     call: CallRows, cou: list) -> torch.Tensor:
        """The call with the reference appended as row n; MEA reads K/V of that row in the same forward."""
        n = call.n_rows
        ref = self._reference_inputs(base_model, named, extra, call.rows[0], n)
        x, t = named["x"], named["t"]
        x2 = torch.cat([x, ref["x"].to(x.dtype)])
        t2 = torch.cat([t, ref["t"].to(t.dtype)])
        c_concat = named["c_concat"]
        concat2 = None if c_concat is None else torch.cat([c_concat, ref["c_concat"].to(c_concat)])
        ctx = named["c_crossattn"]
        ctx2 = torch.cat([ctx, ref["c_crossattn"].to(ctx)])
        extra2 = {k: append_row(v, ref["extra"][k], n) for k, v in extra.items()}
        control2 = pad_control(named["control"], n)
        to = dict(named["transformer_options"])
        if len(cou) == 1:
            to["cond_or_uncond"] = list(cou)  # the single chunk grows by one row
        else:
            to["cond_or_uncond"] = list(cou) + [0]  # one-row chunks: the reference is one more positive chunk
            to["uuids"] = list(to.get("uuids") or []) + [self.ref_uuid]
        store: dict[tuple, Any] = {}
        inline = CallRows(rows=call.rows, mask_index=call.mask_index, n_rows=n + 1, sigma=call.sigma,
                          step=call.step, ref_row=n)
        use_to = self.with_replaces(to, lambda key, prev: Attn1Replace(self, run, key, prev, "inline", inline, store))
        out = executor(x2, t2, concat2, ctx2, control2, use_to, **extra2)
        self.reference_passes += 1
        run.keep(store, call.sigma, call.step)  # later calls at this sigma (or within reference_every) reuse it
        return out[:n]

    def with_replaces(self, to: dict, make: Callable[[tuple, Optional[Callable]], Callable]) -> dict:
        """A copy of ``to`` whose attn1 replaces wrap the existing ones at our slots (nothing mutated)."""
        new_to = dict(to)
        replaces = dict(to.get("patches_replace", {}))
        attn1 = dict(replaces.get("attn1", {}))
        for key in self.attn1_keys:
            prev = attn1.get(key, attn1.get(key[:2]))
            attn1[key] = make(key, prev)
        replaces["attn1"] = attn1
        new_to["patches_replace"] = replaces
        return new_to
