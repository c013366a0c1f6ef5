"""Our PPO (separate value model) against TRL 1.12's PPOTrainer, on equal work, side by side (issue 6).

    .venv/bin/pip install --no-deps --target benchmarks/.peers/trl-1.12.0 trl==1.12.0   # once
    .venv/bin/python benchmarks/ppo_vs_trl_ppo.py --model tiny --runs 3 --iterations 6
    .venv/bin/python benchmarks/ppo_vs_trl_ppo.py --model 27m --runs 3 --iterations 6

One iteration = 16 prompts x 1 sample x exactly 32 generated tokens, then 1 PPO epoch of 2 minibatches of 8
(one micro-batch each, no gradient accumulation), fp32, 2 threads, on the same models (policy, reference,
reward, value model started from the reward model) and the same equal-length prompts. Each side runs in
its own process, A B A B; the peer's process has TRL 1.12 first on PYTHONPATH, our venv underneath.
Writes benchmarks/results/ppo_vs_trl_ppo_<model>.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PEER = common.ROOT / ".peers" / "trl-1.12.0"
ROLLOUTS, MINI_BATCH, NEW_TOKENS, TEMPERATURE, SEED = 16, 8, 32, 0.7, 42
ROLLOUT_LOGPROBS = "generate"  # as the peer: log-probabilities recorded while sampling, no second policy pass

SETTINGS = {
    "rollouts_per_iteration": ROLLOUTS, "samples_per_prompt": 1, "generated_tokens_per_rollout": NEW_TOKENS,
    "ppo_epochs": 1, "minibatches": ROLLOUTS // MINI_BATCH, "micro_batch": MINI_BATCH, "gradient_accumulation": 1,
    "temperature": TEMPERATURE, "top_k": 0, "top_p": 1.0, "dtype": "float32", "threads": common.THREADS,
    "value_function": "separate value model, initialised from the reward model (both sides)",
    "reference": "separate frozen copy of the policy (both sides)",
    "ours": {"rollout_batch_size": 16, "samples_per_prompt": 1, "generation_batch_size": 16, "mini_batch_size": 8,
             "per_device_train_batch_size": 8, "ppo_epochs": 1, "max_new_tokens": 32, "ignore_eos": True,
             "rollout_logprobs": "generate",
             "report_to": [], "save_steps": 0,
             "max_grad_norm": None, "kl_coef": 0.05, "vf_coef": 0.1, "value_clip": 0.2, "clip_eps": 0.2},
    "peer": {"per_device_train_batch_size": 16, "gradient_accumulation_steps": 1, "num_mini_batches": 2,
             "num_ppo_epochs": 1, "response_length": 32, "stop_token": None, "missing_eos_penalty": None,
             "num_sample_generations": 0, "gradient_checkpointing": False, "bf16": False,
             "local_rollout_forward_batch_size": 16, "report_to": "none", "save_strategy": "no",
             "kl_coef": 0.05, "vf_coef": 0.1, "cliprange": 0.2, "cliprange_value": 0.2,
             "note": "stop_token=None makes TRL set the policy's generation_config.eos_token_id to None: no stopping; "
                     "every scored sequence is checked to be prompt + 32 tokens",
             "gradient_clipping": "none: the TRL 1.12 PPO loop calls optimizer.step() without clip_grad_norm_ "
                                  "(max_grad_norm is ignored), so ours runs with max_grad_norm=None too"},
}


def _describe(optimizer) -> dict:
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    keep = ("eps", "weight_decay", "betas", "foreach", "fused")
    return {"class": type(inner).__name__, **{k: inner.defaults.get(k) for k in keep if k in inner.defaults},
            "lr_per_group": [group["lr"] for group in inner.param_groups]}


def _start(folder: Path) -> dict:
    """Child start-up: threads, prompts, import-only memory, this process's matmul rate."""
    common.pin_threads()
    info = common.load_prompts(folder)
    common.emit("start", import_rss_mib=common.peak_rss_mib(), matmul_gflops=common.matmul_gflops())
    return info


# ---------------------------------------------------------------------------------------------
# Side A: ours (rlhf_dist.rl.trainer.PPOTrainer, driven directly, one train_step per iteration)
# ---------------------------------------------------------------------------------------------

def run_ours(folder: Path, iterations: int) -> None:
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from rlhf_dist.config import PPOTrainingConfig
    from rlhf_dist.rl.actor_critic import ActorCritic
    from rlhf_dist.rl.distributed import make_accelerator
    from rlhf_dist.rl.rollout import disable_dropout
    from rlhf_dist.rl.trainer import PPOTrainer, RewardSource

    info = _start(folder)
    torch.manual_seed(SEED)
    args = PPOTrainingConfig(seed=SEED, max_steps=iterations, rollout_batch_size=ROLLOUTS, samples_per_prompt=1,
                             generation_batch_size=ROLLOUTS, mini_batch_size=MINI_BATCH,
                             per_device_train_batch_size=MINI_BATCH, ppo_epochs=1, max_new_tokens=NEW_TOKENS,
                             temperature=TEMPERATURE, report_to=[], save_steps=0, use_cpu=True,
                             max_prompt_length=256, max_grad_norm=None,  # TRL 1.12's PPO loop never clips
                             ignore_eos=True, rollout_logprobs=ROLLOUT_LOGPROBS)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "policy"))
    policy = disable_dropout(AutoModelForCausalLM.from_pretrained(str(folder / "policy"), dtype=torch.float32))
    accelerator = make_accelerator(args, 1, policy.config.hidden_size)

    def frozen(model):
        return disable_dropout(model).requires_grad_(False).eval()

    reference = frozen(AutoModelForCausalLM.from_pretrained(str(folder / "policy"), dtype=torch.float32))
    reward = frozen(AutoModelForSequenceClassification.from_pretrained(str(folder / "reward"), num_labels=1,
                                                                        dtype=torch.float32))
    value = disable_dropout(AutoModelForSequenceClassification.from_pretrained(str(folder / "reward"), num_labels=1,
                                                                               dtype=torch.float32))
    actor_critic = ActorCritic(policy, args.temperature, value, None, None)
    prompts = info["prompts"]
    work = Path(tempfile.mkdtemp(prefix="bench_ours_"))
    trainer = PPOTrainer(args, accelerator, actor_critic, reference,
                         RewardSource(model=reward, tokenizer=None, max_length=256), tokenizer, prompts,
                         prompts[:ROLLOUTS], work)
    import rlhf_dist.rl.trainer as loop

    timer = common.PhaseTimer()  # measurement only: wrappers around the loop's own calls
    timer.wrap(loop, "generate", "generate")
    timer.wrap(loop, "forward_logprobs", "reference_forward")
    timer.wrap(loop, "sequence_scores", "reward_forward")
    timer.wrap(actor_critic, "forward",
               lambda _: "update_forward" if torch.is_grad_enabled() else "policy_value_forward")
    # the value function's own pass: in the rollout, and in the update when the backward is split (one process)
    timer.wrap(actor_critic, "values", lambda _: "update_forward" if torch.is_grad_enabled() else "value_forward")
    timer.wrap(accelerator, "backward", "update_backward")
    timer.wrap(trainer, "optimizer_update", "optimizer_step")
    for step in range(1, iterations + 1):
        t0 = time.perf_counter()
        metrics, batch = trainer.train_step(step)
        seconds = time.perf_counter() - t0
        lengths = batch.response_mask.sum(1)
        if batch.response_ids.shape[1] != NEW_TOKENS or int(lengths.min()) != NEW_TOKENS or len(batch) != ROLLOUTS:
            raise SystemExit(f"ours: unequal work: {len(batch)} rollouts, lengths {lengths.tolist()}")
        common.emit("iteration", step=step, seconds=seconds, rollout_s=metrics["time/rollout"],
                    update_s=metrics["time/update"], phases=timer.take(), rollouts=len(batch), min_tokens=int(lengths.min()),
                    max_tokens=int(lengths.max()), ratio_first=metrics.get("policy/ratio_first_minibatch"))
    common.emit("end", peak_rss_mib=common.peak_rss_mib(), matmul_gflops_end=common.matmul_gflops(),
                versions=common.versions("torch", "transformers", "accelerate", "rlhf_dist"),
                optimizer=_describe(trainer.optimizer))


# ---------------------------------------------------------------------------------------------
# Side B: TRL 1.12 experimental PPOTrainer
# ---------------------------------------------------------------------------------------------

def peer_config(iterations: int):
    """TRL 1.12's PPOConfig for the equal work (also used by ppo_lora_vs_trl_ppo_lora.py)."""
    import tempfile

    from trl.experimental.ppo import PPOConfig

    return PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), seed=SEED, per_device_train_batch_size=ROLLOUTS,
        gradient_accumulation_steps=1, num_mini_batches=ROLLOUTS // MINI_BATCH, num_ppo_epochs=1,
        response_length=NEW_TOKENS, stop_token=None, missing_eos_penalty=None, num_sample_generations=0,
        gradient_checkpointing=False, bf16=False, local_rollout_forward_batch_size=ROLLOUTS,
        total_episodes=ROLLOUTS * iterations, temperature=TEMPERATURE, kl_coef=0.05, vf_coef=0.1, cliprange=0.2,
        cliprange_value=0.2, report_to="none", save_strategy="no", logging_steps=1, disable_tqdm=True, use_cpu=True,
        dataloader_num_workers=0)


def peer_timing(reward, info: dict, extra=None):
    """A TrainerCallback that emits one BENCH line per TRL iteration and checks its work.

    Seconds = between consecutive on_step_end calls (one update of TRL's loop); the update part starts at the first
    training forward of the policy+value wrapper (register its ``mark_update`` as a forward pre-hook). Every
    reward-model call must see prompt + 32 tokens (no truncation, no stop). ``extra()`` adds fields to each line.
    Set ``.timer`` (a `common.PhaseTimer`) before training.
    """
    from transformers import TrainerCallback

    widths: list[int] = []
    expected_width = info["prompt_length"] + NEW_TOKENS

    def record_width(module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        widths.append(ids.shape[1])

    reward.model.register_forward_pre_hook(record_width, with_kwargs=True)

    class Timing(TrainerCallback):
        def __init__(self):
            self.last = None
            self.update_started = None
            self.timer = None

        def on_train_begin(self, args, state, control, **kw):
            self.last = time.perf_counter()

        def mark_update(self, module, args):
            if self.update_started is None:
                self.update_started = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            if not widths or any(w != expected_width for w in widths):
                raise SystemExit(f"peer: unequal work: scored widths {widths}, expected {expected_width}")
            widths.clear()
            started = self.update_started or now
            common.emit("iteration", step=state.global_step, seconds=now - self.last, rollout_s=started - self.last,
                        update_s=now - started, phases=self.timer.take(), rollouts=ROLLOUTS,
                        min_tokens=NEW_TOKENS, max_tokens=NEW_TOKENS, **(extra() if extra else {}))
            self.last, self.update_started = time.perf_counter(), None

    return Timing()


def wrap_peer_phases(timer, trainer, reward) -> None:
    """Time TRL 1.12's own calls per phase (measurement only), its gc.collect() included."""
    import gc
    import types

    import torch
    from trl.experimental.ppo import ppo_trainer as loop

    timer.wrap(loop, "batch_generation", "generate")
    timer.wrap(loop, "forward", lambda _: "update_forward" if torch.is_grad_enabled() else "reference_forward")
    timer.wrap(loop, "get_reward", lambda a: "reward_forward" if a[0] is reward else "value_forward")
    loop.gc = types.SimpleNamespace(collect=gc.collect)
    timer.wrap(loop.gc, "collect", "gc_collect")
    timer.wrap(trainer.accelerator, "backward", "update_backward")
    timer.wrap(trainer.optimizer, "step", "optimizer_step")


def run_peer(folder: Path, iterations: int) -> None:
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOTrainer

    if not trl.__version__.startswith("1.12."):
        raise SystemExit(f"peer: expected TRL 1.12 first on PYTHONPATH, got {trl.__version__} from {trl.__file__}")
    info = _start(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "policy"), padding_side="left")
    load = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(str(folder / "policy"), **load)
    reference = AutoModelForCausalLM.from_pretrained(str(folder / "policy"), **load)
    reward = AutoModelForSequenceClassification.from_pretrained(str(folder / "reward"), num_labels=1, **load)
    value = AutoModelForSequenceClassification.from_pretrained(str(folder / "reward"), num_labels=1, **load)
    dataset = Dataset.from_dict({"input_ids": info["prompts"]})
    timing = peer_timing(reward, info)
    trainer = PPOTrainer(args=peer_config(iterations), processing_class=tokenizer, model=policy, ref_model=reference,
                         reward_model=reward, train_dataset=dataset, value_model=value, callbacks=[timing])
    trainer.accelerator.unwrap_model(trainer.model).register_forward_pre_hook(timing.mark_update)
    timing.timer = common.PhaseTimer()  # measurement only: wrappers around the loop's own calls
    wrap_peer_phases(timing.timer, trainer, reward)
    trainer.train()
    common.emit("end", peak_rss_mib=common.peak_rss_mib(), matmul_gflops_end=common.matmul_gflops(),
                versions=common.versions("torch", "transformers", "accelerate", "trl", "datasets"),
                optimizer=_describe(trainer.optimizer),
                trl_file=trl.__file__)


# ---------------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(common.MODELS), default="tiny", help="Model shape both sides load.")
    p.add_argument("--runs", type=int, default=3, help="Interleaved A B runs (one process per side per run).")
    p.add_argument("--iterations", type=int, default=6, help="PPO iterations per process; the first is the warm-up.")
    p.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)  # a child process
    p.add_argument("--folder", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.iterations < 6:
        p.error("--iterations must be >= 6 (1 warm-up + at least 5 measured)")
    if args.side:
        (run_ours if args.side == "ours" else run_peer)(Path(args.folder), args.iterations)
        return 0
    if not (PEER / "trl" / "__init__.py").is_file():
        p.error(f"TRL 1.12 is not installed in {PEER}; run: .venv/bin/pip install --no-deps --target {PEER} trl==1.12.0")
    folder = common.prepare_models(args.model)
    info = common.load_prompts(folder)
    child = [common.python(), str(Path(__file__).resolve()), "--iterations", str(args.iterations), "--folder", str(folder)]
    sides = {"ours": (child + ["--side", "ours"], {}),
             "trl-1.12": (child + ["--side", "peer"], {"PYTHONPATH": str(PEER)})}
    machine = common.machine_info()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    per_side = common.run_interleaved(sides, args.runs, warmup=1, samples=ROLLOUTS, tokens=ROLLOUTS * NEW_TOKENS)
    flops = common.phase_flops(common.MODELS[args.model], ROLLOUTS, info["prompt_length"], NEW_TOKENS, value="model")
    summary = common.aggregate(per_side, "ours", "trl-1.12", flops)
    payload = {
        "benchmark": "ppo_vs_trl_ppo", "model": args.model, "started_utc": started,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine,
        "versions": {name: rows[0]["raw"]["end"]["versions"] for name, rows in per_side.items()},
        "models": {"shape": common.MODELS[args.model], "policy_parameters": info["policy_parameters"],
                   "tokenizer_length": info["tokenizer_length"],
                   "prompt_length": info["prompt_length"], "distinct_prompts": info["distinct_prompts"]},
        "settings": SETTINGS, "runs": args.runs, "iterations": args.iterations, "warmup_iterations": 1,
        "not_equal": [
            "TRL calls gc.collect() twice per iteration and empty_cache() several times; ours does not",
            "data order: each side draws prompts with its own seeded shuffle; all prompts have the same token length, "
            "so the shapes (and the work) are identical whichever prompts are drawn",
            "sampled tokens differ between sides (different RNG streams); with exactly 32 tokens and no stop token "
            "this does not change the amount of work",
            "optimizer: both AdamW, but each side builds its own (see versions/optimizer per side: foreach/fused "
            "flags and learning rates may differ; the learning rate does not change the work)",
            "TRL's timing includes its per-iteration metric gathering and logging; ours times train_step, which also "
            "computes its metrics (no tracker/JSONL writes, no tqdm on either side)",
        ],
        "summary": summary, "per_run": per_side,
    }
    path = common.write_result(f"ppo_vs_trl_ppo_{args.model}", payload)
    common.print_table(summary, "ours", "trl-1.12")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
