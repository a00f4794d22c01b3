"""The ``MAX4ZERO_TRACE`` handle (MEA node → Leffa flow view) and the registry of sampling runs the view reads.

Recording (docs/method.md §4): while an MEA-patched model samples, each MEA layer call hands the reduced
reference attention (flow, row mass, entropy, peak per query — never the heads × T × T_ref map) to the run's
recorders (``attention/run.py``), one per Leffa temperature τ asked for. What is asked for is decided when the
run starts: the τ of every Flow View connected to the MEA node's ``trace`` output when the node ran (it reads
the queued prompt), plus every τ a view has *requested* for that node since (below). Nothing asked for: nothing
records and MEA runs its fast path, so an unconnected trace costs nothing.

The trace itself is frozen settings (which node made it, the τs, where the reference crop lies): ComfyUI may
cache it, clone it with the model, or drop and recompute it under RAM pressure, and nothing ever writes to it.

Runs. Every sampling run of an MEA-patched model — recorded or not — is filed in :data:`RUNS` under the MEA node
that made it and :func:`samples_key` of its result. The flow view looks up the run of *its* trace's node that
made the LATENT it was given, so it always shows the attention that made those samples, or refuses with a fix
that works:

* samples made by another MEA node's model: it names both nodes (rewire);
* not recorded, or recorded at another τ: it files a request for its node and τ, and re-sampling (a new seed,
  or ComfyUI's 'Unload Models and Execution Cache') records it: a cached MEA node reads the request when its
  sampler runs, a re-run MEA node sees the view in the prompt;
* no run at all: not sampled through an MEA model, a sampler that ran no step, or evicted (the registry keeps
  every run of the newest prompt, however many, and a few of older prompts).

No ComfyUI import at module level (tested in the normal suite).
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch

from ..attention import flow as _flow

__all__ = [
    "MeaTrace",
    "TracedRun",
    "RunRegistry",
    "RUNS",
    "RERUN_FIX",
    "samples_key",
    "current_prompt_id",
    "find_traced_run",
]


def samples_key(samples: torch.Tensor) -> str:
    """Identity of a tensor (a sampled latent, a reference image): its shape and float32 values, hashed (blake2b).

    Bit-exact: two tensors have the same key only if every value is equal. A 64×64 latent hashes in well under
    a millisecond, once per sampling run.

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


def current_prompt_id() -> Optional[str]:
    """The id of the prompt ComfyUI is executing now (None outside an execution or without ComfyUI)."""
    try:
        from comfy_execution.utils import get_executing_context
    except ImportError:
        return None
    ctx = get_executing_context()
    return None if ctx is None else getattr(ctx, "prompt_id", None)


@dataclass(frozen=True)
class TracedRun:
    """One sampling run of an MEA-patched model, filed under the MEA node that made it and its result.

    ``records``: τ → the recorded layer calls (empty when no view was connected); ``stats``: the run's counters
    (``attention/run.py: STAT_KEYS``); ``prompt_id``: the queue run it happened in.
    """

    node_key: str
    records: dict
    stats: dict
    sample_sigmas: Optional[tuple]
    prompt_id: Optional[str]

    @property
    def recorded_taus(self) -> tuple:
        return tuple(sorted(self.records))


class RunRegistry:
    """Every sampling run of MEA-patched models of the newest prompt, and the last ``keep_older`` of older ones,
    by (:func:`samples_key` of the result, MEA node); plus the views' recording requests. Thread-safe.

    Process-wide on purpose: it outlives ComfyUI's cached MEA node output, which the RAM-pressure cache may drop
    while keeping the sampler's result. Sized by the prompt, so a prompt with many MEA samplers loses none of
    its own runs before its views read them.
    """

    def __init__(self, keep_older: int = 8) -> None:
        self.keep_older = int(keep_older)
        self._runs: dict[tuple[str, str], TracedRun] = {}
        self._requests: dict[str, set] = {}
        self._newest: Optional[str] = None
        self._lock = threading.Lock()

    def remember(self, key: str, run: TracedRun) -> None:
        with self._lock:
            self._runs.pop((key, run.node_key), None)
            self._runs[(key, run.node_key)] = run
            if run.prompt_id is not None:
                self._newest = run.prompt_id
            asked = self._requests.get(run.node_key)
            if asked:
                asked.difference_update(run.records)
            older = [k for k, r in self._runs.items() if r.prompt_id is None or r.prompt_id != self._newest]
            for k in older[: max(0, len(older) - self.keep_older)]:
                del self._runs[k]

    def get(self, key: str, node_key: str) -> Optional[TracedRun]:
        with self._lock:
            return self._runs.get((key, node_key))

    def made(self, key: str) -> list[TracedRun]:
        """Every filed run (of any MEA node) whose result has ``key``."""
        with self._lock:
            return [r for (k, _), r in self._runs.items() if k == key]

    def runs(self, node_key: Optional[str] = None) -> list[TracedRun]:
        """The filed runs (of ``node_key``, or all), oldest first."""
        with self._lock:
            return [r for (_, n), r in self._runs.items() if node_key is None or n == node_key]

    def request(self, node_key: str, tau: float) -> None:
        """Ask the next sampling run of ``node_key``'s model to record at ``tau``."""
        with self._lock:
            self._requests.setdefault(node_key, set()).add(float(tau))

    def requested(self, node_key: str) -> set:
        with self._lock:
            return set(self._requests.get(node_key, ()))

    def __len__(self) -> int:
        return len(self._runs)


#: Every MEA sampling run of this process (the flow view's source of truth).
RUNS = RunRegistry()

#: What re-samples, so that the attention a view asked for is recorded. Both halves work
#: (tests/comfyui/test_flow_cache.py follows each): a new seed re-runs the sampler with the (possibly cached) MEA
#: model, which reads the view's request; the command clears ComfyUI's cache, so the MEA node runs again and sees
#: the view in the prompt.
RERUN_FIX = (
    "queue again after changing the sampler's seed, or after running ComfyUI's 'Unload Models and Execution "
    "Cache' command (then the same seed gives the same image, with its attention recorded)"
)


class MeaTrace:
    """What the MEA node hands to the flow view: frozen settings (see the module docstring).

    Args:
        node_key: the MEA node's key in the run registry (its prompt id, or a unique id).
        node_id: the MEA node's id as the user sees it (``#12``), or None.
        taus: τ of each Flow View connected when the node ran (empty: recording off unless a view requests it).
        reference_size: (H, W) of the reference IMAGE given to the MEA node; ``reference_key`` its
            :func:`samples_key`; ``reference_crop``: (top, left, H, W) of the part that was encoded.
        window: (start, end) schedule fractions of the MEA window, for messages.
        vae_ratio: pixels per latent cell of the model's VAE (the view's output size).
        registry: where runs are filed (default :data:`RUNS`).
    """

    def __init__(self, *, node_key: str, node_id: Optional[str] = None, taus: Iterable[float] = (),
                 reference_size: Optional[tuple] = None, reference_key: Optional[str] = None,
                 reference_crop: Optional[tuple] = None, window: Optional[tuple] = None, vae_ratio: int = 8,
                 registry: Optional[RunRegistry] = None) -> None:
        self.node_key = str(node_key)
        self.node_id = None if node_id is None else str(node_id)
        self.taus = tuple(sorted({_flow.check_tau(float(t)) for t in taus}))
        self.reference_size = None if reference_size is None else tuple(int(s) for s in reference_size)
        self.reference_key = reference_key
        self.reference_crop = None if reference_crop is None else tuple(int(s) for s in reference_crop)
        self.window = None if window is None else tuple(float(w) for w in window)
        self.vae_ratio = int(vae_ratio)
        self.registry = RUNS if registry is None else registry
        self._frozen = True

    def __setattr__(self, name: str, value: Any) -> None:
        if getattr(self, "_frozen", False):
            raise AttributeError(f"MeaTrace is frozen: '{name}' cannot be set (requests go to the run registry)")
        object.__setattr__(self, name, value)

    def __deepcopy__(self, memo: dict) -> "MeaTrace":
        return self  # frozen: copies of the patched model may share it

    def __repr__(self) -> str:
        return f"MeaTrace(node={self.node_id or self.node_key}, taus={self.taus})"

    @property
    def enabled(self) -> bool:
        """Whether a Flow View was connected to the node's trace output when the node ran."""
        return bool(self.taus)

    @property
    def label(self) -> str:
        return "this MEA node" if self.node_id is None else f"MEA node #{self.node_id}"

    def recording_taus(self) -> tuple:
        """The τs a sampling run starting now records at: the connected views' and every pending request."""
        return tuple(sorted(set(self.taus) | self.registry.requested(self.node_key)))

    def file_run(self, run: Any, key: Optional[str], sigmas: Any = None) -> None:
        """A sampling run (``attention/run.py: MeaRun``) ended with the result whose :func:`samples_key` is ``key``:
        file it (records, counters) under this trace's node."""
        if key is None:
            return
        schedule = None
        if isinstance(sigmas, torch.Tensor):
            schedule = tuple(float(s) for s in sigmas.detach().flatten().cpu())
        self.registry.remember(key, TracedRun(
            node_key=self.node_key, records=run.records(), stats=run.stats, sample_sigmas=schedule,
            prompt_id=current_prompt_id(),
        ))


def find_traced_run(
    trace: MeaTrace, key: str, tau: float
) -> tuple[Optional[TracedRun], str, str]:
    """The run of ``trace``'s node that made the samples with ``key``, recorded at ``tau``; else
    ``(None, problem, fix)``, having requested a recording at ``tau`` where re-sampling will make one."""
    registry = trace.registry
    tau = float(tau)
    run = registry.get(key, trace.node_key)
    if run is not None and any(abs(t - tau) <= 1e-6 for t in run.records):
        return run, "", ""
    if run is None:
        others = [r for r in registry.made(key) if r.node_key != trace.node_key]
        if others:
            names = ", ".join(sorted({_node_name(r.node_key) for r in others}))
            fix = ("connect 'trace' and 'samples' from the same MEA node (the trace output of the node whose model "
                   "the sampler uses)")
            if not any(any(abs(t - tau) <= 1e-6 for t in r.records) for r in others):
                for r in others:  # so that re-sampling with that node's model records for this view
                    registry.request(r.node_key, tau)
                fix += ("; that node's run recorded nothing for this view, so also change that sampler's seed (or run "
                        "'Unload Models and Execution Cache') before queueing again")
            return None, (
                f"'samples' come from a sampler whose model comes from {names}, but 'trace' comes from {trace.label}: "
                "the view would show one node's attention over the other's reference"
            ), fix
        registry.request(trace.node_key, tau)
        return None, (
            f"no sampling run with a model from {trace.label} made these 'samples' in this ComfyUI session: they were "
            "not sampled through that node's model, the sampler ran no step (start_at_step at or after end_at_step), "
            "or the run was evicted (the view keeps every run of the newest queue run and 8 older ones)"
        ), ("connect the LATENT output of the sampler whose model comes from that MEA node, with at least one step "
            "to run; if it is connected so, " + RERUN_FIX)
    registry.request(trace.node_key, tau)
    fresh = run.prompt_id is not None and run.prompt_id == current_prompt_id()
    if not run.records:
        when = ("the sampler ran in this queue run, with the MEA node's output cached from a run before this view "
                "was connected" if fresh else
                "ComfyUI reused that sampler's cached result, sampled before this view was connected")
        return None, f"no attention was recorded for these samples: {when}", RERUN_FIX
    recorded = ", ".join(f"{t:g}" for t in run.recorded_taus)
    return None, (f"the attention of these samples was recorded at tau={recorded}, this view asks for tau={tau:g}"), \
        RERUN_FIX


def _node_name(node_key: str) -> str:
    return f"MEA node #{node_key}" if node_key.isdigit() or ":" in node_key or "." in node_key else "another MEA node"
