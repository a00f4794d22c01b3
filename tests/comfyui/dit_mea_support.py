"""The graphs and hostile patches the DiT MEA tests share (test_flux_mea, test_flux2_mea, test_qwen_mea).

Each of those files describes its tiny model family once, as a :class:`DitGraphs` (its stub VAE, its CONDITIONING,
its empty latent, its s_mea), and builds every prompt through it: the MaX4Zero MEA node with the widgets those tests
use, the stock KSamplerAdvanced after it, several such chains run in one prompt, and the Leffa Flow View on a run.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

# Names, not the module: a reference to the comfy_models module from here outlives ComfyUI's modules at interpreter
# exit, and its cached ModelPatchers then fail in __del__ ("Exception ignored ... ON_DETACH").
from comfy_models import Graph, NodeRef, pack_module, run_prompt, synthetic_pair

MEA = "MaX4ZeroMaskedExtendedAttention"


@functools.lru_cache(maxsize=None)
def shared_pair(size: int) -> dict[str, torch.Tensor]:
    """:func:`comfy_models.synthetic_pair` at ``size``, built once (every graph of a file shares its tensors)."""
    return synthetic_pair(size)


@dataclass(frozen=True)
class DitGraphs:
    """One tiny DiT family's graphs. ``vae``: makes the stub VAE the MEA node gets; ``conditioning(seed)``: its
    CONDITIONING (seed 3 the MEA node's prompt, 1 and 2 the sampler's positive and negative); ``latent``: the shape
    of the sampler's all-zero latent."""

    size: int
    vae: Callable[[], Any]
    conditioning: Callable[[int], list]
    latent: tuple[int, ...]
    s_mea: float

    def pair(self) -> dict[str, torch.Tensor]:
        return shared_pair(self.size)

    def mea(self, g: Graph, model_link, *, target_mask=None, guidance="fused", blocks="all", contrast=1.25,
            start=0.0, end=1.0, reference=None, positive=None, reference_every=None) -> NodeRef:
        """The MEA node on ``model_link``: the pair's garment and target region unless given."""
        pair = self.pair()
        over = {} if reference_every is None else {"reference_every": reference_every}  # None: the input absent
        return g.node(
            MEA, model=model_link, vae=g.obj(self.vae(), "VAE"),
            reference=g.obj(pair["reference"] if reference is None else reference, "IMAGE"),
            garment_mask=g.obj(pair["garment_mask"], "MASK"),
            target_mask=g.obj(pair["target_mask"] if target_mask is None else target_mask, "MASK"),
            positive=g.obj(positive or self.conditioning(3), "CONDITIONING"), guidance=guidance, s_mea=self.s_mea,
            contrast=contrast, start=start, end=end, layers="decoder 1/16 + 1/8 (paper)", reference_seed=0,
            background="kept", flux_blocks=blocks, **over,
        )

    def sampler(self, g: Graph, model_link, *, cfg=1.0, steps=1, positive=None, negative=None, seed=5) -> NodeRef:
        """The stock KSamplerAdvanced (euler, simple) over the whole schedule, from the all-zero latent."""
        return g.node(
            "KSamplerAdvanced", model=model_link, add_noise="enable", noise_seed=seed, steps=steps, cfg=cfg,
            sampler_name="euler", scheduler="simple",
            positive=g.obj(positive or self.conditioning(1), "CONDITIONING"),
            negative=g.obj(negative or self.conditioning(2), "CONDITIONING"),
            latent_image=g.obj({"samples": torch.zeros(*self.latent)}, "LATENT"),
            start_at_step=0, end_at_step=10000, return_with_leftover_noise="disable",
        )

    def run(self, models: dict, **mea_kw) -> dict:
        """{name: sampled latent} for {name: (model patcher, "stock" | mea overrides dict, sampler overrides dict)},
        all in one prompt; ``mea_kw``: the MEA node's inputs for every name (its own overrides win)."""
        g = Graph()
        for name, (model, mea, samp) in models.items():
            link = g.obj(model, "MODEL")
            if mea != "stock":
                link = self.mea(g, link, **{**mea_kw, **mea})[0]
            g.capture(self.sampler(g, link, **samp)[0], name)
        res = run_prompt(g)
        return {name: res[name]["samples"] for name in models}

    def flow_view(self, g: Graph, mea: NodeRef, samp: NodeRef, *, layers: str, tau=1.0) -> NodeRef:
        """The Leffa Flow View of MEA node ``mea``'s trace on sampler ``samp``'s run (absolute, every step)."""
        return g.node("MaX4ZeroFlowView", trace=mea[1], reference=g.obj(self.pair()["reference"], "IMAGE"),
                      samples=samp[0], layers=layers, step_start=0.0, step_end=1.0, tau=tau, mode="absolute")

    def region_tokens(self, grid: tuple[int, int]) -> torch.Tensor:
        """The pair's target region at a token grid ``grid`` (h, w), bool [h·w]."""
        return pack_module("nodes.mea_flux").token_mask(self.pair()["target_mask"], grid)[0]


def hostile_reference_kv(monkeypatch: Any, model: Any, block_type: Optional[str] = "double") -> tuple[Any, list]:
    """A clone of ``model`` with another pack's attn1_patch that, in MEA's reference pass only, puts huge K/V on the
    reference's non-garment tokens at block 0 (of type ``block_type``; None: whatever its type), and the list every
    ``FluxMeaPatch`` built from now on is appended to (the hook finds the pass's patch by its uuid)."""
    mf = pack_module("nodes.mea_flux")
    patches: list = []

    def hostile(q, k, v, pe=None, attn_mask=None, extra_options=None, **kw):
        to = extra_options or {}
        if to.get("uuids") is None or to.get("block_index") != 0:
            return {}
        if block_type is not None and to.get("block_type") != block_type:
            return {}
        patch = next((p for p in patches if list(to["uuids"]) == [p.ref_uuid]), None)
        if patch is None:
            return {}
        start = int(to["img_slice"][0])
        outside = ~mf.token_mask(patch.settings.garment_mask, patch.ref_grid)[0]
        k, v = k.clone(), v.clone()
        k[:, :, start:][:, :, outside] = 1e4
        v[:, :, start:][:, :, outside] = -1e4
        return {"k": k, "v": v}

    real_init = mf.FluxMeaPatch.__init__

    def init(self, *a, **kw):
        real_init(self, *a, **kw)
        patches.append(self)

    monkeypatch.setattr(mf.FluxMeaPatch, "__init__", init)
    hostile_model = model.clone()
    hostile_model.set_model_attn1_patch(hostile)
    return hostile_model, patches


def first_double_block_outputs(model: Any) -> tuple[Any, Any, dict[str, list[torch.Tensor]]]:
    """Two clones of ``model``, "vanilla" and "mea", each recording the attention output of double block 0 at every
    call into ``seen[name]`` (a list in call order), and ``seen``."""
    seen: dict[str, list[torch.Tensor]] = {}

    def record(name):
        def patch(attn, extra_options):
            if extra_options.get("block_type") == "double" and extra_options.get("block_index") == 0:
                seen.setdefault(name, []).append(attn.clone())
            return attn
        return patch

    vanilla, mea = model.clone(), model.clone()
    vanilla.set_model_attn1_output_patch(record("vanilla"))
    mea.set_model_attn1_output_patch(record("mea"))
    return vanilla, mea, seen
