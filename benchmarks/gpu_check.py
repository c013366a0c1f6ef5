"""A GPU check in one command (issue 17): on one CUDA GPU and without downloads (sized for under 8 minutes; not yet run
on one), a ~0.4B-parameter Qwen2-shaped policy with random weights and a locally trained tokenizer runs a few PPO
steps in bf16, then a few QLoRA PPO steps on one 4-bit base (policy adapter, reference = adapters off, value adapter
+ head), both through the ppo stage as users run it. Writes tokens/s per phase, the peak GPU memory and the
planner's estimate for the same recipe side by side.

    bash benchmarks/gpu_check.sh                        # = .venv/bin/python benchmarks/gpu_check.py
    .venv/bin/python benchmarks/gpu_check.py --steps 4 --out benchmarks/results/gpu_check.json
    .venv/bin/python benchmarks/gpu_check.py --shape tiny --device cpu   # the same path on CPU, a tiny model (a test)

Both runs use the defaults of the ppo stage (our decode loop, padding-free forwards, length-sorted micro-batches),
a separate value model from the reward model in bf16 and the value adapter with QLoRA; responses stop at EOS or at
max_new_tokens (a random policy rarely says EOS: most run to the end). Per run: generated tokens/s in the rollout
(generated tokens / time/rollout), samples/s in the update (rollouts x ppo_epochs / time/update, one epoch), the
peak of torch.cuda.max_memory_allocated over the stage, and the planner's per-GPU total for the same recipe
(`rlhf-dist plan`, 1 GPU of this card's memory), which counts weights, gradients, optimizer states and activations.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SHAPES = {  # Qwen2.5-0.5B's body (24 layers, 896 wide, GQA 14/2) with a 32k vocabulary: ~0.4B parameters
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
             "num_key_value_heads": 2, "vocab_size": 32000},
    "tiny": {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 1000},
}


def build_models(folder: Path, shape: str, dtype) -> int:
    """folder/policy (Qwen2ForCausalLM, random, seeded) and folder/reward (the same body, a one-label head), with a BPE
    tokenizer trained here on the demo corpus; returns the policy's parameter count."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM, Qwen2ForSequenceClassification

    from rlhf_dist.demo import synthetic, tiny

    tokenizer = tiny.build_tokenizer(synthetic.corpus(0), vocab_size=min(SHAPES[shape]["vocab_size"], 4000))
    config = Qwen2Config(**{**SHAPES[shape], "vocab_size": max(SHAPES[shape]["vocab_size"], len(tokenizer))},
                         max_position_embeddings=2048, tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    policy = Qwen2ForCausalLM(config).to(dtype)
    policy.save_pretrained(folder / "policy", safe_serialization=True)
    tokenizer.save_pretrained(folder / "policy")
    torch.manual_seed(1)
    reward = Qwen2ForSequenceClassification.from_pretrained(folder / "policy", num_labels=1, dtype=dtype)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(folder / "reward", safe_serialization=True)
    tokenizer.save_pretrained(folder / "reward")
    synthetic.generate(folder / "data", seed=0, n_pretrain=1, n_sft=1, n_pref=1, n_prompts=256, n_verifiable=1)
    return sum(p.numel() for p in policy.parameters())


def recipe(folder: Path, qlora: bool, steps: int, device: str, new_tokens: int) -> Path:
    dtype = "bfloat16" if device == "cuda" else "float32"
    lines = [f'model: {{name_or_path: "{folder / "policy"}", dtype: {dtype}}}',
             "ppo:",
             f'  data: {{path: "{folder / "data" / "prompts.jsonl"}"}}',
             f'  reward_model: "{folder / "reward"}"',
             f"  training: {{max_steps: {steps}, rollout_batch_size: 32, generation_batch_size: 32, mini_batch_size: 16,",
             f"             per_device_train_batch_size: 8, ppo_epochs: 1, max_new_tokens: {new_tokens},",
             f"             learning_rate: 1.0e-6, save_steps: 0, seed: 0, use_cpu: {str(device == 'cpu').lower()}}}"]
    if qlora:
        lines[0:0] = ["lora: {enabled: true, r: 16, alpha: 32, dropout: 0.0, target_modules: all-linear}",
                      f"quantization: {{load_in_4bit: true, quant_type: nf4, double_quant: true, compute_dtype: {dtype}}}"]
        lines.append("  value_adapter: true")
    path = folder / ("qlora.yaml" if qlora else "bf16.yaml")
    path.write_text("\n".join(lines) + "\n")
    return path


def run_stage(rec: Path, out: Path, device: str) -> dict:
    """The ppo stage in this process (the CLI's own entry point); its per-step log and the peak GPU memory."""
    import torch

    from rlhf_dist.cli import main

    if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    code = main(["ppo", "--recipe", str(rec), "--output", str(out)])
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"gpu_check: the ppo stage for {rec.name} exited {code}")
    history = json.loads((out / "ppo" / "log_history.json").read_text())
    metrics = json.loads((out / "ppo" / "metrics.json").read_text())
    rows = [h for h in history if "time/rollout" in h][1:] or [h for h in history if "time/rollout" in h]
    rollouts = 32
    generated = sum(h["rollout/response_length"] * rollouts for h in rows)
    result = {"wall_s": wall, "steps_measured": len(rows), "first_step_left_out": len(history) > len(rows),
              "rollout_generated_tokens_per_s": generated / sum(h["time/rollout"] for h in rows),
              "update_samples_per_s": rollouts * len(rows) / sum(h["time/update"] for h in rows),
              "seconds_per_step": sum(h["time/step"] for h in rows) / len(rows),
              "mean_response_length": generated / rollouts / len(rows),
              "after": metrics.get("after", {})}
    if device == "cuda":
        result["peak_gpu_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_gpu_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    return result


def planned(rec: Path, gpu_gib: float, folder: Path, method: str) -> dict:
    """The planner's estimate for this recipe on 1 GPU of `gpu_gib`: its row for `method` (full, qlora) under ddp
    (one process, nothing sharded or offloaded), and the row it would recommend."""
    from rlhf_dist.cli import main

    path = folder / f"plan-{rec.stem}.json"
    main(["plan", "--recipe", str(rec), "--stage", "ppo", "--gpu-memory", f"{gpu_gib:.0f}", "--json", str(path)])
    plan = json.loads(path.read_text())
    row = next(r for r in plan["options"] if r["method"] == method and r["strategy"] == "ddp")
    return {"row": row, "recommended": plan.get("recommended"), "units": plan.get("units")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=sorted(SHAPES), default="0.5b")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--steps", type=int, default=4, help="PPO steps per run (the first is left out of the rates).")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "gpu_check.json"))
    p.add_argument("--keep", help="Keep the models and runs in this folder (default: a temporary one, removed).")
    args = p.parse_args(argv)
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible (torch.cuda.is_available() is False); nothing measured. "
              "Use --device cpu --shape tiny to check the script itself.", file=sys.stderr)
        return 2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    folder = Path(args.keep or tempfile.mkdtemp(prefix="gpu_check_"))
    folder.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    params = build_models(folder, args.shape, dtype)
    device = {"name": torch.cuda.get_device_name(0), "memory_gib": torch.cuda.get_device_properties(0).total_memory / 2**30,
              "torch": torch.__version__, "cuda": torch.version.cuda} if args.device == "cuda" else {"name": "cpu"}
    gpu_gib = device.get("memory_gib", 80.0)
    runs = {}
    for name, qlora in (("bf16", False), ("qlora_4bit", True)):
        rec = recipe(folder, qlora, args.steps, args.device, args.max_new_tokens)
        print(f"gpu_check: {name} ({args.steps} PPO steps) ...", flush=True)
        runs[name] = {**run_stage(rec, folder / f"run-{name}", args.device),
                      "planner": planned(rec, gpu_gib, folder, "qlora" if qlora else "full")}
    result = {"check": "gpu_check", "shape": args.shape, "policy_parameters": params, "device": device,
              "steps": args.steps, "max_new_tokens": args.max_new_tokens, "rollouts_per_step": 32,
              "total_wall_s": time.perf_counter() - started, "runs": runs}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"\n{'':34}{'bf16':>14}{'qlora_4bit':>14}")
    for label, key, fmt in [("rollout generated tokens / s", "rollout_generated_tokens_per_s", "{:.0f}"),
                            ("update samples / s", "update_samples_per_s", "{:.1f}"),
                            ("s / step", "seconds_per_step", "{:.2f}"),
                            ("peak GPU allocated GiB", "peak_gpu_allocated_gib", "{:.2f}")]:
        print(f"{label:34}" + "".join(f"{fmt.format(runs[n][key]) if key in runs[n] else '-':>14}" for n in runs))
    print(f"{'planner per-GPU total GiB':34}" + "".join(
        f"{runs[n]['planner']['row']['total']:>14.2f}" for n in runs))
    print(f"\nwrote {out} ({result['total_wall_s']:.0f} s)")
    if not args.keep:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
