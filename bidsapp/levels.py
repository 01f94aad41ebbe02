"""The dispatch from a validated :class:`~bidsapp.config.Config` to the level that does the work.

Data flows one way: CLI (:mod:`bidsapp.cli`) -> config -> this module -> the level (:mod:`bidsapp.pretrain`,
:mod:`bidsapp.participant`, :mod:`bidsapp.group`) -> writers. This is the only module that imports
the levels.
"""

from __future__ import annotations

import uuid
from datetime import datetime, timezone
from pathlib import Path

from bidsapp import group, participant, pretrain
from bidsapp.caches import prepare_caches
from bidsapp.config import Config, check_paths
from bidsapp.distributed import env_rank
from bidsapp.errors import interruption_in, interruption_message
from bidsapp.io import atomic_write_text, ensure_dir
from bidsapp.logs import FILE_ONLY, get_logger, setup_logging
from bidsapp.outputs import LOGS_DIR
from bidsapp.runtime import check_cpu_bf16, resolve_device, set_threads


def start_run(config: Config) -> Path | None:
    """Create OUTPUT_DIR, the work directory and the log, and save the config; return the log.

    Under torchrun only rank 0 writes the log file and the config; other ranks log to stderr.
    """
    ensure_dir(config.output_dir)
    ensure_dir(config.work_dir)
    if env_rank() != 0:
        setup_logging(-1 if config.verbosity == 0 else config.verbosity)
        return None
    logs_dir = ensure_dir(config.output_dir / LOGS_DIR)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    run_id = f"{config.analysis_level}-{stamp}_{uuid.uuid4().hex[:8]}"
    log_file = logs_dir / f"roimae-{run_id}.log"
    setup_logging(config.verbosity, log_file)
    atomic_write_text(logs_dir / f"roimae-{run_id}_config.json", config.to_json() + "\n")
    return log_file


def run(config: Config) -> int:
    """Run the analysis level of ``config``; return the exit code (errors are raised)."""
    check_paths(config)
    device = resolve_device(config.device)
    if config.analysis_level == "pretrain" and config.pretrain.cpu_bf16:
        check_cpu_bf16(device)
    start_run(config)
    moved = prepare_caches(config.work_dir)   # again: for callers other than the CLI
    set_threads(config.omp_nthreads)
    log = get_logger()
    log.info("roimae %s level on %s (device %s, %d threads)", config.analysis_level,
             config.bids_dir, device, config.omp_nthreads)
    if moved:
        log.info("%s in %s: their default directories are not writable or not this user's",
                 ", ".join(moved), next(iter(moved.values())).parent)
    try:
        try:
            # Looked up at call time (module.function), so a test can replace a level.
            if config.analysis_level == "pretrain":
                pretrain.run_pretrain(config, device)
            elif config.analysis_level == "participant":
                participant.run_participant(config, device)
            else:
                group.run_group(config)
        except Exception as exc:
            interruption = interruption_in(exc)
            if interruption is not None:
                raise interruption from exc
            # DEBUG reaches the log file (not the console, where the CLI prints the error line).
            log.debug("failed: %s: %s", type(exc).__name__, exc, exc_info=True)
            raise
    except KeyboardInterrupt as exc:   # SIGINT, or SIGTERM (bidsapp.errors.Terminated)
        # The log file only: the CLI prints the same line on the console.
        log.error("%s", interruption_message(exc), extra={FILE_ONLY: True})
        raise
    log.info("roimae %s level finished; outputs in %s", config.analysis_level, config.output_dir)
    return 0
