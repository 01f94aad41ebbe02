"""Apply a pretrained model to one run: window embeddings and per-region attribution.

:class:`RoimaeModel` is the loaded model (network, metadata, atlas, its preprocessing),
:func:`load_model` reads one, and :func:`analyse_run` embeds a run and attributes it to regions
with :mod:`bidsapp.attribution` (whose :data:`~bidsapp.attribution.ATTRIBUTION_METHOD` says how).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from bidsapp.atlas import Atlas
from bidsapp.attribution import AttributionSums, RegionPasses, subsets
from bidsapp.cache import CachedRun, PreprocessParams
from bidsapp.checkpoint import CheckpointMeta, load_weights, read_metadata
from bidsapp.config import masking_desc
from bidsapp.data import build_region_grid
from bidsapp.errors import BadDataError, NoInputError, UsageError
from bidsapp.grid import cube_atlas
from bidsapp.io import file_sha256
from bidsapp.model.factory import build_model, build_upstream_model
from bidsapp.model.mae import MaskedAutoencoder
from bidsapp.model.masking import RegionTokenOrVoxelMasking, RegionVoxelMasking
from bidsapp.model.presets import BACKBONE_PRESETS, ModelPreset
from bidsapp.model.regions import RegionGrid
from bidsapp.outputs import MODEL_WEIGHTS, embedding_columns
from bidsapp.readouts import (
    DispersionSums,
    RegionPooling,
    dispersion_weights,
    feature_correlation,
    input_token_signals,
    region_embedding,
    within_region_dispersion,
)
from bidsapp.runtime import step_generator


@dataclass(frozen=True)
class RoimaeModel:
    """A pretrained model, checked against its atlas, ready to embed runs.

    The one object for a loaded model: the participant level, the group level's feature
    names and the Python API (:func:`bidsapp.api.load_model`) all use it.

    Attributes
    ----------
    model : MaskedAutoencoder
        The network, in evaluation mode on its device.
    meta : bidsapp.checkpoint.CheckpointMeta
        What the checkpoint's JSON sidecar says about it.
    path : Path
        The ``.safetensors`` weight file.
    sha256 : str
        The SHA-256 of the weight file.
    preset : ModelPreset
    region_grid : RegionGrid
        The atlas on the preset's working and token grids, on the model's device.
    pooling : RegionPooling
        Token features -> region features.
    dispersion : RegionPooling
        The token weights of the ``subregion`` readout
        (:func:`~bidsapp.readouts.dispersion_weights`).
    atlas : bidsapp.atlas.Atlas
        The parcellation the model was pretrained with.
    """

    model: MaskedAutoencoder
    meta: CheckpointMeta
    path: Path
    sha256: str
    preset: ModelPreset
    region_grid: RegionGrid
    pooling: RegionPooling
    dispersion: RegionPooling
    atlas: Atlas

    @property
    def masking(self) -> str | None:
        """The masking strategy roimae pretrained it with (``None``: an imported upstream model)."""
        return None if self.meta.masking is None else self.meta.masking.masking

    @property
    def desc(self) -> str:
        """The ``desc-`` label of its outputs: its masking's, or an imported model's own."""
        return self.meta.desc or masking_desc(self.masking)

    @property
    def window_frames(self) -> int:
        """Frames per window the model reads."""
        return self.meta.window_frames

    @property
    def target_tr(self) -> float | None:
        """The repetition time the training runs were resampled to (``None``: not resampled)."""
        return self.meta.target_tr

    @property
    def card(self) -> dict[str, Any] | None:
        """The model card (training data, loss curve, hardware...); ``None`` for older models."""
        return self.meta.model_card

    @property
    def sidecar(self) -> dict[str, Any]:
        """The checkpoint's JSON sidecar as plain values (:attr:`meta` holds it typed)."""
        return self.meta.sidecar_dict()

    @property
    def n_features(self) -> int:
        """Size of a window or run embedding."""
        return self.preset.n_features

    @property
    def feature_names(self) -> list[str]:
        """Embedding column names, as in the participant level's TSV files (``e000``, ...)."""
        return embedding_columns(self.n_features)

    def preprocess_params(self, target_tr: float | str | None = "model") -> PreprocessParams:
        """The preprocessing that gives this model its inputs: the one place that builds it.

        Parameters
        ----------
        target_tr : float, None or "model"
            Resample runs in time to this TR; ``"model"`` (default): as the training runs were.

        Returns
        -------
        bidsapp.cache.PreprocessParams
            The model's window length and working resolution, and the TR.
        """
        if target_tr == "model":
            target_tr = self.target_tr
        return PreprocessParams(window_frames=self.window_frames, target_tr=target_tr,
                                downsample=self.preset.downsample)

    def _upstream(self, what: str) -> torch.nn.Module:
        net = getattr(self.model, "net", None)
        if net is None:
            raise UsageError(f"{what} is the upstream networks' (swift, neurostorm); a "
                             f"{self.meta.backbone} model embeds with model.model.encode(x, brain)")
        return net

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The upstream network's stage outputs, as upstream's encoder computes them.

        Parameters
        ----------
        x : torch.Tensor, shape (B, 1, 96, 96, 96, T)
            Laid out as upstream's ``forward`` takes it, already in the model's input convention
            (z-scored over the run's brain, background at the run's smallest value; no masking).

        Returns
        -------
        list of torch.Tensor
            The output of each of upstream's ``layers[i]`` (which ends with that stage's patch
            merging), ``(B, C_i, d_i, h_i, w_i, T)``; the last is what upstream's encoder
            returns. Gradients flow unless called under :func:`torch.no_grad`.

        Raises
        ------
        bidsapp.errors.UsageError
            For roimae's own backbones (swin4d, vit4d).
        """
        net = self._upstream("encode(x)")
        return net.encode(x.to(self.region_grid.device))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """NeuroSTORM's ``forward_decoder``: the last stage output -> ``(B, 1, 96, 96, 96, T)``.

        Raises
        ------
        bidsapp.errors.UsageError
            For a model without a decoder (swift) or one of roimae's own backbones.
        """
        net = self._upstream("decode(z)")
        if not self.model.has_decoder:
            raise UsageError(f"decode(z): {self.model.no_decoder_reason}")
        return net.decode(z.to(self.region_grid.device))


def weights_file(path: Path) -> Path:
    """A ``.safetensors`` file, or a model folder holding one (``models/desc-roi``).

    Raises
    ------
    NoInputError
        A folder without ``model.safetensors``, or no such folder (66).
    """
    if path.is_dir():
        if (path / MODEL_WEIGHTS).is_file():
            return path / MODEL_WEIGHTS
        raise NoInputError(f"{path} holds no {MODEL_WEIGHTS}")
    if not path.exists() and path.suffix not in (".safetensors", ".json"):
        raise NoInputError(f"model {path} does not exist")
    return path


def build_network(meta: CheckpointMeta) -> MaskedAutoencoder:
    """The network a sidecar describes, freshly initialised on the current default device.

    An upstream model (``meta.upstream``) is rebuilt from its exact configuration, any other from
    its backbone's preset.
    """
    if meta.upstream is not None:
        return build_upstream_model(meta.upstream.network_config(), norm_pix_loss=meta.norm_pix_loss,
                                    background=meta.upstream.background)
    return build_model(BACKBONE_PRESETS[meta.backbone][meta.preset.name],
                       norm_pix_loss=meta.norm_pix_loss)


def check_finite_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    """Refuse (65) weights that hold NaN or infinities: a diverged training."""
    diverged = [name for name, value in state.items()
                if value.is_floating_point() and not bool(torch.isfinite(value).all())]
    if diverged:
        raise BadDataError(f"checkpoint {path} holds non-finite weights ({len(diverged)} tensors, "
                           f"e.g. {diverged[0]}): its training diverged; pretrain again with a "
                           "lower --lr")


def load_model(path: Path, atlas: Atlas, device: torch.device) -> RoimaeModel:
    """Load a checkpoint (safetensors + JSON only) pretrained with ``atlas``.

    Parameters
    ----------
    path : Path
        ``model.safetensors`` (its JSON sidecar beside it), an epoch checkpoint, or the folder
        of a model (``OUTPUT_DIR/models/desc-roi``).
    atlas : bidsapp.atlas.Atlas
        Must be the model's (by SHA-256).
    device : torch.device

    Returns
    -------
    RoimaeModel

    Raises
    ------
    bidsapp.errors.RoimaeError
        No such file, not a safetensors checkpoint, a hash that does not match its sidecar,
        non-finite weights, weights that do not fit their preset (65, 66), or another atlas than
        the model's (64).
    """
    path = weights_file(Path(path))
    meta = read_metadata(path)   # its backbone and preset are known ones (the schema's check)
    backbone, preset_name = meta.backbone, meta.preset.name
    if meta.atlas.sha256 != atlas.sha256():
        raise UsageError(f"checkpoint {path} was trained with another atlas "
                         f"({meta.atlas.name}); pass the same --atlas")
    model = build_network(meta)
    preset = model.preset
    state = load_weights(path, meta)
    check_finite_weights(state, path)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise BadDataError(f"checkpoint {path} does not fit the {backbone} {preset_name!r} model: "
                           f"{str(exc).splitlines()[0]}") from exc
    model.to(device).eval()
    weights = path.with_suffix(".safetensors")
    cube, token_edge = cube_atlas(atlas), preset.patch_size * preset.downsample
    return RoimaeModel(model, meta, weights, file_sha256(weights), preset,
                       build_region_grid(atlas, preset).to(device),
                       RegionPooling.from_atlas(cube, token_edge).to(device),
                       dispersion_weights(cube, token_edge).to(device), atlas)


@dataclass
class RunAttribution:
    """What :func:`analyse_run` computes for one run (R regions, C embedding dims, W windows)."""

    window_embeddings: np.ndarray     # (W, C)
    embedding: np.ndarray             # (C,) mean over windows
    region_embeddings: np.ndarray     # (R, C0) region features, mean over frames
    subregion: np.ndarray             # (R, C0) log within-region dispersion, NaN: too few tokens
    input_subregion: np.ndarray       # (R, 1) the same statistic of the input's token means
    feature_connectivity: np.ndarray  # (R, R) correlation of region features over frames
    recon_error: np.ndarray | None    # (R,) NaN where a region cannot be hidden
    recon_error_se: np.ndarray | None  # (R,)
    occluded_embeddings: np.ndarray | None  # (R, C) run embedding with the region hidden
    occlusion: np.ndarray | None      # (R,) |occluded - embedding| / window spread
    eligible: np.ndarray              # (R,) bool: the region can be hidden at this model's grid
    example: dict[str, np.ndarray]    # one window's middle frame: input, masked, reconstruction
    #: Why ``recon_error`` is all NaN: the model has no decoder (swift); ``None`` otherwise.
    recon_missing: str | None = None


@torch.inference_mode()
def analyse_run(loaded: RoimaeModel, run: CachedRun, *, attribution: bool, n_subsets: int,
                seed: int, batch_size: int | None = None) -> RunAttribution:
    """Embed every window of ``run`` and, optionally, attribute to AAL3 regions.

    ``batch_size`` masked passes run at once: by default 4 on a GPU and 1 on the CPU, where a
    batch is no faster per pass (0.318 vs 0.313 s at ``small``) and multiplies activation memory.
    """
    grid = loaded.region_grid
    device = grid.device
    hiding = RegionVoxelMasking if loaded.masking == "roi-voxel" else RegionTokenOrVoxelMasking
    region_masking = hiding(grid, 0.5)
    passes = RegionPasses(loaded.model, region_masking,
                          batch_size or (4 if device.type == "cuda" else 1))
    sums = AttributionSums()
    dispersion = DispersionSums(loaded.dispersion)
    window_embs, region_feats = [], []
    example: dict[str, np.ndarray] = {}
    brain = torch.from_numpy(run.brain)[None].to(device)                # (1, D, H, W) working grid
    for w in range(run.n_windows):
        x = torch.from_numpy(run.window(w))[None].to(device)            # (1, T, D, H, W)
        emb, tokens, valid = loaded.model.encode_tokens(x, brain)       # (1, C), (1, T', g.., C0)
        window_embs.append(emb[0])
        region_feats.append(loaded.pooling(tokens[0], valid[0]).cpu())  # (T', R, C0)
        dispersion.add(tokens[0], valid[0])
        if attribution:
            # The subsets of window w depend on (seed, w) alone, on any device.
            regions = subsets(region_masking.eligible, n_subsets,
                               step_generator(seed, w, device=torch.device("cpu"))).to(device)
            embs, errors, counts, shown = passes(x, brain, regions, example=w == 0)
            sums.add(regions, embs, errors, counts)
            example = shown if w == 0 else example
    window_embeddings = torch.stack(window_embs).float().cpu().numpy()  # (W, C)
    features = torch.cat(region_feats).double().numpy()                # (F, R, C0)
    inputs = input_token_signals(run, loaded.preset.patch_size).to(device)  # (F, g, g, g, 1)
    result = RunAttribution(window_embeddings, window_embeddings.mean(0),
                            region_embedding(features), dispersion.result(),
                            within_region_dispersion(inputs, valid[0], loaded.dispersion),
                            feature_correlation(features),
                            None, None, None, None, region_masking.eligible.cpu().numpy(), example)
    if attribution:
        found = sums.result(window_embeddings, result.eligible)
        result.recon_error, result.recon_error_se = found.recon_error, found.recon_error_se
        result.occluded_embeddings, result.occlusion = found.occluded_embeddings, found.occlusion
        result.recon_missing = loaded.model.no_decoder_reason if not loaded.model.has_decoder else None
    return result


