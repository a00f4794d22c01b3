"""Masked Extended Attention on Qwen-Image and Qwen-Image-Edit as a ComfyUI model patch (docs/method.md §3d).

The third adapter over the same core, and a thin subclass of the Flux one (:mod:`.mea_flux`): ComfyUI 0.33's
``comfy/ldm/qwen_image/model.py`` has the same two hooks as its Flux blocks. Every ``transformer_blocks`` entry (all
joint, double-stream blocks, labelled ``("double", i)`` like Flux's) calls the ``attn1_patch`` entries with the
joint text-first q, k, v before RoPE and ``img_slice``, and its attention honours ``optimized_attention_override``.
What differs, and is handled here or in the core:

* **The attention mask.** Qwen-Image passes its text padding mask to the attention positionally, as an additive
  [B, 1, L] bias (0 = attend, −finfo.max = padding). The override recomputes the region's rows over the keys that
  mask lets through (``attention/dit.py: key_keep_from_bias``, ``joint_extended_attention(key_keep=)``); a soft
  mask is refused.
* **The latent.** Wan 2.1's latent [B, 16, 1, h, w] (one frame), packed in 2×2 patches: the token grid is
  ⌈h/2⌉ × ⌈w/2⌉, 1/16 of the image as on FLUX.1.
* **RoPE** (3 axes, 16/56/56): image ids centred (row − h//2, col − w//2) at index 0, a reference latent's at index
  k (``index``: 1, 2, …), the text's from max(h, w)//2 on every axis. The garment keys are placed as Qwen-Image-Edit
  places a reference latent of its own: centred on the reference's grid, one index after the call's reference
  latents (``attention/dit.py: reference_rope_index`` with step 1, :attr:`QwenMeaPatch.centred_ids`).
* **Guidance.** Qwen-Image is not distilled (real CFG, cfg 2.5–4): the core's cfg-1 rule keeps the negative pass
  at cfg 1, as on a UNet.

The reference pass is the one core pass (``attention/reference.py``): the node's own prompt (through the model's
``extra_conds``), no reference latents, no attention mask, no ControlNet. What that means for Qwen-Image-Edit is in
docs/method.md §3d.
"""

from __future__ import annotations

import inspect
from typing import Any, Optional

from .convert import NodeInputError
from .mea_flux import FluxMeaPatch

__all__ = ["QwenMeaPatch", "is_qwen_image", "qwen_hook_problem"]


def is_qwen_image(diffusion_model: Any) -> bool:
    """Whether ComfyUI's diffusion model is Qwen-Image's (``QwenImageTransformer2DModel``, Edit included)."""
    try:
        from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel
    except ImportError:
        return False
    return isinstance(diffusion_model, QwenImageTransformer2DModel)


def qwen_hook_problem() -> Optional[str]:
    """None when this ComfyUI's Qwen-Image attention offers the hooks the adapter needs, else what is missing
    (the capability, not a version: ``attn1_patch`` in the attention and ``optimized_attention_override``)."""
    from comfy.ldm.qwen_image import model as qwen
    import comfy.ldm.modules.attention as attention

    try:
        source = inspect.getsource(qwen.Attention.forward)
    except (OSError, TypeError):
        source = ""
    if "attn1_patch" not in source or "img_slice" not in source:
        return ("this ComfyUI's Qwen-Image attention has no attention patch hook ('attn1_patch'), which Masked "
                "Extended Attention on Qwen-Image needs")
    try:
        source = inspect.getsource(attention)
    except (OSError, TypeError):
        source = ""
    if "optimized_attention_override" not in source:
        return "this ComfyUI's attention has no 'optimized_attention_override' hook, which MEA on Qwen-Image needs"
    return None


class QwenMeaPatch(FluxMeaPatch):
    """One MEA node's patch on a Qwen-Image(-Edit) model (docs/method.md §3d): :class:`~.mea_flux.FluxMeaPatch`
    with Qwen-Image's attention mask, centred RoPE ids and real CFG. Args as the Flux patch (``blocks`` are
    ``("double", i)``; ``ref_method`` the model's ``default_ref_method``, ``ref_index_scale`` 1)."""

    distilled = False
    reads_key_mask = True
    centred_ids = True

    def reference_options(self, to: dict) -> dict:
        """The reference pass's options (the Flux adapter's), refusing a blockwise model patch (``patches
        ["double_block"]``: the DiffSynth / inpaint ControlNet model patches): it would add the target's hint to the
        reference pass, which must describe the garment only."""
        if (to.get("patches") or {}).get("double_block"):
            raise NodeInputError(self.label, "a blockwise model patch (a Qwen-Image ControlNet or inpaint model patch) "
                                 "is applied to this model, and it would add the target's hint to the garment's "
                                 "reference pass", "inpaint with a noise mask (Set Latent Noise Mask, or Double-Mask "
                                 "Inpaint's latent) instead, or apply the model patch after this node's sampler")
        return super().reference_options(to)

    def concat_parts(self, base_model: Any, c_concat: Any) -> Optional[tuple]:
        if c_concat is not None:  # Qwen-Image takes no extra channels; something else put them there
            raise NodeInputError(self.label, "this Qwen-Image call carries extra input channels the reference pass "
                                 "cannot build", "inpaint with a noise mask (Set Latent Noise Mask) or the "
                                 "blockwise inpaint ControlNet, not a channel-concat model patch")
        return None
