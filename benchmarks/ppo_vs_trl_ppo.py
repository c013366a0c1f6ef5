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

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PEER = common.PEERS / "trl-1.12.0"
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
             "max_grad_norm": None, "kl_coef": 0.05, "vf_coef": 0.1, "value_clip": 0.2, "clip_eps": 0.2,
             "built_by": "rlhf_dist.rl.models.build_ppo (model.dtype float32, value_model = the reward folder), "
                         "as the PPO stage builds them"},
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


# ---------------------------------------------------------------------------------------------
# Side A: ours (rlhf_dist.rl.trainer.PPOLoop, driven directly, one train_step per iteration)
# ---------------------------------------------------------------------------------------------

# Our loop's settings; common.ours_training adds what every benchmark sets (no trackers, CPU, ignore_eos)
TRAINING = dict(seed=SEED, rollout_batch_size=ROLLOUTS, samples_per_prompt=1, generation_batch_size=ROLLOUTS,
                mini_batch_size=MINI_BATCH, per_device_train_batch_size=MINI_BATCH, ppo_epochs=1,
                max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, rollout_logprobs=ROLLOUT_LOGPROBS,
                max_grad_norm=None)  # TRL 1.12's PPO loop never clips


def run_ours(folder: Path, iterations: int) -> None:
    """The models built by the PPO stage's own build_ppo; the value model started from the reward model."""
    common.run_ours(folder, iterations, TRAINING, value="model")


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


def peer_trainer(folder: Path, iterations: int, *, reference: bool, timing_extra=None, config=None, timing=None,
                 **trainer_kwargs):
    """A TRL 1.12 child up to its PPOTrainer (also used by ppo_lora_vs_trl_ppo_lora.py and ragged_rollouts.py): the
    version check, the start-up (after TRL's imports), the tokenizer (left padding) and the fp32 models: the policy, a
    separate reference (or, without `reference`, none: TRL's reference is then the policy with its adapter disabled),
    the reward model and the value model started from it, the timing callback (``timing``, else `peer_timing` with
    ``timing_extra``), ``config`` (else `peer_config`), `trainer_kwargs`.
    Returns (trl, the trainer, the reward model, the timing callback)."""
    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOTrainer

    if not trl.__version__.startswith("1.12."):
        raise SystemExit(f"peer: expected TRL 1.12 first on PYTHONPATH, got {trl.__version__} from {trl.__file__}")
    info = common.start_child(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "policy"), padding_side="left")
    load = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(str(folder / "policy"), **load)
    ref_model = AutoModelForCausalLM.from_pretrained(str(folder / "policy"), **load) if reference else None
    reward = AutoModelForSequenceClassification.from_pretrained(str(folder / "reward"), num_labels=1, **load)
    value = AutoModelForSequenceClassification.from_pretrained(str(folder / "reward"), num_labels=1, **load)
    dataset = Dataset.from_dict({"input_ids": info["prompts"]})
    timing = timing or peer_timing(reward, info, extra=timing_extra)
    trainer = PPOTrainer(args=config or peer_config(iterations), processing_class=tokenizer, model=policy, ref_model=ref_model,
                         reward_model=reward, train_dataset=dataset, value_model=value, callbacks=[timing],
                         **trainer_kwargs)
    return trl, trainer, reward, timing


def run_peer(folder: Path, iterations: int) -> None:
    trl, trainer, reward, timing = peer_trainer(folder, iterations, reference=True)
    trainer.accelerator.unwrap_model(trainer.model).register_forward_pre_hook(timing.mark_update)
    timing.timer = common.PhaseTimer()  # measurement only: wrappers around the loop's own calls
    wrap_peer_phases(timing.timer, trainer, reward)
    trainer.train()
    common.emit_end(("torch", "transformers", "accelerate", "trl", "datasets"),
                    optimizer=common.describe_optimizer(trainer.optimizer), trl_file=trl.__file__)


# ---------------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------------

NOT_EQUAL = [
    "TRL calls gc.collect() twice per iteration and empty_cache() several times; ours does not",
    "data order: each side draws prompts with its own seeded shuffle; all prompts have the same token length, "
    "so the shapes (and the work) are identical whichever prompts are drawn",
    "sampled tokens differ between sides (different RNG streams); with exactly 32 tokens and no stop token "
    "this does not change the amount of work",
    "optimizer: both AdamW, but each side builds its own (see versions/optimizer per side: foreach/fused "
    "flags and learning rates may differ; the learning rate does not change the work)",
    "TRL's timing includes its per-iteration metric gathering and logging; ours times train_step, which also "
    "computes its metrics (no tracker/JSONL writes, no tqdm on either side)",
]
INSTALL = f".venv/bin/pip install --no-deps --target {PEER} trl==1.12.0"


def main(argv: list[str] | None = None) -> int:
    args = common.comparison_args(__doc__, argv, run_ours, run_peer, (PEER, "1.12", INSTALL))
    if args is None:  # a child process: it ran its side
        return 0
    run = common.compare(args, __file__, "trl-1.12", value="model", peer_env={"PYTHONPATH": str(PEER)})
    path = common.write_result(f"ppo_vs_trl_ppo_{args.model}",
                               common.result("ppo_vs_trl_ppo", args, run, SETTINGS, not_equal=NOT_EQUAL))
    common.print_table(run.summary, "ours", "trl-1.12")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
