"""A synthetic fMRIPrep-style derivatives dataset with planted, documented regional effects.

:func:`make_demo_dataset` writes resting-state BOLD runs on the MNI152NLin6Asym 2 mm grid (the grid
of ``AAL3v1_2mm.nii.gz``) that roimae can process and the BIDS validator accepts, and a truth record
(``roimae_demo_truth.json``, listed in ``.bidsignore``) of everything planted.

The signal model is :data:`~bidsapp.demo.signal.SIGNAL_MODEL` (:mod:`bidsapp.demo.signal`, with
the constants and random courses it names); this module lays it out on the grid and writes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pandas as pd
from scipy import ndimage, sparse

from bidsapp._version import __version__
from bidsapp.atlas import Atlas, load_atlas
from bidsapp.demo.signal import (
    ADHD_AMPLITUDE,
    ADHD_REGIONS,
    ADHD_SHIFT,
    BASELINE,
    COUPLED_REGIONS,
    COUPLING,
    COUPLING_WEIGHT,
    COURSE_TAU_S,
    DRIFT_SD,
    FLUCTUATION,
    LATTICE_VOXELS,
    NETWORK_WEIGHT,
    NETWORKS,
    NOISE_ONLY,
    NOISE_TAU_S,
    OTHER_WEIGHT,
    PROFILE_SD,
    SCL_SLOPE,
    SIGNAL_MODEL,
    SITES,
    SPLIT_CELL_EDGE,
    SPLIT_REGIONS,
    SPLIT_SHARE,
    SPLIT_TOKEN_EDGE,
    ar1,
    coupled_courses,
    draw_coupling,
    draw_participants,
    lattice_upsampler,
    region_indices,
    region_records,
)
from bidsapp.demo.subregional import (
    Split,
    SplitRows,
    draw_subregional,
    plant_split,
    split_halves,
    split_records,
    split_rows,
)
from bidsapp.errors import UsageError
from bidsapp.grid import MNI_2MM_AFFINE, MNI_2MM_SHAPE
from bidsapp.io import atomic_path, atomic_write_text, ensure_dir, json_text
from bidsapp.logs import get_logger

__all__ = ["ADHD_AMPLITUDE", "ADHD_REGIONS", "ADHD_SHIFT", "COUPLED_REGIONS", "COUPLING", "NETWORKS",
           "NOISE_ONLY", "SIGNAL_MODEL", "SPLIT_REGIONS", "SPLIT_SHARE", "Split", "make_demo_dataset",
           "split_halves"]

log = get_logger("demo")

TASK = "rest"
SPACE = "MNI152NLin6Asym"
RES = "2"
TRUTH_FILE = "roimae_demo_truth.json"


@dataclass(frozen=True)
class _Layout:
    """What every participant shares: the mask and per-voxel model terms (V brain voxels)."""

    mask: np.ndarray        # (X, Y, Z) bool brain mask
    voxels: np.ndarray      # (V,) Fortran-order flat indices of the mask voxels
    source: np.ndarray      # (V,) int: 0 global course, k = 1..6 network k, 7 + j coupled region j
    weight: np.ndarray      # (V,) float32 variance share of the source course (w)
    planted: np.ndarray     # (V,) bool: voxel of an ADHD region
    split_rows: tuple[SplitRows, ...]  # one per SPLIT_REGIONS region
    upsample: sparse.csr_matrix  # (V, L) lattice -> voxel, rows scaled to unit output variance
    baseline: np.ndarray    # (V,) float32 b
    drift: np.ndarray       # (V,) float32 d


def make_demo_dataset(out_dir: Path, *, n_participants: int = 24, n_frames: int = 60,
                      seed: int = 0, repetition_time: float = 2.0,
                      atlas: Atlas | None = None) -> dict[str, Any]:
    """Write the synthetic demo dataset (signal model: :data:`SIGNAL_MODEL`).

    Parameters
    ----------
    out_dir : Path
        Dataset root; created if needed, files already there are overwritten.
    n_participants : int
        At least 4; diagnoses are balanced and each site gets both.
    n_frames : int
        Frames per run (at least 2).
    seed : int
        Seed of the random generators (the main one, the coupling effect's and the subregional
        effect's).
    repetition_time : float
        TR in seconds.
    atlas : Atlas, optional
        An AAL3 atlas (default: :func:`bidsapp.atlas.load_atlas`); it must name every region
        of :data:`NETWORKS`, :data:`NOISE_ONLY`, :data:`ADHD_REGIONS`, :data:`COUPLED_REGIONS`
        and :data:`SPLIT_REGIONS`.

    Returns
    -------
    dict
        The truth record, also written to ``roimae_demo_truth.json``.

    Notes
    -----
    The default 24 participants x 60 frames take about 25 s on 2 CPU cores, under 0.5 GB of
    memory, and about 0.5 GB of disk.

    Raises
    ------
    UsageError
        Too few participants or frames, a non-positive TR, or an atlas without the named regions.
    """
    if n_participants < 4:
        raise UsageError("the demo needs at least 4 participants (2 sites x 2 diagnoses)")
    if n_frames < 2:
        raise UsageError("the demo needs at least 2 frames per run")
    if not repetition_time > 0:
        raise UsageError("the repetition time must be positive")
    atlas = atlas if atlas is not None else load_atlas()
    out_dir = ensure_dir(Path(out_dir))
    rng = np.random.default_rng(seed)
    # A stream per later effect: the first one draws exactly what it drew before each was added.
    coupling_rng = np.random.default_rng([seed, 1])
    split_rng = np.random.default_rng([seed, 2])
    labels = atlas.resample_to(MNI_2MM_SHAPE, MNI_2MM_AFFINE)  # (91, 109, 91) label values
    splits = split_halves(atlas, labels)
    layout = _layout(rng, atlas, labels, splits)
    participants = draw_participants(rng, n_participants)
    participants["coupling"] = draw_coupling(coupling_rng, participants)
    participants["subregional"] = draw_subregional(split_rng, participants)
    truth = _truth(atlas, seed, n_frames, repetition_time, participants, splits, layout)
    for row in participants.itertuples():
        bold = _participant_bold(rng, coupling_rng, split_rng, layout, row, n_frames,
                                 repetition_time)
        _write_run(out_dir, row.participant_id, layout, bold, repetition_time)
        log.debug("demo: wrote %s (%s, %s, %s, %s)", row.participant_id, row.diagnosis,
                  row.coupling, row.subregional, row.site)
    _write_metadata(out_dir, participants.drop(columns="gain"), truth)
    return truth


def _brain_mask(labels: np.ndarray) -> np.ndarray:
    """AAL3 > 0, closed, dilated by one voxel and hole-filled: the shape of a brain mask."""
    structure = ndimage.generate_binary_structure(3, 1)
    mask = ndimage.binary_closing(labels > 0, structure)
    return ndimage.binary_fill_holes(ndimage.binary_dilation(mask, structure))


def _layout(rng: np.random.Generator, atlas: Atlas, labels: np.ndarray,
            splits: list[Split]) -> _Layout:
    mask = _brain_mask(labels)
    # Fortran order, NIfTI's: a run is then written without transposing the volume.
    voxels = np.flatnonzero(mask.ravel(order="F"))
    voxel_labels = labels.ravel(order="F")[voxels]  # (V,)
    source = np.zeros(voxel_labels.shape, dtype=np.int64)
    weight = np.full(voxel_labels.shape, OTHER_WEIGHT, dtype=np.float32)
    for k, names in enumerate(NETWORKS.values(), start=1):
        in_network = np.isin(voxel_labels, region_indices(atlas, names))
        source[in_network] = k
        weight[in_network] = NETWORK_WEIGHT
    weight[np.isin(voxel_labels, region_indices(atlas, NOISE_ONLY))] = 0.0
    for j, index in enumerate(region_indices(atlas, COUPLED_REGIONS)):
        coupled = voxel_labels == index
        source[coupled] = len(NETWORKS) + 1 + j
        weight[coupled] = COUPLING_WEIGHT
    planted = np.isin(voxel_labels, region_indices(atlas, ADHD_REGIONS))
    upsample = lattice_upsampler(mask.shape, voxels, LATTICE_VOXELS)
    profile = upsample @ rng.standard_normal(upsample.shape[1], dtype=np.float32)
    drift = upsample @ rng.standard_normal(upsample.shape[1], dtype=np.float32)
    baseline = BASELINE * (1 + PROFILE_SD * profile)
    return _Layout(mask=mask, voxels=voxels, source=source, weight=weight, planted=planted,
                   split_rows=split_rows(splits, voxels, baseline), upsample=upsample,
                   baseline=baseline, drift=DRIFT_SD * drift)


def _participant_bold(rng: np.random.Generator, coupling_rng: np.random.Generator,
                      split_rng: np.random.Generator, layout: _Layout, participant: Any,
                      n_frames: int, repetition_time: float) -> np.ndarray:
    """(V, T) float32 BOLD of one participant's brain voxels (the model of :data:`SIGNAL_MODEL`).

    The per-voxel factors are folded into (V,) coefficients first, so the (V, T) arrays are
    touched by few in-place operations: this is most of the demo's run time.
    """
    diagnosis, site, gain = participant.diagnosis, SITES[participant.site], participant.gain
    phi = np.exp(-repetition_time / COURSE_TAU_S)
    courses = ar1(rng, len(NETWORKS) + 1, n_frames, phi)  # global course, then the networks'
    courses = np.concatenate([courses, coupled_courses(coupling_rng, participant.coupling,
                                                       courses[:1], phi)])
    # Drawn for every participant: the stream does not depend on the labels.
    split_courses = ar1(split_rng, len(layout.split_rows), n_frames, phi)
    lattice_noise = ar1(rng, layout.upsample.shape[1], n_frames,
                         np.exp(-repetition_time / NOISE_TAU_S))
    planted = layout.planted & (diagnosis == "adhd")
    scaled = (gain * site["scale"]) * layout.baseline  # (V,) g * scale * b
    amplitude = scaled * np.where(planted, FLUCTUATION * ADHD_AMPLITUDE, FLUCTUATION)
    bold = layout.upsample @ lattice_noise  # (V, T) smooth noise n
    noise_scale = amplitude * np.sqrt(1 - layout.weight)  # (V,)
    bold *= noise_scale[:, None]
    if participant.subregional == "split":
        for rows, course in zip(layout.split_rows, split_courses, strict=True):
            plant_split(bold, rows, noise_scale, course)
    bold += (amplitude * np.sqrt(layout.weight))[:, None] * courses[layout.source]
    bold += (scaled * np.where(planted, 1 + ADHD_SHIFT, 1.0))[:, None]
    bold += (scaled * layout.drift)[:, None] * np.linspace(-0.5, 0.5, n_frames, dtype=np.float32)
    thermal = rng.standard_normal(bold.shape, dtype=np.float32)
    thermal *= site["thermal_noise"] * BASELINE
    bold += thermal
    return bold


def _entities(participant_id: str) -> str:
    return f"{participant_id}_task-{TASK}_space-{SPACE}_res-{RES}"


def _write_run(out_dir: Path, participant_id: str, layout: _Layout, bold: np.ndarray,
               repetition_time: float) -> None:
    """Write the (V, T) BOLD series, its brain mask and their sidecars (fMRIPrep names)."""
    func = out_dir / participant_id / "func"
    stem = _entities(participant_id)
    mask = layout.mask
    frames = np.zeros((bold.shape[1], mask.size), dtype=np.int16)  # (T, X*Y*Z), F-order voxels
    frames[:, layout.voxels] = np.rint(bold / SCL_SLOPE).T
    volume = frames.reshape(bold.shape[1], *mask.shape[::-1]).T  # (X, Y, Z, T), F-contiguous
    bold_img = nib.Nifti1Image(volume, MNI_2MM_AFFINE)
    bold_img.header.set_slope_inter(SCL_SLOPE, 0.0)
    bold_img.header.set_xyzt_units("mm", "sec")
    bold_img.header.set_zooms((2.0, 2.0, 2.0, float(repetition_time)))
    mask_img = nib.Nifti1Image(mask.astype(np.uint8), MNI_2MM_AFFINE)
    mask_img.header.set_xyzt_units("mm")
    resolution = "2 mm isotropic, MNI152NLin6Asym 91x109x91 grid"
    for img, name, sidecar in (
        (bold_img, f"{stem}_desc-preproc_bold",
         {"Description": "Synthetic preprocessed BOLD (roimae demo)",
          "RepetitionTime": float(repetition_time), "TaskName": TASK, "SkullStripped": False,
          "Resolution": resolution}),
        (mask_img, f"{stem}_desc-brain_mask",
         {"Description": "Brain mask of the synthetic BOLD", "Type": "Brain",
          "Resolution": resolution,
          "Sources": [f"bids::{participant_id}/func/{stem}_desc-preproc_bold.nii.gz"]}),
    ):
        for code_setter in (img.set_qform, img.set_sform):
            code_setter(MNI_2MM_AFFINE, code="mni")
        with atomic_path(func / f"{name}.nii.gz") as tmp:
            nib.save(img, tmp)
        atomic_write_text(func / f"{name}.json", _json(sidecar))


def _json(data: dict[str, Any]) -> str:
    return json_text(data, indent=2) + "\n"


def _truth(atlas: Atlas, seed: int, n_frames: int, repetition_time: float,
           participants: pd.DataFrame, splits: list[Split], layout: _Layout) -> dict[str, Any]:
    return {
        "seed": seed,
        "n_frames": n_frames,
        "repetition_time": repetition_time,
        "atlas": {"name": atlas.name, "sha256": atlas.sha256()},
        "signal_model": SIGNAL_MODEL.strip(),
        "baseline": BASELINE,
        "baseline_profile_sd": PROFILE_SD,
        "fluctuation_amplitude": FLUCTUATION,
        "drift_sd": DRIFT_SD,
        "ar1_coefficients": {"course": float(np.exp(-repetition_time / COURSE_TAU_S)),
                             "noise": float(np.exp(-repetition_time / NOISE_TAU_S))},
        "smoothing_fwhm_mm": 2.0 * LATTICE_VOXELS,
        "network_weight": NETWORK_WEIGHT,
        "other_weight": OTHER_WEIGHT,
        "adhd_effect": {
            "regions": region_records(atlas, ADHD_REGIONS),
            "amplitude_factor": ADHD_AMPLITUDE,
            "baseline_shift": ADHD_SHIFT,
        },
        "networks": {net: region_records(atlas, names) for net, names in NETWORKS.items()},
        "noise_only": region_records(atlas, NOISE_ONLY),
        "coupling_effect": {
            "label_column": "coupling",
            "levels": {"coupled": "the regions' courses share the global course",
                       "uncoupled": "the regions' courses are independent of every other course"},
            "regions": region_records(atlas, COUPLED_REGIONS),
            "course_correlation": COUPLING,
            "course_weight": COUPLING_WEIGHT,
            "independent_of": ["diagnosis", "site"],
        },
        "subregional_effect": {
            "label_column": "subregional",
            "levels": {"split": "each region's core carries +s in one half and -s in the other, "
                                "its mean time series unchanged",
                       "whole": "no planted structure inside the regions"},
            "regions": split_records(atlas, splits, layout.split_rows),
            "variance_share": SPLIT_SHARE,
            "token_edge_mm": 2.0 * SPLIT_TOKEN_EDGE,
            "core_cell_mm": 2.0 * SPLIT_CELL_EDGE,
            "region_means_unchanged": True,
            "independent_of": ["diagnosis", "site", "coupling"],
        },
        "sites": SITES,
        "participants": json.loads(participants.to_json(orient="records")),
        "scl_slope": SCL_SLOPE,
    }


def _write_metadata(out_dir: Path, participants: pd.DataFrame, truth: dict[str, Any]) -> None:
    description = {
        "Name": "roimae synthetic demo (fMRIPrep-style derivatives)",
        "BIDSVersion": "1.10.0",
        "DatasetType": "derivative",
        "GeneratedBy": [{"Name": "roimae demo", "Version": __version__,
                         "Description": "bidsapp.demo.make_demo_dataset"}],
        "License": "CC0",
    }
    columns = {
        "participant_id": {"Description": "Participant label"},
        "diagnosis": {"Description": "Synthetic group",
                      "Levels": {"control": "no planted effect",
                                 "adhd": "planted effect in the regions of the truth record"}},
        "age": {"Description": "Age at scan (random, unrelated to the signal)", "Units": "year"},
        "sex": {"Description": "Sex (random, unrelated to the signal)",
                "Levels": {"M": "male", "F": "female"}},
        "site": {"Description": "Acquisition site (global scale and thermal noise level)",
                 "Levels": {site: f"scale {p['scale']}, thermal noise {p['thermal_noise']}"
                            for site, p in SITES.items()}},
        "coupling": {"Description": "Second synthetic group, independent of diagnosis and site",
                     "Levels": {"coupled": "planted covariance between the regions of the truth "
                                           "record (no mean or amplitude change)",
                                "uncoupled": "no planted covariance"}},
        "subregional": {"Description": "Third synthetic group, independent of diagnosis, site "
                                       "and coupling",
                        "Levels": {"split": "the regions of the truth record carry opposite "
                                            "courses in two halves (region means unchanged)",
                                   "whole": "no planted structure inside regions"}},
    }
    readme = (
        "# roimae synthetic demo dataset\n\n"
        "Synthetic resting-state BOLD runs written as fMRIPrep derivatives on the MNI152NLin6Asym\n"
        "2 mm grid by `roimae demo` (bidsapp.demo). No real participant is involved.\n\n"
        "Networks of AAL3 regions share time courses, some regions carry noise only, and the\n"
        "`adhd` participants carry a planted effect in a few limbic and cerebellar regions; in\n"
        "`coupled` participants (a second, independent label) ten cortical regions share the\n"
        "brain-wide course, which they do not in `uncoupled` ones (a change of covariance only).\n"
        "In `split` participants (a third label) eight large regions carry opposite courses in two\n"
        "halves, which leaves their mean time series unchanged: structure inside regions only.\n"
        f"Everything planted is listed in `{TRUTH_FILE}`; the model is described there and in\n"
        "SIGNAL_MODEL of bidsapp/demo/signal.py.\n"
    )
    atomic_write_text(out_dir / "dataset_description.json", _json(description))
    atomic_write_text(out_dir / "README", readme)
    atomic_write_text(out_dir / ".bidsignore", f"{TRUTH_FILE}\n")
    atomic_write_text(out_dir / "participants.tsv",
                      participants.to_csv(sep="\t", index=False, lineterminator="\n"))
    atomic_write_text(out_dir / "participants.json", _json(columns))
    atomic_write_text(out_dir / TRUTH_FILE, _json(truth))
