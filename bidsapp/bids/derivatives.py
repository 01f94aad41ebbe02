"""Write BIDS derivatives: file names from entities, ``dataset_description.json``, atomic writes.

Entity order and the label / index formats come from the installed BIDS schema
(:mod:`bidsschematools`), the same specification the validator checks, so file names stay valid
when the specification grows. Every file is written through :func:`bidsapp.io.atomic_path`, so a
crash never leaves a half-written output under its final name.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import nibabel as nib
import pandas as pd
from bidsschematools.schema import load_schema
from filelock import Timeout

from bidsapp._version import __version__
from bidsapp.errors import CannotCreateOutputError, UsageError
from bidsapp.io import atomic_path, atomic_write_json, atomic_write_text, ensure_dir, file_lock
from bidsapp.logs import get_logger

_SCHEMA = load_schema()
_ENTITIES = [_SCHEMA.objects.entities[long_name] for long_name in _SCHEMA.rules.entities]

#: Entities of statistical derivatives (BEP041 draft) not yet in the specification; nilearn and
#: FitLins put them after all others (``..._desc-x_stat-t_statmap.nii.gz``).
_STATS_ENTITIES = {"stat": "label"}
#: BIDS entities (short keys, e.g. ``sub``) in the order the specification puts them in names.
ENTITY_ORDER: tuple[str, ...] = (*(entity["name"] for entity in _ENTITIES), *_STATS_ENTITIES)
#: Format (``label`` or ``index``) of each entity's value.
ENTITY_FORMATS: dict[str, str] = {
    **{entity["name"]: entity["format"] for entity in _ENTITIES}, **_STATS_ENTITIES
}
#: Version of the BIDS specification the schema describes.
BIDS_VERSION: str = _SCHEMA["bids_version"]
#: Standard template identifiers of the BIDS coordinate-systems appendix (``space-`` values).
STANDARD_SPACES: tuple[str, ...] = tuple(
    _SCHEMA.objects.enums["_StandardTemplateCoordSys"]["enum"]
)
#: Entities that identify a BOLD run; outputs derived from a run keep them (in BIDS order).
RUN_ENTITIES: tuple[str, ...] = tuple(
    key for key in ENTITY_ORDER
    if key in {"sub", "ses", "task", "acq", "ce", "rec", "dir", "run", "echo", "space", "res",
               "den"}
)
CODE_URL = "https://github.com/roimae/roimae"
#: Lock file that serialises updates of shared files (hidden: the validator ignores it).
LOCK_NAME = ".roimae.lock"
DESCRIPTION_NAME = "dataset_description.json"

_VALUE_PATTERNS = {
    fmt: re.compile(_SCHEMA.objects.formats[fmt]["pattern"]) for fmt in set(ENTITY_FORMATS.values())
}
_SUFFIX = re.compile(r"[A-Za-z0-9]+")
_EXTENSION = re.compile(r"(\.[A-Za-z0-9]+)+")
_DATASET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_LOCK_TIMEOUT_S = 600

log = get_logger("derivatives")


def check_label(key: str, value: str) -> str:
    """Return ``value`` if it is a valid value of entity ``key``, else raise :class:`UsageError`.

    Labels hold letters, digits (and ``+``, as the schema allows); indices (``run``, ``echo``...)
    hold digits only. This is what keeps a value such as ``../x`` out of a file name.
    """
    fmt = ENTITY_FORMATS.get(key)
    if fmt is None:
        raise _unknown_entity(key)
    if not isinstance(value, str) or not _VALUE_PATTERNS[fmt].fullmatch(value):
        allowed = "digits" if fmt == "index" else "letters and digits"
        raise UsageError(f"invalid BIDS {fmt} {key}-{value!r}: it must be non-empty and hold only "
                         f"{allowed}")
    return value


def _unknown_entity(key: str) -> UsageError:
    return UsageError(f"unknown BIDS entity {key!r} (known: {', '.join(ENTITY_ORDER)})")


def _check_suffix(suffix: str) -> str:
    if not _SUFFIX.fullmatch(suffix):
        raise UsageError(f"invalid BIDS suffix {suffix!r}: letters and digits only")
    return suffix


def _check_extension(extension: str) -> str:
    if not _EXTENSION.fullmatch(extension):
        raise UsageError(f"invalid file extension {extension!r}: expected e.g. '.nii.gz'")
    return extension


def _check_datatype(datatype: str) -> str:
    if datatype not in _SCHEMA.objects.datatypes:
        raise UsageError(f"unknown BIDS datatype {datatype!r}")
    return datatype


def build_filename(entities: Mapping[str, str], suffix: str, extension: str) -> str:
    """Build ``key-value_..._suffix.ext`` with the entities in BIDS order.

    Parameters
    ----------
    entities : Mapping[str, str]
        Short entity keys (``sub``, ``task``, ``atlas``...) to labels or indices.
    suffix : str
        BIDS suffix, e.g. ``bold`` or ``timeseries``.
    extension : str
        With its leading dot, e.g. ``.nii.gz``.

    Raises
    ------
    UsageError
        For an unknown entity or an invalid value, suffix or extension.
    """
    unknown = sorted(set(entities) - set(ENTITY_ORDER))
    if unknown:
        raise _unknown_entity(unknown[0])
    parts = [f"{key}-{check_label(key, entities[key])}" for key in ENTITY_ORDER if key in entities]
    return "_".join([*parts, _check_suffix(suffix)]) + _check_extension(extension)


def parse_filename(name: str) -> tuple[dict[str, str], str, str]:
    """Split a BIDS file name into ``(entities, suffix, extension)``: :func:`build_filename` undone.

    Entities are returned in the order of the name. Raises :class:`UsageError` when ``name`` is
    not ``key-value_..._suffix.ext`` with known entities and valid values.
    """
    stem, dot, rest = Path(name).name.partition(".")
    *pairs, suffix = stem.split("_")
    entities: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("-")
        if not sep:
            raise UsageError(f"{name!r} is not a BIDS file name: {pair!r} is not key-value")
        if key in entities:
            raise UsageError(f"{name!r} is not a BIDS file name: entity {key!r} repeated")
        entities[key] = check_label(key, value)
    return entities, _check_suffix(suffix), _check_extension(dot + rest) if dot else ""


def container_info() -> dict[str, str] | None:
    """The ``Container`` entry of ``GeneratedBy`` when running in a container, else ``None``.

    The image sets ``ROIMAE_CONTAINER_IMAGE`` (its tag); Apptainer / Singularity announce
    themselves through ``APPTAINER_CONTAINER`` / ``SINGULARITY_CONTAINER`` (the image file).
    """
    image = os.environ.get("ROIMAE_CONTAINER_IMAGE")
    sif = os.environ.get("APPTAINER_CONTAINER") or os.environ.get("SINGULARITY_CONTAINER")
    if sif:
        return {"Type": "apptainer", "Tag": image or Path(sif).name}
    if image:
        return {"Type": "docker", "Tag": image}
    return None


def relative_path(path: Path, root: Path) -> Path | None:
    """``path`` relative to ``root``, following symbolic links if needed; ``None`` if outside."""
    for candidate, base in ((path.absolute(), root.absolute()), (path.resolve(), root.resolve())):
        if candidate.is_relative_to(base):
            return candidate.relative_to(base)
    return None


class DerivativesWriter:
    """Write roimae's outputs as a BIDS derivatives dataset in ``output_dir``.

    Parameters
    ----------
    output_dir : Path
        Root of the derivatives dataset.
    source_datasets : Mapping[str, Path], optional
        Input datasets by name (e.g. ``{"preprocessed": fmriprep_dir, "raw": bids_dir}``); they
        become ``DatasetLinks`` and ``SourceDatasets``, and the names of BIDS URIs.
    pipeline_description : str, optional
        Free text saved as ``GeneratedBy[0].Description``.
    """

    def __init__(self, output_dir: Path, *, source_datasets: Mapping[str, Path] | None = None,
                 pipeline_description: str | None = None) -> None:
        self.output_dir = Path(output_dir).absolute()
        self.source_datasets: dict[str, Path] = {}
        for name, root in (source_datasets or {}).items():
            if not _DATASET_NAME.fullmatch(name):
                raise UsageError(f"invalid dataset name {name!r}: letters, digits, '.', '_', '-'")
            self.source_datasets[name] = Path(root).absolute()
        self.pipeline_description = pipeline_description

    @contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the lock of ``output_dir``: hundreds of participant jobs may start at once."""
        ensure_dir(self.output_dir)
        lock = file_lock(self.output_dir / LOCK_NAME, timeout=_LOCK_TIMEOUT_S)
        try:
            with lock:
                yield
        except Timeout as exc:
            raise CannotCreateOutputError(
                f"could not lock {lock.lock_file} within {_LOCK_TIMEOUT_S} s; is another job stuck?"
            ) from exc

    def description(self) -> dict[str, Any]:
        """The ``dataset_description.json`` content this writer would create."""
        generated_by: dict[str, Any] = {"Name": "roimae", "Version": __version__,
                                        "CodeURL": CODE_URL}
        if self.pipeline_description:
            generated_by["Description"] = self.pipeline_description
        container = container_info()
        if container is not None:
            generated_by["Container"] = container
        description: dict[str, Any] = {
            "Name": "roimae",
            "BIDSVersion": BIDS_VERSION,
            "DatasetType": "derivative",
            "GeneratedBy": [generated_by],
        }
        if self.source_datasets:
            description["SourceDatasets"] = [
                {"URL": root.as_uri()} for root in self.source_datasets.values()
            ]
            description["DatasetLinks"] = {
                name: root.as_uri() for name, root in self.source_datasets.items()
            }
        return description

    def ensure_dataset_description(self) -> Path:
        """Create or update ``OUTPUT_DIR/dataset_description.json`` (under the lock).

        An existing valid description is kept; this version of roimae, new source datasets and
        new dataset links are added to it. A corrupt one (not a JSON object) is rewritten.

        Raises
        ------
        CannotCreateOutputError
            When ``OUTPUT_DIR`` already holds a dataset that is not a derivative dataset.
        """
        path = self.output_dir / DESCRIPTION_NAME
        with self._locked():
            current = self._read_description(path)
            wanted = self.description() if current is None else self._merge(current)
            if wanted != current:
                self.write_json(path, wanted)
        return path

    def _read_description(self, path: Path) -> dict[str, Any] | None:
        try:
            current = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            log.warning("%s is unreadable (%s); writing a new one", path, exc)
            return None
        if not isinstance(current, dict):
            log.warning("%s is not a JSON object; writing a new one", path)
            return None
        if current.get("DatasetType") != "derivative":
            raise CannotCreateOutputError(
                f"OUTPUT_DIR {self.output_dir} holds a dataset that is not a BIDS derivative "
                f"(DatasetType {current.get('DatasetType')!r}); choose another output directory"
            )
        return current

    def _merge(self, current: dict[str, Any]) -> dict[str, Any]:
        """``current`` plus what this writer adds; entries already there are never changed."""
        ours = self.description()
        merged = dict(current)
        generated = [g for g in merged.get("GeneratedBy", []) if isinstance(g, dict)]
        if not any((g.get("Name"), g.get("Version")) == ("roimae", __version__) for g in generated):
            generated.append(ours["GeneratedBy"][0])
        merged["GeneratedBy"] = generated
        if "SourceDatasets" in ours:
            sources = list(merged.get("SourceDatasets", []))
            sources += [s for s in ours["SourceDatasets"] if s not in sources]
            merged["SourceDatasets"] = sources
            links = dict(merged.get("DatasetLinks", {}))
            for name, uri in ours["DatasetLinks"].items():
                if links.setdefault(name, uri) != uri:
                    log.warning("dataset link %r of %s points to %s, not %s; keeping it", name,
                                self.output_dir, links[name], uri)
            merged["DatasetLinks"] = links
        return merged

    def path_for(self, source_entities: Mapping[str, str], *, suffix: str, extension: str,
                 datatype: str = "func", **entities: str) -> Path:
        """Path of an output derived from a run: ``OUTPUT_DIR/sub-X[/ses-Y]/<datatype>/<name>``.

        The run-identifying entities of ``source_entities`` (:data:`RUN_ENTITIES`) are kept,
        others (such as ``desc-preproc``) dropped; ``entities`` add or override (``atlas``,
        ``desc``...).
        """
        merged = {key: value for key, value in source_entities.items() if key in RUN_ENTITIES}
        merged.update(entities)
        if "sub" not in merged:
            raise UsageError("an output file needs a subject ('sub') entity")
        name = build_filename(merged, suffix, extension)
        folder = self.output_dir / f"sub-{merged['sub']}"
        if "ses" in merged:
            folder = folder / f"ses-{merged['ses']}"
        return folder / _check_datatype(datatype) / name

    def write_json(self, path: Path, data: Mapping[str, Any]) -> Path:
        """Write ``data`` as indented JSON (NaN and infinities as ``null``: bare NaN is not JSON)."""
        return atomic_write_json(path, data)

    def write_tsv(self, path: Path, table: pd.DataFrame) -> Path:
        """Write ``table`` tab-separated, without index, with ``n/a`` for missing values.

        A failed write (a full disk) is :func:`~bidsapp.io.atomic_path`'s one-line exit 74, as
        for every writer here.
        """
        with atomic_path(path) as tmp:
            table.to_csv(tmp, sep="\t", index=False, na_rep="n/a", lineterminator="\n")
        return Path(path)

    def write_nifti(self, path: Path, img: nib.Nifti1Image) -> Path:
        """Save ``img`` (compressed when ``path`` ends in ``.gz``)."""
        with atomic_path(path) as tmp:
            nib.save(img, tmp)
        return Path(path)

    def write_sidecar(self, data_path: Path, metadata: Mapping[str, Any]) -> Path:
        """Write the JSON sidecar of ``data_path`` (same name, ``.json``)."""
        data_path = Path(data_path)
        stem = data_path.name.split(".", 1)[0]
        return self.write_json(data_path.with_name(f"{stem}.json"), metadata)

    def bids_uri(self, path: Path) -> str:
        """BIDS URI of ``path``: ``bids::<relpath>`` in ``OUTPUT_DIR``, else ``bids:<name>:...``.

        A path in none of the known datasets (a model given with ``--model``, say) gets its
        ``file://`` URI.
        """
        for name, root in (("", self.output_dir), *self.source_datasets.items()):
            relative = relative_path(Path(path), root)
            if relative is not None:
                return f"bids:{name}:{relative.as_posix()}"
        return Path(path).absolute().as_uri()

    def ensure_bidsignore(self, patterns: Iterable[str]) -> Path:
        """Add ``patterns`` to ``OUTPUT_DIR/.bidsignore``, keeping its lines, without duplicates."""
        path = self.output_dir / ".bidsignore"
        patterns = list(patterns)
        for pattern in patterns:
            if not pattern.strip() or "\n" in pattern:
                raise UsageError(f"invalid .bidsignore pattern {pattern!r}")
        with self._locked():
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except FileNotFoundError:
                lines = []
            except UnicodeDecodeError as exc:
                # Rewriting it would have to guess its encoding and could garble its patterns.
                raise CannotCreateOutputError(
                    f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x}); save it as "
                    "UTF-8 (or remove it) so that roimae can add its patterns") from exc
            missing = [p for p in dict.fromkeys(patterns) if p not in lines]
            if missing:
                atomic_write_text(path, "\n".join([*lines, *missing]) + "\n")
        return path
