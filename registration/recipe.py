"""Stage 1's recipe (docs/method.md §1-§2): every constant and rule of the initial registration, in one place.

* the feature pass (§2a): the timesteps (:data:`PAPER_T` = 981, :data:`DIFT_T` = 261), what each mode shows the UNet
  (:class:`FeatureSpec`, :func:`paper_masked_image`, :func:`dift_mask_channel`), the working size
  (:func:`work_size`), the decoder grid read (:func:`feature_grid`) and the noise draw (:func:`feature_noise`);
* the masks at the feature grid with the keep-thin fallback (:func:`grid_mask`) and the processed target mask
  (:func:`prepare_target_mask`);
* features → matches → control points (:func:`matches_from_features`), the MLS warp (:func:`warp_garment`) and
  the double mask (:func:`double_mask`).

The UNet forward itself goes through the host (``nodes/features.py`` runs it on a ComfyUI ``MODEL``); everything it
feeds the UNet is decided here. Pure torch (no ComfyUI import), tested in the normal suite.

Layouts: images ``[B, C, H, W]``, masks ``[B, H, W]`` float unless stated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..tensors import masks as _masks
from ..tensors.images import grey_out, to_rgb
from ..tensors.shapes import halved
from ..warping import fringe as _fringe
from ..warping import matching as _matching
from ..warping import mls as _mls
from .matches import Matches
from .previews import grid_lines

__all__ = [
    "PAPER_T", "DIFT_T", "FEATURE_MODES", "DRAWS_PER_CALL", "FeatureSpec", "feature_draws", "schedule_fraction",
    "work_size", "resize_image", "feature_input", "feature_grid", "paper_masked_image", "dift_mask_channel",
    "OUTLIER_FILTERS", "CONTROL_POINT_MODES", "MLS_KINDS", "SAMPLINGS", "FEATURE_STRIDE",
    "grid_mask", "matches_from_features", "warp_garment", "prepare_target_mask", "region_left_problem",
    "region_mismatch_problem", "eroded_garment_mask", "double_mask", "feature_noise", "far_points_problem",
]

PAPER_T = 981  # first step of 50 DDIM "leading" steps
DIFT_T = 261
#: Correspondence's ``mode`` choices: the paper's pure-noise inpainting pass, or DIFT's noised clean image.
FEATURE_MODES = ("paper", "dift")
#: The UNet runs at most this many of DIFT's ensemble draws per forward (memory).
DRAWS_PER_CALL = 4
OUTLIER_FILTERS = ("ransac", "none")
CONTROL_POINT_MODES = ("random", "deterministic", "all")
MLS_KINDS = _mls.KINDS
SAMPLINGS = ("bilinear", "nearest")
FEATURE_STRIDE = 16  # image pixels per feature token (decoder features at 1/16)


# --------------------------------------------------------------------------------------------
# §2a the feature pass


@dataclass
class FeatureSpec:
    """What the feature pass computes; ``t`` is the discrete timestep (0..999)."""

    mode: str  # "paper" | "dift"
    t: int
    ensemble: int = 1
    seed: int = 0

    @classmethod
    def for_mode(cls, mode: str, ensemble: int = 1, seed: int = 0) -> "FeatureSpec":
        """The method's spec for ``mode``: paper at t = 981 with one draw, DIFT at t = 261 over ``ensemble`` draws."""
        return cls(mode=mode, t=PAPER_T if mode == "paper" else DIFT_T,
                   ensemble=int(ensemble) if mode == "dift" else 1, seed=int(seed))


def feature_draws(spec: FeatureSpec) -> int:
    """Noise draws per image: 1 in paper mode, the ensemble size (≥ 1) in DIFT mode."""
    return max(1, int(spec.ensemble)) if spec.mode == "dift" else 1


def schedule_fraction(t: int) -> float:
    """The schedule fraction of discrete timestep ``t`` (σ = ``percent_to_sigma`` of it).

    Via the fraction so continuous-sigma samplings (EDM, v-pred EDM) work too; for the usual discrete 1000-step
    schedule it gives exactly σ(t).
    """
    return 1.0 - t / 999.0


def work_size(h: int, w: int) -> tuple[int, int]:
    """The image size features are computed at: each side rounded to a multiple of 16 (≥ 64)."""
    return max(64, int(round(h / 16)) * 16), max(64, int(round(w / 16)) * 16)


def resize_image(img: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """``[B, C, H, W]`` → ``hw`` (bicubic, antialiased when shrinking); no-op when already that size."""
    if tuple(img.shape[-2:]) == hw:
        return img
    down = hw[0] < img.shape[-2] or hw[1] < img.shape[-1]
    return F.interpolate(img.float(), size=hw, mode="bicubic", align_corners=False, antialias=down).clamp(0, 1)


def feature_input(image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
    """One image and its own mask as the feature pass takes them: RGB at :func:`work_size`, the mask resized there
    by nearest neighbour (float 0/1).

    Args:
        image: ``[1, C, H, W]`` in 0..1 (grey is repeated to RGB, alpha dropped).
        mask: ``[1, H, W]``.

    Returns:
        ``(image [1, 3, h, w], mask [1, h, w], (h, w))``.
    """
    work = work_size(*image.shape[-2:])
    rgb = to_rgb(image)
    m_w = _masks.resize_to_grid(mask > 0.5, work).float()
    return resize_image(rgb, work), m_w, work


def feature_grid(latent_hw: tuple[int, int]) -> tuple[int, int]:
    """The token grid of the features read: decoder block 1 (DIFT's ``up_ft_index = 1``), 1/16 of the image, i.e.
    the latent grid halved once.

    >>> feature_grid((64, 48))
    (32, 24)
    """
    return halved(latent_hw)


def paper_masked_image(image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Paper mode's masked-image channels, before the VAE: the image with its own mask set to 0.5 grey.

    image ``[1, 3, H, W]``, mask ``[1, H, W]``; returns ``[1, 3, H, W]``. The mask channel is the mask itself.
    """
    return grey_out(image, mask)


def dift_mask_channel(hw: tuple[int, int]) -> torch.Tensor:
    """DIFT mode on an inpainting UNet: an all-zero mask channel ``[1, 1, H, W]`` (with the clean image as masked
    image, the UNet reconstructs the image itself)."""
    return torch.zeros((1, 1, int(hw[0]), int(hw[1])))


def feature_noise(shapes, draws: int, seed: int) -> list[torch.Tensor]:
    """Independent N(0, 1) noise for the feature passes of several images (docs/method.md §2a), from ONE seed.

    The method draws the two images' noise together (the research code: one batch of 2), so the
    reference and the target never see the same noise, even at the same size; re-seeding per image
    would give a token deep inside both masked holes exactly the same input in both passes and pull
    mutual nearest neighbours towards "no warp". Here one CPU generator is seeded once with ``seed``
    and draw ``k`` of image ``i`` is its ``k · len(shapes) + i``-th ``torch.randn`` call: draw ``k``
    is a batch-of-``len(shapes)`` draw (paper mode: ``draws = 1``, exactly one such batch; DIFT:
    one per ensemble member, so every member is independent across images and across members).

    Args:
        shapes: one latent shape ``(C, h, w)`` per image (the images may differ in size).
        draws: noise draws per image (1 in paper mode, the ensemble size in DIFT mode), ≥ 1.
        seed: the node's seed; the same seed gives bit-identical noise (CPU generator, any device).

    Returns:
        One float32 CPU tensor ``[draws, C, h, w]`` per image, in the order of ``shapes``.

    >>> ref, tgt = feature_noise([(4, 2, 2), (4, 2, 2)], draws=1, seed=0)
    >>> ref.shape, bool(torch.equal(ref, tgt))
    (torch.Size([1, 4, 2, 2]), False)
    >>> bool(torch.equal(feature_noise([(4, 2, 2), (4, 2, 2)], 1, 0)[1], tgt))
    True
    """
    shapes = [tuple(int(s) for s in sh) for sh in shapes]
    draws = int(draws)
    if draws < 1:
        raise ValueError(f"draws must be >= 1, got {draws}")
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    out = [torch.empty((draws, *sh), dtype=torch.float32) for sh in shapes]
    for k in range(draws):
        for i, sh in enumerate(shapes):
            out[i][k] = torch.randn(sh, generator=gen, dtype=torch.float32)
    return out


def grid_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A ``[1, H, W]`` / ``[H, W]`` mask at the feature grid, bool ``[h, w]``.

    Nearest neighbour (paper). If that loses a non-empty mask entirely (a garment thinner than a
    token), the any-pixel rule (``keep_thin``) is used instead, so a visible garment is never empty.
    """
    m = mask if mask.ndim == 2 else mask[0]
    out = _masks.resize_to_grid(m > 0.5, grid)
    if not bool(out.any()) and bool((m > 0.5).any()):
        out = _masks.resize_to_grid(m > 0.5, grid, keep_thin=True)
    return out


def matches_from_features(
    feat_ref: torch.Tensor,
    feat_tgt: torch.Tensor,
    ref_grid_mask: torch.Tensor,
    tgt_grid_mask: torch.Tensor,
    ref_work_hw: tuple[int, int],
    tgt_work_hw: tuple[int, int],
    ref_hw: tuple[int, int],
    tgt_hw: tuple[int, int],
    outlier_filter: str = "ransac",
    outlier_threshold: float = 5.0,
    control_points: str = "random",
    score_threshold: float = 0.5,
    seed: int = 0,
) -> Matches:
    """docs/method.md §2b-c: mutual nearest neighbours inside the masks → outlier filter → pixel control points.

    Features were computed on images resized to ``*_work_hw`` (multiples of 16); the control points
    are returned in the pixels of the original ``*_hw`` images.

    Raises:
        ValueError: (from ``warping.matching``) empty masks at the grid, no match, none kept.
    """
    grid_r = tuple(feat_ref.shape[-2:])
    grid_t = tuple(feat_tgt.shape[-2:])
    ia, ib, sc = _matching.mutual_nearest_neighbors(feat_ref, feat_tgt, ref_grid_mask, tgt_grid_mask)
    if outlier_filter == "ransac":
        ia, ib, sc = _matching.filter_matches(ia, ib, sc, grid_r, grid_t, threshold=float(outlier_threshold),
                                              seed=int(seed))
    pa, pb, w = _matching.control_points(ia, ib, sc, grid_r, grid_t, stride=FEATURE_STRIDE, mode=control_points,
                                         seed=int(seed), threshold=float(score_threshold))
    work = Matches(pa, pb, w, ref_work_hw, tgt_work_hw)
    return work.rescaled(ref_hw, tgt_hw) if (tuple(ref_hw), tuple(tgt_hw)) != (tuple(ref_work_hw), tuple(tgt_work_hw)) else work


def warp_garment(
    reference: torch.Tensor,
    garment_mask: torch.Tensor,
    matches: Matches,
    target_hw: tuple[int, int],
    kind: str = "affine",
    alpha: float = 0.1,
    stride: int = _mls.DEFAULT_STRIDE,
    sampling: str = "bilinear",
    grid_step: int = 16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """docs/method.md §2d: warp the reference garment onto the target with MLS (backward mapping).

    Args:
        reference: ``[1, C, Hr, Wr]``; garment_mask ``[1, Hr, Wr]`` (already eroded if wanted).
        matches: control points; rescaled here if they were made for other image sizes.
        target_hw: output size.

    Returns:
        ``(warped [1, C, Ht, Wt], warped_mask [1, Ht, Wt] (0/1), warped_grid [1, Ht, Wt])``. Samples
        that fall outside the reference read 0 (outside the garment).
    """
    Hr, Wr = int(reference.shape[-2]), int(reference.shape[-1])
    Ht, Wt = (int(s) for s in target_hw)
    m = matches
    if tuple(m.reference_size) != (Hr, Wr) or tuple(m.target_size) != (Ht, Wt):
        m = m.rescaled((Hr, Wr), (Ht, Wt))
    bmap = _mls.backward_map(m.target_points, m.reference_points, Ht, Wt, kind=kind, alpha=float(alpha),
                             stride=int(stride))
    bmap = bmap.to(reference.device)
    warped = _mls.warp(reference.float(), bmap, mode=sampling)
    wm = _mls.warp((garment_mask.float() > 0.5).float()[:, None].to(reference.device), bmap, mode=sampling)[:, 0]
    grid = _mls.warp(grid_lines(Hr, Wr, grid_step).to(reference.device), bmap, mode="bilinear")[:, 0]
    return warped, (wm > 0.5).float(), grid


def prepare_target_mask(
    target_mask: torch.Tensor, protect_mask: Optional[torch.Tensor] = None, target_dilation: int = 13
) -> torch.Tensor:
    """docs/method.md §1: the processed target mask every later step uses, matching included.

    ``dilate(target ∧ ¬protect, target_dilation)``, bool ``[B, H, W]``. Correspondence and Double-Mask Inpaint
    both call this, so the region matched is the region repainted.
    """
    t = target_mask > 0.5
    if protect_mask is not None:
        t = t & ~(protect_mask > 0.5)
    return _masks.dilate(t, int(target_dilation))


def region_left_problem(processed: torch.Tensor) -> Optional[tuple[str, str]]:
    """``(problem, fix)`` when the processed target mask (:func:`prepare_target_mask`) is empty although the target
    mask was not: the protect mask removed the whole try-on region, so the photo would come back unchanged."""
    if bool((processed > _masks.ON_ABOVE).any()):
        return None
    return ("protect_mask covers the whole target_mask: nothing is left to repaint, so the result would be the input "
            "photo unchanged", "protect_mask should cover only what must be kept inside the region (hands, hair, "
            "objects), white = keep; check that it is not inverted, or disconnect it")


def region_mismatch_problem(region: torch.Tensor, target: torch.Tensor, target_dilation: int = 13) -> Optional[str]:
    """Why ``target`` is not the region the correspondence matched in (docs/method.md §1: one processed mask), or None.

    Args:
        region: bool ``[h, w]``, the processed target mask Correspondence matched in (``Matches.target_region``).
        target: ``[B, H, W]``, the processed target mask of every batch item about to be repainted (> 0.5 = on).
        target_dilation: the dilation both nodes use (pixels of their own images).

    At the same size every item must equal ``region`` exactly. Matches made at another size of the same crop are
    compared at the target's size: ``region`` is resized there (nearest) and each mask must lie within a band of the
    other, as wide as the two dilations at different scales and the resampling make them differ,
    ``(target_dilation − 1)/2 · |scale − 1| + scale + 1`` px. A region of another aspect is another crop.
    """
    t = target > _masks.ON_ABOVE
    if t.ndim == 2:
        t = t[None]
    B, H, W = (int(s) for s in t.shape)
    h, w = (int(s) for s in region.shape[-2:])
    which = (lambda b: f" (batch item {b})") if B > 1 else (lambda b: "")
    if (h, w) == (H, W):
        for b in range(B):
            if not torch.equal(region, t[b]):
                return (f"the processed target mask{which(b)} differs from the one MaX4Zero Correspondence matched in "
                        f"({int((region != t[b]).sum())} pixels)")
        return None
    sy, sx = H / h, W / w
    if abs(sy - sx) > 0.02 * max(sy, sx):
        return (f"the processed target mask is {W}x{H} but MaX4Zero Correspondence matched in a {w}x{h} one, of another "
                f"aspect: the matches belong to another crop")
    scale = max(sy, sx)
    reach = (int(target_dilation) - 1) / 2.0 * abs(scale - 1.0) + scale + 1.0
    k = 2 * int(math.ceil(reach)) + 1
    r = _masks.resize_to_grid(region.bool(), (H, W))
    near_r = _masks.dilate(r, k)
    for b in range(B):
        differ = int((t[b] & ~near_r).sum()) + int((r & ~_masks.dilate(t[b], k)).sum())
        if differ:
            return (f"the processed target mask{which(b)} differs from the one MaX4Zero Correspondence matched in "
                    f"({differ} pixels farther than {reach:.0f} px from it; Correspondence ran at {w}x{h}, this node at "
                    f"{W}x{H})")
    return None


def eroded_garment_mask(garment_mask: torch.Tensor) -> torch.Tensor:
    """docs/method.md §1: the garment mask eroded by 1 px (3×3, :data:`~max4zero.tensors.masks.GARMENT_EROSION`),
    bool, same layout. Empty when the mask is only a thin line (``tensors/masks.py: eroded_away_problem``)."""
    return _masks.erode(_masks.to_bool(garment_mask), _masks.GARMENT_EROSION)


def double_mask(
    target_mask: torch.Tensor,
    warped_mask: torch.Tensor,
    protect_mask: Optional[torch.Tensor] = None,
    target_dilation: int = 13,
    fringe_dilation: int = 19,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """docs/method.md §1 preprocessing + §2e fringes.

    ``target = dilate(target ∧ ¬protect, target_dilation)``; ``F = target ∧ ¬warped``;
    ``D = dilate(F, fringe_dilation) ∧ target``. Dilation 1 switches a step off.

    Returns:
        ``(target, F, D)``, float 0/1 ``[B, H, W]`` (common batch of the inputs).
    """
    t = prepare_target_mask(target_mask, protect_mask, target_dilation)
    thin, dil = _fringe.fringe_masks(t, warped_mask > 0.5, dilation=int(fringe_dilation))
    B = thin.shape[0]
    return t.expand(B, -1, -1).float(), thin.float(), dil.float()


def far_points_problem(matches: Matches, margin: float = 1.0) -> Optional[str]:
    """Why some control points lie far outside their images (a typo, e.g. 1e6), or None.

    A point may lie outside its image (a garment cut by the photo's edge), but not by more than ``margin``
    times the image's longer side: beyond that the MLS map reads nothing but black. Reference points are
    checked against ``matches.reference_size``, target points against ``matches.target_size`` (the sizes
    the points are given in).
    """
    for which, pts, (h, w) in (("reference", matches.reference_points, matches.reference_size),
                               ("target", matches.target_points, matches.target_size)):
        if pts.numel() == 0:
            continue
        reach = float(margin) * max(h, w)
        p = pts.double()
        bad = ~torch.isfinite(p).all(dim=1)
        bad |= (p[:, 0] < -reach) | (p[:, 0] > w - 1 + reach) | (p[:, 1] < -reach) | (p[:, 1] > h - 1 + reach)
        if bool(bad.any()):
            i = int(torch.nonzero(bad)[0])
            x, y = (float(v) for v in pts[i].tolist())
            return (f"control point #{i} has {which} point ({x:.6g}, {y:.6g}), far outside the {w}x{h} {which} image "
                    f"({int(bad.sum())} of {len(matches)} points are). Points are pixel (x, y) of the images: x from 0 "
                    f"to {w - 1}, y from 0 to {h - 1} (a little outside is fine)")
    return None
