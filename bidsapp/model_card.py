"""Model cards: what a pretrained model is, in words and in its JSON sidecar.

Every pretraining writes ``model.md`` beside ``model.safetensors`` and keeps the same facts under
``model_card`` in ``model.json``: roimae version, backbone and preset, masking, atlas and its hash,
the training data (dataset name, participants, runs, frames, space, TR, target TR), the held-out
loss curve, seed, hardware and time. A model copied to another lab says what it is; the
participant level's sidecars cite the card.
"""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from bidsapp.bids.layout import InputDataset
from bidsapp.cache import CachedRun
from bidsapp.checkpoint import CheckpointMeta
from bidsapp.io import atomic_write_text
from bidsapp.outputs import card_path

__all__ = ["build_card", "cite", "hardware", "render_markdown", "training_data",
           "write_card"]


def _number(value: Any) -> float | None:
    """A JSON-safe float (``None`` for NaN or missing)."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if np.isfinite(value) else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def hardware(device: torch.device, world_size: int = 1) -> dict[str, Any]:
    """The machine a model was trained on.

    Parameters
    ----------
    device : torch.device
        The training device of this process.
    world_size : int
        Number of training processes (``torchrun``).

    Returns
    -------
    dict
        ``device``, ``accelerator`` (GPU name or ``None``), ``processes``, ``cpu``, ``cpu_count``,
        ``torch_threads``, ``torch``, ``python``, ``platform``.
    """
    accelerator = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": device.type, "accelerator": accelerator, "processes": int(world_size),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "platform": f"{sys.platform} {platform.machine()}"}


def training_data(dataset: InputDataset, runs: list[CachedRun],
                  split: dict[str, list[str]], target_tr: float | None) -> dict[str, Any]:
    """What a model was trained on, from the selected dataset and its cached runs."""
    source_trs = sorted({float(tr) for run in runs
                         if (tr := run.manifest.get("source_repetition_time")) is not None})
    return {
        "dataset": dataset.description.get("Name"),
        "dataset_doi": dataset.description.get("DatasetDOI"),
        "participants": len({*split.get("train", []), *split.get("val", [])}),
        "participants_train": len(split.get("train", [])),
        "participants_heldout": len(split.get("val", [])),
        "runs": len(runs),
        "frames": int(sum(run.n_frames for run in runs)),
        "frames_in_windows": int(sum(run.n_windows * run.window_frames for run in runs)),
        "space": dataset.space,
        "repetition_time": source_trs,
        "target_tr": target_tr,
    }


def build_card(meta: CheckpointMeta, history: pd.DataFrame, *, data: dict[str, Any],
               machine: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
    """The facts of a model card.

    Parameters
    ----------
    meta : CheckpointMeta
        The checkpoint metadata written by the pretrain level (``model_metadata``).
    history : pandas.DataFrame
        The training log: ``epoch``, ``train_loss``, ``val_loss``, ``seconds``, ...
    data : dict
        :func:`training_data`.
    machine : dict
        :func:`hardware`.
    wall_seconds : float
        Wall time of the pretraining job that wrote the model.

    Returns
    -------
    dict
        JSON-serialisable; stored as ``model_card`` in the model's sidecar.
    """
    curve = [{"epoch": int(row["epoch"]), "train_loss": _number(row.get("train_loss")),
              "heldout_loss": _number(row.get("val_loss"))} for _, row in history.iterrows()]
    seconds = pd.to_numeric(history.get("seconds", pd.Series(dtype=float)), errors="coerce")
    return {
        "roimae_version": meta.roimae_version,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": meta.backbone,
        "preset": meta.preset.name,
        "masking": meta.masking.model_dump(exclude_unset=True),
        "initialised_from": _initialised_from(meta),
        "window_frames": meta.window_frames,
        "atlas": meta.atlas.model_dump(exclude_unset=True),
        "training_data": data,
        "loss_curve": curve,
        "epochs": len(curve),
        "random_seed": meta.random_seed,
        "training": meta.training,
        "hardware": machine,
        "training_seconds": _number(seconds.sum()) if len(seconds) else None,
        "wall_seconds": _number(wall_seconds),
    }


def _initialised_from(meta: CheckpointMeta) -> dict[str, Any] | None:
    """The model a continued pretraining started from, with its upstream origin if imported."""
    if meta.init_from is None:
        return None
    up = meta.upstream
    return {**meta.init_from.model_dump(),
            "upstream": None if up is None or up.source is None else up.model_dump(exclude={"config"})}


def _fmt(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return ", ".join(_fmt(v) for v in value) or "n/a"
    return str(value)


def render_markdown(card: dict[str, Any], weights: Path | None = None,
                    weights_sha256: str | None = None) -> str:
    """The card as Markdown, for people.

    Parameters
    ----------
    card : dict
        :func:`build_card`.
    weights : Path, optional
        The weight file the card describes.
    weights_sha256 : str, optional
        Its hash, as in the sidecar.

    Returns
    -------
    str
    """
    if card.get("kind") == "imported":
        return render_imported(card, weights, weights_sha256)
    masking = card.get("masking") or {}
    atlas = card.get("atlas") or {}
    data = card.get("training_data") or {}
    hw = card.get("hardware") or {}
    train = card.get("training") or {}
    lines = [
        f"# roimae model: {card.get('backbone')} {card.get('preset')}, "
        f"{masking.get('masking')} masking",
        "",
        "A masked autoencoder for 4D fMRI pretrained with roimae (region-aware masked "
        "reconstruction, Doodipala et al., arXiv:2511.00443). The same facts are in the JSON "
        "sidecar under `model_card`.",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| roimae version | {_fmt(card.get('roimae_version'))} |",
        f"| backbone, preset | {_fmt(card.get('backbone'))}, {_fmt(card.get('preset'))} |",
        f"| masking | {_fmt(masking.get('masking'))} (ratio {_fmt(masking.get('mask_ratio'))} of "
        f"{_fmt(masking.get('mask_ratio_unit'))}, {_fmt(masking.get('mask_time'))} in time) |",
        f"| window | {_fmt(card.get('window_frames'))} frames |",
        f"| atlas | {_fmt(atlas.get('name'))} ({_fmt(atlas.get('n_regions'))} regions), "
        f"sha256 `{_fmt(atlas.get('sha256'))}` |",
    ]
    if weights is not None:
        lines.append(f"| weights | `{Path(weights).name}`, sha256 `{_fmt(weights_sha256)}` |")
    lines += [
        f"| created | {_fmt(card.get('created'))} |",
        "",
        *_origin_lines(card.get("initialised_from")),
        "## Training data",
        "",
        "| | |",
        "|---|---|",
        f"| dataset | {_fmt(data.get('dataset'))}"
        + (f" (doi {data['dataset_doi']})" if data.get("dataset_doi") else "") + " |",
        f"| participants | {_fmt(data.get('participants'))} ({_fmt(data.get('participants_train'))} "
        f"training, {_fmt(data.get('participants_heldout'))} held out) |",
        f"| runs | {_fmt(data.get('runs'))} |",
        f"| frames | {_fmt(data.get('frames'))} ({_fmt(data.get('frames_in_windows'))} in windows) |",
        f"| space | {_fmt(data.get('space'))} |",
        f"| repetition time (s) | {_fmt(data.get('repetition_time'))} |",
        f"| target TR (s) | {_fmt(data.get('target_tr'))} |",
        "",
        "## Training",
        "",
        f"{_fmt(card.get('epochs'))} epochs, batch size {_fmt(train.get('batch_size'))}, learning rate "
        f"{_fmt(train.get('lr'))}, weight decay {_fmt(train.get('weight_decay'))}, random seed "
        f"{_fmt(card.get('random_seed'))}.",
        "",
        "| epoch | training loss | held-out loss |",
        "|---|---|---|",
        *(f"| {p['epoch']} | {_fmt(p['train_loss'])} | {_fmt(p['heldout_loss'])} |"
          for p in card.get("loss_curve", [])),
        "",
        "![loss curve](loss_curve.png)",
        "",
        "## Hardware and time",
        "",
        f"- device: {_fmt(hw.get('device'))}"
        + (f" ({hw['accelerator']})" if hw.get("accelerator") else "")
        + f", {_fmt(hw.get('processes'))} process(es)",
        f"- CPU: {_fmt(hw.get('cpu'))}, {_fmt(hw.get('cpu_count'))} cores, "
        f"{_fmt(hw.get('torch_threads'))} PyTorch threads",
        f"- software: PyTorch {_fmt(hw.get('torch'))}, Python {_fmt(hw.get('python'))}, "
        f"{_fmt(hw.get('platform'))}",
        f"- training time: {_fmt(card.get('training_seconds'))} s over all epochs; wall time of the "
        f"job that wrote the model: {_fmt(card.get('wall_seconds'))} s",
        "",
    ]
    return "\n".join(lines)


def _origin_lines(init: dict[str, Any] | None) -> list[str]:
    """The card's section on the model a pretraining continued from (none for a fresh start)."""
    if not init:
        return []
    lines = [
        "## Initialised from",
        "",
        f"Pretraining continued from `{init.get('path')}` (sha256 `{_fmt(init.get('weights_sha256'))}`): "
        f"{_fmt(init.get('backbone'))} {_fmt(init.get('preset'))}, "
        + (f"imported as desc-{init['desc']}" if init.get("desc") else
           f"{_fmt(init.get('masking'))} masking, epoch {_fmt(init.get('epoch'))}") + ".",
        "",
    ]
    up = init.get("upstream")
    if up:
        lines += [
            f"Its weights came from upstream: `{_fmt(up.get('source'))}` (sha256 "
            f"`{_fmt(up.get('source_sha256'))}`), {_fmt(up.get('repository'))} (code commit "
            f"{_fmt(up.get('code_commit'))}). Licence: {_fmt(up.get('license'))}. Pretrained on: "
            f"{_fmt(up.get('pretrained_on'))}; the data-use terms of those datasets may apply to "
            "this model too.",
            "",
        ]
    return lines


def render_imported(card: dict[str, Any], weights: Path | None = None,
                    weights_sha256: str | None = None) -> str:
    """The card of a model imported from SwiFT or NeuroSTORM (``roimae import-model``), as Markdown."""
    source = card.get("source") or {}
    network = card.get("network") or {}
    atlas = card.get("atlas") or {}
    lines = [
        f"# roimae model: {card.get('upstream')} ({card.get('backbone')}), imported",
        "",
        f"{card.get('upstream')}'s pretrained network, imported unchanged by `roimae import-model` "
        f"(roimae {_fmt(card.get('roimae_version'))}, {_fmt(card.get('created'))}); roimae did not "
        "train it. The same facts are in the JSON sidecar under `model_card` and `upstream`.",
        "",
        "## Where the weights come from",
        "",
        "| | |",
        "|---|---|",
        f"| upstream | {_fmt(card.get('upstream'))}: {_fmt(source.get('repository'))} |",
        f"| code | commit {_fmt(source.get('code_commit'))} (the network roimae reproduces) |",
        f"| weights published at | {_fmt(source.get('weights_url'))} |",
        f"| source file | `{_fmt(source.get('source'))}` |",
        f"| source SHA-256 | `{_fmt(source.get('source_sha256'))}` |",
        f"| not imported | {_fmt(source.get('dropped')) if source.get('dropped') else 'nothing'} "
        "(task heads and weights upstream's forward pass never uses) |",
        f"| licence | {_fmt(source.get('license'))} |",
        f"| pretrained on | {_fmt(source.get('pretrained_on'))} |",
        f"| cite | {_fmt(card.get('citation'))} |",
        "",
        f"Data use: {_fmt(card.get('data_use'))}.",
        "",
        "## Network",
        "",
        f"{_fmt(card.get('backbone'))}: input {_fmt(network.get('img_size'))} (voxels and frames), "
        f"patches {_fmt(network.get('patch_size'))}, embedding {_fmt(network.get('embed_dim'))}, "
        f"depths {_fmt(network.get('depths'))}, windows {_fmt(network.get('window_size'))} (stage 0: "
        f"{_fmt(network.get('first_window_size'))}), {_fmt(card.get('n_parameters'))} parameters"
        + ("" if card.get("has_decoder") else f". Note: {_fmt(card.get('no_decoder_reason'))}")
        + ".",
        "",
    ]
    if weights is not None:
        lines += [f"Weights: `{Path(weights).name}`, sha256 `{_fmt(weights_sha256)}`.", ""]
    lines += [
        "## Inputs",
        "",
        f"Windows of {_fmt(card.get('window_frames'))} frames, "
        + ("runs not resampled in time" if card.get("target_tr") is None
           else f"runs resampled to TR {_fmt(card.get('target_tr'))} s") + ". The atlas recorded, "
        f"{_fmt(atlas.get('name'))} ({_fmt(atlas.get('n_regions'))} regions, sha256 "
        f"`{_fmt(atlas.get('sha256'))}`), is the one roimae's region readouts and attribution use; "
        "the network itself knows no atlas.",
        "",
        "| step | upstream's preprocessing | roimae |",
        "|---|---|---|",
        *(f"| {c.get('step')} | {c.get('upstream')} | {c.get('roimae')} |"
          for c in card.get("input_convention", [])),
        "",
    ]
    return "\n".join(lines)


def write_card(weights: Path, meta: CheckpointMeta) -> Path | None:
    """Write ``model.md`` beside ``weights`` from the card in its sidecar metadata ``meta``.

    Returns
    -------
    Path or None
        The card, or ``None`` when ``meta`` holds no card.
    """
    card = meta.model_card
    if card is None:
        return None
    path = card_path(weights)
    atomic_write_text(path, render_markdown(card, weights, meta.weights_sha256))
    return path


def cite(weights: Path, uri: Callable[[Path], str]) -> dict[str, str]:
    """What an output's sidecar says about the card of the model that made it.

    Parameters
    ----------
    weights : Path
        The model's ``.safetensors`` file.
    uri : callable
        Path -> URI (e.g. :meth:`~bidsapp.bids.derivatives.DerivativesWriter.bids_uri`).

    Returns
    -------
    dict
        ``{"ModelCard": URI}``, or empty when the model has no card (older models).
    """
    card = card_path(weights)
    return {"ModelCard": uri(card)} if card.is_file() else {}
