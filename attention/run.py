"""Settings and per-run state of Masked Extended Attention, for any host (docs/method.md §3b).

A host's patch object holds :class:`MeaSettings` and nothing else that changes: ComfyUI clones a patched
model freely (every clone shares the patch) and its MultiGPU work split runs the cond/uncond work units of a
step on several devices at once, one thread per device. So everything sampling writes lives in a
:class:`MeaRun`, made when a sampling run starts and dropped when it ends, and inside the run in one
:class:`WorkerState` per thread: the reference keys/values recorded there, the masks at each token grid, the
window in σ, counters and attention recorders. A worker's state is written only by the thread that made it
(checked on every write), so keys/values recorded on one device are never read on another and no two threads
write one object. The run merges the workers' counters and records when it ends.

Layouts: masks ``[B or 1, H, W]`` at any resolution (> 0.5 = on) become bool ``[B or 1, h·w]`` at a token grid
(:class:`TokenMasks`); a reference latent is ``[1, C, h, w]``. Plain PyTorch, no host import.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch

from .flow import AttentionCapture, FlowRecord, check_tau
from .policy import (
    GUIDANCE_MODES,
    check_contrast,
    check_reference_every,
    in_window,
    reuse_reference,
    row_mask_index,
    token_mask,
)

__all__ = ["MeaSettings", "TokenMasks", "WorkerState", "MeaRun", "STAT_KEYS"]

#: What a run counts: model calls that wanted MEA (``calls``), chosen layers reached (``layers``), layer calls
#: where a region query read garment tokens (``effective``), reference passes (inline rows included) and
#: Masked Extended Attention calls.
STAT_KEYS = ("calls", "layers", "effective", "reference_passes", "mea_calls")


@dataclass(frozen=True)
class MeaSettings:
    """What one MEA node asked for (docs/method.md §3b), checked and frozen.

    Args:
        mode: ``"paper"`` or ``"fused"`` (:data:`~.policy.GUIDANCE_MODES`).
        s_mea: weight of the MEA branch in paper mode (15 in the paper); unused in fused mode.
        contrast: attention contrast on the reference half (1.25 paper, 1.0 = off).
        start, end: schedule fractions of the MEA window, 0 ≤ start ≤ end ≤ 1.
        reference_every: a reference pass every N-th sampler step (1 = the paper; :func:`~.policy.reuse_reference`).
        ref_latent, ref_noise: [1, C, h, w] reference latent (the host's scaled latent space) and its fixed noise.
        ref_context: [1, L, D] text of the reference pass, or None (a positive row's).
        garment_mask: [1, H, W] garment pixels of the reference (after erosion), any resolution; stored as bool.
        target_mask: [B or 1, H, W] try-on region of the target, any resolution of the latent's aspect; float.

    ``active`` is False when nothing can change (an empty mask, or paper mode with ``s_mea`` 0): the
    contract "empty mask = vanilla, bit for bit".
    """

    mode: str
    s_mea: float
    contrast: float
    start: float
    end: float
    reference_every: int
    ref_latent: torch.Tensor
    ref_noise: torch.Tensor
    ref_context: Optional[torch.Tensor]
    garment_mask: torch.Tensor
    target_mask: torch.Tensor
    active: bool = field(init=False)

    def __post_init__(self) -> None:
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"mode must be one of {GUIDANCE_MODES}, got {self.mode!r}")
        if not (0.0 <= self.start <= self.end <= 1.0):
            raise ValueError(f"need 0 ≤ start ≤ end ≤ 1, got start={self.start}, end={self.end}")
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "s_mea", float(self.s_mea))
        set_(self, "contrast", check_contrast(self.contrast))
        set_(self, "start", float(self.start))
        set_(self, "end", float(self.end))
        set_(self, "reference_every", check_reference_every(self.reference_every))
        set_(self, "garment_mask", self.garment_mask.bool())
        set_(self, "target_mask", self.target_mask.float())
        active = bool(self.garment_mask.any()) and bool((self.target_mask > 0.5).any())
        set_(self, "active", active and not (self.mode == "paper" and self.s_mea == 0.0))


class TokenMasks:
    """One mask at every token grid and device it is asked for, computed once: bool ``[B or 1, h·w]``.

    >>> m = torch.zeros(1, 8, 8); m[:, :4] = 1
    >>> TokenMasks(m).at((2, 2), "cpu").tolist()
    [[True, True, False, False]]
    """

    def __init__(self, mask: torch.Tensor) -> None:
        self.mask = mask
        self._at: dict[tuple, torch.Tensor] = {}

    def at(self, hw: Sequence[int], device: Any) -> torch.Tensor:
        key = (tuple(int(s) for s in hw), str(device))
        m = self._at.get(key)
        if m is None:
            m = self._at[key] = token_mask(self.mask, key[0]).to(device)
        return m


class WorkerState:
    """What one thread of a sampling run writes (see the module docstring).

    Attributes:
        store: the last recorded reference K/V (layer key → host entry), with ``store_sigma``/``store_step``.
        cache: adapter-owned values that are fixed for the run on this device (e.g. RoPE of the garment tokens).
        stats: counters (:data:`STAT_KEYS`).
        captures: one :class:`~.flow.AttentionCapture` per recorded Leffa τ (empty when nothing records).
    """

    def __init__(self, run: "MeaRun", device: Any) -> None:
        self.run = run
        self.settings = run.settings
        self.device = device
        self.owner = threading.get_ident()
        self.store: dict[Any, Any] = {}
        self.store_sigma: Optional[float] = None
        self.store_step: Optional[int] = None
        self.cache: dict[Any, Any] = {}
        self.stats = dict.fromkeys(STAT_KEYS, 0)
        self.captures = {tau: AttentionCapture(want_entropy=True, tau=tau) for tau in run.taus}
        self._garment = TokenMasks(self.settings.garment_mask)
        self._target = TokenMasks(self.settings.target_mask)
        self._windows: dict[int, tuple[float, float]] = {}

    def _writing(self) -> None:
        if threading.get_ident() != self.owner:
            raise RuntimeError("MaX4Zero: a worker's MEA state was written from another thread (a patch shared "
                               "state across threads); please report this with the workflow")

    # -- the reference K/V ---------------------------------------------------------------------

    def stored(self, sigma: float, step: Optional[int] = None) -> Optional[dict]:
        """The recorded reference K/V a call at ``sigma`` (schedule index ``step``) may use, or None (run a new
        reference pass): those recorded at ``sigma``, or within ``reference_every`` steps
        (:func:`~.policy.reuse_reference`)."""
        if not self.store:
            return None
        reuse = reuse_reference(self.store_step, self.store_sigma, step, sigma, self.settings.reference_every)
        return self.store if reuse else None

    def keep(self, store: dict, sigma: float, step: Optional[int] = None) -> None:
        """Remember the reference K/V just recorded at ``sigma`` (schedule index ``step``, None if unknown)."""
        self._writing()
        self.store, self.store_sigma, self.store_step = store, sigma, step
        self.stats["reference_passes"] += 1

    # -- window and masks ----------------------------------------------------------------------

    def in_window(self, model_sampling: Any, sigma: float) -> bool:
        """Whether ``sigma`` lies in the MEA window (schedule fractions → σ by the host's ``percent_to_sigma``)."""
        key = id(model_sampling)
        if key not in self._windows:
            self._writing()
            self._windows[key] = (float(model_sampling.percent_to_sigma(self.settings.start)),
                                  float(model_sampling.percent_to_sigma(self.settings.end)))
        return in_window(sigma, *self._windows[key])

    def grid_mask(self, which: str, hw: Sequence[int], device: Any) -> torch.Tensor:
        """Garment or target mask at a token grid, flattened: [B or 1, h·w] bool on ``device`` (cached)."""
        self._writing()
        return (self._garment if which == "garment" else self._target).at(hw, device)

    def latent_mask(self, x: torch.Tensor) -> torch.Tensor:
        """Target mask at latent size as float [B or 1, 1, h, w] on x's device (paper guidance M); [B or 1, 1, 1, h, w]
        for a one-frame video latent x [B, C, 1, h, w] (Qwen-Image)."""
        hw = (int(x.shape[-2]), int(x.shape[-1]))
        m = self.grid_mask("target", hw, x.device).view(-1, 1, *([1] * (x.dim() - 4)), *hw)
        if m.shape[0] not in (1, x.shape[0]):
            row_mask_index(range(x.shape[0]), x.shape[0], 1, m.shape[0])  # raises the clear error
        return m.to(x.dtype)

    # -- counters and recorders ----------------------------------------------------------------

    def count(self, key: str, n: int = 1) -> None:
        self._writing()
        self.stats[key] += n

    def note_layer(self, effective: bool) -> None:
        self._writing()
        self.stats["layers"] += 1
        self.stats["effective"] += int(effective)

    def captures_for(self, *, layer: Any, step: Optional[int], sigma: float, query_hw: Sequence[int],
                     ref_hw: Sequence[int]) -> list[AttentionCapture]:
        """The recorders with their context set for one layer call ([] when nothing records)."""
        if not self.captures:
            return []
        self._writing()
        return [c.set_context(layer=layer, step=step, sigma=float(sigma), query_hw=tuple(query_hw),
                              ref_hw=tuple(ref_hw)) for c in self.captures.values()]


class MeaRun:
    """One sampling run of an MEA-patched model: its workers' states, merged when it ends.

    Args:
        settings: the patch's :class:`MeaSettings`.
        taus: the Leffa temperatures to record attention at (none: nothing records, the fast path runs).
        owner: how messages name the node whose run this is (e.g. another node of a chain refers to it).
    """

    def __init__(self, settings: MeaSettings, taus: Sequence[float] = (), owner: str = "") -> None:
        self.settings = settings
        self.owner = owner
        self.taus = tuple(sorted({check_tau(float(t)) for t in taus}))
        self._workers: dict[tuple, WorkerState] = {}
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"MeaRun(workers={len(self._workers)}, taus={self.taus}, stats={self.stats})"

    def worker(self, device: Any) -> WorkerState:
        """This thread's state for ``device`` (made on first use)."""
        key = (str(device), threading.get_ident())
        state = self._workers.get(key)
        if state is None:
            with self._lock:
                state = self._workers.setdefault(key, WorkerState(self, device))
        return state

    @property
    def workers(self) -> list[WorkerState]:
        with self._lock:
            return list(self._workers.values())

    @property
    def stats(self) -> dict[str, int]:
        """Every worker's counters, summed."""
        total = dict.fromkeys(STAT_KEYS, 0)
        for w in self.workers:
            for k, v in w.stats.items():
                total[k] += v
        return total

    def records(self) -> dict[float, tuple[FlowRecord, ...]]:
        """τ → every worker's recorded layer calls, in sampling order (by schedule step; ties keep the order of
        the workers' first use)."""
        out = {}
        workers = self.workers
        for tau in self.taus:
            recs = [r for w in workers for r in w.captures[tau].records]
            out[tau] = tuple(sorted(recs, key=lambda r: -1 if r.step is None else r.step))
        return out
