"""Shared test fixtures: the reference configs of the real checkpoints, one CPU thread, the tiny-sd pipelines.
(Plain helper functions are in tests/helpers.py.)"""

import os
from pathlib import Path

import pytest
import torch

import minidiff
from helpers import load_diffusers, load_minidiff

REPO = Path(__file__).resolve().parents[1]
# ../shared/reference beside the repository (CI has it); MINIDIFF_REFERENCE overrides.
REFERENCE = Path(os.environ.get("MINIDIFF_REFERENCE", REPO.parent / "shared" / "reference"))


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder of real config files (ddpm-cat-256/, stable-diffusion-v1-4/); skips where it is absent."""
    if not REFERENCE.is_dir():
        pytest.skip(f"reference configs not found at {REFERENCE} (set MINIDIFF_REFERENCE)")
    return REFERENCE


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Models this small run fastest on one CPU thread, and do not stall when other jobs share the cores.
    A test module asks for it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_sd_pair():
    """(minidiff, diffusers) text-to-image pipelines on tiny-sd, progress bars off. Shared by every module that
    asks: do not change them (scheduler, weights); build a pipeline on their `.components` for that."""
    return load_minidiff(minidiff.DiffusionPipeline), load_diffusers("StableDiffusionPipeline")
