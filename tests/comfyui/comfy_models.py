"""Test harness for running the pack inside a real ComfyUI (``COMFYUI_PATH``), in-process, on CPU.

Everything here is imported by ``tests/comfyui/conftest.py`` only after it has booted ComfyUI (so the
``comfy``, ``nodes``, ``execution`` imports inside the functions resolve to the checkout in
``COMFYUI_PATH``). What it offers:

* :func:`boot` — put ComfyUI on ``sys.path`` (ahead of the pack root, which also has a ``nodes``
  folder), force CPU, point its output/temp folders at a scratch dir, record progress-bar calls,
  register the test-only nodes, and load THIS pack through ComfyUI's own ``nodes.load_custom_node``.
* Random-weight models built from ComfyUI's own classes: :func:`small_sd15_model` (SD1.5 block
  layout, ``model_channels`` 32, ``context_dim`` 768; plain or 9-channel inpainting),
  :func:`small_vae` (``AutoencoderKL`` with a reduced ``ddconfig``), :func:`conditioning`
  (CLIP-free ``[1, 77, 768]`` tensors), :func:`small_sdxl_model` + :func:`sdxl_conditioning` (SDXL
  block layout), :func:`non_unet_model` (a DiT-like stand-in for error paths).
* :func:`pack_module` — the pack's modules as ComfyUI loaded them (not the normal suite's ``max4zero``
  copy); :func:`pack_node_classes` — the extension's node list.
* :class:`Graph` + :func:`run_prompt` — build an API-format prompt, pass in-memory objects through
  test-only loader nodes (``TestHarnessObject_<TYPE>``), capture any output with a test-only output
  node (``TestHarnessCapture``), validate with ``execution.validate_prompt`` and run it through
  ``execution.PromptExecutor`` (the same path the server uses), with a stub server. The result gives
  captured values (``res["name"]``), any node's output (``res.output(node_id, i)``), UI outputs and the
  progress-bar updates made during the run (``res.progress``: ``(node_id, value, total)``).
  Only nodes.py's built-in nodes are registered (plus this pack); comfy_extras are not loaded.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import torch

PACK_ROOT = Path(__file__).resolve().parents[2]
SKIP_REASON = "COMFYUI_PATH is not set: these tests need a ComfyUI checkout (see README)"

# The node ids this pack ships. The schema snapshot test compares ALL of the extension's nodes;
# this list is what the loader test insists is present after ComfyUI's own loading path.
REGISTRATION_NODE_IDS = (
    "MaX4ZeroCorrespondence",
    "MaX4ZeroMLSWarp",
    "MaX4ZeroDoubleMaskInpaint",
    "MaX4ZeroCropToMask",
    "MaX4ZeroPasteBack",
)

# ---------------------------------------------------------------------------------------------
# Boot
# ---------------------------------------------------------------------------------------------

_STATE: dict[str, Any] = {}
PROGRESS: list[tuple[Any, int, int]] = []  # (node_id, value, total) of every comfy.utils.ProgressBar update
_OBJECTS: dict[str, Any] = {}
_CAPTURED: dict[str, Any] = {}


def boot(comfyui_path: str) -> dict[str, Any]:
    """Import ComfyUI from ``comfyui_path`` (CPU), load this pack through ``nodes.load_custom_node``.

    Idempotent. Returns ``{"pack_module": module, "node_ids": [...], "scratch": Path}``.
    """
    if _STATE:
        return _STATE
    root = str(Path(comfyui_path).resolve())
    if not (Path(root) / "nodes.py").is_file() or not (Path(root) / "comfy").is_dir():
        raise RuntimeError(f"COMFYUI_PATH={comfyui_path!r} is not a ComfyUI checkout (no nodes.py / comfy/)")
    # ``python -m pytest`` run from the pack root puts the pack root ('' or its path) on sys.path,
    # and the pack has a ``nodes/`` folder: ComfyUI's ``nodes.py`` must win.
    pack = str(PACK_ROOT)
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != pack]
    sys.path.insert(0, root)
    if "nodes" in sys.modules and not str(getattr(sys.modules["nodes"], "__file__", "")).startswith(root):
        raise RuntimeError("a module called 'nodes' that is not ComfyUI's was imported before the harness booted")

    import comfy.cli_args

    comfy.cli_args.args.cpu = True  # before comfy.model_management is imported
    comfy.cli_args.args.disable_metadata = True
    import comfy.model_management  # noqa: F401
    import comfy.utils
    import folder_paths
    import nodes

    scratch = Path(tempfile.mkdtemp(prefix="max4zero-comfy-"))
    for sub in ("output", "temp", "input"):
        (scratch / sub).mkdir()
    folder_paths.set_output_directory(str(scratch / "output"))
    folder_paths.set_temp_directory(str(scratch / "temp"))
    folder_paths.set_input_directory(str(scratch / "input"))

    from comfy_execution.utils import get_executing_context

    def progress_hook(value, total, preview, prompt_id=None, node_id=None):
        ctx = get_executing_context()
        if node_id is None and ctx is not None:
            node_id = ctx.node_id
        PROGRESS.append((node_id, int(value), int(total)))

    comfy.utils.set_progress_bar_global_hook(progress_hook)

    _register_test_nodes()
    builtin = set(nodes.NODE_CLASS_MAPPINGS)
    before = set(nodes.NODE_CLASS_MAPPINGS)
    ok = asyncio.run(nodes.load_custom_node(pack, ignore=builtin, module_parent="custom_nodes"))
    if not ok:
        raise RuntimeError(
            f"ComfyUI failed to load the pack at {pack} (nodes.load_custom_node returned False): see the log above"
        )
    node_ids = sorted(set(nodes.NODE_CLASS_MAPPINGS) - before)
    pack_module = sys.modules[pack.replace(".", "_x_")]
    _STATE.update(pack_module=pack_module, node_ids=node_ids, scratch=scratch, comfyui_path=root)
    return _STATE


def pack_module(name: str = ""):
    """A submodule of the pack AS COMFYUI LOADED IT (e.g. ``pack_module("registration.crop")``).

    The normal suite's ``max4zero.*`` (tests/conftest.py) is a second, separate copy of the same files:
    its classes are not the ones flowing through the graph (``isinstance`` across copies fails).
    """
    import importlib

    base = _STATE["pack_module"].__name__
    return importlib.import_module(f"{base}.{name}" if name else base)


def pack_node_classes() -> list[type]:
    """The node classes of the pack's ComfyExtension, exactly as ComfyUI received them."""
    ext = asyncio.run(_STATE["pack_module"].comfy_entrypoint())
    return list(asyncio.run(ext.get_node_list()))


# ---------------------------------------------------------------------------------------------
# Random-weight models from ComfyUI's own classes
# ---------------------------------------------------------------------------------------------


def init_random(module: torch.nn.Module, seed: int = 0) -> int:
    """Initialise every layer with torch's default init; returns the number of layers touched.

    ``comfy.ops`` layers override ``reset_parameters()`` with a no-op (weights normally come from a
    checkpoint), so the torch base-class implementation is called explicitly.
    """
    gen_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    n = 0
    try:
        for m in module.modules():
            for base in type(m).__mro__[1:]:
                if base.__module__.startswith("torch.nn") and "reset_parameters" in base.__dict__:
                    base.reset_parameters(m)
                    n += 1
                    break
    finally:
        torch.random.set_rng_state(gen_state)
    return n


def sd15_unet_config(in_channels: int = 4, model_channels: int = 32) -> dict:
    """The detected SD1.5 ``unet_config`` with a reduced width (block layout unchanged)."""
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": in_channels, "model_channels": model_channels,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


_MODEL_CACHE: dict[tuple, Any] = {}


def _patcher(model: Any) -> Any:
    """A ``ModelPatcher`` on ``model``, with the devices a core loader gives it."""
    import comfy.model_management as mm
    import comfy.model_patcher

    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


def _random_unet_patcher(cfg: Any, seed: int) -> Any:
    """The float32 model of the UNet config ``cfg`` (a ``comfy.supported_models`` class), random weights, patched."""
    import comfy.model_management as mm

    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "model.diffusion_model.", device=mm.unet_offload_device())
    init_random(model, seed)
    return _patcher(model)


def _random_state_dict(dm: torch.nn.Module, seed: int) -> dict:
    """``dm`` with random weights (:func:`init_random`), as a checkpoint's state dict (``model.diffusion_model.``)."""
    init_random(dm, seed)
    return {f"model.diffusion_model.{k}": v for k, v in dm.state_dict().items()}


def _loaded_dit_patcher(cfg: Any, dm: torch.nn.Module, sd: dict, params: Optional[dict] = None) -> Any:
    """The float32 model ``cfg`` builds from ``sd`` with ``dm``'s weights loaded, patched, its ``detected_config``
    set. ``params`` go into ``cfg.unet_config`` first: detection assumes the real model's head and text widths."""
    import comfy.model_management as mm

    if params is not None:
        cfg.unet_config.update(params)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model(sd, "model.diffusion_model.", device=mm.unet_offload_device())
    model.diffusion_model.load_state_dict(dm.state_dict(), strict=True)
    patcher = _patcher(model)
    patcher.detected_config = type(cfg).__name__
    return patcher


def small_sd15_model(inpaint: bool = False, seed: int = 0, model_channels: int = 32, cached: bool = True):
    """A ``ModelPatcher`` around a random-weight SD1.5-layout ``BaseModel`` (EPS, float32, CPU).

    ``inpaint=True`` gives the 9-channel inpainting variant (``concat_keys`` mask + masked_image).
    ``cached=True`` returns one shared instance per argument set: callers must not mutate it (nodes
    clone before patching, which is what the tests check).
    """
    key = (bool(inpaint), int(seed), int(model_channels))
    if cached and key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    import comfy.supported_models

    patcher = _random_unet_patcher(comfy.supported_models.SD15(sd15_unet_config(9 if inpaint else 4, model_channels)),
                                   seed)
    # what a core loader registers: a factory for a fresh copy (MultiGPU's deep clones reload from it)
    patcher.cached_patcher_init = (small_sd15_model, (inpaint, seed, model_channels, False))
    if cached:
        _MODEL_CACHE[key] = patcher
    return patcher


def small_sdxl_model(seed: int = 0):
    """A random-weight SDXL-layout UNet (3 levels, ``model_channels`` 64, one transformer per block,
    ``context_dim`` 2048, ADM 2816): checks that nothing assumes SD1.5 block numbers.

    Conditioning needs ``{"pooled_output": tensor[1, 1280]}``: see :func:`sdxl_conditioning`.
    """
    key = ("sdxl", int(seed))
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    import comfy.supported_models

    unet_config = {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 64, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 1, 1, 1, 1],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": True,
        "context_dim": 2048, "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }
    patcher = _random_unet_patcher(comfy.supported_models.SDXL(unet_config), seed)
    _MODEL_CACHE[key] = patcher
    return patcher


def sdxl_conditioning(seed: int = 0, batch: int = 1) -> list:
    """CLIP-free SDXL CONDITIONING: ``[[tensor[batch, 77, 2048], {"pooled_output": tensor[batch, 1280]}]]``."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, 77, 2048, generator=g), {"pooled_output": torch.randn(batch, 1280, generator=g)}]]


def non_unet_model():
    """A ``ModelPatcher`` whose diffusion model is not a UNet (stands in for DiT / Flux / SD3).

    Built from the small SD1.5 ``BaseModel`` with its ``diffusion_model`` replaced by a tiny module
    that has no ``output_blocks``: the pack must refuse it with a clear message.
    """
    base = small_sd15_model(inpaint=False, seed=123, cached=False).model

    class TinyDiT(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 4)
            self.in_channels = 4
            self.dtype = torch.float32

        def forward(self, x, timesteps=None, context=None, **kwargs):
            return self.proj(x.movedim(1, -1)).movedim(-1, 1)

    base.diffusion_model = TinyDiT()
    return _patcher(base)


_VAE_CACHE: dict[int, Any] = {}


def small_vae(seed: int = 0, ch: int = 32):
    """A random-weight ``comfy.sd.VAE``: ``AutoencoderKL`` with the SD ddconfig at width ``ch``.

    Same 8× downscale and 4 latent channels as the SD VAE, so latents have SD1.5 shapes.
    """
    if (seed, ch) in _VAE_CACHE:
        return _VAE_CACHE[(seed, ch)]
    import comfy.ldm.models.autoencoder
    import comfy.sd

    ddconfig = {
        "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": ch,
        "ch_mult": [1, 2, 4, 4], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0,
    }
    params = {"ddconfig": ddconfig, "embed_dim": 4}
    ae = comfy.ldm.models.autoencoder.AutoencoderKL(**params)
    init_random(ae, seed)
    vae = comfy.sd.VAE(sd=ae.state_dict(), config={"params": params})
    _VAE_CACHE[(seed, ch)] = vae
    return vae


def conditioning(seed: int = 0, batch: int = 1, tokens: int = 77, zero: bool = False) -> list:
    """A CLIP-free CONDITIONING: ``[[tensor[batch, tokens, 768], {}]]`` (random, or zeros)."""
    if zero:
        t = torch.zeros(batch, tokens, 768)
    else:
        g = torch.Generator().manual_seed(seed)
        t = torch.randn(batch, tokens, 768, generator=g)
    return [[t, {}]]


# ---------------------------------------------------------------------------------------------
# Synthetic images
# ---------------------------------------------------------------------------------------------


def synthetic_pair(size: int = 128, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """Reference garment photo + person photo with masks, ComfyUI layouts (IMAGE [B,H,W,3], MASK [B,H,W]).

    The reference shows a striped "garment" rectangle on a light background (garment_mask = the
    rectangle); the target has a grey "person" with a different torso rectangle (target_mask),
    shifted and scaled, so a warp has something to do.
    """
    g = torch.Generator().manual_seed(seed)
    H = W = size
    yy, xx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")

    ref = torch.full((H, W, 3), 0.92)
    gm = ((yy >= H // 4) & (yy < 3 * H // 4) & (xx >= W // 4) & (xx < 3 * W // 4)).float()
    stripes = ((yy // max(1, size // 16)) % 2).float()
    garment = torch.stack([0.2 + 0.6 * stripes, 0.3 + 0.2 * (xx / W), 0.7 - 0.5 * stripes], -1)
    ref = torch.where(gm[..., None] > 0, garment, ref)
    ref = (ref + 0.02 * torch.randn(H, W, 3, generator=g)).clamp(0, 1)

    tgt = torch.full((H, W, 3), 0.75)
    tgt[..., 2] = 0.85
    tm = ((yy >= 3 * H // 8) & (yy < 7 * H // 8) & (xx >= 5 * W // 16) & (xx < 13 * W // 16)).float()
    person = ((xx - W // 2).abs() < W // 5) & (yy > H // 8)
    tgt = torch.where(person[..., None], torch.tensor([0.55, 0.45, 0.4]), tgt)
    tgt = torch.where(tm[..., None] > 0, torch.tensor([0.3, 0.6, 0.3]), tgt)
    tgt = (tgt + 0.02 * torch.randn(H, W, 3, generator=g)).clamp(0, 1)

    def b(x):
        return x[None].expand(batch, *x.shape).contiguous()

    return {"reference": b(ref), "garment_mask": b(gm), "target": b(tgt), "target_mask": b(tm)}


# ---------------------------------------------------------------------------------------------
# Test-only nodes and prompt execution
# ---------------------------------------------------------------------------------------------

OBJECT_TYPES = (
    "MODEL", "VAE", "CLIP", "CONDITIONING", "IMAGE", "MASK", "LATENT", "SIGMAS", "NOISE", "GUIDER", "SAMPLER",
    "INT", "FLOAT", "STRING", "BOOLEAN",
    "MAX4ZERO_MATCHES", "MAX4ZERO_CROP",
)


def loader_id(io_type: str) -> str:
    return f"TestHarnessObject_{io_type}"


def register_object_type(io_type: str) -> str:
    """Register (once) a loader node that outputs an in-memory object of ``io_type``; returns its id.

    The other pack-private types (e.g. the MEA trace handle) can be added by their tests this way.
    """
    import nodes
    from comfy_api.latest import io

    node_id = loader_id(io_type)
    if node_id in nodes.NODE_CLASS_MAPPINGS:
        return node_id
    out_type = io.Custom(io_type)

    class ObjectLoader(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id=node_id,
                category="testing",
                inputs=[io.String.Input("key")],
                outputs=[out_type.Output()],
                not_idempotent=True,
            )

        @classmethod
        def execute(cls, key):
            return io.NodeOutput(_OBJECTS[key])

    ObjectLoader.__name__ = ObjectLoader.__qualname__ = node_id
    nodes.NODE_CLASS_MAPPINGS[node_id] = ObjectLoader
    return node_id


def _register_test_nodes() -> None:
    import nodes
    from comfy_api.latest import io

    for t in OBJECT_TYPES:
        register_object_type(t)

    class Capture(io.ComfyNode):
        @classmethod
        def define_schema(cls):
            return io.Schema(
                node_id="TestHarnessCapture",
                category="testing",
                inputs=[io.AnyType.Input("value"), io.String.Input("name")],
                outputs=[],
                is_output_node=True,
                not_idempotent=True,
            )

        @classmethod
        def execute(cls, value, name):
            _CAPTURED[name] = value
            return io.NodeOutput()

    nodes.NODE_CLASS_MAPPINGS["TestHarnessCapture"] = Capture


class NodeRef:
    """A node in a :class:`Graph`; ``ref[i]`` (or ``ref.out(i)``) is a link to its output ``i``."""

    def __init__(self, node_id: str):
        self.id = node_id

    def out(self, index: int) -> list:
        return [self.id, index]

    __getitem__ = out


class Graph:
    """Builds an API-format prompt (``{id: {"class_type", "inputs"}}``) for :func:`run_prompt`.

    >>> g = Graph()
    >>> model = g.obj(patcher, "MODEL")                 # in-memory object → link
    >>> n = g.node("MaX4ZeroCropToMask", image=g.obj(img, "IMAGE"), mask=..., size=128)
    >>> g.capture(n[0], "crop")                          # output node storing the value
    >>> res = run_prompt(g); res["crop"]
    """

    _ids = itertools.count(1)

    def __init__(self):
        self.nodes: dict[str, dict] = {}

    def node(self, class_type: str, node_id: Optional[str] = None, **inputs) -> NodeRef:
        nid = node_id or str(len(self.nodes) + 1)
        while nid in self.nodes:
            nid = str(int(nid) + 1) if nid.isdigit() else nid + "_"
        self.nodes[nid] = {"class_type": class_type, "inputs": dict(inputs)}
        return NodeRef(nid)

    def obj(self, value: Any, io_type: str) -> list:
        """Pass ``value`` into the graph as an output of type ``io_type``; returns the link."""
        key = f"obj{next(self._ids)}"
        _OBJECTS[key] = value
        return self.node(register_object_type(io_type), key=key)[0]

    def capture(self, link: list, name: str) -> NodeRef:
        """Record the value at ``link`` under ``name`` in the result of :func:`run_prompt`."""
        return self.node("TestHarnessCapture", value=link, name=name)

    def prompt(self) -> dict:
        return {k: {"class_type": v["class_type"], "inputs": dict(v["inputs"])} for k, v in self.nodes.items()}


class PromptFailed(Exception):
    """A prompt failed validation or execution; ``.message`` is what ComfyUI would show the user."""

    def __init__(self, message: str, node_id=None, node_type=None, exception_type=None, details=None):
        super().__init__(f"[{node_type or '?'} #{node_id}] {exception_type or ''}: {message}")
        self.message = message
        self.node_id = node_id
        self.node_type = node_type
        self.exception_type = exception_type
        self.details = details


class StubServer:
    """The parts of ``server.PromptServer`` that ``execution.PromptExecutor`` touches."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.messages: list[tuple[str, Any]] = []

    def send_sync(self, event, data, sid=None):
        self.messages.append((event, data))

    def queue_updated(self):
        pass


@dataclass
class PromptResult:
    captured: dict[str, Any]
    ui: dict[str, Any]
    executor: Any
    server: StubServer
    progress: list[tuple[Any, int, int]] = field(default_factory=list)

    def __getitem__(self, name: str) -> Any:
        return self.captured[name]

    def output(self, node_id: str, index: int = 0) -> Any:
        """Output ``index`` of any executed node (first list item), from the executor's cache."""
        outputs = cached_outputs(self.executor, node_id)
        if outputs is None:
            raise KeyError(f"node {node_id} has no cached output")
        return outputs[index][0]


# ---------------------------------------------------------------------------------------------
# Version differences of ComfyUI's internals (0.3.64 → 0.33). The pack itself needs none of these;
# only this harness touches executor and cache internals.
# ---------------------------------------------------------------------------------------------

#: ``cache_args`` main.py passes in 0.33 (the executor reads "ram"/"ram_inactive" unconditionally there).
_CACHE_ARGS = {"lru": 0, "ram": 0, "ram_inactive": 0}


def cache_types() -> list[str]:
    """The output-cache kinds this ComfyUI offers, by name (``CLASSIC`` always; ``RAM_PRESSURE`` since 2026)."""
    import execution

    names = ["CLASSIC"]
    if hasattr(getattr(execution, "CacheType", None), "RAM_PRESSURE"):
        names.append("RAM_PRESSURE")
    return names


def new_executor(server: Any, cache_type: Optional[str] = None) -> Any:
    """``execution.PromptExecutor`` for this ComfyUI; ``cache_type`` a name from :func:`cache_types`."""
    import inspect

    import execution

    kwargs: dict[str, Any] = {}
    params = inspect.signature(execution.PromptExecutor.__init__).parameters
    if cache_type is not None:
        kwargs["cache_type"] = getattr(execution.CacheType, cache_type)
    if "cache_args" in params:
        kwargs["cache_args"] = dict(_CACHE_ARGS)
    return execution.PromptExecutor(server, **kwargs)


def cached_outputs(executor: Any, node_id: str) -> Optional[list]:
    """A node's cached output lists (``[[value, …] per output]``), or None.

    0.3.64's cache ``get`` is synchronous and returns the list; 0.33's is async and returns
    ``CacheEntry(ui, outputs)``.
    """
    entry = executor.caches.outputs.get(node_id)
    if asyncio.iscoroutine(entry):
        entry = asyncio.run(entry)
    if entry is None:
        return None
    return list(entry.outputs) if hasattr(entry, "outputs") else entry


def evict_outputs(executor: Any, node_id: str) -> bool:
    """Drop one node's cached outputs, as the RAM-pressure cache does under memory pressure.

    Returns whether something was dropped. Works on the caches of both versions (a dict ``cache``
    keyed by the node's cache key).
    """
    cache = executor.caches.outputs
    key_set = getattr(cache, "cache_key_set", None)
    if key_set is None:
        return False
    key = key_set.get_data_key(node_id)
    store = getattr(cache, "cache", None)
    if not isinstance(store, dict) or key not in store:
        return False
    del store[key]
    for extra in ("used_generation", "timestamps", "children"):
        getattr(cache, extra, {}).pop(key, None)
    return True


def state_dict_for_saving(model: Any, clip_sd: dict, vae_sd: dict) -> dict:
    """``BaseModel.state_dict_for_saving`` with the UNet: 0.33 takes ``(unet_sd, clip_sd, vae_sd)``.

    0.3.64 takes ``(clip_sd, vae_sd)`` and reads the UNet itself; calling it the old way on 0.33 silently
    saves CLIP as the UNet.
    """
    import inspect

    params = list(inspect.signature(model.state_dict_for_saving).parameters)
    if params and params[0] == "unet_state_dict":
        return model.state_dict_for_saving(model.diffusion_model.state_dict(), clip_sd, vae_sd)
    return model.state_dict_for_saving(clip_sd, vae_sd)


def run_prompt(prompt: dict | Graph, validate: bool = True, executor: Any = None) -> PromptResult:
    """Validate and execute a prompt with ComfyUI's own ``execution`` module; raise on failure.

    ``executor``: reuse one (from :func:`new_executor`) to keep ComfyUI's output cache between prompts, as
    the server does; by default every prompt gets a fresh executor (nothing cached).

    Raises:
        PromptFailed: validation errors (``exception_type`` = "validation") or the first node error
        (``.message`` holds the node's exception message, ``.node_type`` its class_type).
    """
    import execution

    if isinstance(prompt, Graph):
        prompt = prompt.prompt()
    prompt_id = str(uuid.uuid4())
    if validate:
        ok, err, outputs, node_errors = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        if not ok or node_errors:
            err = err or {"message": "some outputs failed validation", "details": ""}
            detail = "; ".join(
                f"#{nid} {e['class_type']}: " + ", ".join(f"{x['message']}: {x['details']}" for x in e["errors"])
                for nid, e in node_errors.items()
            )
            raise PromptFailed(f"{err['message']}: {err['details']} {detail}", exception_type="validation",
                               details=node_errors)
    else:
        import nodes

        outputs = [k for k, v in prompt.items() if getattr(nodes.NODE_CLASS_MAPPINGS[v["class_type"]], "OUTPUT_NODE", False)]
    if executor is None:
        executor = new_executor(StubServer())
    server = executor.server
    _CAPTURED.clear()
    start = len(PROGRESS)
    executor.execute(prompt, prompt_id, {}, outputs)
    if not executor.success:
        for event, data in executor.status_messages:
            if event == "execution_error":
                raise PromptFailed(
                    data["exception_message"].strip(), data["node_id"], data["node_type"], data["exception_type"],
                    details="".join(data["traceback"]),
                )
        raise PromptFailed("execution failed without an error message", details=executor.status_messages)
    return PromptResult(
        captured=dict(_CAPTURED), ui=executor.history_result.get("outputs", {}), executor=executor, server=server,
        progress=PROGRESS[start:],
    )


# ---------------------------------------------------------------------------------------------
# A tiny Flux (FLUX.1 Fill layout) from ComfyUI's own classes
# ---------------------------------------------------------------------------------------------

#: FluxParams of the tiny test Flux: hidden 128, 2 heads of 64 (axes 16 + 24 + 24), 2 double + 2 single
#: blocks, Fill layout (in_channels 96 = 16 noisy latent + 16 masked image + 64 packed 8×8 pixel mask).
TINY_FLUX_PARAMS = {
    "image_model": "flux", "in_channels": 96, "out_channels": 16, "vec_in_dim": 32, "context_in_dim": 64,
    "hidden_size": 128, "mlp_ratio": 2.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [16, 24, 24], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
    "txt_ids_dims": [],
}


def small_flux_model(seed: int = 0, in_channels: int = 96, global_modulation: bool = False, cached: bool = True):
    """A ``ModelPatcher`` around a random-weight Flux built from ComfyUI's classes (float32, CPU).

    The state dict of a ``comfy.ldm.flux.model.Flux`` with :data:`TINY_FLUX_PARAMS` goes through
    ``model_detection.model_config_from_unet`` (prefix ``model.diffusion_model.``): with 96 input channels
    ComfyUI detects ``FluxInpaint`` (FLUX.1 Fill). Detection assumes FLUX.1's head width (128) and axes,
    so the detected config gets the tiny model's params before the model is built and loaded.

    ``global_modulation=True`` (shared modulation, as FLUX.2 has; what core ``FluxKVCache``'s
    ``index_timestep_zero`` needs) keeps the FLUX.1 token layout; detection would call that state dict FLUX.2,
    so the ``Flux`` config is used directly.
    """
    key = ("flux", int(seed), int(in_channels), bool(global_modulation))
    if cached and key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    import comfy.model_detection
    import comfy.ops
    import dataclasses

    from comfy.ldm.flux.model import Flux, FluxParams

    known = {f.name for f in dataclasses.fields(FluxParams)}  # 0.3.64 has no txt_ids_dims
    params = {k: v for k, v in dict(TINY_FLUX_PARAMS, in_channels=in_channels).items() if k in known}
    if global_modulation:
        params["global_modulation"] = True
    dm = Flux(operations=comfy.ops.disable_weight_init, dtype=torch.float32, **params)
    sd = _random_state_dict(dm, seed)
    if global_modulation:
        import comfy.supported_models

        cfg = comfy.supported_models.Flux(dict(params, image_model="flux"))
    else:
        cfg = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    if cfg is None:
        raise RuntimeError("ComfyUI did not detect the tiny Flux state dict")
    patcher = _loaded_dit_patcher(cfg, dm, sd, params)
    patcher.cached_patcher_init = (small_flux_model, (seed, in_channels, global_modulation, False))
    if cached:
        _MODEL_CACHE[key] = patcher
    return patcher


#: FluxParams of a tiny FLUX.2 of the real layout (ComfyUI 0.33 detects it as ``Flux2``): hidden 256, 2 heads of
#: 128 (RoPE axes 32 × 4), 2 double + 2 single blocks, 1×1 patches of a 128-channel latent, shared modulation.
TINY_FLUX2_PARAMS = {
    "image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None, "context_in_dim": 64,
    "hidden_size": 256, "mlp_ratio": 3.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [32, 32, 32, 32], "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": True,
    "txt_ids_dims": [3], "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
    "default_ref_method": "index", "ref_index_scale": 10.0,
}


def small_flux2_model(seed: int = 0, variant: str = "dev"):
    """A ``ModelPatcher`` around a random-weight FLUX.2 (``"dev"``: guidance embedding; ``"klein"``: none),
    detected by ComfyUI's own ``model_detection`` from the state dict (``Flux2``; 0.33 and newer only)."""
    key = ("flux2", int(seed), variant)
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    import comfy.model_detection
    import comfy.ops

    from comfy.ldm.flux.model import Flux

    params = dict(TINY_FLUX2_PARAMS, guidance_embed=variant == "dev")
    dm = Flux(operations=comfy.ops.disable_weight_init, dtype=torch.float32, **params)
    sd = _random_state_dict(dm, seed)
    cfg = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    if cfg is None or type(cfg).__name__ != "Flux2":
        raise RuntimeError(f"ComfyUI did not detect the tiny FLUX.2 state dict as Flux2 (got {cfg!r})")
    patcher = _loaded_dit_patcher(cfg, dm, sd)
    _MODEL_CACHE[key] = patcher
    return patcher


#: QwenImageTransformer2DModel kwargs of a tiny Qwen-Image: 2 heads of 32 (RoPE axes 8/12/12), 2 joint blocks, text
#: width 64, 2×2 patches of Wan 2.1's 16-channel latent (what ComfyUI's detection does not read from the weights).
TINY_QWEN_PARAMS = {"patch_size": 2, "in_channels": 64, "out_channels": 16, "num_layers": 2, "attention_head_dim": 32,
                    "num_attention_heads": 2, "joint_attention_dim": 64, "axes_dims_rope": (8, 12, 12)}


def small_qwen_image_model(seed: int = 0):
    """A ``ModelPatcher`` around a random-weight Qwen-Image(-Edit) (``QwenImageTransformer2DModel``), detected by
    ComfyUI's ``model_detection`` as ``QwenImage``; the tiny sizes are put in the detected config before the model
    is built (detection assumes the real head width and text width)."""
    key = ("qwen_image", int(seed))
    if key in _MODEL_CACHE:
        return _MODEL_CACHE[key]
    import comfy.model_detection
    import comfy.ops

    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    dm = QwenImageTransformer2DModel(operations=comfy.ops.disable_weight_init, dtype=torch.float32, **TINY_QWEN_PARAMS)
    sd = _random_state_dict(dm, seed)
    cfg = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    if cfg is None or type(cfg).__name__ != "QwenImage":
        raise RuntimeError(f"ComfyUI did not detect the tiny Qwen-Image state dict as QwenImage (got {cfg!r})")
    patcher = _loaded_dit_patcher(cfg, dm, sd, TINY_QWEN_PARAMS)
    _MODEL_CACHE[key] = patcher
    return patcher


class _AreaMixVAE:
    """A deterministic stand-in VAE: the image's mean over ``_DOWNSCALE``-px cells, mixed into ``_CHANNELS`` latent
    channels by a fixed random matrix (seeded). Only what the nodes call: ``encode``, ``spacial_compression_encode``."""

    _CHANNELS = 16
    _DOWNSCALE = 8

    def __init__(self, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.randn(self._CHANNELS, 3, generator=g)

    def spacial_compression_encode(self) -> int:
        return self._DOWNSCALE

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.avg_pool2d(image[..., :3].movedim(-1, 1).float(), self._DOWNSCALE)
        return torch.einsum("oc,bchw->bohw", self.mix, x * 2 - 1)


class StubWanVAE(_AreaMixVAE):
    """Qwen-Image's VAE as the node sees it (Wan 2.1: 16 channels at 8×, one frame): area mean + fixed mix,
    [1, 16, 1, h, w]."""

    def encode(self, image: torch.Tensor) -> torch.Tensor:
        return super().encode(image)[:, :, None]


def qwen_conditioning(seed: int = 0, tokens: int = 8, padding: int = 0, reference_latents: Optional[list] = None,
                      pad_values: Optional[torch.Tensor] = None) -> list:
    """CONDITIONING for the tiny Qwen-Image: text [1, tokens, 64] whose last ``padding`` tokens are padding (an int
    ``attention_mask`` [1, tokens], as Qwen's text encoder gives a padded batch; their values ``pad_values`` when
    given), and optionally reference latents [1, 16, 1, h, w] (Qwen-Image-Edit's ``reference_latents``)."""
    g = torch.Generator().manual_seed(seed)
    text = torch.randn(1, tokens, 64, generator=g)
    opts: dict = {}
    if padding:
        if pad_values is not None:
            text[:, tokens - padding :] = pad_values
        mask = torch.ones(1, tokens, dtype=torch.long)
        mask[:, tokens - padding :] = 0
        opts["attention_mask"] = mask
    if reference_latents is not None:
        opts["reference_latents"] = list(reference_latents)
    return [[text, opts]]


class StubFlux2VAE(_AreaMixVAE):
    """FLUX.2's latent as the model sees it: 128 channels at 16× (32 VAE channels, 2×2-patchified): area mean +
    fixed mix, deterministic."""

    _CHANNELS = 128
    _DOWNSCALE = 16


def flux2_conditioning(seed: int = 0, variant: str = "dev", tokens: int = 8, reference_latents: Optional[list] = None,
                       method: Optional[str] = None) -> list:
    """CONDITIONING for the tiny FLUX.2: text [1, tokens, 64] (the model pads it to 512 in ``extra_conds``), the
    guidance for dev, and optionally ReferenceLatent's ``reference_latents`` [1, 128, h, w] (and a method)."""
    g = torch.Generator().manual_seed(seed)
    opts: dict = {"guidance": 3.5} if variant == "dev" else {}
    if reference_latents is not None:
        opts["reference_latents"] = list(reference_latents)
    if method is not None:
        opts["reference_latents_method"] = method
    return [[torch.randn(1, tokens, 64, generator=g), opts]]


class DitBlockSpy:
    """Records, per MEA block call of the DiT adapter, the block's own attention and MEA's result
    (``joint_extended_attention`` in ``nodes/mea_flux.py``), with the shapes of q, k and the garment keys."""

    def __init__(self, monkeypatch: Any, module: str = "nodes.mea_flux"):
        self.calls: list[dict] = []
        mf = pack_module(module)
        real = mf.joint_extended_attention

        def spy(q, k, v, k_ref, v_ref, region, start, base, *a, **kw):
            out = real(q, k, v, k_ref, v_ref, region, start, base, *a, **kw)
            self.calls.append({"q": q.shape, "k": k.shape, "k_ref": k_ref.shape, "region": region.clone(),
                               "start": start, "base": base.clone(), "out": out.clone()})
            return out

        monkeypatch.setattr(mf, "joint_extended_attention", spy)

    def check_outside_unchanged(self) -> None:
        """Every row but the region's image rows (text, other image rows, appended reference-latent rows) equals
        the block's own attention bit for bit; some region row changed."""
        assert self.calls, "MEA ran in no block"
        changed = 0
        for c in self.calls:
            keep = torch.ones(c["base"].shape[:2], dtype=torch.bool)
            n = c["region"].shape[-1]
            keep[:, c["start"] : c["start"] + n] = ~c["region"].expand(keep.shape[0], -1)
            assert c["start"] > 0  # text tokens come first
            assert torch.equal(c["out"][keep], c["base"][keep])  # text + outside region: bit for bit
            changed += int(not torch.equal(c["out"][~keep], c["base"][~keep]))
        assert changed, "MEA changed no region query"


def flux_conditioning(seed: int = 0, tokens: int = 8, guidance: float = 3.5) -> list:
    """CLIP/T5-free Flux CONDITIONING for the tiny Flux: text [1, tokens, 64], pooled [1, 32], guidance."""
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, tokens, 64, generator=g),
             {"pooled_output": torch.randn(1, 32, generator=g), "guidance": guidance}]]


class StubFluxVAE(_AreaMixVAE):
    """A deterministic stand-in VAE with Flux's 16 latent channels and 8× downscale (area mean + fixed mix)."""


def patch_of(patched: Any) -> Any:
    """The frozen MeaPatch behind a patched ModelPatcher (its APPLY_MODEL wrapper is a bound method)."""
    return patched.wrappers["apply_model"]["max4zero_mea"][0].__self__


def mea_run(node_id: Any, latent: torch.Tensor) -> Any:
    """The sampling run MEA node ``node_id``'s model made ``latent`` in (the pack's run registry): its ``stats``
    (reference passes, MEA calls, …) and ``records``. Raises when there is none."""
    trace = pack_module("nodes.trace")
    run = trace.RUNS.get(trace.samples_key(latent), str(node_id))
    if run is None:
        raise AssertionError(f"no run of MEA node {node_id} made this latent")
    return run


class ReferenceLog:
    """Which recorded reference K/V each MEA call of either adapter reads (``reference_every`` tests).

    Spies on ``WorkerState.keep`` (every recording: the sigma and schedule step it was made at) and on the
    constructor of the adapter's per-call attention object in ``use`` mode (``Attn1Replace`` for a UNet,
    ``FluxAttention`` for Flux), which is handed the store the call reads. ``recorded``: ``[(sigma, step)]``
    in order; ``uses``: ``{(call sigma, call step, recorded sigma, recorded step)}``.
    """

    def __init__(self, monkeypatch: Any) -> None:
        import inspect

        self.recorded: list[tuple[float, Optional[int]]] = []
        self.uses: set[tuple] = set()
        self._stores: dict[int, tuple[Any, float, Optional[int]]] = {}  # the stores stay alive: ids stay unique
        run_cls = pack_module("attention.run").WorkerState
        real_keep = run_cls.keep

        def keep(state, store, sigma, step=None):
            self.recorded.append((sigma, step))
            self._stores[id(store)] = (store, sigma, step)
            return real_keep(state, store, sigma, step)

        monkeypatch.setattr(run_cls, "keep", keep)
        for cls in (pack_module("nodes.mea_replace").Attn1Replace, pack_module("nodes.mea_flux").FluxAttention):
            real_init = cls.__init__
            sig = inspect.signature(real_init)

            def init(obj, *args, _real=real_init, _sig=sig, **kwargs):
                bound = _sig.bind(obj, *args, **kwargs).arguments
                if bound["mode"] == "use":
                    call = bound.get("rows") or bound.get("call")
                    _, sigma, step = self._stores[id(bound["store"])]
                    self.uses.add((call.sigma, call.step, sigma, step))
                _real(obj, *args, **kwargs)

            monkeypatch.setattr(cls, "__init__", init)

    def recorded_steps(self) -> list[Optional[int]]:
        return [step for _, step in self.recorded]

    def clear(self) -> None:
        self.recorded.clear()
        self.uses.clear()
        self._stores.clear()
