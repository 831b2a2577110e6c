"""The import graph runs one way (STYLE.md): no cycles in ``mm_jax`` (function-level and type-only
imports count), the demo's test assets are imported only by the demo itself, configs depend on
``mm_jax`` and never the reverse, and the models import neither torch nor CLIs nor data code.

Read from the source (``ast``), so nothing is imported to check it and the failures list every
offending import with its file and line.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mm_jax"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: Path) -> list[tuple[str, int]]:
    """(imported module, line) for every import statement in the file, at any depth; ``from a import b``
    gives ``a.b`` when that is a module of the package, else ``a``; relative imports are resolved;
    ``importlib.import_module("x")`` with a literal counts too."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in MODULES else mod, node.lineno))
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and ((isinstance(node.func, ast.Attribute) and node.func.attr == "import_module")
                   or (isinstance(node.func, ast.Name) and node.func.id in ("import_module", "__import__")))):
            out.append((node.args[0].value, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    """module -> the package modules it imports (a package import counts as its ``__init__``)."""
    graph = {}
    for name, path in MODULES.items():
        deps = set()
        for mod, _ in _imports(path):
            while mod and mod not in MODULES and "." in mod:
                mod = mod.rpartition(".")[0]
            if mod in MODULES and mod != name:
                deps.add(mod)
        graph[name] = deps
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every elementary cycle, each once (rotated to start at its smallest module)."""
    found = set()
    for start in sorted(graph):
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in sorted(graph[node]):
                if nxt == start:
                    found.add(tuple(path))
                elif nxt not in path and nxt > start:  # each cycle is found from its smallest module
                    stack.append((nxt, path + [nxt]))
    return [list(c) for c in sorted(found, key=lambda c: (len(c), c))]


def _offending(paths, banned) -> list[str]:
    """'file:line imports X' for every import of a module starting with one of ``banned``."""
    bad = []
    for path in paths:
        for mod, line in _imports(path):
            if any(mod == b or mod.startswith(b + ".") for b in banned):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {mod}")
    return bad


def test_the_cycle_finder_finds_a_planted_cycle_and_nothing_else():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"f"}, "f": {"e"}}
    assert _cycles(graph) == [["e", "f"], ["a", "b", "c"]]


def test_function_level_and_relative_imports_are_seen(tmp_path):
    f = PACKAGE / "frame_counts.py"  # imports VAEConfig from the VAE inside a function
    assert any(m == "mm_jax.models.vae" for m, _ in _imports(f))
    assert "mm_jax.checkpoint" in _graph()["mm_jax.training.export"]


def test_the_mm_jax_import_graph_has_no_cycles():
    cycles = _cycles(_graph())
    assert not cycles, "import cycles (each a -> b -> ... -> a):\n" + "\n".join(" -> ".join(c + c[:1]) for c in cycles)


def test_only_the_demo_imports_the_demo_and_test_assets():
    outside = [p for p in MODULES.values() if "demo" not in p.relative_to(PACKAGE).parts]
    bad = _offending(outside, ("mm_jax.demo", "mm_jax.testing", "tests"))
    assert not bad, "\n".join(bad)


def test_the_trainer_cannot_reach_the_demo_through_other_modules():
    graph = _graph()
    seen, todo = set(), ["mm_jax.train", "mm_jax.training.loop"]
    while todo:
        m = todo.pop()
        if m not in seen:
            seen.add(m)
            todo += graph[m]
    assert not [m for m in seen if m.startswith("mm_jax.demo")]


def test_configs_import_only_mm_jax_and_never_the_trainers_defaults():
    files = sorted((ROOT / "configs").glob("*.py"))
    assert files
    bad = _offending(files, ("mm_jax.training.defaults", "tests", "tools", "benchmarks"))
    for f in files:  # and nothing but mm_jax, the configs package, ml_collections and the standard library
        for mod, line in _imports(f):
            if mod.split(".")[0] not in ("mm_jax", "configs", "ml_collections", "__future__", "dataclasses", "typing"):
                bad.append(f"{f.relative_to(ROOT)}:{line} imports {mod}")
    assert not bad, "\n".join(bad)


def test_nothing_in_mm_jax_imports_or_reads_configs_tests_tools_or_benchmarks():
    bad = _offending(MODULES.values(), ("configs", "tests", "tools", "benchmarks"))
    for path in MODULES.values():  # nor loads a config file by path (the package may be installed without them)
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in ("configs", "tests", "benchmarks"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} reads the {node.value!r} folder by path")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("banned", [("torch", "diffusers"), ("mm_jax.train", "mm_jax.sample", "mm_jax.evaluate",
                                                             "mm_jax.plan", "mm_jax.demo", "argparse"),
                                    ("mm_jax.data", "mm_jax.training", "grain", "array_record")])
def test_models_never_import_torch_clis_or_data_code(banned):
    bad = _offending(sorted((PACKAGE / "models").glob("*.py")), banned)
    assert not bad, "\n".join(bad)
