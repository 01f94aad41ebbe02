"""The parcellation that defines the masking units: AAL3 by default, or the user's own atlas.

An :class:`Atlas` holds a 3D integer label image (kept in memory, it is small) and its region
table. Region ``i`` (0-based position in :attr:`Atlas.regions`, sorted by label value) is the
contiguous id the model uses; :meth:`Atlas.contiguous` maps label values to these ids.

The atlas is found, in this order (see :func:`load_atlas`):

1. an explicit image and label table (``--atlas`` / ``--atlas-labels``);
2. ``$ROIMAE_ATLAS_DIR``, a folder holding the image and a label table;
3. nilearn's AAL3v2 fetcher (cached by nilearn, under ``$ROIMAE_DATA_DIR`` if set).

A label table is a BIDS ``dseg.tsv``: columns ``index`` and ``name``, optionally ``hemisphere``
and ``group``; missing ones are derived from the AAL naming scheme.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from nibabel.processing import resample_from_to

from bidsapp.aal_names import group_for_region, hemisphere_of
from bidsapp.errors import BadDataError, NoInputError
from bidsapp.logs import get_logger

__all__ = ["Atlas", "Region", "atlas_name", "load_atlas"]

log = get_logger("atlas")

DEFAULT_IMAGE = "AAL3v1_2mm.nii.gz"
DEFAULT_LABELS = "AAL3v1_labels.tsv"
TABLE_COLUMNS = ("index", "name", "hemisphere", "group")
NILEARN_VERSION = "3v2"
_MAX_LABEL = np.iinfo(np.int16).max

@dataclass(frozen=True)
class Region:
    """One atlas region.

    Attributes
    ----------
    index : int
        Label value in the image (AAL3v1: 1..170).
    name : str
        Region name, e.g. ``"Hippocampus_L"``.
    hemisphere : str
        ``"L"``, ``"R"`` or ``"n/a"`` (vermis, midline nuclei).
    group : str
        Lobe-level group (central, frontal, temporal, parietal, occipital, insula, limbic,
        subcortical, cerebellum, brainstem), ``"n/a"`` when unknown.
    """

    index: int
    name: str
    hemisphere: str
    group: str


@dataclass(frozen=True)
class Atlas:
    """A label image and its regions.

    Attributes
    ----------
    name : str
        Alphanumeric atlas name, usable as a BIDS ``atlas-`` entity ("AAL3v1", "AAL3v2", or the
        stem of the user's file).
    image : nibabel.Nifti1Image
        3D int16 label image, in memory.
    regions : tuple of Region
        Sorted by label value; position ``i`` is the contiguous id used by the model.
    source : str
        Where the atlas was loaded from (a path, or ``"nilearn:aal 3v2"``).
    """

    name: str
    image: nib.Nifti1Image
    regions: tuple[Region, ...]
    source: str

    @cached_property
    def _labels(self) -> np.ndarray:
        # (X, Y, Z) int16, read once; the image is built in memory by load_atlas.
        return np.asarray(self.image.dataobj, dtype=np.int16)

    @cached_property
    def _lookup(self) -> np.ndarray:
        # (max label + 1,) int16: label value -> contiguous id, -1 for background/unknown values.
        indices = np.array([r.index for r in self.regions], dtype=np.int64)
        lookup = np.full(int(indices.max()) + 1, -1, dtype=np.int16)
        lookup[indices] = np.arange(len(indices), dtype=np.int16)
        return lookup

    @property
    def has_groups(self) -> bool:
        """Whether any region has a group (from the table's ``group`` column or AAL names)."""
        return any(region.group != "n/a" for region in self.regions)

    def table(self) -> pd.DataFrame:
        """Region table with columns index, name, hemisphere, group (the BIDS dseg.tsv form)."""
        return pd.DataFrame(
            [(r.index, r.name, r.hemisphere, r.group) for r in self.regions],
            columns=list(TABLE_COLUMNS),
        )

    def resample_to(self, shape: tuple[int, int, int], affine: np.ndarray) -> np.ndarray:
        """Label values on another voxel grid (nearest neighbour).

        Parameters
        ----------
        shape : tuple of int
            Target grid shape (X, Y, Z).
        affine : numpy.ndarray
            4x4 voxel-to-world affine of the target grid.

        Returns
        -------
        numpy.ndarray
            (X, Y, Z) int16 label values; 0 outside the atlas. A copy of the atlas data when
            the target grid is the atlas grid.
        """
        shape = tuple(int(s) for s in shape)
        affine = np.asarray(affine, dtype=float)
        if shape == self.image.shape and np.allclose(affine, self.image.affine):
            return self._labels.copy()
        resampled = resample_from_to(self.image, (shape, affine), order=0, mode="constant",
                                     cval=0)
        return np.asarray(resampled.dataobj, dtype=np.int16)

    def contiguous(self, labels: np.ndarray) -> np.ndarray:
        """Map label values to contiguous region ids.

        Parameters
        ----------
        labels : numpy.ndarray
            Integer label values of this atlas (any shape); 0 is background.

        Returns
        -------
        numpy.ndarray
            int16 array of the same shape: region ids 0..R-1, -1 for background.

        Raises
        ------
        ValueError
            If a nonzero value is not a label of this atlas.
        """
        labels = np.asarray(labels)
        if labels.size == 0:
            return np.empty(labels.shape, dtype=np.int16)
        unknown_mask = (labels < 0) | (labels >= self._lookup.size)
        clipped = np.where(unknown_mask, 0, labels)
        ids = self._lookup[clipped]
        unknown_mask |= (ids < 0) & (labels != 0)
        if unknown_mask.any():
            unknown = np.unique(labels[unknown_mask])[:10].tolist()
            raise ValueError(f"values {unknown} are not labels of atlas {self.name}")
        return ids

    def sha256(self) -> str:
        """Hex SHA-256 of the label grid (shape, affine, int16 data) and the region table."""
        digest = hashlib.sha256()
        digest.update(repr(self.image.shape).encode())
        digest.update(np.ascontiguousarray(self.image.affine, dtype="<f8").tobytes())
        digest.update(np.ascontiguousarray(self._labels, dtype="<i2").tobytes())
        digest.update(self.table().to_csv(sep="\t", index=False, lineterminator="\n").encode())
        return digest.hexdigest()


def load_atlas(image: Path | None = None, labels: Path | None = None) -> Atlas:
    """Load the parcellation.

    Parameters
    ----------
    image, labels : Path, optional
        Label image (NIfTI) and its table (TSV with ``index``, ``name``, optional
        ``hemisphere``, ``group``). Both or neither; when neither, ``$ROIMAE_ATLAS_DIR`` is
        searched, then nilearn's AAL3v2 is fetched.

    Returns
    -------
    Atlas

    Raises
    ------
    NoInputError
        A file is missing, or no atlas can be found or downloaded.
    BadDataError
        A file cannot be read, the image is not a 3D integer label image, the table has
        duplicate or missing entries, or an image label is not in the table.
    """
    if (image is None) != (labels is None):
        raise NoInputError("give both the atlas image (--atlas) and its table (--atlas-labels)")
    if image is not None and labels is not None:
        return _atlas_from_files(Path(image), Path(labels))
    atlas_dir = os.environ.get("ROIMAE_ATLAS_DIR")
    if atlas_dir:
        return _atlas_from_files(*_find_in_dir(Path(atlas_dir)))
    return _atlas_from_nilearn()


def _find_in_dir(folder: Path) -> tuple[Path, Path]:
    """The image and table in ``$ROIMAE_ATLAS_DIR``: the AAL3v1 names, else the only pair."""
    if not folder.is_dir():
        raise NoInputError(f"ROIMAE_ATLAS_DIR={folder} is not a directory")
    if (folder / DEFAULT_IMAGE).is_file() and (folder / DEFAULT_LABELS).is_file():
        return folder / DEFAULT_IMAGE, folder / DEFAULT_LABELS
    images = sorted(p for p in folder.glob("*.nii*") if not p.name.startswith("."))
    tables = sorted(p for p in folder.glob("*.tsv") if not p.name.startswith("."))
    if len(images) != 1 or len(tables) != 1:
        raise NoInputError(
            f"ROIMAE_ATLAS_DIR={folder} must hold {DEFAULT_IMAGE} and {DEFAULT_LABELS}, or "
            f"exactly one image and one .tsv table (found {len(images)} and {len(tables)})"
        )
    return images[0], tables[0]


def _atlas_from_nilearn() -> Atlas:
    from nilearn.datasets import fetch_atlas_aal

    data_dir = os.environ.get("ROIMAE_DATA_DIR") or None
    try:
        fetched = fetch_atlas_aal(version=NILEARN_VERSION, data_dir=data_dir, verbose=0)
    # Any failure here (no network, proxy, truncated archive) means the same to the user.
    except Exception as exc:
        raise NoInputError(
            f"cannot download the AAL3 atlas ({type(exc).__name__}); download AAL3 and pass "
            "--atlas IMAGE --atlas-labels TABLE.tsv, or set ROIMAE_ATLAS_DIR to a folder with "
            "the image and its table"
        ) from exc
    table = pd.DataFrame({"index": [int(i) for i in fetched.indices], "name": fetched.labels})
    return _build_atlas(
        name=f"AAL{NILEARN_VERSION}",
        img=_read_image(Path(fetched.maps)),
        table=table,
        source=f"nilearn:aal {NILEARN_VERSION}",
    )


def atlas_name(image: Path) -> str:
    """The BIDS ``atlas-`` label of an atlas image file.

    The file's own ``atlas-`` entity when it has one (``tpl-..._atlas-Schaefer2018_..._dseg``),
    else its stem without resolution parts (``_2mm``, ``_1p5mm``, ``_res-2``) and without what a
    BIDS label does not allow.

    Examples
    --------
    >>> atlas_name(Path("AAL3v1_2mm.nii.gz")), atlas_name(Path("AAL_2mm_116parcel.nii.gz"))
    ('AAL3v1', 'AAL116parcel')
    >>> atlas_name(Path("tpl-MNI152NLin6Asym_res-2_atlas-Schaefer2018_desc-100Parcels_dseg.nii.gz"))
    'Schaefer2018'
    """
    stem = re.sub(r"\.nii(\.gz)?$", "", Path(image).name)
    entity = re.search(r"(?:^|_)atlas-([A-Za-z0-9]+)(?:_|$)", stem)
    if entity:
        return entity.group(1)
    stem = re.sub(r"(?:^|_)(?:\d+(?:p\d+)?mm|res-[A-Za-z0-9]+)(?=_|$)", "", stem)
    return re.sub(r"[^A-Za-z0-9]", "", stem) or "atlas"


def _atlas_from_files(image: Path, labels: Path) -> Atlas:
    name = atlas_name(image)
    return _build_atlas(name=name, img=_read_image(image), table=_read_table(labels),
                        source=str(image))


def _read_image(path: Path) -> nib.Nifti1Image:
    """Read a 3D integer label image into memory as int16."""
    if not path.is_file():
        raise NoInputError(f"atlas image {path} does not exist")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as exc:  # nibabel raises many types for corrupt files
        raise BadDataError(f"cannot read atlas image {path}: {exc}") from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise BadDataError(f"atlas image {path} must be 3D, not of shape {data.shape}")
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise BadDataError(f"atlas image {path} must hold integer labels")
    if data.min() < 0 or data.max() > _MAX_LABEL:
        raise BadDataError(f"atlas image {path} labels must lie in 0..{_MAX_LABEL}")
    header = img.header.copy()
    header.set_data_dtype(np.int16)
    return nib.Nifti1Image(data.astype(np.int16), img.affine, header)


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise NoInputError(f"atlas label table {path} does not exist")
    try:
        # "n/a" is a value (midline regions), not a missing cell.
        table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    except (OSError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise BadDataError(f"cannot read atlas label table {path}: {exc}") from exc
    missing = {"index", "name"} - set(table.columns)
    if missing:
        raise BadDataError(f"atlas label table {path} lacks column(s) {', '.join(sorted(missing))}")
    try:
        table["index"] = table["index"].astype(int)
    except ValueError as exc:
        raise BadDataError(f"atlas label table {path}: 'index' must hold integers") from exc
    return table


def _build_atlas(name: str, img: nib.Nifti1Image, table: pd.DataFrame, source: str) -> Atlas:
    """Check that image and table agree and turn the table into sorted regions."""
    table = table[table["index"] != 0].sort_values("index")  # a background row owns nothing
    for column in ("index", "name"):
        duplicated = table[column][table[column].duplicated()].unique().tolist()
        if duplicated:
            raise BadDataError(f"atlas {source}: duplicate {column} values in table: {duplicated}")
    if table.empty:
        raise BadDataError(f"atlas {source}: the label table lists no region")
    if table["index"].min() < 0 or table["index"].max() > _MAX_LABEL:
        raise BadDataError(f"atlas {source}: table indices must lie in 1..{_MAX_LABEL}")
    in_image = set(np.unique(np.asarray(img.dataobj)).tolist()) - {0}
    in_table = set(table["index"].tolist())
    not_in_table = sorted(in_image - in_table)
    if not_in_table:
        shown = f"{not_in_table[:10]}" + (" ..." if len(not_in_table) > 10 else "")
        raise BadDataError(f"atlas {source}: {len(not_in_table)} image label(s) missing from "
                           f"the label table: {shown}")
    if in_table - in_image:
        log.warning("atlas %s: %d label(s) of its table have no voxel in its image and get no "
                    "value in any output: %s", source, len(in_table - in_image),
                    sorted(in_table - in_image)[:10])
    hemispheres = table["hemisphere"] if "hemisphere" in table else table["name"].map(hemisphere_of)
    groups = table["group"] if "group" in table else table["name"].map(group_for_region)
    regions = tuple(
        Region(index=int(i), name=str(n), hemisphere=str(h) or "n/a", group=str(g) or "n/a")
        for i, n, h, g in zip(table["index"], table["name"], hemispheres, groups, strict=True)
    )
    return Atlas(name=name, image=img, regions=regions, source=source)


def region_voxels(contiguous: np.ndarray, n_regions: int) -> np.ndarray:
    """Voxels of each region in a volume of contiguous ids (:meth:`Atlas.contiguous`).

    Parameters
    ----------
    contiguous : numpy.ndarray of int
        Region ids ``0..R-1``, -1 outside every region.
    n_regions : int
        ``R``.

    Returns
    -------
    numpy.ndarray of int, shape (R,)
    """
    return np.bincount(contiguous[contiguous >= 0].ravel(), minlength=n_regions)


def region_map(values: np.ndarray, contiguous: np.ndarray, affine: np.ndarray) -> nib.Nifti1Image:
    """A 3D float32 map where every voxel of region r carries ``values[r]`` (0 outside regions).

    Parameters
    ----------
    values : ndarray, shape (R,)
        One value per region, in the atlas's order (NaN stays NaN).
    contiguous : ndarray of int, 3D
        Each voxel's region index, -1 outside regions (:meth:`Atlas.contiguous`).
    affine : ndarray, shape (4, 4)
        The grid of ``contiguous``.

    Returns
    -------
    nibabel.Nifti1Image
        In millimetres.
    """
    lookup = np.concatenate([values.astype(np.float32), [0.0]])   # index -1 -> 0 (background)
    data = lookup[contiguous]
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_xyzt_units("mm")
    return img


def group_summary(table: pd.DataFrame, measures: tuple[str, ...]) -> pd.DataFrame:
    """Mean of each measure over the regions of each group, weighted by their voxels.

    A group's value is that of its average voxel: a small region, whose value is the noisiest
    (a few voxels' reconstruction error, a small occlusion), counts in proportion to its size
    and cannot swamp its group. Regions without a value are left out.

    Parameters
    ----------
    table : pandas.DataFrame
        One row per region, with a ``group`` column (:meth:`Atlas.table`), the measures and,
        optionally, ``voxels`` (each region's voxels; without it every region weighs one).
    measures : tuple of str
        The columns to average; the first also counts the regions with a value.

    Returns
    -------
    pandas.DataFrame
        One row per group, sorted: ``group``, ``regions``, ``regions_with_values`` and the
        weighted means.
    """
    weights = (table["voxels"].to_numpy(dtype=float) if "voxels" in table
               else np.ones(len(table)))
    frame = pd.DataFrame({"group": table["group"]})
    for measure in measures:
        values = table[measure].to_numpy(dtype=float)
        known = np.isfinite(values) & (weights > 0)
        frame[f"{measure}:sum"] = np.where(known, values * weights, 0.0)
        frame[f"{measure}:weight"] = np.where(known, weights, 0.0)
    sums = frame.groupby("group", sort=True).sum()
    grouped = table.groupby("group", sort=True)
    summary = pd.DataFrame(index=sums.index)
    summary["regions"] = grouped.size()
    summary["regions_with_values"] = grouped[measures[0]].count()
    for measure in measures:
        weight = sums[f"{measure}:weight"]
        summary[measure] = (sums[f"{measure}:sum"] / weight.where(weight > 0)).astype(float)
    return summary.reset_index()
