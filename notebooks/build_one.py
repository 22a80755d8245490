"""Write and run ONE notebook from a spec module that is not yet part of the course (while it is written).

    python notebooks/build_one.py notebooks/course_control_13_guidance.py 13

The module defines `SPEC` (the format of course_training.TRAINING); NN is the notebook's number. The
notebook is written to notebooks/<SPEC["file"]>, executed in place, and its run time and size printed.
Once a spec is part of course_cells.py, `python notebooks/build.py --execute NN` does the same.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import nbformat

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import build  # noqa: E402


def main() -> None:
    path, number = Path(sys.argv[1]), int(sys.argv[2])
    module_spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    spec = dict(module.SPEC, number=number)
    # i = the last index: the notebook ends with "That was the last notebook" until it joins the course
    nb = build.build(spec, len(build.NOTEBOOKS) - 1, build.repository_url())
    out = HERE / spec["file"]
    nbformat.write(nb, out)
    seconds = build.execute(out)
    print(f"{out.name}: {seconds:.1f} s, {out.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
