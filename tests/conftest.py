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


# In CI (CI=true, as CI services set it) or with MINIDIFF_REQUIRE_REFERENCE=1 a missing folder fails the tests
# that need it; elsewhere they are skipped and the run's summary says how many, so a missing folder cannot hide
# a skipped parity suite in a green run.
REFERENCE_REQUIRED = any(os.environ.get(v, "").lower() in ("1", "true", "yes") for v in ("CI", "MINIDIFF_REQUIRE_REFERENCE"))
REFERENCE_MISSING = f"reference configs not found at {REFERENCE}"


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The folder of real config files (ddpm-cat-256/, stable-diffusion-v1-4/); skips where it is absent."""
    if not REFERENCE.is_dir():
        help = "put the folder there or set MINIDIFF_REFERENCE to its path"
        if REFERENCE_REQUIRED:
            pytest.fail(f"{REFERENCE_MISSING}: {help} (CI / MINIDIFF_REQUIRE_REFERENCE requires it).")
        pytest.skip(f"{REFERENCE_MISSING} ({help})")
    return REFERENCE


def pytest_terminal_summary(terminalreporter):
    """One line at the end of the run when tests were skipped for want of ../shared/reference."""
    skipped = [r for r in terminalreporter.stats.get("skipped", []) if REFERENCE_MISSING in str(r.longrepr)]
    if skipped:
        terminalreporter.write_sep("!", f"{len(skipped)} tests did NOT run: {REFERENCE_MISSING} "
                                        "(parity with the real SD v1-4 / ddpm-cat-256 configs unchecked; "
                                        "set MINIDIFF_REFERENCE)", red=True, bold=True)


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
