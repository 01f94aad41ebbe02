"""Continued pretraining: the model a pretraining starts from (``pretrain --init-from MODEL``).

Any roimae model can be continued: one ``roimae import-model`` wrote (NeuroSTORM's MAE, say) or
one the pretrain level wrote, with any ``--masking``. The new model keeps the network (backbone,
sizes, an upstream network's exact configuration), its window length and, unless ``--target-tr``
says otherwise, its TR; its sidecar names the model it started from (``init_from``) and keeps an
imported model's ``upstream`` provenance, which its card cites.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bidsapp.checkpoint import CheckpointMeta, load_weights, read_metadata
from bidsapp.config import Config
from bidsapp.errors import BadDataError, UsageError
from bidsapp.inference import build_network, check_finite_weights, weights_file
from bidsapp.io import file_sha256
from bidsapp.logs import get_logger
from bidsapp.model.mae import MaskedAutoencoder
from bidsapp.model.presets import ModelPreset

log = get_logger("pretrain")


@dataclass(frozen=True)
class Origin:
    """A model to continue pretraining from.

    Attributes
    ----------
    meta : CheckpointMeta
        Its sidecar.
    weights : Path
        Its ``.safetensors`` file.
    sha256 : str
        The hash of ``weights``.
    preset : ModelPreset
        Its network's sizes.
    """

    meta: CheckpointMeta
    weights: Path
    sha256: str
    preset: ModelPreset

    def network(self, *, norm_pix_loss: bool) -> MaskedAutoencoder:
        """Its network with its weights, in training mode (``norm_pix_loss``: this run's)."""
        model = build_network(self.meta.model_copy(update={"norm_pix_loss": norm_pix_loss}))
        state = load_weights(self.weights, self.meta)
        check_finite_weights(state, self.weights)
        try:
            model.load_state_dict(state)
        except RuntimeError as exc:
            raise BadDataError(f"--init-from {self.weights} does not fit its {self.meta.backbone} "
                               f"network: {str(exc).splitlines()[0]}") from exc
        return model.train()

    def info(self) -> dict:
        """The new sidecar's ``init_from`` (:class:`~bidsapp.checkpoint.InitInfo`)."""
        meta = self.meta
        return {"path": str(self.weights), "weights_sha256": self.sha256, "backbone": meta.backbone,
                "preset": meta.preset.name, "desc": meta.desc, "epoch": meta.epoch,
                "masking": None if meta.masking is None else meta.masking.masking}

    def target_tr(self, config: Config) -> float | None:
        """``--target-tr``, or the TR the model was trained at (warned when they differ)."""
        given = config.preprocess.target_tr
        if given is None:
            return self.meta.target_tr
        if given != self.meta.target_tr:
            trained = ("not resampled" if self.meta.target_tr is None
                       else f"{self.meta.target_tr:g} s")
            log.warning("--target-tr %g s overrides the %s of the model continued from (%s)",
                        given, trained, self.weights)
        return given


def read_origin(path: Path, config: Config) -> Origin:
    """The model ``--init-from`` names, checked against the command line.

    Parameters
    ----------
    path : Path
        A model folder (``OUTPUT_DIR/models/desc-neurostorm``) or its ``.safetensors`` weights.
    config : Config
        The pretraining's settings.

    Raises
    ------
    bidsapp.errors.RoimaeError
        No such model (66), not a safetensors checkpoint or a damaged one (64, 65); a model that
        cannot be pretrained (SwiFT's encoder has no decoder), or a ``--backbone``, ``--preset``
        or ``--window-frames`` other than the model's (64).
    """
    weights = weights_file(Path(path).expanduser().absolute())
    meta = read_metadata(weights)
    if meta.weights_sha256 is None:
        sha256 = file_sha256(weights.with_suffix(".safetensors"))
    else:
        sha256 = meta.weights_sha256
    model = build_network(meta)
    if not model.has_decoder:
        raise UsageError(f"--init-from {weights}: {model.no_decoder_reason}; it cannot be "
                         "pretrained (use it at the participant level)")
    given = {"--backbone": (config.model.backbone, meta.backbone),
             "--preset": (config.model.preset, meta.preset.name),
             "--window-frames": (config.preprocess.window_frames, meta.window_frames)}
    for option, (value, theirs) in given.items():
        if value is not None and value != theirs:
            raise UsageError(f"--init-from {weights} is a model of {option} {theirs}, but "
                             f"{option} {value} was given; leave it out")
    return Origin(meta, weights.with_suffix(".safetensors"), sha256, model.preset)
