"""The house rules of the package layout, checked on the source (ast): arrows point down, engines know no job.

Every import counts, also those inside functions (lazy imports still make a dependency): a module may not import,
directly or through others, a module that imports it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "mmprep"


def _modules() -> dict[str, Path]:
    mods = {}
    for f in ROOT.rglob("*.py"):
        parts = list(f.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        mods[".".join(parts)] = f
    return mods


MODULES = _modules()


def _resolve(name: str) -> str | None:
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str) -> set[str]:
    """The mmprep modules ``module`` imports (any depth in the file, relative imports resolved)."""
    f = MODULES[module]
    pkg = module if f.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from mmprep.x import y` depends on mmprep.x.y when y is a module, else on mmprep.x
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        for n in names:
            target = _resolve(n) if n.startswith("mmprep") else None
            if target and target != module:
                found.add(target)
    return found


GRAPH = {m: _imports(m) for m in MODULES}


def _cycles() -> list[list[str]]:
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(GRAPH[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(GRAPH):
        if m not in index:
            visit(m)
    return out


def test_the_import_graph_is_read_correctly() -> None:
    """The walker sees lazy imports and `from pkg import module` (else the checks below could not fail)."""
    assert "mmprep.pack.job" in GRAPH["mmprep.cli.cmd_pack"]  # imported inside a function
    assert "mmprep.runtime.files" in GRAPH["mmprep.runtime.storage"]
    assert len(MODULES) > 30


def test_no_import_cycles() -> None:
    assert _cycles() == []


def test_a_planted_cycle_is_found() -> None:
    saved = GRAPH["mmprep.errors"]
    GRAPH["mmprep.errors"] = saved | {"mmprep.cli.cmd_pack"}
    try:
        assert any("mmprep.errors" in c for c in _cycles())
    finally:
        GRAPH["mmprep.errors"] = saved


def _reach(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        for n in GRAPH[todo.pop()]:
            if n not in seen:
                seen.add(n)
                todo.append(n)
    return seen


JOB_PACKAGES = ("mmprep.pack", "mmprep.images", "mmprep.text", "mmprep.labels", "mmprep.cli")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("mmprep.runtime")))
def test_the_runtime_knows_no_job(module: str) -> None:
    """Engines, the job runtime, storage and the output folder import no job (pack, images, text, labels) or CLI."""
    bad = sorted(n for n in _reach(module) if n.startswith(JOB_PACKAGES))
    assert bad == [], f"{module} reaches {bad}"


def test_the_format_module_imports_nothing_of_ours_but_errors() -> None:
    assert GRAPH["mmprep.dataset.format"] <= {"mmprep.errors"}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith("mmprep.cli")
                                          and m != "mmprep.__main__"))
def test_only_the_cli_and_main_import_the_cli(module: str) -> None:
    assert not any(n.startswith("mmprep.cli") for n in GRAPH[module])


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("mmprep.dataset")))
def test_readers_do_not_import_writers(module: str) -> None:
    """The read side (reader, verify, inspect) never needs the pack job, the engines or the CLI."""
    bad = sorted(n for n in _reach(module) if n.startswith(("mmprep.pack", "mmprep.runtime.engines", "mmprep.cli",
                                                           "mmprep.runtime.job")))
    assert bad == [], f"{module} reaches {bad}"
