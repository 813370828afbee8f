"""lowbit's modules import one another without cycles, and its packages layer one way (docs/architecture.md):
formats and scaling know no models (formats no gguf nor kernels, scaling no formats), and report draws what it is
given, importing nothing that quantizes.

The graph is read from the source with ast, not by importing it: an edge is every ``import`` a module runs,
at its top or inside a function (``if TYPE_CHECKING:`` blocks run never and are left out), and neither kind
may close a cycle. Run this file to print every cycle:

    .venv/bin/python tests/test_import_graph.py
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def _modules() -> dict[str, tuple[Path, bool]]:
    """lowbit's module names -> (file, whether it is a package's __init__)."""
    found = {}
    for path in sorted((SRC / "lowbit").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


MODULES = _modules()


def _target(name: str) -> str | None:
    """The lowbit module that ``name`` (a module, or a name inside one) lives in; None outside lowbit."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports(module: str, *, functions: bool) -> set[str]:
    """The lowbit modules ``module`` imports: at its top level, and inside its functions too if ``functions``."""
    path, package = MODULES[module]
    here = module.split(".") if package else module.split(".")[:-1]
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import) and (functions or not in_function):
                found.update(t for a in child.names if (t := _target(a.name)))
            elif isinstance(child, ast.ImportFrom) and (functions or not in_function):
                base = child.module or ""
                if child.level:
                    base = ".".join([*here[: len(here) - child.level + 1], *([base] if base else [])])
                # `from package import name`: the submodule where one is called name, else the package
                found.update(t for a in child.names if (t := _target(f"{base}.{a.name}")))
            visit(child, nested)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    found.discard(module)
    return found


def graph(*, functions: bool) -> dict[str, set[str]]:
    return {m: imports(m, functions=functions) for m in MODULES}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One shortest cycle through each module that lies on one, as a path that returns to its start."""
    found = []
    for start in sorted(edges):
        came_from: dict[str, str | None] = {start: None}
        queue, last = [start], None
        while queue and last is None:
            m = queue.pop(0)
            for n in sorted(edges[m]):
                if n == start:
                    last = m
                    break
                if n not in came_from:
                    came_from[n] = m
                    queue.append(n)
        if last is not None:
            path = [start]
            while last is not None:
                path.append(last)
                last = came_from[last]
            found.append(path[::-1])
    return found


def reaches(edges: dict[str, set[str]], module: str) -> set[str]:
    """Every module ``module`` imports, directly or through others."""
    seen, todo = set(), [module]
    while todo:
        for n in edges[todo.pop()] - seen:
            seen.add(n)
            todo.append(n)
    return seen


def _in(module: str, *packages: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


# What knows a model (loads, walks or changes one): nothing under the format facts and the scaling may reach it.
MODELS = ("lowbit.models", "lowbit.layers", "lowbit.methods", "lowbit.calibration", "lowbit.planning",
          "lowbit.eval", "lowbit.io", "lowbit.workflows", "lowbit.commands", "lowbit.evaluate", "lowbit.generation")
# What quantizes: the report imports none of it (it may read a label, lowbit.planning.config, and the facts).
QUANTIZES = ("lowbit.models", "lowbit.layers", "lowbit.methods", "lowbit.calibration", "lowbit.planning.sensitivity",
             "lowbit.eval", "lowbit.io", "lowbit.workflows", "lowbit.commands", "lowbit.evaluate", "lowbit.generation",
             "lowbit.quantize", "lowbit.pipeline", "lowbit.tensor", "lowbit.fake_quant", "lowbit.representable",
             "lowbit.search", "lowbit.kernels", "lowbit.gguf", "lowbit.formats.probe", "lowbit.formats.cast",
             "lowbit.formats.codebooks", "lowbit.formats.int", "lowbit.formats.learned", "lowbit.formats.minifloat",
             "lowbit.formats.mx", "lowbit.formats.ternary", "lowbit.scaling.blocks", "lowbit.scaling.codebook_fit",
             "lowbit.scaling.double_quant", "lowbit.scaling.packing")


def test_the_graph_sees_every_kind_of_import():
    assert "lowbit.formats.registry" in imports("lowbit.quantize", functions=False)  # from .formats.registry import
    assert "lowbit.dispatch" in imports("lowbit.pipeline", functions=False)  # from . import dispatch
    assert "lowbit.kernels.library" in imports("lowbit.kernels.linear", functions=False)  # from .library import
    assert "lowbit.tensor" not in imports("lowbit.kernels.linear", functions=True)  # under TYPE_CHECKING only


def test_no_cycle_among_top_level_imports():
    assert cycles(graph(functions=False)) == []


def test_no_cycle_through_function_level_imports_either():
    """An import moved into a function hides a cycle from Python, not from the reader: none is left."""
    assert cycles(graph(functions=True)) == []


def test_formats_and_scaling_know_no_models():
    edges = graph(functions=True)
    for module in MODULES:
        if _in(module, "lowbit.formats", "lowbit.scaling"):
            assert not [m for m in reaches(edges, module) if _in(m, *MODELS)], module


def test_report_imports_nothing_that_quantizes():
    for module in MODULES:
        if _in(module, "lowbit.report"):
            assert not [m for m in imports(module, functions=True) if _in(m, *QUANTIZES)], module


def test_package_layering():
    """formats never imports gguf or the kernels; scaling never imports formats."""
    for module in MODULES:
        found = imports(module, functions=True)
        if _in(module, "lowbit.formats"):
            assert not [m for m in found if _in(m, "lowbit.gguf", "lowbit.kernels")], module
        if _in(module, "lowbit.scaling"):
            assert not [m for m in found if _in(m, "lowbit.formats")], module


if __name__ == "__main__":
    for kind, functions in (("top-level imports", False), ("with function-level imports", True)):
        found = cycles(graph(functions=functions))
        print(f"{kind}: {len(found)} modules on a cycle")
        for path in found:
            print("   ", " -> ".join(path))
