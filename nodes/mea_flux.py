"""Masked Extended Attention on Flux-family DiTs as a ComfyUI model patch (docs/method.md §3c).

The second adapter over the same core as :mod:`.mea_patch` (the UNet's): same per-run state
(:class:`~.mea_patch.MeaRun`), same window, rows and guidance (the post-CFG function of
:class:`~.mea_patch.MeaPatch` is inherited unchanged), same attention maths
(``attention/dit.py: joint_extended_attention`` → ``attention/masked_extended.py``). Only the hooks differ.

Hooks (ComfyUI 0.33.0, ``comfy/ldm/flux/layers.py``):

* ``transformer_options["patches"]["attn1_patch"]``: every double and single block calls each entry as
  ``p(q, k, v, pe=, attn_mask=, extra_options=)`` with ``q, k, v`` [B, heads, L, d] after QK-norm and before
  RoPE; ``extra_options`` names the block (``block_type``, ``block_index``) and the image range
  (``img_slice``). MEA's entry changes nothing (returns ``{}``): in the reference pass it records the garment
  tokens' K and V (pre-RoPE, as core ``FluxKVCache`` does); in a target call it tells the override below which
  block is running and where its image starts.
* ``transformer_options["optimized_attention_override"]``: replaces the attention function, called with q and
  k already roped and every key the block attends over (other patches' extensions included). It computes the
  block's own attention (through any override that was there before), then redoes only the region's image
  queries with the garment keys appended (``joint_extended_attention``). Text queries and image queries
  outside the region keep the block's own answer bit for bit; contrast (which no attention mask can express)
  lives here too.

Leffa Flow View (docs/method.md §3c, §4): when the node's trace records, the override hands the trace's capture to
``joint_extended_attention`` with the garment tokens' places on the reference grid; the core records flow, mass and
entropy of the region's queries (never the attention map), written back onto the target's token grid, one record
per block call.

Both are put into a COPY of the call's ``transformer_options``, only for calls that carry MEA (as the UNet
adapter does); every other call is untouched.

Reference pass: a separate batch-1 call per sigma (cached for the cond/uncond/MEA passes at that sigma; with
``reference_every`` = N > 1 also reused for the next N − 1 sampler steps, an approximation of the paper): the
reference latent noised to the current sigma with the fixed seeded noise, the node's positive text, the
guidance and pooled inputs of a positive row, no ControlNet, no Kontext reference latents, no attention mask.
FLUX.1 Fill gets an all-zero inpaint mask and the reference itself as masked image, so it reconstructs itself.
Only the garment tokens' K/V are kept, per block.

Reference positions (RoPE): the garment keys are roped at the reference's own token grid shifted to index 1 on
the first axis (``attention/dit.py: reference_token_ids``) — where Flux Kontext puts a reference latent — with
the model's own ``pe_embedder`` and ComfyUI's ``apply_rope1``. ``rope_options`` (LongCat-style shifts) are not
applied to them.

Guidance: ``paper`` is ε_base + s_txt·(ε_c − ε_u) + s_mea·M⊙(ε_MEA − ε_base) through the same post-CFG function
and ``attention/policy.py: guidance_base``. Unlike the UNet adapter this one does NOT keep the negative pass at
cfg 1: a guidance-distilled Flux (dev, Fill; cfg 1 + guidance embedding) then has no negative, the base is ε_c
and the step is ε_c + s_mea·M⊙(ε_MEA − ε_c). With real CFG (cfg ≠ 1) the base is ε_u as in the paper.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, Optional

import torch

from ..attention.dit import FLUX_LEVEL, FLUX_PATCH, flux_token_grid, joint_extended_attention, reference_token_ids
from ..attention.policy import LayerSelection
from .mea_calls import reference_context, slice_row
from .mea_patch import MEA_PASS_KEY, MeaPatch, MeaRun
from .mea_replace import CallRows

__all__ = ["FLUX_SELECTION", "FluxMeaPatch", "FluxAttention", "FluxRefEntry", "flux_hook_problem", "is_flux",
           "flux_layout_problem", "flux_reference_concat"]

#: What the mask checks shared with the UNet adapter see: Flux tokens are the latent grid halved once.
FLUX_SELECTION = LayerSelection(frozenset({"flux"}), frozenset({FLUX_LEVEL}))

#: Model inputs the reference pass does not take from the target's call.
_NOT_FOR_REFERENCE = ("ref_latents", "ref_latents_method", "attention_mask")


def is_flux(diffusion_model: Any) -> bool:
    """Whether ComfyUI's diffusion model is a Flux-family DiT (``comfy.ldm.flux.model.Flux`` or a subclass)."""
    try:
        from comfy.ldm.flux.model import Flux
    except ImportError:
        return False
    return isinstance(diffusion_model, Flux)


def flux_layout_problem(base_model: Any) -> Optional[str]:
    """None for a FLUX.1-layout model (2×2 patches of a 16-channel latent), else why this adapter would be wrong.

    FLUX.2 runs on the same ``comfy.ldm.flux.model.Flux`` class but packs 1×1 patches of a 128-channel latent,
    pads its text to 512 tokens in ``extra_conds``, places references with ``ref_index_scale`` and has other
    block counts: the token grid, reference pass and block choices here are FLUX.1's, so it is refused until
    they are made for it rather than run with the wrong image tokens.
    """
    dm = base_model.diffusion_model
    unet_config = getattr(getattr(base_model, "model_config", None), "unet_config", {}) or {}
    family = unet_config.get("image_model", "flux")
    patch = int(getattr(dm, "patch_size", FLUX_PATCH))
    channels = int(unet_config.get("out_channels", 16))
    if family == "flux" and patch == FLUX_PATCH and channels == 16:
        return None
    name = "FLUX.2" if family == "flux2" else f"this Flux-family model ({family!r})"
    return (f"{name} is not supported yet: it packs {patch}x{patch} patches of a {channels}-channel latent, "
            "while Masked Extended Attention on Flux is built for FLUX.1's 2x2 patches of 16 channels (token grid, "
            "reference pass and block choices); on it the garment would be read into the wrong image tokens")


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


def flux_reference_concat(base_model: Any, ref_latent: torch.Tensor) -> Optional[torch.Tensor]:
    """``c_concat`` of the reference pass in the model's own layout (``model_base.Flux.concat_cond``).

    None for a model without extra channels (dev, schnell, Kontext). FLUX.1 Fill (latent + masked image +
    64-channel packed 8×8 pixel mask): the reference as masked image and an all-zero mask ("keep everything"),
    so it reconstructs itself. A model whose extra channels are one image (depth / canny control) is refused:
    its hint belongs to the target.
    """
    dm = base_model.diffusion_model
    out_c = int(base_model.model_config.unet_config.get("out_channels", ref_latent.shape[1]))
    try:
        num = int(dm.img_in.weight.shape[1]) // (int(dm.patch_size) ** 2)
    except (AttributeError, TypeError):
        num = int(base_model.model_config.unet_config["in_channels"])
    if num <= out_c:
        return None
    if num <= 2 * out_c:
        raise ValueError(
            "MaX4Zero Masked Extended Attention: this Flux model takes a control image (depth / canny) as extra "
            "input channels; the reference pass cannot build one for the reference: use FLUX.1 Fill or FLUX.1 dev"
        )
    b, _, h, w = ref_latent.shape
    return torch.cat([ref_latent, ref_latent.new_zeros(b, num - 2 * out_c, h, w)], dim=1)


class FluxRefEntry:
    """The reference's garment tokens at one block: ``k, v`` [1, heads, G, d] before RoPE; ``roped`` caches
    k with RoPE applied at the reference positions, per device."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor) -> None:
        self.k, self.v = k, v
        self.roped: dict[str, torch.Tensor] = {}


class FluxAttention:
    """The attn1 patch and the attention override of one model call (see the module docstring).

    Args:
        patch: the :class:`FluxMeaPatch`.
        run: the sampling run's :class:`~.mea_patch.MeaRun`.
        mode: ``"record"`` (reference pass) or ``"use"`` (a target call).
        store: block key → :class:`FluxRefEntry`, written in ``record``, read in ``use``.
        call: the call's :class:`~.mea_replace.CallRows` (``use``).
        grid: the target's token grid (``use``).
        ref_pe: callable(device) → RoPE of the garment tokens [1, 1, G, d/2, 2, 2] (``use``).
        prev_override: the ``optimized_attention_override`` that was there before, or None.
    """

    def __init__(self, patch: "FluxMeaPatch", run: MeaRun, mode: str, store: dict, call: Optional[CallRows] = None,
                 grid: Optional[tuple[int, int]] = None, ref_pe: Optional[Callable[[Any], torch.Tensor]] = None,
                 prev_override: Optional[Callable] = None) -> None:
        if mode not in ("record", "use"):
            raise ValueError(f"mode must be 'record' or 'use', got {mode!r}")
        self.patch, self.run, self.mode, self.store, self.call = patch, run, mode, store, call
        self.grid, self.ref_pe, self.prev_override = grid, ref_pe, prev_override
        self.current: Optional[tuple[tuple, int]] = None

    def __repr__(self) -> str:
        return f"FluxAttention(mode={self.mode!r}, blocks={len(self.patch.blocks)})"

    @staticmethod
    def block_key(extra_options: Optional[dict]) -> Optional[tuple]:
        eo = extra_options or {}
        kind, idx = eo.get("block_type"), eo.get("block_index")
        return None if kind is None or idx is None else (str(kind), int(idx))

    def attn1_patch(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: Any = None, attn_mask: Any = None,
                    extra_options: Optional[dict] = None, **kwargs: Any) -> dict:
        """ComfyUI's Flux ``attn1_patch``: records (reference pass) or notes the block (target call); no change."""
        key = self.block_key(extra_options)
        img_slice = (extra_options or {}).get("img_slice")
        self.current = None
        if key is None or key not in self.patch.blocks or img_slice is None:
            return {}
        start = int(img_slice[0])
        if self.mode == "record":
            idx = self.patch.garment_index(k.device)
            if start + self.patch.ref_tokens <= k.shape[2]:
                sel = idx + start
                self.store[key] = FluxRefEntry(k.index_select(2, sel).clone(), v.index_select(2, sel).clone())
            return {}
        self.current = (key, start)
        return {}

    def override(self, func: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        """``optimized_attention_override``: the block's own attention, then MEA for the region's image queries."""
        base = self.prev_override(func, *args, **kwargs) if self.prev_override is not None else func(*args, **kwargs)
        current, self.current = self.current, None
        if current is None or len(args) < 3:
            return base
        key, start = current
        q, k, v = args[:3]
        entry = self.store.get(key)
        if (entry is None or kwargs.get("mask") is not None or not kwargs.get("skip_reshape", False)
                or kwargs.get("skip_output_reshape", False) or q.dim() != 4 or base.dim() != 3):
            return base
        n_img = self.grid[0] * self.grid[1]
        if start + n_img > q.shape[2]:
            return base
        rows, _, mask_index = self.call.on(q.device)
        region = self.run.grid_mask("target", self.grid, q.device)[mask_index]  # [R, N]
        effective = entry.k.shape[2] > 0 and bool(region.any())
        self.run.note_layer(effective)
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
        capture, positions = None, None
        if self.patch.trace is not None:  # Leffa flow view connected: the core records (docs/method.md §4)
            capture = self.patch.trace.capture_for(layer=key, step=self.call.step, sigma=self.call.sigma,
                                                   query_hw=self.grid, ref_hw=self.patch.ref_grid)
            positions = self.patch.garment_index(q.device) if capture is not None else None
        mixed = joint_extended_attention(sub(q), sub(k), sub(v), k_ref, v_ref, region, start, sub(base),
                                         self.patch.contrast, ref_count=self.patch.ref_tokens, capture=capture,
                                         ref_positions=positions)
        self.patch.mea_calls += 1
        return mixed if full else base.index_copy(0, rows, mixed)


class FluxMeaPatch(MeaPatch):
    """One MEA node's patch on a Flux-family model (docs/method.md §3c).

    Args: as :class:`~.mea_patch.MeaPatch`, without ``layers``/``attn1_keys``, plus ``blocks``: the selected
    ``("double" | "single", index)`` blocks (``attention/dit.py: parse_flux_blocks``). The reference latent
    is [1, 16, h, w] (``process_latent_in``-scaled). ``trace``: the flow view's recorder, as on the UNet;
    each MEA block call records one :class:`~max4zero.attention.flow.FlowRecord` labelled with its block key
    (``("double", i)`` / ``("single", j)``), query grid = the target's token grid, reference grid = the
    reference's token grid.
    """

    #: the node input the no-op report names when no selected layer was reached
    layer_input = "flux_blocks"

    def __init__(self, *, blocks: frozenset, **kwargs: Any) -> None:
        kwargs.setdefault("trace", None)
        super().__init__(layers=FLUX_SELECTION, attn1_keys=[], **kwargs)
        self.blocks = frozenset(blocks)
        self.inline_reference = False
        self.ref_grid = flux_token_grid(self.ref_latent.shape[-2:])
        self.ref_tokens = self.ref_grid[0] * self.ref_grid[1]
        self._garment_index: dict[str, torch.Tensor] = {}
        self._ref_pe: dict[tuple, torch.Tensor] = {}

    def install(self, patcher: Any) -> Any:
        """Wrappers, and the post-CFG function in paper mode WITHOUT keeping the negative pass at cfg 1."""
        from comfy.patcher_extension import WrappersMP

        patcher.add_wrapper_with_key(WrappersMP.OUTER_SAMPLE, "max4zero_mea", self.outer_sample_wrapper)
        patcher.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "max4zero_mea", self.apply_model_wrapper)
        if self.mode == "paper" and self.active:
            patcher.set_model_sampler_post_cfg_function(self.post_cfg_function)
        return patcher

    # -- reference tokens ------------------------------------------------------------------------

    def garment_index(self, device: Any) -> torch.Tensor:
        """Indices of the garment tokens on the reference's token grid (row-major), on ``device``."""
        key = str(device)
        if key not in self._garment_index:
            from ..attention.policy import token_mask

            m = token_mask(self.garment_mask, self.ref_grid)[0]
            self._garment_index[key] = m.nonzero().flatten().to(device)
        return self._garment_index[key]

    def reference_pe(self, diffusion_model: Any, device: Any) -> torch.Tensor:
        """RoPE of the garment tokens at the reference positions (``reference_token_ids``), model's embedder."""
        key = (id(diffusion_model), str(device))
        if key not in self._ref_pe:
            n_axes = len(diffusion_model.params.axes_dim)
            ids = reference_token_ids(self.ref_grid, n_axes).index_select(1, self.garment_index("cpu"))
            self._ref_pe[key] = diffusion_model.pe_embedder(ids.to(device))
        return self._ref_pe[key]

    # -- the wrapper -----------------------------------------------------------------------------

    def apply_model_wrapper(self, executor: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Reference pass + MEA for calls that need it; every other call passes through untouched."""
        found = self.mea_call(executor, args, kwargs)
        if found is None:
            return executor(*args, **kwargs)
        named, extra, run, call, _ = found
        base_model, to, x, t = executor.class_obj, named["transformer_options"], named["x"], named["t"]
        store = run.stored(call.sigma, call.step)  # same sigma, or within reference_every steps: no reference pass
        if store is None:
            store = self._reference(executor, base_model, run, named, extra, call)
        dm = base_model.diffusion_model
        hooks = FluxAttention(self, run, "use", store, call, flux_token_grid(x.shape[-2:]),
                              lambda device: self.reference_pe(dm, device), to.get("optimized_attention_override"))
        use_to = self.with_hooks(to, hooks)
        return executor(x, t, named["c_concat"], named["c_crossattn"], named["control"], use_to, **extra)

    def with_hooks(self, to: dict, hooks: FluxAttention) -> dict:
        """A copy of ``to`` with the attn1 patch appended (others kept, in order) and, in ``use`` mode, the
        override (wrapping any previous one). Nothing is mutated."""
        new_to = dict(to)
        patches = dict(to.get("patches", {}))
        patches["attn1_patch"] = list(patches.get("attn1_patch", [])) + [hooks.attn1_patch]
        new_to["patches"] = patches
        if hooks.mode == "use":
            new_to["optimized_attention_override"] = hooks.override
        return new_to

    def _reference(self, executor: Any, base_model: Any, run: MeaRun, named: dict, extra: dict,
                   call: CallRows) -> dict:
        """Separate reference pass (batch 1, inputs from the call's first MEA row) recording the garment tokens'
        K/V of the selected blocks; kept in the run with the call's sigma and step."""
        x, t = named["x"], named["t"]
        row, n = call.rows[0], call.n_rows
        lat = self.ref_latent.to(device=x.device, dtype=x.dtype)
        noise = self.ref_noise.to(device=x.device, dtype=x.dtype)
        t_ref = t[row : row + 1] if t.dim() > 0 and t.shape[0] == n else t.reshape(-1)[:1]
        x_ref = base_model.model_sampling.noise_scaling(t_ref.to(x.dtype), noise, lat)
        concat_ref = flux_reference_concat(base_model, lat)
        ctx_ref = reference_context(self.ref_context, slice_row(named["c_crossattn"], n, row))
        extra_ref = {k: slice_row(v, n, row) for k, v in extra.items() if k not in _NOT_FOR_REFERENCE}
        store: dict[tuple, Any] = {}
        to = dict(named["transformer_options"])
        to.pop(MEA_PASS_KEY, None)
        to["cond_or_uncond"] = [0]
        to["uuids"] = [self.ref_uuid]
        to["sigmas"] = t_ref
        ref_to = self.with_hooks(to, FluxAttention(self, run, "record", store))
        executor(x_ref, t_ref, concat_ref, ctx_ref, None, ref_to, **extra_ref)
        self.reference_passes += 1
        run.keep(store, call.sigma, call.step)
        return store
