"""ComfyUI nodes: Masked Extended Attention model patch and the Leffa flow view (V3 schema).

Thin faces over :mod:`.mea_patch` (the patch) and :mod:`.trace` (recording and flow views).

Recording switch: the MEA node declares the hidden inputs PROMPT and UNIQUE_ID. At run time it scans
the queued prompt for nodes that take its ``trace`` output (a link ``[its id, 1]``); only then does
it record attention (and it reads the connected flow view's τ, which must be known while sampling).
Unconnected, the trace is disabled and MEA runs its fast path: recording costs nothing.
"""

from __future__ import annotations

import functools
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Optional

import torch
from comfy_api.latest import io, ui

from ..attention.dit import DEFAULT_FLUX_BLOCKS, parse_flux_blocks
from ..attention.flow_view import (
    FLOW_MODES,
    disagreement,
    mls_flow,
    no_match_message,
    view_levels,
    render_flow_view,
    select_for_view,
)
from ..attention.policy import (
    DEFAULT_LAYERS,
    FLOW_LAYER_CHOICES,
    GUIDANCE_MODES,
    LAYER_CHOICES,
    LayerSelection,
    check_reference_every,
)
from ..attention.run import MeaSettings
from ..warping import mls as _mls
from . import convert as cv
from .features import check_unet
from .mea_calls import attn1_slots, trace_consumers
from .mea_inputs import ReferenceInputs, check_mea_masks, inputs_preview, positive_context, prepare_reference
from .notify import warn_on_node
from .mea_flux import (
    FluxMeaPatch,
    dit_family,
    flux_hook_problem,
    flux_layout_problem,
    flux_selection,
    is_flux,
    model_text,
)
from .mea_qwen import QwenMeaPatch, is_qwen_image, qwen_hook_problem
from .mea_patch import BACKGROUND_CHOICES, MeaPatch
from .sockets import CATEGORY, MATCHES, TRACE
from .trace import MeaTrace, find_traced_run, samples_key

__all__ = ["MaskedExtendedAttentionNode", "FlowViewNode", "NODE_CLASSES"]

log = logging.getLogger(__name__)

FLOW_ID = "MaX4ZeroFlowView"
TRACE_OUTPUT_INDEX = 1


class MaskedExtendedAttentionNode(io.ComfyNode):
    """Masked Extended Attention as a MODEL patch (docs/method.md §3b)."""

    NODE = "MaX4Zero Masked Extended Attention"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MaX4ZeroMaskedExtendedAttention",
            display_name=cls.NODE,
            category=CATEGORY,
            description=(
                "Patches the MODEL so the try-on region of the target reads the garment from a reference image "
                "(MaX4Zero's Masked Extended Attention, docs/method.md §3b): target self-attention in the chosen decoder "
                "layers attends over its own tokens plus the garment tokens of the reference, which is run "
                "through the same model at the current noise level each step (or every N-th step with "
                "'reference_every', an approximation). Use it for the last part of the "
                "schedule (paper: 0.7 → 1.0) with any sampler. The input MODEL is not modified. Connect 'trace' "
                "to a Leffa Flow View to see where each pixel reads from (recording is off otherwise)."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The SD1.5/SD2/SDXL UNet to patch (an inpainting model for try-on; "
                               "LoRAs and ControlNets applied to it keep working), a FLUX.1 model (Fill or dev), a "
                               "FLUX.2 model (dev or klein) or a Qwen-Image(-Edit) model; these DiTs need ComfyUI "
                               "0.33.0 or newer, see 'flux_blocks'."),
                io.Vae.Input("vae", tooltip="The VAE of that model; it encodes the reference image."),
                io.Image.Input("reference", tooltip="The garment photo (one image; any size, cropped to a multiple "
                               "of 8 like VAE Encode does)."),
                io.Mask.Input("garment_mask", tooltip="Garment pixels of the reference (white = garment), same size "
                              "as the reference. Eroded by 1 px (3x3) as in the paper. Empty = no effect."),
                io.Mask.Input("target_mask", tooltip="The try-on region of the image being generated (white = "
                              "repaint), same aspect as the latent; batch 1 or one per latent. Only queries inside "
                              "it read the garment. Empty = no effect."),
                io.Conditioning.Input("positive", tooltip="Text conditioning for the reference pass (e.g. the "
                                      "garment prompt); the first entry is used."),
                io.Combo.Input("guidance", options=list(GUIDANCE_MODES), default="paper",
                               tooltip="paper: three branches, eps = eps_u + cfg*(eps_c - eps_u) + s_mea*M*(eps_MEA - "
                               "eps_u), M = target mask. Inside the mask that is eps_u + (cfg+s_mea)*(eps_c - eps_u) + "
                               "s_mea*(eps_MEA - eps_c): 27x text and 15x garment at cfg 12, s_mea 15; outside it, "
                               "plain CFG. The normal passes run without MEA plus one extra positive pass with it "
                               "(about 2x per MEA step). fused: a DIFFERENT, cheaper guidance (about 1.5x): MEA inside "
                               "the normal positive pass, eps = eps_u + cfg*(eps_c,MEA - eps_u) everywhere, one weight "
                               "for text and garment alike. To weigh the garment about as paper does, use cfg about "
                               "15 with fused (paper's text weight, 27, would be too strong everywhere)."),
                io.Float.Input("s_mea", default=15.0, min=0.0, max=100.0, step=0.5,
                               tooltip="Weight of the MEA branch in paper guidance (paper: 15; 0 = off). Not used "
                               "in fused mode."),
                io.Float.Input("contrast", default=1.25, min=0.0, max=4.0, step=0.05,
                               tooltip="Attention contrast on the reference half (paper: 1.25; 1.0 = off and "
                               "fastest)."),
                io.Float.Input("start", default=0.7, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of the MEA window as a fraction of the schedule, measured in noise "
                               "level (sigma, ComfyUI's percent_to_sigma): 0.7 = t <= 300 of 1000. That is the paper's "
                               "last 15 of 50 steps with the ddim_uniform scheduler at 50 steps only; other schedulers "
                               "and step counts put a different number of steps inside the window."),
                io.Float.Input("end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="End of the MEA window as a fraction of the schedule (1.0 = to the end)."),
                io.Combo.Input("layers", options=list(LAYER_CHOICES), default=DEFAULT_LAYERS,
                               tooltip="Self-attention layers that get MEA, by token grid relative to the image "
                               "(works for SD1.5, SD2 and SDXL; SDXL has no attention at 1/8)."),
                io.Int.Input("reference_seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF,
                             tooltip="Seed of the fixed noise that re-noises the reference to each step's noise "
                             "level."),
                io.Combo.Input("background", options=list(BACKGROUND_CHOICES), default="kept",
                               tooltip="kept: encode the reference as it is (paper). neutralised: flat grey outside "
                               "the garment mask first, so what this node adds cannot depend on the reference "
                               "background. This node only: MaX4Zero Correspondence still reads the garment photo's "
                               "surroundings for its features."),
                io.String.Input("flux_blocks", default=DEFAULT_FLUX_BLOCKS, optional=True,
                                tooltip="Flux-family and Qwen-Image models only (the 'layers' input is for UNets): "
                                "the blocks that get MEA. 'vital' (default): on FLUX.1 Stable Flow's vital layers (double 0, 1, 17, "
                                "18; single 6, 9, 34, 35, 37), where that method injects a reference's attention; "
                                "on FLUX.2 the blocks at the same relative depths (first and last double blocks, "
                                "early and late single blocks); on Qwen-Image (joint blocks d0-d59 only) FLUX.1's "
                                "vital layers at the same relative depths of its one stack; untuned for try-on on "
                                "real weights. 'double', 'single', 'all', or a list such as 'd0-18, s6, s9' "
                                "(0-based). Needs ComfyUI 0.33.0 or newer."),
                io.Int.Input("reference_every", default=1, min=1, max=50, optional=True,
                             tooltip="How often the reference pass runs. 1 (default) = the paper: the garment "
                             "reference goes through the model at every MEA step. N: a reference pass at the first "
                             "MEA step, then every N-th sampler step; the steps between reuse its keys/values, so "
                             "they read garment features from an earlier, noisier step: an approximation of the "
                             "paper. It saves the reference pass, a second forward on Flux at cfg 1: a fused MEA "
                             "step costs about 2x a plain step at 1, 1.5x at 2, 1.35x at 3 (FLUX.1 with the vital "
                             "blocks, estimated; 2.2x, 1.7x, 1.5x measured on a tiny test model). Untuned on real "
                             "weights: compare the garment detail with 1."),
                io.Latent.Input("latent", optional=True,
                                tooltip="Optional: the LATENT the patched model will sample (in the try-on, "
                                "Double-Mask Inpaint's latent). Connected, this node checks target_mask against it "
                                "(batch and aspect) before any sampler runs, so a mask of another image fails "
                                "before stage 1 instead of after it. Not used otherwise."),
            ],
            outputs=[
                io.Model.Output("patched_model", display_name="model", tooltip="The patched model (a clone) for KSampler / "
                                "KSamplerAdvanced."),
                TRACE.Output("trace", display_name="trace", tooltip="Attention trace for the Leffa Flow View (records only "
                             "when connected)."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
            # an output node: ComfyUI runs output nodes, and the nodes that feed them, as soon as they can, so this
            # node's checks (its masks against the 'latent', the reference) come before a sampler that does not need
            # it (the try-on's stage 1); its preview shows what MEA will read and where
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, guidance=None, s_mea=None, contrast=None, start=None, end=None, layers=None,
                        reference_seed=None, background=None, reference_every=None):
        """Queue time: widget values, every number among them finite (a widget turned into a link arrives as None and
        is checked in execute)."""
        values = dict(guidance=guidance, s_mea=s_mea, contrast=contrast, start=start, end=end, layers=layers,
                      reference_seed=reference_seed, background=background, reference_every=reference_every)
        return cv.validation_result(lambda: cls._check_widgets(values))

    @classmethod
    def _check_widgets(cls, values: dict) -> None:
        # ComfyUI skips its own combo/min/max checks for inputs validate_inputs declares: check them here.
        cv.check_widgets(cls.NODE, cls.define_schema().inputs, values)
        start, end = values.get("start"), values.get("end")
        if start is not None and end is not None and (problem := cv.window_problem(start, end)):
            raise cv.NodeInputError(cls.NODE, problem)
        if values.get("reference_every") is not None:
            try:
                check_reference_every(values["reference_every"])
            except ValueError as e:
                raise cv.NodeInputError(cls.NODE, str(e), "set 'reference_every' to 1 (the paper) or a whole "
                                        "number of steps up to 50") from None

    @classmethod
    async def execute(
        cls, model, vae, reference, garment_mask, target_mask, positive, guidance, s_mea, contrast, start, end,
        layers, reference_seed, background, flux_blocks=DEFAULT_FLUX_BLOCKS, reference_every=1, latent=None,
    ) -> io.NodeOutput:
        # async on purpose: among nodes ready at the same time ComfyUI runs async ones first (both 0.3.64 and
        # 0.33), so this node's checks run before a sampler that became ready with it (the try-on's stage 1)
        reference_every = 1 if reference_every is None else reference_every  # optional: absent in older workflows
        cls._check_widgets(dict(guidance=guidance, layers=layers, background=background, start=start, end=end,
                                reference_every=reference_every))
        args = MeaArgs(model=model, vae=vae, reference=reference, garment_mask=garment_mask,
                       target_mask=target_mask, positive=positive, guidance=guidance, s_mea=float(s_mea),
                       contrast=float(contrast), start=float(start), end=float(end), layers=layers,
                       reference_seed=reference_seed, background=background,
                       flux_blocks=DEFAULT_FLUX_BLOCKS if flux_blocks is None else flux_blocks,
                       reference_every=reference_every)
        cls._check_latent_input(target_mask, latent)
        dm = getattr(getattr(model, "model", None), "diffusion_model", None)
        if is_qwen_image(dm):
            patch, ref = cls._qwen_patch(args)
        elif is_flux(dm):
            patch, ref = cls._flux_patch(args)
        else:
            patch, ref = cls._unet_patch(args)
        cls._check_chain(model, patch)
        patched = model.clone()
        patch.install(patched)
        preview = inputs_preview(reference, ref, patch.settings.target_mask)
        return io.NodeOutput(patched, patch.trace, ui=ui.PreviewImage(preview, cls=cls))

    @classmethod
    def _check_latent_input(cls, target_mask, latent) -> None:
        """The optional ``latent``: the target mask must fit it, checked now rather than when sampling starts."""
        if latent is None:
            return
        samples = latent.get("samples") if isinstance(latent, dict) else None
        if isinstance(samples, torch.Tensor) and samples.dim() == 5 and samples.shape[2] == 1:
            samples = samples[:, :, 0]  # a video VAE's one frame (Qwen-Image): its image grid
        if not isinstance(samples, torch.Tensor) or samples.dim() != 4:
            raise cv.NodeInputError(cls.NODE, "latent is not an image LATENT", "connect the LATENT the patched model "
                                    "will sample (Double-Mask Inpaint's latent), or leave 'latent' unconnected")
        tm = cv.mask_to_bhw(target_mask, cls.NODE, "target_mask")
        if problem := cv.mask_latent_problem(tuple(tm.shape), tuple(samples.shape), "target_mask"):
            raise cv.NodeInputError(cls.NODE, problem)

    @classmethod
    def _check_chain(cls, model, patch: MeaPatch) -> None:
        """Another MEA node's patch already on the input MODEL (a chain): the same check as when sampling starts
        (``MeaPatch.check_chain``), made now, before any sampler runs."""
        wrappers = getattr(model, "wrappers", None) or {}
        for fn in (wrappers.get("apply_model", {}) or {}).get("max4zero_mea", []):
            other = getattr(fn, "__self__", None)
            if isinstance(other, MeaPatch) and other.settings.active and patch.settings.active:
                patch.check_overlap(other.run_key, other.new_run(), None)

    @classmethod
    def _unet_patch(cls, args: "MeaArgs") -> tuple[MeaPatch, ReferenceInputs]:
        node = cls.NODE
        dm = check_unet(args.model, node)
        if problem := cv.conditioning_problem(args.positive, args.model, "positive"):
            raise cv.NodeInputError(node, problem)
        selection = LAYER_CHOICES[args.layers]
        keys = attn1_slots(dm, selection.parts)
        if not keys:
            raise cv.NodeInputError(node, f"the UNet has no self-attention in the parts chosen by layers={args.layers!r}",
                                    "pick another 'layers' choice")
        prepared = cls._prepare(args, selection)
        return MeaPatch(settings=prepared.settings, layers=selection, attn1_keys=keys, trace=prepared.trace,
                        node_id=prepared.node_id, warn=prepared.warn), prepared.ref

    @classmethod
    def _flux_patch(cls, args: "MeaArgs") -> tuple[FluxMeaPatch, ReferenceInputs]:
        """The Flux adapter (``nodes/mea_flux.py``, docs/method.md §3c): same inputs, same checks; the token grid,
        the reference text, the garment's RoPE index and the block choice from the model itself."""
        node = cls.NODE
        if problem := flux_hook_problem():
            raise cv.NodeInputError(node, problem, "update ComfyUI to 0.33.0 or newer (its Flux blocks call "
                                    "attention patches), or use an SD1.5/SD2/SDXL checkpoint")
        base = args.model.model
        if problem := flux_layout_problem(base):
            raise cv.NodeInputError(node, problem, "use a FLUX.1 (Fill, dev) or FLUX.2 (dev, klein) model, or an "
                                    "SD1.5/SD2/SDXL inpainting checkpoint")
        dm = base.diffusion_model
        family = dit_family(base)
        try:
            blocks = parse_flux_blocks(args.flux_blocks, len(dm.double_blocks), len(dm.single_blocks), family)
        except ValueError as e:
            raise cv.NodeInputError(node, str(e), "set 'flux_blocks' to vital, double, single, all or a list like "
                                    "'d0-18, s6'") from None
        params = getattr(dm, "params", None)
        prepared = cls._prepare(args, flux_selection(dm.patch_size), text=functools.partial(model_text, base))
        return FluxMeaPatch(blocks=blocks, patch_size=int(dm.patch_size),
                            ref_method=getattr(params, "default_ref_method", "offset"),
                            ref_index_scale=getattr(params, "ref_index_scale", 1.0), settings=prepared.settings,
                            trace=prepared.trace, node_id=prepared.node_id, warn=prepared.warn), prepared.ref

    @classmethod
    def _qwen_patch(cls, args: "MeaArgs") -> tuple[QwenMeaPatch, ReferenceInputs]:
        """The Qwen-Image adapter (``nodes/mea_qwen.py``, docs/method.md §3d): the Flux adapter's inputs and checks,
        every block a joint one (``flux_blocks`` 'd<i>'; 'single' selects nothing and is refused)."""
        node = cls.NODE
        if problem := qwen_hook_problem():
            raise cv.NodeInputError(node, problem, "update ComfyUI to 0.33.0 or newer (its Qwen-Image attention "
                                    "calls attention patches), or use an SD1.5/SD2/SDXL checkpoint")
        base = args.model.model
        dm = base.diffusion_model
        try:
            blocks = parse_flux_blocks(args.flux_blocks, len(dm.transformer_blocks), 0, "qwen_image")
        except ValueError as e:
            raise cv.NodeInputError(node, str(e), "Qwen-Image has joint (double) blocks only: set 'flux_blocks' to "
                                    "vital, double, all or a list like 'd0-59'") from None
        prepared = cls._prepare(args, flux_selection(dm.patch_size), text=functools.partial(model_text, base))
        return QwenMeaPatch(blocks=blocks, patch_size=int(dm.patch_size), ref_method=dm.default_ref_method,
                            ref_index_scale=1.0, settings=prepared.settings, trace=prepared.trace,
                            node_id=prepared.node_id, warn=prepared.warn), prepared.ref

    @classmethod
    def _prepare(cls, args: "MeaArgs", selection: LayerSelection, text: Any = None) -> "PreparedMea":
        """What both adapters need from the node's inputs, checked (docs/method.md §3b). ``text(ctx, latent)``: the
        reference text as the model takes it (a DiT's own ``extra_conds``); None: the prompt as given."""
        node = cls.NODE
        tm = cv.mask_to_bhw(args.target_mask, node, "target_mask")
        ctx = positive_context(args.positive, node)
        ref = prepare_reference(node, args.model, args.vae, args.reference, args.garment_mask, args.background,
                                args.reference_seed)
        if text is not None:
            ctx = text(ctx, ref.latent)
        uid = getattr(cls.hidden, "unique_id", None) if cls.hidden is not None else None
        node_id = None if uid is None else str(uid)
        check_mea_masks(node, args.garment_mask, ref, tm, selection, uid)
        settings = MeaSettings(
            mode=args.guidance, s_mea=args.s_mea, contrast=args.contrast, start=args.start, end=args.end,
            reference_every=args.reference_every, ref_latent=ref.latent, ref_noise=ref.noise, ref_context=ctx,
            garment_mask=ref.garment, target_mask=tm,
        )
        trace = _make_trace(cls.hidden, node_id, ref, args.reference, (args.start, args.end))
        return PreparedMea(settings=settings, trace=trace, node_id=node_id, ref=ref,
                           warn=functools.partial(warn_on_node, node, node_id=node_id))


@dataclass(frozen=True)
class MeaArgs:
    """The MEA node's inputs as ComfyUI passed them (widgets already checked)."""

    model: Any
    vae: Any
    reference: torch.Tensor
    garment_mask: torch.Tensor
    target_mask: torch.Tensor
    positive: Any
    guidance: str
    s_mea: float
    contrast: float
    start: float
    end: float
    layers: str
    reference_seed: int
    background: str
    flux_blocks: str
    reference_every: int


@dataclass(frozen=True)
class PreparedMea:
    """What both adapters build their patch from: settings, trace, the node's id, the prepared reference and
    where its warnings go."""

    settings: MeaSettings
    trace: MeaTrace
    node_id: Optional[str]
    ref: ReferenceInputs
    warn: Any


def _make_trace(hidden, node_id: Optional[str], ref: ReferenceInputs, reference: torch.Tensor,
                window: tuple) -> MeaTrace:
    """The node's trace: the τ of every Flow View the queued prompt connects to its trace output (none: recording
    off unless a view requests it later), and where the reference crop lies."""
    prompt = getattr(hidden, "prompt", None) if hidden is not None else None
    taus = []
    for class_type, inputs in trace_consumers(prompt, node_id, TRACE_OUTPUT_INDEX):
        if class_type == FLOW_ID:
            t = inputs.get("tau", 1.0)
            if isinstance(t, (int, float)) and not isinstance(t, bool) and t > 0 and t == t:
                taus.append(float(t))
            elif isinstance(t, list):  # tau from another node's output: known only when the view runs
                pass
    return MeaTrace(
        node_key=node_id if node_id is not None else f"anon-{uuid.uuid4().hex}", node_id=node_id, taus=taus,
        reference_size=ref.size, reference_key=samples_key(reference), reference_crop=ref.crop, window=window,
        vae_ratio=ref.vae_ratio,
    )


class FlowViewNode(io.ComfyNode):
    """Leffa's attention flow of an MEA sampling run, as pictures (docs/method.md §4)."""

    NODE = "MaX4Zero Leffa Flow View"

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=FLOW_ID,
            display_name=cls.NODE,
            category=CATEGORY,
            description=(
                "Shows where each generated pixel read the garment from (Leffa attention flow, docs/method.md §4), from "
                "the attention recorded by the Masked Extended Attention node during sampling: flow as a colour "
                "wheel, the reference warped by the attention, how much each pixel relies on the reference, how "
                "sharp that attention is, and the disagreement with the MLS warp of the registration stage."
            ),
            inputs=[
                TRACE.Input("trace", tooltip="The 'trace' output of MaX4Zero Masked Extended Attention."),
                io.Image.Input("reference", tooltip="The same reference image given to the MEA node."),
                io.Latent.Input("samples", tooltip="The LATENT sampled with the patched model: connecting it makes "
                                "this node run after sampling and sets the output size (8x the latent)."),
                io.Combo.Input("layers", options=list(FLOW_LAYER_CHOICES), default="all MEA layers",
                               tooltip="Which recorded layers to average, by token grid (UNet: 1/8, 1/16 or 1/32 "
                               "of the image; every block of a Flux model is at 1/16)."),
                io.Float.Input("step_start", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="First recorded MEA evaluation to use, as a fraction (0 = first, 1 = last)."),
                io.Float.Input("step_end", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Last recorded MEA evaluation to use, as a fraction."),
                io.Float.Input("tau", default=1.0, min=0.05, max=10.0, step=0.05,
                               tooltip="Leffa temperature. tau = 1: the reference half of the attention the model "
                               "actually used, after the MEA contrast step, renormalised. tau != 1: Leffa's formula "
                               "exactly, softmax(QK/sqrt(d)/tau) over the garment tokens, without the contrast step "
                               "(Leffa trains with 2). The two agree only when contrast = 1 and tau = 1. Read by the "
                               "MEA node when sampling starts."),
                io.Combo.Input("mode", options=list(FLOW_MODES), default="absolute",
                               tooltip="Colour the absolute reading position (absolute) or its offset from the "
                               "pixel's own position (displacement)."),
                MATCHES.Input("matches", optional=True, tooltip="Optional: the correspondence matches; the MLS "
                              "warp they define is compared with the attention flow (end-point error)."),
                io.Image.Input("mls_warped", optional=True, tooltip="Optional: the MLS-warped reference; without "
                               "matches, the disagreement is its colour difference from the attention-warped "
                               "reference."),
                io.Combo.Input("mls_kind", options=list(_mls.KINDS), default="affine", optional=True,
                               tooltip="MLS kind used by the MLS warp node (paper: affine)."),
                io.Float.Input("mls_alpha", default=0.1, min=0.01, max=4.0, step=0.01, optional=True,
                               tooltip="MLS alpha used by the MLS warp node (paper: 0.1)."),
                io.Float.Input("epe_scale_px", default=32.0, min=1.0, max=1024.0, step=1.0, optional=True,
                               tooltip="End-point error (reference pixels) shown as white in the disagreement mask."),
            ],
            outputs=[
                io.Image.Output("flow_image", display_name="flow", tooltip="Flow colour wheel (black: no MEA there)."),
                io.Image.Output("warped_reference", display_name="warped_reference", tooltip="The reference warped by the attention "
                                "flow."),
                io.Mask.Output("reliance", display_name="reliance", tooltip="Share of the attention on the reference (row mass, "
                               "0..1)."),
                io.Mask.Output("sharpness", display_name="sharpness", tooltip="exp(-entropy) of the reference attention: 1 = "
                               "reads one token, 1/n = spread over n tokens."),
                io.Mask.Output("disagreement", display_name="disagreement", tooltip="End-point error vs the MLS warp / epe_scale_px "
                               "(with matches), else colour difference vs mls_warped, else 0."),
            ],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, layers=None, step_start=None, step_end=None, tau=None, mode=None, mls_kind=None,
                        mls_alpha=None, epe_scale_px=None):
        """Queue time, before the MEA sampling this view waits for: widget values, every number finite, and a step
        range that holds a step (a widget turned into a link arrives as None and is not checked here)."""
        values = dict(layers=layers, step_start=step_start, step_end=step_end, tau=tau, mode=mode, mls_kind=mls_kind,
                      mls_alpha=mls_alpha, epe_scale_px=epe_scale_px)
        return cv.validation_result(lambda: cls._check_widgets(values))

    @classmethod
    def _check_widgets(cls, values: dict) -> None:
        # ComfyUI skips its own combo/min/max checks for inputs validate_inputs declares: check them here.
        values = {k: v for k, v in values.items() if v is not None}
        cv.check_widgets(cls.NODE, cls.define_schema().inputs, values)
        start, end = values.get("step_start"), values.get("step_end")
        if start is not None and end is not None and float(start) > float(end):
            raise cv.NodeInputError(cls.NODE, f"step_start={start} is after step_end={end}: the view would use no "
                                    "recorded MEA evaluation", "set step_start <= step_end (0 and 1: all of them)")

    @classmethod
    def execute(
        cls, trace, reference, samples, layers, step_start, step_end, tau, mode, matches=None, mls_warped=None,
        mls_kind="affine", mls_alpha=0.1, epe_scale_px=32.0,
    ) -> io.NodeOutput:
        node = cls.NODE
        cv.check_choice(node, "layers", layers, list(FLOW_LAYER_CHOICES))
        cv.check_choice(node, "mode", mode, FLOW_MODES)
        cv.check_choice(node, "mls_kind", mls_kind, _mls.KINDS)
        if not isinstance(trace, MeaTrace):
            raise cv.NodeInputError(node, f"trace is a {type(trace).__name__}", "connect the 'trace' output of "
                                    "MaX4Zero Masked Extended Attention")
        lat = samples.get("samples") if isinstance(samples, dict) else None
        # an image latent, or a video VAE's one frame [B, C, 1, h, w] (Qwen-Image)
        if not isinstance(lat, torch.Tensor) or not (lat.dim() == 4 or (lat.dim() == 5 and lat.shape[2] == 1)):
            raise cv.NodeInputError(node, "samples is not an image LATENT", "connect the sampler's LATENT output")
        ref = cv.image_to_bchw(reference, node, "reference")[:1, :3].float()
        if trace.reference_key is not None and samples_key(reference) != trace.reference_key:
            raise cv.NodeInputError(node, f"'reference' is not the image given to {trace.label}'s 'reference' input",
                                    "connect the same reference image to both nodes")
        run, problem, fix = find_traced_run(trace, samples_key(lat), float(tau))
        if run is None:
            raise cv.NodeInputError(node, problem, fix)
        records = list(run.records[min(run.records, key=lambda t: abs(t - float(tau)))])
        if not records:
            win = trace.window or (None, None)
            raise cv.NodeInputError(node, "nothing was recorded: no sampling step used MEA", f"check the MEA window "
                                    f"(start={win[0]}, end={win[1]}) against the sampler's steps, and the masks")
        latent_hw = (int(lat.shape[-2]), int(lat.shape[-1]))
        out_hw = (latent_hw[0] * trace.vae_ratio, latent_hw[1] * trace.vae_ratio)
        if trace.reference_crop is not None and tuple(ref.shape[-2:]) == tuple(trace.reference_size or ()):
            top, left, h, w = trace.reference_crop
            ref = ref[:, :, top : top + h, left : left + w]
        ref_hw = (int(ref.shape[-2]), int(ref.shape[-1]))

        flow_mls = None
        if matches is not None:
            if len(matches) == 0:
                raise cv.NodeInputError(node, "the matches hold no control point", "run MaX4Zero Correspondence "
                                        "with looser filters, or disconnect 'matches'")
            m = matches.rescaled(ref_hw, out_hw)
            flow_mls = mls_flow(m.target_points, m.reference_points, ref_hw, out_hw, mls_kind, float(mls_alpha))
        levels = view_levels(FLOW_LAYER_CHOICES[layers], trace.vae_ratio)
        if levels is not None and not select_for_view(records, latent_hw, levels):
            problem, fix = no_match_message(records, latent_hw, trace.vae_ratio)
            raise cv.NodeInputError(node, problem, f"Set 'layers' to {fix[len('pick '):]}")
        view = render_flow_view(
            records, ref, latent_hw, out_hw, levels=levels, step_start=float(step_start),
            step_end=float(step_end), mode=mode, mls_flow=flow_mls, vae_ratio=trace.vae_ratio,
        )
        warped_mls = None if mls_warped is None else cv.image_to_bchw(mls_warped, node, "mls_warped")
        dis = disagreement(view, float(epe_scale_px), warped_mls)
        gray = lambda m: m.float().clamp(0, 1)[..., None].expand(*m.shape, 3)  # noqa: E731
        preview = torch.cat([view.flow_rgb, view.warped, gray(view.reliance), gray(view.sharpness)], dim=2)
        return io.NodeOutput(
            view.flow_rgb, view.warped, view.reliance, view.sharpness, dis.contiguous(),
            ui=ui.PreviewImage(preview, cls=cls),
        )


NODE_CLASSES = [MaskedExtendedAttentionNode, FlowViewNode]
