"""The ``participant`` level: embeddings and per-region attribution maps for every selected run.

For each run (``<source>`` = its entities, e.g. ``sub-01_task-rest_space-MNI152NLin6Asym_res-2``) and
the model's masking ``<m>`` (``desc-<m>``), written beside the run in ``OUTPUT_DIR/sub-*/[ses-*/]func/``:

- ``<source>_desc-<m>_embedding.tsv``: one row per window (``window``, ``onset`` in seconds, ``e000``...)
- ``<source>_desc-<m>_stat-mean_embedding.tsv``: the run embedding (mean over windows), one row
- ``<source>_atlas-AAL3v1_desc-<m>_stat-occluded_embedding.tsv``: one row per region, the run embedding
  with that region hidden (used by the group level)
- ``<source>_atlas-AAL3v1_desc-<m>_stat-reconerror_boldmap.nii.gz`` and ``..._stat-occlusion_...``: 3D
  maps on the run's grid, each region's voxels carrying its value (NaN: a region the model grid cannot
  hide); ``stat`` follows ``desc`` as in nilearn (it is not a BIDS 1.11 entity)
- ``<source>_atlas-AAL3v1_desc-<m>_attribution.tsv`` (one row per region) and
  ``..._stat-bygroup_attribution.tsv`` (limbic, cerebellum, ...)
- a JSON sidecar beside each, and ``OUTPUT_DIR/sub-<label>.html`` with figures in ``sub-<label>/figures/``.

The run's ``..._desc-<m>_embedding.json`` is written last and lists every output: a run whose sidecar
exists with all its outputs is complete and skipped (unless ``--overwrite``); anything else is redone.
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import torch

from bidsapp import __version__
from bidsapp.atlas import Atlas, load_atlas
from bidsapp.bids.derivatives import DerivativesWriter, parse_filename
from bidsapp.bids.layout import BoldRun, discover_runs
from bidsapp.bids.validation import validate_input
from bidsapp.config import Config
from bidsapp.data import prepare_runs
from bidsapp.errors import BadDataError, UsageError
from bidsapp.inference import LoadedModel, RunAttribution, analyse_run, find_model, load_model
from bidsapp.inference import __doc__ as ATTRIBUTION_METHOD
from bidsapp.io import remove_temporaries
from bidsapp.logs import get_logger
from bidsapp.preprocess import CachedRun
from bidsapp.runtime import seed_everything

log = get_logger("participant")

#: Non-standard suffixes this level writes (kept out of the BIDS validator's way).
# Directories without a trailing slash: bids-validator-deno does not match "dir/" patterns.
BIDSIGNORE = ["*_embedding.tsv", "*_embedding.json", "*_boldmap.nii.gz", "*_boldmap.json",
              "*_attribution.tsv", "*_attribution.json", "sub-*/figures", "sub-*.html",
              "models", "group", "group.html", "logs"]


def _atlas_label(atlas: Atlas) -> str:
    return "".join(ch for ch in atlas.name if ch.isalnum())


class RunOutputs:
    """The paths of one run's outputs (``run``: the input run, or its entities)."""

    def __init__(self, writer: DerivativesWriter, run: BoldRun | Mapping[str, str], desc: str,
                 atlas_label: str):
        entities = run if isinstance(run, Mapping) else run.entities

        def path(suffix: str, extension: str, **extra: str) -> Path:
            return writer.path_for(entities, suffix=suffix, extension=extension, **extra)

        self.embedding = path("embedding", ".tsv", desc=desc)
        self.mean_embedding = path("embedding", ".tsv", desc=desc, stat="mean")
        self.occluded = path("embedding", ".tsv", atlas=atlas_label, desc=desc, stat="occluded")
        self.recon_map = path("boldmap", ".nii.gz", atlas=atlas_label, stat="reconerror", desc=desc)
        self.occlusion_map = path("boldmap", ".nii.gz", atlas=atlas_label, stat="occlusion",
                                  desc=desc)
        self.table = path("attribution", ".tsv", atlas=atlas_label, desc=desc)
        self.groups = path("attribution", ".tsv", atlas=atlas_label, desc=desc, stat="bygroup")
        self.done = self.embedding.with_suffix(".json")

    def data_files(self, attribution: bool) -> list[Path]:
        files = [self.embedding, self.mean_embedding]
        if attribution:
            files += [self.occluded, self.recon_map, self.occlusion_map, self.table, self.groups]
        return files

    def completion(self) -> dict | None:
        """The completion sidecar if the run is complete (by whichever model), else ``None``.

        Complete: the sidecar (written last) parses and every data file it implies exists. The
        one test of completeness, for skipping runs, the reports and the group level.
        """
        try:
            meta = json.loads(self.done.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            return None
        if not isinstance(meta, dict) or not isinstance(meta.get("Model"), dict):
            return None
        attribution = meta.get("Attribution") is not None
        return meta if all(p.is_file() for p in self.data_files(attribution)) else None

    def is_complete(self, attribution: bool, model_sha256: str) -> bool:
        meta = self.completion()
        if meta is None:
            return False
        same_model = meta["Model"].get("SHA256") == model_sha256
        return same_model and (meta.get("Attribution") is not None or not attribution)


def complete_runs(writer: DerivativesWriter, subject: str,
                  atlas_label: str) -> list[tuple[str, str, RunOutputs, dict]]:
    """Every complete run of ``subject`` in OUTPUT_DIR, whichever model and job wrote it.

    Returns ``(run name, desc, outputs, completion sidecar)`` sorted by desc and run: what the
    participant report shows, so that it never loses the runs of another model or job.
    """
    folder = writer.output_dir / f"sub-{subject}"
    found = []
    for done in sorted(folder.rglob("*_embedding.json")) if folder.is_dir() else []:
        try:
            entities, _, _ = parse_filename(done.name)
        except UsageError:
            continue
        desc = entities.pop("desc", None)
        if desc is None or "stat" in entities or "atlas" in entities:
            continue   # not a completion sidecar (the run embedding's own sidecar, say)
        out = RunOutputs(writer, entities, desc, atlas_label)
        meta = out.completion() if out.done == done else None
        if meta is not None:
            name = "_".join(f"{key}-{value}" for key, value in entities.items())
            found.append((name, desc, out, meta))
    return sorted(found, key=lambda item: (item[1], item[0]))


def region_table(atlas: Atlas, loaded: LoadedModel, result: RunAttribution,
                 voxels: np.ndarray) -> pd.DataFrame:
    """One row per region: identity, size, and each attribution measure."""
    table = atlas.table().copy()
    labels = loaded.region_grid.token_labels.flatten()
    tokens = torch.bincount(labels[labels >= 0], minlength=len(atlas.regions)).cpu().numpy()
    table["voxels"] = voxels
    table["tokens"] = tokens
    table["reconerror"] = result.recon_error
    table["reconerror_se"] = result.recon_error_se
    table["occlusion"] = result.occlusion
    table["note"] = np.where(result.eligible, "n/a",
                             "owns no token of the model grid: cannot be hidden")
    return table


def group_summary(table: pd.DataFrame, measures: tuple[str, ...]) -> pd.DataFrame:
    """Mean of each measure over the regions of each group (regions without a value left out)."""
    grouped = table.groupby("group", sort=True)
    summary = grouped[list(measures)].mean()
    summary.insert(0, "regions", grouped.size())
    summary.insert(1, "regions_with_values", grouped[measures[0]].count())
    return summary.reset_index()


def region_map(values: np.ndarray, contiguous: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A 3D float32 map where every voxel of region r carries ``values[r]`` (0 outside regions)."""
    lookup = np.concatenate([values.astype(np.float32), [0.0]])   # index -1 -> 0 (background)
    data = lookup[contiguous]
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_xyzt_units("mm")
    return img


def _embedding_frame(rows: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=[f"e{i:03d}" for i in range(rows.shape[1])])


def check_finite_embeddings(result: RunAttribution, run: BoldRun, loaded: LoadedModel) -> None:
    """Refuse (65) a run whose embeddings hold NaN or infinities, before anything is written.

    Finite input and finite weights can still overflow in a model whose training went astray;
    such embeddings would only surface as an obscure error at the group level.
    """
    if not np.isfinite(result.window_embeddings).all():
        raise BadDataError(f"model {loaded.path} gives non-finite embeddings for {run.name} (an "
                           "unstable or diverged model); pretrain again with a lower --lr")


def write_run(writer: DerivativesWriter, out: RunOutputs, run: BoldRun, cached: CachedRun,
              atlas: Atlas, loaded: LoadedModel, result: RunAttribution,
              config: Config) -> None:
    """Write one run's outputs (each atomically; the completion sidecar last)."""
    tr = cached.repetition_time
    model_info = {"Path": writer.bids_uri(loaded.path), "SHA256": loaded.sha256,
                  "Preset": loaded.preset.name, "Masking": loaded.masking,
                  "Backbone": loaded.meta.get("backbone"), "Epoch": loaded.meta.get("epoch")}
    sources = [run.source_uri, writer.bids_uri(run.mask)]
    frames = loaded.window_frames
    windows = _embedding_frame(result.window_embeddings)
    windows.insert(0, "onset", np.arange(len(windows)) * frames * tr)
    windows.insert(0, "window", np.arange(len(windows)))
    writer.write_tsv(out.embedding, windows)
    writer.write_tsv(out.mean_embedding, _embedding_frame(result.embedding[None]))
    writer.write_sidecar(out.mean_embedding, {
        "Description": "Run embedding: mean of the window embeddings", "Sources": sources,
        "Model": model_info})
    meta: dict = {
        "Description": "Window embeddings of the pretrained roimae encoder (no masking)",
        "Sources": sources, "Model": model_info, "RepetitionTime": tr,
        "WindowFrames": frames, "NumberOfWindows": len(windows),
        "FramesUsed": len(windows) * frames, "FramesInRun": cached.n_frames,
        "SoftwareVersion": __version__, "Attribution": None,
    }
    if result.recon_error is not None:
        grid = nib.load(run.bold)
        shape, affine = grid.shape[:3], grid.affine
        contiguous = atlas.contiguous(atlas.resample_to(shape, affine))
        voxels = np.bincount(contiguous[contiguous >= 0].ravel(), minlength=len(atlas.regions))
        table = region_table(atlas, loaded, result, voxels)
        occluded = _embedding_frame(result.occluded_embeddings)
        occluded.insert(0, "name", table["name"])
        occluded.insert(0, "index", table["index"])
        writer.write_tsv(out.occluded, occluded)
        for path, column, text in (
            (out.recon_map, "reconerror", "Masked reconstruction error of each region (MSE of "
             "z-scored signal over its hidden brain voxels); lower = reconstructed better"),
            (out.occlusion_map, "occlusion", "Representation sensitivity of each region: 1 - "
             "cosine(run embedding, run embedding with the region hidden)"),
        ):
            writer.write_nifti(path, region_map(table[column].to_numpy(), contiguous, affine))
            writer.write_sidecar(path, {"Description": text, "Sources": sources,
                                        "Atlas": atlas.name, "Model": model_info,
                                        "NaNMeans": "the region owns no token of the model grid"})
        writer.write_tsv(out.table, table)
        writer.write_tsv(out.groups, group_summary(table, ("reconerror", "occlusion")))
        meta["Attribution"] = {
            "Method": " ".join(ATTRIBUTION_METHOD.split()), "Subsets": config.participant.
            attribution_subsets, "Atlas": atlas.name, "Regions": len(atlas.regions),
            "RegionsWithoutToken": int((~result.eligible).sum()),
        }
    writer.write_sidecar(out.embedding, meta)   # last: marks the run complete


def run_participant(config: Config, device: torch.device) -> None:
    """Embed and attribute every selected run, one participant after the other."""
    atlas = load_atlas(config.atlas, config.atlas_labels)
    model_path = find_model(config)
    loaded = load_model(model_path, atlas, config, device)
    log.info("model %s (%s preset, %s masking, epoch %s)", model_path, loaded.preset.name,
             loaded.masking, loaded.meta.get("epoch"))
    dataset = discover_runs(config)
    validate_input(config, dataset)
    writer = DerivativesWriter(config.output_dir, source_datasets=dataset.datasets)
    writer.ensure_dataset_description()
    writer.ensure_bidsignore(BIDSIGNORE)
    attribution = config.participant.attribution
    label = _atlas_label(atlas)
    todo: list[tuple[BoldRun, RunOutputs]] = []
    for run in dataset.runs:
        out = RunOutputs(writer, run, loaded.desc, label)
        if not config.participant.overwrite and out.is_complete(attribution, loaded.sha256):
            log.info("%s: complete, skipped (use --overwrite to redo)", run.name)
        else:
            # A job killed while writing this run left temporary files: they are redone now.
            for path in out.data_files(attribution=True):
                for tmp in remove_temporaries(path):
                    log.info("%s: removed %s, left by an interrupted job", run.name, tmp.name)
            todo.append((run, out))
    cached = prepare_runs(config, [run for run, _ in todo], loaded.window_frames)
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
        write_run(writer, out, run, cache, atlas, loaded, result, config)
        log.info("[%d/%d] %s: %d windows%s in %.1f s", i, len(todo), run.name, cache.n_windows,
                 " + attribution" if attribution else "", time.perf_counter() - t0)
        by_subject[run.subject].append((run, out, result))
    if config.participant.reports:
        from bidsapp.reports import report_lock, write_participant_report

        # Every selected participant, also when all its runs were complete and skipped; each
        # report shows every complete run on disk (all models, all jobs). The lock keeps two
        # jobs of one participant (two models, say) from writing it at once, the later one
        # seeing the earlier one's runs.
        for subject in dict.fromkeys(run.subject for run in dataset.runs):
            examples = {f"{run.name}_desc-{loaded.desc}": result.example
                        for run, _, result in by_subject.get(subject, []) if result.example}
            with report_lock(config.output_dir, subject):
                runs = complete_runs(writer, subject, label)
                report = write_participant_report(config.output_dir, subject, runs, atlas,
                                                  examples)
            log.info("report: %s (%d runs)", report, len(runs))
