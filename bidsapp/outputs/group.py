"""The names of the group level's files: ``group/target-<label>_...`` and its report."""

from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path

from bidsapp.outputs.files import FIGURES_DIR, GROUP_DIR, GROUP_REPORT


def target_label(target: str) -> str:
    """The BIDS label of ``--target`` in file names: its ASCII letters and digits.

    A name with none (``診断``) gets the first 8 hex digits of its SHA-256 instead; the settings
    file and the report keep the name itself.

    Parameters
    ----------
    target : str
        The participants.tsv column.

    Returns
    -------
    str
    """
    label = "".join(c for c in target if c.isascii() and c.isalnum())
    return label or hashlib.sha256(target.encode("utf-8")).hexdigest()[:8]


def set_names(desc: str | None, readout: str) -> tuple[str, str]:
    """How tables and the report name a feature set, and its part of file names.

    Parameters
    ----------
    desc : str or None
        The model's masking; None for a baseline.
    readout : str
        The readout, or the baseline's name.

    Returns
    -------
    name, stem : str
        ``<desc>-<readout>`` and ``desc-<desc>_feature-<readout>`` for a model, else the
        baseline's name and ``feature-<baseline>``.
    """
    if desc is None:
        return readout, f"feature-{readout}"
    return f"{desc}-{readout}", f"desc-{desc}_feature-{readout}"


@dataclass(frozen=True)
class GroupOutputs:
    """The paths the group level writes for one ``--target``.

    In ``OUTPUT_DIR/group/``, ``<prefix>`` being ``target-<label>`` and ``<set>`` a feature set's
    stem (:func:`set_names`):

    - ``<prefix>_<set>_{folds,predictions,metrics,confusion}.tsv`` (:meth:`set_table`);
    - ``<prefix>_comparison.tsv``, ``<prefix>_scores.tsv`` and ``<prefix>_settings.json``, the
      last written and the completion marker;
    - ``<prefix>_atlas-<a>_<set>_attribution.tsv`` and ``..._stat-bygroup_attribution.tsv``;
    - ``<prefix>_atlas-<a>_<set>_stat-<measure>_boldmap.nii.gz`` and its JSON sidecar
      (:meth:`group_map`);
    - figures in ``group/figures/`` and the report ``OUTPUT_DIR/group_<prefix>.html`` (one per
      target: a group run for another target never replaces it).

    Parameters
    ----------
    output_dir : Path
        OUTPUT_DIR.
    target : str
        The ``--target`` column.
    """

    output_dir: Path
    target: str

    @property
    def dir(self) -> Path:
        """``OUTPUT_DIR/group``."""
        return self.output_dir / GROUP_DIR

    @property
    def figures(self) -> Path:
        """``OUTPUT_DIR/group/figures``."""
        return self.dir / FIGURES_DIR

    @property
    def report(self) -> Path:
        """``OUTPUT_DIR/group_<prefix>.html``."""
        return self.output_dir / GROUP_REPORT.format(prefix=self.prefix)

    @property
    def prefix(self) -> str:
        """``target-<label>`` (:func:`target_label`)."""
        return f"target-{target_label(self.target)}"

    def set_table(self, set_stem: str, kind: str) -> Path:
        """``<prefix>_<set>_<kind>.tsv``, ``kind`` being folds, predictions, metrics or confusion."""
        return self.dir / f"{self.prefix}_{set_stem}_{kind}.tsv"

    @property
    def comparison(self) -> Path:
        """The pairwise comparison of the feature sets."""
        return self.dir / f"{self.prefix}_comparison.tsv"

    @property
    def scores(self) -> Path:
        """One row per feature set, beside the best baseline."""
        return self.dir / f"{self.prefix}_scores.tsv"

    @property
    def settings(self) -> Path:
        """The settings of the run, written last: the completion marker of the prefix."""
        return self.dir / f"{self.prefix}_settings.json"

    @staticmethod
    def map_stem(atlas_label: str, set_stem: str) -> str:
        """``atlas-<a>_<set>``: the stem of a feature set's region maps and tables."""
        return f"atlas-{atlas_label}_{set_stem}"

    def group_map(self, map_stem: str, measure: str) -> Path:
        """The region map of a measure, under this target's ``<prefix>``.

        Every map depends on the target: importance through the classifier, reconstruction
        error and sensitivity through the runs that have a target value.
        """
        return self.dir / f"{self.prefix}_{map_stem}_stat-{measure}_boldmap.nii.gz"

    def attribution(self, map_stem: str) -> Path:
        """The group region table of a feature set."""
        return self.dir / f"{self.prefix}_{map_stem}_attribution.tsv"

    def attribution_by_group(self, map_stem: str) -> Path:
        """The group region table averaged by region group."""
        return self.dir / f"{self.prefix}_{map_stem}_stat-bygroup_attribution.tsv"

    def figure(self, name: str) -> Path:
        """``group/figures/<prefix>_<name>.png``, e.g. ``roc`` or ``<set name>_confusion``."""
        return self.figures / f"{self.prefix}_{name}.png"

    def written(self) -> list[Path]:
        """The files an earlier group run with this prefix left; the completion marker first."""
        paths = [self.settings, self.report, *sorted(self.dir.glob(f"{glob.escape(self.prefix)}_*")),
                 *sorted(self.figures.glob(f"{glob.escape(self.prefix)}_*"))]
        return list(dict.fromkeys(paths))
