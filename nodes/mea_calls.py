"""How the MEA patch talks to ComfyUI: model-call arguments, batch rows, the reference's inputs, plain attention.

ComfyUI plumbing only — no method policy (that is ``attention/policy.py``). Each function states the
ComfyUI layout it expects; the ComfyUI import (``comfy.ldm.modules.attention``, ``comfy.model_management``)
happens inside the two functions that need it, so the rest is tested without ComfyUI.
"""

from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import torch

__all__ = [
    "MEA_PASS_KEY",
    "REFERENCE_PASS_KEY",
    "RUN_KEY_PREFIX",
    "attn1_slots",
    "is_unet",
    "bind_apply_model_args",
    "pad_control",
    "plain_attention",
    "trace_consumers",
    "latent_output_key",
]

#: transformer_options key that marks the paper mode's extra MEA pass (value: the patch's id).
MEA_PASS_KEY = "max4zero_mea_pass"
#: transformer_options key that marks a reference pass (value: the id of the patch that runs it): every other
#: MEA patch of a chain leaves such a call, and its attention, untouched.
REFERENCE_PASS_KEY = "max4zero_reference_pass"
#: transformer_options key prefix of a patch's per-run state (``MeaPatch.run_key``).
RUN_KEY_PREFIX = "max4zero_mea_run:"


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




def pad_control(control: Any, n_rows: int) -> Any:
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



def plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
    """Exactly what ``CrossAttention.forward`` computes between the projections and ``to_out``."""
    from comfy.ldm.modules import attention as comfy_attention

    return comfy_attention.optimized_attention(
        q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"), transformer_options=extra
    )


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

