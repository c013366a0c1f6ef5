"""Every reference in the code and the docs resolves to something in this repository.

* nothing cites notes that live outside it (the names below), nor a path above it;
* every checklist item cited ("docs/ppo.md item N", and the bare "item N" of rlhf_dist/) is a numbered item of
  docs/ppo.md, and every "docs/cpu.md trap N" a numbered trap of docs/cpu.md;
* every `docs/*.md` path mentioned exists, and so do the relative links between the docs;
* the functions and tests that the docs name exist (so the docs cannot silently rot when code is renamed).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
SCANNED = ["rlhf_dist", "README.md", "docs", "launch", "slurm", "scripts"]
# Written with a split so that this file does not cite them itself.
FOREIGN = ["PPO_" + "CHECKLIST", "CPU_" + "NOTES", "ARCHITECTURE_" + "SKETCH", "STYLE" + ".md", "../" + "shared"]
TEXT_SUFFIXES = {".py", ".md", ".sh", ".yaml", ".yml", ".json", ".tmpl", ".txt", ".toml", ".cfg", ""}

NUMBERS = r"(\d+(?:\s*(?:,|and|-|–)\s*\d+)*)"
PPO_CITE = re.compile(r"docs/ppo\.md,?\s+items?\s+" + NUMBERS)
BARE_ITEM = re.compile(r"(?<![\w/.])items?\s+" + NUMBERS)
CPU_CITE = re.compile(r"docs/cpu\.md,?\s+traps?\s+" + NUMBERS)
DOC_PATH = re.compile(r"docs/[\w.-]+\.md")


def text_files(*roots: str) -> list[Path]:
    out = []
    for name in roots:
        path = ROOT / name
        candidates = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        for p in candidates:
            if "__pycache__" in p.parts or p.suffix not in TEXT_SUFFIXES:
                continue
            out.append(p)
    return out


def numbers(group: str) -> set[int]:
    """'3, 14 and 16-19' -> {3, 14, 16, 17, 18, 19}."""
    found: set[int] = set()
    for part in re.split(r"\s*(?:,|and)\s*", group):
        bounds = [int(b) for b in re.split(r"\s*[-–]\s*", part) if b]
        found.update(range(bounds[0], bounds[-1] + 1))
    return found


def cited(pattern: re.Pattern, files: list[Path]) -> dict[int, list[str]]:
    where: dict[int, list[str]] = {}
    for path in files:
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            for match in pattern.finditer(line):
                for n in numbers(match.group(1)):
                    where.setdefault(n, []).append(f"{path.relative_to(ROOT)}:{lineno}")
    return where


def numbered_headings(doc: Path, pattern: str) -> set[int]:
    return {int(m.group(1)) for m in re.finditer(pattern, doc.read_text(encoding="utf-8"), re.MULTILINE)}


PPO_ITEMS = numbered_headings(DOCS / "ppo.md", r"^### (\d+)\. ")
CPU_TRAPS = numbered_headings(DOCS / "cpu.md", r"^### Trap (\d+):")


def test_the_docs_are_numbered_without_gaps():
    assert PPO_ITEMS == set(range(1, len(PPO_ITEMS) + 1)) and len(PPO_ITEMS) >= 23
    assert CPU_TRAPS == set(range(1, len(CPU_TRAPS) + 1)) and len(CPU_TRAPS) >= 6


@pytest.mark.parametrize("name", FOREIGN)
def test_nothing_cites_notes_outside_the_repository(name):
    hits = [f"{p.relative_to(ROOT)}:{n}" for p in text_files(*SCANNED)
            for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if name in line]
    assert not hits, f"{name} cited (not in this repository; cite docs/*.md instead): {hits}"


def test_every_cited_checklist_item_exists():
    where = cited(PPO_CITE, text_files(*SCANNED, "tests", "benchmarks"))
    bare = cited(BARE_ITEM, text_files("rlhf_dist"))  # in the package, "item N" means docs/ppo.md item N
    assert where and bare, "no citations found: the patterns no longer match the code"
    missing = {n: sites for n, sites in {**bare, **where}.items() if n not in PPO_ITEMS}
    assert not missing, f"items cited but not in docs/ppo.md: {missing}"


def test_every_cited_cpu_trap_exists():
    where = cited(CPU_CITE, text_files(*SCANNED, "tests"))
    assert where, "no citations found: the pattern no longer matches the code"
    missing = {n: sites for n, sites in where.items() if n not in CPU_TRAPS}
    assert not missing, f"traps cited but not in docs/cpu.md: {missing}"


def test_every_docs_path_exists():
    missing = []
    for path in text_files(*SCANNED, "tests", "benchmarks", "ds_configs"):
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            missing += [f"{path.relative_to(ROOT)}:{n} {m}" for m in DOC_PATH.findall(line) if not (ROOT / m).is_file()]
    assert not missing, f"docs/*.md paths that do not exist: {missing}"


def test_links_between_the_docs_resolve():
    broken = []
    for doc in sorted(DOCS.glob("*.md")):
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            if "://" not in target and not (doc.parent / target).exists():
                broken.append(f"{doc.name} -> {target}")
    assert not broken, broken


def _module_names(path: Path) -> set[str]:
    """Top-level functions and classes of a module, and Class.method names."""
    names = set()
    for node in ast.parse(path.read_text(encoding="utf-8")).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        if isinstance(node, ast.ClassDef):
            names.update(f"{node.name}.{n.name}" for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def test_code_named_by_the_docs_exists():
    """`rlhf_dist/x.py::name` and `tests/test_x.py::test_name` in docs/*.md name real functions and tests."""
    test_names = {m for p in (ROOT / "tests").glob("test_*.py")
                  for m in re.findall(r"^\s*def (test_\w+)", p.read_text(encoding="utf-8"), re.MULTILINE)}
    missing = []
    for doc in sorted(DOCS.glob("*.md")):
        text = doc.read_text(encoding="utf-8")
        for module, name in re.findall(r"((?:rlhf_dist|tests)/[\w/]+\.py)::([\w.]+)", text):
            path = ROOT / module
            if not path.is_file() or (module.startswith("rlhf_dist") and name not in _module_names(path)) \
                    or (module.startswith("tests") and f"def {name}(" not in path.read_text(encoding="utf-8")):
                missing.append(f"{doc.name}: {module}::{name}")
        for path in re.findall(r"`((?:rlhf_dist|tests|launch|slurm|scripts|ds_configs|benchmarks)/[\w./-]+)`", text):
            if "*" not in path and not (ROOT / path).exists():
                missing.append(f"{doc.name}: {path}")
        missing += [f"{doc.name}: {t}" for t in re.findall(r"`(test_\w+)(?:\[\w+\])?`", text) if t not in test_names]
    assert not missing, f"named in the docs but not found: {missing}"
