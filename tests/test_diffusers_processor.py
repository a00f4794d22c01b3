"""MaskedExtendedAttnProcessor on a tiny random diffusers UNet (CPU, seconds)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UNet2DConditionModel  # noqa: E402
from diffusers.models.attention_processor import AttnProcessor2_0  # noqa: E402

from max4zero.adapters.diffusers_processor import (  # noqa: E402
    MaskedExtendedAttnProcessor,
    install_masked_extended_attention,
    token_grid,
)
from max4zero.attention.flow import AttentionCapture  # noqa: E402
from max4zero.tensors.masks import resize_to_grid  # noqa: E402

LAT = 16  # latent side; up_blocks run at 4², 8², 16² tokens (latent/4, /2, /1)
# Self-attention layers at latent/1 and latent/2 in the decoder: up_blocks.1 and up_blocks.2, two each.
SELECTED = [
    f"up_blocks.{b}.attentions.{a}.transformer_blocks.0.attn1.processor" for b in (1, 2) for a in (0, 1)
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """The model is tiny: intra-op threads only add spin-wait (seconds per call on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=LAT,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * 3,
        up_block_types=("CrossAttnUpBlock2D",) * 3,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    model.set_attn_processor(AttnProcessor2_0())
    return model.eval()


def _inputs(batch: int, hw: tuple[int, int] = (LAT, LAT), seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, *hw, generator=g), torch.randn(batch, 7, 32, generator=g)


def _masks(hw: tuple[int, int] = (LAT * 8, LAT * 8)) -> tuple[torch.Tensor, torch.Tensor]:
    """Garment (reference) and try-on (target) masks at IMAGE resolution (8× the latent)."""
    h, w = hw
    garment = torch.zeros(h, w)
    garment[h // 4 : 3 * h // 4, w // 5 : 3 * w // 5] = 1.0
    region = torch.zeros(h, w)
    region[h // 8 : 7 * h // 8, w // 3 : 5 * w // 6] = 1.0
    return garment, region


@torch.no_grad()
def _run(model: UNet2DConditionModel, x: torch.Tensor, emb: torch.Tensor, t: int = 400) -> torch.Tensor:
    return model(x, t, emb).sample


def test_token_grid_follows_the_downsampler() -> None:
    assert token_grid(64 * 64, (64, 64)) == (64, 64, 1)
    assert token_grid(32 * 32, (64, 64)) == (32, 32, 2)
    assert token_grid(16 * 8, (32, 16)) == (16, 8, 2)
    assert token_grid(3 * 3, (12, 10)) == (3, 3, 4)  # 12×10 → 6×5 → 3×3 (ceil, like the stride-2 conv)
    with pytest.raises(ValueError, match="latent_hw"):
        token_grid(100, (64, 64))


def test_empty_garment_mask_gives_the_unpatched_output(unet: UNet2DConditionModel) -> None:
    x, emb = _inputs(2)
    garment, region = _masks()
    base = _run(unet, x, emb)
    for ref_mask, query_mask in ((torch.zeros_like(garment), region), (garment, torch.zeros_like(region))):
        handle = install_masked_extended_attention(unet, ref_mask, query_mask, contrast=1.25)
        try:
            out = _run(unet, x, emb)
        finally:
            handle.remove()
        assert sorted(handle.mea_calls) == sorted(SELECTED)  # MEA did run, it just had nothing to add
        assert torch.equal(out, base)


def test_garment_changes_target_row_only(unet: UNet2DConditionModel) -> None:
    x, emb = _inputs(2)
    garment, region = _masks()
    base = _run(unet, x, emb)
    for contrast in (1.0, 1.25):  # fast path and explicit path of masked_extended_attention
        handle = install_masked_extended_attention(unet, garment, region, contrast=contrast)
        try:
            out = _run(unet, x, emb)
        finally:
            handle.remove()
        assert torch.equal(out[0], base[0])  # reference row: plain self-attention, bit for bit
        assert (out[1] - base[1]).abs().max() > 1e-3


def test_interleaved_layout_matches_halves(unet: UNet2DConditionModel) -> None:
    x, emb = _inputs(4)  # halves: [ref0, ref1, tgt0, tgt1]
    garment, region = _masks()
    handle = install_masked_extended_attention(unet, garment, region)
    try:
        halves = _run(unet, x, emb)
        handle.layout = "interleaved"
        order = torch.tensor([0, 2, 1, 3])  # [ref0, tgt0, ref1, tgt1]
        inter = _run(unet, x[order], emb[order])
    finally:
        handle.remove()
    torch.testing.assert_close(inter, halves[order], atol=1e-6, rtol=0)


def test_masked_reference_tokens_do_not_matter(unet: UNet2DConditionModel) -> None:
    """Processor level: perturbing recorded K/V outside the garment leaves the output bit-identical."""
    x, emb = _inputs(2)
    garment, region = _masks()
    for contrast in (1.0, 1.25):
        handle = install_masked_extended_attention(unet, garment, region, contrast=contrast, mode="recorded")
        try:
            with handle.recording():
                _run(unet, x[:1], emb[:1])
            before = _run(unet, x[1:], emb[1:])
            g = torch.Generator().manual_seed(5)
            for name, (k, v, hw) in list(handle.recorded.items()):
                outside = ~resize_to_grid(garment, hw).bool().reshape(1, -1, 1)
                assert outside.any() and not outside.all()
                k2 = torch.where(outside, k + 1e3 * torch.randn(k.shape, generator=g), k)
                v2 = torch.where(outside, v - 1e3 * torch.randn(v.shape, generator=g), v)
                handle.recorded[name] = (k2, v2, hw)
            after = _run(unet, x[1:], emb[1:])
            # and the perturbation is large enough to show if it leaked: break one garment token too
            name, (k, v, hw) = next(iter(handle.recorded.items()))
            inside = resize_to_grid(garment, hw).bool().reshape(-1).nonzero()[0, 0]
            v3 = v.clone()
            v3[:, inside] += 1e3
            handle.recorded[name] = (k, v3, hw)
            leaked = _run(unet, x[1:], emb[1:])
        finally:
            handle.remove()
        assert torch.equal(after, before)
        assert not torch.equal(leaked, before)


@pytest.mark.parametrize("hw", [(LAT, LAT), (LAT, LAT // 2)])
def test_recorded_mode_equals_batch_mode(unet: UNet2DConditionModel, hw: tuple[int, int]) -> None:
    x, emb = _inputs(2, hw)
    garment, region = _masks((hw[0] * 8, hw[1] * 8))
    cap_batch, cap_rec = AttentionCapture(), AttentionCapture()
    handle = install_masked_extended_attention(unet, garment, region, contrast=1.25, capture=cap_batch)
    try:
        batch = _run(unet, x, emb)
    finally:
        handle.remove()
    handle = install_masked_extended_attention(unet, garment, region, contrast=1.25, mode="recorded", capture=cap_rec)
    try:
        with handle.recording():
            ref_out = _run(unet, x[:1], emb[:1])
        assert sorted(handle.recorded) == sorted(SELECTED)
        tgt = _run(unet, x[1:], emb[1:])
        # one recorded reference (batch 1) serves a target batch of 2 (e.g. uncond + cond)
        tgt2 = _run(unet, x[1:].expand(2, -1, -1, -1), emb[1:].expand(2, -1, -1))
    finally:
        handle.remove()
    torch.testing.assert_close(ref_out, batch[:1], atol=1e-5, rtol=0)
    torch.testing.assert_close(tgt, batch[1:], atol=1e-5, rtol=0)
    torch.testing.assert_close(tgt2, batch[1:].expand(2, -1, -1, -1), atol=1e-5, rtol=0)
    assert len(cap_rec.records) == 2 * len(cap_batch.records) == 2 * len(SELECTED)  # no record in the reference pass
    for a, b in zip(cap_batch.records, cap_rec.records):
        assert (a.layer, a.query_hw, a.ref_hw) == (b.layer, b.query_hw, b.ref_hw)
        torch.testing.assert_close(a.flow, b.flow, atol=1e-5, rtol=0)


def test_recorded_reference_may_have_its_own_size(unet: UNet2DConditionModel) -> None:
    """A reference crop of another aspect: its grid comes from the recording pass."""
    x_ref, e_ref = _inputs(1, (LAT, LAT // 2), seed=3)
    x, emb = _inputs(1, (LAT, LAT))
    garment, region = _masks((LAT * 8, LAT * 4))[0], _masks()[1]
    capture = AttentionCapture()
    handle = install_masked_extended_attention(unet, garment, region, mode="recorded", capture=capture)
    try:
        with handle.recording():
            _run(unet, x_ref, e_ref)
        base = _run(unet, x, emb)
        handle.enabled = False
        plain = _run(unet, x, emb)
    finally:
        handle.remove()
    assert {(r.query_hw, r.ref_hw) for r in capture.records} == {((16, 16), (16, 8)), ((8, 8), (8, 4))}
    assert not torch.equal(base, plain)


def test_capture_records_layers_times_steps_on_a_non_square_latent(unet: UNet2DConditionModel) -> None:
    hw = (16, 8)
    x, emb = _inputs(2, hw)
    garment, region = _masks((128, 64))
    capture = AttentionCapture()
    handle = install_masked_extended_attention(unet, garment, region, contrast=1.25, capture=capture)
    steps = (900, 600, 300)
    try:
        with_capture = [_run(unet, x, emb, t) for t in steps]
        handle.capture = None
        without = [_run(unet, x, emb, t) for t in steps]
    finally:
        handle.remove()
    assert len(capture.records) == len(SELECTED) * len(steps)
    assert [r.step for r in capture.records] == [s for s in range(len(steps)) for _ in SELECTED]
    assert [r.layer for r in capture.records[: len(SELECTED)]] == SELECTED
    assert {r.query_hw for r in capture.records} == {(16, 8), (8, 4)}
    assert all(r.ref_hw == r.query_hw for r in capture.records)
    for r in capture.records:
        assert r.flow.shape == (1, *r.query_hw, 2)  # one target row
        assert torch.equal(r.query_mask[0], resize_to_grid(region, r.query_hw).bool())
        assert r.flow.abs().max() <= 1.0 + 1e-6
    for a, b in zip(with_capture, without):  # capture observes, it does not change the result
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_capture_filters_skip_layers(unet: UNet2DConditionModel) -> None:
    x, emb = _inputs(2)
    garment, region = _masks()
    capture = AttentionCapture(grids=[LAT])  # only the finest grid
    handle = install_masked_extended_attention(unet, garment, region, capture=capture)
    try:
        _run(unet, x, emb)
    finally:
        handle.remove()
    assert len(capture.records) == 2 and {r.query_hw for r in capture.records} == {(LAT, LAT)}


def test_remove_restores_processors_and_output(unet: UNet2DConditionModel) -> None:
    x, emb = _inputs(2)
    garment, region = _masks()
    before = dict(unet.attn_processors)
    base = _run(unet, x, emb)
    handle = install_masked_extended_attention(unet, garment, region)
    patched = dict(unet.attn_processors)
    for name, proc in patched.items():
        if name in SELECTED or (name.startswith("up_blocks.0.") and ".attn1." in name):
            assert isinstance(proc, MaskedExtendedAttnProcessor) and proc.fallback is before[name]
        else:  # cross-attention, encoder, mid block: the very same objects
            assert proc is before[name]
    assert not torch.equal(_run(unet, x, emb), base)
    handle.remove()
    handle.remove()  # idempotent
    after = dict(unet.attn_processors)
    assert after.keys() == before.keys() and all(after[n] is before[n] for n in before)
    assert torch.equal(_run(unet, x, emb), base)
    assert not unet._forward_pre_hooks


def test_selection_by_grid_and_switches(unet: UNet2DConditionModel) -> None:
    x, emb = _inputs(2)
    garment, region = _masks()
    base = _run(unet, x, emb)
    handle = install_masked_extended_attention(unet, garment, region, scales=(4,))
    try:
        out4 = _run(unet, x, emb)  # only up_blocks.0 (4² tokens) runs MEA
        assert sorted(handle.mea_calls) == [
            f"up_blocks.0.attentions.{a}.transformer_blocks.0.attn1.processor" for a in (0, 1)
        ]
        handle.enabled = False
        off = _run(unet, x, emb)
    finally:
        handle.remove()
    assert torch.equal(out4[0], base[0]) and not torch.equal(out4[1], base[1])
    assert torch.equal(off, base)

    handle = install_masked_extended_attention(unet, garment, region, layers=["up_blocks.2"])
    try:
        _run(unet, x, emb)
    finally:
        handle.remove()
    assert sorted(handle.mea_calls) == SELECTED[2:]


def test_bad_use_raises_value_error(unet: UNet2DConditionModel) -> None:
    x, emb = _inputs(3)
    garment, region = _masks()
    with pytest.raises(ValueError, match="matches no self-attention layer"):
        install_masked_extended_attention(unet, garment, region, layers=["up_blocks.9"])
    with pytest.raises(ValueError, match="mode"):
        install_masked_extended_attention(unet, garment, region, mode="pairs")
    with pytest.raises(ValueError, match="scales"):
        install_masked_extended_attention(unet, garment, region, scales=(3,))
    with pytest.raises(ValueError, match="contrast"):
        install_masked_extended_attention(unet, garment, region, contrast=-1.0)
    assert all(not isinstance(p, MaskedExtendedAttnProcessor) for p in unet.attn_processors.values())
    handle = install_masked_extended_attention(unet, garment, region)
    try:
        with pytest.raises(ValueError, match="layout"):
            handle.layout = "pairs"
        with pytest.raises(ValueError, match="even batch"):
            _run(unet, x, emb)
        with pytest.raises(ValueError, match="recording"):
            with handle.recording():
                pass
    finally:
        handle.remove()
    handle = install_masked_extended_attention(unet, garment, region, mode="recorded")
    try:
        with pytest.raises(ValueError, match="handle.recording"):
            _run(unet, x[:1], emb[:1])
        with handle.recording():
            _run(unet, x[:2], emb[:2])
        with pytest.raises(ValueError, match="reference pass had batch 2"):
            _run(unet, x, emb)
    finally:
        handle.remove()
    three = torch.stack([garment] * 3)
    handle = install_masked_extended_attention(unet, three, region)
    try:
        with pytest.raises(ValueError, match=r"batch sizes differ \(ref_key_mask has 3, the target has 1\)"):
            _run(unet, x[:2], emb[:2])
    finally:
        handle.remove()
    assert all(not isinstance(p, MaskedExtendedAttnProcessor) for p in unet.attn_processors.values())


def test_layers_by_the_node_s_choice_select_what_the_comfyui_node_selects(unet: UNet2DConditionModel) -> None:
    """The adapter speaks the policy's vocabulary: a node ``layers`` label (or a LayerSelection) picks the same UNet
    parts and grids as 'decoder' + scales, and the encoder choice adds down_blocks."""
    from max4zero.adapters.diffusers_processor import layer_selection
    from max4zero.attention.policy import LAYER_CHOICES

    parts, scales = layer_selection("decoder 1/16 + 1/8 (paper)", None)
    assert parts == frozenset({"output"}) and scales == (1, 2)
    assert layer_selection("decoder", (1, 2)) == (frozenset({"output"}), (1, 2))
    parts, scales = layer_selection(LAYER_CHOICES["encoder + decoder 1/16 + 1/8"], (4,))
    assert parts == frozenset({"input", "output"}) and scales == (1, 2)  # the selection's grids win
    assert layer_selection(["up_blocks.1"], (2,)) == (["up_blocks.1"], (2,))
    g = torch.Generator().manual_seed(4)
    garment = torch.rand(1, 32, 32, generator=g) > 0.3
    region = torch.rand(1, 32, 32, generator=g) > 0.5
    by_label = install_masked_extended_attention(unet, garment, region, layers="decoder 1/16 + 1/8 (paper)")
    names_label = sorted(by_label.processors)
    by_label.remove()
    by_decoder = install_masked_extended_attention(unet, garment, region, layers="decoder")
    assert sorted(by_decoder.processors) == names_label and by_decoder.levels == frozenset({0, 1})
    by_decoder.remove()
    enc = install_masked_extended_attention(unet, garment, region, layers="encoder + decoder 1/16 + 1/8")
    assert any(n.startswith("down_blocks.") for n in enc.processors) and set(names_label) <= set(enc.processors)
    enc.remove()
