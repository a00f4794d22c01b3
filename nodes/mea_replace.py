"""The attn1 replace the MEA patch puts at each chosen self-attention slot, for one model call.

ComfyUI calls an attn1 replace as ``fn(q, k, v, extra_options)`` with the projected ``q, k, v``
``[B, T, heads·d]`` and expects ``[B, T, heads·d]`` before ``to_out``. :class:`Attn1Replace` is that
callable, as an object a reader (or a debugger) can inspect, in one of three explicit modes:

* ``record``: a batch-1 reference pass; answers like the layer would and keeps the reference K/V of the
  chosen layers in the run's store.
* ``use``: a target call; reads the stored reference K/V and runs Masked Extended Attention for the MEA
  rows' queries (``attention/masked_extended.py``); every other row and query is the layer's own answer.
* ``inline``: the reference rides in the same call as its last row (the paper's [target ; reference]
  batch); its K/V are taken from that row, kept for later calls at this sigma, and used as in ``use``.

Whatever sat at the slot before (another pack's replace, or ComfyUI's fallback at the 2-tuple key) is
``prev``: it computes every answer MEA does not replace, so patches chain instead of overwriting each
other (IPAdapter_plus's ``Attn2Replace`` is the model for this). Another MEA node's replace may be ``prev``
too (a chain): it redoes its own region, this one redoes this node's region. In another node's reference pass
(marked in ``transformer_options``) a ``use`` replace is transparent, so a reference never reads a garment.

What a call writes (reference K/V, counters, recorders) goes to the thread's
:class:`~max4zero.attention.run.WorkerState`; the patch is only read.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from ..attention.masked_extended import masked_extended_attention
from ..attention.policy import grid_level
from .mea_calls import REFERENCE_PASS_KEY, plain_attention

__all__ = ["RefEntry", "CallRows", "Attn1Replace", "MODES"]

MODES = ("record", "use", "inline")


@dataclass
class RefEntry:
    """The reference's K/V at one layer: ``k, v`` [1, T_ref, heads·d] on the layer's token grid ``hw``."""

    k: torch.Tensor
    v: torch.Tensor
    hw: tuple[int, int]


@dataclass
class CallRows:
    """Which rows of one model call carry MEA, and which target-mask item each of them uses.

    ``rows``/``mask_index`` as :func:`~max4zero.attention.policy.rows_with_mea` and
    :func:`~max4zero.attention.policy.row_mask_index` give them; ``ref_row`` is the reference's row in
    ``inline`` mode. Index tensors are built once per device.
    """

    rows: list[int]
    mask_index: list[int]
    n_rows: int
    sigma: float
    step: Optional[int]
    ref_row: Optional[int] = None
    _cache: dict = field(default_factory=dict, repr=False)

    def on(self, device: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, other rows, mask_index)`` as long tensors on ``device``."""
        key = str(device)
        if key not in self._cache:
            chosen = set(self.rows)
            self._cache[key] = (
                torch.tensor(self.rows, dtype=torch.long, device=device),
                torch.tensor([r for r in range(self.n_rows) if r not in chosen], dtype=torch.long, device=device),
                torch.tensor(self.mask_index, dtype=torch.long, device=device),
            )
        return self._cache[key]


class Attn1Replace:
    """One slot's attn1 replace for one model call (see the module docstring).

    Args:
        patch: the :class:`~max4zero.nodes.mea_patch.MeaPatch` (frozen: layer choice, contrast, trace).
        state: this thread's :class:`~max4zero.attention.run.WorkerState` (masks, counters, recorders).
        key: the slot, ``(block_name, block_number, block_index)``.
        prev: what sat at the slot before, or None (then ComfyUI's own attention).
        mode: one of :data:`MODES`.
        rows: the call's :class:`CallRows` (``use`` and ``inline``).
        store: where ``record``/``inline`` put the reference K/V and ``use`` reads them.
    """

    def __init__(self, patch: Any, state: Any, key: tuple, prev: Optional[Callable], mode: str,
                 rows: Optional[CallRows] = None, store: Optional[dict] = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "record" and rows is None:
            raise ValueError(f"mode {mode!r} needs the call's rows")
        self.patch, self.state, self.key, self.prev, self.mode = patch, state, key, prev, mode
        self.rows = rows
        self.store = {} if store is None else store

    def __repr__(self) -> str:
        return f"Attn1Replace({self.key}, mode={self.mode!r}, chained={self.prev is not None})"

    def layer_grid(self, q: torch.Tensor, extra: dict) -> Optional[tuple[int, int]]:
        """The layer's token grid if MEA applies to it (chosen part and grid level, tokens that fit), else None."""
        act, orig = extra.get("activations_shape"), extra.get("original_shape")
        if act is None or orig is None:
            return None
        hw = (int(act[-2]), int(act[-1]))
        if not self.patch.layers.selects(self.key[0], grid_level(orig[-2:], hw)):
            return None
        return hw if q.shape[1] == hw[0] * hw[1] else None

    def own(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
        """The layer's answer without MEA: the previous replace's, or ComfyUI's attention."""
        return self.prev(q, k, v, extra) if self.prev is not None else plain_attention(q, k, v, extra)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict) -> torch.Tensor:
        if self.mode != "record" and extra.get(REFERENCE_PASS_KEY) not in (None, self.patch.id):
            return self.own(q, k, v, extra)  # another chained node's reference pass: not a target
        if self.mode != "record" and q.shape[0] != self.rows.n_rows:
            raise RuntimeError(f"MaX4Zero Masked Extended Attention: a model call of {self.rows.n_rows} rows reached "
                               f"the attention with {q.shape[0]} (another patch changed the batch inside the model "
                               "call); please report the workflow")
        if self.mode == "record":
            out = self.own(q, k, v, extra)
            hw = self.layer_grid(q, extra)
            if hw is not None:
                self.store[self.key] = RefEntry(k, v, hw)
            return out
        if self.mode == "inline":
            hw = self.layer_grid(q, extra)
            entry = None
            if hw is not None:
                r = self.rows.ref_row
                entry = self.store[self.key] = RefEntry(k[r : r + 1].clone(), v[r : r + 1].clone(), hw)
        else:
            entry = self.store.get(self.key)
            hw = self.layer_grid(q, extra) if entry is not None else None
        if entry is None or hw is None:
            return self.own(q, k, v, extra)
        return self._extended(q, k, v, extra, entry, hw)

    def _extended(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, extra: dict, entry: RefEntry,
                  hw: tuple[int, int]) -> torch.Tensor:
        """MEA for the MEA rows' queries inside the target mask; the layer's own answer everywhere else."""
        n = q.shape[0]
        rows, others, mask_index = self.rows.on(q.device)
        full = rows.numel() == n
        qm = self.state.grid_mask("target", hw, q.device)[mask_index]  # [R, T]
        rkm = self.state.grid_mask("garment", entry.hw, q.device)  # [1, T_ref]
        self.state.note_layer(bool(rkm.any()) and bool(qm.any()))
        captures = self.state.captures_for(layer=self.key, step=self.rows.step, sigma=self.rows.sigma, query_hw=hw,
                                           ref_hw=entry.hw)
        qs, ks, vs = (q, k, v) if full else (q[rows], k[rows], v[rows])
        mea = masked_extended_attention(
            qs, ks, vs, entry.k, entry.v, rkm, qm, int(extra["n_heads"]), self.patch.settings.contrast, captures
        )
        self.state.count("mea_calls")
        if self.prev is not None:
            base = self.prev(q, k, v, extra)
            sub = base if full else base[rows]
            mixed = torch.where(qm[..., None], mea.to(sub.dtype), sub)
            return mixed if full else base.index_copy(0, rows, mixed)
        if full:
            return mea
        plain = plain_attention(q[others], k[others], v[others], extra)
        out = plain.new_zeros((n,) + tuple(mea.shape[1:]))
        out[others] = plain
        out[rows] = mea.to(plain.dtype)
        return out
