"""BIDS input and output: find the preprocessed BOLD runs, validate them, write derivatives."""

from bidsapp.bids.derivatives import (
    ENTITY_ORDER,
    DerivativesWriter,
    build_filename,
    check_label,
    parse_filename,
)
from bidsapp.bids.layout import BoldRun, InputDataset, discover_runs
from bidsapp.bids.validation import ValidatorIssue, run_bids_validator, validate_input

__all__ = [
    "ENTITY_ORDER",
    "BoldRun",
    "DerivativesWriter",
    "InputDataset",
    "ValidatorIssue",
    "build_filename",
    "check_label",
    "discover_runs",
    "parse_filename",
    "run_bids_validator",
    "validate_input",
]
