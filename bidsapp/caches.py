"""Private, writable cache directories for the libraries roimae runs, chosen before they load.

matplotlib (``MPLCONFIGDIR``), PyTorch's compiler (``TORCHINDUCTOR_CACHE_DIR``, ``TRITON_CACHE_DIR``),
the CUDA JIT (``CUDA_CACHE_PATH``), nilearn (``NILEARN_DATA``), the BIDS validator (``DENO_DIR``) and
Python's :mod:`tempfile` (``TMPDIR``) each write to a directory of their own, by default under
``$HOME`` or ``/tmp``. In a container with a read-only root file system and no writable ``/tmp``, or
on a node whose ``/tmp`` other users share (Apptainer without ``--contain``), that directory may be
unwritable, or another user's: matplotlib then stops the import with an ``OSError``, and a
compile cache another user can write to is code that user can plant.

:func:`prepare_caches` keeps each configured (or default) directory when it is this user's and
writable, and otherwise points the variable at ``<work dir>/caches-uid<UID>/<tool>`` (mode 0700).
Call it after the paths are checked and before matplotlib, torch's compiler or nilearn is imported;
only this module's standard-library imports may come first.
"""

from __future__ import annotations

import getpass
import os
import stat
import tempfile
from pathlib import Path

from bidsapp.errors import CannotCreateOutputError

#: The cache variables roimae manages, and each one's folder name under the fallback root.
CACHES: dict[str, str] = {
    "MPLCONFIGDIR": "matplotlib",
    "TORCHINDUCTOR_CACHE_DIR": "torchinductor",
    "TRITON_CACHE_DIR": "triton",
    "CUDA_CACHE_PATH": "nv-cache",
    "NILEARN_DATA": "nilearn_data",
    "DENO_DIR": "deno",
}
#: Python's temporary directory (:func:`tempfile.gettempdir`), also moved when none is usable.
TMPDIR = "TMPDIR"


def fallback_root(work_dir: Path) -> Path:
    """The private folder of this user's caches in ``work_dir``: ``caches-uid<UID>``."""
    return Path(work_dir).absolute() / f"caches-uid{os.getuid()}"


def _under(base: Path | None, *parts: str) -> Path | None:
    return base.joinpath(*parts) if base is not None else None


def _home() -> Path | None:
    home = Path(os.path.expanduser("~"))
    return home if home.is_absolute() else None


def _xdg(variable: str, default: str) -> Path | None:
    """An XDG base directory: ``$variable`` when absolute, else ``~/default``."""
    value = os.environ.get(variable)
    if value and Path(value).is_absolute():
        return Path(value)
    return _under(_home(), default)


def _username() -> str:
    """The user name in torch's default inductor folder (``uid_<UID>`` without a passwd entry)."""
    try:
        name = getpass.getuser()
    except (KeyError, OSError):
        name = f"uid_{os.getuid()}"
    return "".join("_" if c in '\\/:*?"<>|' else c for c in name)


def _defaults(variable: str) -> list[Path | None]:
    """Where a library writes when ``variable`` is unset (Linux); ``None``: no home to write in."""
    if variable == "MPLCONFIGDIR":   # matplotlib's config and cache folders
        return [_under(_xdg("XDG_CONFIG_HOME", ".config"), "matplotlib"),
                _under(_xdg("XDG_CACHE_HOME", ".cache"), "matplotlib")]
    if variable == "TORCHINDUCTOR_CACHE_DIR":
        return [Path(tempfile.gettempdir()) / f"torchinductor_{_username()}"]
    if variable == "DENO_DIR":
        return [_under(_xdg("XDG_CACHE_HOME", ".cache"), "deno")]
    # torch puts triton's cache in the inductor folder; triton alone uses ~/.triton/cache.
    home_parts = {"TRITON_CACHE_DIR": (".triton", "cache"), "CUDA_CACHE_PATH": (".nv", "ComputeCache"),
                  "NILEARN_DATA": ("nilearn_data",)}
    return [_under(_home(), *home_parts[variable])]


def is_private_dir(path: Path) -> bool:
    """Whether ``path`` is a directory this user owns and can write, and others cannot write."""
    try:
        info = path.stat()
    except OSError:
        return False
    return (stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid()
            and not info.st_mode & stat.S_IWOTH and os.access(path, os.W_OK | os.X_OK))


def _creatable(path: Path) -> bool:
    """Whether ``path`` does not exist yet and its nearest existing ancestor is writable."""
    if os.path.lexists(path):
        return False
    for parent in path.parents:
        if os.path.lexists(parent):
            return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)
    return False


def _usable(path: Path, *, create: bool) -> bool:
    """A configured directory (``create``: made here, mode 0700) or a library default (left alone)."""
    if not path.is_absolute():
        return False
    if create:
        try:
            path.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError:
            return False
        return is_private_dir(path)
    return is_private_dir(path) or _creatable(path)


def _private_dir(path: Path, variable: str) -> Path:
    """Make ``path`` a directory of this user's alone, or stop with exit 73 and what to do."""
    try:
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if path.stat().st_uid == os.geteuid():
            path.chmod(0o700)
    except OSError as exc:
        raise CannotCreateOutputError(
            f"no writable cache directory for {variable}: cannot create {path} "
            f"({exc.strerror}); set {variable} to a writable directory of yours, or make the "
            "work directory (-w) writable") from exc
    if not is_private_dir(path):
        raise CannotCreateOutputError(
            f"no private cache directory for {variable}: {path} is not writable or belongs to "
            f"another user; set {variable} to a writable directory of yours, or use another "
            "work directory (-w)")
    return path


def _tempdir_usable() -> bool:
    try:
        tempfile.gettempdir()
    except OSError:   # FileNotFoundError: "No usable temporary directory found"
        return False
    return True


def prepare_caches(work_dir: Path) -> dict[str, Path]:
    """Give every cache a writable directory of this user's; return those in the work directory.

    A variable that is set keeps its directory when it can be created (mode 0700) or already is
    this user's, writable and not writable by others; an unset one keeps the library's default
    when that is so or can be created. Any other moves to ``fallback_root(work_dir)/<tool>``.
    ``TMPDIR`` moves there when :func:`tempfile.gettempdir` finds no usable directory. Calling it
    again changes nothing: the variables already moved point to private directories.

    Returns
    -------
    dict
        Each variable (``TMPDIR`` and :data:`CACHES`) that points into the fallback folder.

    Raises
    ------
    CannotCreateOutputError
        The fallback folder cannot be created, or is another user's (exit 73).
    """
    root = fallback_root(work_dir)

    def fallback(variable: str, name: str) -> None:
        _private_dir(root, variable)
        os.environ[variable] = str(_private_dir(root / name, variable))

    if not _tempdir_usable():
        fallback(TMPDIR, "tmp")
        tempfile.tempdir = None   # found again, from TMPDIR
    for variable, name in CACHES.items():
        value = os.environ.get(variable)
        if value:
            usable = _usable(Path(value), create=True)
        else:
            usable = all(p is not None and _usable(p, create=False) for p in _defaults(variable))
        if not usable:
            fallback(variable, name)
    return {variable: Path(os.environ[variable]) for variable in (TMPDIR, *CACHES)
            if os.environ.get(variable) and Path(os.environ[variable]).parent == root}
