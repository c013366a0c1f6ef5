"""Helpers shared by the tests (imported as `from helpers import ...`); the fixtures are in conftest.py."""

from __future__ import annotations

import contextlib
import math
import os
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


def run_launched(cmd: list[str], timeout: int = 900) -> subprocess.CompletedProcess:
    """A command that starts rlhf-dist processes (python or accelerate launch), from the repository root, with one
    thread per process as accelerate launch gives each of its processes."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)


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
    """Within the block, PPOLoop.train_step raises RuntimeError("simulated crash ...") at `step` (a crash after the
    checkpoints of the earlier steps); the real method is back afterwards."""
    import pytest

    from rlhf_dist.rl.trainer import PPOLoop

    real_step = PPOLoop.train_step

    def crashing(self, k):
        if k == step:
            raise RuntimeError(f"simulated crash at step {step}")
        return real_step(self, k)

    PPOLoop.train_step = crashing
    try:
        with pytest.raises(RuntimeError, match="simulated crash"):
            yield
    finally:
        PPOLoop.train_step = real_step


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


# ------------------------------------------------------------------------------------------ measured peak (CPU)
class AllocatorPeak:
    """Peak bytes held by the torch CPU allocator between `start()` and `stop()` (what the planner is checked against).

    The running sum of torch.profiler's `[memory]` events (+bytes per allocation, -bytes per free) from the start;
    its maximum is the peak. Tensors that already existed at the start do not count (their frees lower the sum, so
    run it in a fresh process, or at least after the previous run's objects are gone: `start` collects garbage).
    Process RSS would drown a tiny model in the ~500 MB of Python and torch themselves.
    """

    def __init__(self) -> None:
        self.peak = 0
        self._profiler = None

    def start(self) -> None:
        import gc

        from torch.profiler import ProfilerActivity, profile

        gc.collect()  # a previous run's garbage, freed during this one, would lower the sum
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.start()

    def stop(self) -> None:
        if self._profiler is None:  # already stopped
            return
        prof, self._profiler = self._profiler, None
        prof.stop()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type().name == "CPU")
        held = peak = 0
        for _, nbytes in events:
            held += nbytes
            peak = max(peak, held)
        self.peak = peak


# ------------------------------------------------------------------------------------------ RL math tests
GARBAGE = (math.nan, math.inf, -math.inf, 1e30, -7.0)


def with_garbage(x: torch.Tensor, mask: torch.Tensor, extra: int) -> torch.Tensor:
    """``x`` with `extra` more columns, and NaN/inf/huge values at every masked position."""
    B, T = x.shape
    out = torch.empty(B, T + extra, dtype=x.dtype)
    out.view(-1).copy_(torch.tensor(GARBAGE, dtype=x.dtype).repeat(B * (T + extra) // len(GARBAGE) + 1)[: B * (T + extra)])
    out[:, :T] = torch.where(mask, x, out[:, :T])
    return out


def pad_mask(mask: torch.Tensor, extra: int) -> torch.Tensor:
    return torch.cat([mask, torch.zeros(mask.shape[0], extra, dtype=torch.bool)], dim=1)


def on_ranks(world: int, fn):
    """Run ``fn(rank, reduce)`` on `world` threads; ``reduce`` sums a tensor over them (an all-reduce)."""
    slots: list[torch.Tensor | None] = [None] * world
    barrier = threading.Barrier(world, timeout=10)

    def make_reduce(rank: int):
        def reduce(t: torch.Tensor) -> torch.Tensor:
            slots[rank] = t.detach().clone()
            barrier.wait()
            total = sum(slots[1:], slots[0].clone())  # same order on every rank: identical results
            barrier.wait()
            return total
        return reduce

    with ThreadPoolExecutor(world) as pool:
        futures = [pool.submit(fn, rank, make_reduce(rank)) for rank in range(world)]
        return [f.result() for f in futures]
