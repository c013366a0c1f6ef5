"""Module boundaries: no import cycle in the package (function-level imports counted), and the light commands stay
light to import."""

from __future__ import annotations

import ast
import subprocess
import sys

from helpers import REPO

PACKAGE = REPO / "rlhf_dist"


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports anywhere in its code (top level or inside functions)."""
    modules = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(REPO).with_suffix("").parts)
        modules[name.removesuffix(".__init__")] = path
    graph = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("rlhf_dist"):
                for alias in node.names:  # `from rlhf_dist import rundir` names a module; `from x import f` does not
                    target = f"{node.module}.{alias.name}"
                    found.add(target if target in modules else node.module)
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("rlhf_dist"))
        graph[name] = {m for m in found if m in modules and m not in (name, "rlhf_dist")}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_counting_function_level_imports():
    graph = import_graph()
    assert "rlhf_dist.stages.ppo" in graph and graph["rlhf_dist.stages.common"]  # the scan sees the package
    assert cycles(graph) == []


def test_the_cycle_finder_finds_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_generic_modules_do_not_reach_into_the_ppo_stage():
    graph = import_graph()
    users = sorted(m for m, deps in graph.items() if "rlhf_dist.stages.ppo" in deps)
    assert users == [], users  # the CLI runs stages by module name; common/pipeline/fallback ask rl.sources


def test_launch_imports_without_torch_or_transformers():
    code = "import sys, rlhf_dist.launch; print(sorted(m for m in ('torch', 'transformers', 'trl') if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr
