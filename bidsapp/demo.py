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

from bidsapp import __version__
from bidsapp.atlas import Atlas, load_atlas
from bidsapp.errors import UsageError
from bidsapp.grid import (
    CUBE_OFFSET,
    CUBE_SHAPE,
    MNI_2MM_AFFINE,
    MNI_2MM_SHAPE,
    cube_affine,
    to_cube,
)
from bidsapp.io import atomic_path, atomic_write_text, ensure_dir, json_text
from bidsapp.logs import get_logger

__all__ = ["ADHD_AMPLITUDE", "ADHD_REGIONS", "ADHD_SHIFT", "COUPLED_REGIONS", "COUPLING", "NETWORKS",
           "NOISE_ONLY", "SIGNAL_MODEL", "SPLIT_REGIONS", "SPLIT_SHARE", "Split", "make_demo_dataset",
           "split_halves"]

log = get_logger("demo")

#: The signal model of the demo, written into the truth record as ``signal_model``.
SIGNAL_MODEL = """\
All randomness comes from one ``numpy.random.Generator(seed)``, except that of the coupling effect
(below), which comes from a second one, ``Generator([seed, 1])``, and that of the subregional
effect, from a third, ``Generator([seed, 2])``: adding each left every other label and voxel as it
was. The brain mask is AAL3 > 0, closed and dilated by one voxel, holes filled
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
* subregional effect, structure inside regions that region means cannot see: a third label,
  ``subregional`` (``whole`` or ``split``), balanced within every diagnosis x site x coupling cell
  as far as the cell sizes allow (the cells are walked in a Gray-code order), hence independent of
  the other three. Each of the eight :data:`SPLIT_REGIONS` (large regions outside the networks,
  noise-only, ADHD and coupled regions) is cut in two by a plane of the ``tiny`` token grid (16 mm
  tokens of the 96^3 cube): of the planes at multiples of 8 cube voxels along x, y or z, the one
  that halves the region's *core* most evenly (:func:`split_halves`). The core is the region's
  voxels whose 4 mm cell (2 x 2 x 2 cube voxels, a working voxel of ``tiny``) lies wholly in the
  region, so that no neighbouring region shares a cell with it at 4 mm either. In ``split``
  participants, with ``k = SPLIT_SHARE`` (0.8), the own noise ``n`` of the core voxels of half
  ``H`` becomes::

      m_H[t] + sqrt(1 - k * h_H**2) * (n[v, t] - m_H[t]) + sqrt(k) * h_H * s[t]

  where ``m_H`` is the half's baseline-weighted mean noise, ``s`` a course of the region's own
  (AR(1), standardized, drawn for every participant so the stream does not depend on the labels),
  and ``h_A = +min(1, W_B / W_A)``, ``h_B = -min(1, W_A / W_B)`` with ``W_H`` the half's summed
  baseline ``b`` (the smaller half gets ``|h| = 1``, the larger ``|h| <= 1``). The two halves then
  carry ``+s`` and ``-s`` in opposite phase, weighted so that the sum of the change over the
  region's voxels is exactly 0 at every frame: **the region's mean time series is unchanged** (at 2
  mm, and at 4 mm, where every cell of the core is wholly the region's), as are every voxel's mean
  and, in expectation, its variance (up to a factor ``1 + k * h_H**2 * var(m_H)`` on that of its own
  noise; ``var(m_H)`` is 5 to 11 %, so at most +6 % of a voxel's fluctuation variance). Region
  means, their correlations and their tangent-space covariances are blind to it by construction; the
  covariance between the region's tokens is not (the halves anti-correlate, each half's tokens
  correlate more with each other);
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
SPLITS = ("whole", "split")
#: In ``split`` participants: the share of the variance of a core voxel's own noise that the
#: halves' opposite courses replace in the smaller half (``h**2`` times it in the larger one, see
#: :data:`SIGNAL_MODEL`).
SPLIT_SHARE = 0.8
#: Edge of the token grid the split planes lie on, in 2 mm cube voxels (the ``tiny`` preset's
#: tokens: patch 4 x downsample 2), and of the cells the core is made of (its working voxels).
SPLIT_TOKEN_EDGE = 8
SPLIT_CELL_EDGE = 2


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
#: Regions split in two halves of opposite courses in ``split`` participants: the eight largest
#: regions outside the sets above (four bilateral pairs in four lobes), each half's core lying in
#: 3 to 10 tokens of the ``tiny`` grid.
SPLIT_REGIONS: tuple[str, ...] = _bilateral("Fusiform", "Parietal_Inf", "Cingulate_Mid", "Insula")


@dataclass(frozen=True)
class Split:
    """One region of :data:`SPLIT_REGIONS` cut in two halves by a token plane (its core only).

    Attributes
    ----------
    name : str
    axis : int
        0, 1 or 2: the axis (x, y, z of the voxel grids) the plane is normal to.
    plane : int
        The plane lies before this cube voxel index along ``axis``: half A holds the core voxels of
        cube index ``< plane``, half B the others.
    plane_mm : float
        The plane's MNI coordinate along ``axis`` (mm).
    half_a, half_b : ndarray of int
        Fortran-order flat indices, on the MNI 2 mm grid, of the core voxels of each half.
    tokens : tuple of int
        The ``tiny`` tokens each half's core voxels lie in.
    """

    name: str
    axis: int
    plane: int
    plane_mm: float
    half_a: np.ndarray
    half_b: np.ndarray
    tokens: tuple[int, int]


@dataclass(frozen=True)
class _SplitRows:
    """The rows (among the V brain voxels) of one split region's halves and their weights h."""

    half_a: np.ndarray  # (K_A,) int rows of half A
    half_b: np.ndarray  # (K_B,) int rows of half B
    h_a: float          # +min(1, W_B / W_A)
    h_b: float          # -min(1, W_A / W_B)


@dataclass(frozen=True)
class _Layout:
    """What every participant shares: the mask and per-voxel model terms (V brain voxels)."""

    mask: np.ndarray        # (X, Y, Z) bool brain mask
    voxels: np.ndarray      # (V,) Fortran-order flat indices of the mask voxels
    source: np.ndarray      # (V,) int: 0 global course, k = 1..6 network k, 7 + j coupled region j
    weight: np.ndarray      # (V,) float32 variance share of the source course (w)
    planted: np.ndarray     # (V,) bool: voxel of an ADHD region
    split_rows: tuple[_SplitRows, ...]  # one per SPLIT_REGIONS region
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
    participants = _participants(rng, n_participants)
    participants["coupling"] = _coupling(coupling_rng, participants)
    participants["subregional"] = _subregional(split_rng, participants)
    truth = _truth(atlas, seed, n_frames, repetition_time, participants, splits, layout)
    for row in participants.itertuples():
        bold = _participant_bold(rng, coupling_rng, split_rng, layout, row.diagnosis, row.coupling,
                                 row.subregional, SITES[row.site], row.gain, n_frames,
                                 repetition_time)
        _write_run(out_dir, row.participant_id, layout, bold, repetition_time)
        log.debug("demo: wrote %s (%s, %s, %s, %s)", row.participant_id, row.diagnosis,
                  row.coupling, row.subregional, row.site)
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


def split_halves(atlas: Atlas, labels: np.ndarray | None = None) -> list[Split]:
    """The two halves of the core of every region of :data:`SPLIT_REGIONS`.

    The core of a region is its voxels whose 4 mm cell (``SPLIT_CELL_EDGE^3`` voxels of the 96^3
    cube) lies wholly in the region. Of the planes between tokens of the ``tiny`` grid (every
    ``SPLIT_TOKEN_EDGE`` cube voxels) along x, y and z that cut the core, the one leaving the
    most equal halves is taken (ties: the first axis, then the lowest plane).

    Parameters
    ----------
    atlas : Atlas
        An AAL3 atlas naming every region of :data:`SPLIT_REGIONS`.
    labels : ndarray, shape (91, 109, 91), optional
        The atlas's label values on the MNI 2 mm grid (default: resampled from ``atlas``).

    Returns
    -------
    list of Split
        In the order of :data:`SPLIT_REGIONS`.

    Raises
    ------
    UsageError
        A region is missing from the atlas, or has no core a token plane cuts.
    """
    if labels is None:
        labels = atlas.resample_to(MNI_2MM_SHAPE, MNI_2MM_AFFINE)
    cube = to_cube(np.asarray(labels).astype(np.int64), fill=0)  # (96, 96, 96) label values
    e, n = SPLIT_CELL_EDGE, CUBE_SHAPE[0] // SPLIT_CELL_EDGE
    cells = cube.reshape(n, e, n, e, n, e)
    first = cells[:, :1, :, :1, :, :1]
    pure = (cells == first).all(axis=(1, 3, 5))                                 # (n, n, n)
    core = np.where(pure, first[:, 0, :, 0, :, 0], 0)
    core = core.repeat(e, axis=0).repeat(e, axis=1).repeat(e, axis=2)          # (96, 96, 96)
    affine = cube_affine()
    splits = []
    for name, index in zip(SPLIT_REGIONS, _region_indices(atlas, SPLIT_REGIONS), strict=True):
        where = np.argwhere(core == index)                                      # (K, 3) cube
        planes = [(axis, plane) for axis in range(3)
                  for plane in range(SPLIT_TOKEN_EDGE, CUBE_SHAPE[axis], SPLIT_TOKEN_EDGE)
                  if len(where) and where[:, axis].min() < plane <= where[:, axis].max()]
        if not planes:
            raise UsageError(f"region {name} of atlas {atlas.name} has no core that a token "
                             "plane cuts: the demo needs an AAL3 atlas")
        axis, plane = min(planes, key=lambda ap: abs(2 * int((where[:, ap[0]] < ap[1]).sum())
                                                     - len(where)))
        below = where[:, axis] < plane
        flat = [np.sort(np.ravel_multi_index((where[side] - np.asarray(CUBE_OFFSET)).T,
                                             MNI_2MM_SHAPE, order="F")) for side in (below, ~below)]
        tokens = tuple(len(np.unique(where[side] // SPLIT_TOKEN_EDGE, axis=0))
                       for side in (below, ~below))
        plane_mm = float(affine[axis, axis] * (plane - 0.5) + affine[axis, 3])
        splits.append(Split(name, axis, plane, plane_mm, flat[0], flat[1], tokens))
    return splits


def _layout(rng: np.random.Generator, atlas: Atlas, labels: np.ndarray,
            splits: list[Split]) -> _Layout:
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
    baseline = BASELINE * (1 + PROFILE_SD * profile)
    split_rows = []
    for split in splits:
        rows_a, rows_b = np.searchsorted(voxels, split.half_a), np.searchsorted(voxels, split.half_b)
        w_a, w_b = (float(baseline[rows].sum(dtype=np.float64)) for rows in (rows_a, rows_b))
        # The smaller half takes the full share, the larger a share scaled so the sums cancel.
        split_rows.append(_SplitRows(rows_a, rows_b, min(1.0, w_b / w_a), -min(1.0, w_a / w_b)))
    return _Layout(mask=mask, voxels=voxels, source=source, weight=weight, planted=planted,
                   split_rows=tuple(split_rows), upsample=upsample, baseline=baseline,
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


def _subregional(rng: np.random.Generator, participants: pd.DataFrame) -> list[str]:
    """Balanced ``subregional`` labels, balanced within diagnosis x site x coupling cells.

    As :func:`_coupling`, one level to three factors: the participants are walked cell by cell
    (members shuffled), alternating the two labels from a random first one, the cells visited in
    a Gray-code order of (diagnosis, site, coupling), so that consecutive cells differ in one
    factor. With equal cells of odd size (3 each for 24 participants), every level of every
    factor, and every pair of factors, gets both labels equally.
    """
    sites = list(SITES)
    gray = [(0, 0, 0), (0, 0, 1), (0, 1, 1), (0, 1, 0), (1, 1, 0), (1, 1, 1), (1, 0, 1), (1, 0, 0)]
    columns = {column: participants[column].to_numpy()
               for column in ("diagnosis", "site", "coupling")}
    order = np.concatenate([
        rng.permutation(np.flatnonzero((columns["diagnosis"] == DIAGNOSES[d])
                                       & (columns["site"] == sites[s])
                                       & (columns["coupling"] == COUPLINGS[c])))
        for d, s, c in gray
    ])
    first = int(rng.integers(2))
    labels = [""] * len(participants)
    for position, i in enumerate(order):
        labels[i] = SPLITS[(first + position) % 2]
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


def _split_half(noise: np.ndarray, rows: np.ndarray, scale: np.ndarray, h: float,
                course: np.ndarray) -> None:
    """Give one half of a split region its course, in place (:data:`SIGNAL_MODEL`).

    Parameters
    ----------
    noise : ndarray, shape (V, T)
        The scaled own noise of every brain voxel (``amplitude * sqrt(1 - w) * n``).
    rows : ndarray of int, shape (K,)
        The half's rows.
    scale : ndarray, shape (K,)
        Their ``amplitude * sqrt(1 - w)`` (proportional to the baseline inside a region).
    h : float
        The half's weight.
    course : ndarray, shape (T,)
        The region's standardized course ``s``.
    """
    half = noise[rows]                                                         # (K, T)
    # The half's baseline-weighted mean noise, kept: the deviations from it sum to 0.
    mean = half.sum(axis=0, dtype=np.float64) / scale.sum(dtype=np.float64)   # (T,)
    common = scale[:, None] * mean.astype(np.float32)
    keep = np.float32(np.sqrt(1 - SPLIT_SHARE * h**2))
    noise[rows] = (common + keep * (half - common)
                   + np.float32(np.sqrt(SPLIT_SHARE) * h) * scale[:, None] * course)


def _participant_bold(rng: np.random.Generator, coupling_rng: np.random.Generator,
                      split_rng: np.random.Generator, layout: _Layout, diagnosis: str,
                      coupling: str, subregional: str, site: dict[str, float], gain: float,
                      n_frames: int, repetition_time: float) -> np.ndarray:
    """(V, T) float32 BOLD of one participant's brain voxels (the model of :data:`SIGNAL_MODEL`).

    The per-voxel factors are folded into (V,) coefficients first, so the (V, T) arrays are
    touched by few in-place operations: this is most of the demo's run time.
    """
    phi = np.exp(-repetition_time / COURSE_TAU_S)
    courses = _ar1(rng, len(NETWORKS) + 1, n_frames, phi)  # global course, then the networks'
    courses = np.concatenate([courses, _coupled_courses(coupling_rng, coupling, courses[:1], phi)])
    # Drawn for every participant: the stream does not depend on the labels.
    split_courses = _ar1(split_rng, len(layout.split_rows), n_frames, phi)
    lattice_noise = _ar1(rng, layout.upsample.shape[1], n_frames,
                         np.exp(-repetition_time / NOISE_TAU_S))
    planted = layout.planted & (diagnosis == "adhd")
    scaled = (gain * site["scale"]) * layout.baseline  # (V,) g * scale * b
    amplitude = scaled * np.where(planted, FLUCTUATION * ADHD_AMPLITUDE, FLUCTUATION)
    bold = layout.upsample @ lattice_noise  # (V, T) smooth noise n
    noise_scale = amplitude * np.sqrt(1 - layout.weight)  # (V,)
    bold *= noise_scale[:, None]
    if subregional == "split":
        for rows, course in zip(layout.split_rows, split_courses, strict=True):
            _split_half(bold, rows.half_a, noise_scale[rows.half_a], rows.h_a, course)
            _split_half(bold, rows.half_b, noise_scale[rows.half_b], rows.h_b, course)
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


def _split_records(atlas: Atlas, splits: list[Split], layout: _Layout) -> list[dict[str, Any]]:
    records = []
    for split, rows, record in zip(splits, layout.split_rows,
                                   _region_records(atlas, SPLIT_REGIONS), strict=True):
        axis = "xyz"[split.axis]
        # Half A holds the lower cube indices: larger mm where the axis is flipped (x).
        side = ">" if cube_affine()[split.axis, split.axis] < 0 else "<"
        records.append({**record, "axis": axis, "plane_mm": split.plane_mm,
                        "half_a": f"{axis} {side} {split.plane_mm:g} mm",
                        "core_voxels": [len(split.half_a), len(split.half_b)],
                        "tokens": list(split.tokens), "h": [rows.h_a, rows.h_b]})
    return records


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
        "subregional_effect": {
            "label_column": "subregional",
            "levels": {"split": "each region's core carries +s in one half and -s in the other, "
                                "its mean time series unchanged",
                       "whole": "no planted structure inside the regions"},
            "regions": _split_records(atlas, splits, layout),
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
        "SIGNAL_MODEL of bidsapp/demo.py.\n"
    )
    atomic_write_text(out_dir / "dataset_description.json", _json(description))
    atomic_write_text(out_dir / "README", readme)
    atomic_write_text(out_dir / ".bidsignore", f"{TRUTH_FILE}\n")
    atomic_write_text(out_dir / "participants.tsv",
                      participants.to_csv(sep="\t", index=False, lineterminator="\n"))
    atomic_write_text(out_dir / "participants.json", _json(columns))
    atomic_write_text(out_dir / TRUTH_FILE, _json(truth))
