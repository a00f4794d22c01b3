"""Masked Extended Attention on Flux-family DiTs as a ComfyUI model patch (docs/method.md §3c).

The second adapter over the same core as :mod:`.mea_patch` (the UNet's), and a subclass of its patch: same
frozen settings and per-run state (``attention/run.py``), same window, rows, reference pass
(``attention/reference.py``) and guidance (the post-CFG function is inherited), same attention maths
(``attention/dit.py: joint_extended_attention`` → ``attention/masked_extended.py``). Only the hooks differ.

Hooks (ComfyUI 0.33.0, ``comfy/ldm/flux/layers.py``):

* ``transformer_options["patches"]["attn1_patch"]``: every double and single block calls each entry as
  ``p(q, k, v, pe=, attn_mask=, extra_options=)`` with ``q, k, v`` [B, heads, L, d] after QK-norm and before
  RoPE; ``extra_options`` names the block (``block_type``, ``block_index``) and the image range
  (``img_slice``). MEA's entry changes nothing (returns ``{}``): in the reference pass it records the garment
  tokens' K and V (pre-RoPE, as core ``FluxKVCache`` does); in a target call it notes where the block's image
  starts, under the block's key.
* ``transformer_options["optimized_attention_override"]``: replaces the attention function, called with q and
  k already roped, every key the block attends over (other patches' extensions included) and the
  ``transformer_options`` that name the running block. It computes the block's own attention (through any
  override that was there before), then redoes only the region's image queries with the garment keys appended
  (``joint_extended_attention``). Text queries and image queries outside the region keep the block's own answer
  bit for bit; contrast (which no attention mask can express) lives here too.

Leffa Flow View (docs/method.md §3c, §4): when the run records, the override hands the recorders (one per τ) to
``joint_extended_attention`` with the garment tokens' places on the reference grid; the core records flow, mass and
entropy of the region's queries (never the attention map), written back onto the target's token grid, one record
per block call. Recording never changes the result.

Both are put into a COPY of the call's ``transformer_options``, only for calls that carry MEA (as the UNet
adapter does); every other call is untouched.

Reference pass: a separate batch-1 call per sigma (cached for the cond/uncond/MEA passes at that sigma; with
``reference_every`` = N > 1 also reused for the next N − 1 sampler steps, an approximation of the paper), built by
the core like the UNet's: FLUX.1 Fill's extra channels say "keep everything" (:func:`flux_concat_parts`), no
ControlNet, no Kontext reference latents, no attention mask; the node's prompt as the model's own ``extra_conds``
hands it over (:func:`model_text`: FLUX.2 pads it to 512 tokens, as the target's). Only the garment tokens' K/V are
kept, per block.

Token grid: from the model's own ``patch_size`` (FLUX.1 2, FLUX.2 1), for target, reference, garment indices and
the mask checks (:func:`flux_selection`).

Reference positions (RoPE): the garment keys are roped at the reference's own token grid, placed on the first axis
as the model places a reference latent (``attention/dit.py: reference_rope_index``): index 1 for FLUX.1's
``offset`` (Flux Kontext), one ``ref_index_scale`` step after the call's reference latents for FLUX.2's ``index``;
with the model's own ``pe_embedder`` and ComfyUI's ``apply_rope1``. ``rope_options`` (LongCat-style shifts) are not
applied to them.

Guidance: ``paper`` as on the UNet. FLUX.1 and FLUX.2 are distilled (sampled at cfg 1 without a negative), so by the
core's cfg-1 rule (``attention/policy.py: keeps_negative_pass_at_cfg1``) the negative pass is not kept at cfg 1: the
base is ε_c and the step is ε_c + s_mea·M⊙(ε_MEA − ε_c). With real CFG (cfg ≠ 1) the base is ε_u as in the paper.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch

from ..attention.dit import (
    DIT_FAMILIES,
    FLUX_LEVEL,
    FLUX_PATCH,
    flux_token_grid,
    joint_extended_attention,
    key_keep_from_bias,
    patch_level,
    reference_rope_index,
    reference_token_ids,
)
from ..attention.policy import LayerSelection, token_mask
from ..attention.run import WorkerState
from .convert import NodeInputError
from .mea_calls import REFERENCE_PASS_KEY
from .mea_patch import MeaPatch
from .mea_replace import CallRows

__all__ = ["FLUX_SELECTION", "FluxMeaPatch", "FluxAttention", "FluxRefEntry", "flux_hook_problem", "is_flux",
           "flux_layout_problem", "flux_concat_parts", "flux_selection", "dit_family", "model_text"]

#: What the mask checks shared with the UNet adapter see on FLUX.1: tokens are the latent grid halved once.
FLUX_SELECTION = LayerSelection(frozenset({"flux"}), frozenset({FLUX_LEVEL}))


def flux_selection(patch: int) -> LayerSelection:
    """What the mask checks see on a Flux-family model whose tokens pack ``patch``×``patch`` latent cells."""
    return LayerSelection(frozenset({"flux"}), frozenset({patch_level(patch)}))


def dit_family(base_model: Any) -> str:
    """ComfyUI's name for the model's family (``unet_config["image_model"]``: ``"flux"``, ``"flux2"``, …)."""
    unet_config = getattr(getattr(base_model, "model_config", None), "unet_config", {}) or {}
    return str(unet_config.get("image_model", "flux"))


def model_text(base_model: Any, context: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
    """The text ``context`` [1, L, D] as the model's own ``extra_conds`` hands it to the model (FLUX.2 pads it to
    512 tokens in front, so its text RoPE ids are the target's), for the reference pass. ``latent`` [1, C, h, w]:
    the reference latent (what ``extra_conds`` sizes its image inputs by; they are not used)."""
    out = base_model.extra_conds(cross_attn=context, noise=torch.zeros_like(latent), device=latent.device,
                                 guidance=None)
    cond = out.get("c_crossattn")
    return context if cond is None else cond.cond

def is_flux(diffusion_model: Any) -> bool:
    """Whether ComfyUI's diffusion model is a Flux-family DiT (``comfy.ldm.flux.model.Flux`` or a subclass)."""
    try:
        from comfy.ldm.flux.model import Flux
    except ImportError:
        return False
    return isinstance(diffusion_model, Flux)


def flux_layout_problem(base_model: Any) -> Optional[str]:
    """None for a Flux-family layout the adapter knows, else why it would be wrong on this model.

    Known: FLUX.1 (``"flux"``: 2×2 patches of a 16-channel latent, Kontext's ``offset`` references) and FLUX.2
    (``"flux2"``: 1×1 patches of a 128-channel latent, text padded to 512 tokens in ``extra_conds``, ``index``
    references every ``ref_index_scale``; dev with a guidance embedding, klein without). Every grid, the reference
    text and the garment keys' RoPE index are taken from the model; another family (or a known family with another
    layout) is refused rather than run with the wrong image tokens.
    """
    dm = base_model.diffusion_model
    unet_config = getattr(getattr(base_model, "model_config", None), "unet_config", {}) or {}
    family = dit_family(base_model)
    patch = int(getattr(dm, "patch_size", FLUX_PATCH))
    channels = int(unet_config.get("out_channels", 16))
    known = {"flux": (FLUX_PATCH, 16), "flux2": (1, 128)}
    if family in DIT_FAMILIES and known.get(family) == (patch, channels):
        return None
    name = {"flux": "this FLUX.1-family model", "flux2": "this FLUX.2 model"}.get(family, f"this Flux-family model "
                                                                                     f"({family!r})")
    return (f"{name} is not supported: it packs {patch}x{patch} patches of a {channels}-channel latent, while Masked "
            "Extended Attention knows FLUX.1 (2x2 patches of 16 channels) and FLUX.2 (1x1 patches of 128 channels); "
            "on another layout the garment would be read into the wrong image tokens")


def flux_hook_problem() -> Optional[str]:
    """None when this ComfyUI's Flux blocks offer the hooks the adapter needs, else what is missing.

    Checks the capability, not a version string: both block kinds must call ``attn1_patch`` entries, and the
    attention wrapper must honour ``optimized_attention_override``.
    """
    from comfy.ldm.flux import layers
    import comfy.ldm.modules.attention as attention

    for cls in (layers.DoubleStreamBlock, layers.SingleStreamBlock):
        if "attn1_patch" not in cls.forward.__code__.co_consts:
            return (f"this ComfyUI's Flux {cls.__name__} has no attention patch hook ('attn1_patch'), which Masked "
                    "Extended Attention on Flux needs")
    try:
        source = inspect.getsource(attention)
    except (OSError, TypeError):
        source = ""
    if "optimized_attention_override" not in source:
        return "this ComfyUI's attention has no 'optimized_attention_override' hook, which MEA on Flux needs"
    return None


def flux_concat_parts(base_model: Any) -> Optional[tuple]:
    """The extra-channel parts of a Flux model in order (``model_base.Flux.concat_cond``), for the reference to
    reconstruct itself (``attention/reference.py: reconstruct_itself``); None without extra channels (dev,
    schnell, Kontext).

    FLUX.1 Fill: the masked image (16 channels) then the 8×8 pixel mask packed into 64 channels. A model whose
    extra channels are one image (depth / canny control) is refused: its hint belongs to the target.
    """
    dm = base_model.diffusion_model
    out_c = int(base_model.model_config.unet_config.get("out_channels", 16))
    try:
        num = int(dm.img_in.weight.shape[1]) // (int(dm.patch_size) ** 2)
    except (AttributeError, TypeError):
        num = int(base_model.model_config.unet_config["in_channels"])
    if num <= out_c:
        return None
    if num <= 2 * out_c:
        raise ValueError("this Flux model takes a control image (depth / canny) as extra input channels; the "
                         "reference pass cannot build one for the reference: use FLUX.1 Fill or FLUX.1 dev")
    return ("masked_image", f"mask:{num - 2 * out_c}")


class FluxRefEntry:
    """The reference's garment tokens at one block: ``k, v`` [1, heads, G, d] before RoPE; ``roped`` caches
    k with RoPE applied at the reference positions, per device (written by the one thread that reads it)."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v
        self.roped: dict[str, torch.Tensor] = {}


class FluxAttention:
    """The attn1 patch and the attention override of one model call (see the module docstring).

    Args:
        patch: the :class:`FluxMeaPatch` (frozen).
        state: this thread's :class:`~max4zero.attention.run.WorkerState`.
        mode: ``"record"`` (reference pass) or ``"use"`` (a target call).
        store: block key → :class:`FluxRefEntry`, written in ``record``, read in ``use``.
        call: the call's :class:`~.mea_replace.CallRows` (``use``).
        grid: the target's token grid (``use``).
        ref_pe: callable(device) → RoPE of the garment tokens [1, 1, G, d/2, 2, 2] (``use``).
        prev_override: the ``optimized_attention_override`` that was there before, or None.

    In ``use`` mode the patch notes where each block's image starts (``img_slice``, which only the patch is
    given) under the block's key, and the override reads the running block from ``transformer_options``
    (``block_type``, ``block_index``), as ComfyUI hands it to every attention call.
    """

    def __init__(self, patch: "FluxMeaPatch", state: WorkerState, mode: str, store: dict,
                 call: Optional[CallRows] = None, grid: Optional[tuple[int, int]] = None,
                 ref_pe: Optional[Callable[[Any], torch.Tensor]] = None, prev_override: Optional[Callable] = None) -> None:
        if mode not in ("record", "use"):
            raise ValueError(f"mode must be 'record' or 'use', got {mode!r}")
        self.patch, self.state, self.mode, self.store, self.call = patch, state, mode, store, call
        self.grid, self.ref_pe, self.prev_override = grid, ref_pe, prev_override
        self.starts: dict[tuple, int] = {}

    def __repr__(self) -> str:
        return f"FluxAttention(mode={self.mode!r}, blocks={len(self.patch.blocks)})"

    @staticmethod
    def block_key(options: Optional[dict]) -> Optional[tuple]:
        eo = options or {}
        kind, idx = eo.get("block_type"), eo.get("block_index")
        return None if kind is None or idx is None else (str(kind), int(idx))

    def attn1_patch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: Any = None, attn_mask: Any = None,
                    extra_options: Optional[dict] = None, **kwargs: Any) -> dict:
        """ComfyUI's Flux ``attn1_patch``: records (reference pass) or notes where the image starts (target call);
        changes nothing."""
        key = self.block_key(extra_options)
        img_slice = (extra_options or {}).get("img_slice")
        if key is None or key not in self.patch.blocks or img_slice is None:
            return {}
        start = int(img_slice[0])
        if self.mode == "record":
            idx = self.patch.garment_index(self.state, k.device)
            if start + self.patch.ref_tokens <= k.shape[2]:
                sel = idx + start
                self.store[key] = FluxRefEntry(k.index_select(2, sel).clone(), v.index_select(2, sel).clone())
            return {}
        self.starts[key] = start
        return {}

    def override(self, func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``optimized_attention_override``: the block's own attention, then MEA for the region's image queries."""
        base = self.prev_override(func, *args, **kwargs) if self.prev_override is not None else func(*args, **kwargs)
        options = kwargs.get("transformer_options") or {}
        if options.get(REFERENCE_PASS_KEY) not in (None, self.patch.id):
            return base  # another chained node's reference pass: not a target
        key = self.block_key(options)
        start = self.starts.get(key) if key is not None else None
        if start is None or len(args) < 3:
            return base
        q, k, v = args[:3]
        mask = kwargs.get("mask", args[4] if len(args) > 4 else None)  # Qwen-Image passes it positionally
        entry = self.store.get(key)
        if (entry is None or (mask is not None and not self.patch.reads_key_mask) or not kwargs.get("skip_reshape", False)
                or kwargs.get("skip_output_reshape", False) or q.dim() != 4 or base.dim() != 3):
            return base
        key_keep = None
        if mask is not None:
            try:
                key_keep = key_keep_from_bias(mask, k.shape[2])
            except ValueError as e:
                raise NodeInputError(self.patch.label, str(e), "remove the soft attention mask from the "
                                     "conditioning, or bypass this node") from None
        n_img = self.grid[0] * self.grid[1]
        if start + n_img > q.shape[2]:
            return base
        rows, _, mask_index = self.call.on(q.device)
        region = self.state.grid_mask("target", self.grid, q.device)[mask_index]  # [R, N]
        effective = entry.k.shape[2] > 0 and bool(region.any())
        self.state.note_layer(effective)
        if not effective:
            return base
        dev = str(q.device)
        k_ref = entry.roped.get(dev)
        if k_ref is None:
            from comfy.ldm.flux.math import apply_rope1

            k_ref = entry.roped[dev] = apply_rope1(entry.k.to(q.device), self.ref_pe(q.device)).to(k.dtype)
        v_ref = entry.v.to(device=v.device, dtype=v.dtype)
        full = rows.numel() == q.shape[0]
        sub = (lambda x: x) if full else (lambda x: x.index_select(0, rows))  # noqa: E731
        captures = self.state.captures_for(layer=key, step=self.call.step, sigma=self.call.sigma,
                                           query_hw=self.grid, ref_hw=self.patch.ref_grid)
        positions = self.patch.garment_index(self.state, q.device) if captures else None
        mixed = joint_extended_attention(sub(q), sub(k), sub(v), k_ref, v_ref, region, start, sub(base),
                                         self.patch.settings.contrast, ref_count=self.patch.ref_tokens,
                                         capture=captures or None, ref_positions=positions, key_keep=key_keep)
        self.state.count("mea_calls")
        return mixed if full else base.index_copy(0, rows, mixed)


class FluxMeaPatch(MeaPatch):
    """One MEA node's patch on a Flux-family model (docs/method.md §3c); frozen like :class:`~.mea_patch.MeaPatch`.

    Args: as :class:`~.mea_patch.MeaPatch`, without ``layers``/``attn1_keys``, plus ``blocks``: the selected
    ``("double" | "single", index)`` blocks (``attention/dit.py: parse_flux_blocks``); ``patch_size``: latent cells
    per token side (the model's own: FLUX.1 2, FLUX.2 1); ``ref_method`` / ``ref_index_scale``: how the model
    places a reference latent (``default_ref_method`` and ``ref_index_scale`` of its params; a call's own
    ``ref_latents_method`` wins), where the garment keys are roped (``attention/dit.py: reference_rope_index``).
    The reference latent is [1, C, h, w] (``process_latent_in``-scaled). Each recorded MEA block call is labelled
    with its block key (``("double", i)`` / ``("single", j)``), query grid = the target's token grid, reference
    grid = the reference's token grid.
    """

    layer_input = "flux_blocks"
    #: FLUX.1 dev, Fill and schnell and FLUX.2 dev and klein are sampled at cfg 1 without a negative (guidance-
    #: or step-distilled)
    distilled = True
    inline_reference = False
    #: whether the region's rows honour the block's own attention mask (Qwen-Image's text padding); on FLUX.1/2 a
    #: call with a mask keeps its own attention (as before: no FLUX sampler passes one with MEA's hooks)
    reads_key_mask = False
    #: RoPE ids of the garment keys centred on the reference grid (Qwen-Image centres its image ids)
    centred_ids = False

    def __init__(self, *, blocks: frozenset, patch_size: int = FLUX_PATCH, ref_method: str = "offset",
                 ref_index_scale: float = 1.0, **kwargs: Any) -> None:
        settings = kwargs["settings"]
        reference_rope_index(ref_method, ref_index_scale)  # a method with no index step is refused here
        object.__setattr__(self, "blocks", frozenset(blocks))
        object.__setattr__(self, "patch_size", int(patch_size))
        object.__setattr__(self, "ref_method", str(ref_method))
        object.__setattr__(self, "ref_index_scale", float(ref_index_scale))
        object.__setattr__(self, "ref_grid", flux_token_grid(settings.ref_latent.shape[-2:], self.patch_size))
        object.__setattr__(self, "ref_tokens", self.ref_grid[0] * self.ref_grid[1])
        kwargs.setdefault("trace", None)
        super().__init__(layers=flux_selection(self.patch_size), attn1_keys=(), **kwargs)

    # -- reference tokens (cached per run and device in the worker state) ----------------------

    def garment_index(self, state: WorkerState, device: Any) -> torch.Tensor:
        """Indices of the garment tokens on the reference's token grid (row-major), on ``device``."""
        key = ("garment_index", str(device))
        idx = state.cache.get(key)
        if idx is None:
            m = token_mask(self.settings.garment_mask, self.ref_grid)[0]
            idx = state.cache[key] = m.nonzero().flatten().to(device)
        return idx

    def rope_index(self, extra: Optional[dict]) -> float:
        """The garment keys' first RoPE axis for a call with model inputs ``extra``: after its reference latents, by
        its ``ref_latents_method`` (``attention/dit.py: reference_rope_index``)."""
        extra = extra or {}
        refs = extra.get("ref_latents")
        method = extra.get("ref_latents_method") or self.ref_method
        try:
            return reference_rope_index(str(method), self.ref_index_scale, len(refs) if refs is not None else 0)
        except ValueError as e:
            raise NodeInputError(self.label, str(e)) from None

    def reference_pe(self, state: WorkerState, diffusion_model: Any, device: Any, index: float) -> torch.Tensor:
        """RoPE of the garment tokens at the reference positions (``reference_token_ids`` at ``index``), model's
        embedder."""
        key = ("reference_pe", str(device), float(index))
        pe = state.cache.get(key)
        if pe is None:
            n_axes = len(diffusion_model.pe_embedder.axes_dim)
            ids = reference_token_ids(self.ref_grid, n_axes, index, self.centred_ids).index_select(
                1, self.garment_index(state, "cpu"))
            pe = state.cache[key] = diffusion_model.pe_embedder(ids.to(device))
        return pe

    # -- hooks -----------------------------------------------------------------------------------

    def concat_parts(self, base_model: Any, c_concat: Any) -> Optional[tuple]:
        try:
            return flux_concat_parts(base_model)
        except ValueError as e:
            raise NodeInputError(self.label, str(e)) from None

    def with_hooks(self, to: dict, state: WorkerState, mode: str, store: dict, rows: Optional[CallRows],
                   named: dict, base_model: Any = None, extra: Optional[dict] = None) -> dict:
        """A copy of ``to`` with the attn1 patch appended (others kept, in order) and, in ``use`` mode, the
        override (wrapping any previous one). Nothing is mutated."""
        if mode == "use":
            dm = base_model.diffusion_model
            index = self.rope_index(extra)
            hooks = FluxAttention(self, state, "use", store, rows, flux_token_grid(named["x"].shape[-2:], self.patch_size),
                                  lambda device: self.reference_pe(state, dm, device, index),
                                  to.get("optimized_attention_override"))
        else:
            hooks = FluxAttention(self, state, "record", store)
        new_to = dict(to)
        patches = dict(to.get("patches", {}))
        patches["attn1_patch"] = list(patches.get("attn1_patch", [])) + [hooks.attn1_patch]
        new_to["patches"] = patches
        if mode == "use":
            new_to["optimized_attention_override"] = hooks.override
        return new_to
