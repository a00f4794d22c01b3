"""The ``MAX4ZERO_TRACE`` handle (MEA node → Leffa flow view) and the flow view's pure computations.

Recording (docs/method.md §4): while the MEA patch samples, each MEA layer call hands the reduced reference
attention (flow, row mass, entropy, peak per query — never the heads × T × T_ref map) to an
:class:`~max4zero.attention.flow.AttentionCapture`. Recording is switched on by the MEA node only when
a node of the prompt consumes its trace output (hidden PROMPT + UNIQUE_ID inputs); otherwise
:meth:`MeaTrace.capture_for` returns None and the attention runs its fast path, so an unconnected
trace costs nothing.

Because the flow view runs after sampling, what it may ask for must be known before: the Leffa
temperature τ changes the recorded flow, so the MEA node reads τ from the connected flow view's widget
at queue time. Layers, step window and colour mode are chosen afterwards from what was recorded.

Caches. ComfyUI caches node results by their inputs, and since 2026 its default cache drops outputs
under RAM pressure (old ModelPatchers first), so the MEA node's output — and the trace object with it —
can be recomputed while the sampler's result stays cached. The flow view therefore never trusts the
trace object alone: every sampling run of an MEA-patched model is filed in :data:`RUNS` under
:func:`samples_key` of its result (recorded or not, a hash per run), and the view looks up the run
that made the LATENT it was given. It shows that run's attention, or says exactly why it cannot
(sampled while no view was connected, another τ, not made by an MEA model) and *arms* the trace so
that the fix it names — re-sampling — records.

No ComfyUI import (tested in the normal suite).
"""

from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch

from ..attention import flow as _flow
from ..attention.flow import AttentionCapture, FlowRecord

__all__ = [
    "MeaTrace",
    "TracedRun",
    "RunRegistry",
    "RUNS",
    "RERUN_FIX",
    "samples_key",
    "find_traced_run",
    "mls_flow_from_matches",
]


class MeaTrace:
    """What the MEA node hands to the flow view: settings, and the recorder filled during sampling.

    Attributes:
        enabled: recording on (a consumer of the trace output was connected when the MEA node ran).
        tau: Leffa temperature the flow was recorded at.
        capture: the :class:`AttentionCapture` (None when disabled).
        runs: sampling runs seen (each run clears the previous records).
        sample_sigmas: the last run's schedule (float list) or None.
        reference_size: (H, W) of the reference IMAGE given to the MEA node.
        reference_crop: (top, left, H, W) of the part of it that was encoded (VAE multiple of 8).
        window: (start, end) schedule fractions of the MEA window, for messages.
    """

    def __init__(self, enabled: bool, tau: float = 1.0, want_entropy: bool = True) -> None:
        _flow.check_tau(tau)
        self.enabled = bool(enabled)
        self.tau = float(tau)
        self.want_entropy = bool(want_entropy)
        self.capture: Optional[AttentionCapture] = (
            AttentionCapture(want_entropy=want_entropy, tau=float(tau)) if self.enabled else None
        )
        self.runs = 0
        self.sample_sigmas: Optional[list[float]] = None
        self.reference_size: Optional[tuple[int, int]] = None
        self.reference_crop: Optional[tuple[int, int, int, int]] = None
        self.window: Optional[tuple[float, float]] = None

    def __deepcopy__(self, memo: dict) -> "MeaTrace":
        return self  # a handle: copies of the patched model must keep writing into the same trace

    def __repr__(self) -> str:
        n = 0 if self.capture is None else len(self.capture)
        return f"MeaTrace(enabled={self.enabled}, tau={self.tau}, runs={self.runs}, records={n})"

    def begin_run(self, sigmas: Any = None) -> None:
        """A sampling run starts: forget the previous run's records."""
        self.runs += 1
        if isinstance(sigmas, torch.Tensor):
            self.sample_sigmas = [float(s) for s in sigmas.detach().flatten().cpu()]
        else:
            self.sample_sigmas = None
        if self.capture is not None:
            self.capture.clear()

    def capture_for(
        self, *, layer: Any, step: Optional[int], sigma: float, query_hw: Sequence[int], ref_hw: Sequence[int]
    ) -> Optional[AttentionCapture]:
        """The recorder with its context set for one layer call, or None when recording is off."""
        if self.capture is None:
            return None
        return self.capture.set_context(
            layer=layer, step=step, sigma=float(sigma), query_hw=tuple(query_hw), ref_hw=tuple(ref_hw)
        )

    @property
    def records(self) -> list[FlowRecord]:
        """The records of the current (or last) run."""
        return [] if self.capture is None else list(self.capture.records)

    def end_run(self, key: Optional[str], registry: "RunRegistry" = None) -> None:
        """A sampling run ended with the result whose :func:`samples_key` is ``key``: file it."""
        if key is None:
            return
        (RUNS if registry is None else registry).remember(key, TracedRun(
            records=tuple(self.records), recorded=self.enabled, tau=self.tau,
            sample_sigmas=None if self.sample_sigmas is None else tuple(self.sample_sigmas),
        ))

    def arm(self, tau: float) -> None:
        """Record from the next sampling run on, at ``tau`` (the flow view asks when it found nothing)."""
        if self.enabled and self.capture is not None and abs(self.tau - float(tau)) <= 1e-9:
            return
        self.enabled = True
        self.tau = float(tau)
        self.capture = AttentionCapture(want_entropy=self.want_entropy, tau=self.tau)


@dataclass(frozen=True)
class TracedRun:
    """One sampling run of an MEA-patched model, filed under the result it produced.

    ``recorded`` is False when no flow view was connected (nothing was captured, by design).
    """

    records: tuple
    recorded: bool
    tau: float
    sample_sigmas: Optional[tuple]


def samples_key(samples: torch.Tensor) -> str:
    """Identity of a sampled latent: its shape and float32 values, hashed (blake2b).

    Bit-exact: two results have the same key only if every value is equal. A 64×64 latent hashes in
    well under a millisecond, once per sampling run.

    >>> a = torch.zeros(1, 4, 8, 8)
    >>> samples_key(a) == samples_key(a.clone()), samples_key(a) == samples_key(a + 1e-7)
    (True, False)
    """
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"samples must be a tensor, got {type(samples).__name__}")
    t = samples.detach().to(device="cpu", dtype=torch.float32).contiguous()
    h = hashlib.blake2b(digest_size=16)
    h.update(repr(tuple(t.shape)).encode())
    h.update(t.numpy().tobytes())
    return h.hexdigest()


class RunRegistry:
    """The last ``capacity`` sampling runs of MEA-patched models, by :func:`samples_key` (thread-safe).

    Process-wide on purpose: it outlives ComfyUI's cached MEA node output, which the RAM-pressure cache
    may drop while keeping the sampler's result. Bounded, so memory stays a few runs' records.
    """

    def __init__(self, capacity: int = 8) -> None:
        self.capacity = int(capacity)
        self._runs: "OrderedDict[str, TracedRun]" = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, key: str, run: TracedRun) -> None:
        with self._lock:
            self._runs.pop(key, None)
            self._runs[key] = run
            while len(self._runs) > self.capacity:
                self._runs.popitem(last=False)

    def get(self, key: str) -> Optional[TracedRun]:
        with self._lock:
            run = self._runs.get(key)
            if run is not None:
                self._runs.move_to_end(key)
            return run

    def __len__(self) -> int:
        return len(self._runs)


#: Every MEA sampling run of this process (the flow view's source of truth).
RUNS = RunRegistry()

#: The fix the flow view names when the attention of its samples was not recorded. Both halves work
#: (tests/comfyui/test_flow_cache.py follows each): the command clears ComfyUI's node cache, so the MEA
#: node runs again and sees the view; a new seed re-samples with the MEA model, which the view armed.
RERUN_FIX = (
    "queue again after running ComfyUI's 'Unload Models and Execution Cache' command (Edit menu: the same "
    "seed then gives the same image, with its attention recorded), or after changing the sampler's seed"
)


def find_traced_run(
    trace: MeaTrace, key: str, tau: float, registry: Optional[RunRegistry] = None
) -> tuple[Optional[TracedRun], str, str]:
    """The run that made the samples with ``key``, recorded at ``tau``; else ``(None, problem, fix)``.

    When the run cannot be shown, ``trace`` is armed at ``tau`` so that re-sampling with the same
    (possibly cached) MEA model records what the view needs.
    """
    run = (RUNS if registry is None else registry).get(key)
    if run is not None and run.recorded and abs(run.tau - float(tau)) <= 1e-6:
        return run, "", ""
    trace.arm(tau)
    if run is None:
        return None, (
            "the connected 'samples' were not made by a sampler using this MEA node's model in this ComfyUI "
            "session (or were made too many runs ago)"
        ), "connect the LATENT output of the sampler whose model comes from the MEA node; if it is, " + RERUN_FIX
    if not run.recorded:
        return None, (
            "these samples were made while no Flow View was connected, so no attention was recorded (ComfyUI "
            "reused that cached result)"
        ), RERUN_FIX
    return None, f"the attention of these samples was recorded at tau={run.tau}, this view asks for tau={tau}", RERUN_FIX


# --------------------------------------------------------------------------------------------
# the registration stage's warp, for the view's end-point error


def mls_flow_from_matches(
    matches: Any, ref_hw: Sequence[int], out_hw: Sequence[int], kind: str = "affine", alpha: float = 0.1, stride: int = 4
) -> torch.Tensor:
    """The MLS backward map of the registration stage as a normalised flow [H, W, 2] at ``out_hw``.

    ``matches`` is a ``MAX4ZERO_MATCHES`` value (:class:`~max4zero.registration.matches.Matches`); its points
    are rescaled to the reference size ``ref_hw`` and the target size ``out_hw`` first. Same
    construction as the MLS warp node (target points → reference points), so the end-point error is
    measured against the warp that built the composite.
    """
    from ..warping.mls import backward_map

    if len(matches) == 0:
        raise ValueError("the matches hold no control point; run the correspondence node with looser filters")
    m = matches.rescaled(tuple(ref_hw), tuple(out_hw))
    pix = backward_map(m.target_points, m.reference_points, int(out_hw[0]), int(out_hw[1]), kind, alpha, stride)
    return _flow.pixel_map_to_flow(pix, tuple(ref_hw))
