"""Our LoRA-shared PPO against TRL 1.12's PPOTrainer with a LoRA peft_config: memory first, speed too (issue 6).

    .venv/bin/pip install --no-deps --target benchmarks/.peers/trl-1.12.0 trl==1.12.0   # once
    .venv/bin/python benchmarks/ppo_lora_vs_trl_ppo_lora.py --model tiny --runs 3 --iterations 6
    .venv/bin/python benchmarks/ppo_lora_vs_trl_ppo_lora.py --model 27m --runs 3 --iterations 6

The same work as ppo_vs_trl_ppo.py (16 prompts x 1 sample x exactly 32 generated tokens, then 1 PPO epoch of
2 minibatches of 8, fp32, 2 threads; the same models and prompts), with the same LoRA on the policy on both
sides. What differs is where the models live:

* ours, built by the PPO stage's own `rlhf_dist.rl.models.build_ppo` (lora.enabled): ONE base carries the
  policy adapter ``default`` and the value adapter ``value`` (+ a linear `ValueHead`); the reference is that
  base with the adapters switched off; the reward model is loaded on its own and frozen;
* TRL: the policy gets the LoRA adapter (``peft_config``), the reference is the policy with the adapter
  disabled (``ref_model=None``), the reward model is frozen and the value model is a separate FULL model
  started from the reward model and trained in full (TRL applies ``peft_config`` to the policy only).

The figure that matters is the peak RSS (VmHWM) ours/peer; each side also reports the bytes its model weights
hold (each tensor counted once), its trainable bytes and its optimizer state, so the table can say where the
difference comes from. Writes benchmarks/results/ppo_lora_vs_trl_ppo_lora_<model>.json and prints a table.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import ppo_vs_trl_ppo as ppo  # noqa: E402  (the equal-work constants and the children's start-up)

PEER = ppo.PEER  # the work (ppo.TRAINING, ppo.peer_config) is ppo_vs_trl_ppo.py's
# Our LoRA defaults (rlhf_dist.config.sections.LoraSection: r 16, alpha 32, target_modules "all-linear") with
# dropout 0 (both sides switch dropout off anyway). "all-linear" = every linear layer but the output head: on the Llama
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
    "ours": {**ppo.SETTINGS["ours"], "built_by": "rlhf_dist.rl.models.build_ppo (model.dtype float32, lora.enabled, "
                                                 "value_adapter: true, no reward adapter: the reward folder has none), "
                                                 "as the PPO stage builds them",
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


def _memory(weights: int, trainable_model, optimizer) -> dict:
    """Bytes: model weights held (each tensor once), trainable weights (= their gradients), optimizer state."""
    from rlhf_dist.rl.adapters import tensor_bytes

    inner = getattr(optimizer, "optimizer", optimizer)
    state = sum(tensor_bytes(t) for s in inner.state.values() for t in s.values() if hasattr(t, "numel") and t.dim() > 0)
    trainable = {p.data_ptr(): tensor_bytes(p) for p in trainable_model.parameters() if p.requires_grad}
    return {"weights_bytes": weights, "trainable_bytes": sum(trainable.values()), "optimizer_state_bytes": state}


# ---------------------------------------------------------------------------------------------
# Side A: ours (the PPO stage's build_ppo with LoRA; PPOLoop driven directly, one train_step per iteration)
# ---------------------------------------------------------------------------------------------

def run_ours(folder: Path, iterations: int) -> None:
    """The models as the PPO stage builds them with LoRA (rlhf_dist.rl.models.build_ppo): one base for the policy
    adapter, the value adapter + head and the reference (adapters off); the reward model on its own, frozen."""
    from rlhf_dist.rl.adapters import POLICY, VALUE, lora_bytes, unique_bytes

    memory: dict = {}
    timer = common.PhaseTimer(peak_growth=True)  # measurement only: wrappers around the loop's own calls

    def setup(ours, loop) -> None:
        m = ours.models
        policy = m.actor_critic.policy
        memory.update(_memory(unique_bytes(m.actor_critic, m.reference, m.reward.model), m.actor_critic, loop.optimizer))
        memory.update(lora_targets=_lora_targets(policy), policy_lora_bytes=lora_bytes(policy, POLICY),
                      value_lora_bytes=lora_bytes(policy, VALUE), stage_model_memory=m.memory)
        common.emit("loaded", peak_rss_mib=common.peak_rss_mib())

    def end(loop) -> dict:
        memory.update(_memory(memory["weights_bytes"], loop.unwrapped, loop.optimizer))  # optimizer state now exists
        return {"memory": memory, "peak_growth_mib": timer.growth}

    common.run_ours(folder, iterations, ppo.TRAINING, value="adapter", lora=LORA, prefix="bench_ours_lora_",
                    timer=timer, packages=(*common.OURS_PACKAGES, "peft"), setup=setup,
                    fields=lambda metrics, batch: {"peak_rss_mib": common.peak_rss_mib()}, end=end)


# ---------------------------------------------------------------------------------------------
# Side B: TRL 1.12 experimental PPOTrainer with peft_config (LoRA policy, adapter-disabled reference)
# ---------------------------------------------------------------------------------------------

def run_peer(folder: Path, iterations: int) -> None:
    from peft import LoraConfig  # before the import-only figure, as TRL's own imports

    peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
                             target_modules=LORA["target_modules"], task_type="CAUSAL_LM")
    trl, trainer, reward, timing = ppo.peer_trainer(folder, iterations, reference=False, peft_config=peft_config,
                                                    timing_extra=lambda: {"peak_rss_mib": common.peak_rss_mib()})
    from rlhf_dist.rl.adapters import lora_bytes, unique_bytes  # after the import-only figure: counting only

    wrapper = trainer.accelerator.unwrap_model(trainer.model)
    if not trainer.is_peft_model or trainer.ref_model is not None:
        raise SystemExit("peer: expected a PEFT policy and no reference model (the adapter-disabled policy)")
    memory = _memory(unique_bytes(wrapper, trainer.ref_model, reward), wrapper, trainer.optimizer)
    memory.update(lora_targets=_lora_targets(wrapper.policy), policy_lora_bytes=lora_bytes(wrapper.policy, "default"),
                  value_model_bytes=unique_bytes(wrapper.value_model))
    common.emit("loaded", peak_rss_mib=common.peak_rss_mib())
    wrapper.register_forward_pre_hook(timing.mark_update)

    timer = common.PhaseTimer(peak_growth=True)  # measurement only: wrappers around the loop's own calls
    ppo.wrap_peer_phases(timer, trainer, reward)
    timing.timer = timer
    trainer.train()
    memory.update(_memory(memory["weights_bytes"], wrapper, trainer.optimizer))  # optimizer state now exists
    common.emit_end(("torch", "transformers", "accelerate", "peft", "trl", "datasets"),
                    optimizer=common.describe_optimizer(trainer.optimizer), memory=memory, peak_growth_mib=timer.growth,
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


NOT_EQUAL = [
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
    "import-only RSS: ours imports its models and loop (rlhf_dist.rl.models, rlhf_dist.rl.trainer), transformers "
    "and peft (no TRL); the peer imports TRL 1.12, peft, transformers and datasets. The table shows both",
]


def main(argv: list[str] | None = None) -> int:
    args = common.comparison_args(__doc__, argv, run_ours, run_peer, (PEER, "1.12", ppo.INSTALL))
    if args is None:  # a child process: it ran its side
        return 0
    # Useful FLOPs as ours does the work (value = an adapter pass over the frozen base: input gradients only). TRL's
    # full value model also computes weight gradients (2x), which are not counted: its utilisation reads low by that.
    run = common.compare(args, __file__, "trl-1.12", value="adapter", lora=True, peer_env={"PYTHONPATH": str(PEER)})
    targets = {name: rows[0]["raw"]["end"]["memory"]["lora_targets"] for name, rows in run.per_side.items()}
    if targets["ours"] != targets["trl-1.12"] or not targets["ours"]:
        raise SystemExit(f"the policy adapter sits on different modules: ours {targets['ours']}, peer {targets['trl-1.12']}")
    run.summary["memory"] = memory_summary(run.per_side)
    path = common.write_result(f"{NAME}_{args.model}", common.result(
        NAME, args, run, SETTINGS, models={"lora_targets": targets["ours"]}, not_equal=NOT_EQUAL))
    common.print_table(run.summary, "ours", "trl-1.12")
    print_memory(run.summary["memory"], "ours", "trl-1.12")
    kinds = ", ".join(sorted({t.rsplit(".", 1)[-1] for t in targets["ours"]}))
    print(f"\npolicy LoRA on the same {len(targets['ours'])} modules on both sides ({kinds})")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
