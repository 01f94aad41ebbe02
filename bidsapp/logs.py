"""Logging set-up shared by every level: messages to standard error and to a log file."""

from __future__ import annotations

import logging
from pathlib import Path

LOGGER_NAME = "roimae"
#: ``log.error(..., extra={FILE_ONLY: True})`` writes to the log file only, not to the console.
FILE_ONLY = "roimae_file_only"


class _LogFile(logging.FileHandler):
    """The run's log file; a failed write (a full disk) is dropped, not printed as a traceback.

    The console handler still shows every message, and the error that the full disk causes in
    the outputs is reported once, as one line, by the writer that hit it.
    """

    def handleError(self, record: logging.LogRecord) -> None:
        pass


def get_logger(name: str | None = None) -> logging.Logger:
    """Return the package logger or one of its children (``roimae.<name>``)."""
    return logging.getLogger(LOGGER_NAME if name is None else f"{LOGGER_NAME}.{name}")


def reset_logging() -> logging.Logger:
    """Close and drop the ``roimae`` logger's handlers; it propagates again, with no level set."""
    logger = get_logger()
    for handler in logger.handlers:
        handler.close()
    logger.handlers.clear()
    logger.setLevel(logging.NOTSET)
    logger.propagate = True
    return logger


def setup_logging(verbosity: int, log_file: Path | None = None) -> logging.Logger:
    """Configure the ``roimae`` logger.

    Parameters
    ----------
    verbosity : int
        0 shows warnings and progress (INFO), 1 adds details (DEBUG), 2 adds library debug output;
        -1 shows warnings only (the non-zero ranks of a distributed run).
    log_file : Path, optional
        Also write every message at DEBUG level to this file.
    """
    logger = reset_logging()
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    console = logging.StreamHandler()
    console.setLevel(logging.DEBUG if verbosity >= 1 else
                     logging.INFO if verbosity == 0 else logging.WARNING)
    console.setFormatter(logging.Formatter("%(asctime)s [%(levelname)s] %(message)s", "%H:%M:%S"))
    console.addFilter(lambda record: not getattr(record, FILE_ONLY, False))
    logger.addHandler(console)
    if log_file is not None:
        file_handler = _LogFile(log_file, encoding="utf-8")
        file_handler.setLevel(logging.DEBUG)
        file_handler.setFormatter(
            logging.Formatter("%(asctime)s %(name)s [%(levelname)s] %(message)s")
        )
        logger.addHandler(file_handler)
    if verbosity < 2:
        for noisy in ("bids", "nibabel", "matplotlib", "PIL", "filelock"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return logger
