"""The course's exercises: in every notebook the `## Exercises` cell numbers its exercises 1, 2, ..., gives each a
`*Hint:*` line and ends with the link to the teacher's key, and the key notebooks/solutions/NN_solutions.md has
exactly one `## Exercise k` section, with an answer in it, per exercise (see notebooks/solutions/README.md)."""

import re
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((REPO / "notebooks").glob("[0-9][0-9]_*.ipynb"))
SOLUTIONS = REPO / "notebooks" / "solutions"
ITEM = re.compile(r"^(\d+)\. ", re.M)                     # a numbered exercise, at the start of a line
SECTION = re.compile(r"^## Exercise (\d+)[ \t]*$", re.M)   # a section of the key


def exercises_cell(path: Path) -> str:
    cells = [c for c in nbformat.read(path, as_version=nbformat.NO_CONVERT).cells
             if c.cell_type == "markdown" and c.source.startswith("## Exercises")]
    assert len(cells) == 1, f"{path.name}: expected one markdown cell starting '## Exercises', found {len(cells)}"
    return cells[0].source


def exercises(source: str) -> dict[int, str]:
    """{number: text up to the next exercise or the closing link}, in the order written."""
    body = source.split("Solutions for teachers:")[0]
    starts = list(ITEM.finditer(body))
    return {int(m.group(1)): body[m.start():(starts[i + 1].start() if i + 1 < len(starts) else len(body))]
            for i, m in enumerate(starts)}


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name[:2])
def test_exercises_have_hints_and_a_key(path):
    number = path.name[:2]
    source = exercises_cell(path)
    items = exercises(source)
    assert items, f"{path.name}: the Exercises cell has no numbered exercise ('1. ...' at the start of a line)"
    assert list(items) == list(range(1, len(items) + 1)), \
        f"{path.name}: exercises numbered {list(items)}; number them 1, 2, ... in order"
    for k, text in items.items():
        assert text.count("*Hint:*") == 1, \
            f"{path.name}, exercise {k}: expected one '*Hint:* ...' line under it, found {text.count('*Hint:*')}"
    link = f"Solutions for teachers: [solutions/{number}_solutions.md](solutions/{number}_solutions.md)"
    assert source.rstrip().splitlines()[-1].strip() == link, f"{path.name}: the Exercises cell must end with: {link}"

    key = SOLUTIONS / f"{number}_solutions.md"
    assert key.is_file(), f"{path.name}: the teacher's key {key.relative_to(REPO)} is missing"
    text = key.read_text(encoding="utf-8")
    sections = [int(k) for k in SECTION.findall(text)]
    assert sections == list(range(1, len(items) + 1)), \
        f"{key.name}: sections '## Exercise k' found for k = {sections}; expected exactly 1..{len(items)}, in order"
    bodies = SECTION.split(text)[2::2]                      # the text after each heading
    for k, body in enumerate(bodies, 1):
        assert len(body.strip()) > 40, f"{key.name}, exercise {k}: the section holds no worked answer"


def test_every_key_belongs_to_a_notebook():
    numbers = {p.name[:2] for p in NOTEBOOKS}
    keys = sorted(SOLUTIONS.glob("*_solutions.md"))
    orphans = [k.name for k in keys if k.name[:2] not in numbers]
    assert not orphans, f"keys without a notebook: {orphans}; name them NN_solutions.md after notebooks/NN_*.ipynb"
    assert (SOLUTIONS / "README.md").is_file(), "notebooks/solutions/README.md says what the key is for teachers"
