"""Tests of the 4D Swin encoder: layout helpers, shifted-window masks, padding, stage shapes, and
background skipping in its masked autoencoder."""

from __future__ import annotations

import itertools

import pytest
import torch

from bidsapp.model.factory import build_model
from bidsapp.model.layers import brain_tokens, depth_to_space, space_to_depth
from bidsapp.model.masking import build_masking
from bidsapp.model.presets import PRESETS
from bidsapp.model.regions import RegionGrid
from bidsapp.model.swin4d import (
    Swin4DEncoder,
    SwinBlock4D,
    SwinMaskedAutoencoder,
    window_attention_mask,
    window_partition,
    window_reverse,
)


def _encoder(name: str) -> Swin4DEncoder:
    p = PRESETS[name]
    return Swin4DEncoder(
        p.grid_shape(), p.embed_dim, p.depths, p.num_heads, p.window_size, p.mlp_ratio
    )


def test_space_to_depth_known_answer() -> None:
    x = torch.arange(8.0).view(1, 2, 2, 2, 1)  # value = 4d + 2h + w
    folded = space_to_depth(x, 2)
    assert folded.shape == (1, 1, 1, 1, 8)
    assert folded.flatten().tolist() == list(range(8))  # channels ordered (fd, fh, fw, C)
    y = torch.randn(2, 3, 4, 6, 8, 5)
    assert torch.equal(depth_to_space(space_to_depth(y, 2), 2), y)


def test_window_partition_round_trip() -> None:
    x = torch.randn(2, 4, 6, 2, 4, 3)  # (B, T, D, H, W, C)
    windows = window_partition(x, (2, 3, 2, 2))
    assert windows.shape == (2 * 2 * 1 * 2, 2, 24, 3)
    assert torch.equal(windows[0, 1], x[1, :2, :3, :2, :2].reshape(24, 3))
    assert torch.equal(window_reverse(windows, (2, 3, 2, 2), (4, 6, 2, 4)), x)


def test_attention_mask_separates_the_cyclic_shift_boundary() -> None:
    # One axis of 4 tokens, window 2, shift 1: after rolling, positions (1, 2) and (3, 0) share
    # windows, and 3 and 0 are not neighbours.
    mask = window_attention_mask((1, 4, 1, 1), (1, 2, 1, 1), (0, 1, 0, 0), torch.device("cpu"))
    assert mask.shape == (2, 1, 2, 2)
    assert mask[0, 0].all()
    assert mask[1, 0].tolist() == [[True, False], [False, True]]


def test_attention_mask_hides_padding() -> None:
    # 3 tokens, window 2 -> padded to 4: the second window holds token 2 and a pad token.
    mask = window_attention_mask((1, 3, 1, 1), (1, 2, 1, 1), (0, 0, 0, 0), torch.device("cpu"))
    assert mask[1, 0].tolist() == [[True, False], [False, True]]
    assert window_attention_mask((2, 4, 4, 4), (2, 2, 2, 2), (0,) * 4, torch.device("cpu")) is None


def _changed(block: SwinBlock4D, x: torch.Tensor, where: tuple[int, ...]) -> set[tuple[int, ...]]:
    """Token positions (t, d, h, w) whose output changes when the token at ``where`` changes."""
    y = x.clone()
    # Not a constant shift, which the block's LayerNorm would remove.
    y[(0, *where)] += torch.linspace(-1.0, 1.0, x.shape[-1])
    with torch.no_grad():
        diff = (block(y) - block(x)).abs().amax(-1)[0]  # (T, D, H, W)
    return {tuple(i) for i in (diff > 1e-6).nonzero().tolist()}


@torch.no_grad()
def test_shifted_window_never_attends_across_the_boundary() -> None:
    torch.manual_seed(0)
    x = torch.randn(1, 4, 4, 4, 4, 8)  # grid 4^4, windows 2^4
    plain = SwinBlock4D(8, 2, (2, 2, 2, 2), shifted=False, mlp_ratio=2.0)
    shifted = SwinBlock4D(8, 2, (2, 2, 2, 2), shifted=True, mlp_ratio=2.0)
    shifted.load_state_dict(plain.state_dict())
    assert _changed(plain, x, (1, 1, 1, 1)) == set(itertools.product((0, 1), repeat=4))
    assert _changed(shifted, x, (1, 1, 1, 1)) == set(itertools.product((1, 2), repeat=4))
    # Token 0 shares its shifted window only with tokens across the wrap (index 3): none count.
    assert _changed(shifted, x, (0, 0, 0, 0)) == {(0, 0, 0, 0)}
    assert _changed(shifted, x, (3, 3, 3, 3)) == {(3, 3, 3, 3)}


@torch.no_grad()
def test_padded_window_equals_unpadded_pieces() -> None:
    torch.manual_seed(0)
    block = SwinBlock4D(8, 2, (2, 1, 1, 1), shifted=False, mlp_ratio=2.0)
    x = torch.randn(2, 1, 3, 1, 1, 8)  # D = 3, window 2: token 2 shares its window with padding
    out = block(x)
    torch.testing.assert_close(out[:, :, :2], block(x[:, :, :2]))
    torch.testing.assert_close(out[:, :, 2:], block(x[:, :, 2:]))


@torch.no_grad()
@pytest.mark.parametrize(("name", "n_frames"), [("tiny", 4), ("tiny", 3), ("small", 2)])
def test_stage_shapes(name: str, n_frames: int) -> None:
    preset = PRESETS[name]
    tokens = torch.randn(1, n_frames, *preset.grid_shape(), preset.embed_dim)
    outputs = _encoder(name)(tokens)
    expected = [(1, n_frames, *g, c) for g, c in zip(preset.stage_grids(), preset.stage_dims(),
                                                     strict=True)]
    assert [tuple(o.shape) for o in outputs] == expected
    assert all(torch.isfinite(o).all() for o in outputs)


@torch.no_grad()
def test_base_stage_shapes() -> None:
    outputs = _encoder("base")(torch.randn(1, 2, 16, 16, 16, 36))
    assert [tuple(o.shape) for o in outputs] == [
        (1, 2, 16, 16, 16, 36), (1, 2, 8, 8, 8, 72), (1, 2, 4, 4, 4, 144), (1, 2, 2, 2, 2, 288)
    ]


def test_temporal_embedding_tells_frames_apart() -> None:
    torch.manual_seed(0)
    encoder = _encoder("tiny")
    frame = torch.randn(1, 1, 12, 12, 12, 16)
    with torch.no_grad():
        out = encoder(frame.expand(1, 2, -1, -1, -1, -1).contiguous())[-1]
    assert not torch.allclose(out[:, 0], out[:, 1])


def _skip_setup() -> tuple[SwinMaskedAutoencoder, torch.Tensor, torch.Tensor, RegionGrid]:
    torch.manual_seed(0)
    model = build_model(PRESETS["tiny"])
    brain = torch.zeros(2, 96, 96, 96, dtype=torch.bool)
    brain[:, 16:80, 16:80, 16:80] = True
    brain[1, 16:40] = False
    x = torch.randn(2, 4, 96, 96, 96, generator=torch.Generator().manual_seed(0)) * brain[:, None]
    x[0, 1, 90, 2, 2] = 1.5  # a nonzero voxel outside the brain: that token is not skipped
    labels = torch.full((48, 48, 48), -1)
    labels[8:40, 8:40, 8:40] = torch.arange(32).div(6, rounding_mode="floor")[:, None, None]
    grid = RegionGrid.from_labels(labels, labels >= 0, 4, 6)
    return model, x, brain, grid


@pytest.mark.parametrize(("masking", "time"), [("roi", "tube"), ("roi-voxel", "random"),
                                               ("random", "tube")])
def test_background_skipping_equals_the_plain_path(masking: str, time: str) -> None:
    model, x, brain, grid = _skip_setup()
    mask = build_masking(masking, grid, 0.5, time=time)(2, 4, torch.Generator().manual_seed(1))
    rows = []
    handle = model.patch_embed.proj.register_forward_hook(
        lambda _m, args, _out: rows.append(args[0].shape[:-1].numel()))
    results = {}
    for skip in (True, False):
        model.skip_background = skip
        model.zero_grad()
        out = model(x, brain, mask)
        out.loss.backward()
        with torch.no_grad():
            feats = model._features(model.prepare(x, brain)[0], mask)
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results[skip] = out, feats, grads
    handle.remove()
    (out, feats, grads), (plain, plain_feats, plain_grads) = results[True], results[False]
    assert rows[0] < rows[2] // 2  # fewer than half of the tokens were embedded
    for a, b in zip(feats, plain_feats, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out.loss, plain.loss, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(out.embedding, plain.embedding, atol=1e-5, rtol=1e-4)
    on_brain = brain_tokens(model.prepare(x, brain)[1], 4)
    on_brain = on_brain.repeat_interleave(4, 1).repeat_interleave(4, 2).repeat_interleave(4, 3)
    on_brain = on_brain[:, None].expand_as(out.pred)
    torch.testing.assert_close(out.pred[on_brain], plain.pred[on_brain], atol=1e-5, rtol=1e-4)
    assert out.pred[~on_brain].abs().sum() == 0
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-5, rtol=1e-3, msg=name)


@torch.no_grad()
def test_background_skipping_in_encode() -> None:
    model, x, brain, _ = _skip_setup()
    model.eval()
    skipped = model.encode(x, brain)
    model.skip_background = False
    torch.testing.assert_close(skipped, model.encode(x, brain), atol=1e-5, rtol=1e-4)
