"""Masked Extended Attention (docs/method.md §3b) as a diffusers attention processor.

This is the only module of the pack that imports diffusers (the optional ``diffusers`` extra);
ComfyUI never imports it. The science lives in ``attention/`` (the policy, Masked Extended Attention, the flow); this file only routes a
diffusers ``Attention`` layer's projections into it.

Usage (paper layout, reference and target denoised in one batch)::

    handle = install_masked_extended_attention(unet, garment_mask, target_mask, contrast=1.25)
    eps = unet(torch.cat([ref_latents, tgt_latents]), t, torch.cat([ref_emb, tgt_emb])).sample
    handle.remove()

or with a separate reference pass (``mode="recorded"``)::

    handle = install_masked_extended_attention(unet, garment_mask, target_mask, mode="recorded")
    with handle.recording():
        unet(ref_latents, t, ref_emb)          # stores K, V of every selected layer
    eps = unet(tgt_latents, t, tgt_emb).sample  # target reads the stored K, V

The stored K, V stay until the next recording, so how often to record is the caller's loop: recording only
every N-th step and reusing them in between is what the ComfyUI node's ``reference_every`` does (the rule is
``attention/policy.py: reuse_reference``), an approximation of the paper, which records at every step.

Which layers
    Candidates are chosen by processor name (``layers``: ``"decoder"`` = self-attention under
    ``up_blocks``, the paper's choice; ``"all"``; or names/prefixes). Among candidates, a layer
    applies MEA only if its token grid is one of ``scales`` (latent downsampling factors; default
    ``(1, 2)`` = latent/1 and latent/2 = image/8 and image/16 with SD's 8x VAE, i.e. 64² and 32²
    tokens at 512 px). Selecting by grid instead of by block index makes the same default right
    for SD1.5, SD2 and SDXL (whose up_blocks.0 runs at latent/4).

Token grid of a layer
    A self-attention layer only sees ``T`` tokens. With the latent size ``(H, W)`` known (given,
    or read from the UNet input by a forward pre-hook), the grid at downsampling ``2^k`` is
    ``(h_k, w_k)`` with ``h_{k+1} = ceil(h_k / 2)`` — what diffusers' stride-2 conv downsampler
    produces, odd sizes included. The layer's grid is the unique ``k`` with ``h_k · w_k = T``
    (:func:`token_grid`); this keeps non-square latents right (row-major tokens, ``h`` rows).

Masks
    Given at any resolution (image or latent), ``[H, W]``, ``[B, H, W]`` or ``[B, 1, H, W]``, bool or
    float (> 0.5 = on); resized to each layer's grid by nearest neighbour
    (:func:`~max4zero.attention.policy.token_mask`) once per grid and cached. ``ref_key_mask`` is the
    (eroded) garment mask on the reference, ``query_mask`` the target (try-on) mask. Batch size 1
    broadcasts over the pairs; otherwise it must equal the number of target rows.

What runs where
    - MEA path: projections exactly as ``AttnProcessor2_0`` (group norm, q/k/v, optional q/k norm),
      then reference rows: plain self-attention (``scaled_dot_product_attention``; the reference
      branch is unchanged) and target rows: :func:`~max4zero.attention.masked_extended.masked_extended_attention`,
      then ``to_out``, residual and rescale exactly as ``AttnProcessor2_0``.
    - Everything else (cross-attention, layers whose grid is not selected, ``handle.enabled``
      False): the layer's previous processor, called with the same arguments (``AttnProcessor2_0``
      for a stock UNet), so those layers are untouched bit for bit.
    - Layers that are not candidates keep their processor object (not even wrapped).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

try:
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "max4zero.adapters.diffusers_processor needs diffusers: install the optional extra "
        "(pip install 'max4zero-tryon[diffusers]' or pip install 'diffusers>=0.27'). "
        "ComfyUI users do not need this module."
    ) from exc

from ..tensors.masks import binary_mask
from ..attention.masked_extended import masked_extended_attention
from ..attention.policy import DEFAULT_LAYERS, LAYER_CHOICES, LayerSelection, check_contrast, grid_level, token_grid
from ..attention.run import TokenMasks
from ..tensors.shapes import as_hw, batch_problem

__all__ = [
    "DIFFUSERS_PARTS",
    "layer_selection",
    "MaskedExtendedAttnProcessor",
    "MaskedExtendedAttentionHandle",
    "install_masked_extended_attention",
    "token_grid",
]

#: The node's default layer choice as this adapter's grid factors (2**level): (1, 2) = latent/1 and latent/2.
DEFAULT_SCALES = tuple(sorted(2 ** level for level in LAYER_CHOICES[DEFAULT_LAYERS].levels))
#: Where the policy's UNet parts (``attention/policy.py: LayerSelection.parts``) live in a diffusers UNet.
DIFFUSERS_PARTS = {"input": "down_blocks.", "middle": "mid_block.", "output": "up_blocks."}
_MODES = ("batch", "recorded")
_LAYOUTS = ("halves", "interleaved")


def _mask_bool(mask: torch.Tensor | None, name: str) -> torch.Tensor | None:
    """Bool ``[B, 1, H, W]`` (or None), through the pack's one mask normaliser (``tensors/masks.py: binary_mask``):
    the layouts, NaN and soft masks are refused with a message that says what to do."""
    if mask is None:
        return None
    return binary_mask(mask, name)


def _plain_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain multi-head self-attention, ``[B, T, heads·d]`` in and out.

    Same reshapes and the same ``scaled_dot_product_attention`` call as ``AttnProcessor2_0``, so the
    reference rows come out bit-identical to the unpatched layer.
    """
    b = q.shape[0]
    d = k.shape[-1] // heads
    qh = q.view(b, -1, heads, d).transpose(1, 2)
    kh = k.view(b, -1, heads, d).transpose(1, 2)
    vh = v.view(b, -1, heads, d).transpose(1, 2)
    out = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=None, dropout_p=0.0, is_causal=False)
    return out.transpose(1, 2).reshape(b, -1, heads * d).to(q.dtype)


def _head_norm(norm: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, heads: int) -> torch.Tensor:
    """Apply a per-head norm (``attn.norm_q``/``norm_k``, defined on ``[B, heads, T, d]``) to ``[B, T, heads·d]``."""
    b, t, c = x.shape
    xh = norm(x.view(b, t, heads, c // heads).transpose(1, 2))
    return xh.transpose(1, 2).reshape(b, t, c)


class MaskedExtendedAttentionHandle:
    """Settings and state shared by the processors of one UNet; returned by :func:`install_masked_extended_attention`.

    Attributes that may be changed between UNet calls:
        enabled: ``False`` makes every layer run its previous processor (e.g. the unconditional
            branch of three-branch guidance, docs/method.md §3b).
        contrast: attention contrast (1.0 = off, paper 1.25).
        layout: batch-mode row order, ``"halves"`` or ``"interleaved"``.
        capture: recorder passed to ``masked_extended_attention`` (None = no capture). In batch
            mode its records hold the target rows only (batch = number of pairs).
        phase: ``"record"`` or ``"use"`` (recorded mode only); see :meth:`recording`.
        latent_hw: ``(H, W)`` of the latent; updated from every UNet input when installed with
            ``latent_hw=None``.
        step: step label for the capture records (None = automatic: index of the UNet call since
            installation, reference recordings not counted; set it when one sampling step makes
            several UNet calls, e.g. three-branch guidance).

    Read-only:
        processors: ``{processor name: MaskedExtendedAttnProcessor}`` for the candidate layers.
        mea_calls: ``{processor name: number of MEA calls}``; layers that ran MEA at least once.
        unet_calls: UNet forwards seen since installation (reference recordings not counted).
        recorded: ``{processor name: (K, V, (h, w))}`` from the last reference pass (recorded mode;
            K, V ``[B_ref, T_ref, heads·d]``, detached). May be inspected or replaced.
    """

    def __init__(
        self,
        ref_key_mask: torch.Tensor | None,
        query_mask: torch.Tensor | None,
        contrast: float = 1.0,
        scales: Sequence[int] | None = DEFAULT_SCALES,
        mode: str = "batch",
        layout: str = "halves",
        capture: Any = None,
        latent_hw: Sequence[int] | None = None,
    ) -> None:
        if mode not in _MODES:
            raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
        self.mode = mode
        self.layout = layout
        self.contrast = contrast
        self.scales = _check_scales(scales)
        #: the grid levels that run MEA (``attention/policy.py: grid_level``; level = log2 of the scale), None = all
        self.levels = None if self.scales is None else frozenset(s.bit_length() - 1 for s in self.scales)
        self.capture = capture
        self.enabled = True
        self.phase = "use"
        self.step: int | None = None
        self.unet_calls = 0
        self._fixed_hw = latent_hw is not None
        self.latent_hw: tuple[int, int] | None = as_hw(latent_hw, "latent_hw", square_ok=False) if latent_hw is not None else None
        self.set_masks(ref_key_mask, query_mask)
        self.processors: dict[str, MaskedExtendedAttnProcessor] = {}
        self.mea_calls: dict[str, int] = {}
        # Recorded mode: name -> (K, V, (h, w)) of the last reference pass.
        self.recorded: dict[str, tuple[torch.Tensor, torch.Tensor, tuple[int, int]]] = {}
        self._unet: torch.nn.Module | None = None
        self._previous: dict[str, Any] = {}
        self._hook: Any = None

    @property
    def contrast(self) -> float:
        return self._contrast

    @contrast.setter
    def contrast(self, value: float) -> None:
        self._contrast = check_contrast(value)

    @property
    def layout(self) -> str:
        return self._layout

    @layout.setter
    def layout(self, value: str) -> None:
        if value not in _LAYOUTS:
            raise ValueError(f"layout must be one of {_LAYOUTS} (batch mode row order), got {value!r}")
        self._layout = value

    # ---- masks -------------------------------------------------------------------------------
    def set_masks(self, ref_key_mask: torch.Tensor | None, query_mask: torch.Tensor | None) -> None:
        """Replace the masks (any resolution; None = all on). Clears the per-grid cache."""
        self._ref_mask = _mask_bool(ref_key_mask, "ref_key_mask")
        self._query_mask = _mask_bool(query_mask, "query_mask")
        # the same per-grid cache as the ComfyUI patch (``attention/run.py: TokenMasks``)
        self._token_masks = {which: None if m is None else TokenMasks(m[:, 0])
                             for which, m in (("ref", self._ref_mask), ("query", self._query_mask))}

    def _grid_mask(self, which: str, hw: tuple[int, int], tokens: int, device: torch.device) -> torch.Tensor:
        """``[B or 1, h·w]`` bool mask at a token grid, cached (masks are static during sampling)."""
        masks = self._token_masks[which]
        if masks is None:
            return torch.ones(1, tokens, dtype=torch.bool, device=device)
        return masks.at(hw, device)

    # ---- recorded mode -----------------------------------------------------------------------
    @contextlib.contextmanager
    def recording(self) -> Iterator[MaskedExtendedAttentionHandle]:
        """Within the block, UNet calls are reference passes: selected layers store their K, V
        (and run plain self-attention); afterwards calls read them. Recorded mode only."""
        if self.mode != "recorded":
            raise ValueError("recording() is for mode='recorded'; in mode='batch' put the reference rows in the batch")
        before = self.phase
        self.phase = "record"
        try:
            yield self
        finally:
            self.phase = before if before != "record" else "use"

    def clear_recorded(self) -> None:
        """Forget the stored reference K, V (frees their memory)."""
        self.recorded.clear()

    # ---- lifecycle ---------------------------------------------------------------------------
    def remove(self) -> None:
        """Put back the exact processor objects the layers had before; remove the hook. Idempotent.

        A layer whose processor was replaced by someone else since installation is left alone.
        """
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        unet = self._unet
        if unet is None:
            return
        current = unet.attn_processors
        restore = dict(current)
        for name, prev in self._previous.items():
            if current.get(name) is self.processors.get(name):
                restore[name] = prev
        unet.set_attn_processor(restore)
        self._unet = None
        self.recorded.clear()

    @property
    def current_step(self) -> int | None:
        """Step label given to the capture: ``step`` if set, else the index of the current UNet call
        (reference recordings not counted); None before the first call."""
        if self.step is not None:
            return self.step
        return self.unet_calls - 1 if self.unet_calls else None

    def _pre_hook(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        if not self._fixed_hw:
            sample = args[0] if args else kwargs.get("sample")
            if isinstance(sample, torch.Tensor) and sample.ndim >= 3:
                self.latent_hw = (int(sample.shape[-2]), int(sample.shape[-1]))
        if not (self.mode == "recorded" and self.phase == "record"):
            self.unet_calls += 1


def _check_scales(scales: Sequence[int] | None) -> frozenset[int] | None:
    if scales is None:
        return None
    out = set()
    for s in scales:
        if isinstance(s, bool) or not isinstance(s, int) or s < 1 or s & (s - 1):
            raise ValueError(
                f"scales are latent downsampling factors (powers of two: 1 = latent grid, 2 = half, ...), got {scales!r}"
            )
        out.add(s)
    return frozenset(out)


class MaskedExtendedAttnProcessor:
    """diffusers attention processor: MEA in a selected self-attention layer, previous behaviour elsewhere.

    Args:
        handle: shared settings/state (:class:`MaskedExtendedAttentionHandle`).
        name: the processor's name in ``unet.attn_processors`` (key of the recorded K, V, and what
            the capture is told).
        fallback: processor for everything that is not MEA (default ``AttnProcessor2_0()``).

    Batch layouts in ``mode="batch"`` (batch size ``B`` must be even, ``n = B / 2`` pairs):
        ``"halves"`` (default): rows ``0..n-1`` are references, row ``n + i`` is the target paired
        with reference ``i`` — e.g. ``[ref_uncond, ref_cond, tgt_uncond, tgt_cond]`` under CFG.
        ``"interleaved"``: even rows references, odd row ``2i+1`` the target of reference ``2i``.
    In ``mode="recorded"`` every row is a target; stored reference K, V with batch 1 broadcast,
    otherwise their batch must equal the target batch (row ``i`` reads reference ``i``).
    """

    def __init__(self, handle: MaskedExtendedAttentionHandle, name: str, fallback: Any = None) -> None:
        self.handle = handle
        self.name = name
        self.fallback = fallback if fallback is not None else AttnProcessor2_0()

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        *args: Any,
        **kwargs: Any,
    ) -> torch.Tensor:
        hs = self.handle
        hw = self._selected_grid(attn, hidden_states, encoder_hidden_states)
        if hw is None:
            return self.fallback(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        if attention_mask is not None:
            raise ValueError(
                f"{self.name}: Masked Extended Attention does not take a self-attention attention_mask; "
                "call the UNet without one (SD pipelines never pass one to attn1) or remove the processor"
            )

        residual = hidden_states
        if getattr(attn, "spatial_norm", None) is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            batch, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch, channel, height * width).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        heads = attn.heads
        # getattr: older diffusers (the extra allows >= 0.27) may lack q/k norms
        norm_q, norm_k = getattr(attn, "norm_q", None), getattr(attn, "norm_k", None)
        if norm_q is not None:
            q = _head_norm(norm_q, q, heads)
        if norm_k is not None:
            k = _head_norm(norm_k, k, heads)

        if hs.mode == "batch":
            out = self._batch(q, k, v, heads, hw)
        elif hs.phase == "record":
            hs.recorded[self.name] = (k.detach(), v.detach(), hw)
            out = _plain_attention(q, k, v, heads)
        else:
            out = self._use_recorded(q, k, v, heads, hw)

        out = attn.to_out[0](out)
        out = attn.to_out[1](out)
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(batch, channel, height, width)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    # -------------------------------------------------------------------------------------------
    def _selected_grid(
        self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None
    ) -> tuple[int, int] | None:
        """The layer's token grid if this call runs MEA, else None (→ fallback)."""
        hs = self.handle
        if not hs.enabled or encoder_hidden_states is not None or attn.is_cross_attention:
            return None
        if hidden_states.ndim == 4:
            h, w = hidden_states.shape[-2:]
            level = 0 if hs.latent_hw is None else grid_level(hs.latent_hw, (h, w))
        else:
            if hs.latent_hw is None:
                raise ValueError(
                    f"{self.name}: the latent size is unknown, so the token grid of {hidden_states.shape[1]} tokens "
                    "cannot be found: install with install_masked_extended_attention (it reads the size from the "
                    "UNet input) or pass latent_hw=(H, W)"
                )
            h, w, factor = token_grid(hidden_states.shape[1], hs.latent_hw)
            level = factor.bit_length() - 1
        if hs.levels is not None and level not in hs.levels:
            return None
        return h, w

    def _masks(
        self, hw_tgt: tuple[int, int], hw_ref: tuple[int, int], n_tgt: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        hs = self.handle
        ref_mask = hs._grid_mask("ref", hw_ref, hw_ref[0] * hw_ref[1], device)
        query_mask = hs._grid_mask("query", hw_tgt, hw_tgt[0] * hw_tgt[1], device)
        for label, m in (("ref_key_mask", ref_mask), ("query_mask", query_mask)):
            problem = batch_problem({label: m.shape[0], "the target": n_tgt}, fixed="the target")
            if problem:
                raise ValueError(f"{problem[0]}: give one mask (batch 1, shared) or one per target row")
        return ref_mask, query_mask

    def _mea(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_ref: torch.Tensor,
        v_ref: torch.Tensor,
        heads: int,
        hw_tgt: tuple[int, int],
        hw_ref: tuple[int, int],
    ) -> torch.Tensor:
        hs = self.handle
        ref_mask, query_mask = self._masks(hw_tgt, hw_ref, q.shape[0], q.device)
        capture = hs.capture
        if capture is not None:
            capture = _tell_capture(capture, self.name, hw_tgt, hw_ref, hs.current_step)
        hs.mea_calls[self.name] = hs.mea_calls.get(self.name, 0) + 1
        return masked_extended_attention(
            q, k, v, k_ref, v_ref, ref_mask, query_mask, heads, contrast=hs.contrast, capture=capture
        )

    def _batch(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, hw: tuple[int, int]
    ) -> torch.Tensor:
        b = q.shape[0]
        if b % 2:
            raise ValueError(
                f"{self.name}: mode='batch' needs reference and target rows in pairs (even batch), got batch {b}: "
                "concatenate [references; targets] (layout='halves') or use mode='recorded'"
            )
        n = b // 2
        if self.handle.layout == "halves":
            ref, tgt = slice(0, n), slice(n, b)
        else:
            ref, tgt = slice(0, b, 2), slice(1, b, 2)
        k_ref, v_ref = k[ref], v[ref]
        out_ref = _plain_attention(q[ref], k_ref, v_ref, heads)
        out_tgt = self._mea(q[tgt], k[tgt], v[tgt], k_ref, v_ref, heads, hw, hw)
        if self.handle.layout == "halves":
            return torch.cat([out_ref, out_tgt], dim=0)
        return torch.stack([out_ref, out_tgt], dim=1).reshape(b, *out_ref.shape[1:])

    def _use_recorded(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, hw: tuple[int, int]
    ) -> torch.Tensor:
        stored = self.handle.recorded.get(self.name)
        if stored is None:
            raise ValueError(
                f"{self.name}: no reference keys/values recorded for this layer: run the reference through the "
                "UNet inside `with handle.recording():` first (same resolution scales, same selected layers)"
            )
        k_ref, v_ref, hw_ref = stored
        if k_ref.shape[0] not in (1, q.shape[0]):
            raise ValueError(
                f"{self.name}: the reference pass had batch {k_ref.shape[0]} but the target batch is {q.shape[0]}: "
                "record the reference with batch 1 (shared) or with one row per target row"
            )
        if k_ref.shape[-1] != k.shape[-1]:
            raise ValueError(f"{self.name}: recorded keys have width {k_ref.shape[-1]}, layer has {k.shape[-1]}: re-record")
        return self._mea(q, k, v, k_ref.to(k.dtype), v_ref.to(v.dtype), heads, hw, hw_ref)


def _tell_capture(capture: Any, name: str, hw_tgt: tuple[int, int], hw_ref: tuple[int, int], step: int | None) -> Any:
    """Give the recorder this call's context; returns the capture to use, or None when its filters skip it.

    :class:`.flow.AttentionCapture` gets ``set_context(ref_hw, query_hw, layer=name, step)``; any
    other recorder (``CaptureProtocol``) gets the ``ref_hw`` and ``query_hw`` attributes.
    """
    if hasattr(capture, "set_context"):
        capture.set_context(ref_hw=hw_ref, query_hw=hw_tgt, layer=name, step=step)
    else:
        capture.ref_hw = hw_ref
        capture.query_hw = hw_tgt
    wanted = getattr(capture, "wanted", None)
    if callable(wanted) and not wanted():
        return None
    return capture


def layer_selection(layers: str | LayerSelection | Sequence[str], scales: Sequence[int] | None) -> tuple[Any, Any]:
    """``(parts or names, scales)`` of an ``install_masked_extended_attention`` call in the policy's terms.

    A :class:`~max4zero.attention.policy.LayerSelection` or one of the MEA node's ``layers`` labels
    (``attention/policy.py: LAYER_CHOICES``) chooses UNet parts and grid levels, exactly as on the ComfyUI node (its
    levels replace ``scales``). ``"decoder"`` is the parts ``{"output"}`` at ``scales``; ``"all"`` every part; anything
    else is processor names or prefixes.
    """
    if isinstance(layers, str) and layers in LAYER_CHOICES:
        layers = LAYER_CHOICES[layers]
    if isinstance(layers, LayerSelection):
        return frozenset(layers.parts), tuple(sorted(2 ** level for level in layers.levels))
    if isinstance(layers, str) and layers == "decoder":
        return frozenset({"output"}), scales
    if isinstance(layers, str) and layers == "all":
        return frozenset(DIFFUSERS_PARTS), scales
    return layers, scales


def _candidate_names(unet: torch.nn.Module, layers: str | Sequence[str] | frozenset) -> list[str]:
    """Processor names of the self-attention layers selected by ``layers`` (UNet parts, or names/prefixes)."""
    modules = dict(unet.named_modules())
    self_attn = []
    for pname in unet.attn_processors:
        mod = modules.get(pname[: -len(".processor")])
        if isinstance(mod, Attention) and not mod.is_cross_attention:
            self_attn.append(pname)
    if isinstance(layers, frozenset):  # the policy's UNet parts
        prefixes = tuple(DIFFUSERS_PARTS[p] for p in layers)
        return [n for n in self_attn if n.startswith(prefixes)]
    if isinstance(layers, str):
        layers = [layers]
    chosen: list[str] = []
    for want in layers:
        hits = [n for n in self_attn if n == want or n.startswith(want.rstrip(".") + ".")]
        if not hits:
            raise ValueError(
                f"layers entry {want!r} matches no self-attention layer; use 'decoder', 'all', or names/prefixes "
                f"such as {self_attn[:2]} (see unet.attn_processors; cross-attention layers cannot take MEA)"
            )
        chosen.extend(h for h in hits if h not in chosen)
    return chosen


def install_masked_extended_attention(
    unet: torch.nn.Module,
    ref_key_mask: torch.Tensor | None,
    query_mask: torch.Tensor | None,
    contrast: float = 1.25,
    layers: str | LayerSelection | Sequence[str] = "decoder",
    scales: Sequence[int] | None = DEFAULT_SCALES,
    mode: str = "batch",
    layout: str = "halves",
    capture: Any = None,
    latent_hw: Sequence[int] | None = None,
) -> MaskedExtendedAttentionHandle:
    """Patch a diffusers UNet (``UNet2DConditionModel`` or anything with ``attn_processors``/``set_attn_processor``).

    Args:
        unet: the model; its candidate self-attention layers get a :class:`MaskedExtendedAttnProcessor`.
        ref_key_mask: garment mask on the reference (True = token the target may read), any resolution,
            ``[H, W]``/``[B, H, W]``/``[B, 1, H, W]``; None = whole reference.
        query_mask: target (try-on) region, same layouts; None = whole target.
        contrast: attention contrast on the reference half (1.0 = off; paper 1.25).
        layers: ``"decoder"`` (self-attention under ``up_blocks``, paper), ``"all"``, one of the MEA node's
            ``layers`` labels or a :class:`~max4zero.attention.policy.LayerSelection` (parts and grids, as on the
            node; its grids replace ``scales``), or processor names / name prefixes (``"up_blocks.1"``).
        scales: latent downsampling factors whose grids run MEA (``(1, 2)`` = paper's 1/8 and 1/16 of
            the image); None = every grid of the candidate layers.
        mode: ``"batch"`` (references in the batch, see ``layout``) or ``"recorded"`` (reference
            K, V from a pass run inside ``handle.recording()``).
        layout: ``"halves"`` or ``"interleaved"`` (batch mode; see :class:`MaskedExtendedAttnProcessor`).
        capture: recorder forwarded to ``masked_extended_attention`` on every MEA call
            (e.g. :class:`.flow.AttentionCapture`); before each call it gets the context
            ``ref_hw``, ``query_hw``, ``layer`` (processor name) and ``step`` (see ``handle.step``),
            and a call its ``wanted()`` filters reject runs without capture.
        latent_hw: latent ``(H, W)``; None = read from each UNet call's ``sample`` by a forward pre-hook.

    Returns:
        The handle; ``handle.remove()`` restores the previous processors (the same objects).
    """
    if not hasattr(unet, "attn_processors") or not hasattr(unet, "set_attn_processor"):
        raise ValueError("unet must be a diffusers model with attn_processors/set_attn_processor (e.g. UNet2DConditionModel)")
    chosen, scales = layer_selection(layers, scales)
    handle = MaskedExtendedAttentionHandle(
        ref_key_mask, query_mask, contrast=contrast, scales=scales, mode=mode, layout=layout,
        capture=capture, latent_hw=latent_hw,
    )
    names = _candidate_names(unet, chosen)
    if not names:
        raise ValueError(f"layers={layers!r} selects no self-attention layer in this model: use 'all' or explicit names")
    current = unet.attn_processors
    new = dict(current)
    for name in names:
        proc = MaskedExtendedAttnProcessor(handle, name, fallback=current[name])
        handle.processors[name] = proc
        handle._previous[name] = current[name]
        new[name] = proc
    unet.set_attn_processor(new)
    handle._unet = unet
    handle._hook = unet.register_forward_pre_hook(handle._pre_hook, with_kwargs=True)
    return handle
