"""The package's shape: layers that only import downward, and no import cycle at all.

minidiff reads from the bottom up, one folder per layer:

    core (config, hub, utils, photos) -> blocks, loaders -> models -> schedulers -> pipelines
        -> techniques (control, training) -> plots, course, CLI (viz, course.py, __main__.py, __init__.py)

Every import in every module is read with `ast`, at module level and inside functions alike: an import
inside a function is still an arrow, and hiding a cycle there is still a cycle.
"""

from __future__ import annotations

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "minidiff"

# Layer of each top-level part of the package (lower number = lower layer).
LAYERS = {
    "core": 0, "checkpoints": 0,
    "blocks": 1,
    "models": 2,
    "schedulers": 3,
    # loaders (Textual Inversion, LoRA, Custom Diffusion files) need only core/ and change any module in place,
    # so the models can offer diffusers' methods (unet.load_attn_procs) on top of them
    "loaders": 1,
    "pipelines": 4,
    "control": 5, "training": 5,
    "viz": 6, "course": 6, "__main__": 6, "__init__": 6,
}


def module_name(path: pathlib.Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, pathlib.Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """minidiff modules that `name` imports anywhere in its file (functions included)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            # `from .. import schedulers` imports the module minidiff.schedulers; `from .x import f` imports minidiff.x
            targets = [f"{module}.{a.name}" if f"{module}.{a.name}" in known else module for a in node.names]
        else:
            continue
        found |= {t for t in targets if t in known and t != name}
    return found


def layer_of(module: str) -> tuple[str, int]:
    parts = module.split(".")
    part = parts[1] if len(parts) > 1 else "__init__"
    if part not in LAYERS:
        raise AssertionError(f"{module}: its folder or file {part!r} has no layer in tests/test_structure.py "
                             f"LAYERS ({sorted(LAYERS)}); add it where it belongs.")
    return part, LAYERS[part]


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = all_modules()
    return {name: imports_of(name, path, set(modules)) for name, path in modules.items()}


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)


def test_imports_only_go_down(graph):
    upward = []
    for module, targets in graph.items():
        part, level = layer_of(module)
        for target in sorted(targets):
            target_part, target_level = layer_of(target)
            if target_level > level:
                upward.append(f"{module} ({part}) imports {target} ({target_part})")
    assert not upward, "imports that go up a layer:\n" + "\n".join(upward)


def test_no_import_cycles(graph):
    # A package's __init__ importing its own modules is how Python packages work: the edge from a module to
    # its parent package is the only one left out (importing `minidiff.pipelines.base` runs `minidiff/__init__`).
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    cycles = []
    state: dict[str, int] = {}   # 1 on the current path, 2 finished

    def visit(node, path):
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The checks above are not vacuous: a function-level import is read, and a cycle through it is found."""
    (tmp_path / "a.py").write_text("def f():\n    from .b import g\n")
    (tmp_path / "b.py").write_text("from .a import f\n")
    known = {"minidiff.models.a", "minidiff.models.b"}
    global PACKAGE
    saved, PACKAGE = PACKAGE, tmp_path
    try:
        a = imports_of("minidiff.models.a", tmp_path / "a.py", known)
        b = imports_of("minidiff.models.b", tmp_path / "b.py", known)
    finally:
        PACKAGE = saved
    assert a == {"minidiff.models.b"} and b == {"minidiff.models.a"}
    assert layer_of("minidiff.viz.figures")[1] > layer_of("minidiff.control.sag")[1]


def test_no_file_is_too_long_to_read_in_one_sitting():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"files over 500 lines (split them by concern): {long}"
