"""`rlhf-dist plan`: will a stage fit in GPU memory, and with which strategy? Reads the model's config only.

    rlhf-dist plan --model meta-llama/Llama-2-7b-hf --stage sft --gpus-per-node 1 --nodes 1 --gpu-memory 24
    rlhf-dist plan --model ./my_model --stage ppo --gpus-per-node 8 --nodes 2 --gpu-memory 80 --json plan.json

For every option (full / LoRA / QLoRA) x (ddp / zero2 / zero3 / zero2_offload / zero3_offload) it estimates the
peak memory per GPU of all the stage's models, prints a table, marks what fits in --gpu-memory less a 10% headroom,
recommends the simplest option that fits and prints the matching `rlhf-dist launch` command. No weights are read.

What is counted (weights, gradients, optimizer states, activations, KV cache, ZeRO sharding, LoRA/QLoRA), the
assumptions, and the tests that check them: docs/memory_model.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rlhf_dist.errors import UserError

GIB = 2**30
HEADROOM = 0.10
STAGES = ("pretrain", "sft", "reward", "dpo", "ppo")
STRATEGIES = ("ddp", "zero2", "zero3", "zero2_offload", "zero3_offload")
METHODS = ("full", "lora", "qlora")
QLORA_STRATEGIES = ("ddp", "zero2")
# bytes per parameter
W16 = 2  # 16-bit weights
GRAD = 2 + 4  # 16-bit gradient + fp32 gradient for the optimizer step
OPTIM = 12  # fp32 master + Adam m + v


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of trainable and frozen weights, and per stored activation element."""

    weights: int  # the weights the forward uses (also a frozen model's)
    grads: int
    optimizer: int
    cpu_offload2: int  # what ZeRO-2 offload keeps on the CPU per trainable parameter
    cpu_offload3: int  # what ZeRO-3 offload (params and optimizer) keeps on the CPU per trainable parameter
    activation: int  # bytes per stored activation element


PRECISIONS = {
    # the GPU convention, as DeepSpeed's estimators: 16-bit weights and gradients, fp32 gradients, master and Adam
    "bf16-mixed": Precision(W16, GRAD, OPTIM, 4 + OPTIM, W16 + 4 + OPTIM, 2),
    # CPU runs (no mixed precision): the fp32 weights are their own master copy; Adam m + v
    "fp32": Precision(4, 4, 8, 4 + 4 + 8, 4 + 4 + 8, 4),
}
NF4 = 0.5
DOUBLE_QUANT_BITS = 0.127
PLAIN_QUANT_BITS = 32 / 64
LOGIT_COPIES = 2  # fp32 [s, b, vocab] tensors alive at the peak of a causal LM's own loss: logits, log-softmax
# TRL >= 1.16 (SFT, DPO) computes log-probabilities through a fused LM head: no [s, b, vocab] logits, but one
# [min(tokens, 4096), 32768] tile in the compute dtype (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE, TOKEN_CHUNK_SIZE)
CHUNKED_TILE = (4096, 32768)
PLAIN_MLP = ("gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "phi")  # else gated (Llama-like)


# ------------------------------------------------------------------------------------------ measured peak (CPU)
class AllocatorPeak:
    """Peak bytes held by the torch CPU allocator between `start()` and `stop()` (what the planner is checked against).

    The running sum of torch.profiler's `[memory]` events (+bytes per allocation, -bytes per free) from the start;
    its maximum is the peak. Tensors that already existed at the start do not count (their frees lower the sum, so
    run it in a fresh process, or at least after the previous run's objects are gone: `start` collects garbage).
    Process RSS would drown a tiny model in the ~500 MB of Python and torch themselves.
    """

    def __init__(self) -> None:
        self.peak = 0
        self._profiler = None

    def start(self) -> None:
        import gc

        from torch.profiler import ProfilerActivity, profile

        gc.collect()  # a previous run's garbage, freed during this one, would lower the sum
        self._profiler = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profiler.start()

    def stop(self) -> None:
        if self._profiler is None:  # already stopped
            return
        prof, self._profiler = self._profiler, None
        prof.stop()
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]" and e.device_type().name == "CPU")
        held = peak = 0
        for _, nbytes in events:
            held += nbytes
            peak = max(peak, held)
        self.peak = peak


# ----------------------------------------------------------------------------------------------- model shapes
def load_config(model: str):
    """The model's config (no weights): a local directory, a config.json file, or a hub id."""
    from transformers import AutoConfig

    path = Path(model).expanduser()
    try:
        if path.is_file():
            return AutoConfig.from_pretrained(str(path))
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise UserError(f"--model: {path} has no config.json; give a model directory, its config.json or a hub id")
            return AutoConfig.from_pretrained(str(path))
        if model.startswith((".", "/", "~")) or model.endswith(".json") or model.count("/") > 1:
            raise UserError(f"--model: {model} does not exist; give a model directory, its config.json or a hub id")
        return AutoConfig.from_pretrained(model)
    except UserError:
        raise
    except Exception as exc:  # hub errors, unknown model_type, bad json: one line with the cause
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--model: cannot read a config from '{model}' ({first}); give a model directory, "
                        "its config.json or a hub id (offline: a local path)") from None


def analytic_param_count(cfg) -> int:
    """Parameters of AutoModelForCausalLM.from_config(cfg) in closed form, for Llama/Mistral/Qwen2/Qwen3/GPT-2."""
    kind = cfg.model_type
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    if kind == "gpt2":
        h, v, layers = cfg.n_embd, cfg.vocab_size, cfg.n_layer
        inner = cfg.n_inner or 4 * h
        per_layer = 2 * h + (h * 3 * h + 3 * h) + (h * h + h) + 2 * h + (h * inner + inner) + (inner * h + h)
        return v * h + cfg.n_positions * h + layers * per_layer + 2 * h + (0 if tied else v * h)
    if kind in ("llama", "mistral", "qwen2", "qwen3"):
        h, v, layers, inter = cfg.hidden_size, cfg.vocab_size, cfg.num_hidden_layers, cfg.intermediate_size
        heads = cfg.num_attention_heads
        kv = getattr(cfg, "num_key_value_heads", None) or heads
        hd = getattr(cfg, "head_dim", None) or h // heads
        q, k = heads * hd, kv * hd
        attn = h * q + 2 * h * k + q * h
        if kind == "qwen2":
            attn += q + 2 * k  # q/k/v biases, no o bias
        elif getattr(cfg, "attention_bias", False):
            attn += q + 2 * k + h
        if kind == "qwen3":
            attn += 2 * hd  # q_norm, k_norm
        mlp = 3 * h * inter + ((2 * inter + h) if getattr(cfg, "mlp_bias", False) else 0)
        return v * h + layers * (attn + mlp + 2 * h) + h + (0 if tied else v * h)
    raise ValueError(f"no closed form for model_type {kind!r}; use the meta-device count")


@dataclass
class Shape:
    """What the estimate needs from one model, read off a meta-device instance of it."""

    role: str
    model_type: str
    classifier: bool
    params: int  # all parameters (shared ones once)
    largest_layer: int  # largest module's own parameters (DeepSpeed's largest_layer_params)
    quantizable: int  # linear weights bitsandbytes turns into 4 bit (every nn.Linear but the output head)
    lora_params: dict = field(default_factory=dict)  # r -> adapter parameters ('all-linear')
    hidden: int = 0
    layers: int = 0
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    intermediate: int = 0
    gated: bool = True
    vocab: int = 0


def _text_config(cfg):
    get = getattr(cfg, "get_text_config", None)
    return get() if get else cfg


def model_shape(cfg, role: str, classifier: bool, lora_r: int) -> Shape:
    """Build the model on the meta device (no memory, no weights) and read its parameter counts."""
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    try:
        with torch.device("meta"):
            if classifier:  # one output, the score (as load_reward_model builds it)
                cfg = copy.deepcopy(cfg)
                cfg.num_labels = 1
            model = auto.from_config(cfg)
    except (ValueError, KeyError) as exc:
        what = "sequence-classification" if classifier else "causal-LM"
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"--model: {type(cfg).__name__} ({cfg.model_type}) is not a {what} config the planner can "
                        f"build ({first[:160]}); give a decoder-only causal LM (Llama, Qwen2, Mistral, GPT-2, ...)") from None
    seen: dict[int, int] = {}
    for p in model.parameters():
        seen[id(p)] = p.numel()
    total = sum(seen.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    head_names = {"lm_head", "score", "classifier"}
    quantizable, lora_in_out = 0, 0
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.split(".")[-1] not in head_names:
            quantizable += m.weight.numel()
            lora_in_out += m.in_features + m.out_features
        elif type(m).__name__ == "Conv1D" and name.split(".")[-1] not in head_names:  # GPT-2's linears
            quantizable += m.weight.numel()
            lora_in_out += sum(m.weight.shape)
    score = sum(p.numel() for n, p in model.named_parameters() if n.split(".")[0] in ("score", "classifier"))
    t = _text_config(cfg)
    hidden = getattr(t, "hidden_size", None) or getattr(t, "n_embd")
    heads = getattr(t, "num_attention_heads", None) or getattr(t, "n_head")
    inter = getattr(t, "intermediate_size", None) or getattr(t, "n_inner", None) or 4 * hidden
    gated = t.model_type not in PLAIN_MLP
    return Shape(
        role=role, model_type=t.model_type, classifier=classifier, params=total, largest_layer=largest,
        quantizable=quantizable, lora_params={lora_r: lora_r * lora_in_out + score}, hidden=hidden,
        layers=getattr(t, "num_hidden_layers", None) or getattr(t, "n_layer"), heads=heads,
        kv_heads=getattr(t, "num_key_value_heads", None) or heads,
        head_dim=getattr(t, "head_dim", None) or hidden // heads, intermediate=inter, gated=gated,
        vocab=t.vocab_size,
    )


# ---------------------------------------------------------------------------------------------- the estimate
def activation_bytes(shape: Shape, seq: int, batch: int, checkpointing: bool, eager: bool, logits: str = "loss",
                     precision: str = "bf16-mixed") -> int:
    """Korthikanti et al. 2022 per layer (see the module docstring), plus the logits of a causal LM.

    logits: "loss" (the model's own loss: LOGIT_COPIES fp32 [s, b, vocab] tensors), "chunked" (TRL's fused LM head:
    one CHUNKED_TILE in the activation dtype) or "none"."""
    s, b, h = seq, batch, shape.hidden
    k = 8 if shape.gated else 4
    layer = s * b * (18 * h + k * shape.intermediate) + (5 * shape.heads * s * s * b if eager else 0)
    body = shape.layers * 2 * s * b * h + layer if checkpointing else shape.layers * layer
    body = body * PRECISIONS[precision].activation // 2  # the formula counts 16-bit activations
    if shape.classifier or logits == "none":
        head = 0
    elif logits == "chunked":
        head = min(s * b, CHUNKED_TILE[0]) * CHUNKED_TILE[1] * PRECISIONS[precision].activation
    else:
        head = LOGIT_COPIES * s * b * shape.vocab * 4
    return body + head


def kv_cache_bytes(shape: Shape, seq: int, batch: int, precision: str = "bf16-mixed") -> int:
    return 2 * shape.layers * shape.kv_heads * shape.head_dim * seq * batch * PRECISIONS[precision].activation


@dataclass
class States:
    weights: float = 0.0
    grads: float = 0.0
    optimizer: float = 0.0
    cpu_per_node: float = 0.0

    def add(self, other: States) -> None:
        self.weights += other.weights
        self.grads += other.grads
        self.optimizer += other.optimizer
        self.cpu_per_node += other.cpu_per_node


def trainable_states(p: float, largest: int, strategy: str, gpus: int, nodes: int,
                     precision: str = "bf16-mixed") -> States:
    """Model states of P trainable parameters (bytes), placed per strategy; bf16-mixed: 2 weights + 6 gradients +
    12 optimizer; fp32: 4 + 4 + 8."""
    x = PRECISIONS[precision]
    w, g, o = x.weights, x.grads, x.optimizer
    if strategy == "ddp":
        return States(w * p, g * p, o * p)
    if strategy == "zero2":
        return States(w * p, g * p / gpus, o * p / gpus)
    if strategy == "zero3":
        return States(w * p / gpus + w * largest, g * p / gpus + w * largest, o * p / gpus)
    if strategy == "zero2_offload":
        return States(w * p, 0, 0, cpu_per_node=x.cpu_offload2 * p / nodes)
    if strategy == "zero3_offload":
        return States(w * largest, w * largest, 0, cpu_per_node=x.cpu_offload3 * p / nodes)
    raise ValueError(strategy)


def frozen_states(weight_bytes: float, largest: int, strategy: str, gpus: int, nodes: int,
                  precision: str = "bf16-mixed") -> States:
    """Frozen weights (bytes in all): replicated, partitioned under ZeRO-3, on the CPU under ZeRO-3 offload."""
    w = PRECISIONS[precision].weights
    if strategy == "zero3":
        return States(weight_bytes / gpus + w * largest)
    if strategy == "zero3_offload":
        return States(w * largest, cpu_per_node=weight_bytes / nodes)
    return States(weight_bytes)


def qlora_base_bytes(shape: Shape, double_quant: bool = True) -> float:
    """NF4 linear weights + quantisation constants + the unquantised rest in fp32 (prepare_model_for_kbit_training)."""
    per = NF4 + (DOUBLE_QUANT_BITS if double_quant else PLAIN_QUANT_BITS) / 8
    return shape.quantizable * per + (shape.params - shape.quantizable) * 4


@dataclass
class Role:
    shape: Shape
    trainable: bool
    activations: bool  # trained with a backward pass
    batch_factor: int = 1  # 2 for chosen+rejected pairs
    kv_cache: bool = False  # generates (ppo policy)
    replicated: bool = False  # held whole by every process whatever the strategy (ppo's frozen models, see below)
    logits: str = "loss"  # how the causal LM's logits are computed: loss, chunked (TRL's fused LM head), none
    own_base: bool = True  # False: an adapter on another role's base (ppo's LoRA value function): no weights of its own
    extra_trainable: int = 0  # trainable parameters beside the adapters (ppo's LoRA value head: hidden + 1)


def stage_roles(stage: str, policy: Shape, classifier: Shape | None, method: str) -> list[Role]:
    lora = method != "full"
    if stage == "pretrain":
        return [Role(policy, True, True)]
    if stage == "sft":
        return [Role(policy, True, True, logits="chunked")]
    if stage == "dpo":
        roles = [Role(policy, True, True, batch_factor=2, logits="chunked")]
        if not lora:
            roles.append(Role(policy, False, False))  # the reference, a second copy of the policy
        return roles
    if stage == "reward":
        return [Role(classifier, True, True, batch_factor=2)]
    if stage == "ppo":
        # The PPO stage loads its frozen reference and reward model whole on every process, also under ZeRO-3
        # (rlhf_dist.rl.distributed.replicated_loading: they never pass through DeepSpeed), so they are not partitioned.
        reward = Role(Shape(**{**asdict(classifier), "role": "reward"}), False, False, replicated=True)
        if not lora:
            value = Shape(**{**asdict(classifier), "role": "value"})
            return [Role(policy, True, True, kv_cache=True), Role(policy, False, False, replicated=True), reward,
                    Role(value, True, True)]
        # LoRA/QLoRA: one base. The policy is an adapter on it, the reference the base with adapters disabled, the
        # value function a second adapter on the same base plus a linear head on its last hidden state: a second
        # forward pass through the base (its activations, without the vocabulary logits).
        value = Shape(**{**asdict(policy), "role": "value", "classifier": True})
        return [Role(policy, True, True, kv_cache=True), reward,
                Role(value, True, True, own_base=False, extra_trainable=policy.hidden + 1)]
    raise UserError(f"--stage: unknown stage '{stage}'; choose from {', '.join(STAGES)}")


def estimate(stage: str, policy: Shape, classifier: Shape | None, method: str, strategy: str, *, gpus_per_node: int,
             nodes: int, seq: int, batch: int, checkpointing: bool, lora_r: int, eager: bool = False,
             double_quant: bool = True, precision: str = "bf16-mixed", generation_batch: int | None = None) -> dict:
    """Per-GPU bytes (and CPU bytes per node) of one option for all the stage's models.

    `generation_batch`: sequences generated at once (ppo's KV cache; default `batch`)."""
    gpus = gpus_per_node * nodes
    x = PRECISIONS[precision]
    total = States()
    act = {True: 0, False: 0}
    kv = 0
    for role in stage_roles(stage, policy, classifier, method):
        sh = role.shape
        frozen_strategy = "ddp" if role.replicated else strategy
        if method == "full":
            if role.trainable:
                total.add(trainable_states(sh.params, sh.largest_layer, strategy, gpus, nodes, precision))
            else:
                total.add(frozen_states(x.weights * sh.params, sh.largest_layer, frozen_strategy, gpus, nodes, precision))
        else:
            if role.own_base:
                base = x.weights * sh.params if method == "lora" else qlora_base_bytes(sh, double_quant)
                total.add(frozen_states(base, sh.largest_layer, frozen_strategy, gpus, nodes, precision))
            if role.trainable:
                adapters = sh.lora_params[lora_r] + role.extra_trainable
                total.add(trainable_states(adapters, 0, strategy, gpus, nodes, precision))
        if role.activations:
            for ck in (True, False):
                act[ck] += activation_bytes(sh, seq, batch * role.batch_factor, ck, eager, role.logits, precision)
        if role.kv_cache:
            kv += kv_cache_bytes(sh, seq, generation_batch or batch, precision)
    activations = act[checkpointing]
    per_gpu = total.weights + total.grads + total.optimizer + max(activations, kv)
    return {"weights": total.weights, "grads": total.grads, "optimizer": total.optimizer,
            "activations": activations, "activations_checkpointing": act[True], "activations_no_checkpointing": act[False],
            "kv_cache": kv, "total": per_gpu, "cpu_per_node": total.cpu_per_node}


def options() -> list[tuple[str, str]]:
    """All (method, strategy) pairs in recommendation order (see the module docstring)."""
    return [(m, s) for m in METHODS for s in STRATEGIES if m != "qlora" or s in QLORA_STRATEGIES]


def plan(stage: str, policy: Shape, classifier: Shape | None, *, gpus_per_node: int, nodes: int, gpu_memory_gib: float,
         cpu_memory_gib: float | None = None, seq: int = 2048, batch: int = 1, checkpointing: bool = True,
         lora_r: int = 16, eager: bool = False, double_quant: bool = True, headroom: float = HEADROOM,
         precision: str = "bf16-mixed", generation_batch: int | None = None) -> dict:
    usable = gpu_memory_gib * (1 - headroom) * GIB
    cpu_usable = None if cpu_memory_gib is None else cpu_memory_gib * (1 - headroom) * GIB
    rows = []
    for method, strategy in options():
        est = estimate(stage, policy, classifier, method, strategy, gpus_per_node=gpus_per_node, nodes=nodes, seq=seq,
                       batch=batch, checkpointing=checkpointing, lora_r=lora_r, eager=eager, double_quant=double_quant,
                       precision=precision, generation_batch=generation_batch)
        fits_gpu = est["total"] <= usable
        # an offload option fits only when --cpu-memory says the node can hold its CPU share
        fits_cpu = est["cpu_per_node"] == 0 or (cpu_usable is not None and est["cpu_per_node"] <= cpu_usable)
        rows.append({"method": method, "strategy": strategy, "fits": fits_gpu and fits_cpu, "fits_gpu": fits_gpu,
                     "fits_cpu": fits_cpu, "cpu_checked": cpu_usable is not None,
                     **{k: v / GIB for k, v in est.items()}})
    recommended = next((r for r in rows if r["fits"]), None)
    return {"stage": stage, "gpus_per_node": gpus_per_node, "nodes": nodes, "gpu_memory_gib": gpu_memory_gib,
            "cpu_memory_gib": cpu_memory_gib, "headroom": headroom, "usable_gpu_gib": usable / GIB,
            "seq_len": seq, "micro_batch": batch, "gradient_checkpointing": checkpointing, "lora_r": lora_r,
            "attention": "eager" if eager else "sdpa", "double_quant": double_quant, "precision": precision,
            "models": [{"role": s.role, "model_type": s.model_type, "params": s.params, "largest_layer": s.largest_layer,
                        "lora_params": s.lora_params[lora_r]} for s in _distinct(stage, policy, classifier)],
            "units": "GiB (2**30 bytes) per GPU; cpu_per_node in GiB per node", "options": rows,
            "recommended": recommended}


def _distinct(stage: str, policy: Shape, classifier: Shape | None) -> list[Shape]:
    if stage == "reward":
        return [classifier]
    if stage == "ppo":
        return [policy, classifier]
    return [policy]


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
    cmd.append(f"{stage}.training.activation_checkpointing={'true' if result['gradient_checkpointing'] else 'false'}")
    cmd.append(f"{stage}.training.per_device_train_batch_size={result['micro_batch']}")
    return shlex.join(cmd).replace("RANK", "<RANK>").replace("MASTER_ADDR", "<MASTER_ADDR>")


def render(result: dict) -> str:
    lines = []
    models = ", ".join(f"{m['role']} {m['model_type']} {m['params'] / 1e9:.3g}B params" for m in result["models"])
    lines.append(f"rlhf-dist plan: {result['stage']} on {result['nodes']} node(s) x {result['gpus_per_node']} GPU(s) "
                 f"of {result['gpu_memory_gib']:g} GiB ({result['usable_gpu_gib']:.1f} GiB usable after "
                 f"{result['headroom']:.0%} headroom); {models}")
    lines.append(f"seq-len {result['seq_len']}, micro-batch {result['micro_batch']}, gradient checkpointing "
                 f"{'on' if result['gradient_checkpointing'] else 'off'}, attention {result['attention']}, LoRA r "
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


def write_json_atomic(path: Path, payload: dict) -> None:
    path = path.expanduser()
    if not path.parent.is_dir():
        raise UserError(f"--json: folder {path.parent} does not exist; create it or choose another path")
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(payload, fh, indent=2)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rlhf-dist plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="Model directory, its config.json, or a hub id (config only).")
    p.add_argument("--stage", required=True, help=f"One of {', '.join(STAGES)}.")
    p.add_argument("--reward-model", help="Config of the reward/value model (ppo; default --model).")
    p.add_argument("--gpus-per-node", type=int, default=1, help="GPUs (processes) per node.")
    p.add_argument("--nodes", type=int, default=1, help="Nodes.")
    p.add_argument("--gpu-memory", type=float, required=True, help="Memory of one GPU in GiB (24, 40, 80, ...).")
    p.add_argument("--cpu-memory", type=float, help="CPU memory per node in GiB; checks the offload options' CPU share.")
    p.add_argument("--seq-len", type=int, default=2048, help="Tokens per sequence (ppo: prompt + new tokens).")
    p.add_argument("--micro-batch", type=int, default=1, help="Sequences per forward/backward per GPU (pairs for dpo/reward).")
    p.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True,
                   help="Recompute activations in the backward pass (default: on).")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (default 16, 'all-linear' targets).")
    p.add_argument("--attention", choices=("sdpa", "eager"), default="sdpa",
                   help="eager also stores the s x s attention scores (Korthikanti's 5as/h term).")
    p.add_argument("--no-double-quant", action="store_true", help="QLoRA without double quantisation.")
    p.add_argument("--precision", choices=tuple(PRECISIONS), default="bf16-mixed",
                   help="bf16-mixed (GPUs: 16-bit weights, fp32 master and Adam; default) or fp32 (CPU runs).")
    p.add_argument("--recipe", default="RECIPE.yaml", help="Recipe to put in the printed launch command.")
    p.add_argument("--output", default="runs/OUT", help="Run directory to put in the printed launch command.")
    p.add_argument("--json", help="Also write the table as JSON to this file.")
    return p


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.stage not in STAGES:
        raise UserError(f"--stage: unknown stage '{args.stage}'; choose from {', '.join(STAGES)}")
    for flag, value in (("--gpus-per-node", args.gpus_per_node), ("--nodes", args.nodes), ("--seq-len", args.seq_len),
                        ("--micro-batch", args.micro_batch), ("--lora-r", args.lora_r)):
        if value < 1:
            raise UserError(f"{flag} must be >= 1, got {value}")
    for flag, value in (("--gpu-memory", args.gpu_memory), ("--cpu-memory", args.cpu_memory)):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UserError(f"{flag} must be a positive number of GiB, got {value}")
    cfg = load_config(args.model)
    policy = classifier = None
    if args.stage != "reward":
        policy = model_shape(cfg, "policy", False, args.lora_r)
    if args.stage in ("reward", "ppo"):
        rcfg = load_config(args.reward_model) if args.reward_model else cfg
        classifier = model_shape(rcfg, "reward", True, args.lora_r)
    result = plan(args.stage, policy, classifier, gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                  gpu_memory_gib=args.gpu_memory, cpu_memory_gib=args.cpu_memory, seq=args.seq_len,
                  batch=args.micro_batch, checkpointing=args.gradient_checkpointing, lora_r=args.lora_r,
                  eager=args.attention == "eager", double_quant=not args.no_double_quant, precision=args.precision)
    rec = result["recommended"]
    if rec is not None:
        rec["command"] = launch_command(result, rec, args.recipe, args.output)
    print(render(result))
    if args.json:
        write_json_atomic(Path(args.json), result)
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
                        f"a shorter --seq-len or a smaller --micro-batch{hint}")
    print(f"\nrecommended: {rec['method']} + {rec['strategy']} ({rec['total']:.1f} of {result['usable_gpu_gib']:.1f} GiB "
          "usable per GPU)")
    print(rec["command"])
    return 0
