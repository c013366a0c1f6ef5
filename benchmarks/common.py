"""Shared plumbing of the side-by-side benchmarks (issue 6): machine facts, shared models, the A/B runner.

A comparison script (e.g. `ppo_vs_trl_ppo.py`) defines its two sides as functions that run in their own
subprocess and print one JSON line per iteration, prefixed with ``BENCH``; this module

* builds the models, tokenizer and prompts both sides load, from one config and seed, into a cache folder
  (`prepare_models`), so both sides start from byte-identical weights;
* runs our side in its child (`run_ours`): the four models built by the PPO stage's own
  `rlhf_dist.rl.models.build_ppo` (`build_ours`), our `PPOLoop` driven step by step, its phases timed where the
  loop looks its calls up (`wrap_ours_phases`);
* starts the sides A B A B ... (`compare`, `run_interleaved`), parses their lines, takes the median of the
  iterations after the warm-up, and writes ``benchmarks/results/<name>.json`` atomically (`result`,
  `write_result`) plus a table (`print_table`).

CPU numbers are relative only: the machine's speed drifts between runs, so the figure that counts is the
ratio ours/peer measured in the same interleaved run.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent
REPO = ROOT.parent
RESULTS = Path(os.environ.get("BENCH_RESULTS_DIR") or ROOT / "results")  # tests write elsewhere
CACHE = Path(os.environ.get("BENCH_CACHE_DIR") or ROOT / ".cache")
PEERS = Path(os.environ.get("BENCH_PEERS_DIR") or ROOT / ".peers")  # peers installed beside our venv, not into it
THREADS = 2
SEED = 0

# Model shapes both sides load (rlhf_dist/demo/tiny.py is the "tiny" one).
MODELS = {
    "tiny": {"vocab_size": 1000, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256},
    "27m": {"vocab_size": 8000, "hidden_size": 512, "num_layers": 6, "num_heads": 8, "intermediate_size": 1792},
}


# ---------------------------------------------------------------------------------------------
# Machine facts
# ---------------------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def versions(*packages: str) -> dict[str, str]:
    """Versions of the named packages as imported in THIS process (so the peer's TRL shows its own)."""
    import importlib

    out = {"python": platform.python_version()}
    for name in packages:
        try:
            out[name] = importlib.import_module(name).__version__
        except Exception as exc:  # a missing package is a fact worth recording, not a crash
            out[name] = f"unavailable ({type(exc).__name__})"
    return out


def matmul_gflops(n: int = 1024, repeats: int = 8) -> float:
    """fp32 matmul rate of this process (its torch threads), GFLOP/s: best of `repeats` n x n products."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)  # warm-up: thread pool, allocator
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def machine_info() -> dict:
    import torch

    return {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": THREADS, "platform": platform.platform(),
            "torch": torch.__version__, "matmul_gflops_parent": round(matmul_gflops(), 1)}


def peak_rss_mib() -> float:
    """Peak resident memory of this process image so far, MiB: VmHWM from /proc/self/status.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the PARENT's high-water mark into a child across
    fork + exec, so a child of a large parent would report at least the parent's size. Falls back to
    ru_maxrss (KiB on Linux) where /proc is missing.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pin_threads() -> None:
    """Both sides: THREADS intra-op threads, one inter-op thread (called first thing in each child)."""
    import torch

    torch.set_num_threads(THREADS)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set
        pass


# ---------------------------------------------------------------------------------------------
# Shared models, tokenizer and prompts
# ---------------------------------------------------------------------------------------------

def prepare_models(model: str, n_prompts: int = 64) -> Path:
    """CACHE/<model>/{policy,reward,prompts.json}: built once, deterministically, from MODELS[model] and SEED.

    * tokenizer: the demo's BPE tokenizer (rlhf_dist/demo/tiny.py) trained on the demo corpus;
    * policy: a random LlamaForCausalLM (tied embeddings, fp32), torch.manual_seed(SEED);
    * reward: the same Llama as a one-label LlamaForSequenceClassification (the policy's weights, a new
      head seeded with SEED + 1); both sides also start their value model from it;
    * prompts: demo prompts (rlhf_dist/demo/synthetic.py) that all have the SAME token length, so no side
      pads and the work does not depend on which prompts each side's data order draws.
    """
    out = CACHE / model
    if (out / "prompts.json").is_file():
        return out
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from rlhf_dist.demo import synthetic, tiny

    spec = MODELS[model]
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = tiny.build_tokenizer(synthetic.corpus(SEED), vocab_size=spec["vocab_size"])
    config = LlamaConfig(
        vocab_size=max(spec["vocab_size"], len(tokenizer)), hidden_size=spec["hidden_size"],
        intermediate_size=spec["intermediate_size"], num_hidden_layers=spec["num_layers"],
        num_attention_heads=spec["num_heads"], num_key_value_heads=spec["num_heads"], max_position_embeddings=256,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attention_dropout=0.0)
    torch.manual_seed(SEED)
    policy = LlamaForCausalLM(config)
    policy.generation_config.pad_token_id = tokenizer.pad_token_id
    policy.save_pretrained(str(tmp / "policy"), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp / "policy"))
    torch.manual_seed(SEED + 1)
    reward = LlamaForSequenceClassification.from_pretrained(str(tmp / "policy"), num_labels=1)
    reward.config.pad_token_id = tokenizer.pad_token_id
    reward.save_pretrained(str(tmp / "reward"), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp / "reward"))

    synthetic.generate(tmp / "data", seed=SEED, n_pretrain=1, n_sft=1, n_pref=1, n_prompts=512)
    texts = [json.loads(line)["prompt"] for line in (tmp / "data" / "prompts.jsonl").read_text().splitlines()]
    encoded = [tokenizer(t)["input_ids"] for t in texts]
    by_length: dict[int, list[list[int]]] = {}
    for ids in encoded:
        by_length.setdefault(len(ids), []).append(ids)
    length, rows = max(by_length.items(), key=lambda kv: len(kv[1]))
    rows = [rows[i % len(rows)] for i in range(n_prompts)]  # repeat if fewer distinct ones
    n_params = sum(p.numel() for p in policy.parameters())
    (tmp / "prompts.json").write_text(json.dumps({
        "prompt_length": length, "distinct_prompts": len(by_length[length]), "prompts": rows,
        "policy_parameters": n_params, "tokenizer_length": len(tokenizer),
        "config": config.to_dict() | {"torch_dtype": "float32"}}))
    shutil.rmtree(tmp / "data")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


def load_prompts(folder: Path) -> dict:
    return json.loads((folder / "prompts.json").read_text())


# ---------------------------------------------------------------------------------------------
# FLOPs per phase: the distance to the limit
# ---------------------------------------------------------------------------------------------

def _forward_flops(shape: dict, batch: int, length: int, logit_positions: int, lm_head: bool) -> float:
    """Matmul FLOPs of one forward of a Llama-shaped model over [batch, length] tokens (causal attention),
    with the vocabulary head on `logit_positions` positions per row (0 = a classifier's body only)."""
    h, i, n, v = shape["hidden_size"], shape["intermediate_size"], shape["num_layers"], shape["vocab_size"]
    per_token = 2 * n * (4 * h * h + 3 * h * i)  # q, k, v, o and the gated MLP (as many kv heads as heads)
    attention = n * 4 * h * length * length  # QK^T and AV as the kernels compute them (causal masking saves none)
    head = 2 * h * v * logit_positions if lm_head else 0
    return batch * (length * per_token + attention + head)


def _generate_flops(shape: dict, batch: int, prompt: int, new: int) -> float:
    """Prefill of the prompt (logits at its last position), then one cached step per further token."""
    h, i, n, v = shape["hidden_size"], shape["intermediate_size"], shape["num_layers"], shape["vocab_size"]
    per_token = 2 * n * (4 * h * h + 3 * h * i) + 2 * h * v
    total = _forward_flops(shape, batch, prompt, 1, True)
    for t in range(1, new):  # step t reads a context of prompt + t tokens
        total += batch * (per_token + n * 4 * h * (prompt + t))
    return total


def phase_flops(shape: dict, batch: int, prompt: int, new: int, value: str | None = "model",
                lora: bool = False) -> dict[str, float]:
    """Useful FLOPs per iteration and phase, the same for both sides (the work, not how a side does it).

    batch rollouts of `prompt` + `new` tokens. Log-probabilities need the vocabulary head on the `new`
    response positions only; a classifier (reward, value model) needs its body. value: "model" (a separate
    classifier), "head" (on the policy's own pass: no extra body), "adapter" (a second body pass on the shared
    base) or None (critic-free). The backward costs 2 forwards for trained weights (input and weight gradients),
    1 for a frozen LoRA base (input gradients; the adapters' own FLOPs are not counted). The optimizer step is
    elementwise, not counted. Phase names as the benchmarks' `phases`.
    """
    length = prompt + new
    policy = _forward_flops(shape, batch, length, new, True)
    body = _forward_flops(shape, batch, length, 0, False)
    value_fwd = {"model": body, "adapter": body, "head": 0.0, None: 0.0}[value]
    policy_backward = (1 if lora else 2) * policy
    value_backward = {"model": 2 * body, "adapter": body, "head": 0.0, None: 0.0}[value]
    return {
        "generate": _generate_flops(shape, batch, prompt, new),
        "policy_forward": policy, "policy_value_forward": policy + value_fwd, "value_forward": value_fwd,
        "reference_forward": policy, "reward_forward": body,
        "update_forward": policy + value_fwd, "update_backward": policy_backward + value_backward,
    }


def utilisation(side: dict, flops: dict[str, float]) -> dict:
    """Each measured phase's FLOP rate over this side's own matmul rate (the same process, same run)."""
    rate = side["matmul_gflops"] * 1e9
    phases = side.get("phases_s", {})
    out = {k: flops[k] / phases[k] / rate for k in phases if k in flops and phases[k] > 0 and flops[k] > 0}
    update = flops.get("update_forward", 0.0) + flops.get("update_backward", 0.0)
    if update and side.get("update_s"):
        out["update (whole phase)"] = update / side["update_s"] / rate
    rollout = sum(flops[k] for k in phases if k in flops and k not in ("update_forward", "update_backward"))
    if rollout and side.get("rollout_s"):
        out["rollout (whole phase)"] = rollout / side["rollout_s"] / rate
    out["iteration"] = (update + rollout) / side["seconds"] / rate
    return out


# ---------------------------------------------------------------------------------------------
# Children: start-up, report lines, phase timers
# ---------------------------------------------------------------------------------------------

def emit(kind: str, **fields) -> None:
    """One machine-readable line for the parent: ``BENCH {"kind": ..., ...}``."""
    print("BENCH " + json.dumps({"kind": kind, **fields}), flush=True)


def start_child(folder: Path) -> dict:
    """A side's start-up: threads, prompts, import-only memory, this process's matmul rate (the ``start`` line)."""
    pin_threads()
    info = load_prompts(folder)
    emit("start", import_rss_mib=peak_rss_mib(), matmul_gflops=matmul_gflops())
    return info


def start_trl_child(folder: Path, version: str) -> tuple[dict, Any, list[str]]:
    """A TRL side's start-up: checks that the imported TRL is `version` (a prefix, "1.16."), `start_child`, the
    policy's tokenizer (left padding) and the prompts as text, each checked to encode back to its token ids (TRL takes
    text; the prompt lengths must be the same as ours). Returns ``(info, tokenizer, texts)``."""
    import trl
    from transformers import AutoTokenizer

    if not trl.__version__.startswith(version):
        raise SystemExit(f"peer: expected TRL {version}x, got {trl.__version__} from {trl.__file__}")
    info = start_child(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "policy"), padding_side="left")
    texts = [tokenizer.decode(ids, skip_special_tokens=True) for ids in info["prompts"]]
    bad = [i for i, (t, ids) in enumerate(zip(texts, info["prompts"])) if tokenizer(t)["input_ids"] != ids]
    if bad:
        raise SystemExit(f"peer: prompts {bad[:5]} do not survive decode + encode; the prompt lengths would differ")
    return info, tokenizer, texts


def emit_end(packages: tuple[str, ...], **fields) -> None:
    """A side's last line: its peak RSS, its matmul rate now, the versions of `packages` as imported here, `fields`."""
    emit("end", peak_rss_mib=peak_rss_mib(), matmul_gflops_end=matmul_gflops(), versions=versions(*packages), **fields)


def describe_optimizer(optimizer, per_group: bool = False) -> dict:
    """The optimizer's class and settings. Default: its constructor defaults and the learning rate of each parameter
    group; per_group: each group's size, (initial) learning rate and weight decay (where a side sets them per group,
    overriding the constructor defaults, e.g. torch AdamW's lr 1e-3 and weight decay 0.01)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it
    keep = ("eps", "betas", "foreach", "fused") if per_group else ("eps", "weight_decay", "betas", "foreach", "fused")
    out = {"class": type(inner).__name__, **{k: inner.defaults.get(k) for k in keep if k in inner.defaults}}
    if per_group:
        out["groups"] = [{"params": len(g["params"]), "lr": g.get("initial_lr", g["lr"]), "weight_decay": g["weight_decay"]}
                         for g in inner.param_groups]
    else:
        out["lr_per_group"] = [group["lr"] for group in inner.param_groups]
    return out


class PhaseTimer:
    """Seconds per named phase within one iteration, from thin wrappers around existing callables.

    Measurement only: a wrapper calls the original and adds its wall time (a few microseconds of
    overhead per call); nothing is skipped or changed. `take()` returns and resets the current sums.
    With ``peak_growth``, also how much each phase raised the process's peak RSS (VmHWM), summed over the
    whole run in `growth`: WHERE the peak is made (phases that do not nest count nothing twice); two /proc
    reads per call, outside the timed part.
    """

    def __init__(self, peak_growth: bool = False) -> None:
        self.sums: dict[str, float] = {}
        self.growth: dict[str, float] | None = {} if peak_growth else None

    def wrap(self, owner, attr: str, name) -> None:
        """Replace ``owner.attr`` by a timed wrapper; ``name`` is a string or ``f(args) -> str``."""
        original = getattr(owner, attr)

        def timed(*args, **kwargs):
            before = peak_rss_mib() if self.growth is not None else 0.0
            t0 = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                seconds = time.perf_counter() - t0
                key = name(args) if callable(name) else name
                self.sums[key] = self.sums.get(key, 0.0) + seconds
                if self.growth is not None:
                    self.growth[key] = self.growth.get(key, 0.0) + peak_rss_mib() - before

        setattr(owner, attr, timed)

    def take(self) -> dict[str, float]:
        out, self.sums = self.sums, {}
        return out


# ---------------------------------------------------------------------------------------------
# Children: our side, its models built as the PPO stage builds them
# ---------------------------------------------------------------------------------------------

OURS_PACKAGES = ("torch", "transformers", "accelerate", "rlhf_dist")


def import_ours(lora: bool = False) -> None:
    """Import what our side runs on (transformers' models, our PPO models and loop; peft with LoRA): before the
    import-only memory figure, as each peer imports its TRL first."""
    import importlib

    for module in ("torch", "transformers.models.auto.modeling_auto", "rlhf_dist.rl.models", "rlhf_dist.rl.trainer",
                   *(("peft",) if lora else ())):
        importlib.import_module(module)


def ours_training(iterations: int, **fields):
    """Our loop's `PPOTrainingConfig` for `iterations` steps: `fields` over what every benchmark sets alike (no
    trackers, no checkpoints, CPU, no stop at EOS: every response runs to max_new_tokens; the rollout
    log-probabilities recorded while sampling, as TRL takes them from the generation scores)."""
    from rlhf_dist.config.ppo import PPOTrainingConfig

    return PPOTrainingConfig(**{"max_steps": iterations, "report_to": [], "save_steps": 0, "use_cpu": True,
                                "max_prompt_length": 256, "ignore_eos": True, "rollout_logprobs": "generate", **fields})


@dataclass
class Ours:
    """What `build_ours` returns: the policy's tokenizer, the accelerator, `rlhf_dist.rl.models.PPOModels` and the
    PPO stage config they were built from."""

    tokenizer: Any
    accelerator: Any
    models: Any
    cfg: Any

    def loop(self, prompts: list[list[int]], eval_prompts: list[list[int]], prefix: str = "bench_ours_"):
        """Our `PPOLoop` on these models (its work directory a fresh temporary folder), driven step by step."""
        import tempfile

        from rlhf_dist.rl.trainer import PPOLoop

        m = self.models
        return PPOLoop(self.cfg.training, self.accelerator, m.actor_critic, m.reference, m.reward, self.tokenizer,
                       prompts, eval_prompts, Path(tempfile.mkdtemp(prefix=prefix)))


def build_ours(folder: Path, args, *, value: str | None = "model", lora: dict | None = None, world: int = 1,
               accelerator=None) -> Ours:
    """Our side's models, built by the PPO stage's own `rlhf_dist.rl.models.build_ppo` from a `PPOStageConfig`:
    policy and reference from folder/policy, the frozen reward model from folder/reward, fp32 weights, dropout off,
    and the value function `value`: "model" a separate value model started from the reward model (value_model =
    folder/reward), "head" a value head on the policy's own pass (value_head), "adapter" with `lora` its own
    adapter + a value head on the policy's base (value_adapter), None none (args.advantage_estimator rloo / grpo).
    With `lora` ({r, alpha, dropout, target_modules}) the policy is a LoRA adapter on the base and the reference
    that base with the adapters off. `args`: the loop's `PPOTrainingConfig` (`ours_training`).
    The accelerator: `accelerator`, else one for `world` processes (`rl.distributed.make_accelerator`).
    Checks that the models have the layout asked for.
    """
    from rlhf_dist.config.ppo import PPOStageConfig
    from rlhf_dist.config.sections import LoraSection, ModelSection
    from rlhf_dist.models import load_tokenizer
    from rlhf_dist.rl.adapters import VALUE
    from rlhf_dist.rl.distributed import make_accelerator
    from rlhf_dist.rl.models import build_ppo

    if (value == "adapter") != (lora is not None):
        raise ValueError(f"value={value!r} with lora={lora}: a value adapter goes with LoRA, and LoRA with it")
    section = LoraSection()
    if lora is not None:
        section = LoraSection(enabled=True, r=lora["r"], alpha=lora["alpha"], dropout=lora["dropout"],
                              target_modules=lora["target_modules"])
    cfg = PPOStageConfig(model=ModelSection(dtype="float32"), lora=section, init_from=str(folder / "policy"),
                         reward_model=str(folder / "reward"),
                         value_model=str(folder / "reward") if value == "model" else None,
                         value_head=value == "head", value_adapter=True if value == "adapter" else None, training=args)
    tokenizer = load_tokenizer(cfg.init_from, cfg.model)
    if accelerator is None:
        accelerator = make_accelerator(args, world, load_prompts(folder)["config"]["hidden_size"])
    models = build_ppo(cfg, tokenizer, accelerator)
    ac, reward = models.actor_critic, models.reward
    layout = {"model": ac.value_model is not None, "head": ac.values_need_policy_pass,
              "adapter": ac.value_adapter == VALUE, None: not ac.has_value}[value]
    if not layout or (models.reference is None) != (lora is not None) or reward.model is None or reward.tokenizer is not None:
        raise SystemExit(f"ours: not the layout asked for (value {value}, lora {lora is not None}): value model "
                         f"{type(ac.value_model).__name__}, value head {ac.value_head is not None}, value adapter "
                         f"{ac.value_adapter}, reference {type(models.reference).__name__}, reward "
                         f"{type(reward.model).__name__} (own tokenizer: {reward.tokenizer is not None})")
    return Ours(tokenizer, accelerator, models, cfg)


def wrap_ours_phases(timer: PhaseTimer, loop, value: str | None, optimizer_step: bool = False) -> None:
    """Time our loop's own calls per phase (measurement only), where the loop looks them up: sampling
    (`rl.sampler.decode`, or `rl.sampler.generate`), the reference's log-probabilities (`rl.sampler.forward_logprobs`;
    with LoRA the base with the adapters off), the reward model (`rl.scoring.sequence_scores`, which `score_responses` calls), the
    actor-critic's forward (the policy, and a value head on its pass) and, for a value function with a pass of its
    own, its `values` (in the rollout, and in the update where the backward is split), the backward, and the
    optimizer: `PPOLoop.optimizer_update` (clipping, step, zero_grad), or with `optimizer_step` the clipping
    (grad_clip) and the optimizer's step apart."""
    import torch

    from rlhf_dist.rl import sampler, scoring

    timer.wrap(sampler, "generate", "generate")  # transformers' generate (training.decoding: generate)
    timer.wrap(sampler, "decode", "generate")  # our decode loop (training.decoding: compact, the default)
    timer.wrap(sampler, "forward_logprobs", "reference_forward")
    timer.wrap(scoring, "sequence_scores", "reward_forward")
    actor_critic = loop.unwrapped
    rollout_forward = "policy_forward" if value is None else "policy_value_forward"
    timer.wrap(actor_critic, "forward", lambda _: "update_forward" if torch.is_grad_enabled() else rollout_forward)
    if value in ("model", "adapter"):
        timer.wrap(actor_critic, "values", lambda _: "update_forward" if torch.is_grad_enabled() else "value_forward")
    timer.wrap(loop.accelerator, "backward", "update_backward")
    if optimizer_step:
        timer.wrap(loop.accelerator, "clip_grad_norm_", "grad_clip")
        timer.wrap(loop.optimizer, "step", "optimizer_step")
    else:
        timer.wrap(loop, "optimizer_update", "optimizer_step")


def run_ours(folder: Path, iterations: int, training: dict, *, value: str | None, lora: dict | None = None,
             prefix: str = "bench_ours_", timer: PhaseTimer | None = None, optimizer_step: bool = False,
             packages: tuple[str, ...] = OURS_PACKAGES, setup=None, check=None, fields=None, end=None) -> None:
    """Our side of a comparison, in its child process: start-up, the models (`build_ours`), a `PPOLoop` driven
    directly, one ``train_step`` per iteration with every phase timed (`wrap_ours_phases`), one ``iteration`` line
    each, checked for equal work (rollouts x exactly max_new_tokens, no stop token), and the ``end`` line.

    `training`: the `PPOTrainingConfig` fields (`ours_training`; ``seed`` also seeds torch first). Hooks:
    ``setup(ours, loop)`` before the timers go on; ``check(batch)`` -> a problem (str) or None; ``fields(metrics,
    batch)`` and ``end(loop)`` -> more fields for each iteration line and for the end line.
    """
    import torch

    import_ours(lora=lora is not None)
    info = start_child(folder)
    torch.manual_seed(training["seed"])
    args = ours_training(iterations, **training)
    ours = build_ours(folder, args, value=value, lora=lora)
    rollouts, new_tokens = args.rollout_batch_size * args.samples_per_prompt, args.max_new_tokens
    loop = ours.loop(info["prompts"], info["prompts"][:rollouts], prefix)
    if loop.stop_ids:
        raise SystemExit(f"ours: stop ids {loop.stop_ids} would end responses early; expected none (ignore_eos)")
    if setup is not None:
        setup(ours, loop)
    timer = timer or PhaseTimer()  # measurement only: wrappers around the loop's own calls
    wrap_ours_phases(timer, loop, value, optimizer_step)
    for step in range(1, iterations + 1):
        t0 = time.perf_counter()
        metrics, batch = loop.train_step(step)
        seconds = time.perf_counter() - t0
        lengths = batch.response_mask.sum(1)
        problem = check(batch) if check is not None else None
        if (batch.response_ids.shape[1] != new_tokens or int(lengths.min()) != new_tokens or len(batch) != rollouts
                or problem):
            raise SystemExit(f"ours: unequal work: {len(batch)} rollouts, lengths {lengths.tolist()}"
                             + (f"; {problem}" if problem else ""))
        emit("iteration", step=step, seconds=seconds, rollout_s=metrics["time/rollout"], update_s=metrics["time/update"],
             phases=timer.take(), rollouts=len(batch), min_tokens=int(lengths.min()), max_tokens=int(lengths.max()),
             ratio_first=metrics.get("policy/ratio_first_minibatch"), **(fields(metrics, batch) if fields else {}))
    emit_end(packages, **{"optimizer": describe_optimizer(loop.optimizer), **(end(loop) if end else {})})


# ---------------------------------------------------------------------------------------------
# The parent: interleaved runs, medians, JSON, table
# ---------------------------------------------------------------------------------------------

def run_side(cmd: list[str], env: dict[str, str], timeout: float) -> dict:
    """Run one side in a subprocess; returns its BENCH lines grouped by kind (raises with its stderr tail)."""
    full_env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "MKL_NUM_THREADS": str(THREADS),
                "TOKENIZERS_PARALLELISM": "false", "TRL_EXPERIMENTAL_SILENCE": "1", "PYTHONHASHSEED": "0", **env}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    out: dict = {"iterations": [], "process_wall_s": wall}
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH "):
            row = json.loads(line[6:])
            kind = row.pop("kind")
            if kind == "iteration":
                out["iterations"].append(row)
            else:
                out[kind] = row
    return out


def summarise(iterations: list[dict], warmup: int, samples: int, tokens: int) -> dict:
    """Medians of the iterations after `warmup`: seconds, samples/s, tokens/s, rollout/update split."""
    kept = iterations[warmup:]
    if len(kept) < 1:
        raise ValueError("no iteration after the warm-up")
    med = {key: statistics.median(row[key] for row in kept) for key in ("seconds", "rollout_s", "update_s")}
    other = statistics.median(row["seconds"] - row["rollout_s"] - row["update_s"] for row in kept)
    return {"iterations_kept": len(kept), "seconds": med["seconds"], "rollout_s": med["rollout_s"],
            "update_s": med["update_s"], "other_s": other,
            "samples_per_s": samples / med["seconds"], "tokens_per_s": tokens / med["seconds"],
            "rollout_share": med["rollout_s"] / med["seconds"],
            "phases_s": {key: statistics.median(row.get("phases", {}).get(key, 0.0) for row in kept)
                         for key in sorted({k for row in kept for k in row.get("phases", {})})}}


def run_interleaved(sides: dict[str, tuple[list[str], dict[str, str]]], runs: int, warmup: int, samples: int,
                    tokens: int, timeout: float = 1800) -> dict:
    """Run the sides A B A B ... `runs` times; per run and side the summary of its iterations."""
    per_side: dict[str, list[dict]] = {name: [] for name in sides}
    for r in range(runs):
        for name, (cmd, env) in sides.items():
            print(f"run {r + 1}/{runs}: {name} ...", flush=True)
            raw = run_side(cmd, env, timeout)
            summary = summarise(raw["iterations"], warmup, samples, tokens)
            per_side[name].append({"run": r + 1, **summary, "raw": raw})
            print(f"  {summary['seconds']:.3f} s/iter  ({summary['samples_per_s']:.2f} samples/s, "
                  f"rollout {summary['rollout_s']:.3f} s, update {summary['update_s']:.3f} s)", flush=True)
    return per_side


def aggregate(per_side: dict[str, list[dict]], ours: str, peer: str, flops: dict[str, float] | None = None) -> dict:
    """Median over runs of each side's figures, and the ratio ours/peer taken within each run.

    With `flops` (`phase_flops`): each side's utilisation of its matmul rate per phase (`utilisation`)."""
    keys = ("seconds", "rollout_s", "update_s", "other_s", "samples_per_s", "tokens_per_s")
    out = {}
    for name, rows in per_side.items():
        out[name] = {k: statistics.median(r[k] for r in rows) for k in keys}
        out[name]["peak_rss_mib"] = statistics.median(r["raw"]["end"]["peak_rss_mib"] for r in rows)
        out[name]["import_rss_mib"] = statistics.median(r["raw"]["start"]["import_rss_mib"] for r in rows)
        out[name]["matmul_gflops"] = statistics.median(r["raw"]["start"]["matmul_gflops"] for r in rows)
        phase_keys = sorted({k for r in rows for k in r["phases_s"]})
        out[name]["phases_s"] = {k: statistics.median(r["phases_s"].get(k, 0.0) for r in rows) for k in phase_keys}
    ratios = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(per_side[ours], per_side[peer])]
    out["ratio_samples_per_s_ours_over_peer"] = {"per_run": ratios, "median": statistics.median(ratios)}
    # Diagnostic only, not the comparison: the ratio if the peer's full garbage collections took no time.
    no_gc = [r * (b["seconds"] - b["phases_s"].get("gc_collect", 0.0)) / b["seconds"]
             for r, b in zip(ratios, per_side[peer])]
    out["diagnostic_ratio_without_peer_gc_collect"] = {"per_run": no_gc, "median": statistics.median(no_gc)}
    if flops is not None:
        out["flops_per_iteration"] = flops
        for name in per_side:
            out[name]["utilisation"] = utilisation(out[name], flops)
    mem = [a["raw"]["end"]["peak_rss_mib"] / b["raw"]["end"]["peak_rss_mib"] for a, b in zip(per_side[ours], per_side[peer])]
    out["ratio_peak_rss_ours_over_peer"] = {"per_run": mem, "median": statistics.median(mem)}
    return out


def write_result(name: str, payload: dict) -> Path:
    """benchmarks/results/<name>.json, written to a temporary file and renamed (never half-written)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def print_table(summary: dict, ours: str, peer: str) -> None:
    rows = [("s / iteration", "seconds", "{:.3f}"), ("samples / s", "samples_per_s", "{:.2f}"),
            ("tokens / s", "tokens_per_s", "{:.1f}"), ("rollout s", "rollout_s", "{:.3f}"),
            ("update s", "update_s", "{:.3f}"), ("other s", "other_s", "{:.3f}"),
            ("peak RSS MiB", "peak_rss_mib", "{:.0f}"), ("import-only RSS MiB", "import_rss_mib", "{:.0f}"),
            ("matmul GFLOP/s", "matmul_gflops", "{:.0f}")]
    print(f"\n{'':22}{ours:>14}{peer:>14}")
    for label, key, fmt in rows:
        print(f"{label:22}{fmt.format(summary[ours][key]):>14}{fmt.format(summary[peer][key]):>14}")
    for name in (ours, peer):
        phases = summary[name].get("phases_s", {})
        if phases:
            print(f"{name} phases (s/iteration): " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    for name in (ours, peer):
        used = summary[name].get("utilisation")
        if used:
            print(f"{name} share of its matmul rate: " + ", ".join(f"{k} {v:.0%}" for k, v in used.items()))
    r = summary["ratio_samples_per_s_ours_over_peer"]
    m = summary["ratio_peak_rss_ours_over_peer"]
    print(f"\nsamples/s ours/peer: median {r['median']:.2f}  (per run: {', '.join(f'{x:.2f}' for x in r['per_run'])})")
    d = summary["diagnostic_ratio_without_peer_gc_collect"]
    print(f"(diagnostic) samples/s ours/peer if the peer's gc.collect() cost nothing: median {d['median']:.2f}")
    print(f"peak RSS ours/peer:  median {m['median']:.2f}  (per run: {', '.join(f'{x:.2f}' for x in m['per_run'])})")


# ---------------------------------------------------------------------------------------------
# The parent of a script: options, the comparison, the JSON
# ---------------------------------------------------------------------------------------------

def parser(doc: str, *, per: str = "process", sides: bool = True, side: str = "side") -> argparse.ArgumentParser:
    """The options every benchmark takes: --model, --runs, --iterations (checked by `parse`); the children get
    --folder, and a comparison's --side."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="tiny", help="Model shape (every side loads the same).")
    p.add_argument("--runs", type=int, default=3, help=f"Interleaved runs (one {per} per {side} per run).")
    p.add_argument("--iterations", type=int, default=6, help=f"Iterations per {per}; the first is the warm-up.")
    if sides:
        p.add_argument("--side", choices=["ours", "peer"], help=argparse.SUPPRESS)  # a child process
    p.add_argument("--folder", help=argparse.SUPPRESS)
    return p


def parse(p: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.iterations < 6:
        p.error("--iterations must be >= 6 (1 warm-up + at least 5 measured)")
    return args


def comparison_args(doc: str, argv: list[str] | None, run_ours, run_peer,
                    peer: tuple[Path, str, str]) -> argparse.Namespace | None:
    """A comparison's options. In a child (--side ours / peer) run that side, ``run_*(folder, iterations)``, and
    return None; in the parent stop with the install command where the peer's TRL is not in its folder
    (`peer`: the folder, benchmarks/.peers/<peer>, TRL's version, the command), else return the options."""
    p = parser(doc)
    args = parse(p, argv)
    if args.side:
        (run_ours if args.side == "ours" else run_peer)(Path(args.folder), args.iterations)
        return None
    folder, version, install = peer
    if not (folder / "trl" / "__init__.py").is_file():
        p.error(f"TRL {version} is not installed in {folder}; run: {install}")
    return args


def utc_now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@dataclass
class Comparison:
    """One benchmark's runs: the models' folder and prompts (`load_prompts`), when and where it ran, every run of
    every side (`run_interleaved`) and their summary."""

    folder: Path
    info: dict
    started: str
    machine: dict
    per_side: dict[str, list[dict]]
    summary: dict


def compare(args: argparse.Namespace, script: str, peer: str, *, value: str | None, lora: bool = False,
            peer_args: tuple[str, ...] = (), peer_env: dict[str, str] | None = None, rollouts: int = 16,
            new_tokens: int = 32) -> Comparison:
    """The parent of a comparison: the shared models (`prepare_models`), `args.runs` A B runs of the script's
    children (``--side ours`` in our venv, ``--side peer`` plus `peer_args` with `peer_env`), and the summary
    (`aggregate`, the utilisation from `phase_flops` of `value` and `lora`); `rollouts` x `new_tokens` an iteration."""
    folder = prepare_models(args.model)
    info = load_prompts(folder)
    child = [python(), str(Path(script).resolve()), "--iterations", str(args.iterations), "--folder", str(folder)]
    sides = {"ours": (child + ["--side", "ours"], {}), peer: (child + ["--side", "peer", *peer_args], peer_env or {})}
    machine = machine_info()
    started = utc_now()
    per_side = run_interleaved(sides, args.runs, warmup=1, samples=rollouts, tokens=rollouts * new_tokens)
    flops = phase_flops(MODELS[args.model], rollouts, info["prompt_length"], new_tokens, value=value, lora=lora)
    return Comparison(folder, info, started, machine, per_side, aggregate(per_side, "ours", peer, flops))


def result(benchmark: str, args: argparse.Namespace, run: Comparison, settings: dict, *, versions: dict | None = None,
           models: dict | None = None, **extra) -> dict:
    """A benchmark's JSON: what ran (benchmark, model, settings, runs, iterations), when, where (machine; the
    versions each side imported, unless `versions`), on what (the models' shape and prompts, plus `models`), then
    `extra` (e.g. not_equal), the summary and every run."""
    described = ("policy_parameters", "tokenizer_length", "prompt_length", "distinct_prompts")
    return {"benchmark": benchmark, "model": args.model, "started_utc": run.started, "finished_utc": utc_now(),
            "machine": run.machine,
            "versions": versions or {name: rows[0]["raw"]["end"]["versions"] for name, rows in run.per_side.items()},
            "models": {"shape": MODELS[args.model], **{k: run.info[k] for k in described}, **(models or {})},
            "settings": settings, "runs": args.runs, "iterations": args.iterations, "warmup_iterations": 1,
            **extra, "summary": run.summary, "per_run": run.per_side}


def python() -> str:
    return sys.executable
