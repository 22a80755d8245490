"""The committed notebooks are the course's source: their uniform frame (badge, install cell, setup cell, what
you will learn, exercises, link to the next), their normalised form (notebooks/execute.py: stable cell ids, no
volatile metadata), a teacher's edit surviving execute.py, and the install cell's lean Colab install.
nbval runs the notebooks themselves (`python -m pytest notebooks/NN_*.ipynb`)."""

import importlib.metadata
import importlib.util
import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path
from types import SimpleNamespace

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
REPO_URL = PYPROJECT["project"]["urls"]["Repository"].rstrip("/")
EXECUTE = REPO / "notebooks" / "execute.py"


def load_execute():
    """notebooks/execute.py as a module (it imports run_course.py from its own folder)."""
    sys.path.insert(0, str(REPO / "notebooks"))
    try:
        spec = importlib.util.spec_from_file_location("course_execute", EXECUTE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "notebooks"))
    return module


def cells(path):
    return nbformat.read(path, as_version=nbformat.NO_CONVERT).cells


def code_cells(path):
    return [c for c in cells(path) if c.cell_type == "code"]


# --- the committed notebooks ------------------------------------------------------------------------------

def test_the_notebooks_are_numbered_in_course_order():
    assert len(NOTEBOOKS) >= 16                                          # 01-11 the course, 12-16 controlled generation
    assert [p.name[:2] for p in NOTEBOOKS] == [f"{i:02d}" for i in range(1, len(NOTEBOOKS) + 1)]
    for path in NOTEBOOKS:                                               # the title carries the file's number
        assert cells(path)[0].source.startswith(f"# {path.name[:2]} · "), f"{path.name}: title must be '# NN · ...'"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_notebook_frame(path):
    """Every notebook opens with title, Colab badge and what you will learn, then the install cell and the setup
    cell, and ends with exercises and a link to the next notebook."""
    assert path.stat().st_size < 1_000_000, f"{path.name} is {path.stat().st_size} bytes; keep outputs small"
    nb = cells(path)
    code = [c for c in nb if c.cell_type == "code"]
    slug = REPO_URL.removeprefix("https://github.com/")
    # the badge points at this very file in the repository declared in pyproject
    badge = f"(https://colab.research.google.com/github/{slug}/blob/main/notebooks/{path.name})"
    assert badge in nb[0].source and "**What you will learn**" in nb[0].source
    # the install cell is the same in every notebook (test_install_cell_* below) and the setup cell follows it
    assert code[0].source == code_cells(NOTEBOOKS[0])[0].source, f"{path.name}: install cell differs from 01's"
    assert "course.setup()" in code[1].source
    first_output = next(o for c in code for o in c.outputs)              # the setup's printed choice comes first
    assert first_output.get("text", "").startswith("minidiff course setup")
    # the end: exercises, then the link to the next notebook (the last one links back to the first)
    assert nb[-2].cell_type == "markdown" and nb[-2].source.startswith("## Exercises\n\n1. ")
    i = NOTEBOOKS.index(path)
    following = NOTEBOOKS[(i + 1) % len(NOTEBOOKS)].name
    assert nb[-1].cell_type == "markdown" and f"]({following})" in nb[-1].source, f"{path.name}: link {following}"
    # executed, with checked outputs, no error, and never importing the test-only reference library
    assert all(c.execution_count is not None for c in code), f"{path.name} has cells that never ran"
    assert sum("# NBVAL_CHECK_OUTPUT" in c.source for c in code) >= 1
    assert not any(re.search(r"^\s*(import|from)\s+diffusers", c.source, re.M) for c in code)
    errors = [o for c in code for o in c.outputs if o.output_type == "error"]
    assert not errors, f"{path.name} was committed with an error output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_notebook_is_normalised(path):
    """Stable, unique cell ids and no volatile metadata or progress bars: what execute.py writes, byte for byte."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert (nb["nbformat"], nb["nbformat_minor"]) == (4, 5)
    ids = [c.get("id") for c in nb["cells"]]
    assert all(ids) and len(set(ids)) == len(ids), f"{path.name}: cell ids missing or repeated"
    assert "widgets" not in nb["metadata"] and "version" not in nb["metadata"].get("language_info", {})
    for c in nb["cells"]:
        assert not {"execution", "ExecuteTime", "colab", "outputId"} & set(c["metadata"]), f"{path.name} {c['id']}"
        for o in c.get("outputs", []):
            assert "application/vnd.jupyter.widget-view+json" not in o.get("data", {}), f"{path.name} {c['id']}"
    assert load_execute().is_normalised(path), (f"{path.name} is not in execute.py's layout: run "
                                                f"`python notebooks/execute.py --normalise-only {path.name[:2]}`")


# --- execute.py on a teacher's edit ----------------------------------------------------------------------

def jupyter_saved_notebook(path: Path) -> None:
    """A notebook as JupyterLab / nbclient save it: cell ids, timing metadata, widget state, a tqdm bar, the
    kernel's Python version."""
    timing = {"execution": {"iopub.execute_input": "2026-01-01T00:00:00.000001Z",
                            "shell.execute_reply": "2026-01-01T00:00:01.000001Z"}}
    bar = {"output_type": "display_data", "metadata": {},
           "data": {"application/vnd.jupyter.widget-view+json": {"model_id": "5e1f", "version_major": 2,
                                                                 "version_minor": 0},
                    "text/plain": ["ddpm:   0%|          | 0/20 [00:00<?, ?it/s]"]}}
    nb = {"nbformat": 4, "nbformat_minor": 5,
          "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
                       "language_info": {"name": "python", "version": "3.11.7"},
                       "widgets": {"application/vnd.jupyter.widget-state+json": {"state": {}}}},
          "cells": [
              {"cell_type": "markdown", "id": "title", "metadata": {},
               "source": ["# 99 · A test\n", "\n", "Old text."]},
              {"cell_type": "code", "id": "sum", "execution_count": 1, "metadata": dict(timing),
               "outputs": [{"output_type": "stream", "name": "stdout", "text": ["5"]}, bar,   # one print, split
                           {"output_type": "stream", "name": "stdout", "text": ["\n"]}],
               "source": ["print(2 + 3)"]},
              {"cell_type": "code", "id": "ab12cd34", "execution_count": 2, "metadata": {"tags": ["keep"], **timing},
               "outputs": [], "source": ["x = 1"]}]}
    path.write_text(json.dumps(nb, indent=1, sort_keys=True))


def test_a_teachers_edit_survives_normalising(tmp_path):
    path = tmp_path / "99_test.ipynb"
    jupyter_saved_notebook(path)
    nb = json.loads(path.read_text())
    nb["cells"][0]["source"] = ["# 99 · A test\n", "\n", "New text, written in Jupyter."]   # the teacher's edits
    nb["cells"][1]["source"] = ["print(2 + 4)"]
    path.write_text(json.dumps(nb, indent=1, sort_keys=True))
    run = subprocess.run([sys.executable, str(EXECUTE), "--normalise-only", str(path)], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    after = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    assert [c.source for c in after.cells] == ["# 99 · A test\n\nNew text, written in Jupyter.", "print(2 + 4)",
                                               "x = 1"]
    assert [c.id for c in after.cells] == ["title", "sum", "ab12cd34"]
    assert [c.metadata for c in after.cells] == [{}, {}, {"tags": ["keep"]}]   # timing gone, the teacher's tag kept
    assert after.cells[1].outputs == [{"output_type": "stream", "name": "stdout", "text": "5\n"}]   # bar gone, joined
    assert "widgets" not in after.metadata and after.metadata.language_info == {"name": "python"}
    text = path.read_text()
    subprocess.run([sys.executable, str(EXECUTE), "--normalise-only", str(path)], check=True, capture_output=True)
    assert path.read_text() == text                                      # normalising twice changes nothing
    assert load_execute().is_normalised(path)


def test_cells_without_ids_get_ids_from_number_and_position(tmp_path):
    """Colab saves nbformat 4.0, without cell ids; a pasted cell can repeat an id. Neither gets a random id."""
    execute = load_execute()
    path = tmp_path / "42_colab.ipynb"
    nb = {"nbformat": 4, "nbformat_minor": 0, "metadata": {"colab": {"provenance": []}},
          "cells": [{"cell_type": "markdown", "metadata": {}, "source": "# 42 · x"},
                    {"cell_type": "markdown", "id": "42-00", "metadata": {}, "source": "held"},
                    {"cell_type": "code", "metadata": {"colab": {"base_uri": "https://localhost:8080/"}},
                     "execution_count": None, "outputs": [], "source": "1"},
                    {"cell_type": "markdown", "id": "dup", "metadata": {}, "source": "a"},
                    {"cell_type": "markdown", "id": "dup", "metadata": {}, "source": "b"}]}
    path.write_text(json.dumps(nb))
    out = execute.normalise(execute.read(path), "42")
    assert [c.id for c in out.cells] == ["42-00x", "42-00", "42-02", "dup", "42-04"]
    assert out.nbformat_minor == 5 and "colab" not in out.metadata and out.cells[2].metadata == {}
    assert [c.source for c in out.cells] == ["# 42 · x", "held", "1", "a", "b"]


def test_execute_in_place_replaces_outputs_only_and_is_repeatable(tmp_path):
    """A real kernel: the new outputs come in, sources and ids stay, and a second run writes the same bytes."""
    path = tmp_path / "98_run.ipynb"
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# 98 · run", id="head"),
                                         nbformat.v4.new_code_cell("print(6 * 7)", id="mul"),
                                         nbformat.v4.new_code_cell("'out' + 'put'", id="expr")])
    nbformat.write(nb, path)
    subprocess.run([sys.executable, str(EXECUTE), str(path)], check=True, capture_output=True, timeout=120)
    after = nbformat.read(path, as_version=nbformat.NO_CONVERT)
    assert [c.id for c in after.cells] == ["head", "mul", "expr"]
    assert [c.source for c in after.cells] == ["# 98 · run", "print(6 * 7)", "'out' + 'put'"]
    assert after.cells[1].outputs[0].text == "42\n" and after.cells[1].execution_count == 1
    assert after.cells[2].outputs[0].data["text/plain"] == "'output'"
    assert all(c.metadata == {} for c in after.cells)                     # no timing metadata
    text = path.read_text()
    subprocess.run([sys.executable, str(EXECUTE), str(path)], check=True, capture_output=True, timeout=120)
    assert path.read_text() == text


def test_execute_leaves_a_failing_or_hub_run_notebook_as_it_was(tmp_path):
    """A cell that raises, or outputs made with other models than the tiny ones on the CPU (what nbval compares),
    are not written; one failure does not stop the next notebook."""
    fail, hub = tmp_path / "97_fail.ipynb", tmp_path / "96_hub.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell("raise ValueError('boom')", id="a")]),
                   fail)
    printout = "minidiff course setup\n  models : hub\n  DDPM   : google/ddpm-cat-256\n  device : cuda\n"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(f"print({printout!r}, end='')", id="a")]),
                   hub)
    texts = fail.read_text(), hub.read_text()
    run = subprocess.run([sys.executable, str(EXECUTE), str(fail), str(hub)], capture_output=True, text=True,
                         timeout=180)
    assert run.returncode != 0
    assert "97_fail.ipynb failed, file left as it was: ValueError: boom" in run.stderr
    assert "96_hub.ipynb ran with models 'hub' on device 'cuda'" in run.stderr and "MINIDIFF_MODELS=tiny" in run.stderr
    assert (fail.read_text(), hub.read_text()) == texts


def test_execute_names_what_it_cannot_find():
    run = subprocess.run([sys.executable, str(EXECUTE), "--check", "77"], capture_output=True, text=True)
    assert run.returncode != 0 and "no notebook 77" in run.stderr


# --- the install cell: lean on Colab, and says when the runtime must restart ------------------------------

def run_install_cell(monkeypatch, capsys, upgrade: dict[str, tuple[str, str]], loaded: set[str]):
    """Run the committed install cell as if minidiff were missing: pip is replaced by a stand-in that changes
    the versions in `upgrade` ({distribution: (before, after)}); `loaded` are the modules already imported
    (numpy, PIL, skimage, standing in as fake_numpy, ...).
    Returns the pip command, what the cell printed, and the SystemExit it raised (or None)."""
    source = code_cells(NOTEBOOKS[0])[0].source
    versions = {"numpy": "2.0.0", "Pillow": "10.0.0", "scikit_image": "0.25.0"}
    versions.update({name: old for name, (old, new) in upgrade.items()})
    commands = []

    def fake_pip(command, check):
        commands.append(command)
        versions.update({name: new for name, (old, new) in upgrade.items()})
        versions["minidiff"] = "0.1.0"

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "minidiff" else real_find_spec(name, *a))
    monkeypatch.setattr(subprocess, "run", fake_pip)
    monkeypatch.setattr(importlib.metadata, "distributions",
                        lambda: [SimpleNamespace(metadata={"Name": n}, version=v) for n, v in versions.items()])
    # stand-in module names, so that the real numpy or PIL in sys.modules is never touched
    monkeypatch.setattr(importlib.metadata, "packages_distributions", lambda: {
        "fake_numpy": ["numpy"], "fake_PIL": ["Pillow"], "fake_skimage": ["scikit_image"]})
    for module in loaded:
        monkeypatch.setitem(sys.modules, f"fake_{module}", SimpleNamespace())
    capsys.readouterr()
    try:
        exec(compile(source, "install_cell", "exec"), {})
    except SystemExit as stop:
        return commands, capsys.readouterr().out, stop
    return commands, capsys.readouterr().out, None


def test_install_cell_installs_only_the_colab_extra(monkeypatch, capsys):
    commands, printed, stop = run_install_cell(monkeypatch, capsys, upgrade={}, loaded={"numpy", "PIL"})
    assert commands == [[sys.executable, "-m", "pip", "install", "-q", f"minidiff[colab] @ git+{REPO_URL}"]]
    assert printed == "" and stop is None
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert [e.split(">")[0] for e in extras["colab"]] == ["scikit-image"]    # what the notebooks import beyond minidiff
    assert not {"jupyter", "nbval", "ipywidgets", "diffusers"} & {re.split(r"[<>=\[ ]", e)[0] for e in extras["colab"]}


def test_install_cell_asks_for_a_restart_when_an_imported_package_was_upgraded(monkeypatch, capsys):
    commands, printed, stop = run_install_cell(monkeypatch, capsys, upgrade={"Pillow": ("9.0.0", "10.1.0")},
                                               loaded={"PIL"})
    assert "RESTART NEEDED: pip upgraded pillow, already imported" in printed and "Restart session" in printed
    assert stop is not None and "restart the runtime" in str(stop)


def test_install_cell_does_not_ask_for_a_restart_for_a_package_not_yet_imported(monkeypatch, capsys):
    commands, printed, stop = run_install_cell(monkeypatch, capsys, upgrade={"scikit_image": ("0.20.0", "0.25.0")},
                                               loaded={"numpy"})
    assert printed == "" and stop is None and len(commands) == 1


def test_environment_yml_is_studio_lab_ready():
    yaml = pytest.importorskip("yaml")
    env = yaml.safe_load((REPO / "environment.yml").read_text())
    deps = env["dependencies"]
    assert "python=3.11" in deps and "pip" in deps and "ipykernel" in deps
    pip = next(d["pip"] for d in deps if isinstance(d, dict))
    assert any(p.startswith("torch") for p in pip)
    assert any(p.replace(" ", "").startswith("-e.[notebooks") for p in pip)   # the repository, with the course extras
    extras = PYPROJECT["project"]["optional-dependencies"]["notebooks"]
    assert any(e.startswith("nbval") for e in extras) and any(e.startswith("jupyter") for e in extras)
