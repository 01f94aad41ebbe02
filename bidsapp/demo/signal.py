"""The demo's signal model: its constants, planted regions and random courses.

:data:`SIGNAL_MODEL` states it (a constant, so that the truth record holds it under ``python -OO``
too); :mod:`bidsapp.demo` writes the dataset from it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
from scipy import sparse

from bidsapp.errors import UsageError

if TYPE_CHECKING:
    from bidsapp.atlas import Atlas

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


def region_indices(atlas: Atlas, names: tuple[str, ...]) -> list[int]:
    """The atlas's label value of every named region; 64 unless it names them all (AAL3)."""
    index_of = {region.name: region.index for region in atlas.regions}
    missing = [name for name in names if name not in index_of]
    if missing:
        raise UsageError(f"the demo needs an AAL3 atlas; atlas {atlas.name} lacks {missing}")
    return [index_of[name] for name in names]


def region_records(atlas: Atlas, names: tuple[str, ...]) -> list[dict[str, Any]]:
    """``{"name", "index"}`` of every named region, for the truth record."""
    return [{"name": n, "index": i} for n, i in zip(names, region_indices(atlas, names),
                                                     strict=True)]


def lattice_upsampler(shape: tuple[int, ...], voxels: np.ndarray,
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


def draw_participants(rng: np.random.Generator, n: int) -> pd.DataFrame:
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


def draw_coupling(rng: np.random.Generator, participants: pd.DataFrame) -> list[str]:
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


def ar1(rng: np.random.Generator, n: int, n_frames: int, phi: float) -> np.ndarray:
    """(n, n_frames) float32 AR(1) series, each standardized over the run (mean 0, SD 1)."""
    series = rng.standard_normal((n, n_frames), dtype=np.float32)  # innovations, then in place
    scale = np.float32(np.sqrt(1 - phi**2))
    for t in range(1, n_frames):
        series[:, t] = phi * series[:, t - 1] + scale * series[:, t]
    # Zero run mean makes a voxel's run mean exactly its baseline; unit SD makes amplitudes exact.
    series -= series.mean(axis=1, keepdims=True)
    series /= series.std(axis=1, keepdims=True)
    return series


def coupled_courses(rng: np.random.Generator, coupling: str, global_course: np.ndarray,
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
    own = ar1(rng, len(COUPLED_REGIONS), global_course.shape[1], phi)
    if coupling == "uncoupled":
        return own
    mixed = np.sqrt(COUPLING, dtype=np.float32) * global_course + np.sqrt(1 - COUPLING,
                                                                          dtype=np.float32) * own
    # The sample correlation of g and own is not exactly 0: restore run mean 0, SD 1.
    mixed -= mixed.mean(axis=1, keepdims=True)
    mixed /= mixed.std(axis=1, keepdims=True)
    return mixed
