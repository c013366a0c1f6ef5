"""The PPO stage's config: our loop's hyper-parameters (`PPOTrainingConfig`), its guardrails, and where its models
come from (`PPOStageConfig`). Light: no torch, no transformers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from rlhf_dist.config.coerce import check_ranges
from rlhf_dist.config.sections import DDP_TIMEOUT, StageConfig
from rlhf_dist.config.sections import option as _f

# Estimators that compare the samples_per_prompt responses of one prompt (a group).
GROUP_ESTIMATORS = ("rloo", "grpo", "dr_grpo", "reinforce_pp_baseline")


@dataclass
class PPOTrainingConfig:
    """Hyper-parameters of our PPO loop (`rlhf_dist.rl.trainer`); defaults follow the N+ implementation details.

    Batch sizes count rollouts (prompt + sampled response) over ALL processes, so the same recipe
    computes the same thing on 1 or N processes: a step samples `rollout_batch_size` prompts x
    `samples_per_prompt` responses, then runs `ppo_epochs` passes of minibatches of
    `mini_batch_size` rollouts (one optimizer step each), each split into micro-batches of
    `per_device_train_batch_size` per process (gradient accumulation makes up the rest).
    """

    output_dir: str = _f("", "Set by --output (the stage's work directory); not a recipe key.")
    seed: int = _f(42, "Seed for the data order, sampling, minibatch shuffling and new heads.")
    max_steps: int | None = _f(None, "PPO steps (rollout + update). Default: num_train_epochs passes over the prompts.")
    num_train_epochs: int = _f(1, "Passes over the training prompts when max_steps is not set.")
    rollout_batch_size: int = _f(64, "Prompts per PPO step, over all processes (a multiple of the process count).")
    samples_per_prompt: int = _f(1, "Responses sampled per prompt (the group size k of RLOO/GRPO; >= 2 for those).")
    generation_batch_size: int = _f(16, "Rollouts generated and scored per forward pass on each process.")
    mini_batch_size: int = _f(16, "Rollouts per optimizer step, over all processes.")
    per_device_train_batch_size: int = _f(4, "Rollouts per forward/backward on each process (micro-batch).")
    ppo_epochs: int = _f(1, "Passes over each step's rollouts (each pass reshuffles the minibatches).")
    learning_rate: float = _f(3.0e-6, "Adam learning rate of the policy.")
    value_learning_rate: float | None = _f(None, "Learning rate of the value model / head (default: learning_rate).")
    adam_epsilon: float = _f(1.0e-5, "Adam epsilon (1e-5, docs/ppo.md item 17).")
    adam_beta1: float = _f(0.9, "Adam beta1.")
    adam_beta2: float = _f(0.999, "Adam beta2.")
    weight_decay: float = _f(0.0, "AdamW weight decay.")
    max_grad_norm: float | None = _f(1.0, "Clip the gradient norm (policy and value together); null = no clipping.")
    lr_scheduler_type: Literal["constant", "linear", "cosine"] = _f("linear", "Learning-rate schedule over all optimizer steps.")
    warmup_steps: int = _f(0, "Optimizer steps of linear warm-up.")
    max_prompt_length: int = _f(512, "Longest prompt in tokens; a longer prompt is an error (before training).")
    max_new_tokens: int = _f(64, "Longest response in tokens.")
    temperature: float = _f(0.7, "Sampling temperature; also divides the logits of every log-probability (docs/ppo.md item 13).")
    top_k: int = _f(0, "Top-k sampling; 0 = off (keep off: the ratio is then exactly 1 at the first minibatch, "
                    "docs/ppo.md item 14).")
    top_p: float = _f(1.0, "Nucleus sampling; 1.0 = off (see top_k).")
    stop_tokens: list[str] = _f([], "Tokens that end a response besides the tokenizer's EOS (e.g. an end-of-turn token).")
    ignore_eos: bool = _f(False, "Do not stop at the tokenizer's EOS: every response runs to max_new_tokens unless it "
                          "meets one of stop_tokens (fixed-length rollouts, e.g. for benchmarks).")
    rollout_logprobs: Literal["forward", "generate"] = _f(
        "forward", "Where the rollout's policy log-probabilities come from. forward: a second policy pass after "
        "generation, the same function as the training forward, so the first ratio is exactly 1. generate: recorded "
        "while sampling, saving that pass (about 1/6 of a step's compute); equal up to float rounding (~1e-6 in fp32, "
        "more in bf16). A value head on the policy reads the sampling pass's hidden states then: no policy pass at all.")
    decoding: Literal["compact", "generate"] = _f(
        "compact", "How responses are sampled. compact: our decode loop (rlhf_dist/rl/decode.py): a response that "
        "stopped leaves the batch and its KV cache, and each distinct prompt (a group's k samples) is prefilled once; "
        "generate: transformers' generate, which computes every row until the longest one ends. The two draw "
        "differently from the same distribution. compact needs top_k = 0 and top_p = 1 and is not used under ZeRO-3 "
        "on several processes (generate is, then).")
    sort_micro_batches: bool = _f(
        True, "Run each process's share of a minibatch in micro-batches of similar length (sorted by prompt + response "
        "tokens), each cut to its longest row: the same gradient (every micro-batch loss is normalised by the whole "
        "minibatch) with less padding.")
    padding_free: bool = _f(
        True, "The forwards of the policy, reference, value and reward models (rollout scoring and the update) run on "
        "the rows' real tokens packed together, positions restarting per row (rlhf_dist/rl/packing.py), wherever that "
        "costs fewer FLOPs than the padded batch: with flash-attention (variable-length kernels) in one forward; with "
        "sdpa/eager, whose packed attention covers every pair of the packed row, in bins of consecutive rows, each a "
        "forward of at most the tokens whose attention costs 5% of the linear layers, 128 at least (one forward per "
        "process under ZeRO-3 on several processes). Each model is checked once against its padded forward before training; one "
        "whose attention does not keep packed sequences apart keeps padded forwards.")
    missing_eos_penalty: float | None = _f(
        None, "Subtracted from the score of a response that never stopped (docs/ppo.md item 5).")
    reward_normalization: bool = _f(False, "Normalise scores with their running mean and std (docs/ppo.md item 8).")
    reward_gain_bias: bool = _f(
        False, "Fit a fixed gain and bias once, on rollouts of the initial policy, so its scores have reward_target_mean "
        "and reward_target_std; applied to every score after (lm-human-preferences; docs/ppo.md item 8).")
    reward_target_mean: float = _f(0.0, "The mean of the initial policy's scores after the fixed gain/bias.")
    reward_target_std: float = _f(1.0, "The std of the initial policy's scores after the fixed gain/bias.")
    overlong_buffer: int | None = _f(
        None, "DAPO's overlong reward shaping: a response longer than max_new_tokens - overlong_buffer tokens loses up to "
        "overlong_penalty_factor, linearly, reaching it at max_new_tokens (Yu et al. 2025, Eq. 13); null = off.")
    overlong_penalty_factor: float = _f(1.0, "The largest overlong penalty (with overlong_buffer).")
    overlong_filter: bool = _f(
        False, "DAPO's overlong filtering: responses that never stopped (cut at max_new_tokens) are left out of the loss.")
    reward_clip: float | None = _f(None, "Clip (normalised) scores to [-reward_clip, reward_clip].")
    kl_estimator: Literal["k1", "k2", "k3"] = _f(
        "k1", "Per-token KL estimator in the reward: k1 = logp - logp_ref, k3 = (r - 1) - log r.")
    kl_clamp: float | None = _f(10.0, "Clamp each token's KL estimate to [-kl_clamp, kl_clamp].")
    kl_coef: float = _f(0.05, "KL coefficient beta (the initial value when adaptive_kl).")
    adaptive_kl: bool = _f(False, "Adapt beta towards kl_target (Ziegler et al. 2019).")
    kl_target: float = _f(6.0, "Adaptive KL: target KL per response (nats).")
    kl_horizon: float = _f(10000.0, "Adaptive KL: horizon in rollouts.")
    advantage_estimator: Literal["gae", "rloo", "grpo", "dr_grpo", "reinforce_pp", "reinforce_pp_baseline"] = _f(
        "gae", "gae: value model + GAE; critic-free: rloo / grpo / dr_grpo (group baselines over samples_per_prompt "
        "responses; dr_grpo: no std division), reinforce_pp (REINFORCE++: returns of the KL-shaped rewards, whitened over "
        "the step) and reinforce_pp_baseline (the same with the group's mean score subtracted first).")
    dynamic_sampling: bool = _f(
        False, "DAPO's dynamic sampling (group estimators): groups whose scores are all equal carry no signal; they are "
        "dropped and refilled with groups of new prompts, up to dynamic_sampling_max_rounds more generation rounds.")
    dynamic_sampling_max_rounds: int = _f(
        3, "Refill rounds at most per step; a step still short is topped up with the dropped groups (counted).")
    gamma: float = _f(1.0, "GAE discount.")
    lam: float = _f(0.95, "GAE lambda.")
    whiten_advantages: bool | None = _f(
        None, "Whiten advantages over all valid tokens of the step (all processes, docs/ppo.md item 10). Default: on for gae, "
        "off for the others (group baselines are already centred, whitening would blow up noise in steps without signal; "
        "reinforce_pp whitens its returns itself).")
    clip_eps: float = _f(0.2, "Policy ratio clip epsilon.")
    clip_eps_low: float | None = _f(None, "Lower clip range, ratio >= 1 - clip_eps_low (DAPO's decoupled clip); null = clip_eps.")
    clip_eps_high: float | None = _f(
        None, "Upper clip range, ratio <= 1 + clip_eps_high (DAPO's clip-higher, e.g. 0.28); null = clip_eps.")
    policy_loss: Literal["ppo", "gspo"] = _f(
        "ppo", "ppo: the token-level clipped ratio; gspo: GSPO's sequence-level ratio (the geometric mean of the token "
        "ratios) clipped per sequence, averaged over sequences (Zheng et al. 2025; small clip ranges, e.g. 3e-4 / 4e-4).")
    value_clip: float | None = _f(0.2, "Value clip range; null = unclipped value loss.")
    vf_coef: float = _f(0.1, "Value loss coefficient.")
    entropy_coef: float = _f(0.0, "Entropy bonus coefficient (0 = off).")
    loss_aggregation: Literal["token", "sequence", "constant"] = _f(
        "token", "token: every valid token of a minibatch weighs the same; sequence: every response does; constant: the "
        "token sum divided by responses x max_new_tokens (Dr. GRPO's length-unbiased normaliser).")
    bf16: bool = _f(False, "bfloat16 mixed precision (GPUs that support it; our default turns it on there).")
    fp16: bool = _f(False, "float16 mixed precision.")
    activation_checkpointing: bool = _f(False, "Recompute activations in the backward pass (less memory, more time).")
    split_backward: bool | None = _f(
        None, "Run the policy's pass and backward, then the value function's, so only one pass's activations are alive "
        "(same gradients; less memory at no cost). Default: on with one process and a separate value model or value "
        "adapter; always off on several processes (DDP and DeepSpeed expect one backward per forward).")
    use_cpu: bool = _f(False, "Run on CPU even if a GPU is present (always the case without one).")
    ddp_timeout: int = _f(DDP_TIMEOUT, "Timeout of every collective (seconds): the process group's, set where it is "
                          "created. Keep it above the watchdog's limits, which report a stall with its phase first.")
    logging_steps: int = _f(1, "Log metrics every N steps (JSONL, TensorBoard, progress bar).")
    num_sample_completions: int = _f(3, "Sample completions written to the log (samples.jsonl) each logged step.")
    report_to: list[str] = _f(["tensorboard"], "Trackers besides the JSONL log: tensorboard, or [] for none.")
    save_steps: int = _f(50, "Write a checkpoint every N steps (0 = only at the end); --resume continues from the last.")
    save_total_limit: int = _f(2, "Checkpoints kept (older ones are deleted).")
    eval_max_prompts: int = _f(64, "Held-out prompts used for the before/after reward and KL.")

    def __post_init__(self):
        check_ranges(self, "training.")  # every numeric field within its range (RANGES)
        if self.advantage_estimator in GROUP_ESTIMATORS and self.samples_per_prompt < 2:
            raise ValueError(f"training.advantage_estimator={self.advantage_estimator} compares samples of the same "
                             f"prompt: set training.samples_per_prompt >= 2 (got {self.samples_per_prompt})")
        if self.dynamic_sampling and self.advantage_estimator not in GROUP_ESTIMATORS:
            raise ValueError(f"training.dynamic_sampling drops groups of samples whose scores are all equal, but "
                             f"advantage_estimator={self.advantage_estimator} has no groups; use one of "
                             f"{', '.join(GROUP_ESTIMATORS)} with samples_per_prompt >= 2, or turn dynamic_sampling off")
        if self.overlong_buffer is not None and self.overlong_buffer > self.max_new_tokens:
            raise ValueError(f"training.overlong_buffer={self.overlong_buffer} is longer than max_new_tokens="
                             f"{self.max_new_tokens}; the penalty ramps over the last overlong_buffer tokens of the budget")
        rollouts = self.rollout_batch_size * self.samples_per_prompt
        if rollouts % self.mini_batch_size:
            raise ValueError(f"training.mini_batch_size={self.mini_batch_size} must divide the rollouts per step "
                             f"(rollout_batch_size x samples_per_prompt = {rollouts})")
        if self.bf16 and self.fp16:
            raise ValueError("training.bf16 and training.fp16 are both true; choose one")
        unknown = [r for r in self.report_to if r != "tensorboard"]
        if unknown:
            raise ValueError(f"training.report_to: unknown tracker(s) {unknown}; the PPO stage logs to JSONL always, and to "
                             "tensorboard if listed (report_to: [tensorboard] or [])")
        if self.whiten_advantages is None:
            self.whiten_advantages = self.advantage_estimator == "gae"

    @property
    def kl_in_loss(self) -> bool:
        """GRPO's way (DeepSeekMath): the KL to the reference is a k3 loss term, not a per-token reward term."""
        return self.advantage_estimator in ("grpo", "dr_grpo")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


GuardAction = Literal["warn", "stop", "rollback"]


@dataclass
class GuardRule:
    """A rule on one training metric of the PPO loop (`rlhf_dist.rl.guardrails`); limit null = off."""

    limit: float | None = _f(None, "Threshold of the rule (null: the rule is off).")
    action: GuardAction = _f("warn", "warn: log it; stop: end the run with a diagnosis; rollback: restore the last healthy "
                             "checkpoint and continue with guardrails.rollback's smaller learning rate / larger KL coefficient.")
    patience: int = _f(1, "Consecutive steps the rule must hold before it acts.")

    def __post_init__(self):
        check_ranges(self)  # limit >= 0 (or null: the rule is off), patience >= 1


@dataclass
class KLRule(GuardRule):
    limit: float | None = _f(50.0, "objective/kl (nats per response) above this.")
    patience: int = _f(3, "Consecutive steps the rule must hold before it acts.")


@dataclass
class EntropyRule(GuardRule):
    limit: float | None = _f(0.01, "policy/entropy (nats per token) below this: the policy stopped exploring.")
    patience: int = _f(3, "Consecutive steps the rule must hold before it acts.")


@dataclass
class RatioRule(GuardRule):
    limit: float | None = _f(10.0, "policy/ratio_max (new / old probability of a token) above this.")
    patience: int = _f(3, "Consecutive steps the rule must hold before it acts.")


@dataclass
class ValueLossRule(GuardRule):
    limit: float | None = _f(None, "value/loss above this (off by default: its scale is the reward's).")


@dataclass
class LengthRule(GuardRule):
    limit: float | None = _f(0.95, "rollout/response_length at or above this share of max_new_tokens: responses run to "
                             "the limit (a reward hacked by length). Off with ignore_eos.")
    patience: int = _f(5, "Consecutive steps the rule must hold before it acts.")


@dataclass
class HeldoutRule(GuardRule):
    limit: float | None = _f(None, "Reward hacking: the held-out score (every heldout_every steps) fell more than this "
                             "below its best while the training score rose above its value then.")


@dataclass
class RollbackConfig:
    """What `rollback` changes after restoring the last healthy checkpoint."""

    lr_factor: float = _f(0.5, "The learning rate is multiplied by this (each rollback).")
    kl_factor: float = _f(2.0, "The KL coefficient is multiplied by this (each rollback).")
    max_rollbacks: int = _f(2, "Rollbacks allowed in a run; one more stops it with the diagnosis.")

    def __post_init__(self):
        check_ranges(self)  # lr_factor within (0, 1], kl_factor >= 1, max_rollbacks >= 0


@dataclass
class GuardrailsConfig:
    """Training-health guardrails of the PPO loop (`rlhf_dist.rl.guardrails`): each step's metrics go through the
    rules below; what fires is logged (log.jsonl, TensorBoard, metrics.json) and acted on. The defaults only warn,
    and skip an optimizer step whose gradients are not finite: they never change a healthy run."""

    nonfinite: Literal["skip", "stop"] = _f(
        "skip", "NaN/Inf in a loss or in the gradients: skip that optimizer step on every process (counted), or stop. "
        "Under DeepSpeed, whose engine has stepped by then, it always stops.")
    max_skipped: int = _f(3, "Skipped optimizer steps in a row after which the run stops.")
    kl: KLRule = field(default_factory=KLRule, metadata={"help": "KL to the reference too high."})
    entropy: EntropyRule = field(default_factory=EntropyRule, metadata={"help": "Entropy collapse."})
    ratio: RatioRule = field(default_factory=RatioRule, metadata={"help": "Policy ratios too far from 1."})
    value_loss: ValueLossRule = field(default_factory=ValueLossRule, metadata={"help": "Value loss too high."})
    length: LengthRule = field(default_factory=LengthRule, metadata={"help": "Responses running to max_new_tokens."})
    heldout: HeldoutRule = field(default_factory=HeldoutRule, metadata={"help": "Training score up, held-out score down."})
    heldout_every: int = _f(0, "Evaluate the held-out prompts every N steps for the heldout rule (0: never).")
    rollback: RollbackConfig = field(default_factory=RollbackConfig, metadata={"help": "What a rollback changes."})

    def __post_init__(self):
        check_ranges(self, "guardrails.")  # max_skipped >= 1, heldout_every >= 0
        if self.heldout.limit is not None and self.heldout_every == 0:
            raise ValueError("guardrails.heldout.limit needs guardrails.heldout_every > 0 (how often to evaluate)")

    def rules(self) -> dict[str, GuardRule]:
        return {name: getattr(self, name) for name in ("kl", "entropy", "ratio", "value_loss", "length", "heldout")}


@dataclass
class PPOStageConfig(StageConfig):
    """RLHF with PPO (or the RLOO/GRPO group baselines): our own sharded rollout-update loop."""

    reward_model: str | None = _f(
        None, "Reward model (a one-label sequence classifier). Default: the run's reward stage output.")
    reward_fn: str | None = _f(
        None, "Instead of a reward model: a Python function module:function(prompts, completions) -> scores.")
    rewards: list[dict[str, Any]] | None = _f(
        None, "A composite reward: a list of components {name, weight, kwargs, columns, label}, each a shipped function "
        "(math_answer, exact_match, format, length_penalty), module:function, or reward_model (scored with "
        "ppo.reward_model); the reward is their weighted sum, each logged as reward/<label>. Functions read the prompt "
        "data's other columns they name (e.g. answer). See rlhf_dist.rewards.")
    value_model: str | None = _f(
        None, "Model the value model starts from (gae only). Default: the reward model (docs/ppo.md item 18).")
    value_head: bool = _f(False, "Use a value head on the policy instead of a separate value model.")
    value_adapter: bool | None = _f(
        None, "With LoRA: the value function is its own adapter + a value head on the policy's (4-bit) base. "
              "Default: true with lora.enabled unless value_model or value_head is set.")
    reward_adapter: bool | None = _f(
        None, "With LoRA: score with the reward stage's LoRA adapter (reward_model/adapter) on the policy's base, so one "
              "base serves all four models. Default: when that adapter was trained on the same base.")
    guardrails: GuardrailsConfig = field(default_factory=GuardrailsConfig,
                                         metadata={"help": "Training-health rules and what they do."})
    training: PPOTrainingConfig | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.reward_model and self.reward_fn:
            raise ValueError("reward_model and reward_fn are both set; choose one source of rewards")
        if self.rewards is not None and self.reward_fn:
            raise ValueError("rewards and reward_fn are both set; list the function as a component of rewards "
                             "({name: module:function, weight: 1.0})")
        estimator = self.training.advantage_estimator if self.training is not None else "gae"
        if estimator != "gae" and (self.value_head or self.value_model or self.value_adapter):
            raise ValueError(f"value_head / value_model / value_adapter are for advantage_estimator=gae; {estimator} uses "
                             "no value function: remove them")
        if self.value_adapter and (self.value_head or self.value_model):
            raise ValueError("value_adapter, value_head and value_model are three kinds of value function; set one")

    def sequence_length(self, max_positions: int) -> int:
        return self.training.max_prompt_length + self.training.max_new_tokens

    @property
    def uses_value_adapter(self) -> bool:
        """value_adapter resolved: explicit, else on with LoRA and GAE when no other value function is set.
        (Not resolved in __post_init__: `models.base_config` turns LoRA off on a copy of this config.)"""
        if self.value_adapter is not None:
            return self.value_adapter
        estimator = self.training.advantage_estimator if self.training is not None else "gae"
        return bool(self.lora.enabled and estimator == "gae" and not self.value_head and not self.value_model)
