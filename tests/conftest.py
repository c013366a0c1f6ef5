"""Shared fixtures: a tiny tokenizer + Llama (built locally, ~0.2M parameters) and the demo's data."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, Path]:
    """The demo generator's four jsonl files (pretrain, sft, preference, prompts), small sizes."""
    from rlhf_dist.demo import synthetic

    out = tmp_path_factory.mktemp("data")
    return synthetic.generate(out, seed=0, n_pretrain=400, n_sft=320, n_pref=320, n_prompts=32)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A saved tiny Llama (2 layers, hidden 64) with a BPE tokenizer trained on the demo corpus."""
    from rlhf_dist.demo import synthetic, tiny

    out = tmp_path_factory.mktemp("models") / "tiny"
    return tiny.save_tiny(out, synthetic.corpus(0), vocab_size=1000, hidden_size=64, num_layers=2)


def write_recipe(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def cli(*args: str, cwd: Path | None = None, timeout: int = 600):
    """Run `python -m rlhf_dist ARGS` in a fresh process; returns the CompletedProcess (text)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "rlhf_dist", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)
