"""Tests of the masked autoencoder (tiny preset) and of the preset table."""

from __future__ import annotations

import json
import re

import pytest
import torch

from bidsapp.model import presets
from bidsapp.model.factory import build_model, count_parameters, describe_model
from bidsapp.model.mae import MaskedAutoencoder, masked_mse, normalize_patches
from bidsapp.model.masking import Mask, build_masking
from bidsapp.model.presets import PRESETS
from bidsapp.model.regions import RegionGrid

TINY = PRESETS["tiny"]  # 96^3 input -> 48^3 working grid, 4^3-voxel tokens, 12^3 tokens


@pytest.fixture(scope="module")
def model() -> MaskedAutoencoder:
    torch.manual_seed(0)
    return build_model(TINY).eval()


@pytest.fixture(scope="module")
def brain() -> torch.Tensor:
    brain = torch.zeros(2, 96, 96, 96, dtype=torch.bool)
    brain[:, 16:80, 16:80, 16:80] = True
    brain[1, 16:40] = False  # the two samples differ
    return brain


@pytest.fixture(scope="module")
def grid() -> RegionGrid:
    """8 slab regions along d at working resolution, 6 voxels thick: not aligned to 4^3 tokens."""
    labels = torch.full((48, 48, 48), -1)
    labels[8:40] = torch.arange(8, 40).div(6, rounding_mode="floor").sub(1)[:, None, None]
    labels[:, :8] = -1
    labels[:, 40:] = -1
    brain = torch.zeros(48, 48, 48, dtype=torch.bool)
    brain[8:40, 8:40, 8:40] = True
    return RegionGrid.from_labels(labels, brain, TINY.patch_size, 6)


def _x(n_frames: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(2, n_frames, 96, 96, 96, generator=torch.Generator().manual_seed(seed))


def test_prepare_pools_values_and_brain(model: MaskedAutoencoder) -> None:
    x = torch.zeros(1, 1, 96, 96, 96)
    x[0, 0, :2, :2, :2] = torch.arange(8.0).view(2, 2, 2)
    brain = torch.zeros(1, 96, 96, 96, dtype=torch.bool)
    brain[0, 0, :2, :2] = True  # 4 of 8 voxels of working voxel (0, 0, 0): kept
    brain[0, 2, :2, :1] = True  # 2 of 8 voxels of working voxel (1, 0, 0): dropped
    xs, bs = model.prepare(x, brain)
    assert xs.shape == (1, 1, 48, 48, 48)
    assert bs.shape == (1, 48, 48, 48)
    assert xs[0, 0, 0, 0, 0].item() == pytest.approx(3.5)
    assert bs.sum().item() == 1
    assert bs[0, 0, 0, 0]


def test_prepare_takes_working_resolution_input(model: MaskedAutoencoder, brain: torch.Tensor,
                                               grid: RegionGrid) -> None:
    """Input already at 48^3 (a cache stored at downsample 2) passes as it is, same outputs."""
    x = _x()
    xs, bs = model.prepare(x, brain)
    same_x, same_brain = model.prepare(xs, bs)
    assert same_x is xs and torch.equal(same_brain, bs)
    mask = build_masking("random", grid, 0.5)(2, 1, torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(xs, bs, mask).pred, model(x, brain, mask).pred)
        torch.testing.assert_close(model.encode(xs, bs), model.encode(x, brain))
    # Any other shape, or a brain that does not match x, is refused.
    with pytest.raises(ValueError, match="x must be"):
        model.prepare(torch.zeros(1, 1, 32, 32, 32), torch.zeros(1, 32, 32, 32, dtype=torch.bool))
    with pytest.raises(ValueError, match="x must be"):
        model.prepare(torch.zeros(1, 48, 48, 48), torch.zeros(1, 48, 48, 48, dtype=torch.bool))
    with pytest.raises(ValueError, match="brain must be"):
        model.prepare(xs, brain)
    with pytest.raises(ValueError, match="brain must be"):
        model.prepare(x, bs)


def test_masked_mse_zero_on_perfect_hidden_reconstruction() -> None:
    target = torch.randn(2, 3, 8, 8, 8)
    weight = (torch.rand(2, 3, 8, 8, 8) < 0.3).float()
    garbage = torch.randn(2, 3, 8, 8, 8) * 100
    pred = torch.where(weight > 0, target, garbage)
    assert masked_mse(pred, target, weight).item() == 0.0
    # Off by 2 on the weighted set: mean squared error 4, whatever lies elsewhere.
    assert masked_mse(pred + 2 * weight, target, weight).item() == pytest.approx(4.0)


def test_normalize_patches_over_brain_voxels() -> None:
    x = torch.zeros(1, 1, 4, 4, 4)
    x[0, 0, :2, :2, :2] = torch.tensor([1.0, 3.0, 100, 100, 100, 100, 100, 100]).view(2, 2, 2)
    brain = torch.zeros(1, 4, 4, 4, dtype=torch.bool)
    brain[0, 0, 0, :2] = True  # the values 1 and 3: mean 2, variance 1
    out = normalize_patches(x, brain, 2, eps=0.0)
    assert out[0, 0, 0, 0, :2].tolist() == [-1.0, 1.0]


def test_forward_weight_and_loss(model: MaskedAutoencoder, brain: torch.Tensor,
                                 grid: RegionGrid) -> None:
    mask = build_masking("roi", grid, 0.5)(2, 1, torch.Generator().manual_seed(0))
    x = _x()
    with torch.no_grad():
        out = model(x, brain, mask)
    assert out.pred.shape == out.target.shape == out.weight.shape == (2, 2, 48, 48, 48)
    _, working_brain = model.prepare(x, brain)
    expected = (mask.voxels & working_brain[:, None]).expand(-1, 2, -1, -1, -1).float()
    assert torch.equal(out.weight, expected)
    assert out.weight.sum() > 0
    torch.testing.assert_close(out.loss, ((out.pred - out.target)[expected > 0] ** 2).mean())


def test_norm_pix_loss_targets(brain: torch.Tensor, grid: RegionGrid) -> None:
    torch.manual_seed(0)
    model = build_model(TINY, norm_pix_loss=True)
    mask = build_masking("random", grid, 0.5)(2, 1, torch.Generator().manual_seed(0))
    x = _x()
    with torch.no_grad():
        out = model(x, brain, mask)
    xs, bs = model.prepare(x, brain)
    torch.testing.assert_close(out.target, normalize_patches(xs, bs, TINY.patch_size))


def test_hidden_voxels_do_not_leak(model: MaskedAutoencoder, brain: torch.Tensor,
                                   grid: RegionGrid) -> None:
    # roi-voxel leaves partly hidden tokens visible: their hidden voxels must still be unseen.
    mask = build_masking("roi-voxel", grid, 0.5)(2, 1, torch.Generator().manual_seed(1))
    assert (mask.voxels & ~_expand_tokens(mask.tokens)).any()
    x = _x()
    hidden = mask.voxels.repeat_interleave(2, -3).repeat_interleave(2, -2)
    hidden = hidden.repeat_interleave(2, -1)  # working voxels -> 96^3 input voxels
    changed = x + 5.0 * hidden
    with torch.no_grad():
        torch.testing.assert_close(model(changed, brain, mask).pred, model(x, brain, mask).pred)
        visible_change = x + 5.0 * ~hidden
        assert not torch.allclose(model(visible_change, brain, mask).pred,
                                  model(x, brain, mask).pred)


def _expand_tokens(tokens: torch.Tensor) -> torch.Tensor:
    for dim in (-3, -2, -1):
        tokens = tokens.repeat_interleave(TINY.patch_size, dim)
    return tokens


def test_mask_token_receives_gradient(brain: torch.Tensor, grid: RegionGrid) -> None:
    torch.manual_seed(0)
    model = build_model(TINY)
    x = _x(n_frames=3)
    mask = build_masking("roi", grid, 0.5, time="random")(2, 3, torch.Generator().manual_seed(0))
    model(x, brain, mask).loss.backward()
    assert model.mask_token.grad is not None
    assert model.mask_token.grad.abs().sum() > 0
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0
    # With no token hidden, the mask token plays no part.
    model.zero_grad()
    none = Mask(torch.zeros_like(mask.tokens[:, :1]), mask.voxels[:, :1].clone(), None)
    model(x, brain, none).loss.backward()
    assert model.mask_token.grad is None or model.mask_token.grad.abs().sum() == 0


def test_encode_is_invariant_to_batch_composition(model: MaskedAutoencoder,
                                                  brain: torch.Tensor) -> None:
    x = _x(n_frames=3, seed=1)
    with torch.no_grad():
        both = model.encode(x, brain)
        second = model.encode(x[1:], brain[1:])
    assert both.shape == (2, 64)
    torch.testing.assert_close(both[1:], second, atol=1e-5, rtol=1e-4)
    assert not torch.allclose(both[0], both[1])


def test_encode_averages_brain_tokens_of_the_last_stage(model: MaskedAutoencoder) -> None:
    # The last stage of tiny has 3^3 tokens of 32^3 input voxels; brain only in the first one.
    x = _x(n_frames=2, seed=2)
    brain = torch.zeros(2, 96, 96, 96, dtype=torch.bool)
    brain[:, 4:20, 4:20, 4:20] = True
    with torch.no_grad():
        feats = model._features(model.prepare(x, brain)[0], None)[-1]  # (B, T, 3, 3, 3, 64)
        embedding = model.encode(x, brain)
    torch.testing.assert_close(embedding, feats[:, :, 0, 0, 0].mean(1))


def test_preset_table_matches_parameter_counts() -> None:
    rows = re.findall(r"^(\w+)\s+\d+\^3 \(s=\d\).*\s([\d,]+)$", presets.__doc__, re.MULTILINE)
    assert {name for name, _ in rows} == set(PRESETS)
    for name, quoted in rows:
        model = build_model(PRESETS[name])
        assert int(quoted.replace(",", "")) == sum(p.numel() for p in model.parameters())
        assert count_parameters(PRESETS[name]) == int(quoted.replace(",", ""))


def test_preset_shapes_and_describe() -> None:
    assert TINY.working_shape() == (48, 48, 48)
    assert TINY.grid_shape() == (12, 12, 12)
    assert PRESETS["base"].grid_shape() == (16, 16, 16)
    assert PRESETS["base"].stage_dims() == (36, 72, 144, 288)
    info = json.loads(json.dumps(describe_model(TINY)))
    assert info["grid_shape"] == [12, 12, 12]
    assert info["n_parameters"] == count_parameters(TINY)


def test_forward_rejects_a_mask_at_another_resolution(model: MaskedAutoencoder,
                                                      brain: torch.Tensor) -> None:
    wrong = Mask(torch.zeros(2, 1, 16, 16, 16, dtype=torch.bool),
                 torch.zeros(2, 1, 96, 96, 96, dtype=torch.bool))
    with pytest.raises(ValueError, match="working-resolution"):
        model(_x(), brain, wrong)
