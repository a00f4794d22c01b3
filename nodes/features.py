"""Deep UNet features from the user's ComfyUI ``MODEL`` for the initial registration (SPEC §2a).

Which features
--------------
The input of the first decoder block whose features are at **1/16 of the image** (half the latent
grid), i.e. the output of the decoder stage that upsamples into 1/16:

* SD1.5 / SD2 (``output_blocks`` 0-11): the output of ``output_blocks[5]`` = input of block 6,
  1280 channels, 32×32 at 512 px. This is diffusers' ``up_blocks[1]`` (the paper's "decoder block
  1", DIFT's ``up_ft_index=1``).
* SDXL (``output_blocks`` 0-8, three levels): the output of ``output_blocks[2]`` = input of block 3,
  1280 channels, 64×64 at 1024 px (diffusers ``up_blocks[0]``, the first stage that reaches 1/16).

It is read with an ``output_block_patch`` (called before each output block with the incoming
features), selected by grid size, so any ``openaimodel.UNetModel`` layout works; the forward pass is
stopped right after the capture (the finer decoder stages are not needed).

Modes
-----
* ``paper``: an inpainting UNet (9 input channels); noisy-latent channels = pure Gaussian noise (the
  model sees N(0, 1), as at the first step of a full-denoise sampling), t = 981, masked-image
  channels = the image with its own mask blanked to grey, mask channel = that mask, the garment
  prompt, no CFG, one draw.
* ``dift``: the clean image VAE-encoded and forward-noised to t = 261 (any UNet; an inpainting model
  gets an all-zero mask and the clean image as its masked image, so it reconstructs itself), the
  conditioning as connected (DIFT uses an empty prompt), features averaged over an ensemble of draws.

Only the base weights with their weight patches (LoRAs) are used: attention patches and wrappers
attached to the ``MODEL`` (e.g. Masked Extended Attention) are deliberately left out of this pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import comfy.model_management
import comfy.utils

from ..warping import masks as _masks
from .convert import NodeInputError

__all__ = ["PAPER_T", "DIFT_T", "FeatureSpec", "check_unet", "is_inpainting", "extract_features", "work_size", "resize_image", "feature_grid", "progress_bar",
           "pair_features"]

PAPER_T = 981  # first step of 50 DDIM "leading" steps
DIFT_T = 261



class _Captured(Exception):
    """Raised by the capture patch to stop the UNet once the features are in hand."""


@dataclass
class FeatureSpec:
    """What :func:`extract_features` computes; ``t`` is the discrete timestep (0..999)."""

    mode: str  # "paper" | "dift"
    t: int
    ensemble: int = 1
    seed: int = 0


def check_unet(model, node: str):
    """Return the ComfyUI ``UNetModel`` inside ``model`` (a ModelPatcher) or raise a clear error."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = getattr(model, "model", None)
    dm = getattr(base, "diffusion_model", None)
    if dm is None or not isinstance(dm, UNetModel) or not hasattr(dm, "output_blocks"):
        kind = type(dm).__name__ if dm is not None else type(model).__name__
        raise NodeInputError(
            node, f"the MODEL is a {kind}, not a Stable Diffusion UNet (SD1.5, SD2, SDXL); MaX4Zero reads UNet "
            "decoder features and patches UNet self-attention, so DiT/Flux/SD3-style models are not supported",
            "load an SD1.5/SD2/SDXL checkpoint (ideally an inpainting one) with the stock checkpoint loader")
    return dm


def is_inpainting(model) -> bool:
    """True for a 9-channel inpainting UNet (latent + mask + masked image)."""
    dm = model.model.diffusion_model
    return int(getattr(dm, "in_channels", 4)) == 9 and "mask" in getattr(model.model, "concat_keys", ())


def work_size(h: int, w: int) -> tuple[int, int]:
    """The image size features are computed at: each side rounded to a multiple of 16 (≥ 64)."""
    return max(64, int(round(h / 16)) * 16), max(64, int(round(w / 16)) * 16)


def resize_image(img: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``[B, C, H, W]`` → ``hw`` (bicubic, antialiased when shrinking); no-op when already that size."""
    if tuple(img.shape[-2:]) == hw:
        return img
    down = hw[0] < img.shape[-2] or hw[1] < img.shape[-1]
    return F.interpolate(img.float(), size=hw, mode="bicubic", align_corners=False, antialias=down).clamp(0, 1)


def _model_kwargs(model, positive, noise: torch.Tensor, device, concat_latent, concat_mask) -> dict:
    """Build ``apply_model`` keyword arguments the way ComfyUI's samplers do (``extra_conds``).

    Uses the first entry of the CONDITIONING; its extras (SDXL pooled output, size) are passed to
    the model's ``extra_conds`` like ``comfy.samplers.encode_model_conds`` does.
    """
    if not isinstance(positive, (list, tuple)) or not positive or not isinstance(positive[0], (list, tuple)):
        raise ValueError("positive must be a CONDITIONING (list of [tensor, dict])")
    cond, extras = positive[0][0], dict(positive[0][1])
    for k in ("concat_latent_image", "concat_mask", "noise_mask", "control", "gligen", "hooks", "area", "mask"):
        extras.pop(k, None)
    params = dict(extras)
    params.update(
        cross_attn=cond, device=device, noise=noise, prompt_type="positive",
        width=params.get("width", noise.shape[-1] * 8), height=params.get("height", noise.shape[-2] * 8),
    )
    if concat_latent is not None:
        params["concat_latent_image"] = concat_latent
        params["concat_mask"] = concat_mask
    out = model.model.extra_conds(**params)
    B = noise.shape[0]
    return {k: v.process_cond(batch_size=B, area=None, device=device).cond for k, v in out.items()}


def _grey_masked(img_bhwc: torch.Tensor, mask_bhw: torch.Tensor) -> torch.Tensor:
    """Pixels under the (rounded) mask set to 0.5 grey, as ComfyUI's InpaintModelConditioning does."""
    keep = (1.0 - mask_bhw.round())[..., None]
    return (img_bhwc - 0.5) * keep + 0.5


def extract_features(
    model,
    vae,
    positive,
    image: torch.Tensor,
    mask: torch.Tensor,
    spec: FeatureSpec,
    progress: Optional[Callable[[], None]] = None,
    node: str = "MaX4Zero Correspondence",
    info: Optional[dict] = None,
) -> torch.Tensor:
    """Decoder features of one image at 1/16 resolution.

    Args:
        model: ComfyUI ``ModelPatcher`` around a UNet (checked with :func:`check_unet`).
        vae: ComfyUI ``VAE``.
        positive: CONDITIONING used as the prompt.
        image: ``[1, C, H, W]`` in 0..1, H and W multiples of 16 (see :func:`work_size`).
        mask: ``[1, H, W]`` the image's own mask (paper mode blanks it); ignored in DIFT mode.
        spec: mode, timestep, ensemble size, seed.
        progress: called once per UNet forward.
        info: if given, receives ``"block"`` (the ``("output", i)`` block whose input was read) and
            ``"sigma"``.

    Returns:
        float32 ``[C_feat, H/16, W/16]`` on the model's device (DIFT: mean over the ensemble).
    """
    dm = check_unet(model, node)
    H, W = int(image.shape[-2]), int(image.shape[-1])
    if H % 16 or W % 16:
        raise ValueError(f"image size {W}x{H} must be a multiple of 16 (resize with work_size first)")
    device = model.load_device
    base = model.model
    ms = model.get_model_object("model_sampling")
    # Via the schedule fraction so continuous-sigma samplings (EDM, v-pred EDM) work too; for the usual
    # discrete 1000-step schedule this is exactly sigma(t).
    sigma = torch.tensor([float(ms.percent_to_sigma(1.0 - spec.t / 999.0))], dtype=torch.float32)
    inpaint = is_inpainting(model)
    img_bhwc = image.permute(0, 2, 3, 1).float()

    if spec.mode == "paper":
        if not inpaint:
            raise NodeInputError(
                node, "paper mode needs an inpainting model (9 input channels), but this MODEL has "
                f"{int(getattr(dm, 'in_channels', 4))}",
                "switch mode to 'dift' (works with any SD UNet), or load an inpainting checkpoint "
                "(e.g. sd-v1-5-inpainting or stable-diffusion-2-inpainting)")
        latent = None
        concat_latent = vae.encode(_grey_masked(img_bhwc, mask.float()))
        concat_mask = mask.float()[:, None]
        draws = 1
    elif spec.mode == "dift":
        raw = vae.encode(img_bhwc)
        latent = base.process_latent_in(raw).float()
        concat_latent = raw if inpaint else None
        concat_mask = torch.zeros((1, 1, H, W)) if inpaint else None
        draws = max(1, int(spec.ensemble))
    else:
        raise ValueError(f"unknown feature mode {spec.mode!r}")

    # After the VAE encodes: loading the VAE may evict the UNet when memory is short.
    comfy.model_management.load_models_gpu([model])
    lat_c = base.latent_format.latent_channels if hasattr(base.latent_format, "latent_channels") else 4
    lh, lw = H // 8, W // 8
    grid = (math.ceil(lh / 2), math.ceil(lw / 2))
    gen = torch.Generator(device="cpu").manual_seed(int(spec.seed))
    captured: dict[str, torch.Tensor] = {}

    def capture(h, hsp, transformer_options):
        if "feat" not in captured and tuple(h.shape[-2:]) == grid:
            captured["feat"] = h.float()
            captured["block"] = transformer_options.get("block")
            raise _Captured
        return h, hsp

    acc: Optional[torch.Tensor] = None
    chunk = min(draws, 4)
    done = 0
    while done < draws:
        n = min(chunk, draws - done)
        comfy.model_management.throw_exception_if_processing_interrupted()
        noise = torch.randn((n, lat_c, lh, lw), generator=gen).to(device)
        sig = sigma.to(device).expand(n)
        if latent is None:
            # max_denoise: the UNet input is exactly the N(0, 1) noise (the paper's pure-noise latent).
            x = ms.noise_scaling(sig, noise, torch.zeros_like(noise), max_denoise=True)
        else:
            x = ms.noise_scaling(sig, noise, latent.to(device).expand(n, -1, -1, -1), max_denoise=False)
        kwargs = _model_kwargs(model, positive, x, device, concat_latent, concat_mask)
        topts = {"patches": {"output_block_patch": [capture]}, "sigmas": sig, "cond_or_uncond": [0] * n}
        captured.clear()
        try:
            base.apply_model(x, sig, transformer_options=topts, **kwargs)
        except _Captured:
            pass
        if "feat" not in captured:
            raise NodeInputError(
                node, f"this UNet has no decoder block at the 1/16 grid {grid[0]}x{grid[1]} for a {W}x{H} image",
                "use an SD1.5/SD2/SDXL UNet and images of at least 64x64 pixels")
        feat = captured["feat"].sum(0)
        acc = feat if acc is None else acc + feat
        done += n
        if progress is not None:
            for _ in range(n):
                progress()
    if info is not None:
        info["block"] = captured.get("block")
        info["sigma"] = float(sigma[0])
    return acc / draws


def pair_features(model, vae, positive, pairs, spec: FeatureSpec, node: str) -> tuple[list, list]:
    """Features of several ``(image [1, C, H, W], mask [1, H, W])`` pairs, with one progress bar.

    Each image is resized to :func:`work_size` first (RGB). Returns ``(features, work_sizes)``.
    The noise is re-seeded per image, so identical images give identical features.
    """
    step = progress_bar(len(pairs) * spec.ensemble)
    feats, works = [], []
    for img, m in pairs:
        work = work_size(*img.shape[-2:])
        rgb = img[:, :3] if img.shape[1] >= 3 else img[:, :1].expand(-1, 3, -1, -1)
        m_w = _masks.resize_to_grid(m > 0.5, work).float()
        feats.append(extract_features(model, vae, positive, resize_image(rgb, work), m_w, spec, step, node))
        works.append(work)
    return feats, works


def feature_grid(h: int, w: int) -> tuple[int, int]:
    """Token grid of :func:`extract_features` for an ``h × w`` image (multiples of 16)."""
    return math.ceil((h // 8) / 2), math.ceil((w // 8) / 2)


def progress_bar(total: int):
    """A ComfyUI progress bar (the UI's bar on the running node) → callable advancing it by one."""
    bar = comfy.utils.ProgressBar(total)
    return lambda: bar.update(1)
