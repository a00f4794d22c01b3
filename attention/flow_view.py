"""The Leffa flow view's pictures from recorded attention (docs/method.md §4): selection, accumulation, drawing.

Pure: records in (:class:`~max4zero.attention.flow.FlowRecord`, filled while sampling), pictures out, and the
comparison with the registration stage's MLS warp (:func:`mls_flow`, :func:`disagreement`). The ComfyUI node
(``nodes/mea_nodes.py``) only finds the run's records and converts layouts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from . import flow as _flow
from .flow import FlowRecord
from .policy import grid_level

__all__ = ["FLOW_MODES", "FlowView", "select_for_view", "view_levels", "no_match_message", "render_flow_view", "mls_flow",
           "disagreement"]

FLOW_MODES = ("absolute", "displacement")


def select_for_view(
    records: Sequence[FlowRecord],
    latent_hw: Sequence[int],
    levels: Optional[frozenset] = None,
    step_start: float = 0.0,
    step_end: float = 1.0,
) -> list[FlowRecord]:
    """Records of the chosen grid levels whose model evaluation lies in [step_start, step_end].

    The window is a fraction of the *recorded* evaluations, in sampling order (decreasing sigma):
    0 = the first MEA evaluation, 1 = the last. A window that falls between two evaluations keeps the
    one nearest to its centre, so a narrow window never comes back empty.
    """
    if not (0.0 <= step_start <= step_end <= 1.0):
        raise ValueError(f"need 0 ≤ step_start ≤ step_end ≤ 1, got {step_start} and {step_end}")
    chosen = [r for r in records if levels is None or grid_level(latent_hw, r.query_hw) in levels]
    sigmas = sorted({float(r.sigma) for r in chosen if r.sigma is not None}, reverse=True)
    if not sigmas:
        return chosen
    n = len(sigmas)
    pos = {s: (i / (n - 1) if n > 1 else 0.0) for i, s in enumerate(sigmas)}
    keep = {s for s, p in pos.items() if step_start - 1e-9 <= p <= step_end + 1e-9}
    if not keep:
        centre = 0.5 * (step_start + step_end)
        keep = {min(pos, key=lambda s: abs(pos[s] - centre))}
    return [r for r in chosen if r.sigma is not None and float(r.sigma) in keep]


def _is_dit_block(layer: object) -> bool:
    return isinstance(layer, tuple) and len(layer) == 2 and layer[0] in ("double", "single")


def view_levels(choice: Optional[frozenset], vae_ratio: int = 8) -> Optional[frozenset]:
    """The grid levels (halvings of the latent grid) a Flow View ``layers`` choice means for a model whose VAE
    packs ``vae_ratio`` pixels per latent cell. The choices name fractions of the image at an 8× VAE
    (``policy.FLOW_LAYER_CHOICES``: "1/16 grid" = level 1); with FLUX.2's 16× latent, "1/16 grid" is level 0.

    >>> sorted(view_levels(frozenset({1}), 8)), sorted(view_levels(frozenset({1}), 16)), view_levels(None, 16)
    ([1], [0], None)
    """
    if choice is None:
        return None
    shift = int(vae_ratio).bit_length() - 1 - 3  # log2(ratio / 8)
    return frozenset(lvl - shift for lvl in choice if lvl - shift >= 0)


def no_match_message(records: Sequence[FlowRecord], latent_hw: Sequence[int], vae_ratio: int = 8) -> tuple[str, str]:
    """(problem, fix) when no record matches a grid choice, naming the grids this run did record (as fractions of
    the image: ``vae_ratio`` pixels per latent cell).

    A Flux-family run (records labelled with DiT blocks) says that every block attends at one grid.

    >>> r = FlowRecord(torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2), None, None, None, (2, 2), (2, 2), ("double", 0))
    >>> no_match_message([r], (4, 4))[1], no_match_message([r], (2, 2), 16)[1]
    ("pick 'all MEA layers' or '1/16 grid'", "pick 'all MEA layers' or '1/16 grid'")
    """
    levels = sorted({grid_level(latent_hw, r.query_hw) for r in records})
    if not levels:
        return "no MEA layer call was recorded", "check the MEA window against the sampler's steps, and the masks"
    names = [f"1/{int(vae_ratio) * 2 ** lvl} grid" for lvl in levels]
    flux = all(_is_dit_block(r.layer) for r in records)
    note = f" (a Flux model: every block attends at {names[0][:-5]} of the image)" if flux and len(names) == 1 else ""
    return (f"no recorded MEA layer call is at the chosen grid: this run recorded {', '.join(names)} only{note}",
            "pick 'all MEA layers' or " + " or ".join(f"'{n}'" for n in names))


@dataclass
class FlowView:
    """Flow view outputs at the target's pixel size (H, W), batch B of the recorded target rows.

    flow_rgb / warped: [B, H, W, 3] in 0..1 (black where no query used MEA); reliance (row mass),
    sharpness (exp(−entropy) = 1 / effective number of reference tokens read) and epe: [B, H, W].
    epe is in reference pixels (None without an MLS flow). flow [B, H, W, 2] normalised (x, y).
    """

    flow_rgb: torch.Tensor
    warped: torch.Tensor
    reliance: torch.Tensor
    sharpness: torch.Tensor
    epe: Optional[torch.Tensor]
    flow: torch.Tensor
    covered: torch.Tensor
    n_records: int


def render_flow_view(
    records: Sequence[FlowRecord],
    reference_bchw: torch.Tensor,
    latent_hw: Sequence[int],
    out_hw: Sequence[int],
    *,
    levels: Optional[frozenset] = None,
    step_start: float = 0.0,
    step_end: float = 1.0,
    mode: str = "absolute",
    mls_flow: Optional[torch.Tensor] = None,
    vae_ratio: int = 8,
) -> FlowView:
    """Average the selected records (flow weighted by row mass) and draw the views at ``out_hw``.

    Args:
        records: :class:`FlowRecord` list from a :class:`MeaTrace`.
        reference_bchw: [1, C, Hr, Wr] the reference image the flow points into (the encoded part).
        latent_hw: the target latent's (h, w), to name the records' grids (``vae_ratio`` pixels per cell).
        out_hw: output size (the target image's pixels).
        mls_flow: optional [H, W, 2] or [B, H, W, 2] MLS backward map in the normalised convention
            (:func:`mls_flow_from_matches`) for the end-point-error map.
    """
    if mode not in FLOW_MODES:
        raise ValueError(f"mode must be one of {FLOW_MODES}, got {mode!r}")
    chosen = select_for_view(records, latent_hw, levels, step_start, step_end)
    if not chosen:
        raise ValueError("; ".join(no_match_message(records, latent_hw, vae_ratio)))
    batch = {int(r.flow.shape[0]) for r in chosen}
    if len(batch) > 1:
        raise ValueError(f"the recorded calls have different batch sizes {sorted(batch)}; view one sampling layout")
    finest = max((tuple(r.query_hw) for r in chosen), key=lambda hw: hw[0] * hw[1])
    stats = _flow.accumulate_records(chosen, finest, mass_weighted=True)
    H, W = int(out_hw[0]), int(out_hw[1])
    flow_up = _flow.resize_flow(stats.flow, (H, W))
    mass_up = _flow.resize_flow(stats.mass, (H, W)).clamp(0.0, 1.0)
    covered = mass_up > 1e-6
    cov = covered.unsqueeze(-1).float()
    flow_rgb = _flow.flow_to_color(flow_up, mode) * cov
    ref = reference_bchw.float()
    warped = _flow.warp_by_flow(ref[:, :3], stats.flow, size=(H, W))  # [B, C, H, W]
    warped = warped.permute(0, 2, 3, 1).clamp(0.0, 1.0) * cov
    if stats.entropy is not None:
        sharp = torch.exp(-_flow.resize_flow(stats.entropy, (H, W)).clamp_min(0.0)) * covered
    else:
        sharp = torch.zeros_like(mass_up)
    epe = None
    if mls_flow is not None:
        mf = mls_flow.float()
        mf = mf.unsqueeze(0) if mf.dim() == 3 else mf
        mf = _flow.resize_flow(mf, (H, W)).expand(flow_up.shape[0], -1, -1, -1)
        epe = _flow.end_point_error(flow_up, mf, pixel_size=tuple(ref.shape[-2:])) * covered
    return FlowView(
        flow_rgb=flow_rgb.contiguous(), warped=warped.contiguous(), reliance=mass_up.contiguous(),
        sharpness=sharp.contiguous(), epe=None if epe is None else epe.contiguous(), flow=flow_up,
        covered=covered, n_records=len(chosen),
    )


def mls_flow(
    target_points: torch.Tensor, reference_points: torch.Tensor, ref_hw: Sequence[int], out_hw: Sequence[int],
    kind: str = "affine", alpha: float = 0.1, stride: int = 4,
) -> torch.Tensor:
    """The registration stage's MLS backward map as a normalised flow [H, W, 2] at ``out_hw`` (docs/method.md §4).

    Points are (x, y) pixels: ``target_points`` [N, 2] at ``out_hw``, ``reference_points`` [N, 2] at ``ref_hw``.
    Same construction as the MLS warp (target points → reference points), so the end-point error is measured
    against the warp that built the composite.
    """
    from ..warping.mls import backward_map

    if int(target_points.shape[0]) == 0:
        raise ValueError("the matches hold no control point; run the correspondence node with looser filters")
    pix = backward_map(target_points, reference_points, int(out_hw[0]), int(out_hw[1]), kind, alpha, stride)
    return _flow.pixel_map_to_flow(pix, tuple(ref_hw))


def disagreement(view: FlowView, epe_scale_px: float, mls_warped: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Where attention and registration disagree, [B, H, W] in 0..1 (docs/method.md §4).

    With an MLS flow in the view: the end-point error in reference pixels / ``epe_scale_px`` (1 = that many
    pixels or more). Else with the MLS-warped reference ``mls_warped`` [B, C ≥ 3, H', W'] (any size, resized): the mean
    colour difference to the attention-warped reference where MEA read the garment. Else zeros.
    """
    if view.epe is not None:
        return (view.epe / float(epe_scale_px)).clamp(0.0, 1.0)
    if mls_warped is None:
        return torch.zeros_like(view.reliance)
    mw = mls_warped[:, :3].float()
    out_hw = tuple(view.warped.shape[1:3])
    if tuple(mw.shape[-2:]) != out_hw:
        mw = torch.nn.functional.interpolate(mw, size=out_hw, mode="bilinear", align_corners=False)
    return (view.warped - mw.permute(0, 2, 3, 1)).abs().mean(-1) * view.covered
