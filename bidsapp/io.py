"""Atomic file writes: every output is written to a temporary name beside it, then renamed.

A crash (or ``SIGKILL``) therefore never leaves a half-written file under its final name, and a
re-run finds either the complete file or nothing. :func:`file_sha256` is the one file digest
(checkpoints, inputs of the preprocessing cache).
"""

from __future__ import annotations

import contextlib
import errno
import glob
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock

from bidsapp.errors import CannotCreateOutputError, IOFailureError

#: What a full disk or an exhausted quota raises (``EDQUOT`` is not defined everywhere).
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


def write_error(path: Path, exc: OSError, what: str | None = None) -> IOFailureError:
    """The one-line :class:`IOFailureError` (exit 74) of a failed write of ``path`` (or ``what``).

    A full disk or quota says so, since that is what the user has to fix.
    """
    reason = exc.strerror or str(exc)
    if exc.errno in _FULL:
        reason += " (the disk or the quota of this file system is full)"
    return IOFailureError(f"cannot write {what or path}: {reason}")


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def ensure_dir(path: Path) -> Path:
    """Create ``path`` (and parents) or raise :class:`CannotCreateOutputError`.

    A full disk or quota raises :class:`IOFailureError` (exit 74) instead: the directory could be
    created, there is just no room.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        if exc.errno in _FULL:
            raise write_error(path, exc) from exc
        raise CannotCreateOutputError(f"cannot create directory {path}: {exc.strerror}") from exc
    if not os.access(path, os.W_OK | os.X_OK):
        raise CannotCreateOutputError(f"directory {path} is not writable")
    return path


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path in ``path``'s directory; rename it to ``path`` on success.

    The temporary name keeps ``path``'s full suffix (``.nii.gz``, ``.tsv``) so that libraries that
    pick a format from the file name (nibabel, numpy) write the right one. On error the temporary
    file is removed and the exception propagates; an :class:`OSError` (a full disk or quota, an
    I/O error) becomes one :class:`IOFailureError` (exit 74) naming ``path``, whatever library
    was writing: every output of roimae goes through here, so this is the one place it is handled.
    """
    path = Path(path)
    ensure_dir(path.parent)
    suffix = "".join(path.suffixes) if path.suffixes else ""
    try:
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name.split('.')[0]}.",
                                        suffix=f".tmp{suffix}", dir=path.parent)
    except OSError as exc:
        raise write_error(path, exc) from exc
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        if isinstance(exc, OSError):
            raise write_error(path, exc) from exc
        raise


def file_lock(path: Path, timeout: float = -1) -> FileLock:
    """A :class:`filelock.FileLock` on ``path``, refusing a lock file that is a symbolic link.

    Taking the lock opens the file for writing (and truncates it): through a link planted in a
    shared output or work directory, that would truncate whatever file the link points to.

    Raises
    ------
    CannotCreateOutputError
        ``path`` is a symbolic link (exit 73).
    """
    path = Path(path)
    if path.is_symlink():
        raise CannotCreateOutputError(f"lock file {path} is a symbolic link (to "
                                      f"{os.readlink(path)}); remove it: roimae never writes "
                                      "through links")
    return FileLock(path, timeout=timeout)


def remove_temporaries(path: Path) -> list[Path]:
    """Remove the temporary files that writers of ``path`` (or of its sidecar) left when killed.

    :func:`atomic_path` writes ``.<stem>.<random>.tmp<suffix>`` beside ``path``, ``<stem>`` being the
    name up to its first dot (shared by a data file and its JSON sidecar); a writer killed with
    SIGKILL leaves it behind. Call this only where no other process is writing ``path``.
    """
    path = Path(path)
    stem = path.name.split(".")[0]
    removed = []
    for tmp in path.parent.glob(f".{glob.escape(stem)}.*.tmp*"):
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Remove every temporary file that :func:`atomic_path` writers left in ``directory`` when killed.

    Not recursive. Call this only where this process is the directory's only writer (the group
    level's outputs, one participant's figures).
    """
    directory = Path(directory)
    removed = []
    for tmp in directory.glob(".*.tmp*") if directory.is_dir() else []:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
            removed.append(tmp)
    return removed


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (fsync before rename)."""
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
    return Path(path)


def atomic_write_text(path: Path, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def _finite_or_none(value: Any) -> Any:
    """``value`` with every non-finite float (NaN, +-inf, NumPy's too) replaced by ``None``."""
    if isinstance(value, float | np.floating):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {key: _finite_or_none(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_none(item) for item in value]
    if isinstance(value, np.ndarray):
        return _finite_or_none(value.tolist())
    if isinstance(value, np.integer | np.bool_):
        return value.item()
    return value


def json_text(data: Any, **kwargs: Any) -> str:
    """``data`` as JSON text, with ``null`` where a value is NaN or infinite.

    ``json.dumps`` writes a bare ``NaN`` / ``Infinity``, which is not JSON (strict parsers, the
    BIDS validator and ``jq`` refuse it); every JSON file roimae writes goes through here.
    ``kwargs`` are passed to :func:`json.dumps` (``indent``, ``sort_keys``).
    """
    return json.dumps(_finite_or_none(data), allow_nan=False, **kwargs)


def atomic_write_json(path: Path, data: Any, **kwargs: Any) -> Path:
    """Write ``data`` as JSON (see :func:`json_text`; indented by 2) to ``path`` atomically."""
    kwargs.setdefault("indent", 2)
    return atomic_write_text(path, json_text(data, **kwargs) + "\n")
