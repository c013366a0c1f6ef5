"""Shared fixtures: a tiny tokenizer + Llama (built locally, ~0.2M parameters) and the demo's data."""

from __future__ import annotations

import contextlib
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


STEPS = {"pretrain": 40, "sft": 40, "reward": 40, "ppo": 4, "dpo": 30}


# The kill and signal tests: 12 optimizer steps with a checkpoint every 4 (PPO: 6 steps, every 2), logged every step.
STEPS_CHECKPOINTED = {"pretrain": 12, "sft": 12, "reward": 12, "dpo": 12, "ppo": 6}
EVERY = {"pretrain": 4, "sft": 4, "reward": 4, "dpo": 4, "ppo": 2}


def checkpointed_args(stage: str, recipe: Path, reward_model: Path) -> list[str]:
    """A stage's arguments for the kill and signal tests (tiny_recipe's stage with checkpoints, see above)."""
    args = ["--recipe", str(recipe), f"{stage}.training.max_steps={STEPS_CHECKPOINTED[stage]}",
            f"{stage}.training.logging_steps=1", f"{stage}.training.save_steps={EVERY[stage]}"]
    if stage == "ppo":
        return [*args, f"ppo.reward_model={reward_model}"]
    return [*args, f"{stage}.training.save_strategy=steps", f"{stage}.training.save_total_limit=3"]


def tiny_recipe(tmp_path: Path, tiny_model: Path, demo_data: dict, extra: str = "") -> Path:
    """A five-stage recipe on the tiny model and demo data, a few dozen steps per stage (ppo: a few)."""
    common = 'per_device_train_batch_size: 16, save_strategy: "no", seed: 0'
    text = f"""
model: {{name_or_path: "{tiny_model}", dtype: float32}}
data: {{eval_fraction: 0.15, seed: 0}}
pretrain:
  block_size: 32
  data: {{path: "{demo_data['pretrain']}"}}
  training: {{max_steps: {STEPS['pretrain']}, learning_rate: 3.0e-3, {common}}}
sft:
  data: {{path: "{demo_data['sft']}"}}
  training: {{max_steps: {STEPS['sft']}, learning_rate: 3.0e-3, max_length: 96, {common}}}
reward:
  data: {{path: "{demo_data['preference']}"}}
  training: {{max_steps: {STEPS['reward']}, learning_rate: 3.0e-3, max_length: 96, {common}}}
ppo:
  data: {{path: "{demo_data['prompts']}"}}
  training: {{max_steps: {STEPS['ppo']}, rollout_batch_size: 8, generation_batch_size: 4, mini_batch_size: 8,
             per_device_train_batch_size: 4, ppo_epochs: 2, learning_rate: 1.0e-4, max_new_tokens: 12,
             temperature: 1.0, save_steps: 2, seed: 0}}
dpo:
  data: {{path: "{demo_data['preference']}"}}
  training: {{max_steps: {STEPS['dpo']}, learning_rate: 1.0e-3, max_length: 96, {common}}}
{extra}
"""
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    return path


def cli(*args: str, cwd: Path | None = None, timeout: int = 600):
    """Run `python -m rlhf_dist ARGS` in a fresh process; returns the CompletedProcess (text)."""
    import subprocess

    return subprocess.run([sys.executable, "-m", "rlhf_dist", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


@contextlib.contextmanager
def ppo_crashes_at_step(step: int):
    """Within the block, PPOTrainer.train_step raises RuntimeError("simulated crash ...") at `step` (a crash after the
    checkpoints of the earlier steps); the real method is back afterwards."""
    import pytest

    from rlhf_dist.rl.trainer import PPOTrainer

    real_step = PPOTrainer.train_step

    def crashing(self, k):
        if k == step:
            raise RuntimeError(f"simulated crash at step {step}")
        return real_step(self, k)

    PPOTrainer.train_step = crashing
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            yield
    finally:
        PPOTrainer.train_step = real_step


def without_timings(obj):
    """`obj` (metrics, a log history) without the figures that measure time, which no two runs share."""
    if isinstance(obj, dict):
        return {k: without_timings(v) for k, v in obj.items()
                if not (k.startswith("time/") or any(t in k for t in ("runtime", "per_second", "wall_seconds")))}
    if isinstance(obj, list):
        return [without_timings(v) for v in obj]
    return obj


def stage_process(stage: str, *args: str, fault: str | None = None, timeout: int = 600, **env):
    """`python -m rlhf_dist STAGE ARGS` in a session of its own (a fault's `kill` ends its whole process group, not
    pytest), optionally with a fault injected (rlhf_dist.faults); returns the CompletedProcess."""
    import subprocess

    environ = {**os.environ, **env}
    environ.pop("RLHF_DIST_FAULT", None)
    if fault:
        environ["RLHF_DIST_FAULT"] = fault
    return subprocess.run([sys.executable, "-m", "rlhf_dist", stage, *args], capture_output=True, text=True,
                          timeout=timeout, env=environ, start_new_session=True)


def saved_tensors(folder: Path) -> dict:
    """Every tensor of every safetensors file under `folder`, keyed 'relative/file.safetensors:name'."""
    from safetensors.torch import load_file

    return {f"{f.relative_to(folder)}:{k}": v for f in sorted(Path(folder).rglob("*.safetensors"))
            for k, v in load_file(f).items()}


def bit_identical(a: Path, b: Path) -> bool:
    import torch

    x, y = saved_tensors(a), saved_tensors(b)
    return bool(x) and x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


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
