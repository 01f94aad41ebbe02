"""Shared test fixtures: paths to the read-only data in ``../shared`` (never copied here)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("ROIMAE_SHARED_DIR", REPO_ROOT.parent / "shared"))
# Set at import, not only per test, so that module- and session-scoped fixtures read the local
# copy too (nothing is ever downloaded in tests).
os.environ.setdefault("ROIMAE_ATLAS_DIR", str(SHARED_DIR / "atlas" / "aal3"))


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    if not SHARED_DIR.is_dir():
        pytest.fail(f"shared data not found at {SHARED_DIR} (set ROIMAE_SHARED_DIR)")
    return SHARED_DIR


@pytest.fixture(scope="session")
def atlas_dir(shared_dir: Path) -> Path:
    return Path(os.environ.get("ROIMAE_ATLAS_DIR", shared_dir / "atlas" / "aal3"))


@pytest.fixture(scope="session")
def bids_examples(shared_dir: Path) -> Path:
    return shared_dir / "fixtures" / "bids-examples"


@pytest.fixture(autouse=True)
def _atlas_env(monkeypatch: pytest.MonkeyPatch, atlas_dir: Path) -> None:
    """Every test reads AAL3 from the local copy; nothing is downloaded."""
    monkeypatch.setenv("ROIMAE_ATLAS_DIR", str(atlas_dir))
