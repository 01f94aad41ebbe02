"""SwiFT and NeuroSTORM as roimae rewrites them, against upstream's own code.

Upstream's files live in ``../shared/reference`` (never copied into the repository); they are
loaded by path, with ``torch.cuda.nvtx`` made a no-op, an empty ``selective_scan_cuda`` module and
``Mamba`` run by ``selective_scan_ref`` (the pure-PyTorch reference of the CUDA kernel). Every
parameter of the upstream nets gets random values (norms, embeddings, mask tokens, A_log, D and
dt_proj included), and outputs must agree to ``1e-4`` of their RMS.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import sys
import types
import warnings

import pytest
import torch
from conftest import SHARED_DIR

from bidsapp.model.mamba import Mamba, selective_scan

REFERENCE = SHARED_DIR / "reference"
TOLERANCE = 1e-4  # of the RMS of the output
#: Modules the tests add while upstream's code is loaded (and remove afterwards).
STAND_INS = ("selective_scan_cuda", "mamba_ssm", "ref_swift", "ref_released", "ref_head")


def assert_close(mine: torch.Tensor, ref: torch.Tensor, what: str = "") -> float:
    """Max abs difference <= TOLERANCE * RMS(ref); returns the relative error."""
    assert mine.shape == ref.shape, (what, mine.shape, ref.shape)
    error = float((mine - ref).abs().max() / ref.pow(2).mean().sqrt())
    assert error <= TOLERANCE, f"{what}: max |diff| = {error:.2e} x RMS"
    return error


def _package(name: str, path) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__path__ = [str(path)] if path else []
    return module


def _load_file(name: str, path) -> types.ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def ref():
    """Upstream's modules: ``swift``, ``released`` and ``head`` NeuroSTORM, ``mamba``, ``scan``."""
    if not REFERENCE.is_dir():
        pytest.skip(f"upstream reference code not found at {REFERENCE}")
    for name in ("monai", "einops"):
        if importlib.util.find_spec(name) is None:
            pytest.skip(f"{name} is not installed (upstream's code needs it; pip install -e .[test])")
    if any(name.split(".")[0] in STAND_INS for name in sys.modules):
        pytest.fail("a module named like the upstream stand-ins is already imported")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small tensors: one thread is fastest, and steady on a busy machine
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.cuda.nvtx, "range_push", lambda *a, **k: None)
        mp.setattr(torch.cuda.nvtx, "range_pop", lambda *a, **k: None)
        try:
            yield _load_reference()
        finally:  # nothing of upstream's stays importable for other tests
            torch.set_num_threads(threads)
            for name in [n for n in sys.modules if n.split(".")[0] in STAND_INS]:
                del sys.modules[name]


def _load_reference() -> types.SimpleNamespace:
    mamba_ssm = _package("mamba_ssm", None)
    sys.modules.update({
        "selective_scan_cuda": types.ModuleType("selective_scan_cuda"),
        "mamba_ssm": mamba_ssm,
        "mamba_ssm.ops": _package("mamba_ssm.ops", None),
        "ref_swift": _package("ref_swift", REFERENCE / "swift"),
        "ref_released": _package("ref_released", REFERENCE / "neurostorm" / "released"),
        "ref_head": _package("ref_head", REFERENCE / "neurostorm" / "head"),
    })
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.cuda.amp.custom_fwd in mamba_ssm 2.2.2
        scan = _load_file("mamba_ssm.ops.selective_scan_interface",
                          REFERENCE / "mamba_ssm" / "selective_scan_interface.py")
    mamba = _load_file("mamba_ssm.mamba_simple", REFERENCE / "mamba_ssm" / "mamba_simple.py")
    mamba.selective_scan_fn = scan.selective_scan_ref  # upstream's layer, run by its reference scan
    mamba_ssm.Mamba = functools.partial(mamba.Mamba, use_fast_path=False)
    mamba_ssm.Mamba2 = None
    return types.SimpleNamespace(
        scan=scan, mamba=mamba,
        swift=importlib.import_module("ref_swift.swin4d_transformer_ver7"),
        released=importlib.import_module("ref_released.neurostorm"),
        head=importlib.import_module("ref_head.neurostorm"),
    )


@torch.no_grad()
def randomize(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random values on every parameter, the network kept well conditioned (gain 0.5)."""
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g)
        if name.endswith("A_log"):
            p.copy_(torch.log(1 + 15 * torch.rand(p.shape, generator=g)))  # A in [-16, -1]
        elif name.endswith("dt_proj.bias"):
            p.copy_(noise - 1)  # softplus: steps of 0.05 to 2
        elif name.endswith(".D"):
            p.copy_(noise)
        elif p.ndim >= 2 and not name.endswith(("embed", "mask_token", "prompt")):
            p.copy_(noise * 0.5 / math.sqrt(p[0].numel()))
        elif "norm" in name and name.endswith("weight"):
            p.copy_(1 + 0.2 * noise)
        else:  # biases, positional and time embeddings, mask tokens, prompts
            p.copy_(0.2 * noise)
    return model.eval()


# -- the selective scan and the Mamba mixer ----------------------------------------------------------


@pytest.mark.parametrize(("length", "chunk"), [(37, 16), (64, 16), (5, 16), (23, 1), (40, 7)])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_selective_scan_matches_reference(ref, length, chunk, grad):
    g = torch.Generator().manual_seed(length)
    b, d, n = 3, 6, 4
    u, dt, z = (torch.randn(b, d, length, generator=g) for _ in range(3))
    B, C = (torch.randn(b, n, length, generator=g) for _ in range(2))
    A = -(1 + 15 * torch.rand(d, n, generator=g))
    D, bias = torch.randn(d, generator=g), torch.randn(d, generator=g) - 1
    expected = ref.scan.selective_scan_ref(u, dt, A, B, C, D, z=z, delta_bias=bias, delta_softplus=True)
    t = lambda v: v.transpose(1, 2).clone().requires_grad_(grad)  # noqa: E731 - (b, f, L) -> (b, L, f)
    inputs = [t(u), t(dt), A, t(B), t(C), D, t(z)]
    with torch.set_grad_enabled(grad):
        out = selective_scan(*inputs, delta_bias=bias, delta_softplus=True, chunk_size=chunk)
    assert_close(out.transpose(1, 2).detach(), expected, "scan")
    if grad:
        out.square().sum().backward()
        u_ref = u.clone().requires_grad_(True)
        ref.scan.selective_scan_ref(u_ref, dt, A, B, C, D, z=z, delta_bias=bias,
                                    delta_softplus=True).square().sum().backward()
        assert_close(inputs[0].grad.transpose(1, 2), u_ref.grad, "d scan / d u")


def test_mamba_matches_upstream(ref):
    torch.manual_seed(0)
    upstream = randomize(ref.mamba.Mamba(d_model=12, d_state=8, d_conv=4, expand=2, use_fast_path=False))
    mine = Mamba(12, d_state=8, d_conv=4, expand=2).eval()
    mine.load_state_dict(upstream.state_dict(), strict=True)
    assert [k for k, _ in mine.named_parameters()] == [k for k, _ in upstream.named_parameters()]
    x = torch.randn(5, 43, 12)
    with torch.no_grad():
        assert_close(mine(x), upstream(x), "Mamba")


# -- Lightning checkpoints as upstream writes them ----------------------------------------------------


def hyper_parameters(model: str, sizes: dict, **more) -> dict:
    """argparse values as SwiFT's and NeuroSTORM's ``save_hyperparameters(kwargs)`` store them."""
    hp = {"model": model, "in_chans": 1, "precision": 16, "attn_drop_rate": 0.0, "seed": 1,
          "learning_rate": 5e-5, "downstream_task": "sex", "pretraining": False, "use_contrastive": False,
          "image_path": "./data/HCP1200_MNI_to_TRs_minmax", "sequence_length": sizes["img_size"][3]}
    hp.update({k: list(v) if isinstance(v, tuple) else v for k, v in sizes.items()})
    return {**hp, **more}


def save_lightning(path, net: torch.nn.Module, hparams: dict, heads: dict | None = None):
    """A PyTorch Lightning ``.ckpt``: ``model.`` weights, task heads, optimizer and loop state."""
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    state.update({f"output_head.{k}": v for k, v in (heads or {}).items()})
    torch.save({
        "epoch": 9, "global_step": 1234, "pytorch-lightning_version": "1.9.4",
        "state_dict": state,
        "loops": {"fit_loop": {"state_dict": {}, "epoch_progress": {"total": {"ready": 10}}}},
        "callbacks": {"ModelCheckpoint{'monitor': 'valid_loss', 'mode': 'min'}": {
            "best_model_score": torch.tensor(0.25), "best_model_path": "output/checkpt-epoch=09.ckpt",
            "dirpath": "output", "best_k_models": {"output/checkpt-epoch=09.ckpt": torch.tensor(0.25)}}},
        "optimizer_states": [{"state": {0: {"step": torch.tensor(3.0)}},
                              "param_groups": [{"lr": 5e-5, "weight_decay": 0.01, "params": [0]}]}],
        "lr_schedulers": [], "native_amp_scaling_state": {"scale": 65536.0, "growth_tracker": 3},
        "hparams_name": "kwargs", "hyper_parameters": hparams,
    }, path)
    return path


# -- SwiFT -----------------------------------------------------------------------------------------

#: Small SwiFT configurations: 8^3 tokens of 3^3 voxels. A: stage-0 windows padded (8 -> 9, 6 -> 8
#: frames) and shifted, full attention in the last stage. B: c_multiplier 3, windows padded in
#: the shifted stage 1 (4 -> 6, 5 -> 8 frames), clamped to the grid in stage 2, 5 of 6 frames.
SWIFT_SMALL = {
    "A": (dict(img_size=(24, 24, 24, 6), embed_dim=12, window_size=(2, 2, 2, 3),
               first_window_size=(3, 3, 3, 4), patch_size=(3, 3, 3, 1), depths=(2, 2, 2),
               num_heads=(3, 3, 6), c_multiplier=2, last_layer_full_MSA=True), 6),
    "B": (dict(img_size=(24, 24, 24, 6), embed_dim=12, window_size=(3, 3, 3, 4),
               first_window_size=(4, 4, 4, 2), patch_size=(3, 3, 3, 1), depths=(1, 3, 2),
               num_heads=(2, 3, 3), c_multiplier=3, last_layer_full_MSA=False), 5),
}


def upstream_stages(net, x: torch.Tensor) -> list[torch.Tensor]:
    """The output of every ``layers[i]`` of an upstream encoder (its forward, stage by stage)."""
    h = net.pos_drop(net.patch_embed(x.float()))
    out = []
    for pos, layer in zip(net.pos_embeds, net.layers, strict=True):
        h = layer(pos(h).contiguous())
        out.append(h)
    return out


@pytest.mark.parametrize("name", SWIFT_SMALL)
def test_swift_matches_upstream(ref, name, tmp_path):
    from bidsapp.model.upstream import read_lightning_checkpoint

    sizes, frames = SWIFT_SMALL[name]
    upstream = randomize(ref.swift.SwinTransformer4D(in_chans=1, **sizes), seed=1)
    head = {"fc.weight": torch.randn(8, upstream.num_features), "fc.bias": torch.zeros(8)}
    ckpt = save_lightning(tmp_path / "swift.ckpt", upstream, hyper_parameters("swin4d_ver7", sizes), head)
    imported = read_lightning_checkpoint(ckpt, "swift")
    mine = imported.model
    assert sorted(imported.dropped) == ["model.head.bias", "model.head.weight", "model.norm.bias",
                                        "model.norm.weight", "output_head.fc.bias", "output_head.fc.weight"]
    assert imported.config.c_multiplier == sizes["c_multiplier"] and not mine.training
    x = torch.randn(2, 1, *sizes["img_size"][:3], frames, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = upstream_stages(upstream, x)
        got = mine.encode(x)
        assert_close(got[-1], upstream(x), "forward")
    for i, (a, b) in enumerate(zip(got, expected, strict=True)):
        assert_close(a, b, f"stage {i}")


# -- NeuroSTORM ------------------------------------------------------------------------------------

#: A small NeuroSTORM MAE (the decoder needs 4 stages): 8^3 tokens x 6 frames; stage-0 windows
#: padded and shifted, windows 2x2x2x3 that tile every grid (window masking), full last stage.
NEUROSTORM_SMALL = dict(img_size=(24, 24, 24, 6), embed_dim=8, window_size=(2, 2, 2, 3),
                        first_window_size=(3, 3, 3, 4), patch_size=(3, 3, 3, 1), depths=(2, 2, 2, 2),
                        num_heads=(1, 1, 1, 1), c_multiplier=2, last_layer_full_MSA=True)


def window_mask_to_tokens(mask: torch.Tensor, grid, window) -> torch.Tensor:
    """NeuroSTORM's window mask ``(B, windows)`` as hidden tokens ``(B, D, H, W, T)``."""
    hidden = mask.view(mask.shape[0], *(g // w for g, w in zip(grid, window, strict=True)))
    for axis, w in enumerate(window, start=1):
        hidden = hidden.repeat_interleave(w, axis)
    return hidden


@pytest.mark.parametrize("layout", ["released", "latest"])
def test_neurostorm_mae_matches_upstream(ref, layout, monkeypatch, tmp_path):
    import numpy as np

    from bidsapp.model.upstream import read_lightning_checkpoint

    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)  # released: mask.cuda()
    source = ref.released if layout == "released" else ref.head
    upstream = randomize(source.NeuroSTORMMAE(in_chans=1, spatial_mask="window", time_mask="random",
                                              mask_ratio=0.5, **NEUROSTORM_SMALL), seed=3)
    hparams = hyper_parameters("neurostorm", NEUROSTORM_SMALL, pretraining=True, use_mae=True,
                               spatial_mask="window", time_mask="random", mask_ratio=0.5)
    imported = read_lightning_checkpoint(save_lightning(tmp_path / "mae.ckpt", upstream, hparams))
    mine = imported.model
    assert imported.config.family == "neurostorm" and imported.config.mae and not imported.dropped
    assert imported.config.mask_token_layout == layout
    x = torch.randn(2, 1, 24, 24, 24, 6, generator=torch.Generator().manual_seed(4))
    grid = (8, 8, 8, 6)
    with torch.no_grad():
        for i, (a, b) in enumerate(zip(mine.encode(x), upstream_stages(upstream, x), strict=True)):
            assert_close(a, b, f"stage {i}")
        np.random.seed(0)  # noqa: NPY002 - upstream draws its masks from the global state
        latent, mask = upstream.forward_encoder(x)  # window masking, half the windows
        hidden = window_mask_to_tokens(mask, grid, NEUROSTORM_SMALL["window_size"])
        assert 0 < hidden.float().mean() < 1
        assert_close(mine.encode(x, hidden, "window")[-1], latent, "window-masked encoder")
        assert_close(mine.decode(latent), upstream.forward_decoder(latent), "decoder")
        if layout == "latest":  # random token masking with the single mask token
            upstream.spatial_mask = "random"
            latent, mask = upstream.forward_encoder(x)
            assert_close(mine.encode(x, mask.view(2, *grid), "token")[-1], latent, "token-masked encoder")
        else:
            with pytest.raises(ValueError, match="only window mask tokens"):
                mine.encode(x, hidden, "token")


def test_neurostorm_prompts_match_upstream(ref, tmp_path):
    """NeuroSTORM's latest fine-tuning network with prompt tuning (2 tokens per window)."""
    from bidsapp.model.upstream import read_lightning_checkpoint

    sizes = dict(NEUROSTORM_SMALL, depths=(2, 1), num_heads=(1, 1), first_window_size=(4, 4, 4, 2))
    upstream = randomize(ref.head.NeuroSTORM(in_chans=1, prompt_len=2, **sizes), seed=5)
    hparams = hyper_parameters("neurostorm", sizes, use_prompt_tuning=True, prompt_len=2,
                               downstream_task_type="classification")
    head = {"head.weight": torch.randn(2, 16), "head.bias": torch.zeros(2)}
    imported = read_lightning_checkpoint(save_lightning(tmp_path / "ft.ckpt", upstream, hparams, head))
    mine = imported.model
    assert imported.config.prompt_len == 2 and not imported.config.mae
    assert imported.dropped == ["output_head.head.weight", "output_head.head.bias"]
    x = torch.randn(1, 1, 24, 24, 24, 5, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        got = mine.encode(x)
        assert_close(got[-1], upstream(x), "forward")
        for i, (a, b) in enumerate(zip(got, upstream_stages(upstream, x), strict=True)):
            assert_close(a, b, f"stage {i}")


# -- the checkpoint reader refuses what it cannot import -------------------------------------------


class Payload:
    """Unpickling this would create ``target`` (as any code a malicious checkpoint could run)."""

    def __init__(self, target):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


TINY_SWIFT = dict(img_size=(12, 12, 12, 4), embed_dim=6, window_size=(2, 2, 2, 2),
                  first_window_size=(2, 2, 2, 2), patch_size=(3, 3, 3, 1), depths=(1, 1),
                  num_heads=(1, 2), c_multiplier=2, last_layer_full_MSA=True)


def _tiny_swift():
    from bidsapp.model.upstream import UpstreamConfig, build_upstream

    return build_upstream(UpstreamConfig(family="swift", **TINY_SWIFT))


def _refusal(path, family=None):
    from bidsapp.errors import ExitCode
    from bidsapp.model.upstream import UpstreamCheckpointError, read_lightning_checkpoint

    with pytest.raises(UpstreamCheckpointError) as caught:
        read_lightning_checkpoint(path, family)
    message = str(caught.value)
    assert "\n" not in message and message.startswith(str(path))
    assert caught.value.exit_code == ExitCode.BAD_DATA and isinstance(caught.value, ValueError)
    return message


def test_reader_refuses_pickled_code_without_running_it(tmp_path):
    target = tmp_path / "pwned"
    ckpt = tmp_path / "evil.ckpt"
    torch.save({"state_dict": _tiny_swift().state_dict(), "hyper_parameters": Payload(target)}, ckpt)
    message = _refusal(ckpt)
    assert not target.exists()
    assert "io.open" in message and "could run code" in message
    torch.load(ckpt, weights_only=False)  # what the refusal prevents: the payload runs
    assert target.exists()


@pytest.mark.parametrize("as_namespace", [False, True], ids=["dict", "Namespace"])
def test_reader_imports_a_small_swift(tmp_path, as_namespace):
    import argparse

    from bidsapp.model.upstream import read_lightning_checkpoint

    net = randomize(_tiny_swift())
    hparams = hyper_parameters("swift", TINY_SWIFT)
    if as_namespace:  # as an argparse result saved as it is
        hparams = argparse.Namespace(**hparams)
    ckpt = save_lightning(tmp_path / "ok.ckpt", net, hparams)
    imported = read_lightning_checkpoint(ckpt)
    x = torch.randn(1, 1, 12, 12, 12, 4)
    with torch.no_grad():
        assert torch.equal(imported.model(x), net(x))
    assert imported.config.family == "swift" and imported.hyper_parameters["precision"] == 16


@pytest.mark.parametrize(("case", "expected"), [
    ("unknown model key", "unexpected weight 'model.extra'"),
    ("unknown prefix", "unknown key(s) in state_dict, e.g. 'ema.weight'"),
    ("missing key", "missing weight 'model.patch_embed.fc.bias'"),
    ("shape", "'model.patch_embed.fc.weight' has shape [6, 27] in the checkpoint but [8, 27]"),
    ("family", "asked for neurostorm but hyper_parameters['model'] say(s) swift"),
    ("no state_dict", "not a Lightning checkpoint (no 'state_dict')"),
    ("not a checkpoint", "not a readable plain-data PyTorch checkpoint (Unsupported operand"),
    ("bad hyper_parameters", "hyper_parameters do not describe a swift network"),
])
def test_reader_refuses_with_one_line(tmp_path, case, expected):
    net = _tiny_swift()
    hparams = hyper_parameters("swift", TINY_SWIFT)
    state = {f"model.{k}": v for k, v in net.state_dict().items()}
    family = None
    if case == "unknown model key":
        state["model.extra"] = torch.zeros(1)
    elif case == "unknown prefix":
        state["ema.weight"] = torch.zeros(1)
    elif case == "missing key":
        del state["model.patch_embed.fc.bias"]
    elif case == "shape":
        hparams["embed_dim"] = 8
    elif case == "family":
        family = "neurostorm"
    elif case == "bad hyper_parameters":
        hparams["patch_size"] = [5, 5, 5, 1]
    path = tmp_path / "bad.ckpt"
    if case == "no state_dict":
        torch.save(net.state_dict(), path)
    elif case == "not a checkpoint":
        path.write_bytes(b"not a zip file at all")
    else:
        torch.save({"state_dict": state, "hyper_parameters": hparams}, path)
    assert expected in _refusal(path, family)


# -- the released configurations -------------------------------------------------------------------

#: Parameters at the released configuration (96^3 x 20 frames), built on the meta device.
RELEASED_COUNTS = {"swift": 4_314_636, "neurostorm-encoder": 5_173_020,
                   "neurostorm-mae-released": 7_712_892, "neurostorm-mae-latest": 7_712_964}


def _released(name: str):
    from dataclasses import replace

    from bidsapp.model.upstream import NEUROSTORM_RELEASED, SWIFT_RELEASED

    return {"swift": SWIFT_RELEASED, "neurostorm-encoder": replace(NEUROSTORM_RELEASED, mae=False),
            "neurostorm-mae-released": NEUROSTORM_RELEASED,
            "neurostorm-mae-latest": replace(NEUROSTORM_RELEASED, mask_token_layout="latest")}[name]


def _count(net: torch.nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("name", RELEASED_COUNTS)
def test_parameter_counts_at_released_configuration(name):
    from bidsapp.model.upstream import build_upstream

    with torch.device("meta"):
        assert _count(build_upstream(_released(name))) == RELEASED_COUNTS[name]


def test_parameter_counts_match_upstream(ref, monkeypatch):
    from bidsapp.model.upstream import NEUROSTORM_RELEASED

    linspace = torch.linspace  # upstream reads drop-path rates with .item(): not on meta
    monkeypatch.setattr(torch, "linspace", lambda *a, **k: linspace(*a, **{**k, "device": "cpu"}))
    c = NEUROSTORM_RELEASED
    sizes = dict(img_size=c.img_size, in_chans=1, embed_dim=c.embed_dim, window_size=c.window_size,
                 first_window_size=c.first_window_size, patch_size=c.patch_size, depths=c.depths,
                 num_heads=c.num_heads, c_multiplier=c.c_multiplier, last_layer_full_MSA=True)
    with torch.device("meta"):
        swift = ref.swift.SwinTransformer4D(**sizes)
        counts = {
            "swift": _count(swift) - _count(swift.norm) - _count(swift.head),
            "neurostorm-encoder": _count(ref.released.NeuroSTORM(**sizes)),
            "neurostorm-mae-released": _count(ref.released.NeuroSTORMMAE(**sizes)),
            "neurostorm-mae-latest": _count(ref.head.NeuroSTORMMAE(**sizes)),
        }
    assert counts == RELEASED_COUNTS
    assert (_count(swift.norm), _count(swift.head)) == (576, 289)  # in the released file, unused


# -- the MaskedAutoencoder adapters ----------------------------------------------------------------


def _small_preset(backbone: str):
    from bidsapp.model.presets import ModelPreset

    return ModelPreset(name="small-test", backbone=backbone, downsample=1, patch_size=6, embed_dim=8,
                       depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=(4, 4, 4, 2))


def _ball(batch: int = 1) -> torch.Tensor:
    """A brain ``(B, 96, 96, 96)``: a ball that reaches every 48^3 octant."""
    axis = torch.arange(96) - 47.5
    radius = (axis[:, None, None] ** 2 + axis[None, :, None] ** 2 + axis[None, None, :] ** 2).sqrt()
    return (radius < 30).expand(batch, -1, -1, -1)


def test_neurostorm_adapter_reconstructs_as_upstream(ref, tmp_path, monkeypatch):
    """NeuroSTORM's MAE imported into roimae: forward(x, brain, mask) is upstream's masked MAE."""
    import numpy as np

    from bidsapp.model.layers import depth_to_space
    from bidsapp.model.masking import Mask
    from bidsapp.model.upstream_mae import NeuroSTORMAutoencoder

    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
    sizes = dict(img_size=(96, 96, 96, 4), embed_dim=8, window_size=(4, 4, 4, 2),
                 first_window_size=(4, 4, 4, 2), patch_size=(6, 6, 6, 1), depths=(1, 1, 1, 1),
                 num_heads=(1, 1, 1, 1), c_multiplier=2, last_layer_full_MSA=True)
    upstream = randomize(ref.released.NeuroSTORMMAE(in_chans=1, spatial_mask="window", time_mask="random",
                                                    mask_ratio=0.5, **sizes), seed=7)
    hparams = hyper_parameters("neurostorm", sizes, pretraining=True, use_mae=True)
    model = NeuroSTORMAutoencoder.from_lightning(save_lightning(tmp_path / "mae.ckpt", upstream, hparams),
                                                 background="zero")
    assert model.preset.backbone == "neurostorm" and not model.training
    brain = _ball()
    x = torch.randn(1, 2, 96, 96, 96, generator=torch.Generator().manual_seed(8)) * brain[:, None]
    x_up = x.permute(0, 2, 3, 4, 1)[:, None]  # upstream's (B, 1, D, H, W, T)
    with torch.no_grad():
        np.random.seed(1)  # noqa: NPY002 - upstream draws its masks from the global state
        latent, windows = upstream.forward_encoder(x_up)
        expected = upstream.forward_decoder(latent)[:, 0].permute(0, 4, 1, 2, 3)  # (B, T, D, H, W)
        hidden = window_mask_to_tokens(windows, (16, 16, 16, 2), (4, 4, 4, 2)).permute(0, 4, 1, 2, 3)
        voxels = depth_to_space(hidden[..., None].expand(*hidden.shape, 216), 6)[..., 0]
        out = model(x, brain, Mask(hidden, voxels))
        assert_close(out.pred, expected, "reconstruction")
        assert out.embedding.shape == (1, 64) and torch.isfinite(out.loss)
        assert_close(out.embedding, latent.mean((2, 3, 4, 5)), "embedding")  # every token holds brain
        embedding, tokens, valid = model.encode_tokens(x, brain)
        first = upstream.layers[0].blocks[0](upstream.pos_embeds[0](upstream.patch_embed(x_up)).permute(
            0, 2, 3, 4, 5, 1).contiguous(), None)  # stage 0 = one block, before its merging
        assert_close(tokens, first.permute(0, 4, 1, 2, 3, 5), "token features")
        assert valid.shape == (1, 16, 16, 16) and bool(valid.all()) and embedding.shape == (1, 64)


def test_upstream_adapters_train_and_embed():
    from bidsapp.errors import UsageError
    from bidsapp.model.factory import build_model
    from bidsapp.model.layers import depth_to_space
    from bidsapp.model.masking import Mask

    brain = _ball(2)
    x = torch.randn(2, 2, 96, 96, 96) * brain[:, None]
    tokens = torch.rand(2, 1, 16, 16, 16) < 0.5
    mask = Mask(tokens, depth_to_space(tokens[..., None].expand(*tokens.shape, 216), 6)[..., 0])
    model = build_model(_small_preset("neurostorm"))
    assert model.net.config.mae and model.background == "min"
    out = model(x, brain, mask)
    out.loss.backward()  # the differentiable scan
    assert all(p.grad is not None for p in model.net.layers[0].blocks[0].mamba.parameters())
    swift = build_model(_small_preset("swift")).eval()
    with torch.no_grad():
        embedding, features, _ = swift.encode_tokens(x, brain)
        assert embedding.shape == (2, 64) and features.shape == (2, 2, 16, 16, 16, 8)
        assert torch.allclose(swift.encode(x, brain), embedding, atol=1e-6)
        assert swift.encode(x, brain, mask).shape == (2, 64)  # hidden voxels zeroed (occlusion)
        with pytest.raises(UsageError, match="swift has no decoder"):
            swift(x, brain, mask)


def test_upstream_adapters_fill_the_background_with_the_smallest_brain_value():
    from bidsapp.model.factory import build_model

    model = build_model(_small_preset("swift"))
    brain = _ball()
    x = torch.randn(1, 2, 96, 96, 96) * brain[:, None]
    up = model._input(x, brain, None)[:, 0]  # (B, D, H, W, T)
    assert torch.equal(up[brain], x.permute(0, 2, 3, 4, 1)[brain])
    assert torch.all(up[~brain] == x.permute(0, 2, 3, 4, 1)[brain].min())


def test_upstream_presets_and_existing_backbones():
    from bidsapp.model.factory import count_parameters
    from bidsapp.model.presets import BACKBONE_PRESETS, UPSTREAM_PRESETS

    assert set(BACKBONE_PRESETS) == {"swin4d", "vit4d", "swift", "neurostorm"}
    assert all(BACKBONE_PRESETS[b] == {"released": UPSTREAM_PRESETS[b]} for b in UPSTREAM_PRESETS)
    assert count_parameters(UPSTREAM_PRESETS["swift"]) == RELEASED_COUNTS["swift"]
    assert count_parameters(UPSTREAM_PRESETS["neurostorm"]) == RELEASED_COUNTS["neurostorm-mae-released"]
