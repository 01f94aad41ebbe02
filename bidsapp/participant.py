"""The ``participant`` level: embeddings and per-region attribution maps for every selected run.

For each run (``<source>`` = its entities, e.g. ``sub-01_task-rest_space-MNI152NLin6Asym_res-2``) and
the model's masking ``<m>`` (``desc-<m>``), written beside the run in ``OUTPUT_DIR/sub-*/[ses-*/]func/``:

- ``<source>_desc-<m>_embedding.tsv``: one row per window (``window``, ``onset`` in seconds, ``e000``...)
- ``<source>_desc-<m>_stat-mean_embedding.tsv``: the run embedding (mean over windows), one row
- ``<source>_atlas-AAL3v1_desc-<m>_stat-region_embedding.tsv``: one row per region, its features at the
  encoder's finest stage averaged over frames (:mod:`bidsapp.readouts`)
- ``<source>_atlas-AAL3v1_desc-<m>_stat-subregion_embedding.tsv``: one row per region, the log
  dispersion of its tokens' features about the region's mean token over frames, per channel:
  structure inside the region that region means average away (NaN: fewer than two effective tokens),
  and ``..._stat-inputsubregion_embedding.tsv``, the same statistic of the model's input averaged
  per token (what it finds without the model's features)
- ``<source>_atlas-AAL3v1_desc-<m>_stat-pearsoncorrelation_relmat.tsv``: region x region correlation
  of the region features over frames (connectivity in the model's feature space)
- ``<source>_atlas-AAL3v1_stat-mean_timeseries.tsv`` and ``..._stat-pearsoncorrelation_relmat.tsv``
  (no ``desc``: they do not depend on the model): the functional-connectivity baseline, region mean
  signals of the same preprocessed run and their Pearson correlations (BEP017 names, as XCP-D)
- ``<source>_atlas-AAL3v1_desc-<m>_stat-occluded_embedding.tsv``: one row per region, the run embedding
  with that region hidden (used by the group level)
- ``<source>_atlas-AAL3v1_desc-<m>_stat-reconerror_boldmap.nii.gz`` and ``..._stat-occlusion_...``: 3D
  maps on the run's grid, each region's voxels carrying its value (NaN: a region without a brain
  voxel on the model's working grid); ``stat`` follows ``desc`` as in nilearn (it is not a BIDS 1.11 entity)
- ``<source>_atlas-AAL3v1_desc-<m>_attribution.tsv`` (one row per region) and
  ``..._stat-bygroup_attribution.tsv`` (limbic, cerebellum, ...; only when the atlas has region groups)
- a JSON sidecar beside each, and ``OUTPUT_DIR/sub-<label>.html`` with figures in ``sub-<label>/figures/``.

``AAL3v1`` stands for the atlas's own name (:func:`bidsapp.atlas.atlas_name`).

The names are built by :class:`bidsapp.outputs.RunOutputs`, the one home of the output contract.

The run's ``..._desc-<m>_embedding.json`` is written last and lists every output: a run whose sidecar
exists with all its outputs is complete and skipped (unless ``--overwrite``); anything else is redone.
"""

from __future__ import annotations

import time
from collections import defaultdict

import nibabel as nib
import numpy as np
import torch

from bidsapp import model_card
from bidsapp._version import __version__
from bidsapp.atlas import Atlas, load_atlas
from bidsapp.attribution import ATTRIBUTION_METHOD, window_spread
from bidsapp.bids.derivatives import DerivativesWriter
from bidsapp.bids.layout import BoldRun, discover_runs
from bidsapp.bids.validation import validate_input
from bidsapp.cache import PreprocessParams
from bidsapp.config import Config
from bidsapp.data import prepare_runs
from bidsapp.errors import BadDataError, UsageError
from bidsapp.inference import RoimaeModel, RunAttribution, analyse_run, load_model
from bidsapp.io import remove_temporaries
from bidsapp.logs import get_logger
from bidsapp.outputs import (
    ATLAS_SHA256,
    BIDSIGNORE,
    NOTE_HIDDEN_BY_VOXEL,
    RunOutputs,
    atlas_label,
    complete_runs,
    embedding_frame,
    find_model,
    recorded_atlas,
    run_stem,
)
from bidsapp.reports import report_lock, write_participant_report
from bidsapp.results import RunEmbedding, run_embedding
from bidsapp.runtime import seed_everything

log = get_logger("participant")


def write_readouts(writer: DerivativesWriter, out: RunOutputs, run: RunEmbedding, atlas: Atlas,
                   atlas_sha256: str, sources: list[str], model_info: dict) -> None:
    """The region readouts of the model and the functional-connectivity baseline of one run.

    ``atlas_sha256``: the atlas's hash, recorded in the baseline's sidecars (the model's, which
    :func:`~bidsapp.inference.load_model` checked against ``atlas``).
    """
    model_readouts = (
        (out.region_embedding, run.region_embedding_table,
         "Region embeddings: the encoder's finest-stage token features pooled per region "
         "(weighted by the share of the region's voxels in each token) and averaged over frames"),
        (out.subregion, run.subregion_table,
         "Within-region dispersion (the subregion readout): for every region and channel, the log "
         "of the weighted mean over the region's tokens of the variance over frames of the "
         "token's feature minus the region's weighted mean token, at the encoder's finest stage. "
         "Tokens are weighted by their share of the region's voxels times their purity (share of "
         "the token that is the region) cubed; n/a for a region with fewer than two effective "
         "tokens. It sees structure inside a region that leaves the region's mean signal "
         "unchanged"),
        (out.input_subregion, run.input_subregion_table,
         "Reference of the subregion readout without the model's features: the same "
         "within-region dispersion (same token weights) of the model's input, z-scored and "
         "averaged over each token's cells, over every stored frame"),
        (out.connectivity, run.connectivity_table,
         "Connectivity in the model's feature space: for every channel, the Pearson correlation "
         "of two regions' features over frames, averaged over channels"),
    )
    for path, table, description in model_readouts:
        writer.write_tsv(path, table)
        writer.write_sidecar(path, {"Description": description, "Atlas": atlas.name,
                                    "Sources": sources, "Model": model_info})
    writer.write_tsv(out.timeseries, run.timeseries)
    writer.write_sidecar(out.timeseries, {
        "Description": "Functional-connectivity baseline: mean z-scored signal of each region's "
                       "voxels in the run's brain mask, every frame, from the cache on the "
                       "model's working grid (cells weighted by their voxels of the region)",
        "Atlas": atlas.name, ATLAS_SHA256: atlas_sha256, "Sources": sources,
        "RepetitionTime": run.repetition_time})
    writer.write_tsv(out.fc, run.fc_table)
    writer.write_sidecar(out.fc, {
        "Description": "Functional-connectivity baseline: Pearson correlation of the region "
                       "time series (nilearn ConnectivityMeasure, empirical covariance)",
        "Atlas": atlas.name, ATLAS_SHA256: atlas_sha256,
        "Sources": [*sources, writer.bids_uri(out.timeseries)]})


def check_finite_embeddings(result: RunAttribution, run: BoldRun, loaded: RoimaeModel) -> None:
    """Refuse (65) a run whose embeddings hold NaN or infinities, before anything is written.

    Finite input and finite weights can still overflow in a model whose training went astray;
    such embeddings would only surface as an obscure error at the group level.
    """
    if not np.isfinite(result.window_embeddings).all():
        raise BadDataError(f"model {loaded.path} gives non-finite embeddings for {run.name} (an "
                           "unstable or diverged model); pretrain again with a lower --lr")


def write_run(writer: DerivativesWriter, out: RunOutputs, bold: BoldRun, run: RunEmbedding,
              model: RoimaeModel, config: Config) -> None:
    """Write one run's outputs (each atomically; the completion sidecar last).

    The completion sidecar of an earlier job goes first: until this job writes it again, the
    run is incomplete, so a job stopped half-way never leaves one model's files under another
    model's completion (the group level and the reports leave incomplete runs out).
    """
    out.done.unlink(missing_ok=True)
    atlas = model.atlas
    model_info = {"Path": writer.bids_uri(model.path), "SHA256": model.sha256,
                  "Preset": model.preset.name, "Masking": model.masking,
                  "Backbone": model.meta.backbone, "Epoch": model.meta.epoch,
                  **model_card.cite(model.path, writer.bids_uri), **upstream_origin(model)}
    sources = [bold.source_uri, writer.bids_uri(bold.mask)]
    writer.write_tsv(out.embedding, run.window_embeddings)
    writer.write_tsv(out.mean_embedding, embedding_frame(run.embedding[None]))
    writer.write_sidecar(out.mean_embedding, {
        "Description": "Run embedding: mean of the window embeddings", "Sources": sources,
        "Model": model_info})
    write_readouts(writer, out, run, atlas, model.meta.atlas.sha256, sources, model_info)
    meta: dict = {
        "Description": "Window embeddings of the pretrained roimae encoder (no masking)",
        "Sources": sources, "Model": model_info, "RepetitionTime": run.repetition_time,
        "WindowFrames": model.window_frames, "NumberOfWindows": len(run.window_embeddings),
        "FramesUsed": len(run.window_embeddings) * model.window_frames,
        "FramesInRun": run.n_frames,
        "WindowSpread": window_spread(run.result.window_embeddings),
        "SoftwareVersion": __version__, "Attribution": None,
        ATLAS_SHA256: model.meta.atlas.sha256,
    }
    if run.regions is not None:
        writer.write_tsv(out.occluded, run.occluded_embeddings)
        missing = run.result.recon_missing
        for path, column, text in (
            (out.recon_map, "reconerror", "Masked reconstruction error of each region (MSE of "
             "z-scored signal over its hidden brain voxels); lower = reconstructed better"),
            (out.occlusion_map, "occlusion", "Representation sensitivity of each region: the "
             "distance between the run embedding and the run embedding with the region hidden, "
             "in units of the RMS distance of the run's window embeddings from their mean"),
        ):
            if column == "reconerror" and missing:
                text = f"n/a in every region: {missing}"
            writer.write_nifti(path, run.maps[column])
            writer.write_sidecar(path, {"Description": text, "Sources": sources,
                                        "Atlas": atlas.name, "Model": model_info,
                                        "NaNMeans": nan_means(column, len(run.window_embeddings))})
        writer.write_tsv(out.table, run.regions)
        writer.write_sidecar(out.table, attribution_columns(missing))
        if out.groups is not None:
            writer.write_tsv(out.groups, run.by_group)
        meta["Attribution"] = {
            "Method": " ".join(ATTRIBUTION_METHOD.split()), "Subsets": config.participant.
            attribution_subsets, "Atlas": atlas.name, "Regions": len(atlas.regions),
            "RegionsNotHidden": int((~run.result.eligible).sum()),
            "RegionsHiddenByVoxel": int((run.regions["note"] == NOTE_HIDDEN_BY_VOXEL).sum()),
            "ReconstructionErrorMissing": missing,
        }
    meta["Outputs"] = [path.name for path in out.data_files(meta["Attribution"] is not None)]
    writer.write_sidecar(out.embedding, meta)   # last: marks the run complete


#: Why a region of a participant map is NaN.
NO_BRAIN_VOXEL = "the region has no brain voxel on the model's working grid"
ONE_WINDOW = ("the run has one window: representation sensitivity is measured in units of the "
              "spread between the run's windows, which one window does not have (every region "
              "is NaN); give runs of two windows or more")


#: Bytes per cell of a relmat TSV: a float written in full (e.g. ``-0.123456789012345``) and a tab.
RELMAT_CELL_BYTES = 19
#: Above this size of a run's two connectivity files, the participant level warns before it runs.
RELMAT_WARN_BYTES = 100 * 2**20


def warn_connectivity_cost(n_regions: int, n_runs: int) -> None:
    """Warn when an atlas makes each run's region x region files large (5,000 parcels: ~0.9 GB)."""
    per_run = 2 * n_regions**2 * RELMAT_CELL_BYTES
    if per_run > RELMAT_WARN_BYTES and n_runs:
        log.warning("%d atlas regions: each run's two region x region connectivity files take "
                    "about %.0f MB (%.1f GB for %d runs), and their correlations time and memory "
                    "in proportion; an atlas of a few hundred regions keeps them small",
                    n_regions, per_run / 2**20, per_run * n_runs / 2**30, n_runs)


def nan_means(measure: str, n_windows: int) -> str:
    """The ``NaNMeans`` of a participant map (``reconerror`` or ``occlusion``)."""
    return ONE_WINDOW if measure == "occlusion" and n_windows < 2 else NO_BRAIN_VOXEL


def check_no_other_model(outputs: list[tuple[BoldRun, RunOutputs]], model: RoimaeModel) -> None:
    """Refuse (64) to replace runs another model (of the same masking) completed, unless told.

    Two models of one masking write under one ``desc``: without ``--overwrite`` the complete
    outputs of the other one are kept, never silently replaced.
    """
    others = [run.name for run, out in outputs
              if (meta := out.completion()) is not None
              and meta["Model"].get("SHA256") not in (None, model.sha256)]
    if others:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        raise UsageError(f"{len(others)} run(s) have complete desc-{model.desc} outputs of another "
                         f"model ({shown}); pass --overwrite to replace them with {model.path.name}"
                         f" ({model.sha256[:12]}), or write to another OUTPUT_DIR")


def check_one_atlas(outputs: list[tuple[BoldRun, RunOutputs]], atlas: Atlas) -> None:
    """Refuse (64) to write ``atlas-<label>`` files where another atlas of that label wrote some.

    The label comes from the atlas's file name (Schaefer 100 and 400 parcels are both
    ``Schaefer2018``): two atlases of one label would overwrite each other's model-free files.
    """
    sha = atlas.sha256()
    for _, out in outputs:
        other = recorded_atlas(out.timeseries.with_suffix(".json"))
        if other not in (None, sha):
            raise UsageError(f"{out.timeseries.name} was written with another atlas of the label "
                             f"atlas-{atlas_label(atlas)} ({other[:12]}..., this one "
                             f"{sha[:12]}...): give this atlas file another name, or write to "
                             "another OUTPUT_DIR")


def attribution_columns(recon_missing: str | None) -> dict:
    """The attribution table's sidecar: what its measure columns hold (and why one is n/a)."""
    recon = ("Masked reconstruction error: mean squared error of the z-scored signal over the "
             "region's hidden brain voxels, in the passes that hid it")
    if recon_missing:
        recon = f"n/a in every region: {recon_missing}"
    return {
        "reconerror": {"Description": recon},
        "reconerror_se": {"Description": "Standard error of reconerror over passes and windows"
                          if not recon_missing else f"n/a in every region: {recon_missing}"},
        "occlusion": {"Description": "Representation sensitivity: the distance the run embedding "
                      "moves when the region is hidden, in units of the RMS distance of the "
                      "run's window embeddings from their mean"},
        "note": {"Description": "Why a region's values are n/a or measured differently"},
    }


def upstream_origin(model: RoimaeModel) -> dict:
    """Where an imported model's weights come from (its sidecar's ``upstream``), for output sidecars."""
    up = model.meta.upstream
    if up is None or up.source is None:
        return {}
    return {"Upstream": {"Family": up.family, "Source": up.source, "SourceSHA256": up.source_sha256,
                         "Repository": up.repository, "License": up.license}}


def check_command_line(model: RoimaeModel, config: Config) -> None:
    """Refuse (64) a ``--backbone``, ``--preset`` or ``--window-frames`` the model was not trained with."""
    meta, path = model.meta, model.path
    if config.model.backbone not in (None, meta.backbone):
        raise UsageError(f"checkpoint {path} is a {meta.backbone} model but --backbone "
                         f"{config.model.backbone} was given")
    if config.model.preset not in (None, meta.preset.name):
        raise UsageError(f"checkpoint {path} is a {meta.preset.name!r} model but --preset "
                         f"{config.model.preset} was given")
    if config.preprocess.window_frames not in (None, meta.window_frames):
        raise UsageError(f"checkpoint {path} was trained on {meta.window_frames}-frame "
                         f"windows but --window-frames {config.preprocess.window_frames} was given")


def model_inputs(model: RoimaeModel, config: Config) -> PreprocessParams:
    """The preprocessing of the model's training runs; ``--target-tr`` overrides its TR (warned)."""
    given = config.preprocess.target_tr
    if given is None:
        return model.preprocess_params()
    if given != model.target_tr:
        trained = "not resampled" if model.target_tr is None else f"{model.target_tr:g} s"
        log.warning("--target-tr %g s overrides the model's %s: runs are not read as the model "
                    "was trained", given, trained)
    return model.preprocess_params(given)


def run_participant(config: Config, device: torch.device) -> None:
    """Embed and attribute every selected run, one participant after the other."""
    atlas = load_atlas(config.atlas, config.atlas_labels)
    model_path = config.participant.model or find_model(config.output_dir,
                                                         config.participant.model_desc)
    loaded = load_model(model_path, atlas, device)
    check_command_line(loaded, config)
    log.info("model %s (%s %s, %s, epoch %s)", model_path, loaded.meta.backbone,
             loaded.preset.name, f"{loaded.masking} masking" if loaded.masking else "imported",
             loaded.meta.epoch)
    dataset = discover_runs(config)
    validate_input(config, dataset)
    writer = DerivativesWriter(config.output_dir, source_datasets=dataset.datasets)
    attribution = config.participant.attribution
    label = atlas_label(atlas)
    todo: list[tuple[BoldRun, RunOutputs]] = []
    outputs = [(run, RunOutputs(writer, run, loaded.desc, label, groups=atlas.has_groups))
               for run in dataset.runs]
    check_one_atlas(outputs, atlas)
    if not config.participant.overwrite:
        check_no_other_model(outputs, loaded)
    writer.ensure_dataset_description()
    writer.ensure_bidsignore(BIDSIGNORE)
    warn_connectivity_cost(len(atlas.regions), len(dataset.runs))
    for run, out in outputs:
        if not config.participant.overwrite and out.is_complete(attribution, loaded.sha256):
            log.info("%s: complete, skipped (use --overwrite to redo)", run.name)
        else:
            # A job killed while writing this run left temporary files: they are redone now.
            for path in out.data_files(attribution=True):
                for tmp in remove_temporaries(path):
                    log.info("%s: removed %s, left by an interrupted job", run.name, tmp.name)
            todo.append((run, out))
    cached = prepare_runs(config, [run for run, _ in todo], model_inputs(loaded, config))
    seed_everything(config.random_seed)
    by_subject: dict[str, list] = defaultdict(list)
    for i, ((run, out), cache) in enumerate(zip(todo, cached, strict=True), start=1):
        if cache.n_windows == 0:
            raise BadDataError(f"{run.bold.name} has {cache.n_frames} frames, fewer than one "
                               f"{loaded.window_frames}-frame window")
        t0 = time.perf_counter()
        result = analyse_run(loaded, cache, attribution=attribution,
                             n_subsets=config.participant.attribution_subsets,
                             seed=config.random_seed)
        check_finite_embeddings(result, run, loaded)
        if attribution and cache.n_windows < 2:
            log.warning("%s: one %d-frame window: no representation sensitivity (it is measured "
                        "in units of the spread between windows); reconstruction errors are "
                        "computed", run.name, loaded.window_frames)
        grid = nib.load(run.bold)
        write_run(writer, out, run, run_embedding(loaded, cache, result, grid.shape, grid.affine),
                  loaded, config)
        log.info("[%d/%d] %s: %d windows%s in %.1f s", i, len(todo), run.name, cache.n_windows,
                 " + attribution" if attribution else "", time.perf_counter() - t0)
        by_subject[run.subject].append((run, out, result))
    if config.participant.reports:
        # Every selected participant, also when all its runs were complete and skipped; each
        # report shows every complete run on disk (all models, all jobs). The lock keeps two
        # jobs of one participant (two models, say) from writing it at once, the later one
        # seeing the earlier one's runs.
        for subject in dict.fromkeys(run.subject for run in dataset.runs):
            examples = {run_stem(run.name, loaded.desc): result.example
                        for run, _, result in by_subject.get(subject, []) if result.example}
            with report_lock(config.output_dir, subject):
                runs = complete_runs(writer, subject, label, groups=atlas.has_groups)
                report = write_participant_report(config.output_dir, subject, runs, atlas,
                                                  examples)
            log.info("report: %s (%d runs)", report, len(runs))
