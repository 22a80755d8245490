"""The dependency floors that pyproject.toml declares are true: CI's second job (.ci/run) installs exactly those
versions (.ci/floors.txt) and runs this file, tests/test_tiny_checkpoints.py, tests/test_pipelines_api.py and the
ipywidgets slider test there; in the main job the same tests run on today's versions."""

import importlib
import os
import re
from importlib.metadata import version
from pathlib import Path

import pytest
import torch
from packaging.version import Version

from minidiff.checkpoints import TINY_SD
from minidiff.core.compat import DTYPE_KEYWORD_SINCE, transformers_dtype_kwargs

REPO = Path(__file__).resolve().parents[1]
FLOORS_FILE = REPO / ".ci" / "floors.txt"
# .ci/run sets it in the floor job, where the installed versions must be the floors themselves.
IN_FLOOR_JOB = os.environ.get("MINIDIFF_FLOOR_JOB", "") == "1"


def floors_run_in_ci() -> dict[str, Version]:
    """.ci/floors.txt: `name==version` lines -> {name: version}."""
    pins = {}
    for line in FLOORS_FILE.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, pinned = line.partition("==")
            assert pinned, f"{FLOORS_FILE}: expected 'name==version', found {line!r}"
            pins[name.strip()] = Version(pinned.strip())
    return pins


def declared_floors(requirements: list[str]) -> dict[str, Version]:
    """["transformers>=4.35.2", ...] -> {"transformers": Version("4.35.2"), ...} (only `>=` requirements)."""
    floors = {}
    for requirement in requirements:
        match = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([0-9][0-9A-Za-z.]*)\s*", requirement)
        if match:
            floors[match[1]] = Version(match[2])
    return floors


def pyproject_dependencies() -> list[str]:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    return tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]


def environment_yml_pip_lines() -> list[str]:
    """The `- name>=version` lines of environment.yml's pip section (read as text: no YAML parser needed)."""
    lines = (REPO / "environment.yml").read_text().splitlines()
    return [line.split("#")[0].strip().removeprefix("- ").strip() for line in lines if line.strip().startswith("- ")]


def test_ci_runs_the_floors_that_pyproject_declares():
    declared = declared_floors(pyproject_dependencies())
    run = floors_run_in_ci()
    assert set(run) == {"transformers", "huggingface_hub", "ipywidgets"}, sorted(run)
    wrong = {name: (str(declared.get(name)), str(pinned)) for name, pinned in run.items()
             if declared.get(name) != pinned}
    assert not wrong, f"pyproject.toml's floor != the version .ci/floors.txt runs (declared, run): {wrong}"


def test_environment_yml_declares_the_same_floors():
    declared = declared_floors(pyproject_dependencies())
    in_yml = declared_floors(environment_yml_pip_lines())
    wrong = {name: (str(in_yml.get(name)), str(floor)) for name, floor in floors_run_in_ci().items()
             if in_yml.get(name) != floor}
    assert not wrong, f"environment.yml's floor != .ci/floors.txt's (environment.yml, floors.txt): {wrong}"
    assert all(declared[name] == floor for name, floor in in_yml.items() if name in declared)


@pytest.mark.parametrize("module", ["torch", "numpy", "transformers", "safetensors", "huggingface_hub",
                                    "matplotlib", "ipywidgets", "tqdm", "PIL"])
def test_every_dependency_imports(module):
    """pyproject's dependencies import as installed (the slider test would only skip where ipywidgets fails)."""
    importlib.import_module(module)


def test_installed_versions_are_at_or_above_the_floors():
    installed = {name: Version(version(name)) for name in floors_run_in_ci()}
    too_old = {name: str(v) for name, v in installed.items() if v < floors_run_in_ci()[name]}
    assert not too_old, f"installed below the declared floor: {too_old}; pip install -U them"
    if IN_FLOOR_JOB:  # the floor job must really run at the floors, not at whatever pip preferred
        assert installed == floors_run_in_ci(), {name: str(v) for name, v in installed.items()}


def test_text_encoder_dtype_keyword_fits_the_installed_transformers():
    from transformers import CLIPTextModel

    folder = os.path.join(TINY_SD, "text_encoder")
    kwargs = transformers_dtype_kwargs(torch.float16)
    assert CLIPTextModel.from_pretrained(folder, **kwargs).dtype == torch.float16
    if Version(version("transformers")).release[:2] >= DTYPE_KEYWORD_SINCE:
        assert kwargs == {"dtype": torch.float16}
    else:
        assert kwargs == {"torch_dtype": torch.float16}
        with pytest.raises(TypeError):  # why the helper exists: `dtype=` is new in 4.56
            CLIPTextModel.from_pretrained(folder, dtype=torch.float16)


def test_pipeline_loads_its_text_encoder_in_the_asked_dtype():
    import minidiff

    pipe = minidiff.DiffusionPipeline.from_pretrained("tiny-sd", torch_dtype=torch.bfloat16)
    assert pipe.text_encoder.dtype == torch.bfloat16 and pipe.unet.dtype == torch.bfloat16
