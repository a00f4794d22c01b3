"""Support for the real-browser check of the shipped workflows (``test_browser_workflows.py``).

What it does:

* :func:`skip_reason` — why the browser check cannot run here (no ``COMFYUI_PATH``, no system
  Chromium, no Python ``playwright``), or ``None``.
* :func:`ensure_models` — random-weight model files named as the workflows expect, built from
  ComfyUI's own classes in a child process and cached under ``/tmp/max4zero-browser-models/<version>``
  (override with ``MAX4ZERO_BROWSER_CACHE``):

  - ``sd-v1-5-inpainting.ckpt``: SD1.5 9-channel inpainting checkpoint (saved as a torch pickle with a
    ``state_dict``, the layout of the real ``.ckpt`` file, since ComfyUI picks the loader by extension). ``model_channels`` 320 and
    ``context_dim`` 768 (what ``comfy/supported_models.SD15`` matches on) but a *reduced block layout*:
    one res block per level and ``channel_mult`` (1, 1, 1, 1), so it still detects as SD15 and runs
    fast on a CPU. Full-size random CLIP-L text encoder and full-size random SD VAE.
  - ``garment_detail_lora.safetensors``: a LoRA with ``lora_unet_*`` up/down/alpha keys for a few
    real self-/cross-attention projections of that UNet (names from ``comfy.lora.model_lora_keys_unet``).
  - ``control_v11p_sd15_openpose_fp16.safetensors``: a random ControlNet with the same reduced SD1.5
    layout (a ControlNet's residuals must line up with the UNet's blocks).
  - ``sam3.1_multiplex_fp16.safetensors`` and ``birefnet.safetensors``: PLACEHOLDERS for the masks workflow
    (listed in their combos so that the workflow loads without a missing-model dialog; never loaded: the
    workflow is not queued, it needs the real SAM 3.1 and BiRefNet weights).
  - ``flux1-fill-dev.safetensors``, ``clip_l.safetensors``, ``t5xxl_fp16.safetensors``, ``ae.safetensors``:
    PLACEHOLDERS for the Flux Fill workflow, replaced by the real-layout files of :func:`ensure_flux` when
    that workflow is queued (see there).
  - ``sd_xl_base_1.0_inpainting_0.1.safetensors``: a PLACEHOLDER (not a loadable checkpoint). ``supported_models.SDXL``
    matches ``transformer_depth`` [0, 0, 2, 2, 10, 10] exactly, i.e. the full 2.6 B-parameter UNet
    (plus the 695 M CLIP-G): ~5 GB on disk, ~13 GB of RAM in float32 on CPU. Too heavy for this
    check; the SDXL workflow is loaded, checked and converted in the browser, not queued.

* :func:`ensure_flux` — the Flux Fill workflow's files, random weights, cached like the others:

  - ``flux1-fill-dev.safetensors``: a FLUX.1 Fill diffusion model with the real key layout and a reduced size
    (hidden 256 = 2 heads of 128, 2 double + 2 single blocks, 384 input channels, T5 width 4096, CLIP-L pooled
    768, guidance embedding): ``UNETLoader`` detects it as ``FluxInpaint``, as it does the real file.
  - ``clip_l.safetensors``: a full-size random CLIP-L text model (fp16).
  - ``t5xxl_fp8_e4m3fn.safetensors``: a full-size random T5-XXL encoder (4.76 B parameters) stored in
    float8_e4m3fn, the layout of the public ``t5xxl_fp8_e4m3fn.safetensors``: DualCLIPLoader only knows the XXL
    config for Flux, and fp8 halves the file and the RAM (~5 GB on disk, ~11 GB peak while encoding, ~30 s per
    prompt on 2 cores). The queued prompt loads it instead of ``t5xxl_fp16.safetensors``.
  - ``ae.safetensors``: a full-size random Flux VAE (16 latent channels, no quant convs).

* :func:`make_base_dir` — a throwaway ComfyUI ``--base-directory`` (models, input, output, temp,
  user, custom_nodes with a symlink to this pack); nothing is written into the ComfyUI checkout.
* :class:`ComfyServer` — ``main.py --cpu`` on 127.0.0.1 and a free port, log captured to a file.
* :func:`launch_browser` — the system Chromium driven by Playwright (no browser download).

Run ``python browser_support.py build DIR`` (with ``COMFYUI_PATH`` set) to build the model files
by hand.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Optional

from comfy_models import state_dict_for_saving  # imports nothing from ComfyUI at module level

PACK_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_INPUTS = PACK_ROOT / "example_inputs"
WORKFLOWS_DIR = PACK_ROOT / "workflows"
# The README shows these; MAX4ZERO_SCREENSHOT_DIR sends them elsewhere (e.g. to keep the work tree clean).
SCREENSHOT_DIR = Path(os.environ.get("MAX4ZERO_SCREENSHOT_DIR", "") or PACK_ROOT / "docs" / "screenshots")

# Bump when anything in _build() changes: the cache key.
MODEL_VERSION = "v3-realnames-sd15small320ckpt-cnet-lora-placeholders-flux"
CACHE_ROOT = Path(os.environ.get("MAX4ZERO_BROWSER_CACHE", "/tmp/max4zero-browser-models"))

CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
    "--disable-dev-shm-usage",
]

#: The workflows' one place for size and steps (core PrimitiveInt nodes, by title) as the browser checks reduce it:
#: every dependent widget is linked to these, so a reduction changes them, not the samplers' or crops' widgets.
REDUCED_CONTROLS = {"Working size": 128, "Total steps": 4, "Stage 1 ends at step": 3}

# Where each model file goes in the base directory.
SD15_FILE = "sd-v1-5-inpainting.ckpt"
SDXL_FILE = "sd_xl_base_1.0_inpainting_0.1.safetensors"
LORA_FILE = "garment_detail_lora.safetensors"
CONTROLNET_FILE = "control_v11p_sd15_openpose_fp16.safetensors"
MODEL_FILES = {
    SD15_FILE: "checkpoints",
    SDXL_FILE: "checkpoints",
    LORA_FILE: "loras",
    CONTROLNET_FILE: "controlnet",
    "sam3.1_multiplex_fp16.safetensors": "checkpoints",
    "birefnet.safetensors": "background_removal",
    "flux1-fill-dev.safetensors": "diffusion_models",
    "clip_l.safetensors": "text_encoders",
    "t5xxl_fp16.safetensors": "text_encoders",
    "ae.safetensors": "vae",
    "flux-2-klein-4b-fp8.safetensors": "diffusion_models",
    "qwen_3_4b.safetensors": "text_encoders",
    "flux2-vae.safetensors": "vae",
    "qwen_image_edit_2511_fp8mixed.safetensors": "diffusion_models",
    "qwen_2.5_vl_7b_fp8_scaled.safetensors": "text_encoders",
    "qwen_image_vae.safetensors": "vae",
}
# Placeholders: present so the combo lists contain them, never loaded.
PLACEHOLDER_MODELS = {SDXL_FILE, "sam3.1_multiplex_fp16.safetensors", "birefnet.safetensors",
                      "flux1-fill-dev.safetensors", "clip_l.safetensors", "t5xxl_fp16.safetensors", "ae.safetensors"}
#: Placeholders added after the model cache's version (MODEL_VERSION): written into the base directory itself, so
#: the cached models need no rebuild (the FLUX.2 klein and Qwen-Image-Edit workflows' files).
LATE_PLACEHOLDERS = {"flux-2-klein-4b-fp8.safetensors", "qwen_3_4b.safetensors", "flux2-vae.safetensors",
                     "qwen_image_edit_2511_fp8mixed.safetensors", "qwen_2.5_vl_7b_fp8_scaled.safetensors",
                     "qwen_image_vae.safetensors"}

# The shipped sample inputs (example_inputs/, the names the workflows load), copied into input/ as a user would.
INPUT_IMAGES = sorted(p.name for p in EXAMPLE_INPUTS.glob("max4zero_*.png"))


# ---------------------------------------------------------------------------------------------
# Skips
# ---------------------------------------------------------------------------------------------


def chromium_path() -> Optional[str]:
    """The system Chromium binary (``MAX4ZERO_CHROMIUM`` overrides), or None."""
    env = os.environ.get("MAX4ZERO_CHROMIUM", "").strip()
    if env:
        return env if os.path.isfile(env) and os.access(env, os.X_OK) else None
    for cand in CHROMIUM_CANDIDATES:
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return shutil.which("chromium")


def skip_reason() -> Optional[str]:
    """Why the browser check cannot run here, or None when it can."""
    if not os.environ.get("COMFYUI_PATH", "").strip():
        return "COMFYUI_PATH is not set: the browser check needs a ComfyUI checkout"
    root = Path(os.environ["COMFYUI_PATH"])
    if not (root / "main.py").is_file():
        return f"COMFYUI_PATH={root} has no main.py"
    if chromium_path() is None:
        return ("no system Chromium (apt-get install chromium), or MAX4ZERO_CHROMIUM is set to a path that is "
                "not an executable")
    if importlib.util.find_spec("playwright") is None:
        return "Python package 'playwright' is not installed (pip install playwright; no browser download needed)"
    if importlib.util.find_spec("comfyui_frontend_package") is None:
        return "comfyui-frontend-package is not installed in this Python (pip install -r ComfyUI/requirements.txt)"
    return None


# ---------------------------------------------------------------------------------------------
# Random-weight model files (built in a child process: keeps the ~1 GB of tensors out of pytest)
# ---------------------------------------------------------------------------------------------


def sd15_small_unet_config(in_channels: int) -> dict:
    """SD1.5-detectable UNet config with the cheapest block layout detection still maps to SD15."""
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": in_channels, "model_channels": 320,
        "num_res_blocks": [1, 1, 1, 1], "channel_mult": [1, 1, 1, 1],
        "transformer_depth": [1, 1, 1, 0], "transformer_depth_middle": 1,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 0, 0],
        "use_linear_in_transformer": False, "context_dim": 768,
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def comfyui_version(comfyui_path: str) -> str:
    """The ``__version__`` in ComfyUI's ``comfyui_version.py`` (read as text, nothing imported)."""
    import re

    text = (Path(comfyui_path) / "comfyui_version.py").read_text()
    found = re.search(r"__version__\s*=\s*[\"']([^\"']+)", text)
    return found.group(1) if found else "unknown"


def _built(comfyui_path: str, cache_root: Path, version: str, command: str, what: str, timeout: float) -> Path:
    """``cache_root/<version>-comfyui<x.y.z>``, built on first use by ``python browser_support.py <command> DIR``
    in a child process (which writes ``DONE.json`` last)."""
    cache = Path(cache_root) / f"{version}-comfyui{comfyui_version(comfyui_path)}"
    done = cache / "DONE.json"
    if done.is_file():
        return cache
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), command, str(cache)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not done.is_file():
        raise RuntimeError(f"building {what} failed (rc {proc.returncode}):\n"
                           f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return cache


def ensure_models(comfyui_path: str, cache_root: Path = CACHE_ROOT, timeout: float = 900) -> Path:
    """The cache folder holding every file of :data:`MODEL_FILES`; builds it on first use."""
    return _built(comfyui_path, cache_root, MODEL_VERSION, "build", "the random-weight models", timeout)


FLUX_VERSION = "flux-fill-v1-hidden256-t5xxl-fp8"
#: The Flux Fill workflow's files and their folders (see :func:`ensure_flux`).
FLUX_T5_FP8 = "t5xxl_fp8_e4m3fn.safetensors"
FLUX_FILES = {"flux1-fill-dev.safetensors": "diffusion_models", "clip_l.safetensors": "text_encoders",
              FLUX_T5_FP8: "text_encoders", "ae.safetensors": "vae"}
#: Reduced FLUX.1 Fill: detection reads hidden size, widths and block counts from the weights (heads of 128).
FLUX_FILL_PARAMS = {
    "image_model": "flux", "in_channels": 96, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
    "hidden_size": 256, "mlp_ratio": 4.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
    "txt_ids_dims": [],
}
#: RAM the Flux Fill run needs (the fp8 T5-XXL while it encodes), checked before building or queueing.
FLUX_MIN_AVAILABLE_GB = 13.0


def available_ram_gb() -> Optional[float]:
    """``MemAvailable`` from /proc/meminfo in GiB, or None where there is no such file."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        return None
    return None


def _ram_skip_reason(what: str, needed_gb: float) -> Optional[str]:
    """Why a run that loads ``what`` cannot be queued here (less than ``needed_gb`` GiB of RAM available), or None."""
    free = available_ram_gb()
    if free is not None and free < needed_gb:
        return f"queueing {what}: {free:.1f} GiB of RAM available, {needed_gb:.0f} needed"
    return None


def klein_skip_reason() -> Optional[str]:
    """Why the FLUX.2 klein workflow cannot be queued here (too little free RAM for the Qwen3-4B), or None."""
    return _ram_skip_reason("the FLUX.2 klein workflow loads a full-size Qwen3-4B text encoder (fp8, ~4.4 GB, more "
                            "while it encodes)", KLEIN_MIN_AVAILABLE_GB)


#: RAM the klein run needs (the fp8 Qwen3-4B while it encodes), checked before building or queueing.
KLEIN_MIN_AVAILABLE_GB = 10.0


def flux_skip_reason() -> Optional[str]:
    """Why the Flux Fill workflow cannot be queued here (too little free RAM for the T5-XXL), or None."""
    return _ram_skip_reason("the Flux Fill workflow loads a full-size T5-XXL (fp8, ~11 GB peak)",
                            FLUX_MIN_AVAILABLE_GB)


def ensure_flux(comfyui_path: str, cache_root: Path = CACHE_ROOT, timeout: float = 1200) -> Path:
    """The cache folder holding every file of :data:`FLUX_FILES`; builds it on first use (~1 min, ~6 GB RAM)."""
    return _built(comfyui_path, cache_root, FLUX_VERSION, "build-flux", "the Flux Fill files", timeout)


def _build_flux(out: Path) -> None:
    """Child-process entry: the Flux Fill workflow's four files (see :func:`ensure_flux`), each checked the way
    its loader detects it."""
    import torch

    _child_comfyui()
    import comfy.ldm.models.autoencoder as ae
    import comfy.ops
    import comfy.sd1_clip
    import comfy.text_encoders.sd3_clip
    import comfy.utils
    from comfy.ldm.flux.model import Flux

    t0 = time.time()
    log: dict[str, Any] = {}

    # --- the diffusion model: UNETLoader detects FluxInpaint from the keys and widths -------------------
    dm = Flux(operations=comfy.ops.disable_weight_init, dtype=torch.float32, **FLUX_FILL_PARAMS)
    _init_random(dm, 31)
    log["flux_params"] = _save_detected_dit(_half(dm.state_dict()), "FluxInpaint", "Flux Fill",
                                            out / "flux1-fill-dev.safetensors")

    # --- CLIP-L (full size) ---------------------------------------------------------------------
    clip_l = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float16)
    _init_random(clip_l, 32)
    comfy.utils.save_torch_file(_half(clip_l.transformer.state_dict()), str(out / "clip_l.safetensors"))
    del clip_l

    # --- T5-XXL (full size, float8_e4m3fn), filled tensor by tensor: no float32 copy of 4.76 B weights ------
    t5 = comfy.text_encoders.sd3_clip.T5XXLModel(device="cpu", dtype=torch.float8_e4m3fn)
    g = torch.Generator().manual_seed(33)
    with torch.no_grad():
        for name, p in t5.transformer.named_parameters():
            if p.ndim == 1:  # RMSNorm scales
                p.copy_(torch.ones(p.shape).to(p.dtype))
                continue
            std = 1.0 if ("shared" in name or "relative_attention_bias" in name) else p.shape[-1] ** -0.5
            p.copy_((torch.randn(p.shape, generator=g) * std).to(p.dtype))
    t5_sd = {k: v.contiguous() for k, v in t5.transformer.state_dict().items()}
    log["t5_params"] = sum(v.numel() for v in t5_sd.values())
    comfy.utils.save_torch_file(t5_sd, str(out / FLUX_T5_FP8))
    del t5, t5_sd

    # --- Flux VAE (full size): 16 latent channels, no quant convs ----------------------------------
    ddconfig = dict(SD_VAE_DDCONFIG, z_channels=16)
    vae = ae.AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    _save_checked_vae(vae, 34, 16, None, "the random Flux VAE is not read as a 16-channel VAE", out / "ae.safetensors")

    _write_done(out, log, t0)


KLEIN_VERSION = "flux2-klein-v1-hidden256-qwen3-4b-fp8"
#: The FLUX.2 klein workflow's files and their folders (see :func:`ensure_klein`).
KLEIN_FILES = {"flux-2-klein-4b-fp8.safetensors": "diffusion_models", "qwen_3_4b.safetensors": "text_encoders",
               "flux2-vae.safetensors": "vae"}
#: FluxParams of the reduced klein: FLUX.2's layout (1x1 patches of 128 channels, shared modulation, 4 RoPE axes,
#: no guidance embedding) at hidden 256 with 2 + 2 blocks; text width 7680 = Qwen3-4B's three tapped layers.
KLEIN_PARAMS = {
    "image_model": "flux2", "in_channels": 128, "out_channels": 128, "vec_in_dim": None, "context_in_dim": 7680,
    "hidden_size": 256, "mlp_ratio": 3.0, "num_heads": 2, "depth": 2, "depth_single_blocks": 2,
    "axes_dim": [32, 32, 32, 32], "theta": 2000, "patch_size": 1, "qkv_bias": False, "guidance_embed": False,
    "txt_ids_dims": [3], "global_modulation": True, "mlp_silu_act": True, "ops_bias": False,
    "default_ref_method": "index", "ref_index_scale": 10.0,
}


def ensure_klein(comfyui_path: str, cache_root: Path = CACHE_ROOT, timeout: float = 1800) -> Path:
    """The cache folder holding every file of :data:`KLEIN_FILES`; builds it on first use (a full-size random
    Qwen3-4B in fp8: ~4.4 GB on disk)."""
    return _built(comfyui_path, cache_root, KLEIN_VERSION, "build-klein", "the FLUX.2 klein files", timeout)


def _build_klein(out: Path) -> None:
    """Child-process entry: the klein workflow's three files, each checked the way its loader detects it."""
    import torch

    _child_comfyui()
    import comfy.ldm.models.autoencoder as ae
    import comfy.ops
    import comfy.sd
    import comfy.text_encoders.flux
    import comfy.utils
    from comfy.ldm.flux.model import Flux

    t0 = time.time()
    log: dict[str, Any] = {}
    # --- the diffusion model: UNETLoader detects Flux2 from the keys ---------------------------------
    dm = Flux(operations=comfy.ops.disable_weight_init, dtype=torch.float32, **KLEIN_PARAMS)
    _init_random(dm, 41)
    log["klein_params"] = _save_detected_dit(_half(dm.state_dict()), "Flux2", "klein",
                                             out / "flux-2-klein-4b-fp8.safetensors")
    del dm

    # --- Qwen3-4B (full size: ComfyUI's config is fixed), float8_e4m3fn, filled tensor by tensor ------------
    te = comfy.text_encoders.flux.Qwen3_4BModel(device="cpu", dtype=torch.float8_e4m3fn)
    _fill_random(te.transformer, 42)  # every 1-d tensor is an RMSNorm scale (named *norm*): all 1
    te_sd = {k: v.contiguous() for k, v in te.transformer.state_dict().items()}
    log["te_params"] = sum(v.numel() for v in te_sd.values())
    del te
    if comfy.sd.detect_te_model(te_sd) != comfy.sd.TEModel.QWEN3_4B:
        raise RuntimeError("the random Qwen3-4B is not detected as Qwen3-4B")
    comfy.utils.save_torch_file(te_sd, str(out / "qwen_3_4b.safetensors"))
    del te_sd

    # --- FLUX.2 VAE (full size): 32 latent channels, a batch-norm over 2x2-patchified latents (128 channels) ---
    # (ComfyUI reads the batch norm only in the quant-conv layout, AutoencoderKL, as the real file has it)
    vae = ae.AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG, z_channels=32, batch_norm_latent=True), embed_dim=32)
    _save_checked_vae(vae, 43, 128, (1, 128, 2, 2), "the random FLUX.2 VAE is not read as a 128-channel VAE at 16x",
                      out / "flux2-vae.safetensors")

    _write_done(out, log, t0)


QWEN_VERSION = "qwen-image-edit-v1-2blocks-qwen25vl7b-fp8-wan-dim32"
#: The Qwen-Image-Edit workflow's files and their folders (see :func:`ensure_qwen`).
QWEN_FILES = {"qwen_image_edit_2511_fp8mixed.safetensors": "diffusion_models",
              "qwen_2.5_vl_7b_fp8_scaled.safetensors": "text_encoders", "qwen_image_vae.safetensors": "vae"}
#: RAM the Qwen-Image-Edit run needs (the fp8 Qwen2.5-VL 7B while it encodes), checked before building or queueing.
QWEN_MIN_AVAILABLE_GB = 14.0


def qwen_skip_reason() -> Optional[str]:
    """Why the Qwen-Image-Edit workflow cannot be queued here (too little free RAM for its text encoder), or None."""
    return _ram_skip_reason("the Qwen-Image-Edit workflow loads a full-size Qwen2.5-VL 7B text encoder (fp8, "
                            "~8.3 GB, more while it encodes)", QWEN_MIN_AVAILABLE_GB)


def ensure_qwen(comfyui_path: str, cache_root: Path = CACHE_ROOT, timeout: float = 1800) -> Path:
    """The cache folder holding every file of :data:`QWEN_FILES`; builds it on first use (~8.8 GB on disk)."""
    return _built(comfyui_path, cache_root, QWEN_VERSION, "build-qwen", "the Qwen-Image-Edit files", timeout)


def _fill_random(module: Any, seed: int) -> None:
    """Random weights in place, tensor by tensor and row chunk by row chunk (no float32 copy of a whole model):
    norm scales 1, embeddings N(0, 1), other weights N(0, 1/fan_in)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim == 1:
                p.copy_(torch.ones(p.shape).to(p.dtype) if "norm" in name or name.endswith("gamma") else
                        torch.zeros(p.shape).to(p.dtype))
                continue
            std = 1.0 if "embed_tokens" in name else max(1, p[0].numel()) ** -0.5
            for i in range(0, p.shape[0], 8192):
                rows = p[i : i + 8192]
                rows.copy_((torch.randn(rows.shape, generator=g) * std).to(p.dtype))


def _build_qwen(out: Path) -> None:
    """Child-process entry: the Qwen-Image-Edit workflow's three files, each checked the way its loader detects it.

    ComfyUI's Qwen-Image detection reads only the block count and input width from the weights (the widths are
    fixed), so the diffusion model keeps Qwen-Image's widths with 2 blocks; the Wan 2.1 VAE's width is read from the
    weights (dim 32 here)."""
    import torch

    _child_comfyui()
    import comfy.ldm.wan.vae
    import comfy.ops
    import comfy.sd
    import comfy.text_encoders.qwen_image
    import comfy.utils
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    t0 = time.time()
    log: dict[str, Any] = {}
    dm = QwenImageTransformer2DModel(num_layers=2, default_ref_method="index_timestep_zero", dtype=torch.float16,
                                     operations=comfy.ops.disable_weight_init)
    _fill_random(dm, 51)
    log["dm_params"] = _save_detected_dit({k: v.contiguous() for k, v in dm.state_dict().items()}, "QwenImage",
                                          "Qwen-Image", out / "qwen_image_edit_2511_fp8mixed.safetensors")
    del dm

    te = comfy.text_encoders.qwen_image.Qwen25_7BVLIModel(device="cpu", dtype=torch.float8_e4m3fn)
    _fill_random(te.transformer, 52)
    te_sd = {k: v.contiguous() for k, v in te.transformer.state_dict().items()}
    log["te_params"] = sum(v.numel() for v in te_sd.values())
    del te
    if comfy.sd.detect_te_model(te_sd) != comfy.sd.TEModel.QWEN25_7B:
        raise RuntimeError("the random Qwen2.5-VL 7B is not detected as Qwen2.5-7B")
    comfy.utils.save_torch_file(te_sd, str(out / "qwen_2.5_vl_7b_fp8_scaled.safetensors"))
    del te_sd

    vae = comfy.ldm.wan.vae.WanVAE(dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                                   temperal_downsample=[False, True, True], dropout=0.0)
    _save_checked_vae(vae, 53, 16, (1, 16, 1, 4, 4),
                      "the random Wan 2.1 VAE is not read as Qwen-Image's 16-channel one-frame VAE",
                      out / "qwen_image_vae.safetensors")

    _write_done(out, log, t0)


SDXL_VERSION = "sdxl-v1-full-random"


def sdxl_unet_config(in_channels: int) -> dict:
    """The detected SDXL ``unet_config`` (it must be full size: ``supported_models.SDXL`` matches the depths)."""
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": in_channels,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def ensure_sdxl(comfyui_path: str, cache_root: Path = CACHE_ROOT, timeout: float = 1200) -> Path:
    """Path of a REAL random-weight SDXL 9-channel inpainting checkpoint (~6.9 GB; ~40 s to build)."""
    cache = Path(cache_root) / f"{SDXL_VERSION}-comfyui{comfyui_version(comfyui_path)}"
    target = cache / SDXL_FILE
    if (cache / "DONE").is_file():
        return target
    cache.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "build-sdxl", str(cache)],
                          env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0 or not target.is_file():
        raise RuntimeError(f"building the SDXL model failed (rc {proc.returncode}):\n{proc.stderr[-6000:]}")
    (cache / "DONE").write_text("ok")
    return target


def _build_sdxl(out: Path) -> None:
    """Child-process entry: full-size random SDXL inpainting checkpoint, built in fp16 to halve the RAM."""
    import torch

    _child_comfyui()
    import comfy.ldm.models.autoencoder
    import comfy.model_detection
    import comfy.sdxl_clip
    import comfy.supported_models
    import comfy.utils

    cfg = comfy.supported_models.SDXL(sdxl_unet_config(9))
    cfg.set_inference_dtype(torch.float16, None)
    model = cfg.get_model({}, "model.diffusion_model.", device="cpu")
    _init_random(model, 11)
    with torch.no_grad():
        for p in model.diffusion_model.out.parameters():
            p.mul_(0.1)
    clip = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float16)
    _init_random(clip, 12)
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    _init_random(vae, 13)
    sd = state_dict_for_saving(model, clip.state_dict(), vae.state_dict())
    detected = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    if type(detected).__name__ != "SDXL" or not detected.inpaint_model():
        raise RuntimeError(f"the random SDXL inpainting UNet is detected as {type(detected).__name__}")
    sd = _half(sd)
    comfy.utils.save_torch_file(sd, str(out / SDXL_FILE))


SD_VAE_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3,
                   "ch": 128, "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def _child_comfyui() -> None:
    """In a builder's child process: import ComfyUI from ``COMFYUI_PATH`` (its ``nodes``, not this pack's), on CPU."""
    root = os.environ["COMFYUI_PATH"]
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.getcwd()) != str(PACK_ROOT)]
    sys.path.insert(0, root)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def _write_done(out: Path, log: dict, t0: float) -> None:
    """The build's log, with its time since ``t0``, into ``out/DONE.json`` (last: it marks the cache complete)."""
    log["build_s"] = round(time.time() - t0, 1)
    (out / "DONE.json").write_text(json.dumps(log, indent=1))
    print(json.dumps(log))


def _save_detected_dit(sd: dict, expected: str, what: str, path: Path) -> int:
    """Save a diffusion model's state dict ``sd`` to ``path`` once ComfyUI's detection (UNETLoader's, no prefix)
    calls it ``expected``; returns its parameter count."""
    import comfy.model_detection
    import comfy.utils

    detected = comfy.model_detection.model_config_from_unet(sd, "")
    if type(detected).__name__ != expected:
        raise RuntimeError(f"the reduced {what} is detected as {type(detected).__name__}")
    comfy.utils.save_torch_file(sd, str(path))
    return sum(v.numel() for v in sd.values())


def _save_checked_vae(vae: Any, seed: int, channels: int, encoded: Optional[tuple], problem: str, path: Path) -> None:
    """Random weights on ``vae`` (:func:`_init_random`), saved half size to ``path`` once ComfyUI's VAE loader reads
    the state dict with ``channels`` latent channels (and, when ``encoded`` is given, encodes a 32 px image to that
    shape); else RuntimeError(``problem``)."""
    import comfy.sd
    import comfy.utils
    import torch

    _init_random(vae, seed)
    vae_sd = _half(vae.state_dict())
    check = comfy.sd.VAE(sd=dict(vae_sd))
    if check.latent_channels != channels or (
            encoded is not None and tuple(check.encode(torch.rand(1, 32, 32, 3)).shape) != encoded):
        raise RuntimeError(problem)
    comfy.utils.save_torch_file(vae_sd, str(path))


def _half(sd: dict) -> dict:
    """A state dict with its float tensors in float16 (the files are saved half size), contiguous."""
    return {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def _init_random(module: Any, seed: int) -> None:
    """Torch's default init on every layer (comfy.ops layers make ``reset_parameters()`` a no-op)."""
    import torch

    torch.manual_seed(seed)
    for m in module.modules():
        for base in type(m).__mro__[1:]:
            if base.__module__.startswith("torch.nn") and "reset_parameters" in base.__dict__:
                base.reset_parameters(m)
                break


def _build(out: Path) -> None:
    """Child-process entry: build and save every model file into ``out`` (see module doc)."""
    import torch

    _child_comfyui()
    import comfy.cldm.cldm
    import comfy.ldm.models.autoencoder
    import comfy.lora
    import comfy.ops
    import comfy.model_detection
    import comfy.model_management as mm
    import comfy.sd1_clip
    import comfy.supported_models
    import comfy.utils

    init_random = _init_random

    t0 = time.time()
    log: dict[str, Any] = {}

    # --- SD1.5 inpainting checkpoint -----------------------------------------------------------
    cfg = comfy.supported_models.SD15(sd15_small_unet_config(9))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({}, "model.diffusion_model.", device=mm.unet_offload_device())
    init_random(model, 1)
    # The output layers of a real UNet are zero-initialised only in training; random is fine here,
    # but scale them so a random UNet's eps prediction stays in a sane range over a few steps.
    with torch.no_grad():
        for p in model.diffusion_model.out.parameters():
            p.mul_(0.1)
    clip = comfy.sd1_clip.SD1ClipModel(device="cpu", dtype=torch.float32)
    init_random(clip, 2)
    vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD_VAE_DDCONFIG), embed_dim=4)
    init_random(vae, 3)
    sd = state_dict_for_saving(model, clip.state_dict(), vae.state_dict())
    detected = comfy.model_detection.model_config_from_unet(sd, "model.diffusion_model.")
    if type(detected).__name__ != "SD15" or not detected.inpaint_model():
        raise RuntimeError(f"the small SD1.5 inpainting UNet is detected as {type(detected).__name__}")
    # A .ckpt: ComfyUI reads it with torch.load (weights only) and takes its "state_dict", like the real file.
    torch.save({"state_dict": _half(sd)}, str(out / SD15_FILE))
    log["sd15_unet_params"] = sum(p.numel() for p in model.diffusion_model.parameters())

    # --- LoRA on real layers of that UNet ------------------------------------------------------
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    wanted = [k for k in key_map if k.startswith("lora_unet_") and
              k.endswith(("attn1_to_q", "attn1_to_v", "attn2_to_k", "attn2_to_out_0"))]
    wanted = sorted(wanted)[:8]
    if not wanted:
        raise RuntimeError("no lora_unet_* attention keys found for the SD1.5 UNet")
    msd = model.diffusion_model.state_dict()
    lora: dict[str, torch.Tensor] = {}
    g = torch.Generator().manual_seed(4)
    rank = 4
    for k in wanted:
        target = key_map[k]  # "diffusion_model.xxx.weight"
        w = msd[target[len("diffusion_model."):]]
        out_f, in_f = w.shape[0], w.shape[1]
        lora[f"{k}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * 0.01
        lora[f"{k}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * 0.01
        lora[f"{k}.alpha"] = torch.tensor(float(rank))
    comfy.utils.save_torch_file(_half(lora), str(out / LORA_FILE))
    log["lora_keys"] = wanted

    # --- ControlNet with the same reduced layout -----------------------------------------------
    cn_cfg = sd15_small_unet_config(4)
    for k in ("out_channels", "transformer_depth_output"):
        cn_cfg.pop(k)
    cn_cfg.update(num_heads=8, num_head_channels=-1, hint_channels=3, dtype=torch.float32,
                  device="cpu", operations=comfy.ops.disable_weight_init)
    cn = comfy.cldm.cldm.ControlNet(**cn_cfg)
    init_random(cn, 5)
    comfy.utils.save_torch_file(_half(cn.state_dict()), str(out / CONTROLNET_FILE))

    # --- placeholders (SDXL, SAM 3.1, BiRefNet) --------------------------------------------------
    for name in sorted(PLACEHOLDER_MODELS):
        comfy.utils.save_torch_file({"max4zero_placeholder": torch.zeros(1)}, str(out / name),
                                    metadata={"note": "placeholder: listed in its combo, never loaded"})

    _write_done(out, log, t0)


# ---------------------------------------------------------------------------------------------
# Base directory, server, browser
# ---------------------------------------------------------------------------------------------


def make_base_dir(model_cache: Path, parent: Optional[Path] = None, sdxl: Optional[Path] = None,
                  flux: Optional[Path] = None, klein: Optional[Path] = None, qwen: Optional[Path] = None) -> Path:
    """A fresh ``--base-directory``: models (symlinks into the cache), inputs, this pack in custom_nodes.

    ``sdxl``: a real SDXL checkpoint (:func:`ensure_sdxl`) to use instead of the placeholder.
    ``flux``: the folder of :func:`ensure_flux`, whose files replace the Flux placeholders (plus the fp8 T5).
    ``klein``: the folder of :func:`ensure_klein`, whose files replace the FLUX.2 klein placeholders.
    ``qwen``: the folder of :func:`ensure_qwen`, whose files replace the Qwen-Image-Edit placeholders.
    """
    base = Path(tempfile.mkdtemp(prefix="max4zero-browser-", dir=parent))
    for sub in ("input", "output", "temp", "user", "custom_nodes", "models/checkpoints", "models/loras",
                "models/controlnet", "models/background_removal"):
        (base / sub).mkdir(parents=True, exist_ok=True)
    for name, folder in MODEL_FILES.items():
        src = Path(sdxl) if (sdxl is not None and name == SDXL_FILE) else Path(model_cache) / name
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        if flux is not None and name in FLUX_FILES:
            src = Path(flux) / name
        if klein is not None and name in KLEIN_FILES:
            src = Path(klein) / name
        if qwen is not None and name in QWEN_FILES:
            src = Path(qwen) / name
        if name in LATE_PLACEHOLDERS and not src.exists():
            (base / "models" / folder / name).write_bytes(b"")
            continue
        (base / "models" / folder / name).symlink_to(src)
    if flux is not None:
        (base / "models" / "text_encoders" / FLUX_T5_FP8).symlink_to(Path(flux) / FLUX_T5_FP8)
    for name in INPUT_IMAGES:
        shutil.copyfile(EXAMPLE_INPUTS / name, base / "input" / name)
    (base / "custom_nodes" / "max4zero-tryon").symlink_to(PACK_ROOT, target_is_directory=True)
    return base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    """``python main.py --cpu`` of the checkout at ``comfyui_path`` with everything under ``base``."""

    def __init__(self, comfyui_path: str, base: Path, port: Optional[int] = None):
        self.root = Path(comfyui_path).resolve()
        self.base = Path(base)
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.base / "server.log"
        self.proc: Optional[subprocess.Popen] = None

    def start(self, timeout: float = 180) -> "ComfyServer":
        cmd = [sys.executable, str(self.root / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(self.base),
               "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}",
               "--disable-metadata", "--preview-method", "none"]
        env = dict(os.environ)
        env.pop("PYTHONPATH", None)
        self._log = open(self.log_path, "w")
        self.proc = subprocess.Popen(cmd, cwd=str(self.root), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(self.url + "/system_stats", timeout=2) as r:
                    if r.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not answer within {timeout} s:\n{self.log_tail()}")

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 6000) -> str:
        return self.log_text()[-n:]

    def get_json(self, path: str, timeout: float = 30) -> Any:
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post_json(self, path: str, payload: Any, timeout: float = 60) -> tuple[int, Any]:
        req = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            body = e.read()
            try:
                return e.code, json.loads(body)
            except ValueError:
                return e.code, body.decode(errors="replace")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=20)
        if getattr(self, "_log", None):
            self._log.close()


def launch_browser(playwright: Any) -> Any:
    """The system Chromium, headless, through Playwright (``playwright install`` is never needed)."""
    return playwright.chromium.launch(executable_path=chromium_path(), headless=True, args=CHROMIUM_ARGS)


def wait_history(server: ComfyServer, prompt_id: str, timeout: float) -> dict:
    """Poll ``/history/<id>`` until the prompt is in it (ComfyUI adds it when execution ends)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        h = server.get_json(f"/history/{prompt_id}")
        if prompt_id in h:
            return h[prompt_id]
        if server.proc is not None and server.proc.poll() is not None:
            raise RuntimeError(f"ComfyUI died while running prompt {prompt_id}:\n{server.log_tail()}")
        time.sleep(1.0)
    raise TimeoutError(f"prompt {prompt_id} not finished after {timeout} s:\n{server.log_tail()}")


def execution_error(entry: dict) -> Optional[str]:
    """The execution error recorded in a history entry, as text, or None."""
    status = entry.get("status", {})
    for kind, data in status.get("messages", []):
        if kind == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}): {data.get('exception_type')}: "
                    f"{data.get('exception_message')}\n" + "".join(data.get("traceback", [])[-6:]))
    if status.get("status_str") == "error" or not status.get("completed", False):
        return f"status {status}"
    return None


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "build":
        _build(Path(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "build-sdxl":
        _build_sdxl(Path(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "build-flux":
        _build_flux(Path(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "build-klein":
        _build_klein(Path(sys.argv[2]))
    elif len(sys.argv) == 3 and sys.argv[1] == "build-qwen":
        _build_qwen(Path(sys.argv[2]))
    else:
        print("usage: COMFYUI_PATH=... python browser_support.py build OUT_DIR", file=sys.stderr)
        sys.exit(2)
