"""Tests of the vit4d backbone: presets, token dropping, padding, loss, gradients, and the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from bidsapp.cli import main
from bidsapp.demo import make_demo_dataset
from bidsapp.model import presets
from bidsapp.model.factory import build_model, count_parameters
from bidsapp.model.layers import sincos_embedding_4d
from bidsapp.model.mae import masked_mse
from bidsapp.model.masking import Mask, build_masking
from bidsapp.model.presets import VIT4D_PRESETS, ModelPreset
from bidsapp.model.regions import RegionGrid
from bidsapp.model.vit4d import (
    ViTMaskedAutoencoder,
    pack,
    patchify,
    unpatchify,
)

TINY = VIT4D_PRESETS["tiny"]  # 48^3 working grid, 4^3-voxel tokens of 5 frames: 12^3 per tubelet


def _brain(batch: int = 2) -> torch.Tensor:
    """A 64^3 brain cube at input resolution; the second sample lacks a slab of it."""
    brain = torch.zeros(batch, 96, 96, 96, dtype=torch.bool)
    brain[:, 16:80, 16:80, 16:80] = True
    brain[1:, 16:40] = False
    return brain


def _region_grid(preset: ModelPreset) -> RegionGrid:
    """6 slab regions along d, filling the brain cube of :func:`_brain` at working resolution."""
    d = preset.working_shape()[0]
    lo, hi = 16 // preset.downsample, 80 // preset.downsample
    labels = torch.full((d, d, d), -1)
    slabs = (torch.arange(hi - lo) * 6).div(hi - lo, rounding_mode="floor")
    labels[lo:hi, lo:hi, lo:hi] = slabs[:, None, None]
    return RegionGrid.from_labels(labels, labels >= 0, preset.patch_size, 6)


def _x(batch: int = 2, frames: int = 10, seed: int = 0) -> torch.Tensor:
    """Noise in the brain, 0 outside (as the cache gives)."""
    noise = torch.randn(batch, frames, 96, 96, 96, generator=torch.Generator().manual_seed(seed))
    return noise * _brain(batch)[:, None]


def _mask(name: str, batch: int = 2, frames: int = 10, seed: int = 0, time: str = "tube") -> Mask:
    masking = build_masking(name, _region_grid(TINY), 0.5, time=time)
    return masking(batch, frames, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def model() -> ViTMaskedAutoencoder:
    torch.manual_seed(0)
    return build_model(TINY).eval()


def _encoder_calls(model: ViTMaskedAutoencoder) -> tuple[list, torch.utils.hooks.RemovableHandle]:
    """Record ``(tokens, valid, output)`` of every encoder call."""
    calls: list = []
    handle = model.encoder.register_forward_hook(
        lambda _module, args, out: calls.append((*args, out)))
    return calls, handle


def test_patchify_round_trip_and_order() -> None:
    x = torch.randn(2, 4, 6, 4, 2)  # (B, T, D, H, W)
    tokens = patchify(x, 2, 2)
    assert tokens.shape == (2, 2, 3, 2, 1, 16)
    assert torch.equal(unpatchify(tokens, 2, 2), x)
    # Voxels ordered (fd, fh, fw, ft): the first two are frames 0 and 1 of voxel (0, 0, 0).
    assert torch.equal(tokens[0, 0, 0, 0, 0, :2], x[0, :2, 0, 0, 0])


def test_pack_left_aligns_kept_tokens() -> None:
    keep = torch.tensor([[False, True, False, True, True], [True, False, False, False, False]])
    index, valid = pack(keep)
    assert index[0].tolist() == [1, 3, 4]
    assert index[1, 0].item() == 0 and valid.tolist() == [[True] * 3, [True, False, False]]
    assert all(len(set(row.tolist())) == 3 for row in index)  # padding points at distinct tokens


def test_sincos_embedding_tells_positions_apart() -> None:
    emb = sincos_embedding_4d((2, 3, 3, 3), 32, torch.device("cpu"))
    assert emb.shape == (54, 32)
    assert torch.cdist(emb, emb).add(torch.eye(54)).min() > 0.1
    # A quarter of the channels per axis: frame 0 and 1 differ only in the first quarter.
    assert torch.equal(emb[0, 8:], emb[27, 8:]) and not torch.equal(emb[0, :8], emb[27, :8])


def test_preset_table_matches_parameter_counts() -> None:
    rows = re.findall(r"^vit4d-(\w+)\s+\d+\^3 \(s=\d\).*\s([\d,]+)$", presets.__doc__, re.MULTILINE)
    assert {name for name, _ in rows} == set(VIT4D_PRESETS)
    for name, quoted in rows:
        preset = VIT4D_PRESETS[name]
        assert preset.backbone == "vit4d"
        assert count_parameters(preset) == int(quoted.replace(",", ""))
    assert isinstance(build_model(TINY), ViTMaskedAutoencoder)


@torch.no_grad()
@pytest.mark.parametrize("name", sorted(VIT4D_PRESETS))
def test_shapes_for_each_preset(name: str) -> None:
    preset = VIT4D_PRESETS[name]
    torch.manual_seed(0)
    model = build_model(preset).eval()
    frames = preset.tubelet
    mask = build_masking("roi", _region_grid(preset), 0.5)(2, frames, torch.Generator().manual_seed(0))
    x, brain = _x(frames=frames), _brain()
    out = model(x, brain, mask)
    working = preset.working_shape()
    assert out.pred.shape == out.target.shape == out.weight.shape == (2, frames, *working)
    assert out.embedding.shape == (2, preset.embed_dim)
    assert torch.isfinite(out.loss) and out.loss > 0
    assert model.encode(x, brain).shape == (2, preset.embed_dim)
    with pytest.raises(ValueError, match="tubelet"):
        model.encode(_x(frames=frames + 1), brain)


def _voxels(tokens: torch.Tensor) -> torch.Tensor:
    """Token mask ``(B, Tm, 12, 12, 12)`` of the tiny grid -> voxel mask ``(B, Tm, 48, 48, 48)``."""
    for dim in (-3, -2, -1):
        tokens = tokens.repeat_interleave(TINY.patch_size, dim)
    return tokens


@torch.no_grad()
def test_only_visible_brain_tokens_enter_the_encoder(model: ViTMaskedAutoencoder) -> None:
    # Brain = tokens [2, 6)^3 of the 12^3 grid; tokens with d = 2 are hidden in every frame:
    # 64 - 16 = 48 visible tokens per tubelet, 2 tubelets of 5 frames.
    brain = torch.zeros(1, 96, 96, 96, dtype=torch.bool)
    brain[:, 16:48, 16:48, 16:48] = True
    tokens = torch.zeros(1, 1, 12, 12, 12, dtype=torch.bool)
    tokens[..., 2, :, :] = True
    calls, handle = _encoder_calls(model)
    try:
        out = model(_x(1), brain, Mask(tokens, _voxels(tokens)))
        assert calls[-1][1].sum().item() == 2 * 48 and calls[-1][0].shape[1] == 2 * 48
        # Hidden in frames 0-4 only: dropped from the first tubelet, visible in the second.
        per_frame = tokens.repeat(1, 10, 1, 1, 1)
        per_frame[:, 5:] = False
        model(_x(1), brain, Mask(per_frame, _voxels(per_frame)))
        assert calls[-1][1].sum().item() == 48 + 64
        model.encode(_x(1), brain)
        assert calls[-1][1].sum().item() == 2 * 64
    finally:
        handle.remove()
    # Background tokens are neither encoded nor reconstructed.
    assert out.pred[:, :, 24:].abs().sum() == 0 and out.pred[:, :, 8:24, 8:24, 8:24].abs().min() > 0


@torch.no_grad()
def test_padding_never_changes_a_sample(model: ViTMaskedAutoencoder) -> None:
    x, brain = _x(), _brain()
    mask = _mask("roi", time="random", seed=3)
    calls, handle = _encoder_calls(model)
    try:
        both = model(x, brain, mask)
        counts = calls[-1][1].sum(1)
        assert counts[0] != counts[1]  # the second sample is padded
        for i in (0, 1):
            alone = model(x[i:i + 1], brain[i:i + 1], Mask(mask.tokens[i:i + 1], mask.voxels[i:i + 1]))
            torch.testing.assert_close(both.pred[i:i + 1], alone.pred, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(both.embedding[i:i + 1], alone.embedding, atol=1e-5, rtol=1e-4)
    finally:
        handle.remove()


@torch.no_grad()
def test_dropping_tokens_equals_attention_masking_over_the_whole_grid(
        model: ViTMaskedAutoencoder) -> None:
    """The plain path: every token of the grid encoded, attending only to visible brain tokens."""
    x, brain = _x(), _brain()
    mask = _mask("roi-voxel", seed=1)
    calls, handle = _encoder_calls(model)
    try:
        out = model(x, brain, mask)
    finally:
        handle.remove()
    _, valid, packed = calls[-1]
    xs, bs = model.prepare(x, brain)
    hidden = mask.voxels.expand_as(xs)
    values = patchify(xs.masked_fill(hidden, 0.0), 4, 5).flatten(1, 4)  # (B, 3456, 320)
    flags = patchify(hidden, 4, 5).flatten(1, 4).float()
    tokens = model.patch_embed(torch.cat([values, flags], -1))
    tokens = tokens + sincos_embedding_4d((2, 12, 12, 12), 64, tokens.device)
    brain_tok = bs.view(2, 12, 4, 12, 4, 12, 4).any(6).any(4).any(2).flatten(1).repeat(1, 2)
    visible = brain_tok & ~mask.tokens.flatten(1).repeat(1, 2)
    dense = model.encoder(tokens, visible)  # (B, N, C)
    torch.testing.assert_close(packed[valid], dense[visible], atol=1e-5, rtol=1e-4)
    embedding = (dense * visible[..., None]).sum(1) / visible.sum(1, keepdim=True)
    torch.testing.assert_close(out.embedding, embedding, atol=1e-5, rtol=1e-4)
    assert torch.equal(valid.sum(1), visible.sum(1))


def test_loss_is_zero_for_a_perfect_reconstruction_of_the_hidden_set() -> None:
    torch.manual_seed(0)
    model = build_model(TINY)
    brain = _brain()
    x = 3.0 * brain[:, None].expand(-1, 10, -1, -1, -1).float()  # 3 in the brain, 0 elsewhere
    mask = _mask("roi")
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.fill_(3.0)  # every brain token reconstructed as 3
        out = model(x, brain, mask)
        assert out.loss.item() == 0.0
        assert out.weight.sum() > 0
        model.head.bias.fill_(4.0)
        assert model(x, brain, mask).loss.item() == pytest.approx(1.0)
    torch.testing.assert_close(out.loss, masked_mse(out.pred, out.target, out.weight))


def test_mask_token_receives_gradient() -> None:
    torch.manual_seed(0)
    model = build_model(TINY)
    x, brain = _x(frames=5), _brain()
    model(x, brain, _mask("roi", frames=5)).loss.backward()
    assert model.mask_token.grad.abs().sum() > 0
    assert model.patch_embed.weight.grad.abs().sum() > 0
    # No token hidden: the mask token plays no part.
    model.zero_grad()
    mask = _mask("roi-voxel", frames=5)
    none = Mask(torch.zeros_like(mask.tokens), mask.voxels)
    model(x, brain, none).loss.backward()
    assert model.mask_token.grad is None or model.mask_token.grad.abs().sum() == 0


@torch.no_grad()
def test_embedding_is_invariant_to_batch_composition(model: ViTMaskedAutoencoder) -> None:
    x, brain = _x(seed=1), _brain()
    both = model.encode(x, brain)
    torch.testing.assert_close(both[1:], model.encode(x[1:], brain[1:]), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(both[:1], model.encode(x[:1], brain[:1]), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(both[0], both[1])


def test_two_training_steps_lower_the_loss() -> None:
    torch.manual_seed(0)
    model = build_model(TINY)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x, brain, mask = _x(frames=5), _brain(), _mask("roi", frames=5)
    losses = []
    for _ in range(3):
        loss = model(x, brain, mask).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[2] < losses[1] < losses[0], losses


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    bids = tmp_path_factory.mktemp("demo") / "bids"
    make_demo_dataset(bids, n_participants=4, n_frames=20, seed=1)
    return bids


def test_pretrain_and_participant_with_vit4d(demo: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    common = ["--window-frames", "10", "--random-seed", "3", "--nprocs", "1"]
    assert main([str(demo), str(out), "pretrain", "--backbone", "vit4d", "--epochs", "1",
                 "--batch-size", "2", *common]) == 0
    meta = json.loads((out / "models/desc-roi/model.json").read_text())
    assert meta["backbone"] == "vit4d" and meta["preset"]["backbone"] == "vit4d"
    assert meta["preset"]["name"] == "tiny" and meta["preset"]["tubelet"] == TINY.tubelet
    # The checkpoint says which backbone it is: participant builds it, and refuses another one.
    capsys.readouterr()
    assert main([str(demo), str(out), "participant", "--participant-label", "01",
                 "--backbone", "swin4d"]) == 64
    assert "vit4d" in capsys.readouterr().err
    assert main([str(demo), str(out), "participant", "--participant-label", "01", "02",
                 "--attribution-subsets", "2", "--no-reports"]) == 0
    embeddings = sorted(out.glob("sub-*/func/*_desc-roi_embedding.tsv"))
    assert len(embeddings) == 2
    # A window that the tubelet does not divide is refused before any work.
    assert main([str(demo), str(tmp_path / "other"), "pretrain", "--backbone", "vit4d",
                 "--window-frames", "8", "--epochs", "1"]) == 64
