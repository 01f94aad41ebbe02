"""Find the preprocessed BOLD runs to use: fMRIPrep derivatives indexed with pybids.

``BIDS_DIR`` is either fMRIPrep's output (a derivative dataset) or a raw dataset holding
``derivatives/fmriprep``; ``-d NAME=PATH`` adds (for raw input: replaces) derivative roots. One
:class:`~bids.layout.BIDSLayout` indexes them all, skipping folders that cannot hold BOLD runs.
"""

from __future__ import annotations

import inspect
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import pandas as pd
from bids.exceptions import BIDSDerivativesValidationError
from bids.layout import BIDSFile, BIDSLayout, BIDSLayoutIndexer, Query

from bidsapp.bids.derivatives import (
    DESCRIPTION_NAME,
    RUN_ENTITIES,
    STANDARD_SPACES,
    parse_filename,
    relative_path,
)
from bidsapp.bids.participants import listing, read_participants
from bidsapp.config import DEFAULT_SPACES, Config, SelectionConfig
from bidsapp.errors import (
    BadDataError,
    NoInputError,
    NothingSelectedError,
    UsageError,
    ValidationFailedError,
)
from bidsapp.io import ensure_dir, file_lock
from bidsapp.logs import get_logger

#: Standard MNI templates (BIDS coordinate-systems appendix); other spaces are never used.
MNI_SPACES: tuple[str, ...] = tuple(space for space in STANDARD_SPACES if space.startswith("MNI"))
#: Name of the dataset holding the BOLD runs, in BIDS URIs and ``DatasetLinks``.
PREPROCESSED = "preprocessed"
RAW = "raw"
PREFERRED_RES = "2"
NIFTI_EXTENSIONS = [".nii", ".nii.gz"]
_BOLD_QUERY = {"datatype": "func", "suffix": "bold", "desc": "preproc",
               "extension": NIFTI_EXTENSIONS}
_MASK_QUERIES = ({"desc": "brain"}, {"label": "brain"})  # fMRIPrep >= 20.2, then older
#: Folders and files that never hold a BOLD run or its mask: not indexed, to stay fast.
_IGNORE = [
    re.compile(r"^/(code|models|sourcedata|stimuli|derivatives)(/|$)"),
    re.compile(r"/(anat|fmap|dwi|perf|beh|figures|log|logs)(/|$)"),
    re.compile(r"\.(html|svg|gii|h5|txt|csv|toml|tsv|tsv\.gz)$"),
]

log = get_logger("bids")


@dataclass(frozen=True)
class BoldRun:
    """One preprocessed BOLD run in MNI space and its brain mask.

    Attributes
    ----------
    bold, mask : Path
        The ``desc-preproc_bold`` NIfTI and its ``desc-brain_mask`` (or ``label-brain_mask``).
    entities : dict[str, str]
        Run-identifying entities present in the name (:data:`RUN_ENTITIES`), in BIDS order.
    repetition_time : float or None
        ``RepetitionTime`` of the sidecar, in seconds.
    source_uri : str
        BIDS URI of ``bold``, e.g. ``bids:preprocessed:sub-01/func/...``.
    """

    bold: Path
    mask: Path
    entities: dict[str, str]
    repetition_time: float | None
    source_uri: str

    @property
    def subject(self) -> str:
        """The participant label (without ``sub-``)."""
        return self.entities["sub"]

    @property
    def session(self) -> str | None:
        """The session label, None without sessions."""
        return self.entities.get("ses")

    @property
    def name(self) -> str:
        """Entity prefix of the run, e.g. ``sub-01_task-rest_run-1_space-MNI152NLin6Asym_res-2``."""
        return "_".join(f"{key}-{value}" for key, value in self.entities.items())


@dataclass
class InputDataset:
    """The selected input: where the runs are, which space, and the participants table.

    Attributes
    ----------
    root : Path
        Root of the derivatives holding the BOLD runs (the first one when several).
    raw_root : Path or None
        The raw dataset, when ``BIDS_DIR`` is one.
    space : str
        The selected MNI space.
    runs : list[BoldRun]
        Sorted by :attr:`BoldRun.name`.
    participants_file : Path or None
        ``participants.tsv`` of the raw dataset (else of ``root``), whether or not it exists.
    description : dict
        ``dataset_description.json`` of ``root``.
    datasets : dict[str, Path]
        Every input dataset by the name used in BIDS URIs (``preprocessed``, ``raw``, ``-d`` names):
        pass it as ``source_datasets`` of :class:`~bidsapp.bids.derivatives.DerivativesWriter`.
    """

    root: Path
    raw_root: Path | None
    space: str
    runs: list[BoldRun]
    participants_file: Path | None
    description: dict
    datasets: dict[str, Path] = field(default_factory=dict)

    @cached_property
    def participants(self) -> pd.DataFrame | None:
        """``participants.tsv`` (:func:`read_participants`), read when first asked for.

        Only the group level needs it: a damaged table must not stop the pretrain and
        participant levels, which never read it.
        """
        return None if self.participants_file is None else read_participants(
            self.participants_file)


def read_description(root: Path) -> dict[str, Any]:
    """Read ``root/dataset_description.json``; raise :class:`ValidationFailedError` if absent."""
    path = root / DESCRIPTION_NAME
    try:
        description = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ValidationFailedError(
            f"{root} is not a BIDS dataset: no {DESCRIPTION_NAME}"
        ) from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValidationFailedError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(description, dict):
        raise ValidationFailedError(f"{path} is not a JSON object")
    return description


def is_derivative(description: Mapping[str, Any]) -> bool:
    """Whether a dataset description is that of derivatives (pipeline outputs).

    Outputs of old pipelines name themselves in ``GeneratedBy`` / ``PipelineDescription``
    without ``DatasetType``; :func:`~bidsapp.bids.validation.validate_input` reports those.
    """
    if "DatasetType" in description:
        return description["DatasetType"] == "derivative"
    return "GeneratedBy" in description or "PipelineDescription" in description


def _derivative_roots(bids_dir: Path, description: Mapping[str, Any],
                      derivatives: Mapping[str, Path]) -> tuple[Path | None, dict[str, Path]]:
    """The raw root (or ``None``) and the derivative roots by name, the first holding the runs."""
    extra = {}
    for name, path in derivatives.items():
        path = Path(path).absolute()
        if not path.is_dir():
            raise NoInputError(f"derivatives {name}={path} does not exist or is not a directory")
        extra[name] = path
    reserved = sorted({PREPROCESSED, RAW} & set(extra))
    if reserved:
        raise UsageError(f"-d name {reserved[0]!r} is reserved; choose another name "
                         "(e.g. fmriprep)")
    if is_derivative(description):
        return None, {PREPROCESSED: bids_dir, **extra}
    if extra:
        first, *others = extra
        return bids_dir, {PREPROCESSED: extra[first], **{name: extra[name] for name in others}}
    fmriprep = bids_dir / "derivatives" / "fmriprep"
    if (fmriprep / DESCRIPTION_NAME).is_file():
        return bids_dir, {PREPROCESSED: fmriprep}
    raise BadDataError(
        f"no MNI-space preprocessed BOLD found: {bids_dir} is a raw BIDS dataset without "
        "derivatives/fmriprep; run fMRIPrep (--output-spaces MNI152NLin2009cAsym:res-2) first, "
        "or point to its outputs with -d fmriprep=PATH"
    )


def _build_layout(roots: Mapping[str, Path], database_dir: Path | None) -> BIDSLayout:
    """Index ``roots`` once (reusing the database in ``database_dir`` when it matches them)."""
    primary, *extra = roots.values()
    # Metadata is read only for BOLD runs (the repetition time); masks need none.
    indexer = BIDSLayoutIndexer(validate=False, ignore=_IGNORE, suffix="bold")
    kwargs: dict[str, Any] = {"validate": False, "is_derivative": True, "indexer": indexer,
                              "derivatives": [str(p) for p in extra] or False}
    try:
        if database_dir is None:
            return BIDSLayout(primary, **kwargs)
        database_dir = ensure_dir(Path(database_dir).absolute())
        # Participant jobs started together must not build the same database at once.
        with file_lock(database_dir / ".roimae-layout.lock"):
            layout = BIDSLayout(primary, database_path=database_dir, **kwargs)
            indexed = [Path(layout.root), *(Path(d.root) for d in layout.derivatives.values())]
            if sorted(indexed) != sorted([primary, *extra]):
                log.warning("the pybids database in %s indexes other datasets; rebuilding it",
                            database_dir)
                layout = BIDSLayout(primary, database_path=database_dir, reset_database=True,
                                    **kwargs)
            return layout
    except BIDSDerivativesValidationError as exc:
        raise UsageError(f"cannot index the derivatives: {exc}") from exc
    except (OSError, TypeError, ValueError) as exc:
        # pybids reads the BOLD sidecars while indexing and fails on one that is not a JSON
        # object (an OSError naming it, or a TypeError naming nothing): find it for the user.
        for root in roots.values():
            for sidecar in sorted(root.rglob("*_bold.json")):
                _read_sidecar(sidecar)
        raise BadDataError(f"cannot index {', '.join(map(str, roots.values()))}: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                           ) from exc


def _read_sidecar(path: Path) -> dict[str, Any]:
    """A JSON sidecar as a dict; :class:`BadDataError` if it is not UTF-8 JSON of an object."""
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise BadDataError(f"{path} is not a valid JSON sidecar: "
                           f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
                           ) from exc
    if not isinstance(value, dict):
        raise BadDataError(f"{path} is not a valid JSON sidecar: a {type(value).__name__}, not an "
                           "object of metadata")
    return value


#: Keywords of :meth:`BIDSLayout.get` that are options, not entities: never from a filter file.
_GET_OPTIONS = frozenset(name for name, parameter in inspect.signature(BIDSLayout.get).parameters
                         .items() if parameter.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
                         and name != "self")


def _pybids_filters(filters: Mapping[str, Any]) -> dict[str, Any]:
    """fMRIPrep's filter-file conventions: ``null`` means "absent", ``"*"`` means "any".

    Raises :class:`UsageError` for a key that is an option of pybids' ``get()`` (``scope``,
    ``return_type``...) rather than an entity: it would change what the query returns.
    """
    options = sorted(_GET_OPTIONS & set(filters))
    if options:
        raise UsageError(f"--bids-filter-file: {', '.join(map(repr, options))} is an option of "
                         "pybids' get(), not a BIDS entity; filters may only name entities "
                         "(subject, session, task, run, res, ...)")
    def convert(value: Any) -> Any:
        if value is None:
            return Query.NONE
        if value == "*":
            return Query.ANY
        if isinstance(value, list):
            return [convert(v) for v in value]
        return value

    return {key: convert(value) for key, value in filters.items()}


def _get(layout: BIDSLayout, query: Mapping[str, Any], what: str) -> list[BIDSFile]:
    try:
        return layout.get(scope="all", **query)
    except ValueError as exc:  # an entity pybids does not know, from the filter file
        raise UsageError(f"--bids-filter-file {what!r} query: {exc}") from exc


def _run_entities(bids_file: BIDSFile) -> dict[str, str]:
    try:
        entities, _, _ = parse_filename(bids_file.filename)
    except UsageError as exc:
        raise BadDataError(f"{bids_file.path}: {exc}") from exc
    return {key: entities[key] for key in RUN_ENTITIES if key in entities}


def _choose_space(requested: str | None, spaces: set[str], where: str) -> str:
    if requested is not None:
        if requested not in MNI_SPACES:
            raise UsageError(f"--space {requested} is not an MNI template; roimae needs BOLD in "
                             f"one of {', '.join(MNI_SPACES)}")
        if requested not in spaces:
            raise NothingSelectedError(
                f"no selected preprocessed BOLD run in space {requested} in {where} (spaces "
                f"found: {', '.join(sorted(spaces)) or 'none'})"
            )
        return requested
    for space in DEFAULT_SPACES:
        if space in spaces:
            return space
    raise NothingSelectedError(
        f"no selected preprocessed BOLD run in {' or '.join(DEFAULT_SPACES)} in {where}"
        + (f"; choose one of {', '.join(sorted(spaces))} with --space" if spaces else "")
    )


def _choose_res(values: set[str | None], space: str) -> str | None:
    """The resolution to use: ``res-2`` when there are several, else the first in order."""
    if len(values) == 1:
        return next(iter(values))
    res = PREFERRED_RES if PREFERRED_RES in values else sorted(values, key=_res_key)[0]
    log.info("space %s has resolutions %s; using res-%s (set 'res' in --bids-filter-file to "
             "choose)", space, ", ".join(str(v) for v in sorted(values, key=_res_key)), res)
    return res


def _res_key(value: str | None) -> tuple[bool, int, str]:
    """Numeric labels in numeric order; runs without ``res-`` last."""
    if value is None:
        return (True, 0, "")
    return (False, int(value) if value.isdigit() else 0, value)


def _repetition_time(bids_file: BIDSFile) -> float | None:
    value = bids_file.get_metadata().get("RepetitionTime")
    if value is None:
        return None
    if (isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
            or not math.isfinite(value)):
        raise BadDataError(f"{bids_file.path}: RepetitionTime {value!r} in its sidecar is not a "
                           "positive, finite number of seconds")
    return float(value)


def _masks(layout: BIDSLayout, query: Mapping[str, Any],
           filters: Mapping[str, Any]) -> dict[tuple, Path]:
    """Brain masks by run entities; ``desc-brain`` wins over the older ``label-brain``."""
    masks: dict[tuple, Path] = {}
    for variant in reversed(_MASK_QUERIES):
        base = {**query, "suffix": "mask", "extension": NIFTI_EXTENSIONS, **variant}
        for bids_file in _get(layout, {**base, **filters}, "mask"):
            masks[tuple(_run_entities(bids_file).items())] = Path(bids_file.path)
    return masks


def _uri(path: Path, roots: Mapping[str, Path]) -> str:
    for name, root in roots.items():
        relative = relative_path(path, root)
        if relative is not None:
            return f"bids:{name}:{relative.as_posix()}"
    raise AssertionError(f"{path} was indexed but is in none of {list(roots.values())}")


def runs_without_row(runs: list[BoldRun], participants: pd.DataFrame | None) -> list[str]:
    """The names of the runs whose participant has no row in ``participants``."""
    listed = set() if participants is None else set(participants["participant_id"])
    return [run.name for run in runs if f"sub-{run.subject}" not in listed]


def _labels(selection: SelectionConfig) -> dict[str, list[str]]:
    """The ``--participant-label`` / ``--session-label`` / ``--task-label`` pybids filters."""
    labels = {"subject": selection.participant_label, "session": selection.session_label,
              "task": selection.task_label}
    return {entity: values for entity, values in labels.items() if values}


def _select_bold(layout: BIDSLayout, selection: SelectionConfig, labels: dict[str, list[str]],
                 where: str, database_dir: Path | None = None) -> tuple[str, list[BIDSFile]]:
    """The MNI space to use and its preprocessed BOLD files selected by labels and filters."""
    every_bold = _get(layout, _BOLD_QUERY, "bold")
    for bids_file in every_bold:
        # A name pybids could not fully parse (e.g. a non-ASCII label, sub-ü1) lacks entities
        # used below: refused with the reason, whichever participants are selected.
        _run_entities(bids_file)
        if "subject" not in bids_file.entities:
            raise BadDataError(f"{bids_file.path}: not a valid BIDS file name (no sub- label)")
    if not {f.entities.get("space") for f in every_bold} & set(MNI_SPACES):
        raise BadDataError(
            f"no MNI-space preprocessed BOLD (*_space-MNI*_desc-preproc_bold.nii[.gz]) found in "
            f"{where}; run fMRIPrep (--output-spaces MNI152NLin2009cAsym:res-2) first"
        )
    known = {str(f.entities["subject"]) for f in every_bold}
    unknown = [label for label in labels.get("subject", []) if label not in known]
    if unknown:
        # A reused database does not see participants added since it was built.
        stale = (f"; the pybids database in {database_dir} may predate them: delete it to "
                 "re-index" if database_dir is not None else "")
        raise NothingSelectedError(f"participant label(s) {listing(unknown)} not found in "
                                   f"{where} (available: {listing(sorted(known))}){stale}")
    bold_filters = _pybids_filters(selection.bids_filters.get("bold", {}))
    selected = [f for f in _get(layout, {**_BOLD_QUERY, **bold_filters, **labels}, "bold")
                if f.entities.get("space") in MNI_SPACES]
    if not selected:
        raise NothingSelectedError(f"the participant/session/task labels and filters select no "
                                   f"preprocessed BOLD run in MNI space in {where}")
    space = _choose_space(selection.space, {f.entities["space"] for f in selected}, where)
    in_space = [f for f in selected if f.entities["space"] == space]
    if "res" not in bold_filters:
        res = _choose_res({f.entities.get("res") for f in in_space}, space)
        in_space = [f for f in in_space if f.entities.get("res") == res]
    return space, in_space


def _pair_runs(bold_files: list[BIDSFile], masks: Mapping[tuple, Path],
               roots: Mapping[str, Path], where: str) -> list[BoldRun]:
    """A :class:`BoldRun` per BOLD file, sorted by name; every run needs its brain mask."""
    runs: dict[str, BoldRun] = {}
    missing: list[str] = []
    for bids_file in bold_files:
        entities = _run_entities(bids_file)
        mask = masks.get(tuple(entities.items()))
        bold = Path(bids_file.path)
        if mask is None:
            missing.append(bold.name)
            continue
        run = BoldRun(bold=bold, mask=mask, entities=entities,
                      repetition_time=_repetition_time(bids_file), source_uri=_uri(bold, roots))
        if run.name in runs:
            raise UsageError(f"run {run.name} is in two derivative datasets ({runs[run.name].bold}"
                             f" and {bold}); select one with -d or --bids-filter-file")
        runs[run.name] = run
    if missing:
        raise BadDataError(f"no brain mask (desc-brain_mask) for preprocessed BOLD run(s) "
                           f"{listing(sorted(missing))} in {where}")
    return sorted(runs.values(), key=lambda run: run.name)


def discover_runs(config: Config) -> InputDataset:
    """Select the preprocessed MNI-space BOLD runs of ``config`` and pair them with brain masks.

    Raises
    ------
    ValidationFailedError
        ``BIDS_DIR`` (or a ``-d`` path) has no ``dataset_description.json``.
    NoInputError
        A ``-d`` path does not exist.
    BadDataError
        No MNI-space preprocessed BOLD at all, a run without a brain mask, a bad TR.
    NothingSelectedError
        Unknown participant labels, or filters that select no run.
    UsageError
        ``--space`` that is not an MNI template, a filter file pybids cannot use, a run found in
        two derivative datasets.
    """
    bids_dir = Path(config.bids_dir).absolute()
    selection = config.selection
    raw_root, roots = _derivative_roots(bids_dir, read_description(bids_dir),
                                        selection.derivatives)
    descriptions = {name: read_description(root) for name, root in roots.items()}
    where = " and ".join(str(root) for root in roots.values())
    layout = _build_layout(roots, config.bids_database_dir)

    labels = _labels(selection)
    space, bold_files = _select_bold(layout, selection, labels, where, config.bids_database_dir)
    masks = _masks(layout, {"space": space, **labels},
                   _pybids_filters(selection.bids_filters.get("mask", {})))
    runs = _pair_runs(bold_files, masks, roots, where)
    log.info("selected %d BOLD run(s) of %d participant(s) in space %s from %s", len(runs),
             len({run.subject for run in runs}), space, where)
    root = roots[PREPROCESSED]
    return InputDataset(
        root=root,
        raw_root=raw_root,
        space=space,
        runs=runs,
        participants_file=(raw_root or root) / "participants.tsv",
        description=descriptions[PREPROCESSED],
        datasets={**roots, **({RAW: raw_root} if raw_root is not None else {})},
    )
