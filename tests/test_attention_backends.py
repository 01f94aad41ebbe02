"""The CPU attention fast path: every backbone runs with only the fused (flash) SDPA kernel, which
never materialises the N x N attention matrix, and agrees with the reference (math) kernel; under
bf16 autocast on the CPU (``--cpu-bf16``) it stays in float32."""

from __future__ import annotations

import statistics

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from bidsapp.atlas import load_atlas
from bidsapp.data import build_region_grid
from bidsapp.grid import cube_atlas
from bidsapp.model.factory import build_model
from bidsapp.model.mae import MaskedAutoencoder
from bidsapp.model.masking import build_masking
from bidsapp.model.presets import BACKBONE_PRESETS
from bidsapp.runtime import cpu_has_bf16


def _outputs(model: MaskedAutoencoder, x: torch.Tensor, brain: torch.Tensor,
             masking_name: str, backend: SDPBackend) -> dict[str, torch.Tensor]:
    """Loss, gradients, reconstruction and embeddings with one SDPA backend allowed."""
    grid = build_region_grid(load_atlas(), model.preset)
    mask = build_masking(masking_name, grid, 0.5)(x.shape[0], x.shape[1],
                                                  torch.Generator().manual_seed(1))
    model.zero_grad(set_to_none=True)
    with sdpa_kernel([backend]):
        out = model(x, brain, mask)
        out.loss.backward()
        with torch.inference_mode():
            embedding = model.encode(x, brain)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"loss": out.loss.detach(), "pred": out.pred.detach(), "embedding": embedding, **grads}


def _tiny_model_and_batch(backbone: str) -> tuple[MaskedAutoencoder, torch.Tensor, torch.Tensor]:
    """The backbone's ``tiny`` model (seeded) and 2 windows of 10 frames of noise in the brain."""
    torch.manual_seed(0)
    model = build_model(BACKBONE_PRESETS[backbone]["tiny"])
    brain = torch.from_numpy(cube_atlas(load_atlas()).brain)[None].expand(2, -1, -1, -1)
    return model, torch.randn(2, 10, 96, 96, 96) * brain[:, None], brain


@pytest.mark.parametrize("backbone", ["swin4d", "vit4d"])
def test_fused_attention_kernel_serves_every_backbone(backbone: str) -> None:
    model, x, brain = _tiny_model_and_batch(backbone)
    # With only the flash kernel allowed, SDPA raises rather than falling back to the math one.
    fused = _outputs(model, x, brain, "roi", SDPBackend.FLASH_ATTENTION)
    reference = _outputs(model, x, brain, "roi", SDPBackend.MATH)
    assert fused.keys() == reference.keys() and len(fused) > 3
    for name in reference:
        torch.testing.assert_close(fused[name], reference[name], atol=2e-5, rtol=1e-4,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.skipif(not cpu_has_bf16(), reason="needs a CPU with bfloat16 instructions")
@pytest.mark.parametrize("backbone", ["swin4d", "vit4d"])
def test_cpu_bf16_autocast_keeps_attention_in_float32(backbone: str,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """--cpu-bf16: linear layers in bfloat16, attention in float32; the loss within 1% of the
    float32 one and the gradients pointing the same way."""
    model, x, brain = _tiny_model_and_batch(backbone)
    reference = _outputs(model, x, brain, "roi", SDPBackend.FLASH_ATTENTION)
    seen = []
    attention = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, *args, **kwargs: seen.append(q.dtype) or attention(q, *args,
                                                                                      **kwargs))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bf16 = _outputs(model, x, brain, "roi", SDPBackend.FLASH_ATTENTION)
    assert seen and set(seen) == {torch.float32}
    assert abs(bf16["loss"].float() - reference["loss"]) < 0.01 * reference["loss"]
    names = sorted(reference.keys() - {"loss", "pred", "embedding"})

    def cosine(grads: list[torch.Tensor], references: list[torch.Tensor]) -> float:
        return F.cosine_similarity(torch.cat([g.flatten().float() for g in grads]),
                                   torch.cat([r.flatten() for r in references]), 0).item()

    # The whole gradient, and each tensor's: measured 0.9986-0.99995 overall, a median tensor at
    # 0.99998, the worst (a norm's small gradient) at 0.89-0.999, with 1 or 2 threads.
    assert cosine([bf16[n] for n in names], [reference[n] for n in names]) > 0.99
    each = {name: cosine([bf16[name]], [reference[name]]) for name in names}
    assert statistics.median(each.values()) > 0.999
    assert min(each.values()) > 0.8, min(each.items(), key=lambda item: item[1])
