"""``participants.tsv``: read as BIDS says, with ids that match the runs."""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import pandas as pd

from bidsapp.errors import BadDataError
from bidsapp.logs import get_logger

log = get_logger("bids")

#: Labels listed in one error message, at most.
_MAX_LISTED = 5


def listing(values: list[str]) -> str:
    """The first few of ``values``, comma-separated, and how many more there are."""
    shown = ", ".join(values[:_MAX_LISTED])
    return shown + (f" and {len(values) - _MAX_LISTED} more" if len(values) > _MAX_LISTED else "")


def read_participants(path: Path) -> pd.DataFrame | None:
    """Load ``participants.tsv`` (``None`` if absent); ids stay strings, ``n/a`` is missing.

    Column names and ids are stripped of surrounding blanks and ids get their ``sub-`` prefix
    when it is missing (``01`` and ``sub-01 `` are ``sub-01``), so that every row matches its
    runs; rows without an id are left out with a warning.

    Raises
    ------
    BadDataError
        An empty (0-byte) or unparsable file, text that is not UTF-8, no ``participant_id``
        column, or an id on several rows (all listed).
    """
    if not path.is_file():
        return None
    try:
        data = path.read_bytes()
        text = data.decode("utf-8")
        table = pd.read_csv(io.StringIO(text), sep="\t", dtype=str, na_values=["n/a", ""],
                            keep_default_na=False)
    except pd.errors.EmptyDataError as exc:
        raise BadDataError(f"{path} is empty: it needs at least a participant_id header") from exc
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise BadDataError(f"cannot read {path}: it is not UTF-8 text (byte "
                           f"0x{data[exc.start]:02x} on line {line}); save it as UTF-8") from exc
    except (OSError, pd.errors.ParserError) as exc:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BadDataError(f"cannot read {path}: {reason}") from exc
    table.columns = [str(column).strip() for column in table.columns]
    if "participant_id" not in table.columns:
        raise BadDataError(f"{path} has no participant_id column")
    ids = table["participant_id"].str.strip()
    if ids.isna().any():
        log.warning("%s: %d row(s) without participant_id are left out", path,
                    int(ids.isna().sum()))
        table, ids = table[ids.notna()], ids[ids.notna()]
    ids = ids.where(ids.str.startswith("sub-"), "sub-" + ids)
    duplicated = sorted(set(ids[ids.duplicated()]))
    if duplicated:
        raise BadDataError(f"{path} lists participant(s) {listing(duplicated)} on more than one "
                           "row; keep one row per participant")
    table = table.assign(participant_id=ids).reset_index(drop=True)
    # Numbers as numbers (as pandas reads them by default), ids and labels as text.
    for column in table.columns.drop("participant_id"):
        with contextlib.suppress(ValueError, TypeError):
            table[column] = pd.to_numeric(table[column])
    return table
