"""`rlhf-dist plan`: will a stage fit in GPU memory, and with which strategy? Reads configs only, no weights.

    rlhf-dist plan --recipe my.yaml --stage sft --gpus-per-node 8 --gpu-memory 80
    rlhf-dist plan --model meta-llama/Llama-2-7b-hf --stage sft --gpus-per-node 1 --nodes 1 --gpu-memory 24
    rlhf-dist plan --model ./my_model --stage ppo --gpus-per-node 8 --nodes 2 --gpu-memory 80 --json plan.json

For every option (full / LoRA / QLoRA) x (ddp / zero2 / zero3 / zero2_offload / zero3_offload) it estimates the
peak memory per GPU of all the stage's models, prints a table, marks what fits in --gpu-memory less a 10% headroom,
recommends the simplest option that fits and prints the matching `rlhf-dist launch` command.

With --recipe the stage's own settings are planned: its model (model.name_or_path or STAGE.init_from; ppo's
reward_model), sequence length (training.max_length; pretrain block_size; ppo max_prompt_length + max_new_tokens),
training.per_device_train_batch_size, training.activation_checkpointing, lora.r, quantization.double_quant,
model.attn_implementation, mixed precision (bf16-mixed unless the recipe turns bf16 and fp16 off) and, for ppo,
training.generation_batch_size. A flag given on the command line wins over the recipe. Without --recipe, --model
is needed and the flags' defaults apply.

What is counted (weights, gradients, optimizer states, activations, KV cache, ZeRO sharding, LoRA/QLoRA), the
assumptions, and the tests that check them: docs/memory_model.md.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from rlhf_dist import registry
from rlhf_dist.atomic import write_json
from rlhf_dist.errors import UserError
from rlhf_dist.plan.estimate import HEADROOM, PRECISIONS, plan, profile
from rlhf_dist.plan.shapes import load_config, model_shape, text_config

# What a recipe can set, in the planner's words, and the defaults without a recipe.
DEFAULTS = {"seq_len": 2048, "per_device_train_batch_size": 1, "activation_checkpointing": True, "lora_r": 16,
            "attention": "sdpa", "double_quant": True, "precision": "bf16-mixed", "generation_batch_size": None}


def launch_command(result: dict, row: dict, recipe: str, output: str) -> str:
    import shlex

    stage = result["stage"]
    cmd = ["rlhf-dist", "launch", stage, "--recipe", recipe, "--output", output, "--strategy", row["strategy"],
           "--num-processes", str(result["gpus_per_node"])]
    if result["nodes"] > 1:
        cmd += ["--num-machines", str(result["nodes"]), "--machine-rank", "RANK", "--main-process-ip", "MASTER_ADDR"]
    if row["method"] != "full":
        cmd.append(f"{stage}.lora.enabled=true")
        if result["lora_r"] != 16:
            cmd.append(f"{stage}.lora.r={result['lora_r']}")
    if row["method"] == "qlora":
        cmd.append(f"{stage}.quantization.load_in_4bit=true")
        if not result["double_quant"]:
            cmd.append(f"{stage}.quantization.double_quant=false")
    cmd.append(f"{stage}.training.activation_checkpointing={'true' if result['activation_checkpointing'] else 'false'}")
    cmd.append(f"{stage}.training.per_device_train_batch_size={result['per_device_train_batch_size']}")
    return shlex.join(cmd).replace("RANK", "<RANK>").replace("MASTER_ADDR", "<MASTER_ADDR>")


def render(result: dict) -> str:
    lines = []
    models = ", ".join(f"{m['role']} {m['model_type']} {m['params'] / 1e9:.3g}B params" for m in result["models"])
    lines.append(f"rlhf-dist plan: {result['stage']} on {result['nodes']} node(s) x {result['gpus_per_node']} GPU(s) "
                 f"of {result['gpu_memory_gib']:g} GiB ({result['usable_gpu_gib']:.1f} GiB usable after "
                 f"{result['headroom']:.0%} headroom); {models}")
    lines.append(f"seq-len {result['seq_len']}, per_device_train_batch_size {result['per_device_train_batch_size']}, "
                 f"activation_checkpointing {'on' if result['activation_checkpointing'] else 'off'}, "
                 f"attention {result['attention']}, LoRA r "
                 f"{result['lora_r']}, precision {result['precision']}; GiB per GPU (CPU: GiB per node)")
    head = f"{'method':<6} {'strategy':<14} {'weights':>8} {'grads':>7} {'optim':>7} {'act':>7} {'act-noCK':>8} " \
           f"{'kv':>6} {'total':>8} {'cpu/node':>9}  fits"
    lines += [head, "-" * len(head)]
    for r in result["options"]:
        mark = "yes" if r["fits"] else ("no (cpu)" if r["fits_gpu"] and r["cpu_checked"] else "no")
        if r["fits_gpu"] and not r["fits_cpu"] and not r["cpu_checked"]:
            mark = "gpu yes; cpu unknown (give --cpu-memory)"
        if r is result["recommended"]:
            mark += "  <- recommended"
        lines.append(f"{r['method']:<6} {r['strategy']:<14} {r['weights']:8.2f} {r['grads']:7.2f} {r['optimizer']:7.2f} "
                     f"{r['activations']:7.2f} {r['activations_no_checkpointing']:8.2f} {r['kv_cache']:6.2f} "
                     f"{r['total']:8.2f} {r['cpu_per_node']:9.1f}  {mark}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf-dist plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--stage", required=True, help=f"One of {', '.join(registry.STAGES)}.")
    p.add_argument("--recipe", help="Plan this recipe's stage: its model and settings (flags given here win). Also the "
                                    "recipe of the printed launch command.")
    p.add_argument("--model", help="Model directory, its config.json, or a hub id (config only); default: the recipe's.")
    p.add_argument("--reward-model", help="Config of the reward/value model (ppo; default: the recipe's, else --model).")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs (processes) per node.")
    p.add_argument("--nodes", type=int, default=1, help="Nodes.")
    p.add_argument("--gpu-memory", type=float, required=True, help="Memory of one GPU in GiB (24, 40, 80, ...).")
    p.add_argument("--cpu-memory", type=float, help="CPU memory per node in GiB; checks the offload options' CPU share.")
    p.add_argument("--seq-len", type=int, help="Tokens per sequence (ppo: prompt + new tokens); default: the recipe's, "
                                               "else 2048.")
    p.add_argument("--per-device-train-batch-size", "--micro-batch", dest="per_device_train_batch_size", type=int,
                   help="training.per_device_train_batch_size: sequences per forward/backward per GPU (pairs for "
                        "dpo/reward); default: the recipe's, else 1. (--micro-batch: its former name.)")
    p.add_argument("--activation-checkpointing", "--gradient-checkpointing", dest="activation_checkpointing",
                   action=argparse.BooleanOptionalAction,
                   help="training.activation_checkpointing: recompute activations in the backward pass; default: the "
                        "recipe's, else on. (--gradient-checkpointing: its former name.)")
    p.add_argument("--lora-r", type=int, help="lora.r, the LoRA rank ('all-linear' targets); default: the recipe's, else 16.")
    p.add_argument("--attention", choices=("sdpa", "eager"),
                   help="model.attn_implementation; eager also stores the s x s attention scores (Korthikanti's 5as/h "
                        "term). Default: the recipe's, else sdpa.")
    p.add_argument("--double-quant", action=argparse.BooleanOptionalAction,
                   help="quantization.double_quant of QLoRA; default: the recipe's, else on.")
    p.add_argument("--precision", choices=tuple(PRECISIONS),
                   help="bf16-mixed (GPUs: 16-bit weights, fp32 master and Adam) or fp32 (no mixed precision); default: "
                        "fp32 if the recipe turns training.bf16 and fp16 off, else bf16-mixed.")
    p.add_argument("--output", default="runs/OUT", help="Run directory to put in the printed launch command.")
    p.add_argument("--json", help="Also write the table as JSON to this file.")
    return p


def from_recipe(recipe: str, stage: str) -> dict:
    """A recipe stage's settings in the planner's words (see DEFAULTS), its models and its typed config."""
    from rlhf_dist.config.resolve import resolve_stage
    from rlhf_dist.recipe import load_recipe

    raw, source = load_recipe(recipe)
    cfg = resolve_stage(raw, source, stage, "OUTPUT", f"OUTPUT/{stage}.incomplete")
    model = cfg.init_from or cfg.model.name_or_path
    if not model:
        raise UserError(f"{source}: {stage} has no model (model.name_or_path or {stage}.init_from); set one or pass --model")
    t = cfg.training
    given = (raw.get(stage) or {}).get("training") or {}  # what the recipe says, not our device-dependent defaults
    off = given.get("bf16") is False and not given.get("fp16")
    return {"model": model, "reward_model": getattr(cfg, "reward_model", None), "config": cfg,
            "per_device_train_batch_size": t.per_device_train_batch_size,
            "activation_checkpointing": bool(t.activation_checkpointing), "lora_r": cfg.lora.r,
            "attention": "eager" if cfg.model.attn_implementation == "eager" else "sdpa",
            "double_quant": cfg.quantization.double_quant, "precision": "fp32" if off else "bf16-mixed",
            "generation_batch_size": getattr(t, "generation_batch_size", None)}


def settings(args: argparse.Namespace) -> dict:
    """The plan's settings: the command line's, else the recipe's, else DEFAULTS."""
    registry.get(args.stage, "--stage")  # an unknown stage fails in one line, naming the stages
    found = from_recipe(args.recipe, args.stage) if args.recipe else {}
    model = args.model or found.get("model")
    if not model:
        raise UserError("--model or --recipe is needed: the model whose config is planned")
    out = {"model": model, "reward_model": args.reward_model or found.get("reward_model") or model}
    for key, default in DEFAULTS.items():
        given = getattr(args, key, None)
        out[key] = given if given is not None else found.get(key, default)
    if args.seq_len is None and "config" in found:
        positions = getattr(text_config(load_config(model)), "max_position_embeddings", None) or DEFAULTS["seq_len"]
        out["seq_len"] = found["config"].sequence_length(positions)
    return out


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    s = settings(args)
    for flag, value in (("--gpus-per-node", args.gpus_per_node), ("--nodes", args.nodes), ("--seq-len", s["seq_len"]),
                        ("--per-device-train-batch-size", s["per_device_train_batch_size"]), ("--lora-r", s["lora_r"])):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--gpu-memory", args.gpu_memory), ("--cpu-memory", args.cpu_memory)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UserError(f"{flag} must be a positive number of GiB, got {value}")
    cfg = load_config(s["model"])
    needs = profile(args.stage).models
    policy = model_shape(cfg, "policy", False, s["lora_r"]) if "policy" in needs else None
    classifier = None
    if "classifier" in needs:
        rcfg = load_config(s["reward_model"]) if s["reward_model"] != s["model"] else cfg
        classifier = model_shape(rcfg, "reward", True, s["lora_r"])
    result = plan(args.stage, policy, classifier, gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                  gpu_memory_gib=args.gpu_memory, cpu_memory_gib=args.cpu_memory, seq=s["seq_len"],
                  batch=s["per_device_train_batch_size"], checkpointing=s["activation_checkpointing"], lora_r=s["lora_r"],
                  eager=s["attention"] == "eager", double_quant=s["double_quant"], precision=s["precision"],
                  generation_batch=s["generation_batch_size"])
    rec = result["recommended"]
    if rec is not None:
        rec["command"] = launch_command(result, rec, args.recipe or "RECIPE.yaml", args.output)
    print(render(result))
    if args.json:
        path = Path(args.json).expanduser()
        if not path.parent.is_dir():
            raise UserError(f"--json: folder {path.parent} does not exist; create it or choose another path")
        write_json(path, result)
    if rec is None:
        rows = result["options"]
        smallest = min((r for r in rows if r["fits_cpu"]), key=lambda r: r["total"], default=None) \
            or min(rows, key=lambda r: r["total"])
        hint = ""
        if any(r["fits_gpu"] and not r["fits_cpu"] for r in rows):
            hint = ("; offload options fit the GPU but not the CPU memory per node" if args.cpu_memory is not None
                    else "; offload options fit the GPU: give --cpu-memory (GiB per node) to check their CPU share")
        raise UserError(f"--gpu-memory {args.gpu_memory:g}: no option fits {args.stage} in {result['usable_gpu_gib']:.1f} GiB "
                        f"usable per GPU; the smallest, {smallest['method']}+{smallest['strategy']}, needs "
                        f"{smallest['total']:.1f} GiB per GPU (+{HEADROOM:.0%} headroom); use larger or more GPUs, "
                        f"a shorter --seq-len or a smaller --per-device-train-batch-size{hint}")
    print(f"\nrecommended: {rec['method']} + {rec['strategy']} ({rec['total']:.1f} of {result['usable_gpu_gib']:.1f} GiB "
          "usable per GPU)")
    print(rec["command"])
    return 0
