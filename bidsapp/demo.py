"""A synthetic fMRIPrep-style derivatives dataset with planted, documented regional effects.

:func:`make_demo_dataset` writes resting-state BOLD runs on the MNI152NLin6Asym 2 mm grid (the grid
of ``AAL3v1_2mm.nii.gz``) that roimae can process and the BIDS validator accepts, and a truth record
(``roimae_demo_truth.json``, listed in ``.bidsignore``) of everything planted.

The signal model is :data:`SIGNAL_MODEL` (a constant, not this docstring, so that the truth
record holds it under ``python -OO`` too).
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
from bidsapp.errors import UsageError
from bidsapp.grid import MNI_2MM_AFFINE, MNI_2MM_SHAPE
from bidsapp.io import atomic_path, atomic_write_text, ensure_dir, json_text
from bidsapp.logs import get_logger

__all__ = ["ADHD_AMPLITUDE", "ADHD_REGIONS", "ADHD_SHIFT", "COUPLED_REGIONS", "COUPLING", "NETWORKS",
           "NOISE_ONLY", "SIGNAL_MODEL", "make_demo_dataset"]

log = get_logger("demo")

#: The signal model of the demo, written into the truth record as ``signal_model``.
SIGNAL_MODEL = """\
All randomness comes from one ``numpy.random.Generator(seed)``, except that of the coupling effect
(below), which comes from a second one, ``Generator([seed, 1])``: adding it left every other label
and voxel as it was. The brain mask is AAL3 > 0, closed and dilated by one voxel, holes filled
(``scipy.ndimage``). Inside it, voxel ``v`` of a participant at frame ``t`` is::

    y[v, t] = gain * scale[site] * b[v] * (1 + shift[v] + a[v] * f[v, t] + d[v] * r[t])
              + sigma[site] * BASELINE * e[v, t]

* ``b``: baseline, ``BASELINE`` (1000) times a smooth spatial profile (``1 + 0.01 * s``, shared by
  all participants like anatomy, and weak so that the fluctuations dominate the z-scored signal);
* ``f``: unit-variance fluctuation, ``sqrt(w) * c[source(v), t] + sqrt(1 - w) * n[v, t]``, where
  ``c`` holds one time course per source and participant and ``n`` is smooth noise;

  - the :data:`NETWORKS` (six sets of bilateral homologous AAL3 regions) each share one course
    with ``w = 0.8``: a masked network region is predictable from its visible partners;
  - :data:`NOISE_ONLY` regions have ``w = 0`` (independent smooth noise of the same variance:
    unpredictable);
  - each of the :data:`COUPLED_REGIONS` (five bilateral cortical pairs, ten regions) follows a
    course of its own with ``w = 0.8``, which depends on the participant's ``coupling`` label
    (the coupling effect below);
  - every other voxel (other regions, in-mask background) follows a global course with ``w = 0.3``;

* temporal structure: courses and lattice noise are AR(1) processes with coefficients
  ``exp(-TR / 6 s)`` (courses) and ``exp(-TR / 3 s)`` (noise), not white, each standardized over
  the run (mean 0, SD 1): a voxel's run mean is exactly ``b * (1 + shift)`` and amplitudes exact;
* spatial structure: ``n`` and ``s`` are white noise on a 6 mm lattice interpolated trilinearly
  (a triangle kernel, FWHM 6 mm) and rescaled to unit variance at every voxel;
* ``a``: fluctuation amplitude, 2 % of baseline; ``d * r``: a slow linear drift (``r`` runs from
  -0.5 to 0.5 over the run, ``d`` a smooth field with SD 0.5 %);
* ADHD effect: in the :data:`ADHD_REGIONS` of participants with diagnosis ``adhd`` the amplitude
  ``a`` is multiplied by :data:`ADHD_AMPLITUDE` (1.5) and the baseline shifted by
  ``shift = ADHD_SHIFT`` (+1 %); ``shift = 0`` elsewhere and in controls;
* coupling effect, a covariance-only group difference: each participant has a second label,
  ``coupling`` (``coupled`` or ``uncoupled``), balanced within every diagnosis x site cell (as far
  as the cell sizes allow), hence independent of both by design. In ``uncoupled`` participants the
  courses of the ten :data:`COUPLED_REGIONS` are independent of each other and of every other
  course; in ``coupled`` participants each is ``sqrt(COUPLING) * g + sqrt(1 - COUPLING) * own``,
  standardized again, where ``g`` is the participant's global course (the one the background
  follows). Any two of the ten courses then correlate by :data:`COUPLING` (0.7) in expectation
  (their region means by about as much), and each correlates with the background's course by
  ``sqrt(COUPLING)``: the effect reaches the ten regions' connectivity with each other and with
  the ~90 background regions, so whole-brain connectivity shows it. Every voxel keeps its mean and
  its fluctuation amplitude (each course has run mean 0 and SD 1 in both groups): only covariance
  differs, which a mean over tokens and frames cannot see;
* site and participant: a global ``scale`` per site (1.0, 1.15), a thermal white noise ``e`` of SD
  ``sigma`` (0.3 %, 0.6 % of ``BASELINE``) per site, and a participant ``gain`` ~ N(1, 0.03).

Values are stored as int16 with ``scl_slope`` 0.5 (as fMRIPrep's int16 outputs carry a slope);
voxels outside the mask are 0.
"""

TASK = "rest"
SPACE = "MNI152NLin6Asym"
RES = "2"
TRUTH_FILE = "roimae_demo_truth.json"

BASELINE = 1000.0
PROFILE_SD = 0.01
FLUCTUATION = 0.02
DRIFT_SD = 0.005
NETWORK_WEIGHT = 0.8
OTHER_WEIGHT = 0.3
COURSE_TAU_S = 6.0
NOISE_TAU_S = 3.0
LATTICE_VOXELS = 3  # 6 mm lattice for smooth fields
GAIN_SD = 0.03
SITES = {"siteA": {"scale": 1.0, "thermal_noise": 0.003},
         "siteB": {"scale": 1.15, "thermal_noise": 0.006}}
DIAGNOSES = ("control", "adhd")
SCL_SLOPE = 0.5

ADHD_AMPLITUDE = 1.5
ADHD_SHIFT = 0.01
COUPLINGS = ("uncoupled", "coupled")
#: In ``coupled`` participants: the variance share of the global course in a coupled region's
#: course, hence the expected correlation between the courses of two coupled regions.
COUPLING = 0.7
#: Variance share of a coupled region's course (the networks' share: region means follow it).
COUPLING_WEIGHT = NETWORK_WEIGHT


def _bilateral(*stems: str) -> tuple[str, ...]:
    return tuple(f"{stem}_{side}" for stem in stems for side in ("L", "R"))


#: Regions sharing one strong time course per participant.
NETWORKS: dict[str, tuple[str, ...]] = {
    "default_mode": _bilateral("Cingulate_Post", "Precuneus", "Angular", "Frontal_Sup_Medial"),
    "visual": _bilateral("Calcarine", "Cuneus", "Lingual", "Occipital_Sup"),
    "sensorimotor": _bilateral("Precentral", "Postcentral", "Supp_Motor_Area",
                               "Paracentral_Lobule"),
    "auditory": _bilateral("Heschl", "Temporal_Sup", "Rolandic_Oper"),
    "limbic": _bilateral("Hippocampus", "ParaHippocampal", "Amygdala"),
    "cerebellar": _bilateral("Cerebelum_Crus1", "Cerebelum_Crus2", "Cerebelum_6"),
}
#: Regions carrying only independent smooth noise (spread over the lobes).
NOISE_ONLY: tuple[str, ...] = _bilateral(
    "Frontal_Inf_Tri", "Frontal_Inf_Orb_2", "OFClat", "Temporal_Inf", "Temporal_Pole_Mid",
    "SupraMarginal", "Occipital_Inf", "Putamen", "Cerebelum_7b", "Cerebelum_8",
)
#: Regions where ``adhd`` participants differ (limbic and cerebellar, as in Doodipala et al.).
ADHD_REGIONS: tuple[str, ...] = _bilateral("Hippocampus", "Amygdala", "Cerebelum_Crus1")
#: Regions whose courses correlate in ``coupled`` participants only: large cortical regions outside
#: the networks, noise-only and ADHD regions, each owning at least 8 tokens of the ``tiny`` grid.
COUPLED_REGIONS: tuple[str, ...] = _bilateral(
    "Frontal_Sup_2", "Frontal_Mid_2", "Parietal_Sup", "Temporal_Mid", "Occipital_Mid",
)


@dataclass(frozen=True)
class _Layout:
    """What every participant shares: the mask and per-voxel model terms (V brain voxels)."""

    mask: np.ndarray        # (X, Y, Z) bool brain mask
    voxels: np.ndarray      # (V,) Fortran-order flat indices of the mask voxels
    source: np.ndarray      # (V,) int: 0 global course, k = 1..6 network k, 7 + j coupled region j
    weight: np.ndarray      # (V,) float32 variance share of the source course (w)
    planted: np.ndarray     # (V,) bool: voxel of an ADHD region
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
        Seed of the random generators (the main one and the coupling effect's).
    repetition_time : float
        TR in seconds.
    atlas : Atlas, optional
        An AAL3 atlas (default: :func:`bidsapp.atlas.load_atlas`); it must name every region
        of :data:`NETWORKS`, :data:`NOISE_ONLY`, :data:`ADHD_REGIONS` and :data:`COUPLED_REGIONS`.

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
    # A second stream for the coupling effect: the first one draws exactly what it drew before.
    coupling_rng = np.random.default_rng([seed, 1])
    labels = atlas.resample_to(MNI_2MM_SHAPE, MNI_2MM_AFFINE)  # (91, 109, 91) label values
    layout = _layout(rng, atlas, labels)
    participants = _participants(rng, n_participants)
    participants["coupling"] = _coupling(coupling_rng, participants)
    truth = _truth(atlas, seed, n_frames, repetition_time, participants)
    for row in participants.itertuples():
        bold = _participant_bold(rng, coupling_rng, layout, row.diagnosis, row.coupling,
                                 SITES[row.site], row.gain, n_frames, repetition_time)
        _write_run(out_dir, row.participant_id, layout, bold, repetition_time)
        log.debug("demo: wrote %s (%s, %s, %s)", row.participant_id, row.diagnosis, row.coupling,
                  row.site)
    _write_metadata(out_dir, participants.drop(columns="gain"), truth)
    return truth


def _region_indices(atlas: Atlas, names: tuple[str, ...]) -> list[int]:
    index_of = {region.name: region.index for region in atlas.regions}
    missing = [name for name in names if name not in index_of]
    if missing:
        raise UsageError(f"the demo needs an AAL3 atlas; atlas {atlas.name} lacks {missing}")
    return [index_of[name] for name in names]


def _brain_mask(labels: np.ndarray) -> np.ndarray:
    """AAL3 > 0, closed, dilated by one voxel and hole-filled: the shape of a brain mask."""
    structure = ndimage.generate_binary_structure(3, 1)
    mask = ndimage.binary_closing(labels > 0, structure)
    return ndimage.binary_fill_holes(ndimage.binary_dilation(mask, structure))


def _lattice_upsampler(shape: tuple[int, ...], voxels: np.ndarray,
                       step: int) -> sparse.csr_matrix:
    """Trilinear interpolation from a ``step``-voxel lattice to the given voxels.

    Each row is divided by its norm, so white unit-variance lattice noise becomes unit-variance
    voxel noise everywhere (a node and a point between nodes alike).
    """
    voxels = np.column_stack(np.unravel_index(voxels, shape, order="F"))  # (V, 3)
    lattice_shape = tuple(int(n) // step + 2 for n in shape)
    position = voxels / step
    base = np.floor(position).astype(np.int64)
    frac = position - base
    rows, cols, vals = [], [], []
    for corner in np.ndindex(2, 2, 2):
        offset = np.array(corner)
        weight = np.prod(np.where(offset == 1, frac, 1 - frac), axis=1)  # (V,)
        rows.append(np.arange(len(voxels)))
        cols.append(np.ravel_multi_index((base + offset).T, lattice_shape))
        vals.append(weight)
    matrix = sparse.csr_matrix(
        (np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
        shape=(len(voxels), int(np.prod(lattice_shape))),
    )
    norms = np.sqrt(matrix.multiply(matrix).sum(axis=1)).A1
    return sparse.csr_matrix(sparse.diags(1 / norms) @ matrix, dtype=np.float32)


def _layout(rng: np.random.Generator, atlas: Atlas, labels: np.ndarray) -> _Layout:
    mask = _brain_mask(labels)
    # Fortran order, NIfTI's: a run is then written without transposing the volume.
    voxels = np.flatnonzero(mask.ravel(order="F"))
    voxel_labels = labels.ravel(order="F")[voxels]  # (V,)
    source = np.zeros(voxel_labels.shape, dtype=np.int64)
    weight = np.full(voxel_labels.shape, OTHER_WEIGHT, dtype=np.float32)
    for k, names in enumerate(NETWORKS.values(), start=1):
        in_network = np.isin(voxel_labels, _region_indices(atlas, names))
        source[in_network] = k
        weight[in_network] = NETWORK_WEIGHT
    weight[np.isin(voxel_labels, _region_indices(atlas, NOISE_ONLY))] = 0.0
    for j, index in enumerate(_region_indices(atlas, COUPLED_REGIONS)):
        coupled = voxel_labels == index
        source[coupled] = len(NETWORKS) + 1 + j
        weight[coupled] = COUPLING_WEIGHT
    planted = np.isin(voxel_labels, _region_indices(atlas, ADHD_REGIONS))
    upsample = _lattice_upsampler(mask.shape, voxels, LATTICE_VOXELS)
    profile = upsample @ rng.standard_normal(upsample.shape[1], dtype=np.float32)
    drift = upsample @ rng.standard_normal(upsample.shape[1], dtype=np.float32)
    return _Layout(mask=mask, voxels=voxels, source=source, weight=weight, planted=planted,
                   upsample=upsample, baseline=BASELINE * (1 + PROFILE_SD * profile),
                   drift=DRIFT_SD * drift)


def _participants(rng: np.random.Generator, n: int) -> pd.DataFrame:
    """Balanced diagnoses and sites (each site gets both diagnoses), shuffled."""
    cells = [(DIAGNOSES[i % 2], list(SITES)[(i // 2) % 2]) for i in range(n)]
    order = rng.permutation(n)
    width = max(2, len(str(n)))
    return pd.DataFrame({
        "participant_id": [f"sub-{i + 1:0{width}d}" for i in range(n)],
        "diagnosis": [cells[j][0] for j in order],
        "age": rng.integers(7, 18, size=n),
        "sex": rng.choice(["M", "F"], size=n),
        "site": [cells[j][1] for j in order],
        "gain": np.round(1 + GAIN_SD * rng.standard_normal(n), 4),
    })


def _coupling(rng: np.random.Generator, participants: pd.DataFrame) -> list[str]:
    """Balanced ``coupling`` labels, balanced within every diagnosis x site cell where sizes allow.

    The participants are walked cell by cell (members shuffled), alternating the two labels from a
    random first one. The cells are visited so that consecutive cells share a diagnosis or a site
    (control/A, control/B, adhd/B, adhd/A): with one participant per cell, the two coupled
    participants then differ in diagnosis and in site instead of sharing one of them.
    """
    sites = list(SITES)
    cells = [(DIAGNOSES[0], sites[0]), (DIAGNOSES[0], sites[1]),
             (DIAGNOSES[1], sites[1]), (DIAGNOSES[1], sites[0])]
    order = np.concatenate([
        rng.permutation(np.flatnonzero((participants["diagnosis"] == diagnosis).to_numpy()
                                       & (participants["site"] == site).to_numpy()))
        for diagnosis, site in cells
    ])
    first = int(rng.integers(2))
    labels = [""] * len(participants)
    for position, i in enumerate(order):
        labels[i] = COUPLINGS[(first + position) % 2]
    return labels


def _ar1(rng: np.random.Generator, n: int, n_frames: int, phi: float) -> np.ndarray:
    """(n, n_frames) float32 AR(1) series, each standardized over the run (mean 0, SD 1)."""
    series = rng.standard_normal((n, n_frames), dtype=np.float32)  # innovations, then in place
    scale = np.float32(np.sqrt(1 - phi**2))
    for t in range(1, n_frames):
        series[:, t] = phi * series[:, t - 1] + scale * series[:, t]
    # Zero run mean makes a voxel's run mean exactly its baseline; unit SD makes amplitudes exact.
    series -= series.mean(axis=1, keepdims=True)
    series /= series.std(axis=1, keepdims=True)
    return series


def _coupled_courses(rng: np.random.Generator, coupling: str, global_course: np.ndarray,
                     phi: float) -> np.ndarray:
    """(len(COUPLED_REGIONS), T) courses: independent, or sharing the global course if ``coupled``.

    Both groups draw the same numbers (one course per region), so the stream does not depend on
    the labels, and every course is standardized: only the covariance differs.

    Parameters
    ----------
    rng : numpy.random.Generator
        The coupling effect's generator.
    coupling : str
        ``coupled`` or ``uncoupled``.
    global_course : ndarray, shape (1, T)
        The participant's global course (standardized), shared with the background.
    phi : float
        AR(1) coefficient of the courses.
    """
    own = _ar1(rng, len(COUPLED_REGIONS), global_course.shape[1], phi)
    if coupling == "uncoupled":
        return own
    mixed = np.sqrt(COUPLING, dtype=np.float32) * global_course + np.sqrt(1 - COUPLING,
                                                                          dtype=np.float32) * own
    # The sample correlation of g and own is not exactly 0: restore run mean 0, SD 1.
    mixed -= mixed.mean(axis=1, keepdims=True)
    mixed /= mixed.std(axis=1, keepdims=True)
    return mixed


def _participant_bold(rng: np.random.Generator, coupling_rng: np.random.Generator,
                      layout: _Layout, diagnosis: str, coupling: str, site: dict[str, float],
                      gain: float, n_frames: int, repetition_time: float) -> np.ndarray:
    """(V, T) float32 BOLD of one participant's brain voxels (the model of :data:`SIGNAL_MODEL`).

    The per-voxel factors are folded into (V,) coefficients first, so the (V, T) arrays are
    touched by few in-place operations: this is most of the demo's run time.
    """
    phi = np.exp(-repetition_time / COURSE_TAU_S)
    courses = _ar1(rng, len(NETWORKS) + 1, n_frames, phi)  # global course, then the networks'
    courses = np.concatenate([courses, _coupled_courses(coupling_rng, coupling, courses[:1], phi)])
    lattice_noise = _ar1(rng, layout.upsample.shape[1], n_frames,
                         np.exp(-repetition_time / NOISE_TAU_S))
    planted = layout.planted & (diagnosis == "adhd")
    scaled = (gain * site["scale"]) * layout.baseline  # (V,) g * scale * b
    amplitude = scaled * np.where(planted, FLUCTUATION * ADHD_AMPLITUDE, FLUCTUATION)
    bold = layout.upsample @ lattice_noise  # (V, T) smooth noise n
    bold *= (amplitude * np.sqrt(1 - layout.weight))[:, None]
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


def _region_records(atlas: Atlas, names: tuple[str, ...]) -> list[dict[str, Any]]:
    return [{"name": n, "index": i} for n, i in zip(names, _region_indices(atlas, names),
                                                     strict=True)]


def _truth(atlas: Atlas, seed: int, n_frames: int, repetition_time: float,
           participants: pd.DataFrame) -> dict[str, Any]:
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
            "regions": _region_records(atlas, ADHD_REGIONS),
            "amplitude_factor": ADHD_AMPLITUDE,
            "baseline_shift": ADHD_SHIFT,
        },
        "networks": {net: _region_records(atlas, names) for net, names in NETWORKS.items()},
        "noise_only": _region_records(atlas, NOISE_ONLY),
        "coupling_effect": {
            "label_column": "coupling",
            "levels": {"coupled": "the regions' courses share the global course",
                       "uncoupled": "the regions' courses are independent of every other course"},
            "regions": _region_records(atlas, COUPLED_REGIONS),
            "course_correlation": COUPLING,
            "course_weight": COUPLING_WEIGHT,
            "independent_of": ["diagnosis", "site"],
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
    }
    readme = (
        "# roimae synthetic demo dataset\n\n"
        "Synthetic resting-state BOLD runs written as fMRIPrep derivatives on the MNI152NLin6Asym\n"
        "2 mm grid by `roimae demo` (bidsapp.demo). No real participant is involved.\n\n"
        "Networks of AAL3 regions share time courses, some regions carry noise only, and the\n"
        "`adhd` participants carry a planted effect in a few limbic and cerebellar regions; in\n"
        "`coupled` participants (a second, independent label) ten cortical regions share the\n"
        "brain-wide course, which they do not in `uncoupled` ones (a change of covariance only).\n"
        f"Everything planted is listed in `{TRUTH_FILE}`; the model is described there and in\n"
        "SIGNAL_MODEL of bidsapp/demo.py.\n"
    )
    atomic_write_text(out_dir / "dataset_description.json", _json(description))
    atomic_write_text(out_dir / "README", readme)
    atomic_write_text(out_dir / ".bidsignore", f"{TRUTH_FILE}\n")
    atomic_write_text(out_dir / "participants.tsv",
                      participants.to_csv(sep="\t", index=False, lineterminator="\n"))
    atomic_write_text(out_dir / "participants.json", _json(columns))
    atomic_write_text(out_dir / TRUTH_FILE, _json(truth))
