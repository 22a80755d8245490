"""Writes the course notebooks (01_...ipynb .. 11_...ipynb) from the cells in `course_cells.py`, and runs them.

The .ipynb files are what is committed and read; this script keeps their frame identical (title, Colab
badge, install cell, setup cell, exercises, link to the next notebook) and the repository URL in one
place: pyproject.toml's [project.urls] Repository.

    python notebooks/build.py                 # write the notebooks (no outputs)
    python notebooks/build.py --execute       # write, then run each one in place on this machine, timed
    python notebooks/build.py --execute 07    # only notebooks whose name starts with 07
    python notebooks/build.py --execute --times times.json   # and write the seconds per notebook

Run `--execute` with the tiny checkpoints on a CPU (the default without a GPU) before committing: the
committed outputs are what nbval compares in the cells marked `# NBVAL_CHECK_OUTPUT`.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
import tomllib
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

from course_cells import NOTEBOOKS  # noqa: E402


def repository_url() -> str:
    """The one place the repository URL is declared: pyproject.toml, [project.urls] Repository."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject["project"]["urls"]["Repository"].rstrip("/")


def md(text: str):
    return nbformat.v4.new_markdown_cell(textwrap.dedent(text).strip("\n"))


def code(text: str):
    return nbformat.v4.new_code_cell(textwrap.dedent(text).strip("\n"))


def frame_cells(i: int, spec: dict, url: str) -> tuple[list, list]:
    """The cells every notebook starts and ends with."""
    slug = url.removeprefix("https://github.com/")
    name = spec["file"]
    badge = (f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]"
             f"(https://colab.research.google.com/github/{slug}/blob/main/notebooks/{name})")
    learn = "\n".join(f"- {item}" for item in spec["learn"])
    head = [
        md(f"# {spec['number']:02d} · {spec['title']}\n\n{badge}\n\n{spec['intro'].strip()}\n\n"
           f"**What you will learn**\n\n{learn}"),
        code(f'''
            # Colab / Studio Lab: install minidiff from its repository (skipped where it is installed already;
            # in a clone of the repository run `pip install -e ".[notebooks]"` instead).
            import importlib.util, subprocess, sys
            if importlib.util.find_spec("minidiff") is None:
                subprocess.run([sys.executable, "-m", "pip", "install", "-q",
                                "minidiff[notebooks] @ git+{url}"], check=True)
        '''),
        md("""
            Which checkpoints and which device? `course.setup()` decides from the environment variables
            `MINIDIFF_MODELS` (`tiny` / `hub` / `auto`) and `MINIDIFF_DEVICE` (`cpu` / `cuda` / `auto`), and
            prints what it chose and why. With a GPU and the hub reachable you get the real checkpoints
            (google/ddpm-cat-256, CompVis/stable-diffusion-v1-4); otherwise the tiny ones bundled with minidiff,
            which run in seconds on a CPU.
        """),
        code("""
            import torch
            import minidiff
            from minidiff import course, viz

            setup = course.setup()   # prints the models, the device and the reasons
        """),
    ]
    exercises = "\n".join(f"{k}. {e}" for k, e in enumerate(spec["exercises"], 1))
    tail = [md(f"## Exercises\n\n{exercises}")]
    if i + 1 < len(NOTEBOOKS):
        nxt = NOTEBOOKS[i + 1]
        tail.append(md(f"**Next:** [{nxt['number']:02d} · {nxt['title']}]({nxt['file']})"))
    else:
        tail.append(md("**That was the last notebook.** Back to the start: [01 · Quickstart](01_quickstart.ipynb)"))
    return head, tail


def build(spec: dict, i: int, url: str) -> nbformat.NotebookNode:
    head, tail = frame_cells(i, spec, url)
    body = [md(text) if kind == "md" else code(text) for kind, text in spec["cells"]]
    nb = nbformat.v4.new_notebook(cells=head + body + tail)
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    nb.metadata["accelerator"] = "GPU"   # Colab: ask for a GPU runtime (the hub checkpoints need one)
    return nb


def execute(path: Path) -> float:
    """Run the notebook in place (its outputs are what gets committed); stop at the first failing cell."""
    from run_course import run_notebook

    result = run_notebook(path, out_path=path)
    if result["error"]:
        raise SystemExit(f"{path.name} failed: {result['error']}")
    return result["seconds"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--execute", action="store_true", help="run each written notebook in place")
    parser.add_argument("--times", help="also write the run times (seconds per notebook) to this JSON file")
    parser.add_argument("only", nargs="*", help="prefixes of the notebooks to write (default: all)")
    args = parser.parse_args()
    url = repository_url()
    times = {}
    for i, spec in enumerate(NOTEBOOKS):
        if args.only and not any(spec["file"].startswith(p) for p in args.only):
            continue
        path = HERE / spec["file"]
        nbformat.write(build(spec, i, url), path)
        if args.execute:
            times[spec["file"]] = execute(path)
            size = path.stat().st_size
            print(f"{spec['file']:45s} {times[spec['file']]:6.1f} s  {size / 1e3:6.0f} kB", flush=True)
        else:
            print(f"wrote {path.relative_to(REPO)}")
    if times:
        print(f"{'total':45s} {sum(times.values()):6.1f} s")
        if args.times:
            Path(args.times).write_text(json.dumps(times, indent=1))


if __name__ == "__main__":
    main()
