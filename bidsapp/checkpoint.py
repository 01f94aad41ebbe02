"""Checkpoints as safetensors + JSON: nothing read from disk is ever unpickled.

A checkpoint is ``<stem>.safetensors`` (the model weights) beside ``<stem>.json`` (what the model is: preset,
masking, atlas, grid, training data and metrics). The optimizer state of a training checkpoint is a second
safetensors file, ``<stem>_optim.safetensors``, whose non-tensor parts live in the JSON sidecar.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from bidsapp.errors import BadDataError, NoInputError, UsageError
from bidsapp.io import atomic_path, atomic_write_json

FORMAT = "roimae-checkpoint/1"
MASKING_DESC = {"roi": "roi", "random": "random", "brain-random": "brainrandom",
                "roi-voxel": "roivoxel"}


def masking_desc(masking: str) -> str:
    """BIDS ``desc-`` label of a masking strategy.

    BIDS labels are alphanumeric, so ``brain-random`` becomes ``brainrandom``.
    """
    return MASKING_DESC.get(masking, masking)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(stem: Path, model: torch.nn.Module, metadata: dict[str, Any],
                    optimizer: torch.optim.Optimizer | None = None) -> Path:
    """Write ``stem.safetensors`` (+ ``stem_optim.safetensors``) and then ``stem.json``, atomically.

    The JSON sidecar is written last and names the weight file's hash, so a sidecar only exists for
    a complete checkpoint: a crash mid-save leaves an older complete checkpoint as the newest one.
    """
    weights = stem.with_suffix(".safetensors")
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    with atomic_path(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": FORMAT})
    meta = dict(metadata, format=FORMAT, weights=weights.name, weights_sha256=file_sha256(weights))
    if optimizer is not None:
        optim_path = stem.parent / f"{stem.name}_optim.safetensors"
        tensors, structure = _flatten_optimizer(optimizer.state_dict())
        with atomic_path(optim_path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT})
        meta["optimizer"] = {"file": optim_path.name, "structure": structure,
                             "sha256": file_sha256(optim_path)}
    atomic_write_json(stem.with_suffix(".json"), meta, sort_keys=True)
    return weights


def read_metadata(path: Path) -> dict[str, Any]:
    """Read the JSON sidecar of a checkpoint given its ``.safetensors`` or ``.json`` path."""
    path = Path(path)
    if path.suffix != ".safetensors" and path.suffix != ".json":
        raise UsageError(f"checkpoint {path} must be a .safetensors file with a .json sidecar "
                         "(pickled PyTorch checkpoints are refused: they can run code)")
    sidecar = path.with_suffix(".json")
    if not sidecar.is_file():
        raise NoInputError(f"checkpoint sidecar {sidecar} does not exist")
    try:
        meta = json.loads(sidecar.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise BadDataError(f"checkpoint sidecar {sidecar} is not valid JSON: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise BadDataError(f"{sidecar} is not a roimae checkpoint sidecar (format {FORMAT!r})")
    return meta


def load_weights(path: Path, meta: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """Load the weights of a checkpoint with safetensors (never pickle), checking its hash."""
    weights = Path(path).with_suffix(".safetensors")
    if not weights.is_file():
        raise NoInputError(f"checkpoint {weights} does not exist")
    if meta is not None and meta.get("weights_sha256") not in (None, file_sha256(weights)):
        raise BadDataError(f"checkpoint {weights} does not match the hash in its sidecar "
                           "(truncated or replaced file)")
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadDataError(f"checkpoint {weights} is not a valid safetensors file "
                           f"(truncated, or a pickle, which is refused): {exc}") from exc


def load_optimizer_state(stem: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """Rebuild an optimizer ``state_dict`` saved by :func:`save_checkpoint`."""
    info = meta.get("optimizer")
    if not info:
        raise BadDataError(f"checkpoint {stem} holds no optimizer state; cannot resume from it")
    path = stem.parent / info["file"]
    if file_sha256(path) != info["sha256"]:
        raise BadDataError(f"optimizer state {path} does not match its sidecar hash")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise BadDataError(f"optimizer state {path} is not a valid safetensors file: {exc}") from exc
    return _unflatten_optimizer(tensors, info["structure"])


def _flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    # Tensors go to safetensors under "state.<param>.<name>"; everything else (param groups, step
    # counters stored as Python numbers) is JSON-serialisable and goes to the sidecar.
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, entry in state_dict["state"].items():
        for name, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{param_id}.{name}"] = value.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], structure: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, param_id, name = key.split(".", 2)
        state.setdefault(int(param_id), {})[name] = value
    for param_id, entry in structure.get("scalars", {}).items():
        state.setdefault(int(param_id), {}).update(entry)
    return {"state": state, "param_groups": structure["param_groups"]}
