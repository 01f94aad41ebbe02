"""Upstream foundation models (SwiFT, NeuroSTORM): configurations and Lightning checkpoint import.

:class:`UpstreamConfig` holds the sizes of one upstream network, with the released configuration
as defaults (SwiFT ``sample_script.sh``, NeuroSTORM ``pt_mae_neurostorm.sh`` and the fine-tuning
scripts): 96^3 x 20 frames, patches 6x6x6x1, embedding 36, depths 2 2 6 2, heads 3 6 12 24,
windows 4x4x4x4 (stage 0 as well), ``c_multiplier`` 2 and full attention in the last stage.
(NeuroSTORM's pretraining script asks for 40 frames, its fine-tuning scripts, which load the MAE
weights, for 20; the ``hyper_parameters`` of a checkpoint decide, and ``time_embed`` must fit.)
These are not :class:`~bidsapp.model.presets.ModelPreset` entries: a preset describes roimae's own
masked autoencoder on its working grid, while an upstream configuration is whatever the
checkpoint's ``hyper_parameters`` say, and the network must match it exactly to load.

:func:`read_lightning_checkpoint` reads a PyTorch Lightning ``.ckpt`` with
``torch.load(weights_only=True)`` only (no code in the file can run; ``argparse.Namespace`` is the
one class allowed, for hyperparameters), builds the configuration from its ``hyper_parameters``,
maps the ``model.`` weights one to one onto :class:`~bidsapp.model.swift.SwiFT` or
:class:`~bidsapp.model.neurostorm.NeuroSTORM`, drops (and lists) known task heads and unused
upstream weights, and refuses anything else with a one-line :class:`UpstreamCheckpointError`
(exit code 65).
"""

from __future__ import annotations

import argparse
import pickle
import re
import zipfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from bidsapp.errors import BadDataError

Family = Literal["swift", "neurostorm"]
Shape4 = tuple[int, int, int, int]

#: ``hyper_parameters["model"]`` of each family (SwiFT's and NeuroSTORM's names for their nets).
MODEL_NAMES: dict[str, Family] = {"swin4d_ver7": "swift", "swift": "swift", "neurostorm": "neurostorm"}
#: Weights of the Lightning module outside ``model.``: task heads, dropped.
HEAD_PREFIXES = ("output_head.",)
#: Weights inside ``model.`` that the upstream forward pass never uses, dropped: SwiFT's released
#: ``norm`` and ``head`` (576 + 289 at the released size); NeuroSTORM's atlas map (a buffer).
UNUSED_KEYS = {
    "swift": re.compile(r"(norm|head)\.(weight|bias)"),
    "neurostorm": re.compile(r"atlas_map"),
}


class UpstreamCheckpointError(BadDataError, ValueError):
    """An upstream checkpoint that cannot be imported (exit code 65); the message is one line."""


def _tuple(value: Any, n: int | None = None) -> tuple:
    values = tuple(value) if isinstance(value, list | tuple) else (value,) * (n or 1)
    return values


def _bool(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("true", "yes", "1", "t", "y")
    return bool(value)


@dataclass(frozen=True)
class UpstreamConfig:
    """Sizes of one SwiFT or NeuroSTORM network; the defaults are the released configuration.

    Attributes
    ----------
    family : {"swift", "neurostorm"}
        SwiFT (window attention) or NeuroSTORM (Mamba in each window).
    img_size : tuple of int
        ``(D, H, W, T)``: the input grid and the frames the time embeddings cover.
    in_chans, embed_dim : int
        Input channels; channels of stage 0.
    window_size, first_window_size : tuple of int
        Windows ``(wd, wh, ww, wt)`` in tokens of stages 1.. and of stage 0.
    patch_size : tuple of int
        ``(pd, ph, pw, pt)`` voxels and frames per token (``pt`` = 1).
    depths, num_heads : tuple of int
        Blocks and attention heads per stage (NeuroSTORM ignores the heads).
    c_multiplier : int
        Channel factor of every patch merging.
    last_layer_full_MSA : bool
        The last stage attends over its whole spatial grid.
    mlp_ratio : float
        MLP width relative to the channels.
    qkv_bias, patch_norm : bool
        Bias of the attention's ``qkv``; a LayerNorm after the patch embedding.
    mae : bool
        NeuroSTORM's masked autoencoder (mask tokens and decoder), as its pretraining saves it.
    mask_token_layout : {"released", "latest"}
        ``released``: ``mask_token (prod(window_size), C)``; ``latest``: ``mask_token (C)``,
        ``window_mask_token`` and ``atlas_mask_token``.
    prompt_len : int
        Prompt tokens prepended to every window (NeuroSTORM's prompt tuning; 0 = none).
    d_state, d_conv, expand : int
        NeuroSTORM's Mamba sizes.
    """

    family: Family = "swift"
    img_size: Shape4 = (96, 96, 96, 20)
    in_chans: int = 1
    embed_dim: int = 36
    window_size: Shape4 = (4, 4, 4, 4)
    first_window_size: Shape4 = (4, 4, 4, 4)
    patch_size: Shape4 = (6, 6, 6, 1)
    depths: tuple[int, ...] = (2, 2, 6, 2)
    num_heads: tuple[int, ...] = (3, 6, 12, 24)
    c_multiplier: int = 2
    last_layer_full_MSA: bool = True
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    patch_norm: bool = False
    mae: bool = False
    mask_token_layout: Literal["released", "latest"] = "released"
    prompt_len: int = 0
    d_state: int = 16
    d_conv: int = 4
    expand: int = 2

    def __post_init__(self) -> None:
        fix = {name: tuple(int(v) for v in getattr(self, name)) for name in
               ("img_size", "window_size", "first_window_size", "patch_size", "depths", "num_heads")}
        for name, value in fix.items():
            object.__setattr__(self, name, value)
        problems = []
        if self.family not in ("swift", "neurostorm"):
            problems.append(f"unknown family {self.family!r}")
        if any(len(fix[k]) != 4 for k in ("img_size", "window_size", "first_window_size", "patch_size")):
            problems.append("img_size, window_size, first_window_size and patch_size need 4 values")
        elif self.patch_size[3] != 1 or any(
                i % p for i, p in zip(self.img_size, self.patch_size, strict=True)):
            problems.append(f"patch {self.patch_size} must tile img_size {self.img_size} with one frame each")
        elif any((i // p) % 2 ** (len(self.depths) - 1)
                 for i, p in zip(self.img_size[:3], self.patch_size[:3], strict=True)):
            problems.append(f"the token grid cannot be halved {len(self.depths) - 1} times")
        if len(self.depths) != len(self.num_heads) or not self.depths:
            problems.append("one depth and one head count per stage")
        if self.mae and (self.family != "neurostorm" or len(self.depths) != 4
                         or len(set(self.patch_size[:3])) != 1):
            problems.append("an MAE decoder needs NeuroSTORM with 4 stages and cubic patches")
        if self.mask_token_layout not in ("released", "latest"):
            problems.append(f"unknown mask token layout {self.mask_token_layout!r}")
        if problems:
            raise ValueError("upstream configuration: " + "; ".join(problems))

    def stage_dims(self) -> tuple[int, ...]:
        """Channels of every stage."""
        return tuple(self.embed_dim * self.c_multiplier**i for i in range(len(self.depths)))

    def grid_shape(self) -> tuple[int, int, int]:
        """Token grid of one frame at stage 0."""
        return tuple(i // p for i, p in zip(self.img_size[:3], self.patch_size[:3], strict=True))

    def describe(self) -> dict:
        """Plain JSON values (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_hyper_parameters(cls, family: Family, hparams: Mapping[str, Any],
                              **overrides: Any) -> UpstreamConfig:
        """The configuration an upstream ``load_model`` builds from argparse ``hparams``.

        Keys it does not hold keep the released values; ``overrides`` (e.g. ``mae``) win.
        """
        def get(name: str, default: Any) -> Any:
            value = hparams.get(name)
            return default if value is None else value

        base = cls(family=family)
        depths = _tuple(get("depths", base.depths))
        values = dict(
            img_size=_tuple(get("img_size", base.img_size), 4),
            in_chans=int(get("in_chans", base.in_chans)),
            embed_dim=int(get("embed_dim", base.embed_dim)),
            window_size=_tuple(get("window_size", base.window_size), 4),
            first_window_size=_tuple(get("first_window_size", base.first_window_size), 4),
            patch_size=_tuple(get("patch_size", base.patch_size), 4),
            depths=depths,
            num_heads=_tuple(get("num_heads", base.num_heads), len(depths)),
            c_multiplier=int(get("c_multiplier", base.c_multiplier)),
            last_layer_full_MSA=_bool(get("last_layer_full_MSA", base.last_layer_full_MSA)),
        )
        if family == "neurostorm" and _bool(hparams.get("use_prompt_tuning", False)):
            values["prompt_len"] = int(get("prompt_len", 0))
        return replace(base, **{**values, **overrides})


#: SwiFT's released encoder (``contrastive_pretrained.ckpt``).
SWIFT_RELEASED = UpstreamConfig(family="swift")
#: NeuroSTORM's released MAE (``pt_fmrifound_mae_ratio0.5.ckpt`` and siblings).
NEUROSTORM_RELEASED = UpstreamConfig(family="neurostorm", mae=True, mask_token_layout="released")


def build_upstream(config: UpstreamConfig) -> nn.Module:
    """A freshly initialised :class:`~.swift.SwiFT` or :class:`~.neurostorm.NeuroSTORM`."""
    if config.family == "swift":
        from bidsapp.model.swift import SwiFT

        return SwiFT(config)
    from bidsapp.model.neurostorm import NeuroSTORM

    return NeuroSTORM(config)


@dataclass
class UpstreamCheckpoint:
    """An imported upstream checkpoint.

    Attributes
    ----------
    model : torch.nn.Module
        SwiFT or NeuroSTORM with every weight of the checkpoint's ``model.``, in eval mode.
    config : UpstreamConfig
        What it was built from.
    dropped : list of str
        Checkpoint keys not imported: task heads and weights upstream's forward never uses.
    hyper_parameters : dict
        The checkpoint's ``hyper_parameters`` (empty if it had none).
    """

    model: nn.Module
    config: UpstreamConfig
    dropped: list[str] = field(default_factory=list)
    hyper_parameters: dict = field(default_factory=dict)


def _load_plain(path: Path) -> Any:
    """``torch.load(weights_only=True)``, its failures as one-line errors (nothing in it runs)."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise UpstreamCheckpointError(f"{path}: no such checkpoint") from None
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found:
            raise UpstreamCheckpointError(
                f"{path}: refused: the checkpoint holds the object {found.group(1)}, whose loading "
                "could run code (only tensors and plain data are read; nothing was run)") from None
        detail = re.search(r"WeightsUnpickler error:\s*(.+?)\s*(\n|$)", str(exc))
        raise UpstreamCheckpointError(
            f"{path}: not a readable plain-data PyTorch checkpoint "
            f"({detail.group(1) if detail else 'unpickling failed'}; nothing was run)") from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UpstreamCheckpointError(f"{path}: not a readable PyTorch checkpoint ({first})") from None


def _family_of(state: Mapping[str, torch.Tensor]) -> Family:
    return "neurostorm" if any(".mamba." in k for k in state) else "swift"


def _split_keys(family: Family, raw: Mapping[str, Any],
                path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The ``model.`` weights (prefix removed) and the keys dropped; anything unknown is refused."""
    weights: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    unknown: list[str] = []
    for key, value in raw.items():
        if key.startswith("model."):
            name = key.removeprefix("model.")
            if UNUSED_KEYS[family].fullmatch(name):
                dropped.append(key)
            elif not isinstance(value, torch.Tensor):
                unknown.append(key)
            else:
                weights[name] = value
        elif key.startswith(HEAD_PREFIXES):
            dropped.append(key)
        else:
            unknown.append(key)
    if unknown:
        raise UpstreamCheckpointError(
            f"{path}: {len(unknown)} unknown key(s) in state_dict, e.g. {unknown[0]!r} (expected "
            f"'model.*' and task heads {', '.join(HEAD_PREFIXES)})")
    return weights, dropped


def _config_for(family: Family, hparams: Mapping[str, Any], weights: Mapping[str, torch.Tensor],
                path: Path) -> UpstreamConfig:
    """Configuration from ``hparams``; what only the weights tell (MAE, mask tokens, prompts) from them."""
    overrides: dict[str, Any] = {}
    if family == "neurostorm":
        overrides["mae"] = "decoder_pred.weight" in weights
        token = weights.get("mask_token")
        overrides["mask_token_layout"] = "latest" if "window_mask_token" in weights or (
            token is not None and token.ndim == 1) else "released"
        prompt = next((v for k, v in weights.items() if k.endswith(".prompt")), None)
        overrides["prompt_len"] = 0 if prompt is None else int(prompt.shape[1])
    try:
        return UpstreamConfig.from_hyper_parameters(family, hparams, **overrides)
    except (TypeError, ValueError) as exc:
        raise UpstreamCheckpointError(f"{path}: hyper_parameters do not describe a {family} network "
                                      f"({exc})") from None


def _load_weights(model: nn.Module, weights: Mapping[str, torch.Tensor], config: UpstreamConfig,
                  path: Path) -> None:
    """Load strictly; a missing, unexpected or misshapen weight is a one-line error."""
    expected = model.state_dict()
    sizes = (f"img_size={list(config.img_size)}, embed_dim={config.embed_dim}, depths="
             f"{list(config.depths)}, window_size={list(config.window_size)}")
    extra = sorted(set(weights) - set(expected))
    missing = sorted(set(expected) - set(weights))
    if extra or missing:
        what = f"unexpected weight 'model.{extra[0]}'" if extra else f"missing weight 'model.{missing[0]}'"
        raise UpstreamCheckpointError(
            f"{path}: {what} ({len(extra)} unexpected, {len(missing)} missing) for the {config.family} "
            f"network of its hyper_parameters ({sizes})")
    for key, value in weights.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise UpstreamCheckpointError(
                f"{path}: 'model.{key}' has shape {list(value.shape)} in the checkpoint but "
                f"{list(expected[key].shape)} in the {config.family} network of its hyper_parameters "
                f"({sizes})")
        if not value.is_floating_point():
            raise UpstreamCheckpointError(f"{path}: 'model.{key}' is {value.dtype}, not floating point")
    model.load_state_dict({k: v.float() for k, v in weights.items()}, strict=True)


def read_lightning_checkpoint(path: str | Path, family: Family | None = None) -> UpstreamCheckpoint:
    """Import a SwiFT or NeuroSTORM PyTorch Lightning checkpoint.

    Parameters
    ----------
    path : str or Path
        The ``.ckpt`` file (``{"state_dict": {"model.<key>": ...}, "hyper_parameters": ...}``).
    family : {"swift", "neurostorm"}, optional
        Which network; by default from the weights (Mamba weights mean NeuroSTORM) and
        ``hyper_parameters["model"]``, which must agree.

    Returns
    -------
    UpstreamCheckpoint
        The model in eval mode on the CPU, in float32, with its configuration and dropped keys.

    Raises
    ------
    UpstreamCheckpointError
        One line (exit code 65): a file that is not a plain-data PyTorch checkpoint (a pickle that
        would construct other objects is refused without running anything), no ``state_dict``,
        unknown keys, or weights that do not fit the network of its ``hyper_parameters``.
    """
    path = Path(path)
    ckpt = _load_plain(path)
    if not isinstance(ckpt, Mapping) or not isinstance(ckpt.get("state_dict"), Mapping):
        raise UpstreamCheckpointError(f"{path}: not a Lightning checkpoint (no 'state_dict')")
    hparams = ckpt.get("hyper_parameters") or {}
    if isinstance(hparams, argparse.Namespace):
        hparams = vars(hparams)
    if not isinstance(hparams, Mapping):
        raise UpstreamCheckpointError(
            f"{path}: hyper_parameters is a {type(hparams).__name__}, not a mapping")
    raw = ckpt["state_dict"]
    named = MODEL_NAMES.get(str(hparams.get("model")))
    detected = _family_of(raw)
    family = family or named or detected
    if family not in ("swift", "neurostorm"):
        raise UpstreamCheckpointError(f"{path}: unknown family {family!r} (swift or neurostorm)")
    for source, other in (("hyper_parameters['model']", named), ("its weights", detected)):
        if other is not None and other != family:
            raise UpstreamCheckpointError(f"{path}: asked for {family} but {source} say(s) {other}")
    weights, dropped = _split_keys(family, raw, path)
    config = _config_for(family, hparams, weights, path)
    model = build_upstream(config)
    _load_weights(model, weights, config, path)
    return UpstreamCheckpoint(model.eval(), config, dropped, dict(hparams))
