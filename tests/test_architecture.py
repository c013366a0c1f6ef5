"""Module boundaries: no import cycle in the package (function-level imports counted), and the light commands stay
light to import."""

from __future__ import annotations

import ast
import dataclasses
import os
import re
import subprocess
import sys

import pytest
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


# ----------------------------------------------------------------------------------------------
# One stage registry
# ----------------------------------------------------------------------------------------------
# Modules that know no stage by name: they read rlhf_dist.registry.
GENERIC = ["cli.py", "pipeline.py", "fallback.py", "lengths.py", "launch.py", "slurm.py", "recipe.py", "rundir.py",
           "stages/common.py", "stages/fit.py", "plan/estimate.py", "plan/cli.py", "config/resolve.py"]


def test_every_registered_stage_is_complete_and_consistent():
    from rlhf_dist import data, lengths, registry
    from rlhf_dist.config.sections import StageConfig
    from rlhf_dist.plan.estimate import PROFILES

    order = list(registry.STAGES)
    assert order[:5] == ["pretrain", "sft", "reward", "ppo", "dpo"]
    for name, spec in registry.STAGES.items():
        assert spec.name == name and spec.summary and spec.headline
        cls = spec.config_class()
        assert issubclass(cls, StageConfig) and "training" in {f.name for f in dataclasses.fields(cls)}, name
        assert spec.data_kind in data.KINDS and spec.memory in PROFILES, name
        assert spec.length_rule is None or (spec.length_rule in lengths.RULES and spec.length_limit), name
        assert spec.long_rows in ("truncate", "skip", "error"), name
        assert all(order.index(u) < order.index(name) for u in spec.upstream), name  # upstream runs earlier
        assert callable(spec.entry().run), name
        if spec.sources:
            assert callable(registry.load(spec.sources)), name


def test_an_unknown_stage_is_one_line_naming_the_stages():
    from rlhf_dist import registry
    from rlhf_dist.errors import UserError

    with pytest.raises(UserError, match=r"^--stage: unknown stage 'sfft'; did you mean 'sft'\? choose from pretrain, sft"):
        registry.get("sfft", "--stage")


@pytest.mark.parametrize("module", GENERIC)
def test_generic_modules_name_no_stage(module):
    """No branch on a stage name (`stage == "ppo"`, `"ppo" in stages`, `stage in ("sft", ...)`) outside the stages."""
    from rlhf_dist import registry

    names = "|".join(registry.STAGES)
    text = (PACKAGE / module).read_text()
    branches = re.findall(rf'(?:(?<!split )[=!]=\s*"(?:{names})"|"(?:{names})"\s+(?:not\s+)?in\b|\bin\s*[(\[{{]\s*"(?:{names})")',
                          text)  # (a split named "train" / "eval" is not a stage)
    assert branches == [], f"{module}: {branches}"
    own = re.findall(rf'^\s*(?:{"|".join(n.upper() for n in registry.STAGES)})\w* = ', text, re.MULTILINE)
    assert own == [], f"{module} keeps a per-stage table: {own}"


def _example_from_the_docs() -> tuple[str, list[str], list[str]]:
    """(the module, the registry diff's added lines, the context lines after them) shown in docs/architecture.md."""
    doc = (REPO / "docs" / "architecture.md").read_text()
    section = doc[doc.index("## Adding a stage"):doc.index("## Adding an estimator")]
    module = re.search(r"```python\n(.*?)```", section, re.DOTALL).group(1)
    diff = re.search(r"```diff\n(.*?)```", section, re.DOTALL).group(1).splitlines()
    added = [line[1:] for line in diff if line.startswith("+")]
    after = [line[1:] for line in diff[len(added):]]
    assert diff[:len(added)] == [f"+{line}" for line in added] and all(line.startswith(" ") for line in diff[len(added):])
    return module, added, after


@pytest.mark.slow
def test_a_new_stage_is_one_module_and_one_registry_entry(tmp_path, tiny_model, demo_data):
    """docs/architecture.md's example stage, applied as shown (one new module, one registry entry) to a copy of the
    package: the CLI, recipes, fields, the pipeline and its summary, the data and length checks, the planner and the
    run directory all take it, and it trains (the held-out loss falls)."""
    import json
    import shutil

    from helpers import tiny_recipe

    module, entry, context = _example_from_the_docs()
    copy = tmp_path / "pkg"
    shutil.copytree(PACKAGE, copy / "rlhf_dist", ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "rlhf_dist" / "stages" / "lm.py").write_text(module)
    registry = copy / "rlhf_dist" / "registry.py"
    text = registry.read_text()
    anchor = "\n" + "\n".join(context) + "\n"  # the entry the new one goes before (eval, which stays last)
    assert text.count(anchor) == 1, "the registry diff in docs/architecture.md no longer matches rlhf_dist/registry.py"
    registry.write_text(text.replace(anchor, "\n" + "\n".join(entry) + anchor))
    changed = sorted(str(p.relative_to(copy / "rlhf_dist")) for p in (copy / "rlhf_dist").rglob("*.py")
                     if not (PACKAGE / p.relative_to(copy / "rlhf_dist")).is_file()
                     or p.read_bytes() != (PACKAGE / p.relative_to(copy / "rlhf_dist")).read_bytes())
    assert changed == ["registry.py", "stages/lm.py"]

    env = {**os.environ, "PYTHONPATH": str(copy), "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        done = subprocess.run([sys.executable, "-m", "rlhf_dist", *args], capture_output=True, text=True, env=env,
                              cwd=tmp_path, timeout=600)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
        return done

    fields = run("fields", "lm").stdout
    assert "lm.freeze_embeddings  (default False)" in fields and "lm.training.completion_only_loss" in fields
    recipe = tiny_recipe(tmp_path, tiny_model, demo_data, extra=f"""lm:
  freeze_embeddings: true
  data: {{path: "{demo_data['sft']}"}}
  training: {{max_steps: 10, learning_rate: 3.0e-3, max_length: 96, per_device_train_batch_size: 16,
             save_strategy: "no", seed: 0}}
""")
    out = tmp_path / "run"
    summary = run("pipeline", "--recipe", str(recipe), "--output", str(out), "--stages", "lm,sft",
                  "sft.training.max_steps=2").stdout
    assert summary.index("[1/2] sft") < summary.index("[2/2] lm")  # the registry's order, not the flag's
    assert re.search(r"^lm\s+eval_loss\s+[\d.]+\s+[\d.]+$", summary, re.MULTILINE), summary
    metrics = json.loads((out / "lm" / "metrics.json").read_text())
    assert metrics["init_from"] == "${output}/sft"  # upstream: the sft stage of this run
    assert metrics["after"]["eval_loss"] < metrics["before"]["eval_loss"]
    resolved = (out / "lm" / "config.yaml").read_text()
    assert "freeze_embeddings: true" in resolved and "completion_only_loss: false" in resolved
    from safetensors.torch import load_file

    embed = [k for k in load_file(out / "lm" / "model.safetensors") if "embed_tokens" in k]
    assert embed and all(torch_equal(load_file(out / "lm" / "model.safetensors")[k],
                                     load_file(out / "sft" / "model.safetensors")[k]) for k in embed)
    planned = run("plan", "--recipe", str(recipe), "--stage", "lm", "--gpu-memory", "24").stdout
    assert "rlhf-dist plan: lm on 1 node(s)" in planned and "rlhf-dist launch lm" in planned


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


def test_no_module_of_the_package_is_over_500_lines():
    long = {str(p.relative_to(PACKAGE)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}, long
