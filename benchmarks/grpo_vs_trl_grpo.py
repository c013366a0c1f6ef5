"""Our GRPO (PPOLoop, advantage_estimator="grpo", no value function) against TRL 1.16's GRPOTrainer, on equal
work, side by side (issue 6).

    .venv/bin/python benchmarks/grpo_vs_trl_grpo.py --model tiny --runs 3 --iterations 6
    .venv/bin/python benchmarks/grpo_vs_trl_grpo.py --model 27m --runs 3 --iterations 6
    .venv/bin/python benchmarks/grpo_vs_trl_grpo.py --model 27m --runs 3 --iterations 6 --peer-reward model

One iteration = 4 prompts x 4 samples = 16 completions of exactly 32 generated tokens, then 1 epoch over them in
2 minibatches of 8 (one micro-batch each, no gradient accumulation), fp32, 2 threads, KL to a separate frozen
reference copy of the policy (beta = 0.04, k3 in the loss), scores from the shared reward model. For TRL one
iteration is one generation round: 16 completions used for 2 optimizer steps (steps_per_generation=2).
Each side runs in its own process, A B A B; the peer is the TRL installed in our venv (checked to be 1.16).
Writes benchmarks/results/grpo_vs_trl_grpo_<model>.json and prints a table.

The peer's reward: by default (--peer-reward ids) a reward function scores the token ids (BOS + prompt + the 32
completion tokens) with the same reward model object, as ours does: equal reward work. With --peer-reward model the
reward model object itself goes to TRL, its own path, which decodes the completions and re-tokenizes the text, so its
reward forward sees other sequences than ours (recorded); that result goes to grpo_vs_trl_grpo_<model>_reward_text.json.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PEER_VERSION = "1.16."
PROMPTS, GROUP, MINI_BATCH, NEW_TOKENS, TEMPERATURE, SEED = 4, 4, 8, 32, 0.7, 42
ROLLOUTS = PROMPTS * GROUP  # 16 completions per iteration
STEPS_PER_ROUND = ROLLOUTS // MINI_BATCH  # 2 optimizer steps per generation round
BETA, CLIP, LR, MAX_GRAD_NORM = 0.04, 0.2, 1e-6, 1.0

SETTINGS = {
    "prompts_per_iteration": PROMPTS, "samples_per_prompt": GROUP, "completions_per_iteration": ROLLOUTS,
    "generated_tokens_per_completion": NEW_TOKENS, "epochs": 1, "minibatches": STEPS_PER_ROUND,
    "micro_batch": MINI_BATCH, "gradient_accumulation": 1, "temperature": TEMPERATURE, "top_k": 0, "top_p": 1.0,
    "dtype": "float32", "threads": common.THREADS, "value_function": "none (critic-free group baseline, both sides)",
    "reference": "separate frozen copy of the policy (both sides; TRL loads its own from the policy's folder)",
    "advantage": "(score - group mean) / (unbiased group std + 1e-4), not whitened over the batch (both sides)",
    "kl": "beta * k3 = beta * (exp(ref - logp) - (ref - logp) - 1) per token, in the loss, not in the reward; "
          "beta = 0.04 (both sides)",
    "policy_loss": "clipped ratio, epsilon 0.2, token-level (both sides)",
    "learning_rate": LR, "lr_schedule": "linear decay to 0 over all optimizer steps, no warm-up (both sides)",
    "max_grad_norm": MAX_GRAD_NORM,
    "ours": {"advantage_estimator": "grpo", "rollout_batch_size": PROMPTS, "samples_per_prompt": GROUP,
             "generation_batch_size": ROLLOUTS, "mini_batch_size": MINI_BATCH, "per_device_train_batch_size": MINI_BATCH,
             "ppo_epochs": 1, "max_new_tokens": NEW_TOKENS, "ignore_eos": True, "rollout_logprobs": "generate",
             "kl_coef": BETA, "kl_clamp": None, "clip_eps": CLIP, "loss_aggregation": "token",
             "whiten_advantages": False, "learning_rate": LR, "max_grad_norm": MAX_GRAD_NORM, "report_to": [],
             "save_steps": 0, "use_cpu": True,
             "built_by": "rlhf_dist.rl.models.build_ppo (model.dtype float32, advantage_estimator grpo: no value "
                         "function), as the PPO stage builds them",
             "note": "ignore_eos: no stop token (stop_ids == [], checked), every response is checked to be 32 tokens; "
                     "rollout_logprobs=generate: the old log-probabilities recorded while sampling (TRL runs a no-grad "
                     "policy forward for them instead: the same numbers, its extra cost); "
                     "kl_clamp=None: TRL does not clamp the k3 term (our default clamps it to [0, 10])"},
    "peer": {"num_generations": GROUP, "per_device_train_batch_size": MINI_BATCH, "gradient_accumulation_steps": 1,
             "steps_per_generation": STEPS_PER_ROUND, "num_iterations": 1, "max_completion_length": NEW_TOKENS,
             "generation_kwargs": {"min_new_tokens": NEW_TOKENS}, "mask_truncated_completions": False, "beta": BETA,
             "use_bias_correction_kl": False, "loss_type": "dapo", "scale_rewards": "group", "epsilon": CLIP,
             "top_k": 0, "top_p": 1.0, "gradient_checkpointing": False, "bf16": False, "use_cpu": True,
             "disable_dropout": True, "learning_rate": LR, "max_grad_norm": MAX_GRAD_NORM, "report_to": "none",
             "save_strategy": "no", "logging_steps": 1, "reward_funcs": "the reward model object "
             "(AutoModelForSequenceClassification, one label)",
             "note": "min_new_tokens=32 masks EOS while sampling (TRL cuts every completion after its first EOS "
                     "itself, whatever generate's eos_token_id), so every completion is 32 tokens (checked); "
                     "steps_per_generation=2 > gradient_accumulation_steps=1 makes TRL compute the old "
                     "log-probabilities with a no-grad policy forward; use_bias_correction_kl=False: TRL 1.16's "
                     "default (True) multiplies the k3 term by the ratio, which ours does not",
             "loss_type_vs_ours": "dapo (TRL's default): sum of per-token losses / (the generation round's valid "
                                  "tokens x gradient_accumulation_steps / steps_per_generation) = / 256 per optimizer "
                                  "step here, which is ours (token aggregation: / the minibatch's 256 valid tokens). "
                                  "With every completion exactly 32 tokens, 'grpo', 'bnpo' and 'dr_grpo' give the "
                                  "same number too; they differ from ours only with unequal lengths ('dapo' "
                                  "normalises by the whole round's tokens split evenly over its steps, ours by each "
                                  "minibatch's own tokens)"},
}

REWARD_MODEL_NOT_EQUAL = (
    "reward input: TRL decodes the completions to text and re-tokenizes prompt text + completion text for the reward "
    "model (add_special_tokens=False, so no BOS; BPE re-merges the decoded random tokens, so the length changes), "
    "so its reward forward sees other widths than prompt + 32 (recorded per iteration: reward_widths) and it pays "
    "the decoding and tokenization (phase reward_tokenize); ours scores the very token ids, BOS + prompt + 32. "
    "With a policy vocabulary larger than the tokenizer's (the 27m model: 8000 rows, ~1000 tokenizer entries) "
    "most sampled ids decode to nothing, so TRL's reward sequences are much SHORTER than ours; with the tiny model "
    "they are longer (BPE re-merges the decoded text into more pieces). --peer-reward ids removes this difference")
REWARD_IDS_NOTE = (
    "reward input: equal (--peer-reward ids): a reward function passed to TRL scores BOS + prompt + the 32 completion "
    "ids with the same reward model object (one batch of 16, like ours); TRL still decodes the completions to text "
    "(its _generate does so for every reward path), which ours does not")

NOT_EQUAL = [
    "old log-probabilities: ours records them while sampling (rollout_logprobs: generate); TRL 1.16 runs a no-grad "
    "policy forward over the 16 sequences for them (steps_per_generation > gradient_accumulation_steps). The same "
    "numbers to float rounding (both report a first ratio of 1); the forward is TRL's cost, counted against it",
    "prompts: TRL takes prompt text (its dataset's 'prompt' column; ours takes token ids) and tokenizes it every "
    "round; the ids are the same (checked once: decode + encode gives back every prompt's ids)",
    "EOS: TRL samples with min_new_tokens=32 (EOS logit set to -inf for all 32 steps, so EOS is never drawn); ours "
    "(ignore_eos) can draw EOS and goes on. Both produce exactly 32 tokens (checked); the sampling distributions "
    "differ by the EOS token only",
    "batching of the no-grad forwards: TRL runs the old-log-probability and reference forwards in chunks of "
    "per_device_train_batch_size (2 x 8 rows), ours in one batch of 16; the reward forward is 16 rows on both sides",
    "LM head: TRL 1.16 patches the policy and the reference with a fused, tiled LM head that computes log-probs "
    "(and, for the policy, entropy) at the completion positions without materialising the logits; ours "
    "materialises [B, 33, V] float32 logits (logits_to_keep) and takes log_softmax. Same matmul FLOPs, different "
    "memory traffic",
    "data order: each side draws prompts with its own seeded shuffle; all prompts have the same token length, so the "
    "shapes (and the work) are identical whichever prompts are drawn",
    "sampled tokens differ between sides (different RNG streams); with exactly 32 tokens this does not change the "
    "amount of work (the reward widths on TRL's side do depend on them, see above)",
    "optimizer: both AdamW with no weight decay and the same learning rate and schedule, each side builds its own "
    "(see end/optimizer per side: eps 1e-8 for TRL/transformers, 1e-5 ours; fused flags)",
    "TRL's timing includes the Trainer's per-step bookkeeping (FLOP estimate, input-token count, metric gathering) "
    "and its log() at every step (logging_steps=1, no tracker; with disable_tqdm=True the Trainer's PrinterCallback "
    "prints each log dict to stdout); ours times train_step, which also computes its metrics (no tracker/JSONL "
    "writes, no tqdm on either side)",
]


# ---------------------------------------------------------------------------------------------
# Side A: ours (rlhf_dist.rl.trainer.PPOLoop with the GRPO estimator, one train_step per iteration)
# ---------------------------------------------------------------------------------------------

# Our loop's settings; common.ours_training adds what every benchmark sets (no trackers, CPU, ignore_eos,
# rollout_logprobs: generate)
TRAINING = dict(seed=SEED, advantage_estimator="grpo", rollout_batch_size=PROMPTS, samples_per_prompt=GROUP,
                generation_batch_size=ROLLOUTS, mini_batch_size=MINI_BATCH, per_device_train_batch_size=MINI_BATCH,
                ppo_epochs=1, max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, kl_coef=BETA, kl_clamp=None,
                clip_eps=CLIP, loss_aggregation="token", learning_rate=LR, lr_scheduler_type="linear",
                max_grad_norm=MAX_GRAD_NORM)


def run_ours(folder: Path, iterations: int) -> None:
    """The models built by the PPO stage's own build_ppo (no value function); the clipping and the optimizer's step
    timed apart, as the peer's."""
    expected_width = common.load_prompts(folder)["prompt_length"] + NEW_TOKENS

    def width(batch) -> int:
        return batch.query_ids.shape[1] + batch.response_ids.shape[1]

    def fields(metrics: dict, batch) -> dict:
        w = width(batch)
        return {"sequence_width": w, "reward_widths": [w], "reward_calls": [[len(batch), w, len(batch) * w]],
                "ratio_mean": metrics.get("policy/ratio_mean"), "kl_k1": metrics.get("objective/kl"),
                "score_mean": metrics.get("objective/scores"), "grad_norm": metrics.get("train/grad_norm")}

    def end(loop) -> dict:  # ours sets each group's learning rate per step
        return {"optimizer": {**common.describe_optimizer(loop.optimizer, per_group=True), "base_lrs": loop.base_lrs},
                "config": {k: getattr(loop.args, k) for k in ("ignore_eos", "rollout_logprobs")}}

    common.run_ours(folder, iterations, TRAINING, value=None, optimizer_step=True,
                    check=lambda batch: f"width {width(batch)}" if width(batch) != expected_width else None,
                    fields=fields, end=end)


# ---------------------------------------------------------------------------------------------
# Side B: TRL 1.16 GRPOTrainer
# ---------------------------------------------------------------------------------------------

def run_peer(folder: Path, iterations: int, peer_reward: str = "model") -> None:
    import tempfile

    import torch
    import trl
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    info, tokenizer, texts = common.start_trl_child(folder, PEER_VERSION)  # TRL takes prompt text, checked
    load = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(str(folder / "policy"), **load)
    reward = AutoModelForSequenceClassification.from_pretrained(str(folder / "reward"), num_labels=1, **load)
    dataset = Dataset.from_dict({"prompt": texts})
    reward_funcs = reward
    if peer_reward == "ids":  # the same reward model object, on the very token ids ours scores
        reward.eval().requires_grad_(False)

        def reward_ids(prompts, completions, completion_ids, **kwargs):
            ids = torch.tensor([tokenizer(p)["input_ids"] + list(c) for p, c in zip(prompts, completion_ids)])
            with torch.inference_mode():
                return reward(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, 0].tolist()

        reward_funcs = reward_ids
    out = tempfile.mkdtemp(prefix="bench_trl_")
    config = GRPOConfig(
        output_dir=out, seed=SEED, max_steps=STEPS_PER_ROUND * iterations, per_device_train_batch_size=MINI_BATCH,
        gradient_accumulation_steps=1, steps_per_generation=STEPS_PER_ROUND, num_generations=GROUP, num_iterations=1,
        max_completion_length=NEW_TOKENS, generation_kwargs={"min_new_tokens": NEW_TOKENS},
        mask_truncated_completions=False, temperature=TEMPERATURE, top_k=0, top_p=1.0, beta=BETA,
        use_bias_correction_kl=False, loss_type="dapo", scale_rewards="group", epsilon=CLIP, learning_rate=LR,
        lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, disable_dropout=True, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, log_completions=False)

    expected_width = info["prompt_length"] + NEW_TOKENS
    seen: dict[str, list] = {"completions": [], "forwards": [], "reward_calls": [], "ratios": []}
    last_logps: dict[str, torch.Tensor] = {}

    class Timing(TrainerCallback):
        """One iteration = one generation round = STEPS_PER_ROUND optimizer steps: wall time between every
        STEPS_PER_ROUND-th on_step_end; the update part starts at the round's first training forward."""

        def __init__(self):
            self.last = None
            self.update_started = None
            self.logs: list[dict] = []

        def on_train_begin(self, args, state, control, **kw):
            # the Trainer builds its optimizer inside train(): wrap it here, before the first step
            timer.wrap(trainer.optimizer, "step", "optimizer_step")
            # the timed wrapper calls the scheduler's own step wrapper; say so, or torch warns that step was replaced
            trainer.optimizer.step._wrapped_by_lr_sched = True
            self.optimizer = common.describe_optimizer(trainer.optimizer, per_group=True)
            self.last = time.perf_counter()

        def on_log(self, args, state, control, logs=None, **kw):
            self.logs.append({"step": state.global_step, **(logs or {})})

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % STEPS_PER_ROUND:
                return
            now = time.perf_counter()
            lengths = [n for row in seen["completions"] for n in row]
            forwards = seen["forwards"]
            kinds = {k: [shape for kind, shape in forwards if kind == k]
                     for k in ("policy_forward", "reference_forward", "update_forward")}
            problems = []
            if len(lengths) != ROLLOUTS or any(n != NEW_TOKENS for n in lengths):
                problems.append(f"completion lengths {lengths}")
            for k, shapes in kinds.items():
                rows = sum(b for b, _ in shapes)
                if rows != ROLLOUTS or any(w != expected_width for _, w in shapes):
                    problems.append(f"{k} shapes {shapes}")
            if len(kinds["update_forward"]) != STEPS_PER_ROUND:
                problems.append(f"{len(kinds['update_forward'])} training forwards")
            if problems:
                raise SystemExit(f"peer: unequal work (expected {ROLLOUTS} x {NEW_TOKENS} tokens, width "
                                 f"{expected_width}): " + "; ".join(problems))
            phases = timer.take()
            total = phases.pop("reward_calculate", 0.0)
            phases["reward_tokenize"] = total - phases.get("reward_forward", 0.0)
            started = self.update_started or now
            common.emit("iteration", step=state.global_step // STEPS_PER_ROUND, optimizer_steps=state.global_step,
                        seconds=now - self.last, rollout_s=started - self.last, update_s=now - started, phases=phases,
                        rollouts=len(lengths), min_tokens=min(lengths), max_tokens=max(lengths),
                        sequence_width=expected_width, reward_widths=[w for _, w, _ in seen["reward_calls"]],
                        reward_calls=[list(c) for c in seen["reward_calls"]],
                        forwards={k: [list(shape) for shape in shapes] for k, shapes in kinds.items()},
                        ratio_first=seen["ratios"][0] if seen["ratios"] else None,
                        ratio_mean=sum(seen["ratios"]) / len(seen["ratios"]) if seen["ratios"] else None)
            for v in seen.values():
                v.clear()
            self.last, self.update_started = time.perf_counter(), None

    timing = Timing()
    trainer = GRPOTrainer(model=policy, reward_funcs=reward_funcs, args=config, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[timing])
    if trainer.ref_model is None:
        raise SystemExit("peer: TRL built no reference model (beta must be > 0)")

    # Measurement-only recorders (they call the originals and look at shapes), then the phase timers on top.
    def record_generate(original):
        def wrapped(*a, **k):
            completion_ids, logprobs = original(*a, **k)
            seen["completions"].append([len(c) for c in completion_ids])
            return completion_ids, logprobs
        return wrapped

    def forward_kind(model) -> str:
        if model is trainer.ref_model:
            return "reference_forward"
        return "update_forward" if torch.is_grad_enabled() else "policy_forward"

    def record_logps(original):
        def wrapped(model, input_ids, *a, **k):
            kind = forward_kind(model)
            if kind == "update_forward" and timing.update_started is None:
                timing.update_started = time.perf_counter()
            result = original(model, input_ids, *a, **k)
            seen["forwards"].append((kind, (int(input_ids.shape[0]), int(input_ids.shape[1]))))
            if kind == "update_forward":
                last_logps["logps"] = result[0].detach()
            return result
        return wrapped

    def record_ratio(original):
        def wrapped(model, inputs):  # the ratio of this minibatch at its training forward, as ours reports it
            loss = original(model, inputs)
            old, logps, mask = inputs.get("old_per_token_logps"), last_logps.get("logps"), inputs["completion_mask"]
            if old is not None and logps is not None:
                seen["ratios"].append(float(((logps - old).exp() * mask).sum() / mask.sum()))
            return loss
        return wrapped

    trainer._generate_single_turn = record_generate(trainer._generate_single_turn)
    trainer._get_per_token_logps_and_entropies = record_logps(trainer._get_per_token_logps_and_entropies)
    trainer._compute_loss = record_ratio(trainer._compute_loss)
    reward_model = trainer.reward_funcs[0] if peer_reward == "model" else reward

    def record_reward(module, a, kw):  # (rows, padded width, valid tokens) of every reward-model call
        ids, mask = kw.get("input_ids", a[0] if a else None), kw.get("attention_mask")
        valid = int(mask.sum()) if mask is not None else ids.numel()
        seen["reward_calls"].append((int(ids.shape[0]), int(ids.shape[1]), valid))

    getattr(reward_model, reward_model.base_model_prefix).register_forward_pre_hook(record_reward, with_kwargs=True)

    timer = common.PhaseTimer()  # measurement only: wrappers around the loop's own calls
    timer.wrap(trainer, "_generate_single_turn", "generate")
    timer.wrap(trainer, "_get_per_token_logps_and_entropies", lambda a: forward_kind(a[0]))
    timer.wrap(trainer, "_calculate_rewards", "reward_calculate")  # split into reward_forward + reward_tokenize
    timer.wrap(reward_model, "forward", "reward_forward")
    timer.wrap(trainer.accelerator, "backward", "update_backward")
    timer.wrap(trainer.accelerator, "clip_grad_norm_", "grad_clip")
    trainer.train()
    keep = ("loss", "grad_norm", "kl", "entropy", "reward", "reward_std", "clip_ratio/region_mean",
            "completions/mean_length", "completions/min_length", "completions/max_length", "learning_rate")
    common.emit_end(("torch", "transformers", "accelerate", "trl", "datasets"), optimizer=timing.optimizer,
                    trl_file=trl.__file__,
                        trl_logs=[{k: row[k] for k in ("step", *keep) if k in row} for row in timing.logs],
                    generation_config={k: v for k, v in trainer.generation_kwargs.items() if k != "cache_implementation"})


# ---------------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, per="process (an iteration: a generation round)")
    p.add_argument("--peer-reward", choices=["model", "ids"], default="ids",
                   help="model: pass TRL the reward model object (its own path: decode + re-tokenize the text); "
                        "ids: a reward function scoring the token ids with the same model, as ours (equal reward work).")
    args = common.parse(p, argv)
    if args.side:
        if args.side == "ours":
            run_ours(Path(args.folder), args.iterations)
        else:
            run_peer(Path(args.folder), args.iterations, args.peer_reward)
        return 0
    import trl

    if not trl.__version__.startswith(PEER_VERSION):
        p.error(f"this comparison is against TRL {PEER_VERSION}x; our venv has {trl.__version__}")
    peer_name = f"trl-{trl.__version__}"
    settings = {**SETTINGS, "peer_reward": args.peer_reward}
    if args.peer_reward == "ids":
        settings["peer"] = {**SETTINGS["peer"], "reward_funcs": "a function scoring BOS + prompt + completion ids "
                            "with the reward model object (one batch of 16, no padding)"}
    run = common.compare(args, __file__, peer_name, value=None, peer_args=("--peer-reward", args.peer_reward),
                         rollouts=ROLLOUTS, new_tokens=NEW_TOKENS)
    not_equal = [REWARD_MODEL_NOT_EQUAL if args.peer_reward == "model" else REWARD_IDS_NOTE, *NOT_EQUAL]
    suffix = "" if args.peer_reward == "ids" else "_reward_text"
    path = common.write_result(f"grpo_vs_trl_grpo_{args.model}{suffix}",
                               common.result("grpo_vs_trl_grpo", args, run, settings, not_equal=not_equal))
    common.print_table(run.summary, "ours", peer_name)
    for name, rows in run.per_side.items():
        its = [it for r in rows for it in r["raw"]["iterations"]]
        widths = sorted({w for it in its for w in it["reward_widths"]})
        ratios = [it["ratio_first"] for it in its if it.get("ratio_first") is not None]
        ratio = f"{min(ratios):.6f}..{max(ratios):.6f}" if ratios else "n/a"
        print(f"{name}: {min(it['rollouts'] for it in its)}..{max(it['rollouts'] for it in its)} completions x "
              f"{min(it['min_tokens'] for it in its)}..{max(it['max_tokens'] for it in its)} tokens per iteration, "
              f"reward-model widths {widths}, first-minibatch ratio {ratio}")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
