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
     calls never compute them twice.
  2. runs the real call with the attn1 replaces in *use* mode.

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

Pure helpers (no ComfyUI import; tested in ``tests/test_mea_pure.py``) come first; :class:`MeaPatch`
imports ComfyUI modules lazily, inside the functions that run during sampling.
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

from ..attention.masked_extended import masked_extended_attention
from ..warping import masks as _masks

log = logging.getLogger(__name__)

__all__ = [
    "LayerSelection",
    "LAYER_CHOICES",
    "DEFAULT_LAYERS",
    "GUIDANCE_MODES",
    "BACKGROUND_CHOICES",
    "MEA_PASS_KEY",
    "grid_level",
    "attn1_slots",
    "is_unet",
    "in_window",
    "mea_rows",
    "row_mask_index",
    "paper_guidance",
    "bind_apply_model_args",
    "slice_row",
    "reference_concat",
    "neutralise_background",
    "center_crop_multiple",
    "trace_consumers",
    "nearest_step",
    "latent_output_key",
    "no_op_reason",
    "MeaPatch",
]

#: transformer_options key that marks the paper mode's extra MEA pass (value: the patch's id).
MEA_PASS_KEY = "max4zero_mea_pass"

GUIDANCE_MODES = ("paper", "fused")
BACKGROUND_CHOICES = ("kept", "neutralised")


# --------------------------------------------------------------------------------------------
# layer selection


@dataclass(frozen=True)
class LayerSelection:
    """Which self-attention layers get MEA: UNet parts × token-grid levels.

    ``levels`` count halvings of the latent grid: 0 = the latent grid itself (1/8 of the image for an
    8× VAE), 1 = latent/2 (1/16 of the image), 2 = latent/4 (1/32), …
    """

    parts: frozenset
    levels: frozenset

    def selects(self, part: str, level: int) -> bool:
        return part in self.parts and level in self.levels


#: Choices offered by the node (label → selection). The first is the paper's (docs/method.md §3b).
LAYER_CHOICES: dict[str, LayerSelection] = {
    "decoder 1/16 + 1/8 (paper)": LayerSelection(frozenset({"output"}), frozenset({0, 1})),
    "decoder 1/8": LayerSelection(frozenset({"output"}), frozenset({0})),
    "decoder 1/16": LayerSelection(frozenset({"output"}), frozenset({1})),
    "decoder 1/32 + 1/16 + 1/8": LayerSelection(frozenset({"output"}), frozenset({0, 1, 2})),
    "encoder + decoder 1/16 + 1/8": LayerSelection(frozenset({"input", "output"}), frozenset({0, 1})),
}
DEFAULT_LAYERS = "decoder 1/16 + 1/8 (paper)"


def grid_level(latent_hw: Sequence[int], layer_hw: Sequence[int]) -> int:
    """How many times the UNet halved the latent grid to reach this layer's token grid.

    A stride-2 convolution with padding 1 maps n → ⌈n/2⌉, so odd sizes are matched exactly; a grid
    that matches no level (an unusual architecture) gets the nearest level by area ratio.

    >>> grid_level((64, 64), (32, 32)), grid_level((13, 20), (7, 10)), grid_level((64, 64), (64, 64))
    (1, 1, 0)
    """
    lh, lw = int(latent_hw[-2]), int(latent_hw[-1])
    gh, gw = int(layer_hw[-2]), int(layer_hw[-1])
    if lh < 1 or lw < 1 or gh < 1 or gw < 1:
        raise ValueError(f"grid sizes must be positive, got latent {lh}x{lw} and layer {gh}x{gw}")
    h, w = lh, lw
    for level in range(16):
        if (h, w) == (gh, gw):
            return level
        if h == 1 and w == 1:
            break
        h, w = -(-h // 2), -(-w // 2)
    return max(0, int(round(0.5 * math.log2((lh * lw) / (gh * gw)))))


def attn1_slots(diffusion_model: Any, parts: Iterable[str]) -> list[tuple[str, int, int]]:
    """The ``(block_name, block_number, block_index)`` keys of every self-attention in ``parts``.

    Walks ``input_blocks`` / ``middle_block`` / ``output_blocks`` of a ComfyUI ``UNetModel`` and looks
    for ``SpatialTransformer``-like children (anything with ``transformer_blocks``); ``block_index`` is
    the depth inside it (SDXL has up to 10), which is what ComfyUI matches the third key element with.
    """
    parts = set(parts)
    groups = []
    if "input" in parts:
        groups.append(("input", list(getattr(diffusion_model, "input_blocks", []))))
    if "middle" in parts:
        mb = getattr(diffusion_model, "middle_block", None)
        groups.append(("middle", [mb] if mb is not None else []))
    if "output" in parts:
        groups.append(("output", list(getattr(diffusion_model, "output_blocks", []))))
    keys = []
    for name, blocks in groups:
        for i, block in enumerate(blocks):
            children = list(block.children()) if hasattr(block, "children") else []
            for m in [block] + children:
                tb = getattr(m, "transformer_blocks", None)
                if tb is not None:
                    keys.extend((name, i, j) for j in range(len(tb)))
                    break
    return keys


def is_unet(diffusion_model: Any) -> bool:
    """Whether the diffusion model has the SD-family UNet layout MEA patches (input/output blocks)."""
    return hasattr(diffusion_model, "input_blocks") and hasattr(diffusion_model, "output_blocks")


# --------------------------------------------------------------------------------------------
# sampling bookkeeping


def in_window(sigma: float, sigma_start: float, sigma_end: float) -> bool:
    """Whether ``sigma`` lies in the schedule window [start → end] (sigmas decrease while sampling).

    ``sigma_start``/``sigma_end`` come from ``model_sampling.percent_to_sigma(start/end)``; a relative
    tolerance absorbs float32 vs float64 rounding of the same schedule value.
    """
    tol = 1e-5 * max(1.0, abs(sigma))
    return (sigma_end - tol) <= sigma <= (sigma_start + tol)


def mea_rows(cond_or_uncond: Sequence[int], n_rows: int, all_rows: bool = False) -> list[int]:
    """Batch rows that get MEA: the positive rows (``cond_or_uncond`` value 0), or all rows.

    ComfyUI concatenates one chunk of ``n_rows // len(cond_or_uncond)`` rows per entry of
    ``cond_or_uncond`` (0 = positive, 1 = negative), in that order — which is not fixed (negative first
    happens; cfg = 1 drops the negative; memory pressure splits the chunks into separate calls).
    """
    chunks = list(cond_or_uncond) if cond_or_uncond else [0]
    if n_rows % len(chunks):
        raise ValueError(
            f"batch of {n_rows} rows does not split into {len(chunks)} chunks (cond_or_uncond={chunks}); "
            "this call was not made by ComfyUI's calc_cond_batch"
        )
    if all_rows:
        return list(range(n_rows))
    per = n_rows // len(chunks)
    return [c * per + r for c, v in enumerate(chunks) if v == 0 for r in range(per)]


def row_mask_index(rows: Sequence[int], n_rows: int, n_chunks: int, mask_batch: int) -> list[int]:
    """For each batch row, which item of a ``mask_batch``-item target mask applies to it.

    Row r is item ``r % per`` of its chunk (``per = n_rows // n_chunks``). A mask batch of 1 is shared;
    otherwise it must equal ``per``.
    """
    per = n_rows // max(1, n_chunks)
    if mask_batch == 1:
        return [0] * len(rows)
    if mask_batch != per:
        raise ValueError(
            f"MaX4Zero Masked Extended Attention: the target mask has {mask_batch} items but the latent batch "
            f"has {per}: give the target mask batch 1 (shared) or one mask per latent"
        )
    return [r % per for r in rows]


def paper_guidance(
    cfg_result: torch.Tensor, base: torch.Tensor, mea: torch.Tensor, mask: torch.Tensor, s_mea: float
) -> torch.Tensor:
    """The paper's third branch: ``cfg_result + s_mea·M⊙(mea − base)``.

    Works unchanged on ε or on x̂0 predictions (see the module docstring). ``mask`` [B or 1, 1, h, w]
    broadcasts over channels (and batch).
    """
    return cfg_result + (float(s_mea) * mask.to(cfg_result.dtype)) * (mea - base)


_APPLY_ARGS = ("x", "t", "c_concat", "c_crossattn", "control", "transformer_options")


def bind_apply_model_args(args: Sequence[Any], kwargs: dict) -> tuple[dict, dict]:
    """Split an ``apply_model`` call into its six named arguments and the extra model kwargs.

    ``BaseModel.apply_model(x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={},
    **kwargs)``; wrappers may forward any of the six positionally or by name.
    """
    if len(args) > len(_APPLY_ARGS):
        raise TypeError(f"apply_model takes at most {len(_APPLY_ARGS)} positional arguments, got {len(args)}")
    named = dict(zip(_APPLY_ARGS, args))
    extra = dict(kwargs)
    for name in _APPLY_ARGS[len(args):]:
        named[name] = extra.pop(name, None if name != "transformer_options" else {})
    if named["transformer_options"] is None:
        named["transformer_options"] = {}
    return named, extra


def slice_row(value: Any, n_rows: int, row: int) -> Any:
    """Row ``row`` (kept as a batch of 1) of a per-row model input; anything else unchanged."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n_rows:
        return value[row : row + 1]
    if isinstance(value, list):
        return [slice_row(v, n_rows, row) for v in value]
    return value


def reference_concat(concat_keys: Sequence[str], ref_latent: torch.Tensor) -> torch.Tensor:
    """``c_concat`` for the reference pass in the model's own layout (``BaseModel.concat_keys``).

    The reference reconstructs itself: inpaint mask all zero ("keep everything"), masked image = the
    reference latent (already ``process_latent_in``-scaled, as ComfyUI passes it).
    """
    parts = []
    b, _, h, w = ref_latent.shape
    for key in concat_keys:
        if key == "mask":
            parts.append(ref_latent.new_zeros(b, 1, h, w))
        elif key == "mask_inverted":
            parts.append(ref_latent.new_ones(b, 1, h, w))
        elif key in ("masked_image", "concat_image"):
            parts.append(ref_latent)
        else:
            raise ValueError(
                f"MaX4Zero Masked Extended Attention: this model's conditioning has a '{key}' input the "
                "reference pass cannot build; use an SD1.5/SD2/SDXL (inpainting) checkpoint"
            )
    return torch.cat(parts, dim=1)


def neutralise_background(image: torch.Tensor, mask: torch.Tensor, grey: float = 0.5) -> torch.Tensor:
    """Flat grey outside the garment: ``image·m + grey·(1 − m)`` with a hard (> 0.5) mask.

    image [B, H, W, C] (ComfyUI IMAGE), mask [B or 1, H, W]. The result depends on pixels inside the
    mask only, so everything computed from it is provably independent of the reference background.
    """
    m = (mask > 0.5).to(image.dtype)[..., None]
    return image * m + grey * (1.0 - m)


def center_crop_multiple(x: torch.Tensor, multiple: int, dims: tuple[int, int] = (1, 2)) -> torch.Tensor:
    """Centre-crop the two spatial ``dims`` to multiples of ``multiple`` (what ComfyUI's VAE.encode does)."""
    for d in dims:
        n = x.shape[d]
        keep = (n // multiple) * multiple
        if keep != n:
            x = x.narrow(d, (n % multiple) // 2, keep)
    return x


def trace_consumers(prompt: Optional[dict], unique_id: Any, output_index: int) -> list[tuple[str, dict]]:
    """Nodes of an API-format prompt that read output ``output_index`` of node ``unique_id``.

    Returns ``[(class_type, inputs), …]``. A link is ``[source_id, output_index]``. Used to switch the
    attention recording on only when a flow view is connected (the hidden PROMPT/UNIQUE_ID inputs).
    """
    if not isinstance(prompt, dict) or unique_id is None:
        return []
    uid = str(unique_id)
    out = []
    for node in prompt.values():
        if not isinstance(node, dict):
            continue
        inputs = node.get("inputs") or {}
        for value in inputs.values():
            if (
                isinstance(value, (list, tuple))
                and len(value) == 2
                and str(value[0]) == uid
                and isinstance(value[1], int)
                and value[1] == output_index
            ):
                out.append((str(node.get("class_type", "")), inputs))
                break
    return out


def no_op_reason(stats: dict, start: float, end: float, sigmas: Any) -> tuple[str, str]:
    """(reason, fix) for a sampling run in which MEA changed nothing although its masks are not empty.

    ``stats`` counts the run's model calls that wanted MEA (``calls``), the chosen layers reached
    (``layers``) and the layer calls where a query inside the target mask read garment tokens
    (``effective``).

    >>> no_op_reason({"calls": 0, "layers": 0, "effective": 0}, 0.7, 1.0, None)[0]
    'no step of this run lies in the MEA window (start=0.7, end=1.0)'
    """
    if stats.get("calls", 0) == 0:
        span = ""
        if isinstance(sigmas, torch.Tensor) and sigmas.numel() > 1:
            span = f"; the sampler ran from sigma {float(sigmas[0]):.3g} to {float(sigmas[-1]):.3g}"
        return (f"no step of this run lies in the MEA window (start={start}, end={end}){span}",
                "Set start/end so the window covers steps this sampler runs (for a KSampler (Advanced) that "
                "starts at step 35 of 50, start 0.7 covers it), or connect the patched model to the sampler "
                "that runs those steps")
    if stats.get("layers", 0) == 0:
        return ("none of the chosen self-attention layers was reached in this model's forward pass (another model "
                "layout, or a ComfyUI version whose attention calls the patch cannot hook)",
                "Pick another 'layers' choice; if none works, update ComfyUI and report the model and ComfyUI "
                "version")
    return ("the target mask or the garment mask has no pixel left at the token grids of the chosen layers "
            "(a thin or soft mask vanishes when it is shrunk to 1/8 or 1/16 of the image)",
            "Use a larger or harder (white = 1) mask, or work at a larger size (MaX4Zero Crop To Mask 'size')")


def latent_output_key(samples: Any) -> Optional[str]:
    """:func:`~max4zero.nodes.trace.samples_key` of a sampling result as the LATENT output will hold it.

    ComfyUI's samplers hand the OUTER_SAMPLE result on as ``samples.to(intermediate_device,
    intermediate_dtype)`` (the dtype since 2026; float32 before); the key is taken after the same cast, so
    it equals the key of the LATENT the flow view receives. None for anything but a plain tensor.
    """
    from .trace import samples_key

    if not isinstance(samples, torch.Tensor) or getattr(samples, "is_nested", False):
        return None
    import comfy.model_management as mm

    dtype = mm.intermediate_dtype() if hasattr(mm, "intermediate_dtype") else samples.dtype
    return samples_key(samples.detach().to(dtype=dtype))


def nearest_step(sample_sigmas: Optional[torch.Tensor], sigma: float) -> Optional[int]:
    """Index of the schedule entry closest to ``sigma`` (None without a schedule)."""
    if sample_sigmas is None or not isinstance(sample_sigmas, torch.Tensor) or sample_sigmas.numel() == 0:
        return None
    return int(torch.argmin((sample_sigmas.detach().float().cpu() - float(sigma)).abs()))


# --------------------------------------------------------------------------------------------
# the patch


@dataclass
class _RefEntry:
    k: torch.Tensor
    v: torch.Tensor
    hw: tuple[int, int]


class MeaPatch:
    """Runtime state of one MEA node's patch; installed on a cloned ModelPatcher by :meth:`install`.

    Args:
        mode: ``"paper"`` or ``"fused"`` (see the module docstring).
        s_mea: weight of the MEA branch in paper mode (15 in the paper); unused in fused mode.
        contrast: attention contrast on the reference half (1.25 paper, 1.0 = off).
        start, end: schedule fractions (``percent_to_sigma``) of the MEA window, 0 ≤ start ≤ end ≤ 1.
        layers: :class:`LayerSelection`.
        attn1_keys: the slots to wrap (:func:`attn1_slots` for ``layers.parts``).
        ref_latent: [1, C, h, w] reference latent, already ``process_latent_in``-scaled.
        ref_noise: [1, C, h, w] fixed noise for re-noising it to each sigma.
        ref_context: [1, L, D] text conditioning of the reference pass, or None (use a positive row's).
        garment_mask: [1, H, W] bool garment pixels of the reference (after erosion), any resolution.
        target_mask: [B or 1, H, W] float try-on region of the target, any resolution of the same aspect.
        trace: a :class:`~max4zero.nodes.trace.MeaTrace` to record attention into, or None.
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
        self.id = uuid.uuid4().hex
        self.ref_uuid = uuid.uuid4()
        self.active = bool(self.garment_mask.any()) and bool((self.target_mask > 0.5).any())
        if mode == "paper" and self.s_mea == 0.0:
            self.active = False
        # per-run caches
        self._store: dict[tuple, _RefEntry] = {}
        self._store_sigma: Optional[float] = None
        self._mask_cache: dict[tuple, torch.Tensor] = {}
        self._window_cache: dict[int, tuple[float, float]] = {}
        #: run the reference as one extra row of the call that needs it when the batch layout allows
        #: (one UNet call instead of two; same result up to float rounding), else as a separate pass
        self.inline_reference = True
        self.reference_passes = 0  # counters for tests and the benchmark
        self.mea_calls = 0
        #: per sampling run: model calls that wanted MEA, chosen layers reached, layer calls where a query
        #: inside the target mask read garment tokens (0 at the end of a run = a silent no-op, see
        #: :meth:`_report_no_op`)
        self.run_stats = {"calls": 0, "layers": 0, "effective": 0}
        #: where no-op reports go besides the log: ``fn(text)`` (the node's UI text), or None
        self.notify: Optional[Callable[[str], None]] = None

    def __deepcopy__(self, memo: dict) -> "MeaPatch":
        # ModelPatcher.clone() deep-copies model_options (which hold our post-CFG function): share the
        # state instead of copying the reference latent and the trace.
        return self

    # -- installation ------------------------------------------------------------------------

    def install(self, patcher: Any) -> Any:
        """Register the wrappers (and the post-CFG function in paper mode) on ``patcher`` (a clone)."""
        from comfy.patcher_extension import WrappersMP

        patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "max4zero_mea", self.outer_sample_wrapper)
        patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "max4zero_mea", self.apply_model_wrapper)
        if self.mode == "paper" and self.active:
            # The third branch is based on eps_u (docs/method.md §3b): at cfg 1 ComfyUI would skip the negative pass, so keep it.
            patcher.set_model_sampler_post_cfg_function(self.post_cfg_function, disable_cfg1_optimization=True)
        return patcher

    # -- caches --------------------------------------------------------------------------------

    def reset(self) -> None:
        self._store = {}
        self._store_sigma = None
        self._mask_cache.clear()

    def window(self, model_sampling: Any) -> tuple[float, float]:
        """(sigma_start, sigma_end) of the MEA window for this model's sampling (cached)."""
        key = id(model_sampling)
        if key not in self._window_cache:
            self._window_cache[key] = (
                float(model_sampling.percent_to_sigma(self.start)),
                float(model_sampling.percent_to_sigma(self.end)),
            )
        return self._window_cache[key]

    def _in_window(self, model_sampling: Any, sigma: float) -> bool:
        s0, s1 = self.window(model_sampling)
        return in_window(sigma, s0, s1)

    def _grid_mask(self, which: str, hw: tuple[int, int], device: Any) -> torch.Tensor:
        """Garment or target mask at a token grid, flattened: [B or 1, h·w] bool on ``device``."""
        key = (which, hw, str(device))
        m = self._mask_cache.get(key)
        if m is None:
            src = self.garment_mask if which == "garment" else (self.target_mask > 0.5)
            m = _masks.resize_to_grid(src, hw).reshape(src.shape[0], -1).to(device)
            self._mask_cache[key] = m
        return m

    def latent_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Target mask at latent size as float [B or 1, 1, h, w] on x's device (paper guidance M)."""
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        m = self._grid_mask("target", hw, x.device).view(-1, 1, *hw)
        if m.shape[0] not in (1, x.shape[0]):
            row_mask_index(range(x.shape[0]), x.shape[0], 1, m.shape[0])  # raises the clear error
        return m.to(x.dtype)

    # -- the wrappers -------------------------------------------------------------------------

    def outer_sample_wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> Any:
        """Per sampling run: fresh caches, (re)start the trace, file the run under its result, free the
        reference K/V afterwards."""
        self.reset()
        self.run_stats = {"calls": 0, "layers": 0, "effective": 0}
        sigmas = args[3] if len(args) > 3 else kwargs.get("sigmas")
        if self.trace is not None:
            self.trace.begin_run(sigmas)
        try:
            out = executor(*args, **kwargs)
            if self.trace is not None:
                self.trace.end_run(latent_output_key(out))
            self._report_no_op(sigmas)
            return out
        finally:
            self.reset()

    def _report_no_op(self, sigmas: Any) -> None:
        """A run that applied MEA nowhere although the masks are not empty: say why, once, and the fix."""
        if not self.active or self.run_stats["effective"]:
            return
        reason = no_op_reason(self.run_stats, self.start, self.end, sigmas)
        text = f"MaX4Zero Masked Extended Attention did nothing in this sampling run: {reason[0]}. {reason[1]}"
        log.warning(text)
        if self.notify is not None:
            self.notify(text)

    def post_cfg_function(self, args: dict) -> torch.Tensor:
        """Paper mode: one extra positive pass with MEA; add s_mea·M⊙(x̂0_MEA − x̂0_u)."""
        denoised = args["denoised"]
        cond = args.get("cond")
        if not self.active or cond is None:
            return denoised
        model = args["model"]
        sigma = args["sigma"]
        if not self._in_window(model.model_sampling, float(sigma.flatten()[0])):
            return denoised
        import comfy.samplers

        options = dict(args["model_options"])
        to = dict(options.get("transformer_options", {}))
        to[MEA_PASS_KEY] = self.id
        options["transformer_options"] = to
        x = args["input"]
        (x0_mea,) = comfy.samplers.calc_cond_batch(model, [cond], x, sigma, options)
        base = args["cond_denoised"] if args.get("uncond") is None else args["uncond_denoised"]
        return paper_guidance(denoised, base, x0_mea, self.latent_mask(x), self.s_mea)

    def apply_model_wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Reference pass + MEA for calls that need it; every other call passes through untouched."""
        if not self.active:
            return executor(*args, **kwargs)
        named, extra = bind_apply_model_args(args, kwargs)
        to = named["transformer_options"]
        paper_pass = to.get(MEA_PASS_KEY) == self.id
        if self.mode == "paper" and not paper_pass:
            return executor(*args, **kwargs)
        x, t = named["x"], named["t"]
        base_model = executor.class_obj
        sigma = float(t.flatten()[0])
        if not self._in_window(base_model.model_sampling, sigma):
            return executor(*args, **kwargs)
        cou = list(to.get("cond_or_uncond") or [0])
        n = int(x.shape[0])
        rows = mea_rows(cou, n, all_rows=paper_pass)
        if not rows:
            return executor(*args, **kwargs)
        self.run_stats["calls"] += 1

        step = nearest_step(to.get("sample_sigmas"), sigma)
        mask_idx = row_mask_index(rows, n, len(cou), int(self.target_mask.shape[0]))
        cached = self._store if (self._store_sigma == sigma and self._store) else None
        if cached is None and self.inline_reference and self._can_inline(named, extra, cou, n):
            return self._inline_call(executor, base_model, named, extra, sigma, rows, mask_idx, cou, n, step)
        store = cached if cached is not None else self._reference(executor, base_model, named, extra, sigma, rows[0], n)
        ctx = _UseContext(rows=rows, mask_index=mask_idx, n_rows=n, sigma=sigma, step=step)
        use_to = self._with_replaces(to, lambda key, prev: self._use_replace(key, prev, store, ctx))
        return executor(x, t, named["c_concat"], named["c_crossattn"], named["control"], use_to, **extra)

    # -- reference inputs ---------------------------------------------------------------------

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
        ctx_row = slice_row(named["c_crossattn"], n, row)
        if self.ref_context is not None and isinstance(ctx_row, torch.Tensor):
            if self.ref_context.shape[-1] != ctx_row.shape[-1]:
                raise ValueError(
                    f"MaX4Zero Masked Extended Attention: its 'positive' conditioning is {self.ref_context.shape[-1]} "
                    f"wide but this model's text conditioning is {ctx_row.shape[-1]} wide: encode the prompt with "
                    "the CLIP of the same checkpoint"
                )
            ctx_ref = self.ref_context.to(device=ctx_row.device, dtype=ctx_row.dtype)
        else:
            ctx_ref = ctx_row
        return {
            "x": x_ref, "t": t_ref, "c_concat": concat_ref, "c_crossattn": ctx_ref,
            "extra": {k: slice_row(v, n, row) for k, v in extra.items()},
        }

    def _reference(
        self, executor: Any, base_model: Any, named: dict, extra: dict, sigma: float, row: int, n: int
    ) -> dict:
        """Separate reference pass (batch 1) recording K/V of the selected layers; cached per sigma."""
        if self._store_sigma == sigma and self._store:
            return self._store
        ref = self._reference_inputs(base_model, named, extra, row, n)
        store: dict[tuple, _RefEntry] = {}
        to = dict(named["transformer_options"])
        to.pop(MEA_PASS_KEY, None)
        to["cond_or_uncond"] = [0]
        to["uuids"] = [self.ref_uuid]
        to["sigmas"] = ref["t"]
        ref_to = self._with_replaces(to, lambda key, prev: self._record_replace(key, prev, store))
        executor(ref["x"], ref["t"], ref["c_concat"], ref["c_crossattn"], None, ref_to, **ref["extra"])
        self.reference_passes += 1
        self._store, self._store_sigma = store, sigma
        return store

    def _can_inline(self, named: dict, extra: dict, cou: list, n: int) -> bool:
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

    def _inline_call(
        self, executor: Any, base_model: Any, named: dict, extra: dict, sigma: float, rows: list,
        mask_idx: list, cou: list, n: int, step: Optional[int],
    ) -> torch.Tensor:
        """The call with the reference appended as row n; MEA reads K/V of that row in the same forward."""
        ref = self._reference_inputs(base_model, named, extra, rows[0], n)
        x, t = named["x"], named["t"]
        x2 = torch.cat([x, ref["x"].to(x.dtype)])
        t2 = torch.cat([t, ref["t"].to(t.dtype)])
        c_concat = named["c_concat"]
        concat2 = None if c_concat is None else torch.cat([c_concat, ref["c_concat"].to(c_concat)])
        ctx = named["c_crossattn"]
        ctx2 = torch.cat([ctx, ref["c_crossattn"].to(ctx)])
        extra2 = {k: _append_row(v, ref["extra"][k], n) for k, v in extra.items()}
        control2 = _pad_control(named["control"], n)
        to = dict(named["transformer_options"])
        if len(cou) == 1:
            to["cond_or_uncond"] = list(cou)  # the single chunk grows by one row
        else:
            to["cond_or_uncond"] = list(cou) + [0]  # one-row chunks: the reference is one more positive chunk
            to["uuids"] = list(to.get("uuids") or []) + [self.ref_uuid]
        store: dict[tuple, _RefEntry] = {}
        ctx_use = _UseContext(rows=rows, mask_index=mask_idx, n_rows=n + 1, sigma=sigma, step=step, ref_row=n)
        use_to = self._with_replaces(to, lambda key, prev: self._use_replace(key, prev, store, ctx_use))
        out = executor(x2, t2, concat2, ctx2, control2, use_to, **extra2)
        self.reference_passes += 1
        self._store, self._store_sigma = store, sigma  # later calls at this sigma reuse the recorded K/V
        return out[:n]

    # -- attn1 replaces -----------------------------------------------------------------------

    def _with_replaces(self, to: dict, make: Callable[[tuple, Optional[Callable]], Callable]) -> dict:
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

    def _selected(self, key: tuple, extra: dict) -> Optional[tuple[int, int]]:
        """The layer's token grid if MEA applies to it, else None."""
        act = extra.get("activations_shape")
        orig = extra.get("original_shape")
        if act is None or orig is None:
            return None
        hw = (int(act[-2]), int(act[-1]))
        return hw if self.layers.selects(key[0], grid_level(orig[-2:], hw)) else None

    def _record_replace(self, key: tuple, prev: Optional[Callable], store: dict) -> Callable:
        def record(q, k, v, extra):
            out = prev(q, k, v, extra) if prev is not None else _plain_attention(q, k, v, extra)
            hw = self._selected(key, extra)
            if hw is not None and q.shape[1] == hw[0] * hw[1]:
                store[key] = _RefEntry(k, v, hw)
            return out

        return record

    def _use_replace(self, key: tuple, prev: Optional[Callable], store: dict, ctx: "_UseContext") -> Callable:
        def use(q, k, v, extra):
            if ctx.ref_row is not None:  # the reference is a row of this very batch
                hw = self._selected(key, extra)
                entry = None
                if hw is not None and q.shape[1] == hw[0] * hw[1]:
                    r = ctx.ref_row
                    entry = store[key] = _RefEntry(k[r : r + 1].clone(), v[r : r + 1].clone(), hw)
            else:
                entry = store.get(key)
                hw = self._selected(key, extra) if entry is not None else None
            if entry is None or hw is None or q.shape[1] != hw[0] * hw[1]:
                return prev(q, k, v, extra) if prev is not None else _plain_attention(q, k, v, extra)
            n = q.shape[0]
            rows = ctx.rows_on(q.device)
            full = rows.numel() == n
            qm = self._grid_mask("target", hw, q.device)[ctx.mask_index_on(q.device)]  # [R, T]
            rkm = self._grid_mask("garment", entry.hw, q.device)  # [1, T_ref]
            self.run_stats["layers"] += 1
            if bool(rkm.any()) and bool(qm.any()):
                self.run_stats["effective"] += 1
            capture = None
            if self.trace is not None:
                capture = self.trace.capture_for(
                    layer=key, step=ctx.step, sigma=ctx.sigma, query_hw=hw, ref_hw=entry.hw
                )
            qs, ks, vs = (q, k, v) if full else (q[rows], k[rows], v[rows])
            mea = masked_extended_attention(
                qs, ks, vs, entry.k, entry.v, rkm, qm, int(extra["n_heads"]), self.contrast, capture
            )
            self.mea_calls += 1
            if prev is not None:
                base = prev(q, k, v, extra)
                sub = base if full else base[rows]
                mixed = torch.where(qm[..., None], mea.to(sub.dtype), sub)
                return mixed if full else base.index_copy(0, rows, mixed)
            if full:
                return mea
            others = ctx.others_on(q.device)
            plain = _plain_attention(q[others], k[others], v[others], extra)
            out = torch.empty((n,) + tuple(mea.shape[1:]), dtype=plain.dtype, device=plain.device)
            out[others] = plain
            out[rows] = mea.to(plain.dtype)
            return out

        return use


@dataclass
class _UseContext:
    rows: list[int]
    mask_index: list[int]
    n_rows: int
    sigma: float
    step: Optional[int]
    ref_row: Optional[int] = None

    def __post_init__(self) -> None:
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def _on(self, device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = str(device)
        if key not in self._cache:
            rows = torch.tensor(self.rows, dtype=torch.long, device=device)
            chosen = set(self.rows)
            others = torch.tensor([r for r in range(self.n_rows) if r not in chosen], dtype=torch.long, device=device)
            idx = torch.tensor(self.mask_index, dtype=torch.long, device=device)
            self._cache[key] = (rows, others, idx)
        return self._cache[key]

    def rows_on(self, device: Any) -> torch.Tensor:
        return self._on(device)[0]

    def others_on(self, device: Any) -> torch.Tensor:
        return self._on(device)[1]

    def mask_index_on(self, device: Any) -> torch.Tensor:
        return self._on(device)[2]


def _append_row(value: Any, ref_value: Any, n_rows: int) -> Any:
    """A per-row model input with the reference row's value appended (others unchanged)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n_rows:
        return torch.cat([value, ref_value.to(value)])
    if isinstance(value, list):
        return [_append_row(v, r, n_rows) for v, r in zip(value, ref_value)]
    return value


def _pad_control(control: Any, n_rows: int) -> Any:
    """ControlNet residuals with a zero row for the reference (the hint belongs to the target image).

    ``apply_control`` pops from these lists, so fresh lists are returned and the input stays intact.
    """
    if control is None:
        return None

    def pad(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.dim() > 0 and v.shape[0] == n_rows:
            return torch.cat([v, v.new_zeros((1,) + tuple(v.shape[1:]))])
        if isinstance(v, list):
            return [pad(x) for x in v]
        if isinstance(v, dict):
            return {k: pad(x) for k, x in v.items()}
        return v

    return pad(control)


def _plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
    """Exactly what ``CrossAttention.forward`` computes between the projections and ``to_out``."""
    from comfy.ldm.modules import attention as comfy_attention

    return comfy_attention.optimized_attention(
        q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"), transformer_options=extra
    )
