"""The import layering of docs/design.md ("Layers"), read from the source with ``ast``.

Imports run one way, ``tools → duetjax → models → pallas_kernels``; inside ``duetjax`` they
run one way too, ``top level → duet/ → core/ → perf/ → base modules``; the modules of
``duetjax`` import each other without cycles; the host-side planners load no JAX. Every import
counts, at module level or inside a function: both run. Only ``if TYPE_CHECKING:`` blocks,
which never run, are left out of the cycle and JAX checks (they still may not point upward).
"""
from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

LAYERS = ("pallas_kernels", "models", "duetjax", "tools")
"""Lowest first: a package may import the ones before it, never the ones after (nor tests)."""

JAX_PACKAGES = ("jax", "jaxlib", "flax")


def source_files(package: str) -> list[Path]:
    return sorted((REPO / package).rglob("*.py"))


def module_name(path: Path) -> str:
    """'duetjax/server/app.py' -> 'duetjax.server.app'; a tool script is 'tools.NAME'."""
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def module_path(name: str) -> Path | None:
    """The file of one of our modules, or None (a third-party module, or a name in a module)."""
    base = REPO.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


BASE_MODULES = ("config", "sampling_params", "structured_outputs", "outputs", "engine_stats",
                "loop_stats", "compilation_cache", "gc_pauses", "child_process")
"""The top-level modules of ``duetjax`` that every layer may use: the public base types and the
process set-up (``compilation_cache``, ``gc_pauses``, ``child_process``, which the duet workers run too). They
import only each other."""

SUBPACKAGE_LAYERS = ("perf", "core", "duet")
"""The sub-packages of ``duetjax``, lowest first, between the base modules and the top level
(the public API, the entry points and ``server/``)."""

JAX_FREE = ("duetjax.core.scheduler", "duetjax.core.input_batch",
            "duetjax.core.block_manager", "duetjax.core.request", "duetjax.data_parallel.router",
            *(module_name(path) for path in source_files("duetjax/perf")))
"""Modules that plan on the host every iteration and are tested without a device: importing
them must not load JAX, directly or through our other modules (all of ``perf/``)."""

TOOL_SCRIPTS = {path.stem for path in source_files("tools")}
"""Tool scripts import each other by bare name (``import bench_serve``): they run from tools/."""


def imports_of(path: Path, *, runtime_only: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``, at any depth. ``from X import
    name`` yields X.name when that is one of our modules, else X. ``runtime_only`` leaves out
    ``if TYPE_CHECKING:`` blocks."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path).split(".")
    if path.name != "__init__.py":
        package.pop()
    skipped: set[int] = set()
    if runtime_only:
        for node in ast.walk(tree):
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    found = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.update((node.lineno, _absolute(alias.name, path)) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package[:len(package) - node.level + 1]
                base = ".".join(anchor + ([node.module] if node.module else []))
            else:
                base = _absolute(node.module, path)
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add((node.lineno, submodule if module_path(submodule) else base))
    return sorted(found)


def _absolute(name: str, path: Path) -> str:
    if path.parent == REPO / "tools" and name.split(".")[0] in TOOL_SCRIPTS:
        return f"tools.{name}"
    return name


def test_imports_only_go_down_the_layers():
    upward = []
    for rank, package in enumerate(LAYERS):
        for path in source_files(package):
            for line, name in imports_of(path):
                top = name.split(".")[0]
                if top == "tests" or (top in LAYERS and LAYERS.index(top) > rank):
                    upward.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not upward, "imports against tools → duetjax → models → pallas_kernels:\n" + \
        "\n".join(upward)


def duetjax_layer(name: str) -> int:
    """Rank of a ``duetjax`` module, lowest first: 0 the base modules, then the sub-packages of
    ``SUBPACKAGE_LAYERS``, and last the top level (``duetjax`` itself included)."""
    first = name.split(".")[1] if "." in name else ""
    if first in BASE_MODULES:
        return 0
    if first in SUBPACKAGE_LAYERS:
        return 1 + SUBPACKAGE_LAYERS.index(first)
    return 1 + len(SUBPACKAGE_LAYERS)


def test_duetjax_layers_rank_base_perf_core_duet_top():
    ranks = [duetjax_layer(name) for name in ("duetjax.config", "duetjax.perf.roofline",
                                              "duetjax.core.scheduler", "duetjax.duet.worker",
                                              "duetjax.engine")]
    assert ranks == sorted(set(ranks))
    assert duetjax_layer("duetjax.server.app") == duetjax_layer("duetjax") == ranks[-1]


def test_duetjax_imports_only_go_down_its_layers():
    upward = []
    for path in source_files("duetjax"):
        rank = duetjax_layer(module_name(path))
        for line, name in imports_of(path):
            if name.split(".")[0] == "duetjax" and duetjax_layer(name) > rank:
                upward.append(f"{path.relative_to(REPO)}:{line} imports {name}")
    assert not upward, "imports against top level → duet → core → perf → " + \
        ", ".join(BASE_MODULES) + ":\n" + "\n".join(upward)


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph`` as [a, b, ..., a], or None (depth-first search)."""
    finished: set[str] = set()

    def visit(node: str, path: list[str]) -> list[str] | None:
        if node in path:
            return path[path.index(node):] + [node]
        if node in finished:
            return None
        for successor in sorted(graph.get(node, ())):
            cycle = visit(successor, path + [node])
            if cycle:
                return cycle
        finished.add(node)
        return None

    return next((cycle for start in sorted(graph) if (cycle := visit(start, []))), None)


def test_find_cycle_sees_a_cycle_and_its_absence():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_duetjax_modules_import_each_other_without_cycles():
    graph = {module_name(path): {name for _, name in imports_of(path, runtime_only=True)
                                 if name.startswith("duetjax") and module_path(name)}
             for path in source_files("duetjax")}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " → ".join(cycle)


def jax_import_chain(module: str) -> list[str] | None:
    """[module, ..., the module that imports JAX, 'jax'] through our runtime imports, or None."""
    came_from: dict[str, str | None] = {module: None}
    queue = deque([module])
    while queue:
        current = queue.popleft()
        # Importing a module runs its packages' __init__ first.
        packages = [".".join(current.split(".")[:i]) for i in range(1, current.count(".") + 1)]
        imported = [name for _, name in imports_of(module_path(current), runtime_only=True)]
        for name in packages + imported:
            if name.split(".")[0] in JAX_PACKAGES:
                chain = [name, current]
                while came_from[chain[-1]] is not None:
                    chain.append(came_from[chain[-1]])
                return chain[::-1]
            if module_path(name) and name not in came_from:
                came_from[name] = current
                queue.append(name)
    return None


def test_jax_import_chain_follows_our_modules():
    assert jax_import_chain("duetjax.engine")[-1].startswith("jax")
    assert jax_import_chain("duetjax.config") is None


@pytest.mark.parametrize("name", JAX_FREE)
def test_host_planners_do_not_import_jax(name):
    chain = jax_import_chain(name)
    assert chain is None, "loads JAX: " + " → ".join(chain)
