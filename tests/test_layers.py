"""The package's shape: no import cycle in ``pop_nemo/`` (imports inside functions included), the
base layer imports nothing above it, and package code names no test shim."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

PACKAGE = Path(__file__).resolve().parents[1] / "pop_nemo"

# Base layer: errors, config schema, protocols, rubric math, ranks/collectives, JSONL. It imports
# only itself: no data/roles module, backend, build, loop or CLI (DESIGN §3).
BASE = {
    "pop_nemo.errors",
    "pop_nemo.config",
    "pop_nemo.jsonl",
    "pop_nemo.distributed",
    "pop_nemo.engines.base",
    "pop_nemo.policies.base",
    "pop_nemo.critic.base",
    "pop_nemo.selfplay.rubric",
}


def module_name(path: Path, root: Path = PACKAGE) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module → the package modules it imports, at any depth of the file (functions too)."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in files}
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([node.module] if node.module else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            graph[mod] |= {n for n in names if n in files and n != mod}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
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
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_sees_an_import_inside_a_function(tmp_path):
    pkg = tmp_path / "pop_nemo"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pop_nemo.sub import b\n")
    (pkg / "sub" / "b.py").write_text("def f():\n    from .. import c\n")
    (pkg / "c.py").write_text("def g():\n    import pop_nemo.a\n")
    assert cycles(import_graph(pkg)) == [["pop_nemo.a", "pop_nemo.c", "pop_nemo.sub.b"]]
    (pkg / "c.py").write_text("import os\n")
    assert cycles(import_graph(pkg)) == []


def test_no_import_cycle_in_the_package():
    assert cycles(import_graph()) == []


def test_the_base_layer_imports_nothing_above_it():
    graph = import_graph()
    assert BASE <= set(graph)
    above = {m: sorted(d for d in graph[m] if d in graph and d not in BASE and d != "pop_nemo") for m in BASE}
    assert {m: d for m, d in above.items() if d} == {}


def test_the_paper_tasks_are_the_configs_task_names():
    from pop_nemo.config import TASK_NAMES
    from pop_nemo.selfplay.roles import TASKS

    assert sorted(TASKS) == list(TASK_NAMES)


def test_package_code_names_no_test_shim():
    """What package code learns about the machine it learns by asking torch, not a test's mark."""
    hits = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if "_pop_nemo_cpu_shim" in p.read_text()]
    assert hits == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA, Megatron runs here")
def test_runs_here_asks_whether_cuda_calls_work(monkeypatch):
    """No CUDA and CUDA calls failing: Megatron cannot run, whatever attribute a test left on torch.cuda.
    CUDA calls mapped to the CPU (the test suite's shim): it can."""
    from pop_nemo.policies.megatron import runs_here

    def no_driver():
        raise RuntimeError("Found no NVIDIA driver on your system")

    monkeypatch.setattr(torch.cuda, "current_device", no_driver)
    monkeypatch.setattr(torch.cuda, "_pop_nemo_cpu_shim", True, raising=False)
    assert runs_here() is False
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert runs_here() is True


def test_one_jsonl_reader_names_the_file_and_line(tmp_path):
    from pop_nemo.jsonl import read_rows

    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"s": "line\u2028separator"}\n{"a": \n')
    with pytest.raises(KeyError, match=r"x.jsonl:4: not valid JSON"):
        read_rows(path, KeyError)
    path.write_text('{"a": 1}\n\n{"s": "line\u2028separator"}\n')
    assert read_rows(path) == [{"a": 1}, {"s": "line\u2028separator"}]
