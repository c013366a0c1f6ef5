"""What the memory estimate needs from a model, read off its config (no weights): parameter counts, layer sizes,
the adapters' size at a LoRA rank. Built on the meta device (`model_shape`), and in closed form for the common
families (`analytic_param_count`, which the tests check against the meta-device count)."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path

from rlhf_dist.errors import UserError

PLAIN_MLP = ("gpt2", "gpt_neox", "gptj", "gpt_bigcode", "opt", "bloom", "falcon", "phi")  # else gated (Llama-like)


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


def text_config(cfg):
    """The language model's config of a composite (vision-language) config; ``cfg`` itself for a text model."""
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
    t = text_config(cfg)
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
