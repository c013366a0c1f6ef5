"""Shared fixtures: a tiny tokenizer + Llama (built locally, ~0.2M parameters) and the demo's data."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from helpers import stage_process, tiny_recipe  # noqa: E402 - after the environment above


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


@pytest.fixture(scope="session")
def tiny_reward_model(tiny_model, tmp_path_factory) -> Path:
    """The tiny Llama as a one-label sequence classifier (random, seeded score head): a stand-in reward model."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path_factory.mktemp("models") / "tiny_rm"
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def shared_recipe(tmp_path_factory, tiny_model, demo_data) -> Path:
    """`tiny_recipe` once for the session (tests that share `uninterrupted` runs must name the same file)."""
    return tiny_recipe(tmp_path_factory.mktemp("shared_recipe"), tiny_model, demo_data)


@pytest.fixture(scope="session")
def uninterrupted(tmp_path_factory):
    """`uninterrupted(stage, *args)`: the run directory of `rlhf_dist STAGE ARGS` in a process of its own, run once per
    argument list in the session: the reference that the kill and signal tests compare with, bit for bit."""
    done: dict[tuple, Path] = {}

    def run(stage: str, *args: str) -> Path:
        if (stage, args) not in done:
            out = tmp_path_factory.mktemp(f"uninterrupted-{stage}")
            proc = stage_process(stage, *args, "--output", str(out))
            assert proc.returncode == 0, proc.stderr[-3000:]
            done[(stage, args)] = out
        return done[(stage, args)]

    return run
