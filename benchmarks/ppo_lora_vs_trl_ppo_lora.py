"""Our LoRA-shared PPO against TRL 1.12's PPOTrainer with a LoRA peft_config: memory first, speed too (issue 6).

    .venv/bin/pip install --no-deps --target benchmarks/.peers/trl-1.12.0 trl==1.12.0   # once
    .venv/bin/python benchmarks/ppo_lora_vs_trl_ppo_lora.py --model tiny --runs 3 --iterations 6
    .venv/bin/python benchmarks/ppo_lora_vs_trl_ppo_lora.py --model 27m --runs 3 --iterations 6

The same work as ppo_vs_trl_ppo.py (16 prompts x 1 sample x exactly 32 generated tokens, then 1 PPO epoch of
2 minibatches of 8, fp32, 2 threads; the same models and prompts), with the same LoRA on the policy on both
sides. What differs is where the models live:

* ours, built by the PPO stage's own `build_models` (lora.enabled): ONE base carries the policy adapter
  ``default`` and the value adapter ``value`` (+ a linear `ValueHead`); the reference is that base with
  the adapters switched off; the reward model is loaded on its own and frozen;
* TRL: the policy gets the LoRA adapter (``peft_config``), the reference is the policy with the adapter
  disabled (``ref_model=None``), the reward model is frozen and the value model is a separate FULL model
  started from the reward model and trained in full (TRL applies ``peft_config`` to the policy only).

The figure that matters is the peak RSS (VmHWM) ours/peer; each side also reports the bytes its model weights
hold (each tensor counted once), its trainable bytes and its optimizer state, so the table can say where the
difference comes from. Writes benchmarks/results/ppo_lora_vs_trl_ppo_lora_<model>.json and prints a table.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import ppo_vs_trl_ppo as ppo  # noqa: E402  (the equal-work constants and the children's start-up)

PEER = ppo.PEER
ROLLOUTS, MINI_BATCH, NEW_TOKENS, TEMPERATURE, SEED = ppo.ROLLOUTS, ppo.MINI_BATCH, ppo.NEW_TOKENS, ppo.TEMPERATURE, ppo.SEED
ROLLOUT_LOGPROBS = ppo.ROLLOUT_LOGPROBS
# Our LoRA defaults (rlhf_dist.config.LoraConfig: r 16, alpha 32, target_modules "all-linear") with dropout 0
# (both sides switch dropout off anyway). "all-linear" = every linear layer but the output head: on the Llama
# q, k, v, o, gate, up, down. Each side reports the modules it actually put an adapter on; the parent checks
# that the two lists are the same.
LORA = {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}
NAME = "ppo_lora_vs_trl_ppo_lora"

SETTINGS = {
    **{k: v for k, v in ppo.SETTINGS.items() if k not in ("ours", "peer", "value_function", "reference")},
    "lora": {**LORA, "on": "the policy (both sides); ours also puts a second adapter of the same config on the same "
                           "base for the value function"},
    "value_function": "ours: LoRA adapter 'value' on the policy's base + a linear value head (rlhf_dist ValueHead, "
                      "seeded), trained (adapter + head); TRL: a separate full LlamaForSequenceClassification started "
                      "from the reward model, every weight trained",
    "reference": "the policy's base with the LoRA adapter disabled (both sides; no separate reference model)",
    "reward": "a separate frozen full LlamaForSequenceClassification loaded from the reward model (both sides)",
    "ours": {**ppo.SETTINGS["ours"], "built_by": "rlhf_dist.stages.ppo.build_models (lora.enabled, value_adapter "
                                                 "resolved to true, no reward adapter: the reward folder has none)",
             "stop_ids": "[] (ignore_eos, no stop_tokens; checked)"},
    "peer": {**ppo.SETTINGS["peer"], "peft_config": "peft.LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, "
                                                   "target_modules='all-linear', task_type='CAUSAL_LM')",
             "ref_model": None},
}


def _lora_targets(model) -> list[str]:
    """Names of the modules that carry the policy adapter ``default``, without PEFT's ``base_model.model.`` prefix."""
    out = []
    for name, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if lora_a is not None and "default" in lora_a:
            out.append(name.split("base_model.model.", 1)[-1])
    return sorted(out)


class PeakPhaseTimer(common.PhaseTimer):
    """`common.PhaseTimer`, plus how much each phase raised the process's peak RSS (VmHWM), summed over the whole run.

    Says WHERE the peak is made (the phases here do not nest, so nothing is counted twice); the figure
    ``peak RSS`` itself is still the end-of-run VmHWM. Two /proc reads per call, outside the timed part.
    """

    def __init__(self) -> None:
        super().__init__()
        self.growth: dict[str, float] = {}

    def wrap(self, owner, attr: str, name) -> None:
        super().wrap(owner, attr, name)
        timed = getattr(owner, attr)

        def peaked(*args, **kwargs):
            before = common.peak_rss_mib()
            try:
                return timed(*args, **kwargs)
            finally:
                key = name(args) if callable(name) else name
                self.growth[key] = self.growth.get(key, 0.0) + common.peak_rss_mib() - before

        setattr(owner, attr, peaked)


def _memory(weights: int, trainable_model, optimizer) -> dict:
    """Bytes: model weights held (each tensor once), trainable weights (= their gradients), optimizer state."""
    from rlhf_dist.rl.adapters import tensor_bytes

    inner = getattr(optimizer, "optimizer", optimizer)
    state = sum(tensor_bytes(t) for s in inner.state.values() for t in s.values() if hasattr(t, "numel") and t.dim() > 0)
    trainable = {p.data_ptr(): tensor_bytes(p) for p in trainable_model.parameters() if p.requires_grad}
    return {"weights_bytes": weights, "trainable_bytes": sum(trainable.values()), "optimizer_state_bytes": state}


# ---------------------------------------------------------------------------------------------
# Side A: ours (the PPO stage's build_models with LoRA; PPOTrainer driven directly, one train_step per iteration)
# ---------------------------------------------------------------------------------------------

def run_ours(folder: Path, iterations: int) -> None:
    import tempfile

    import torch

    import rlhf_dist.rl.trainer as loop
    from rlhf_dist.config import LoraConfig, ModelConfig, PPOConfig, PPOTrainingConfig
    from rlhf_dist.models import load_tokenizer
    from rlhf_dist.rl.adapters import POLICY, VALUE, lora_bytes, unique_bytes
    from rlhf_dist.rl.distributed import make_accelerator
    from rlhf_dist.rl.trainer import PPOTrainer
    from rlhf_dist.stages.common import StageContext
    from rlhf_dist.stages.ppo import build_models

    info = ppo._start(folder)
    torch.manual_seed(SEED)
    training = PPOTrainingConfig(seed=SEED, max_steps=iterations, rollout_batch_size=ROLLOUTS, samples_per_prompt=1,
                                 generation_batch_size=ROLLOUTS, mini_batch_size=MINI_BATCH,
                                 per_device_train_batch_size=MINI_BATCH, ppo_epochs=1, max_new_tokens=NEW_TOKENS,
                                 temperature=TEMPERATURE, report_to=[], save_steps=0, use_cpu=True,
                                 max_prompt_length=256, max_grad_norm=None,  # TRL 1.12's PPO loop never clips
                                 ignore_eos=True, rollout_logprobs=ROLLOUT_LOGPROBS)
    cfg = PPOConfig(model=ModelConfig(dtype="float32"),
                    lora=LoraConfig(enabled=True, r=LORA["r"], alpha=LORA["alpha"], dropout=LORA["dropout"],
                                    target_modules=LORA["target_modules"]),
                    init_from=str(folder / "policy"), reward_model=str(folder / "reward"), training=training)
    if not cfg.uses_value_adapter:
        raise SystemExit("ours: the config does not resolve to a value adapter")
    tokenizer = load_tokenizer(cfg.init_from, cfg.model)
    work = Path(tempfile.mkdtemp(prefix="bench_ours_lora_"))
    accelerator = make_accelerator(training, 1, info["config"]["hidden_size"])
    ctx = StageContext(cfg=cfg, train=None, eval=None, data_source="benchmark prompts", tokenizer=tokenizer,
                       final_dir=work / "final", checkpoint=None)
    actor_critic, reference, reward = build_models(ctx, accelerator)  # exactly as the stage builds them
    if reference is not None or actor_critic.value_adapter != VALUE or reward.model is None or reward.tokenizer is not None:
        raise SystemExit(f"ours: not the LoRA-shared layout (reference {type(reference).__name__}, value adapter "
                         f"{actor_critic.value_adapter}, reward {type(reward.model).__name__})")
    prompts = info["prompts"]
    trainer = PPOTrainer(training, accelerator, actor_critic, reference, reward, tokenizer, prompts, prompts[:ROLLOUTS],
                         work)
    if list(trainer.stop_ids):
        raise SystemExit(f"ours: stop ids {trainer.stop_ids}; expected none (ignore_eos)")
    policy = actor_critic.policy
    memory = _memory(unique_bytes(actor_critic, reference, reward.model), actor_critic, trainer.optimizer)
    memory.update(lora_targets=_lora_targets(policy), policy_lora_bytes=lora_bytes(policy, POLICY),
                  value_lora_bytes=lora_bytes(policy, VALUE), stage_model_memory=ctx.extra["memory"])
    common.emit("loaded", peak_rss_mib=common.peak_rss_mib())

    timer = PeakPhaseTimer()  # measurement only: wrappers around the loop's own calls
    timer.wrap(loop, "generate", "generate")
    timer.wrap(loop, "forward_logprobs", "reference_forward")  # the base with the adapters off (_ref_logprobs)
    timer.wrap(loop, "sequence_scores", "reward_forward")
    timer.wrap(actor_critic, "forward",
               lambda _: "update_forward" if torch.is_grad_enabled() else "policy_value_forward")
    # the value adapter's pass + head: in the rollout, and in the update when the backward is split (one process)
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
                    max_tokens=int(lengths.max()), ratio_first=metrics.get("policy/ratio_first_minibatch"),
                    peak_rss_mib=common.peak_rss_mib())
    memory.update(_memory(memory["weights_bytes"], actor_critic, trainer.optimizer))  # optimizer state now exists
    common.emit("end", peak_rss_mib=common.peak_rss_mib(), matmul_gflops_end=common.matmul_gflops(),
                versions=common.versions("torch", "transformers", "accelerate", "peft", "rlhf_dist"),
                optimizer=ppo._describe(trainer.optimizer), memory=memory, peak_growth_mib=timer.growth)


# ---------------------------------------------------------------------------------------------
# Side B: TRL 1.12 experimental PPOTrainer with peft_config (LoRA policy, adapter-disabled reference)
# ---------------------------------------------------------------------------------------------

def run_peer(folder: Path, iterations: int) -> None:
    import torch
    import trl
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOTrainer

    if not trl.__version__.startswith("1.12."):
        raise SystemExit(f"peer: expected TRL 1.12 first on PYTHONPATH, got {trl.__version__} from {trl.__file__}")
    info = ppo._start(folder)
    from rlhf_dist.rl.adapters import lora_bytes, unique_bytes  # after the import-only figure: counting only

    tokenizer = AutoTokenizer.from_pretrained(str(folder / "policy"), padding_side="left")
    load = dict(dtype=torch.float32)
    policy = AutoModelForCausalLM.from_pretrained(str(folder / "policy"), **load)
    reward = AutoModelForSequenceClassification.from_pretrained(str(folder / "reward"), num_labels=1, **load)
    value = AutoModelForSequenceClassification.from_pretrained(str(folder / "reward"), num_labels=1, **load)
    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    dataset = Dataset.from_dict({"input_ids": info["prompts"]})
    timing = ppo.peer_timing(reward, info, extra=lambda: {"peak_rss_mib": common.peak_rss_mib()})
    trainer = PPOTrainer(args=ppo.peer_config(iterations), processing_class=tokenizer, model=policy, ref_model=None,
                         reward_model=reward, train_dataset=dataset, value_model=value, peft_config=peft_config,
                         callbacks=[timing])
    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    if not trainer.is_peft_model or trainer.ref_model is not None:
        raise SystemExit("peer: expected a PEFT policy and no reference model (the adapter-disabled policy)")
    memory = _memory(unique_bytes(wrapper, trainer.ref_model, reward), wrapper, trainer.optimizer)
    memory.update(lora_targets=_lora_targets(wrapper.policy), policy_lora_bytes=lora_bytes(wrapper.policy, "default"),
                  value_model_bytes=unique_bytes(wrapper.value_model))
    common.emit("loaded", peak_rss_mib=common.peak_rss_mib())
    wrapper.register_forward_pre_hook(timing.mark_update)

    timer = PeakPhaseTimer()  # measurement only: wrappers around the loop's own calls
    ppo.wrap_peer_phases(timer, trainer, reward)
    timing.timer = timer
    trainer.train()
    memory.update(_memory(memory["weights_bytes"], wrapper, trainer.optimizer))  # optimizer state now exists
    common.emit("end", peak_rss_mib=common.peak_rss_mib(), matmul_gflops_end=common.matmul_gflops(),
                versions=common.versions("torch", "transformers", "accelerate", "peft", "trl", "datasets"),
                optimizer=ppo._describe(trainer.optimizer), memory=memory, peak_growth_mib=timer.growth,
                trl_file=trl.__file__)


# ---------------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------------

MEMORY_ROWS = (("after-setup peak RSS MiB", "loaded_peak_rss_mib"), ("model weights MiB", "weights_bytes"),
               ("trainable (= grads) MiB", "trainable_bytes"), ("optimizer state MiB", "optimizer_state_bytes"))


def memory_summary(per_side: dict[str, list[dict]]) -> dict:
    """Per side: the weights / trainable / optimizer bytes (the same in every run) and the median after-setup peak."""
    import statistics

    out = {}
    for name, rows in per_side.items():
        mem = rows[0]["raw"]["end"]["memory"]
        out[name] = {k: mem[k] for k in mem if k != "lora_targets"}
        out[name]["loaded_peak_rss_mib"] = statistics.median(r["raw"]["loaded"]["peak_rss_mib"] for r in rows)
        phases = sorted({k for r in rows for k in r["raw"]["end"]["peak_growth_mib"]})
        out[name]["peak_growth_mib"] = {k: statistics.median(r["raw"]["end"]["peak_growth_mib"].get(k, 0.0) for r in rows)
                                        for k in phases}
        out[name]["peak_growth_mib"]["outside_phases"] = statistics.median(
            r["raw"]["end"]["peak_rss_mib"] - r["raw"]["loaded"]["peak_rss_mib"]
            - sum(r["raw"]["end"]["peak_growth_mib"].values()) for r in rows)
    return out


def print_memory(mem: dict, ours: str, peer: str) -> None:
    print(f"\n{'':26}{ours:>12}{peer:>12}")
    for label, key in MEMORY_ROWS:
        scale = 1 if key.endswith("_mib") else 2 ** 20
        print(f"{label:26}{mem[ours][key] / scale:>12.1f}{mem[peer][key] / scale:>12.1f}")
    print("peak RSS raised after setup, by phase (MiB, whole run):")
    for name in (ours, peer):
        print(f"  {name}: " + ", ".join(f"{k} {v:.0f}" for k, v in mem[name]["peak_growth_mib"].items() if v >= 0.5))


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
    targets = {name: rows[0]["raw"]["end"]["memory"]["lora_targets"] for name, rows in per_side.items()}
    if targets["ours"] != targets["trl-1.12"] or not targets["ours"]:
        raise SystemExit(f"the policy adapter sits on different modules: ours {targets['ours']}, peer {targets['trl-1.12']}")
    # Useful FLOPs as ours does the work (value = an adapter pass over the frozen base: input gradients only). TRL's
    # full value model also computes weight gradients (2x), which are not counted: its utilisation reads low by that.
    flops = common.phase_flops(common.MODELS[args.model], ROLLOUTS, info["prompt_length"], NEW_TOKENS, value="adapter",
                               lora=True)
    summary = common.aggregate(per_side, "ours", "trl-1.12", flops)
    summary["memory"] = memory_summary(per_side)
    payload = {
        "benchmark": NAME, "model": args.model, "started_utc": started,
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine,
        "versions": {name: rows[0]["raw"]["end"]["versions"] for name, rows in per_side.items()},
        "models": {"shape": common.MODELS[args.model], "policy_parameters": info["policy_parameters"],
                   "tokenizer_length": info["tokenizer_length"],
                   "prompt_length": info["prompt_length"], "distinct_prompts": info["distinct_prompts"],
                   "lora_targets": targets["ours"]},
        "settings": SETTINGS, "runs": args.runs, "iterations": args.iterations, "warmup_iterations": 1,
        "not_equal": [
            "value function (the point of the comparison): TRL's is a separate full model (a copy of the reward model) "
            "with every weight trained (gradients and AdamW state for all of it, PEFT only on the policy); ours is a "
            "second LoRA adapter of the same config on the policy's base + a linear value head, so only the adapter "
            "and the head train. Both run one value pass over the same Llama body per forward; ours adds the LoRA "
            "matmuls, TRL's backward adds the weight gradients of the full value model",
            "value function start: TRL's starts from the reward model (its body and score head); ours from the "
            "policy's base with a fresh adapter (B = 0) and a seeded random head. Same shapes and work, other numbers",
            "reference: both are the policy's base with the adapter disabled; ours flips the LoRA layers' switch "
            "(rlhf_dist.rl.adapters.no_adapter), TRL enters PeftModel.disable_adapter()",
            "TRL calls gc.collect() twice per iteration and empty_cache() several times; ours does not",
            "optimizer: both AdamW, each side builds its own over its own trainable parameters (see per side: "
            "foreach/fused flags, weight decay, learning rates); the learning rate does not change the work",
            "data order: each side draws prompts with its own seeded shuffle; all prompts have the same token length, "
            "so the shapes (and the work) are identical whichever prompts are drawn",
            "sampled tokens differ between sides (different RNG streams); with exactly 32 tokens and no stop token "
            "this does not change the amount of work",
            "TRL's timing includes its per-iteration metric gathering and logging; ours times train_step, which also "
            "computes its metrics (no tracker/JSONL writes, no tqdm on either side)",
            "import-only RSS: ours imports rlhf_dist's PPO stage (which imports the venv's trl, peft, transformers); "
            "the peer imports TRL 1.12, peft, transformers and datasets. The table shows both",
        ],
        "summary": summary, "per_run": per_side,
    }
    path = common.write_result(f"{NAME}_{args.model}", payload)
    common.print_table(summary, "ours", "trl-1.12")
    print_memory(summary["memory"], "ours", "trl-1.12")
    kinds = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets["ours"]}))
    print(f"\npolicy LoRA on the same {len(targets['ours'])} modules on both sides ({kinds})")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
