"""Our PPO with a value head on the policy against TRL 0.11.4's PPOTrainer (value head too), on equal work (issue 6).

    .venv/bin/pip install --no-deps --target benchmarks/.peers/trl-0.11.4 \\
        trl==0.11.4 tyro docstring-parser typeguard shtab                                # once
    .venv/bin/python benchmarks/ppo_valuehead_vs_trl011.py --model tiny --runs 3 --iterations 6
    .venv/bin/python benchmarks/ppo_valuehead_vs_trl011.py --model 27m --runs 3 --iterations 6

Both sides compute the values with a linear head on the policy's last hidden state, in the policy's own
forward pass (ours: `ActorCritic(policy, T, None, ValueHead(hidden, seed))`, built by the PPO stage's own
`rlhf_dist.rl.models.build_ppo` with `value_head: true`; TRL: `AutoModelForCausalLMWithValueHead`).
One iteration = 16 prompts x 1 sample x exactly 32 generated tokens, scored by the shared reward model, then
1 PPO epoch of 2 minibatches of 8 (one micro-batch each, no gradient accumulation), fp32, 2 threads, on the
same models (policy, separate frozen reference, reward) and the same equal-length prompts. The peer runs TRL
0.11.4's documented loop: `ppo_trainer.generate(...)`, the harness scores, `ppo_trainer.step(queries,
responses, scores)`. Each side runs in its own process, A B A B; the peer's process has TRL 0.11.4 first on
PYTHONPATH, our venv underneath. Writes benchmarks/results/ppo_valuehead_vs_trl011_<model>.json and prints a table.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PEER_VERSION = "0.11.4"
PEER = common.PEERS / f"trl-{PEER_VERSION}"
INSTALL = (f".venv/bin/pip install --no-deps --target benchmarks/.peers/trl-{PEER_VERSION} trl=={PEER_VERSION} "
           "tyro docstring-parser typeguard shtab")
ROLLOUTS, MINI_BATCH, NEW_TOKENS, TEMPERATURE, SEED, LR = 16, 8, 32, 0.7, 42, 3e-6

SETTINGS = {
    "rollouts_per_iteration": ROLLOUTS, "samples_per_prompt": 1, "generated_tokens_per_rollout": NEW_TOKENS,
    "ppo_epochs": 1, "minibatches": ROLLOUTS // MINI_BATCH, "micro_batch": MINI_BATCH, "gradient_accumulation": 1,
    "temperature": TEMPERATURE, "top_k": 0, "top_p": 1.0, "dtype": "float32", "threads": common.THREADS,
    "learning_rate": LR,
    "value_function": "a linear value head on the policy's last hidden state, computed in the policy's own forward "
                      "(both sides); no separate value model",
    "reference": "separate frozen copy of the policy loaded from the same folder (both sides); the peer's is an "
                 "AutoModelForCausalLMWithValueHead passed as ref_model (TRL is not asked to create it)",
    "reward": "the shared one-label sequence classifier, one forward of the 16 prompt+response rows (both sides; "
              "the peer's scores are computed by this harness and passed to step(), as TRL 0.11.4 requires)",
    "ours": {"actor_critic": f"ActorCritic(policy, temperature, None, ValueHead(hidden_size_of(policy), seed={SEED}), None)",
             "built_by": "rlhf_dist.rl.models.build_ppo (model.dtype float32, value_head: true), as the PPO stage "
                         "builds them; the head seeded with training.seed",
             "rollout_batch_size": 16, "samples_per_prompt": 1, "generation_batch_size": 16, "mini_batch_size": 8,
             "per_device_train_batch_size": 8, "ppo_epochs": 1, "max_new_tokens": 32, "temperature": TEMPERATURE,
             "ignore_eos": True, "rollout_logprobs": "generate (log-probs and the value head's hidden states "
             "recorded while sampling: no rollout forward of the policy)",
             "report_to": [], "save_steps": 0, "use_cpu": True, "learning_rate": LR,
             "max_grad_norm": None, "kl_coef": 0.05, "vf_coef": 0.1, "value_clip": 0.2, "clip_eps": 0.2},
    "peer": {"model": "AutoModelForCausalLMWithValueHead.from_pretrained(<the loaded policy>, "
                      "summary_dropout_prob=0.0)",
             "ref_model": "AutoModelForCausalLMWithValueHead.from_pretrained(<a second copy of the policy>, "
                          "summary_dropout_prob=0.0)",
             "batch_size": 16, "mini_batch_size": 8, "ppo_epochs": 1, "gradient_accumulation_steps": 1,
             "init_kl_coef": 0.05, "adap_kl_ctrl": False, "kl_penalty": "kl", "cliprange": 0.2,
             "cliprange_value": 0.2, "vf_coef": 0.1, "max_grad_norm": None, "learning_rate": LR,
             "whiten": "TRL's default (advantages whitened, whiten_rewards=False)", "optimize_device_cache": False,
             "log_with": None, "early_stopping": False, "use_score_scaling": False, "score_clip": None,
             "generate": {"call": "ppo_trainer.generate(query_tensors, return_prompt=False, batch_size=16, ...)",
                          "min_new_tokens": 32, "max_new_tokens": 32, "do_sample": True, "temperature": TEMPERATURE,
                          "top_k": 0, "top_p": 1.0, "pad_token_id": "the tokenizer's pad token",
                          "batch_size": "16 (TRL's default is 4; 16 = ours generation_batch_size)"},
             "summary_dropout_prob": "0.0 (TRL's default 0.1 would put a dropout before the value head; ours has "
                                     "none and runs with every dropout off)",
             "gradient_clipping": "none on either side (max_grad_norm=None)",
             "shim": "none needed: TRL 0.11.4 imports and runs over transformers 5 / torch 2.13 as is"},
}

NOT_EQUAL = [
    "rollout log-probabilities and values: ours records them while sampling (rollout_logprobs: generate; the value "
    "head reads the hidden states the sampling pass computed), so ours runs no rollout forward of the policy; TRL "
    "0.11.4 runs a no-grad policy+value forward after generation: the same numbers to float rounding, its extra cost",
    "rollout forwards: TRL 0.11.4's batched_forward_pass runs the no-grad policy+value and reference forwards in "
    "chunks of mini_batch_size (2 x 8 rows); ours runs each as one pass of 16 rows (same FLOPs, other batching)",
    "reference forward: ours computes vocabulary logits only at the response positions (logits_to_keep); TRL "
    "computes them at every position (prompt too) plus its reference's value head (counted against the peer; "
    "our implementation choice). The policy+value forwards (rollout and update) compute full logits on both sides",
    "TRL's loss() computes its entropy statistic over the full [8, prompt+response, vocab] logits of each "
    "minibatch; ours computes the entropy at the response positions only",
    "log-probabilities: TRL 0.11.4 takes them from the raw logits (no division by the sampling temperature), "
    "ours from logits / 0.7 (same work, a different objective: ratio and KL are measured under other "
    "distributions)",
    "no early stop, by different means: the peer passes min_new_tokens=32 (generate sets the EOS logit to -inf "
    "before 32 tokens, so EOS is never sampled); ours empties its stop-token list (EOS may be sampled and "
    "generation goes on). Same work; every response is checked to be 32 tokens on both sides",
    "value head: a Linear(hidden, 1) on both sides; TRL applies it at every position (ours at the response "
    "positions only), initialises it with nn.Linear's default (ours: normal, std 1/sqrt(H+1), seeded with "
    f"training.seed = {SEED}), and runs here "
    "with summary_dropout_prob=0.0 instead of its default 0.1 (ours has no dropout)",
    "optimizer: TRL 0.11.4 builds torch.optim.Adam(lr) (the for-loop implementation on CPU, eps 1e-8, no weight "
    "decay, constant learning rate); ours AdamW (see versions/optimizer per side: fused flag, eps 1e-5, no weight "
    "decay) with a linear decay schedule. Same learning rate at the start (3e-6); the rate does not change the work",
    "the peer's iteration is TRL's documented loop driven by this harness: ppo_trainer.generate, the reward-model "
    "scores computed by the harness (one forward of 16, as ours), then ppo_trainer.step (which also builds "
    "its per-step statistics: record_step_stats, stats_to_np); ours times train_step, which computes its "
    "metrics. The docs' ppo_trainer.log_stats call is left out (no tracker on either side)",
    "TRL's step() skips (zeroes) a minibatch's loss when its mean ratio exceeds ratio_threshold=10 (backward and "
    "optimizer step still run: no change in work)",
    "data order: ours draws prompts with its own seeded shuffle, the peer takes a seeded permutation; all prompts "
    "have the same token length, so the shapes (and the work) are identical whichever prompts are drawn",
    "sampled tokens differ between sides (different RNG streams); with exactly 32 tokens this does not change the "
    "amount of work",
]


# ---------------------------------------------------------------------------------------------
# Side A: ours (rlhf_dist.rl.trainer.PPOLoop with a value head, one train_step per iteration)
# ---------------------------------------------------------------------------------------------

# Our loop's settings; common.ours_training adds what every benchmark sets (no trackers, CPU, ignore_eos: every
# response runs to 32 tokens, as the peer's min_new_tokens=32; rollout_logprobs: generate)
TRAINING = dict(seed=SEED, rollout_batch_size=ROLLOUTS, samples_per_prompt=1, generation_batch_size=ROLLOUTS,
                mini_batch_size=MINI_BATCH, per_device_train_batch_size=MINI_BATCH, ppo_epochs=1,
                max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, kl_coef=0.05, vf_coef=0.1, value_clip=0.2,
                clip_eps=0.2, learning_rate=LR,
                max_grad_norm=None)  # TRL 0.11.4 clips only if max_grad_norm is set: neither side does


def run_ours(folder: Path, iterations: int) -> None:
    """The models built by the PPO stage's own build_ppo, with the value head on the policy (value_head: true)."""
    common.run_ours(folder, iterations, TRAINING, value="head", prefix="bench_ours_vh_",
                    check=lambda batch: "no values" if batch.values is None else None)


# ---------------------------------------------------------------------------------------------
# Side B: TRL 0.11.4 PPOTrainer.step with AutoModelForCausalLMWithValueHead (its documented loop)
# ---------------------------------------------------------------------------------------------

def run_peer(folder: Path, iterations: int) -> None:
    import types
    import warnings

    import torch
    import trl
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    if trl.__version__ != PEER_VERSION:
        raise SystemExit(f"peer: expected TRL {PEER_VERSION} first on PYTHONPATH, got {trl.__version__} from {trl.__file__}")
    from trl import AutoModelForCausalLMWithValueHead, PPOConfig, PPOTrainer

    warnings.filterwarnings("ignore", category=FutureWarning)  # "PPOTrainer is deprecated", once per process
    info = common.start_child(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "policy"))
    load = dict(dtype=torch.float32)
    torch.manual_seed(SEED)  # the value heads' initialisation
    model = AutoModelForCausalLMWithValueHead.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(folder / "policy"), **load), summary_dropout_prob=0.0)
    ref_model = AutoModelForCausalLMWithValueHead.from_pretrained(
        AutoModelForCausalLM.from_pretrained(str(folder / "policy"), **load), summary_dropout_prob=0.0)
    reward = AutoModelForSequenceClassification.from_pretrained(str(folder / "reward"), num_labels=1, **load)
    reward.requires_grad_(False).eval()
    config = PPOConfig(
        seed=SEED, batch_size=ROLLOUTS, mini_batch_size=MINI_BATCH, ppo_epochs=1, gradient_accumulation_steps=1,
        init_kl_coef=0.05, adap_kl_ctrl=False, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, max_grad_norm=None,
        learning_rate=LR, log_with=None, accelerator_kwargs={"cpu": True})
    trainer = PPOTrainer(config=config, model=model, ref_model=ref_model, tokenizer=tokenizer)
    generation_kwargs = dict(min_new_tokens=NEW_TOKENS, max_new_tokens=NEW_TOKENS, do_sample=True,
                             temperature=TEMPERATURE, top_k=0, top_p=1.0, pad_token_id=tokenizer.pad_token_id)

    widths: list[int] = []
    expected_width = info["prompt_length"] + NEW_TOKENS

    def score(queries: list[torch.Tensor], responses: list[torch.Tensor]) -> list[torch.Tensor]:
        """The shared reward model on prompt + response, as ours (one forward of the 16 rows, no padding)."""
        ids = torch.stack([torch.cat([q, r]) for q, r in zip(queries, responses)])
        widths.append(ids.shape[1])
        with torch.no_grad():
            return list(reward(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, 0].float().unbind())

    scorer = types.SimpleNamespace(score=score)
    timer = common.PhaseTimer()  # measurement only: wrappers around TRL's own calls (and the harness's scoring)
    timer.wrap(trainer, "generate", "generate")
    timer.wrap(scorer, "score", "reward_forward")
    timer.wrap(trainer, "batched_forward_pass",
               lambda a: "update_forward" if torch.is_grad_enabled()
               else ("reference_forward" if a[0] is trainer.ref_model else "policy_value_forward"))
    timer.wrap(trainer, "loss", "update_loss")
    timer.wrap(trainer.accelerator, "backward", "update_backward")
    timer.wrap(trainer.optimizer, "step", "optimizer_step")
    timer.wrap(trainer, "compute_rewards", "compute_rewards")
    timer.wrap(trainer, "compute_advantages", "compute_advantages")
    timer.wrap(trainer, "record_step_stats", "step_stats")

    marks: dict[str, float] = {}  # rollout ends after the reference forward; the update spans the grad forwards
    timed_forward, timed_minibatch = trainer.batched_forward_pass, trainer.train_minibatch

    def marked_forward(*args, **kwargs):
        if torch.is_grad_enabled():
            marks.setdefault("update_start", time.perf_counter())
            return timed_forward(*args, **kwargs)
        try:
            return timed_forward(*args, **kwargs)
        finally:
            marks["rollout_end"] = time.perf_counter()

    def marked_minibatch(*args, **kwargs):
        try:
            return timed_minibatch(*args, **kwargs)
        finally:
            marks["update_end"] = time.perf_counter()

    trainer.batched_forward_pass, trainer.train_minibatch = marked_forward, marked_minibatch

    prompts = [torch.tensor(p, dtype=torch.long) for p in info["prompts"]]
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(SEED)).tolist()
    for step in range(1, iterations + 1):
        first = (step - 1) * ROLLOUTS
        queries = [prompts[order[(first + i) % len(prompts)]] for i in range(ROLLOUTS)]
        marks.clear()
        t0 = time.perf_counter()
        responses = trainer.generate(queries, return_prompt=False, batch_size=ROLLOUTS, **generation_kwargs)
        lengths = [int(r.shape[0]) for r in responses]
        if len(responses) != ROLLOUTS or min(lengths) != NEW_TOKENS or max(lengths) != NEW_TOKENS:
            raise SystemExit(f"peer: unequal work: {len(responses)} responses, lengths {lengths}")
        scores = scorer.score(queries, responses)
        trainer.step(queries, responses, scores)
        seconds = time.perf_counter() - t0
        if widths != [expected_width]:
            raise SystemExit(f"peer: unequal work: scored widths {widths}, expected {expected_width}")
        widths.clear()
        common.emit("iteration", step=step, seconds=seconds, rollout_s=marks["rollout_end"] - t0,
                    update_s=marks["update_end"] - marks["update_start"], phases=timer.take(), rollouts=ROLLOUTS,
                    min_tokens=min(lengths), max_tokens=max(lengths))
    common.emit_end(("torch", "transformers", "accelerate", "trl", "tyro"),
                    optimizer=common.describe_optimizer(trainer.optimizer), trl_file=trl.__file__)


# ---------------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args = common.comparison_args(__doc__, argv, run_ours, run_peer, (PEER, PEER_VERSION, INSTALL))
    if args is None:  # a child process: it ran its side
        return 0
    peer_name = f"trl-{PEER_VERSION}"
    run = common.compare(args, __file__, peer_name, value="head", peer_env={"PYTHONPATH": str(PEER)})
    optimizers = {name: rows[0]["raw"]["end"]["optimizer"] for name, rows in run.per_side.items()}
    path = common.write_result(f"ppo_valuehead_vs_trl011_{args.model}", common.result(
        "ppo_valuehead_vs_trl011", args, run, SETTINGS, optimizers=optimizers, not_equal=NOT_EQUAL))
    common.print_table(run.summary, "ours", peer_name)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
