"""Ragged rollouts (issue 17): our GRPO against TRL 1.16's GRPOTrainer, and our PPO against TRL 1.12's PPOTrainer,
where responses stop at EOS at very different lengths and prompts differ in length, the way real RLHF looks, with the
work spent on padding and finished rows counted per phase.

    .venv/bin/python benchmarks/ragged_rollouts.py --model tiny --runs 3 --iterations 6
    .venv/bin/python benchmarks/ragged_rollouts.py --model 27m --runs 2 --iterations 6
    .venv/bin/python benchmarks/ragged_rollouts.py --algorithm ppo --model 27m --runs 2 --iterations 6
    .venv/bin/python benchmarks/ragged_rollouts.py --model tiny --runs 1 --iterations 6 --sweep   # how cost grows

Three sides, each in its own process, A B C A B C: ``ours`` (the defaults: training.decoding compact -- finished rows
leave the batch, each prompt prefilled once for its k samples --, training.padding_free -- every model's forwards on
the real tokens only -- and training.sort_micro_batches), ``ours-levers-off`` (transformers' generate, padded
forwards, micro-batches in shuffled order: what the levers save) and the peer: TRL 1.16 ``GRPOTrainer`` for GRPO, TRL
1.12 ``PPOTrainer`` (experimental; stop_token "eos", benchmarks/.peers/trl-1.12.0 first on the path) for PPO.

PPO: 32 prompts x 1 sample, a value model started from the reward model on both sides, GAE (gamma 1, lambda 0.95),
k1 KL in the reward (kl_coef 0.05), 1 epoch of one minibatch of 32 in micro-batches of 8 (TRL 1.12 ties its rollout
batch to per_device_train_batch_size x gradient_accumulation_steps), no gradient clipping (TRL 1.12's loop has none).

The workload (built once into benchmarks/.cache/<model>-ragged, from the shared models of common.prepare_models):
- prompts: a demo question after 0-6 sentences of the demo corpus (a seeded draw): 12 to ~100 tokens;
- responses: the policy is the shared random Llama with one change, so that it stops at EOS at widely spread lengths:
  every token's embedding gets OFFSET in dimension 0 (the embeddings are tied to the LM head, so every logit moves
  by the same amount and no distribution changes), and EOS's row gets EOS_BIAS more, which gives EOS a roughly
  constant chance per step; EOS_BIAS is calibrated (bisection, our decode, seeded) so that the mean response is
  about max_new_tokens / 3 long. Lengths are then roughly geometric, from 1 token to max_new_tokens (recorded).
One iteration: PROMPTS prompts x GROUP samples, max_new_tokens 128, temperature 1, 1 epoch in 2 minibatches of 16,
micro-batches of 8 (gradient accumulation 2), beta 0.04 (k3 in the loss), separate frozen reference, the shared
reward model scoring the token ids (padded batch) on every side.

Work, counted (not estimated): every forward of every model's body (policy, reference, reward) is seen by a pre-hook
that adds its token slots (rows x positions) and attention pairs (query x key positions the kernel computes) to its
phase: generation (inside the sampling call), scoring (other no-grad forwards) or update (with grad). What a phase
needed: generation, each distinct prompt's tokens once plus one slot per response token after the first; scoring and
update, the real tokens of each forward and each sequence's own square of attention pairs. The wasted share of FLOPs
weighs slots by the linear layers (2 x (4 h^2 + 3 h i) each) and pairs by attention (4 h each): padding, repeated
prefills, finished rows, and -- for a packed row under sdpa -- the pairs between different sequences.
Writes benchmarks/results/ragged_rollouts_<model>.json (with --sweep: ragged_rollouts_sweep_<model>.json and .png).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

PEER_VERSION = "1.16."
PPO_PEER = common.PEERS / "trl-1.12.0"
PROMPTS, GROUP, MINI_BATCH, MICRO_BATCH, NEW_TOKENS, TEMPERATURE, SEED = 8, 4, 16, 8, 128, 1.0, 42
BETA, CLIP, LR, MAX_GRAD_NORM = 0.04, 0.2, 1e-9, 1.0
# LR: the work does not depend on it; at 1e-6 the policy drifted within 6 iterations and each side's response lengths
# with it (means of 50 to 92 tokens on 27M PPO); at 1e-9 every side samples the calibrated length distribution
OFFSET = 1.0  # added to every embedding's dimension 0
POSITIONS = 1024  # the models' max_position_embeddings here (the shared ones say 256): room for 512 new tokens
SIDES = ("ours", "ours-levers-off", "trl")
PPO_SIDES = ("ours", "ours-levers-off", "trl-1.12")
# per algorithm: samples per prompt, prompts per iteration (32 samples either way), the sides
ALGORITHMS = {"grpo": {"group": GROUP, "prompts": PROMPTS, "sides": SIDES},
              "ppo": {"group": 1, "prompts": PROMPTS * GROUP, "sides": PPO_SIDES}}
KL_COEF, VF_COEF, VALUE_CLIP, LAM = 0.05, 0.1, 0.2, 0.95  # PPO: one minibatch of the whole rollout


# ---------------------------------------------------------------------------------------------
# The workload: varied prompts, a policy that stops at EOS at spread-out lengths
# ---------------------------------------------------------------------------------------------

def prepare(model: str) -> Path:
    """CACHE/<model>-ragged/{policy,reward,prompts.json}, built once (deterministic: seeds only)."""
    out = common.CACHE / f"{model}-ragged"
    if (out / "prompts.json").is_file():
        return out
    import random
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_dist.demo import synthetic
    from rlhf_dist.rl.decode import decode
    from rlhf_dist.rl.generation import left_pad

    base = common.prepare_models(model)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(base, tmp)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp / "policy"))
    data = Path(tempfile.mkdtemp(prefix="ragged_data_"))
    synthetic.generate(data, seed=SEED, n_pretrain=64, n_sft=1, n_pref=1, n_prompts=512, n_verifiable=1)
    questions = [json.loads(line)["prompt"] for line in (data / "prompts.jsonl").read_text().splitlines()]
    corpus = [json.loads(line)["text"] for line in (data / "pretrain.jsonl").read_text().splitlines()]
    sentences = sorted({s.strip() + "." for text in corpus for s in text.split(".") if len(s.split()) > 3})
    shutil.rmtree(data)
    rng = random.Random(SEED)
    texts = [" ".join(rng.sample(sentences, rng.randint(0, 6)) + [q]).strip() for q in questions]
    prompts = [tokenizer(t)["input_ids"] for t in texts]

    policy = AutoModelForCausalLM.from_pretrained(str(tmp / "policy"), dtype=torch.float32).eval()
    emb, head = policy.get_input_embeddings().weight, policy.get_output_embeddings().weight
    if emb.data_ptr() != head.data_ptr():
        raise SystemExit("ragged: the policy's embeddings must be tied to its LM head")
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        emb[:, 0] += OFFSET
    base_eos = float(emb[eos, 0].detach())
    q_ids, q_mask = left_pad(prompts[:64], tokenizer.pad_token_id)

    def mean_length(bias: float) -> tuple[float, list[int]]:
        with torch.no_grad():
            emb[eos, 0] = base_eos + bias
        gen, _ = decode(policy, q_ids, q_mask, max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, stop_ids=[eos],
                        pad_id=tokenizer.pad_token_id, generator_seed=SEED)
        return float(gen.lengths.float().mean()), gen.lengths.tolist()

    low, high = 0.0, 8.0  # the mean length falls as the bias grows
    for _ in range(12):
        mid = (low + high) / 2
        if mean_length(mid)[0] > NEW_TOKENS / 3:
            low = mid
        else:
            high = mid
    bias = (low + high) / 2
    mean, lengths = mean_length(bias)
    policy.config.max_position_embeddings = POSITIONS  # rotary positions: the weights do not depend on it
    policy.save_pretrained(str(tmp / "policy"), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp / "policy"))
    reward_config = json.loads((tmp / "reward" / "config.json").read_text())
    (tmp / "reward" / "config.json").write_text(json.dumps({**reward_config, "max_position_embeddings": POSITIONS}))
    lengths_sorted, prompt_lengths = sorted(lengths), sorted(len(p) for p in prompts)
    info = json.loads((base / "prompts.json").read_text())
    info.update({"prompts": prompts, "prompt_length": None, "distinct_prompts": len(set(map(tuple, prompts))),
                 "prompt_lengths": {"min": prompt_lengths[0], "median": prompt_lengths[len(prompts) // 2],
                                    "max": prompt_lengths[-1]},
                 "eos": {"offset": OFFSET, "bias": bias, "calibration_mean_length": mean,
                         "calibration_lengths": {"min": lengths_sorted[0], "p25": lengths_sorted[16],
                                                 "median": lengths_sorted[32], "p75": lengths_sorted[48],
                                                 "max": lengths_sorted[-1],
                                                 "at_max_new_tokens": lengths.count(NEW_TOKENS)}}})
    (tmp / "prompts.json").write_text(json.dumps(info))
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


# ---------------------------------------------------------------------------------------------
# Counting the work: a pre-hook on every model's forward
# ---------------------------------------------------------------------------------------------

class WorkMeter:
    """Work per phase, counted at every forward of a model's body: token slots (rows x positions: what the linear
    layers compute) and attention pairs (query x key positions the kernel computes: B x W^2 for a padded batch, N^2
    for a packed row of N tokens, rows x keys for a cached decoding step), ``computed`` and ``needed``. Needed: in
    scoring and update the real tokens and, for attention, each sequence's own square; in generation each distinct
    prompt's tokens once plus the response tokens after the first (added per iteration by the side, from its
    rollouts), and the real keys of the rows computed."""

    PHASES = ("generation", "scoring", "update")

    def __init__(self):
        self.generating = False
        self.counts = {f"{kind}_{what}": dict.fromkeys(self.PHASES, 0)
                       for kind in ("computed", "needed") for what in ("slots", "pairs")}

    def attach(self, model) -> None:
        """Count the forwards of `model`'s body (its base model: what every head, and a caller that skips the head,
        runs)."""
        getattr(model, model.base_model_prefix).register_forward_pre_hook(self.hook, with_kwargs=True)

    def sampling(self, owner, attr: str) -> None:
        """Mark the calls of ``owner.attr`` (a sampling function) as the generation phase."""
        original = getattr(owner, attr)

        def marked(*a, **k):
            self.generating = True
            try:
                return original(*a, **k)
            finally:
                self.generating = False

        setattr(owner, attr, marked)

    def hook(self, module, args, kwargs):
        import torch

        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            return
        mask, positions = kwargs.get("attention_mask"), kwargs.get("position_ids")
        phase = "generation" if self.generating else ("update" if torch.is_grad_enabled() else "scoring")
        c = self.counts
        rows, length = ids.shape
        c["computed_slots"][phase] += ids.numel()
        if mask is None:  # a packed row (positions restart at each sequence), or one unpadded sequence
            starts = (positions[0] == 0).nonzero().squeeze(1).tolist() if positions is not None else [0]
            lengths = [b - a for a, b in zip(starts, starts[1:] + [length])]
            c["computed_pairs"][phase] += rows * length * length
            c["needed_pairs"][phase] += rows * sum(n * n for n in lengths)
            if phase != "generation":
                c["needed_slots"][phase] += ids.numel()
            return
        keys = mask.shape[1]
        c["computed_pairs"][phase] += rows * length * keys
        real = mask.sum(1)
        if length == keys:  # a whole forward: each row's own square
            c["needed_pairs"][phase] += int((real * real).sum())
        else:  # a cached step: each row's real keys
            c["needed_pairs"][phase] += int(real.sum()) * length
        if phase != "generation":
            c["needed_slots"][phase] += int(mask[:, -length:].sum())

    def take(self) -> dict:
        out = {k: dict(v) for k, v in self.counts.items()}
        for v in self.counts.values():
            for k in v:
                v[k] = 0
        return out


def wasted_flops_share(shape: dict, computed_slots: int, needed_slots: int, computed_pairs: int,
                       needed_pairs: int) -> float:
    """1 - needed / computed FLOPs of a model's layers: 2 x (4 h^2 + 3 h i) per token slot (q, k, v, o and the gated
    MLP) plus 4 h per attention pair (QK^T and AV)."""
    h, i = shape["hidden_size"], shape["intermediate_size"]
    linear, attention = 2 * (4 * h * h + 3 * h * i), 4 * h
    computed = linear * computed_slots + attention * computed_pairs
    needed = linear * needed_slots + attention * needed_pairs
    return 1 - needed / computed if computed else 0.0


def reward_scores(reward, pad_id: int, rows: list[list[int]]) -> list[float]:
    """The shared reward model on token-id rows, right-padded into one batch (both sides call this)."""
    import torch

    width = max(len(r) for r in rows)
    ids = torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    with torch.inference_mode():
        return reward(input_ids=ids, attention_mask=mask).logits[:, 0].tolist()


# ---------------------------------------------------------------------------------------------
# Our sides
# ---------------------------------------------------------------------------------------------

TRAINING = dict(seed=SEED, advantage_estimator="grpo", rollout_batch_size=PROMPTS, samples_per_prompt=GROUP,
                generation_batch_size=PROMPTS * GROUP, mini_batch_size=MINI_BATCH,
                per_device_train_batch_size=MICRO_BATCH, ppo_epochs=1, max_new_tokens=NEW_TOKENS,
                temperature=TEMPERATURE, kl_coef=BETA, kl_clamp=None, clip_eps=CLIP, loss_aggregation="token",
                learning_rate=LR, lr_scheduler_type="linear", max_grad_norm=MAX_GRAD_NORM, ignore_eos=False)


PPO_TRAINING = dict(seed=SEED, advantage_estimator="gae", samples_per_prompt=1,
                    per_device_train_batch_size=MICRO_BATCH, ppo_epochs=1, temperature=TEMPERATURE, kl_coef=KL_COEF,
                    kl_estimator="k1", vf_coef=VF_COEF, value_clip=VALUE_CLIP, clip_eps=CLIP, gamma=1.0, lam=LAM,
                    learning_rate=LR, lr_scheduler_type="linear", max_grad_norm=None, ignore_eos=False)


def run_ours(folder: Path, iterations: int, levers: bool, new_tokens: int, prompts: int, algorithm: str) -> None:
    import torch

    from rlhf_dist.rl import sampler

    common.import_ours()
    info = common.start_child(folder)
    torch.manual_seed(SEED)
    group = ALGORITHMS[algorithm]["group"]
    training = {**(TRAINING if algorithm == "grpo" else PPO_TRAINING), "max_new_tokens": new_tokens,
                "rollout_batch_size": prompts, "generation_batch_size": prompts * group,
                "decoding": "compact" if levers else "generate", "sort_micro_batches": levers, "padding_free": levers}
    if algorithm == "ppo":
        training["mini_batch_size"] = prompts
    args = common.ours_training(iterations, **training)
    value = "model" if algorithm == "ppo" else None
    ours = common.build_ours(folder, args, value=value)
    loop = ours.loop(info["prompts"], info["prompts"][:prompts])
    if loop.stop_ids != [ours.tokenizer.eos_token_id]:
        raise SystemExit(f"ours: stop ids {loop.stop_ids}, expected EOS only")
    meter = WorkMeter()
    m = ours.models
    for module in (m.actor_critic.policy, m.reference, m.reward.model, m.actor_critic.value_model):
        if module is not None:
            meter.attach(module)
    meter.sampling(sampler, "decode")
    meter.sampling(sampler, "generate")
    timer = common.PhaseTimer()
    common.wrap_ours_phases(timer, loop, value, optimizer_step=True)
    for step in range(1, iterations + 1):
        t0 = time.perf_counter()
        metrics, batch = loop.train_step(step)
        seconds = time.perf_counter() - t0
        lengths = batch.response_mask.sum(1)
        work = meter.take()
        prompt_lengths = batch.query_mask.sum(1)  # rows are grouped: the group's samples of each prompt in a row
        work["needed_slots"]["generation"] += int(prompt_lengths[::group].sum() + (lengths - 1).sum())
        common.emit("iteration", step=step, seconds=seconds, rollout_s=metrics["time/rollout"],
                    update_s=metrics["time/update"], phases=timer.take(), rollouts=len(batch),
                    tokens=int(lengths.sum()), lengths=lengths.tolist(), prompt_lengths=prompt_lengths.tolist(),
                    work=work, ratio_first=metrics.get("policy/ratio_first_minibatch"))
    common.emit_end(common.OURS_PACKAGES,
                    config={k: getattr(loop.args, k) for k in ("decoding", "sort_micro_batches", "padding_free")},
                    compact_decode=loop.sampler.compact, packed_forwards=str(loop.sampler.packed))


# ---------------------------------------------------------------------------------------------
# A peer's iterations: one BENCH line each
# ---------------------------------------------------------------------------------------------

def peer_timing(meter: WorkMeter, seen: dict[str, list], expected: int, every: int = 1, on_begin=None):
    """A TrainerCallback that ends an iteration every ``every`` optimizer steps: checks that ``expected`` responses were
    seen (``seen["lengths"]``; ``seen["prompts"]``: each distinct prompt's length), takes the meter's work (adding what
    generation needed) and emits the iteration; the update part starts at ``mark_update()``. Set ``.timer`` (a
    `common.PhaseTimer`) before training; ``on_begin()`` runs when training begins."""
    from transformers import TrainerCallback

    class Timing(TrainerCallback):
        def __init__(self):
            self.last, self.update_started, self.timer = None, None, None

        def on_train_begin(self, args, state, control, **kw):
            if on_begin is not None:
                on_begin()
            self.last = time.perf_counter()

        def mark_update(self):
            if self.update_started is None:
                self.update_started = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            if state.global_step % every:
                return
            now = time.perf_counter()
            lengths = seen["lengths"]
            if len(lengths) != expected:
                raise SystemExit(f"peer: {len(lengths)} responses in an iteration, expected {expected}")
            work = meter.take()
            work["needed_slots"]["generation"] += sum(seen["prompts"]) + sum(n - 1 for n in lengths)
            started = self.update_started or now
            common.emit("iteration", step=state.global_step // every, seconds=now - self.last,
                        rollout_s=started - self.last, update_s=now - started, phases=self.timer.take(),
                        rollouts=len(lengths), tokens=sum(lengths), lengths=list(lengths), work=work)
            seen["lengths"], seen["prompts"] = [], []
            self.last, self.update_started = time.perf_counter(), None

    return Timing()


# ---------------------------------------------------------------------------------------------
# TRL 1.16 GRPOTrainer
# ---------------------------------------------------------------------------------------------

def run_peer(folder: Path, iterations: int, new_tokens: int, prompts: int) -> None:
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    from trl import GRPOConfig, GRPOTrainer

    info, tokenizer, texts = common.start_trl_child(folder, PEER_VERSION)
    policy = AutoModelForCausalLM.from_pretrained(str(folder / "policy"), dtype=torch.float32)
    reward = AutoModelForSequenceClassification.from_pretrained(str(folder / "reward"), num_labels=1,
                                                                dtype=torch.float32)
    reward.eval().requires_grad_(False)

    def reward_ids(prompts, completions, completion_ids, **kwargs):
        return reward_scores(reward, tokenizer.pad_token_id,
                             [tokenizer(p)["input_ids"] + list(c) for p, c in zip(prompts, completion_ids)])

    rollouts = prompts * GROUP
    steps_per_round = rollouts // MICRO_BATCH  # micro-batches per generation round
    accumulation = MINI_BATCH // MICRO_BATCH
    optimizer_steps = steps_per_round // accumulation
    config = GRPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), seed=SEED, max_steps=optimizer_steps * iterations,
        per_device_train_batch_size=MICRO_BATCH, gradient_accumulation_steps=accumulation,
        steps_per_generation=steps_per_round, num_generations=GROUP, num_iterations=1,
        max_completion_length=new_tokens, mask_truncated_completions=False, temperature=TEMPERATURE, top_k=0,
        top_p=1.0, beta=BETA, use_bias_correction_kl=False, loss_type="dapo", scale_rewards="group", epsilon=CLIP,
        learning_rate=LR, lr_scheduler_type="linear", warmup_steps=0, weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM,
        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, disable_dropout=True, report_to="none",
        save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0, log_completions=False)
    meter = WorkMeter()
    seen: dict[str, list] = {"lengths": [], "prompts": []}

    def wrap_optimizer():
        timer.wrap(trainer.optimizer, "step", "optimizer_step")
        trainer.optimizer.step._wrapped_by_lr_sched = True

    timing = peer_timing(meter, seen, rollouts, every=optimizer_steps, on_begin=wrap_optimizer)
    trainer = GRPOTrainer(model=policy, reward_funcs=reward_ids, args=config,
                          train_dataset=Dataset.from_dict({"prompt": texts}), processing_class=tokenizer,
                          callbacks=[timing])
    for module in (trainer.model, trainer.ref_model, reward):
        meter.attach(module)

    def record_generate(original):
        def wrapped(prompt_ids, *a, **k):  # TRL 1.16: _generate_single_turn(prompt_ids, images, multimodal_fields)
            completion_ids, *rest = original(prompt_ids, *a, **k)
            seen["lengths"] += [len(c) for c in completion_ids]
            seen["prompts"] += [len(p) for p in {tuple(p) for p in prompt_ids}]  # each distinct prompt once
            return (completion_ids, *rest)
        return wrapped

    def mark_update(original):
        def wrapped(model, *a, **k):
            if torch.is_grad_enabled():
                timing.mark_update()
            return original(model, *a, **k)
        return wrapped

    trainer._generate_single_turn = record_generate(trainer._generate_single_turn)
    meter.sampling(trainer, "_generate_single_turn")
    trainer._get_per_token_logps_and_entropies = mark_update(trainer._get_per_token_logps_and_entropies)
    timer = timing.timer = common.PhaseTimer()
    timer.wrap(trainer, "_generate_single_turn", "generate")
    timer.wrap(trainer, "_get_per_token_logps_and_entropies",
               lambda a: "update_forward" if torch.is_grad_enabled() else
               ("reference_forward" if a[0] is trainer.ref_model else "policy_forward"))
    timer.wrap(reward, "forward", "reward_forward")
    timer.wrap(trainer.accelerator, "backward", "update_backward")
    trainer.train()
    common.emit_end(("torch", "transformers", "accelerate", "trl", "datasets"),
                    generation_config={k: v for k, v in trainer.generation_kwargs.items() if k != "cache_implementation"})


# ---------------------------------------------------------------------------------------------
# TRL 1.12 PPOTrainer (experimental), stop_token "eos"
# ---------------------------------------------------------------------------------------------

def run_peer_ppo(folder: Path, iterations: int, new_tokens: int, prompts: int) -> None:
    """TRL 1.12's PPO loop as users run it on data that stops: it generates with EOS as the stop token (rows that
    stopped are padded until the longest ends), truncates each response after its first EOS and scores the truncated
    rows; its reference, value and update forwards take the full generated width."""
    import tempfile

    import ppo_vs_trl_ppo
    import torch
    from trl.experimental.ppo import PPOConfig
    from trl.experimental.ppo import ppo_trainer as loop

    config = PPOConfig(
        output_dir=tempfile.mkdtemp(prefix="bench_trl_"), seed=SEED, per_device_train_batch_size=MICRO_BATCH,
        gradient_accumulation_steps=prompts // MICRO_BATCH, num_mini_batches=1,
        num_ppo_epochs=1, response_length=new_tokens, stop_token="eos", missing_eos_penalty=None,
        num_sample_generations=0, gradient_checkpointing=False, bf16=False, local_rollout_forward_batch_size=prompts,
        total_episodes=prompts * iterations, temperature=TEMPERATURE, kl_coef=KL_COEF, kl_estimator="k1",
        vf_coef=VF_COEF, cliprange=CLIP, cliprange_value=VALUE_CLIP, gamma=1.0, lam=LAM, learning_rate=LR,
        lr_scheduler_type="linear", warmup_steps=0, report_to="none", save_strategy="no", logging_steps=1,
        disable_tqdm=True, use_cpu=True, dataloader_num_workers=0)
    meter = WorkMeter()
    seen: dict[str, list] = {"lengths": [], "prompts": []}

    timing = peer_timing(meter, seen, prompts)
    trl, trainer, reward, _ = ppo_vs_trl_ppo.peer_trainer(folder, iterations, reference=True, config=config,
                                                           timing=timing)
    pad = trainer.processing_class.pad_token_id
    if pad == trainer.processing_class.eos_token_id:
        raise SystemExit("peer: pad == eos would make TRL's masks drop every EOS")
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    unwrapped.register_forward_pre_hook(lambda module, args: timing.mark_update())
    for module in (unwrapped.policy, trainer.ref_model, reward, unwrapped.value_model):
        meter.attach(module)

    def record_prompts(original):
        def wrapped(model, queries, *a, **k):
            seen["prompts"] += (queries != pad).sum(1).tolist()  # one sample per prompt: each row a distinct prompt
            return original(model, queries, *a, **k)
        return wrapped

    def record_lengths(original):
        def wrapped(stop_token_id, pad_token_id, responses):
            out = original(stop_token_id, pad_token_id, responses)
            padded = out == pad_token_id  # after the first EOS
            first = torch.where(padded.any(1), padded.int().argmax(1), torch.full_like(padded[:, 0], out.shape[1],
                                                                                       dtype=torch.long))
            seen["lengths"] += first.tolist()
            return out
        return wrapped

    timer = timing.timer = common.PhaseTimer()
    ppo_vs_trl_ppo.wrap_peer_phases(timer, trainer, reward)
    loop.batch_generation = record_prompts(loop.batch_generation)
    meter.sampling(loop, "batch_generation")
    loop.truncate_response = record_lengths(loop.truncate_response)
    trainer.train()
    common.emit_end(("torch", "transformers", "accelerate", "trl", "datasets"),
                    optimizer=common.describe_optimizer(trainer.optimizer), trl_file=trl.__file__)


# ---------------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------------

def summarise(raw: dict, shape: dict, warmup: int = 1) -> dict:
    kept = raw["iterations"][warmup:]
    seconds = [it["seconds"] for it in kept]
    out = {"iterations_kept": len(kept), "seconds": statistics.median(seconds),
           "samples_per_s": sum(it["rollouts"] for it in kept) / sum(seconds),
           "generated_tokens_per_s": sum(it["tokens"] for it in kept) / sum(seconds),
           "rollout_s": statistics.median(it["rollout_s"] for it in kept),
           "update_s": statistics.median(it["update_s"] for it in kept),
           "mean_response_length": sum(it["tokens"] for it in kept) / sum(it["rollouts"] for it in kept),
           "peak_rss_mib": raw["end"]["peak_rss_mib"],
           "phases_s": {k: statistics.median(it["phases"].get(k, 0.0) for it in kept)
                        for k in sorted({k for it in kept for k in it["phases"]})}}
    total = {k: {p: sum(it["work"][k][p] for it in kept) for p in WorkMeter.PHASES} for k in kept[0]["work"]}
    out["slots_per_sample"] = {p: total["computed_slots"][p] / sum(it["rollouts"] for it in kept) for p in WorkMeter.PHASES}
    out["wasted_slot_share"] = {p: 1 - total["needed_slots"][p] / total["computed_slots"][p]
                                if total["computed_slots"][p] else 0.0 for p in WorkMeter.PHASES}
    out["wasted_share"] = {p: wasted_flops_share(shape, *(total[k][p] for k in ("computed_slots", "needed_slots",
                                                                                 "computed_pairs", "needed_pairs")))
                           for p in WorkMeter.PHASES}
    return out


def run_comparison(model: str, runs: int, iterations: int, new_tokens: int, prompts: int, algorithm: str = "grpo",
                   sides=None) -> dict:
    folder = prepare(model)
    sides = sides or ALGORITHMS[algorithm]["sides"]
    child = [common.python(), str(Path(__file__).resolve()), "--iterations", str(iterations), "--folder", str(folder),
             "--max-new-tokens", str(new_tokens), "--prompts", str(prompts), "--algorithm", algorithm]
    per_side: dict[str, list[dict]] = {s: [] for s in sides}
    samples = prompts * ALGORITHMS[algorithm]["group"]
    for r in range(runs):
        for side in sides:
            print(f"run {r + 1}/{runs}: {algorithm} {side} (max_new_tokens {new_tokens}, {samples} samples) ...",
                  flush=True)
            env = {"PYTHONPATH": str(PPO_PEER)} if side == "trl-1.12" else {}
            raw = common.run_side([*child, "--side", side], env, timeout=3600)
            summary = summarise(raw, common.MODELS[model])
            per_side[side].append({"run": r + 1, **summary, "raw": raw})
            print(f"  {summary['samples_per_s']:.2f} samples/s, {summary['generated_tokens_per_s']:.0f} tokens/s, "
                  f"mean length {summary['mean_response_length']:.1f}, wasted "
                  + ", ".join(f"{p} {v:.0%}" for p, v in summary["wasted_share"].items()), flush=True)
    keys = ("seconds", "samples_per_s", "generated_tokens_per_s", "rollout_s", "update_s", "mean_response_length",
            "peak_rss_mib")
    summary = {}
    for side, rows in per_side.items():
        summary[side] = {k: statistics.median(r[k] for r in rows) for k in keys}
        for group in ("wasted_share", "wasted_slot_share", "slots_per_sample", "phases_s"):
            names = sorted({k for r in rows for k in r[group]})
            summary[side][group] = {k: statistics.median(r[group].get(k, 0.0) for r in rows) for k in names}
    for other in sides[1:]:
        ratio = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(per_side["ours"], per_side[other])]
        mem = [a["peak_rss_mib"] / b["peak_rss_mib"] for a, b in zip(per_side["ours"], per_side[other])]
        summary[f"ours_over_{other}"] = {"samples_per_s": {"per_run": ratio, "median": statistics.median(ratio)},
                                         "peak_rss": {"per_run": mem, "median": statistics.median(mem)}}
    return {"folder": str(folder), "summary": summary, "per_run": per_side}


def print_table(summary: dict, sides) -> None:
    rows = [("samples / s", "samples_per_s", "{:.2f}"), ("generated tokens / s", "generated_tokens_per_s", "{:.0f}"),
            ("s / iteration", "seconds", "{:.2f}"), ("rollout s", "rollout_s", "{:.2f}"),
            ("update s", "update_s", "{:.2f}"), ("mean response tokens", "mean_response_length", "{:.1f}"),
            ("peak RSS MiB", "peak_rss_mib", "{:.0f}")]
    print(f"\n{'':28}" + "".join(f"{s:>17}" for s in sides))
    for label, key, fmt in rows:
        print(f"{label:28}" + "".join(f"{fmt.format(summary[s][key]):>17}" for s in sides))
    for phase in ("generation", "scoring", "update"):
        print(f"{'wasted FLOPs, ' + phase:28}" + "".join(f"{summary[s]['wasted_share'][phase]:>17.1%}" for s in sides))
    for other in sides[1:]:
        r = summary[f"ours_over_{other}"]
        print(f"ours / {other}: samples/s x{r['samples_per_s']['median']:.2f} (per run "
              + ", ".join(f"{x:.2f}" for x in r["samples_per_s"]["per_run"])
              + f"), peak RSS x{r['peak_rss']['median']:.2f}")


def sweep(model: str, iterations: int, algorithm: str) -> dict:
    """How cost grows: ours and the peer at max_new_tokens 32, 128, 512 (32 samples) and at 2x, 4x the samples (128).
    Each point's sides are stored as "ours" and "trl"."""
    base = ALGORITHMS[algorithm]["prompts"]
    peer = ALGORITHMS[algorithm]["sides"][-1]
    points = [(32, base), (128, base), (512, base), (128, 2 * base), (128, 4 * base)]
    out = []
    for new_tokens, prompts in points:
        run = run_comparison(model, 1, iterations, new_tokens, prompts, algorithm, sides=("ours", peer))
        s = run["summary"]
        out.append({"max_new_tokens": new_tokens, "samples": prompts * ALGORITHMS[algorithm]["group"],
                    **{name: {k: s[side][k] for k in ("samples_per_s", "seconds", "mean_response_length",
                                                      "generated_tokens_per_s", "peak_rss_mib", "wasted_share")}
                       for name, side in (("ours", "ours"), ("trl", peer))}})
    return {"points": out, "peer": peer}


def plot_sweep(points: list[dict], path: Path, peer: str = "trl") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    panels = [("max_new_tokens (32 samples)", "max_new_tokens", lambda p: p["samples"] == PROMPTS * GROUP),
              ("samples per iteration (max_new_tokens 128)", "samples", lambda p: p["max_new_tokens"] == 128)]
    for ax, (title, key, pick) in zip(axes, panels):
        chosen = sorted((p for p in points if pick(p)), key=lambda p: p[key])
        x = [p[key] for p in chosen]
        for side in ("ours", "trl"):
            ax.plot(x, [1 / p[side]["samples_per_s"] for p in chosen], marker="o",
                    label=peer if side == "trl" else side)
        ax.set_xlabel(title)
        ax.set_ylabel("seconds per sample")
        ax.set_xscale("log", base=2)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, per="process", sides=False)
    p.add_argument("--side", choices=sorted(set(SIDES + PPO_SIDES)), help=argparse.SUPPRESS)  # a child process
    p.add_argument("--algorithm", choices=sorted(ALGORITHMS), default="grpo",
                   help="grpo: against TRL 1.16 GRPOTrainer; ppo: against TRL 1.12 PPOTrainer.")
    p.add_argument("--max-new-tokens", type=int, default=NEW_TOKENS)
    p.add_argument("--prompts", type=int, default=None,
                   help="Prompts per iteration (default 8 x 4 samples for grpo, 32 x 1 for ppo).")
    p.add_argument("--sweep", action="store_true", help="How cost grows: ours and TRL at several sizes.")
    args = common.parse(p, argv)
    algorithm = args.algorithm
    prompts = args.prompts or ALGORITHMS[algorithm]["prompts"]
    if args.side:
        folder = Path(args.folder)
        if args.side == "trl":
            run_peer(folder, args.iterations, args.max_new_tokens, prompts)
        elif args.side == "trl-1.12":
            run_peer_ppo(folder, args.iterations, args.max_new_tokens, prompts)
        else:
            run_ours(folder, args.iterations, args.side == "ours", args.max_new_tokens, prompts, algorithm)
        return 0
    import trl

    if algorithm == "grpo" and not trl.__version__.startswith(PEER_VERSION):
        p.error(f"this comparison is against TRL {PEER_VERSION}x; our venv has {trl.__version__}")
    if algorithm == "ppo" and not (PPO_PEER / "trl").is_dir():
        p.error(f"TRL 1.12 is not at {PPO_PEER}: .venv/bin/pip install --no-deps --target {PPO_PEER} trl==1.12.0")
    started, machine = common.utc_now(), common.machine_info()
    tag = "" if algorithm == "grpo" else "ppo_"
    if args.sweep:
        result = sweep(args.model, args.iterations, algorithm)
        name = f"ragged_rollouts_sweep_{tag}{args.model}"
        plot_sweep(result["points"], common.RESULTS / f"{name}.png", result["peer"])
        for pt in result["points"]:
            print(f"max_new_tokens {pt['max_new_tokens']:4d}, {pt['samples']:3d} samples: s/sample ours "
                  f"{1 / pt['ours']['samples_per_s']:.3f}, trl {1 / pt['trl']['samples_per_s']:.3f} "
                  f"(x{pt['ours']['samples_per_s'] / pt['trl']['samples_per_s']:.2f})")
    else:
        result = run_comparison(args.model, args.runs, args.iterations, args.max_new_tokens, prompts, algorithm)
        name = f"ragged_rollouts_{tag}{args.model}"
        print_table(result["summary"], ALGORITHMS[algorithm]["sides"])
    info = common.load_prompts(prepare(args.model))
    payload = {"benchmark": "ragged_rollouts" + ("_sweep" if args.sweep else ""), "algorithm": algorithm,
               "model": args.model,
               "started_utc": started, "finished_utc": common.utc_now(), "machine": machine,
               "models": {"shape": common.MODELS[args.model], "policy_parameters": info["policy_parameters"],
                          "prompt_lengths": info["prompt_lengths"], "eos": info["eos"]},
               "settings": {"prompts": prompts, "samples_per_prompt": ALGORITHMS[algorithm]["group"],
                            "max_new_tokens": args.max_new_tokens, "temperature": TEMPERATURE, "clip": CLIP,
                            "learning_rate": LR, "threads": common.THREADS, "micro_batch": MICRO_BATCH,
                            "ours": "decoding compact, padding_free, sort_micro_batches (the defaults)",
                            "ours-levers-off": "decoding generate, padding_free false, sort_micro_batches false",
                            **({"mini_batch": MINI_BATCH, "beta": BETA,
                                "trl": "GRPOTrainer, loss_type dapo, steps_per_generation = micro-batches per round"}
                               if algorithm == "grpo" else
                               {"mini_batch": prompts, "kl_coef": KL_COEF, "vf_coef": VF_COEF,
                                "value_clip": VALUE_CLIP, "gamma": 1.0, "lam": LAM,
                                "trl-1.12": "PPOTrainer (trl.experimental.ppo), stop_token eos, value model from the "
                                            "reward model, local_rollout_forward_batch_size = the whole batch"})},
               "not_equal": NOT_EQUAL if algorithm == "grpo" else PPO_NOT_EQUAL, "runs": args.runs,
               "iterations": args.iterations, **result}
    path = common.write_result(name, payload)
    print(f"\nwrote {path}")
    return 0


NOT_EQUAL = [
    "sampled tokens differ between sides (their own RNG streams: ours draws by Gumbel-max, transformers' generate by "
    "torch.multinomial, from the same distribution), so the response lengths differ iteration by iteration: compare "
    "samples/s together with the mean response length (same distribution: close on average)",
    "loss normalisation under unequal lengths: ours divides each minibatch's token losses by its own valid tokens, "
    "TRL's 'dapo' by the generation round's tokens split evenly over its steps: the same compute, other numbers",
    "the old log-probabilities: ours records them while sampling; TRL runs a no-grad policy forward (its cost)",
    "data order: each side draws prompts with its own seeded shuffle (prompt lengths vary, averaged over iterations)",
]
PPO_NOT_EQUAL = [
    "sampled tokens differ between sides (their own RNG streams: ours draws by Gumbel-max, TRL's generate by "
    "torch.multinomial, from the same distribution): compare samples/s together with the mean response length",
    "TRL 1.12 steps the optimizer under accelerate's gradient accumulation (4 micro-batches); ours accumulates the "
    "same 4 micro-batches of the one minibatch: one optimizer step per iteration on both sides",
    "TRL calls gc.collect() twice per iteration and empty_cache() several times; ours does not",
    "data order: each side draws prompts with its own seeded shuffle (prompt lengths vary, averaged over iterations)",
]


if __name__ == "__main__":
    raise SystemExit(main())
