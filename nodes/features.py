"""The feature pass of the initial registration (docs/method.md §2a) run on the user's ComfyUI ``MODEL``: the
host half. What the UNet is shown (timesteps, masked images, noise, working size, the grid read) is stage 1's recipe,
``registration/recipe.py``; this module only drives ComfyUI's model with it.

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

Noise: :func:`pair_features` draws the reference's and the target's noise together from one seed
(``registration/recipe.py: feature_noise``, a batch-of-2 draw per ensemble member), so the two
passes never share noise: identical images give (slightly) different features, as in the method.

Only the base weights with their weight patches (LoRAs) are used: attention patches and wrappers
attached to the ``MODEL`` (e.g. Masked Extended Attention) are deliberately left out of this pass.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

import comfy.model_management
import comfy.utils

from ..registration import recipe
from ..registration.recipe import DIFT_T, PAPER_T, FeatureSpec, feature_draws, resize_image, work_size
from .convert import NodeInputError, vae_ratio

__all__ = ["PAPER_T", "DIFT_T", "FeatureSpec", "check_unet", "is_inpainting", "extract_features", "work_size",
           "resize_image", "progress_bar", "pair_features", "latent_shape", "feature_draws"]


class _Captured(Exception):
    """Raised by the capture patch to stop the UNet once the features are in hand."""


def check_unet(model, node: str):
    """Return the ComfyUI ``UNetModel`` inside ``model`` (a ModelPatcher) or raise a clear error."""
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    base = getattr(model, "model", None)
    dm = getattr(base, "diffusion_model", None)
    if dm is None or not isinstance(dm, UNetModel) or not hasattr(dm, "output_blocks"):
        kind = type(dm).__name__ if dm is not None else type(model).__name__
        raise NodeInputError(
            node, f"the MODEL is a {kind}, not a Stable Diffusion UNet (SD1.5, SD2, SDXL), which this node needs: "
            "Correspondence reads UNet decoder features (give it an SD model even in a Flux workflow), and of the other "
            "families only FLUX.1 is taken, by Masked Extended Attention; SD3 and other DiTs are not supported",
            "load an SD1.5/SD2/SDXL checkpoint (ideally an inpainting one) with the stock checkpoint loader")
    return dm


def is_inpainting(model) -> bool:
    """True for a 9-channel inpainting UNet (latent + mask + masked image)."""
    dm = model.model.diffusion_model
    return int(getattr(dm, "in_channels", 4)) == 9 and "mask" in getattr(model.model, "concat_keys", ())


def latent_shape(model, hw: tuple[int, int], ratio: int = 8) -> tuple[int, int, int]:
    """``(C, h, w)`` of the noise :func:`extract_features` needs for an image of size ``hw`` (multiples of 16), with
    ``ratio`` image pixels per latent cell (the VAE's, ``convert.vae_ratio``)."""
    lf = model.model.latent_format
    c = int(lf.latent_channels) if hasattr(lf, "latent_channels") else 4
    return c, int(hw[0]) // int(ratio), int(hw[1]) // int(ratio)


def _model_kwargs(model, positive, noise: torch.Tensor, device, concat_latent, concat_mask, ratio: int = 8) -> dict:
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
        width=params.get("width", noise.shape[-1] * ratio), height=params.get("height", noise.shape[-2] * ratio),
    )
    if concat_latent is not None:
        params["concat_latent_image"] = concat_latent
        params["concat_mask"] = concat_mask
    out = model.model.extra_conds(**params)
    B = noise.shape[0]
    return {k: v.process_cond(batch_size=B, area=None, device=device).cond for k, v in out.items()}


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
    noise: Optional[torch.Tensor] = None,
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
        noise: the N(0, 1) draws to use, ``[draws, C, H/8, W/8]`` (``draws`` = :func:`feature_draws`,
            ``(C, H/r, W/r)`` = :func:`latent_shape`, r the VAE's ratio); :func:`pair_features` passes independent draws
            for the two images. ``None``: drawn here from ``spec.seed`` (this image alone).

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
    sigma = torch.tensor([float(ms.percent_to_sigma(recipe.schedule_fraction(spec.t)))], dtype=torch.float32)
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
        concat_latent = vae.encode(
            recipe.paper_masked_image(img_bhwc.permute(0, 3, 1, 2), mask).permute(0, 2, 3, 1).contiguous())
        concat_mask = mask.float()[:, None]
    elif spec.mode == "dift":
        raw = vae.encode(img_bhwc)
        latent = base.process_latent_in(raw).float()
        concat_latent = raw if inpaint else None
        concat_mask = recipe.dift_mask_channel((H, W)) if inpaint else None
    else:
        raise ValueError(f"unknown feature mode {spec.mode!r}")

    # After the VAE encodes: loading the VAE may evict the UNet when memory is short.
    comfy.model_management.load_models_gpu([model])
    draws = feature_draws(spec)
    ratio = vae_ratio(vae)
    shape = latent_shape(model, (H, W), ratio)
    lh, lw = shape[1], shape[2]
    grid = recipe.feature_grid((lh, lw))
    if noise is None:
        noise = recipe.feature_noise([shape], draws, spec.seed)[0]
    elif tuple(noise.shape) != (draws, *shape):
        raise ValueError(f"noise has shape {tuple(noise.shape)}, expected {(draws, *shape)} "
                         f"({spec.mode} mode, {W}x{H} image)")
    captured: dict[str, torch.Tensor] = {}

    def capture(h, hsp, transformer_options):
        if "feat" not in captured and tuple(h.shape[-2:]) == grid:
            captured["feat"] = h.float()
            captured["block"] = transformer_options.get("block")
            raise _Captured
        return h, hsp

    acc: Optional[torch.Tensor] = None
    chunk = min(draws, recipe.DRAWS_PER_CALL)
    done = 0
    while done < draws:
        n = min(chunk, draws - done)
        comfy.model_management.throw_exception_if_processing_interrupted()
        eps = noise[done:done + n].to(device)
        sig = sigma.to(device).expand(n)
        if latent is None:
            # max_denoise: the UNet input is exactly the N(0, 1) noise (the paper's pure-noise latent).
            x = ms.noise_scaling(sig, eps, torch.zeros_like(eps), max_denoise=True)
        else:
            x = ms.noise_scaling(sig, eps, latent.to(device).expand(n, -1, -1, -1), max_denoise=False)
        kwargs = _model_kwargs(model, positive, x, device, concat_latent, concat_mask, ratio)
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

    Each image is brought to :func:`work_size` first (RGB; ``registration/recipe.py: feature_input``). Returns
    ``(features, work_sizes)``. The images' noise is drawn together from ``spec.seed``
    (``registration/recipe.py: feature_noise``):
    independent across the images (and across DIFT's ensemble draws), and the same for the same seed.
    Identical images therefore give different (if close) features, as with the method's batch-of-2 draw.
    """
    draws = feature_draws(spec)
    step = progress_bar(len(pairs) * draws)
    inputs = [recipe.feature_input(img, m) for img, m in pairs]
    works = [work for _, _, work in inputs]
    ratio = vae_ratio(vae)
    noises = recipe.feature_noise([latent_shape(model, w, ratio) for w in works], draws, spec.seed)
    feats = []
    for (img, m_w, _), eps in zip(inputs, noises):
        feats.append(extract_features(model, vae, positive, img, m_w, spec, step, node, noise=eps))
    return feats, works


def progress_bar(total: int):
    """A ComfyUI progress bar (the UI's bar on the running node) → callable advancing it by one."""
    bar = comfy.utils.ProgressBar(total)
    return lambda: bar.update(1)
