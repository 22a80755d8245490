"""Shared test fixtures: the reference configs of the real checkpoints, and random-weight helpers."""

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
# ../shared/reference beside the repository (CI has it); MINIDIFF_REFERENCE overrides.
REFERENCE = Path(os.environ.get("MINIDIFF_REFERENCE", REPO.parent / "shared" / "reference"))


@pytest.fixture
def reference_dir() -> Path:
    """The folder of real config files (ddpm-cat-256/, stable-diffusion-v1-4/); skips where it is absent."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference configs not found at {REFERENCE} (set MINIDIFF_REFERENCE)")
    return REFERENCE


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
