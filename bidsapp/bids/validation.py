"""Check the input with the BIDS validator (the offline ``bids-validator-deno`` build).

Raw datasets are run through the validator; derivative inputs (which the validator checks only
loosely) must at least declare ``"DatasetType": "derivative"``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bidsapp.bids.layout import RAW, InputDataset, read_description
from bidsapp.config import Config
from bidsapp.errors import UsageError, ValidationFailedError
from bidsapp.logs import get_logger

VALIDATOR = "bids-validator-deno"
#: Error codes shown in the one-line message; the rest are counted.
_MAX_CODES = 3
_SKIP_HINT = "use --skip-bids-validation to proceed"

log = get_logger("bids")


@dataclass(frozen=True)
class ValidatorIssue:
    """One issue reported by the validator.

    Attributes
    ----------
    severity : str
        ``"error"`` or ``"warning"``.
    code : str
        The validator's code, e.g. ``EMPTY_FILE``.
    message : str
        First line of the explanation.
    location : str or None
        Dataset-relative path (``/sub-01/...``), or ``None`` for dataset-wide issues.
    """

    severity: str
    code: str
    message: str
    location: str | None


def find_validator() -> Path:
    """The ``bids-validator-deno`` executable: beside the Python interpreter, else on ``PATH``."""
    beside = Path(sys.executable).parent / VALIDATOR
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(VALIDATOR)
    if found is None:
        raise UsageError(f"the BIDS validator ({VALIDATOR}) is not installed: `pip install "
                         f"{VALIDATOR}`, or {_SKIP_HINT} without it")
    return Path(found)


def run_bids_validator(path: Path, *, timeout: float = 600) -> list[ValidatorIssue]:
    """Validate the dataset at ``path``; return every issue (errors and warnings).

    Runs ``bids-validator-deno --format json PATH`` (exit status 16 when it finds errors, 0
    otherwise) and reads its report: ``issues.issues`` (``code``, ``severity``, ``location``,
    optional ``issueMessage``) and ``issues.codeMessages`` (the text of each code).

    Raises
    ------
    UsageError
        The validator is not installed.
    ValidationFailedError
        It ran past ``timeout`` seconds or did not produce a report.
    """
    command = [str(find_validator()), "--format", "json", str(path)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout,
                              check=False)
    except subprocess.TimeoutExpired as exc:
        raise ValidationFailedError(f"the BIDS validator did not finish on {path} within "
                                    f"{timeout:g} s; {_SKIP_HINT}") from exc
    except OSError as exc:
        raise UsageError(f"cannot run the BIDS validator {command[0]}: {exc.strerror}") from exc
    try:
        report = json.loads(done.stdout)
        issues = report["issues"]["issues"]
        messages = report["issues"].get("codeMessages", {})
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        detail = (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ValidationFailedError(f"the BIDS validator failed on {path} (exit status "
                                    f"{done.returncode}: {detail}); {_SKIP_HINT}") from exc
    return [
        ValidatorIssue(
            severity=issue["severity"],
            code=issue["code"],
            message=_first_line(issue.get("issueMessage") or messages.get(issue["code"], "")),
            location=issue.get("location") or None,
        )
        for issue in issues
    ]


def _first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), "")


def summarize_errors(errors: list[ValidatorIssue]) -> str:
    """One line: the first error codes with their count and first location."""
    counts = Counter(error.code for error in errors)
    first_location = {}
    for error in errors:
        first_location.setdefault(error.code, error.location)
    shown = []
    for code in list(counts)[:_MAX_CODES]:
        where = first_location[code] or "dataset"
        shown.append(f"{code} at {where}" + (f" (+{counts[code] - 1} more)"
                                             if counts[code] > 1 else ""))
    hidden = len(counts) - len(shown)
    return ", ".join(shown) + (f" ... and {hidden} more error codes" if hidden else "")


def validate_input(config: Config, dataset: InputDataset) -> None:
    """Validate the input of a run unless ``--skip-bids-validation``.

    The raw dataset (when ``BIDS_DIR`` is one) must pass the validator without errors; every
    derivative input must declare ``"DatasetType": "derivative"``.

    Raises
    ------
    ValidationFailedError
        With the first error codes and locations in one line.
    """
    if config.skip_bids_validation:
        log.info("BIDS validation skipped (--skip-bids-validation)")
        return
    for name, root in dataset.datasets.items():
        if name == RAW:
            continue
        dataset_type = read_description(root).get("DatasetType")
        if dataset_type != "derivative":
            raise ValidationFailedError(
                f"{root} is not a BIDS derivatives dataset: its dataset_description.json has "
                f"DatasetType {dataset_type!r}, not 'derivative'; {_SKIP_HINT}"
            )
    if dataset.raw_root is None:
        return
    issues = run_bids_validator(dataset.raw_root)
    errors = [issue for issue in issues if issue.severity == "error"]
    log.info("BIDS validator on %s: %d error(s), %d warning(s)", dataset.raw_root, len(errors),
             len(issues) - len(errors))
    if errors:
        raise ValidationFailedError(
            f"the BIDS validator found {len(errors)} error(s) in {dataset.raw_root}: "
            f"{summarize_errors(errors)}; {_SKIP_HINT}"
        )
