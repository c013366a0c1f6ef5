"""The memory estimate of `rlhf-dist plan` and `--fallback auto`: per-GPU bytes of a stage's models for each
method (full / LoRA / QLoRA) and strategy (DDP, ZeRO-2/3, offload). Pure arithmetic on `Shape`s; what is counted
and why: docs/memory_model.md."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from rlhf_dist.plan.shapes import Shape

GIB = 2**30
HEADROOM = 0.10
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


def _lm(policy: Shape, classifier: Shape | None, lora: bool) -> list[Role]:
    return [Role(policy, True, True)]


def _lm_chunked(policy: Shape, classifier: Shape | None, lora: bool) -> list[Role]:
    return [Role(policy, True, True, logits="chunked")]


def _lm_pairs_reference(policy: Shape, classifier: Shape | None, lora: bool) -> list[Role]:
    roles = [Role(policy, True, True, batch_factor=2, logits="chunked")]
    if not lora:
        roles.append(Role(policy, False, False))  # the reference, a second copy of the policy
    return roles


def _classifier_pairs(policy: Shape | None, classifier: Shape, lora: bool) -> list[Role]:
    return [Role(classifier, True, True, batch_factor=2)]


def _ppo(policy: Shape, classifier: Shape, lora: bool) -> list[Role]:
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


def _inference(policy: Shape, classifier: Shape, lora: bool) -> list[Role]:
    # eval: one policy at a time (generating), the frozen reference and reward model; no gradients, no optimizer
    reward = Role(Shape(**{**asdict(classifier), "role": "reward"}), False, False)
    return [Role(policy, False, False, kv_cache=True), Role(policy, False, False), reward]


@dataclass(frozen=True)
class Profile:
    """The models a stage holds: which shapes it reads (a causal LM, "policy"; a one-score "classifier") and the roles
    they play. A stage names its profile in `rlhf_dist.registry` (`memory`)."""

    models: tuple[str, ...]
    roles: Callable[[Shape | None, Shape | None, bool], list[Role]]


PROFILES = {
    "lm": Profile(("policy",), _lm),  # pretrain: a causal LM and its own loss
    "lm_chunked": Profile(("policy",), _lm_chunked),  # sft: TRL's fused LM head
    "lm_pairs_reference": Profile(("policy",), _lm_pairs_reference),  # dpo: pairs, a frozen reference (none with LoRA)
    "classifier_pairs": Profile(("classifier",), _classifier_pairs),  # reward: a sequence classifier on pairs
    "ppo": Profile(("policy", "classifier"), _ppo),  # policy, reference, reward and value
    "inference": Profile(("policy", "classifier"), _inference),  # eval: a policy, its reference and the reward model
}


def profile(stage: str) -> Profile:
    """The memory profile of a registered stage (`registry.StageSpec.memory`)."""
    from rlhf_dist import registry

    return PROFILES[registry.get(stage).memory]


def stage_roles(stage: str, policy: Shape | None, classifier: Shape | None, method: str) -> list[Role]:
    return profile(stage).roles(policy, classifier, method != "full")


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
            "seq_len": seq, "per_device_train_batch_size": batch, "activation_checkpointing": checkpointing, "lora_r": lora_r,
            "attention": "eager" if eager else "sdpa", "double_quant": double_quant, "precision": precision,
            "models": [{"role": s.role, "model_type": s.model_type, "params": s.params, "largest_layer": s.largest_layer,
                        "lora_params": s.lora_params[lora_r]} for s in _distinct(stage, policy, classifier)],
            "units": "GiB (2**30 bytes) per GPU; cpu_per_node in GiB per node", "options": rows,
            "recommended": recommended}


def _distinct(stage: str, policy: Shape | None, classifier: Shape | None) -> list[Shape]:
    return [policy if name == "policy" else classifier for name in profile(stage).models]
