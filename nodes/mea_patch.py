"""Masked Extended Attention as a ComfyUI model patch (docs/method.md §3b): the UNet adapter and what both
adapters share (the Flux one, :mod:`.mea_flux`, subclasses :class:`MeaPatch`).

The method lives in the core: settings and per-run state in ``attention/run.py``, which passes, rows, window
and guidance in ``attention/policy.py``, the reference pass's inputs in ``attention/reference.py``, the
attention itself in ``attention/masked_extended.py``. This module wires them into ComfyUI's hooks:

* **The patch is frozen settings.** :class:`MeaPatch` holds the node's :class:`~max4zero.attention.run.MeaSettings`,
  the layer choice, the trace settings and the node's name; nothing in it is written after construction
  (assignment raises), so every clone of a patched MODEL (ComfyUI clones freely, MultiGPU deep-clones one per
  device) may share it. Whatever sampling writes lives in a :class:`~max4zero.attention.run.MeaRun`, made by the
  OUTER_SAMPLE wrapper, carried in that run's ``transformer_options`` (as ``comfy_extras/nodes_easycache.py``
  does) and split into one worker state per thread and device: MultiGPU CFG Split's threads never share one.
* **APPLY_MODEL wrapper** (:meth:`MeaPatch.apply_model_wrapper`): it sees the exact noisy batch ``x`` at sigma
  ``t`` of every model call. When a call needs MEA (sigma inside the window and, in ``fused`` mode, the call
  holds positive rows; in ``paper`` mode, the call is this patch's extra MEA pass) it runs the reference pass
  (or reuses its K/V: same sigma, or within ``reference_every`` steps) and then the call with the attn1
  replaces in *use* mode (:mod:`.mea_replace`). When ComfyUI's chunk layout allows it and no other MEA patch
  takes part in the run, the UNet reference rides in the same call as one extra row (the paper's
  [target ; reference] batch, one UNet call instead of two). Every other call gets the untouched arguments, so
  the result is bit-identical to unpatched sampling there.
* **Chaining.** The replaces are installed at run time over whatever ``patches_replace["attn1"]`` holds in that
  call; an existing replace at the same key (or at ComfyUI's 2-tuple fallback key) is wrapped. Another MEA node
  in the chain: each node's reference pass is marked (:data:`REFERENCE_PASS_KEY`) and every other MEA patch
  leaves it untouched, so a reference never reads another node's garment; each node redoes only the queries of
  its own target region. In fused mode two chained regions must not overlap (refused before the first step:
  one node would overwrite the other there); in paper mode the MEA terms add up.
* **Guidance.** ``fused``: MEA inside the positive rows of the normal passes; ComfyUI's own CFG. ``paper``: the
  normal passes run without MEA; a post-CFG function runs one extra positive pass with it and adds
  ``s_mea·M⊙(x̂0_MEA − x̂0_base)`` (``attention/policy.py: paper_guidance``); differences of x̂0 are −σ times
  differences of ε, so the formula holds on ComfyUI's denoised predictions. Whether the negative pass is kept at
  cfg 1 for the base is the core's rule (``keeps_negative_pass_at_cfg1``): kept on a UNet, not on a distilled DiT.
* **Layer selection by token grid**: the replaces sit on every attn1 slot of the chosen UNet parts; each call
  compares the layer's grid with the latent's, so one choice fits SD1.5, SD2 and SDXL.

ComfyUI is imported lazily, inside the functions that run during sampling.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from ..attention.policy import (
    LayerSelection,
    guidance_base,
    keeps_negative_pass_at_cfg1,
    nearest_step,
    no_op_cause,
    paper_guidance,
    row_mask_index,
    rows_with_mea,
    token_mask,
)
from ..attention.reference import DROPPED_INPUTS, ReferenceRow, append_row, reference_row
from ..attention.run import MeaRun, MeaSettings, WorkerState
from ..tensors.masks import token_grids, unusable_mask_problem
from .convert import NodeInputError, mask_latent_problem
from .mea_calls import (
    MEA_PASS_KEY,
    REFERENCE_PASS_KEY,
    RUN_KEY_PREFIX,
    bind_apply_model_args,
    latent_output_key,
    pad_control,
)
from .mea_replace import Attn1Replace, CallRows

log = logging.getLogger(__name__)

__all__ = ["MEA_PASS_KEY", "REFERENCE_PASS_KEY", "RUN_KEY_PREFIX", "BACKGROUND_CHOICES", "MeaCall", "MeaPatch",
           "no_op_message"]

BACKGROUND_CHOICES = ("kept", "neutralised")

NODE = "MaX4Zero Masked Extended Attention"


@dataclass(frozen=True)
class MeaCall:
    """A model call that carries MEA: the ``apply_model`` arguments by name (``named``) and the extra model
    inputs (``extra``), this thread's :class:`~max4zero.attention.run.WorkerState`, which rows carry MEA
    (``rows``) and the call's ``cond_or_uncond``."""

    named: dict
    extra: dict
    state: WorkerState
    rows: CallRows
    cond_or_uncond: list


def no_op_message(cause: str, start: float, end: float, sigmas: Any, layer_input: str) -> tuple[str, str]:
    """(reason, fix) in ComfyUI's terms for a run that applied MEA nowhere (``attention/policy.py: no_op_cause``)."""
    if cause == "window":
        span = ""
        if isinstance(sigmas, torch.Tensor) and sigmas.numel() > 1:
            span = f"; the sampler ran from sigma {float(sigmas[0]):.3g} to {float(sigmas[-1]):.3g}"
        return (f"no step of this run lies in the MEA window (start={start}, end={end}){span}",
                "Set start/end so the window covers steps this sampler runs (for a KSampler (Advanced) that "
                "starts at step 35 of 50, start 0.7 covers it), or connect the patched model to the sampler "
                "that runs those steps")
    if cause == "layers":
        if layer_input == "flux_blocks":
            return ("none of the chosen Flux blocks was reached in this model's forward pass (another model layout, "
                    "or a ComfyUI version whose Flux attention calls the patch cannot hook)",
                    "Set 'flux_blocks' to another choice ('all' reaches every double and single block); if none "
                    "works, update ComfyUI and report the model and ComfyUI version")
        return ("none of the chosen self-attention layers was reached in this model's forward pass (another model "
                "layout, or a ComfyUI version whose attention calls the patch cannot hook)",
                f"Pick another '{layer_input}' choice; if none works, update ComfyUI and report the model and "
                "ComfyUI version")
    return ("the target mask or the garment mask has no pixel left at the token grids of the chosen layers "
            "(a thin or soft mask vanishes when it is shrunk to 1/8 or 1/16 of the image)",
            "Use a larger or harder (white = 1) mask, or work at a larger size (MaX4Zero Crop To Mask 'size')")


def _stops_before(sigmas: Any, guider: Any, start: float) -> bool:
    """Whether a run's schedule ends with noise left (a later sampler continues) before the window starts."""
    if not isinstance(sigmas, torch.Tensor) or sigmas.numel() < 2 or float(sigmas[-1]) <= 0:
        return False
    patcher = getattr(guider, "model_patcher", None)
    sampling = patcher.get_model_object("model_sampling") if patcher is not None else None
    if sampling is None:
        return False
    return float(sigmas[-1]) > float(sampling.percent_to_sigma(start)) * (1 + 1e-5)


class MeaPatch:
    """One MEA node's patch on a UNet: frozen settings plus ComfyUI's wrappers (see the module docstring).

    Args:
        settings: the node's :class:`~max4zero.attention.run.MeaSettings`.
        layers: :class:`~max4zero.attention.policy.LayerSelection` (UNet parts × grid levels).
        attn1_keys: the slots to wrap (:func:`~max4zero.nodes.mea_calls.attn1_slots` for ``layers.parts``).
        trace: the node's :class:`~max4zero.nodes.trace.MeaTrace` (what to record for the flow view), or None.
        node_id: the MEA node's id in the prompt (messages, the run registry), or None.
        warn: where the no-op report goes, ``fn(text)`` (the node shows it on itself too); default: the log.
    """

    #: the node input the no-op report names when no selected layer was reached (Flux: ``flux_blocks``)
    layer_input = "layers"
    #: whether the model is guidance- or timestep-distilled (sampled at cfg 1 without a negative): the cfg-1
    #: rule of paper guidance (``attention/policy.py: keeps_negative_pass_at_cfg1``)
    distilled = False
    #: whether the reference may ride in the target's call as one more row (UNet only)
    inline_reference = True

    def __init__(self, *, settings: MeaSettings, layers: LayerSelection, attn1_keys: Sequence[tuple],
                 trace: Any = None, node_id: Optional[str] = None,
                 warn: Optional[Callable[[str], None]] = None) -> None:
        self.settings = settings
        self.layers = layers
        self.attn1_keys = tuple(tuple(k) for k in attn1_keys)
        self.trace = trace
        self.node_id = None if node_id is None else str(node_id)
        self.warn = warn if warn is not None else (lambda text: log.warning("%s: %s", NODE, text))
        self.id = uuid.uuid4().hex
        self.ref_uuid = uuid.uuid4()
        #: transformer_options key of this patch's per-run state
        self.run_key = RUN_KEY_PREFIX + self.id
        self._frozen = True

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"{type(self).__name__} is frozen settings: '{name}' cannot be set after "
                                 "construction (per-run state belongs in MeaRun)")
        object.__setattr__(self, name, value)

    def __deepcopy__(self, memo: dict) -> "MeaPatch":
        # ModelPatcher.clone() (0.3.64) and MultiGPU's deep clones copy model_options, which hold our post-CFG
        # function: nothing here is ever written, so every copy may share this object.
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(node={self.node_id}, mode={self.settings.mode!r}, active={self.settings.active})"

    @property
    def label(self) -> str:
        """How messages name this node: with its id when known."""
        return NODE if self.node_id is None else f"{NODE} (node #{self.node_id})"

    # -- installation ------------------------------------------------------------------------

    def install(self, patcher: Any) -> Any:
        """Register the wrappers (and the post-CFG function in paper mode) on ``patcher`` (a clone)."""
        from comfy.patcher_extension import WrappersMP

        patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "max4zero_mea", self.outer_sample_wrapper)
        patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "max4zero_mea", self.apply_model_wrapper)
        if self.settings.mode == "paper" and self.settings.active:
            patcher.set_model_sampler_post_cfg_function(
                self.post_cfg_function, disable_cfg1_optimization=keeps_negative_pass_at_cfg1(self.distilled))
        return patcher

    def new_run(self) -> MeaRun:
        """A fresh per-run state (recording at the τs the trace asks for)."""
        taus = self.trace.recording_taus() if self.trace is not None else ()
        return MeaRun(self.settings, taus, owner=self.label)

    def run_of(self, transformer_options: dict) -> MeaRun:
        """The sampling run a model call belongs to; a call outside any run gets a state of its own (nothing is
        kept between such calls)."""
        run = transformer_options.get(self.run_key)
        return run if run is not None else MeaRun(self.settings)

    # -- the wrappers -------------------------------------------------------------------------

    def outer_sample_wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """Per sampling run: the checks before the first step, a fresh :class:`MeaRun` in the run's options, the
        run filed for the flow view under its result, the no-op report; the run's state goes when it ends."""
        noise = args[0] if args else kwargs.get("noise")
        guider = executor.class_obj
        options = getattr(guider, "model_options", None)
        to = options.setdefault("transformer_options", {}) if isinstance(options, dict) else None
        if self.settings.active and isinstance(noise, torch.Tensor) and noise.dim() in (4, 5):
            shape = tuple(noise.shape[:2]) + tuple(noise.shape[-2:])  # a one-frame video latent: its image grid
            self.check_latent(shape)
            if to is not None:
                self.check_chain(to, shape)
        run = self.new_run()
        if to is not None and self.settings.active:  # an inactive patch leaves the run's calls as they are
            to[self.run_key] = run
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        try:
            out = executor(*args, **kwargs)
            if self.trace is not None:
                self.trace.file_run(run, latent_output_key(out), sigmas)
            self._report_no_op(run, sigmas, guider)
            return out
        finally:
            if to is not None:
                to.pop(self.run_key, None)

    def check_latent(self, latent_shape: tuple) -> None:
        """Before the first step: the target mask must fit the latent being sampled (batch, aspect) and keep a
        token at the grids the chosen layers use. The sampler reports it; the message names this node."""
        tm = self.settings.target_mask
        problem = mask_latent_problem(tuple(tm.shape), latent_shape, "target_mask")
        problem = problem or unusable_mask_problem(
            tm, token_grids(latent_shape[-2:], sorted(self.layers.levels), ratio=1), "target_mask")
        if problem:
            raise NodeInputError(self.label, problem)

    def check_chain(self, to: dict, latent_shape: tuple) -> None:
        """Before the first step: another MEA node's patch in this run (a chain) must not act on the same
        target tokens in fused mode, where one node would overwrite the other (paper terms add up)."""
        hw = tuple(int(s) for s in latent_shape[-2:])
        for key, other in to.items():
            self.check_overlap(key, other, hw)

    def check_overlap(self, key: str, other: Any, hw: Optional[tuple]) -> None:
        """Refuse a chained fused node (the run ``other`` under ``key``) whose target region overlaps this one's, at
        the latent grid ``hw`` (None: at the masks' own resolution, before the latent is known)."""
        if not key.startswith(RUN_KEY_PREFIX) or key == self.run_key or not isinstance(other, MeaRun):
            return
        if not (self.settings.mode == "fused" and other.settings.mode == "fused"):
            return
        a, b = self.settings.target_mask, other.settings.target_mask
        if hw is None:
            hw = tuple(int(s) for s in a.shape[-2:])
        mine, theirs = token_mask(a, hw), token_mask(b, hw)
        if mine.shape[0] == theirs.shape[0] or 1 in (mine.shape[0], theirs.shape[0]):
            if bool((mine & theirs).any()):
                other_name = other.owner or "another Masked Extended Attention node"
                raise NodeInputError(
                    self.label, f"it is chained with {other_name} in fused guidance and their target masks overlap: "
                    "in the overlap one node's garment would silently replace the other's", "give the chained "
                    "nodes target masks that do not overlap (one region per garment), or set guidance to 'paper' "
                    "on both (their MEA terms add up)")

    def _report_no_op(self, run: MeaRun, sigmas: Any, guider: Any = None) -> None:
        """A run that applied MEA nowhere although the masks are not empty: say why, once, and the fix. A run that
        stops before the window with noise left for a later sampler (the try-on's stage 1 on the MEA model) is
        not a mistake: the later run acts, so nothing is said."""
        if not self.settings.active:
            return
        cause = no_op_cause(run.stats)
        if cause is None:
            return
        s = self.settings
        if cause == "window" and _stops_before(sigmas, guider, s.start):
            log.info("%s: this sampling run stops before the MEA window (a later sampler continues)", self.label)
            return
        reason, fix = no_op_message(cause, s.start, s.end, sigmas, self.layer_input)
        self.warn(f"did nothing in this sampling run: {reason}. {fix}")

    def post_cfg_function(self, args: dict) -> torch.Tensor:
        """Paper mode: one extra positive pass with MEA; add s_mea·M⊙(x̂0_MEA − x̂0_base)."""
        denoised = args["denoised"]
        cond = args.get("cond")
        if not self.settings.active or cond is None:
            return denoised
        model = args["model"]
        sigma = args["sigma"]
        x = args["input"]
        options = dict(args["model_options"])
        state = self.run_of(options.get("transformer_options", {})).worker(x.device)
        if not state.in_window(model.model_sampling, float(sigma.flatten()[0])):
            return denoised
        import comfy.samplers

        to = dict(options.get("transformer_options", {}))
        to[MEA_PASS_KEY] = self.id
        options["transformer_options"] = to
        (x0_mea,) = comfy.samplers.calc_cond_batch(model, [cond], x, sigma, options)
        base = guidance_base(args.get("uncond_denoised") if args.get("uncond") is not None else None,
                             args["cond_denoised"])
        return paper_guidance(denoised, base, x0_mea, state.latent_mask(x), self.settings.s_mea)

    def mea_call(self, executor: Any, args: Sequence[Any], kwargs: dict) -> Optional[MeaCall]:
        """The :class:`MeaCall` of a model call that carries MEA (rows chosen by the guidance mode, sigma inside the
        window, not another patch's reference pass), or None: the call passes through untouched."""
        if not self.settings.active:
            return None
        named, extra = bind_apply_model_args(args, kwargs)
        to = named["transformer_options"]
        if to.get(REFERENCE_PASS_KEY) is not None:
            return None  # a reference pass (another chained node's, or ours): its garment stays its own
        mea_pass = to.get(MEA_PASS_KEY) == self.id
        cou = list(to.get("cond_or_uncond") or [0])
        n = int(named["x"].shape[0])
        rows = rows_with_mea(self.settings.mode, cou, n, mea_pass)
        if not rows:
            return None
        sigma = float(named["t"].flatten()[0])
        state = self.run_of(to).worker(to.get("multigpu_thread_device", named["x"].device))
        if not state.in_window(executor.class_obj.model_sampling, sigma):
            return None
        state.count("calls")
        try:
            mask_index = row_mask_index(rows, n, len(cou), int(self.settings.target_mask.shape[0]))
        except ValueError as e:
            raise NodeInputError(self.label, str(e)) from None
        call = CallRows(rows=rows, mask_index=mask_index, n_rows=n, sigma=sigma,
                        step=nearest_step(to.get("sample_sigmas"), sigma))
        return MeaCall(named=named, extra=extra, state=state, rows=call, cond_or_uncond=cou)

    def apply_model_wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Reference pass + MEA for calls that need it; every other call passes through untouched."""
        call = self.mea_call(executor, args, kwargs)
        if call is None:
            return executor(*args, **kwargs)
        named, state = call.named, call.state
        store = state.stored(call.rows.sigma, call.rows.step)
        # Without usable K/V the reference runs (as an extra row of this call when the layout allows); with
        # them (same sigma, or reused within reference_every steps) this call has no reference row at all.
        if store is None and self.inline_reference and self.can_inline(call):
            return self._inline_call(executor, call)
        if store is None:
            store = self.reference_pass(executor, call)
        use_to = self.with_hooks(named["transformer_options"], state, "use", store, call.rows, named,
                                 executor.class_obj, call.extra)
        return executor(named["x"], named["t"], named["c_concat"], named["c_crossattn"], named["control"], use_to,
                        **call.extra)

    # -- the reference ------------------------------------------------------------------------

    def concat_parts(self, base_model: Any, c_concat: Any) -> Optional[tuple]:
        """The model's extra-channel parts in order, for the reference to reconstruct itself
        (``attention/reference.py: reconstruct_itself``); None without extra channels."""
        if c_concat is None:
            return None
        keys = tuple(getattr(base_model, "concat_keys", ()))
        if not keys:
            raise NodeInputError(self.label, "this model takes extra input channels that are not an inpainting "
                                 "mask/image, so the reference pass cannot be built", "use an SD1.5/SD2/SDXL "
                                 "checkpoint (plain or inpainting)")
        return keys

    def reference_inputs(self, executor: Any, call: MeaCall) -> ReferenceRow:
        """The reference pass's inputs for this call (``attention/reference.py``), on the call's device."""
        named = call.named
        x = named["x"]
        base_model = executor.class_obj
        s = self.settings
        try:
            return reference_row(
                t=named["t"], row=call.rows.rows[0], n_rows=call.rows.n_rows, c_crossattn=named["c_crossattn"],
                extra=call.extra, latent=s.ref_latent.to(device=x.device, dtype=x.dtype),
                noise=s.ref_noise.to(device=x.device, dtype=x.dtype), ref_context=s.ref_context,
                noise_scaling=base_model.model_sampling.noise_scaling,
                concat_parts=self.concat_parts(base_model, named["c_concat"]))
        except ValueError as e:
            raise NodeInputError(self.label, str(e)) from None

    def reference_options(self, to: dict) -> dict:
        """``transformer_options`` of the reference pass: one positive row of its own, marked as this patch's
        reference pass (every other MEA patch leaves it alone)."""
        ref_to = dict(to)
        ref_to.pop(MEA_PASS_KEY, None)
        ref_to[REFERENCE_PASS_KEY] = self.id
        ref_to["cond_or_uncond"] = [0]
        ref_to["uuids"] = [self.ref_uuid]
        return ref_to

    def reference_pass(self, executor: Any, call: MeaCall) -> dict:
        """A separate reference pass (batch 1, inputs from the call's first MEA row) recording the reference K/V
        of the chosen layers; kept in the worker state with the call's sigma and step."""
        ref = self.reference_inputs(executor, call)
        store: dict[Any, Any] = {}
        to = self.reference_options(call.named["transformer_options"])
        to["sigmas"] = ref.t
        ref_to = self.with_hooks(to, call.state, "record", store, None, call.named, executor.class_obj)
        executor(ref.x, ref.t, ref.c_concat, ref.c_crossattn, None, ref_to, **ref.extra)
        call.state.keep(store, call.rows.sigma, call.rows.step)
        return store

    def can_inline(self, call: MeaCall) -> bool:
        """Whether the reference can ride in the call as one extra row (the paper's [target ; ref] batch).

        One row more must keep ComfyUI's chunk layout (equal chunks per ``cond_or_uncond`` entry, which other
        packs' patches rely on): either every chunk is one row (the row becomes a new positive chunk) or there is
        a single chunk (it grows by one). Spatial size, text length and ControlNet residuals must be stackable,
        no input the reference must not take may be present, and no other MEA patch may take part in the run
        (its replaces would see a row they do not know); otherwise a separate reference pass runs.
        """
        named, cou, n = call.named, call.cond_or_uncond, call.rows.n_rows
        x, t, ctx = named["x"], named["t"], named["c_crossattn"]
        to = named["transformer_options"]
        if any(k.startswith(RUN_KEY_PREFIX) and k != self.run_key for k in to):
            return False
        per = n // max(1, len(cou))
        if not (per == 1 or len(cou) == 1):
            return False
        s = self.settings
        if tuple(s.ref_latent.shape[-2:]) != tuple(x.shape[-2:]) or not (t.dim() == 1 and t.shape[0] == n):
            return False
        if not isinstance(ctx, torch.Tensor) or ctx.shape[0] != n:
            return False
        if s.ref_context is not None and tuple(s.ref_context.shape[1:]) != tuple(ctx.shape[1:]):
            return False
        if any(call.extra.get(k) is not None for k in DROPPED_INPUTS):
            return False
        control = named["control"]
        return control is None or isinstance(control, dict)

    def _inline_call(self, executor: Any, call: MeaCall) -> torch.Tensor:
        """The call with the reference appended as row n; MEA reads K/V of that row in the same forward."""
        named, n, cou = call.named, call.rows.n_rows, call.cond_or_uncond
        ref = self.reference_inputs(executor, call)
        x, t = named["x"], named["t"]
        x2 = torch.cat([x, ref.x.to(x.dtype)])
        t2 = torch.cat([t, ref.t.to(t.dtype)])
        c_concat = named["c_concat"]
        concat2 = None if c_concat is None else torch.cat([c_concat, ref.c_concat.to(c_concat)])
        ctx = named["c_crossattn"]
        ctx2 = torch.cat([ctx, ref.c_crossattn.to(ctx)])
        extra2 = {k: append_row(v, ref.extra[k], n) for k, v in call.extra.items()}
        control2 = pad_control(named["control"], n)
        to = dict(named["transformer_options"])
        if len(cou) == 1:
            to["cond_or_uncond"] = list(cou)  # the single chunk grows by one row
        else:
            to["cond_or_uncond"] = list(cou) + [0]  # one-row chunks: the reference is one more positive chunk
            to["uuids"] = list(to.get("uuids") or []) + [self.ref_uuid]
        store: dict[Any, Any] = {}
        r = call.rows
        inline = CallRows(rows=r.rows, mask_index=r.mask_index, n_rows=n + 1, sigma=r.sigma, step=r.step, ref_row=n)
        use_to = self.with_hooks(to, call.state, "inline", store, inline, named, executor.class_obj)
        out = executor(x2, t2, concat2, ctx2, control2, use_to, **extra2)
        call.state.keep(store, r.sigma, r.step)  # later calls at this sigma (or within reference_every) reuse it
        return out[:n]

    def with_hooks(self, to: dict, state: WorkerState, mode: str, store: dict, rows: Optional[CallRows],
                   named: dict, base_model: Any = None, extra: Optional[dict] = None) -> dict:
        """A copy of ``to`` with this adapter's hooks for one call in ``mode`` (record / use / inline): here the
        attn1 replaces, wrapping the existing ones at our slots (``extra``, the call's other model inputs, is for
        adapters that place the reference by them). Nothing is mutated."""
        new_to = dict(to)
        replaces = dict(to.get("patches_replace", {}))
        attn1 = dict(replaces.get("attn1", {}))
        for key in self.attn1_keys:
            prev = attn1.get(key, attn1.get(key[:2]))
            attn1[key] = Attn1Replace(self, state, key, prev, mode, rows, store)
        replaces["attn1"] = attn1
        new_to["patches_replace"] = replaces
        return new_to
