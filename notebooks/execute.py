"""Execute the course notebooks in place and normalise them: the committed .ipynb files are the source.

Edit a notebook in Jupyter, Colab or any editor, then run this script. It never changes a cell's source: it
replaces the outputs and execution counts (a fresh `python3` kernel through nbclient, as run_course.py does)
and writes the file in one stable layout, so that `git diff` shows only what really changed:

- cell ids (nbformat 4.5) are kept; a cell without one (a notebook saved by Colab, a cell written by hand)
  or with a duplicate (a cell copied and pasted) gets `NN-index`, from the notebook's number and the cell's
  position, and keeps it from then on;
- volatile metadata goes: execution timestamps, widget state, Colab's and VS Code's bookkeeping, collapsed /
  scrolled view state, the kernel's Python version;
- tqdm progress bars go from the outputs; other widgets (a slider) keep their plain-text form only, since
  their state is not saved and a live widget cannot be shown from the file; consecutive outputs of one
  stream (stdout) are joined, as Jupyter shows them, since the kernel splits them where timing falls;
- JSON as Jupyter writes it (nbformat.write: indent 1, sorted keys, one string per source line).

The committed outputs are those of the tiny bundled checkpoints on the CPU, which nbval compares in CI in the
cells marked `# NBVAL_CHECK_OUTPUT`: the default on a machine without a GPU. Elsewhere set MINIDIFF_MODELS=tiny
MINIDIFF_DEVICE=cpu; a run whose `course.setup()` printed anything else is not written.

    OMP_NUM_THREADS=1 python notebooks/execute.py 07   # run notebook 07 in place (prefixes of file names)
    OMP_NUM_THREADS=1 python notebooks/execute.py      # every notebook, one after the other, timed
    python notebooks/execute.py --normalise-only 07    # normalise only (after a save in Jupyter), run nothing
    python notebooks/execute.py --check                # exit 1 naming the notebooks that are not normalised
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from run_course import run_cells  # noqa: E402

# Keys that record when, where or how a notebook was last viewed or run, not what it says.
VOLATILE_CELL_METADATA = (
    "execution",        # nbclient / JupyterLab "record timing": iopub and shell timestamps
    "ExecuteTime",      # the jupyter_contrib ExecuteTime extension
    "collapsed",        # Jupyter's view state of the output area
    "scrolled",
    "jp-MarkdownHeadingCollapsed",   # JupyterLab: a folded heading
    "colab",            # Colab: output heights, base_uri
    "outputId",         # Colab: an id per output, new at each run
)
VOLATILE_NOTEBOOK_METADATA = ("widgets", "colab", "vscode", "papermill", "toc")
WIDGET_MIME = "application/vnd.jupyter.widget-view+json"
# A tqdm bar as text: "ddpm:  45%|████▌     | 9/20 [00:01<00:02, 5.1it/s]"
PROGRESS_BAR = re.compile(r"\d+%\|.*\|\s*\d+/\d+\s*\[")
ANSI = re.compile(r"\x1b\[[0-9;]*m")                          # colours in a kernel's traceback
# What course.setup() prints first: the models and device the committed outputs must come from.
SETUP_CHOICE = re.compile(r"^minidiff course setup\n\s*models\s*:\s*(\S+)\n(?:.*\n)*?\s*device\s*:\s*(\S+)")


def is_progress_bar(output: dict) -> bool:
    """A tqdm bar: a widget whose text form is a bar, or a stderr stream made only of bar refreshes."""
    if output["output_type"] == "stream":
        parts = [p for p in re.split(r"[\r\n]", output["text"]) if p.strip()]
        return output["name"] == "stderr" and bool(parts) and all(PROGRESS_BAR.search(p) for p in parts)
    data = output.get("data", {})
    return WIDGET_MIME in data and bool(PROGRESS_BAR.search(data.get("text/plain", "")))


def read(path: Path) -> nbformat.NotebookNode:
    """The notebook as saved, without nbformat's upgrade, which would give every cell of a 4.0-4.4 file (Colab
    saves 4.0) a new random id."""
    text = path.read_text(encoding="utf-8")
    version = json.loads(text).get("nbformat")
    if version != 4:
        raise ValueError(f"{path.name}: nbformat {version} found, 4 expected; open it in Jupyter and save it "
                         "again to convert it.")
    return nbformat.reader.reads(text)          # joins each source's lines into one string, converts nothing


def normalise(nb: nbformat.NotebookNode, number: str) -> nbformat.NotebookNode:
    """Give every cell a stable id and drop volatile metadata and progress bars, in place; sources untouched.
    `number` ("07") prefixes the ids given to cells without one."""
    nb.nbformat, nb.nbformat_minor = 4, 5                        # 4.5: the version with cell ids
    for key in VOLATILE_NOTEBOOK_METADATA:
        nb.metadata.pop(key, None)
    nb.metadata.get("language_info", {}).pop("version", None)    # the Python version of whoever ran it last
    held = {cell.get("id") for cell in nb.cells}                 # ids that stay where they are
    seen = set()
    for index, cell in enumerate(nb.cells):
        if not cell.get("id") or cell["id"] in seen:
            cell["id"] = f"{number}-{index:02d}"
            while cell["id"] in held | seen:                     # another cell holds that name already
                cell["id"] += "x"
        seen.add(cell["id"])
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
        if cell.cell_type != "code":
            cell.pop("outputs", None)                            # only code cells have outputs and counts
            cell.pop("execution_count", None)
            continue
        cell.setdefault("execution_count", None)                 # a code cell written by hand may lack both
        outputs = []
        for output in cell.get("outputs", []):
            if is_progress_bar(output):
                continue
            output.get("data", {}).pop(WIDGET_MIME, None)        # the widget's state is not saved: keep its text
            previous = outputs[-1] if outputs else {}
            if output["output_type"] == previous.get("output_type") == "stream" and output["name"] == previous["name"]:
                previous["text"] += output["text"]               # one print may arrive in two messages
                continue
            outputs.append(output)
        cell.outputs = outputs
    nbformat.validate(nb)
    return nb


def to_text(nb: nbformat.NotebookNode) -> str:
    """The file's text as Jupyter writes it (nbformat.write adds the final newline)."""
    text = nbformat.writes(nb)
    return text if text.endswith("\n") else text + "\n"


def sources(nb: nbformat.NotebookNode) -> list[tuple[str, str]]:
    return [(cell.cell_type, cell.source) for cell in nb.cells]


def setup_choice(nb: nbformat.NotebookNode) -> tuple[str, str] | None:
    """(models, device) from the printout of `course.setup()`, if the notebook's first output is one."""
    first = next((o for c in nb.cells if c.cell_type == "code" for o in c.outputs), None)
    match = SETUP_CHOICE.match(first.get("text", "")) if first is not None else None
    return match.groups() if match else None


def execute_in_place(path: Path, timeout: int = 1200) -> dict:
    """Run the notebook and write its new outputs into the file; the sources are written back as they were
    read. Leaves the file as it was if a cell fails, or if its sources changed while it ran (a save in
    Jupyter meanwhile). Returns run_cells' result, whose "error" then says why."""
    nb = normalise(read(path), path.name[:2])
    before = sources(nb)
    result = run_cells(nb, timeout)
    if result["error"]:
        result["error"] = (f"{path.name} failed, file left as it was: {ANSI.sub('', result['error'])}\n"
                           f"  run `python -m pytest {path}` to see the failing cell and its traceback")
    elif (choice := setup_choice(nb)) not in (None, ("tiny", "cpu")):
        result["error"] = (f"{path.name} ran with models {choice[0]!r} on device {choice[1]!r}; the committed "
                           "outputs are the tiny checkpoints on the CPU (nbval compares them in CI). Not written: "
                           "run again with MINIDIFF_MODELS=tiny MINIDIFF_DEVICE=cpu")
    elif sources(nb) != before:                                  # nbclient only fills in outputs; check it
        raise RuntimeError(f"{path.name}: executing changed a cell's source; not written.")
    elif sources(normalise(read(path), path.name[:2])) != before:
        result["error"] = (f"{path.name} was saved with other sources while it ran; not written, so that "
                           "edit stays: run this script again")
    else:
        path.write_text(to_text(normalise(nb, path.name[:2])), encoding="utf-8")
    return result


def is_normalised(path: Path) -> bool:
    """Whether the file is byte for byte what `normalise` and nbformat.write would make of it."""
    return to_text(normalise(read(path), path.name[:2])) == path.read_text(encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--normalise-only", action="store_true", help="normalise in place, execute nothing")
    mode.add_argument("--check", action="store_true", help="change nothing; exit 1 if a notebook is not normalised")
    parser.add_argument("--times", help="also write the seconds per notebook to this JSON file")
    parser.add_argument("only", nargs="*", help="prefixes of the course's notebooks (default: all), e.g. 07, or "
                        "paths of .ipynb files")
    args = parser.parse_args()

    course = sorted(HERE.glob("[0-9][0-9]_*.ipynb"))
    files = [Path(p) for p in args.only if p.endswith(".ipynb")]          # a path: any notebook, e.g. a copy
    prefixes = [p for p in args.only if not p.endswith(".ipynb")]
    missing = [str(f) for f in files if not f.is_file()]
    missing += [p for p in prefixes if not any(path.name.startswith(p) for path in course)]
    if missing:
        raise SystemExit(f"no notebook {', '.join(missing)}: give notebook files or prefixes of the course's "
                         f"files in {HERE} ({course[0].name} .. {course[-1].name}).")
    paths = files + [path for path in course if any(path.name.startswith(p) for p in prefixes)]
    if not args.only:
        paths = course

    if args.check:
        stale = [path.name for path in paths if not is_normalised(path)]
        if stale:
            raise SystemExit("not normalised: " + ", ".join(stale) + "\nrun `python notebooks/execute.py "
                             "--normalise-only " + " ".join(name[:2] for name in stale) + "`")
        print(f"{len(paths)} notebooks normalised")
        return
    if args.normalise_only:
        for path in paths:
            path.write_text(to_text(normalise(read(path), path.name[:2])), encoding="utf-8")
            print(f"normalised {path.name}")
        return

    times, errors = {}, []
    for path in paths:                                           # a failure does not stop the others
        result = execute_in_place(path)
        times[path.name] = result["seconds"]
        if result["error"]:
            errors.append(result["error"])
            print(f"{path.name:50s} {result['seconds']:6.1f} s  FAILED", flush=True)
        else:
            print(f"{path.name:50s} {result['seconds']:6.1f} s  {path.stat().st_size / 1e3:6.0f} kB", flush=True)
    print(f"{'total':50s} {sum(times.values()):6.1f} s")
    if args.times:
        Path(args.times).write_text(json.dumps(times, indent=1))
    if errors:
        raise SystemExit("\n".join(errors))


if __name__ == "__main__":
    main()
