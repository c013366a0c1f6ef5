"""Loading models and tokenizers the same way in every stage, and saving them.

* `trust_remote_code` is off unless the recipe turns it on.
* Weights are saved as safetensors. A LoRA stage saves its adapter in `adapter/` and, unless
  `lora.merge: false`, the merged full weights at the top level (what the next stage loads). The adapter's
  `base_model_name_or_path` is stored relative to the run directory (`./sft`) when the base is in the run, so a
  copied or moved run still loads (`rlhf_dist.relocate`); `load_adapter` finds the base from anywhere.
* A tokenizer without a pad token gets one that is not EOS where it can (its unk token), so
  that EOS is never mistaken for padding; TRL's collators mask padding by length in any case.

QLoRA (`quantization.load_in_4bit`, with `lora.enabled`): the base is loaded in bitsandbytes NF4/FP4 and
frozen; only the adapter (and a reward model's score head) trains. The adapter is merged into a fresh
UNQUANTISED load of the base, so the merged model differs from the trained 4-bit one by the base's
quantisation error (the QLoRA merge gap; measured on the tiny test model in tests/test_qlora.py). TRL's
SFT/DPO/Reward trainers cast a quantised model's trainable parameters to bfloat16 whatever
`quantization.compute_dtype` says, so the adapter trains and is saved in bf16 (pretrain keeps float32).

What runs where (verified on CPU: torch 2.13, bitsandbytes 0.50.2, deepspeed 0.19.8; tests/test_qlora*.py):
- one process: 4-bit and 8-bit LoRA in pretrain, sft, reward and dpo.
- DDP and DeepSpeed ZeRO-2, 2 processes: QLoRA sft equals one process (the 4-bit base is replicated).
- DeepSpeed ZeRO-3, 2 processes: QLoRA sft equals one process. transformers loads a quantised model whole
  (no zero.Init); the DeepSpeed engine then partitions every weight, the packed 4-bit ones included. Their
  storage dtype is the model's dtype under ZeRO-3 (`bnb_config`), as the FSDP/ZeRO-3 QLoRA recipe asks.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from rlhf_dist.config.sections import LoraSection, ModelSection, QuantizationSection, StageConfig
from rlhf_dist.data import looks_local
from rlhf_dist.errors import UserError

log = logging.getLogger(__name__)


def check_model_path(path: str, key: str, model: ModelSection) -> None:
    """Fail fast, before anything is written, on a model that cannot be found.

    Local folders must hold a model; anything else must resolve as a hub id (only its config is
    fetched, and cached).
    """
    local = Path(path).expanduser()
    if local.exists():
        if local.is_dir() and not any((local / f).is_file() for f in ("config.json", "adapter_config.json")):
            raise UserError(f"{key}: {path} holds no model (no config.json); point it at a saved model folder")
        return
    if looks_local(path):
        raise UserError(f"{key}: model path does not exist: {path}; fix the path or give a hub model id")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{key}: no model '{path}' here or on the hub ({first[:200]}); fix the path or id "
                        "(gated models need HF_TOKEN in the environment)") from None


def check_lora_targets(path: str, key: str, cfg: StageConfig, classifier: bool = False) -> None:
    """LoRA target modules that name no module of the model fail here, before anything is written or loaded
    (PEFT would fail only after the run directory is claimed and the weights are read). Uses the config and
    the model built on the meta device: no weights."""
    lora = cfg.lora
    if not lora.enabled or lora.target_modules == "all-linear":
        return
    import re

    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError):
        return  # not a full model folder (e.g. an adapter): PEFT checks it when it loads
    auto = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    with torch.device("meta"):
        model = auto.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
    names = [name for name, _ in model.named_modules() if name]
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})
    hint = f"layers of {path}: {', '.join(linear)}; or use 'all-linear'"
    if isinstance(lora.target_modules, str):  # PEFT: a string is a regular expression over full module names
        if not any(re.fullmatch(lora.target_modules, name) for name in names):
            raise UserError(f"{key}: the pattern '{lora.target_modules}' matches no module ({hint})")
        return
    missing = [t for t in lora.target_modules if not any(n == t or n.endswith("." + t) for n in names)]
    if missing:
        raise UserError(f"{key}: {', '.join(repr(t) for t in missing)} names no module ({hint})")


def check_quantization(key: str, cfg: StageConfig) -> None:
    """4-bit or 8-bit weights need bitsandbytes importable: fail here, before anything is written or loaded."""
    q = cfg.quantization
    if not (q.load_in_4bit or q.load_in_8bit):
        return
    try:
        import bitsandbytes  # noqa: F401
    except Exception as exc:  # ImportError, or a broken native library (RuntimeError/OSError)
        bits = 4 if q.load_in_4bit else 8
        raise UserError(f"{key}.load_in_{bits}bit: bitsandbytes cannot be imported ({type(exc).__name__}: "
                        f"{str(exc).strip().splitlines()[0][:120] if str(exc).strip() else 'no message'}); "
                        f"pip install 'bitsandbytes>=0.50', or set {key}.load_in_{bits}bit=false") from None


def torch_dtype(name: str) -> torch.dtype | str:
    return "auto" if name == "auto" else getattr(torch, name)


def bnb_config(q: QuantizationSection, zero3: bool = False):
    """A transformers BitsAndBytesConfig, or None when no quantisation is asked for.

    Under ZeRO-3 the packed 4-bit weights are stored in the dtype of the model's other weights (the FSDP/ZeRO-3
    QLoRA recipe), so that DeepSpeed partitions, gathers and casts them like any other frozen weight; the bits,
    and what the model computes, are the same (measured: identical logits). Elsewhere they stay uint8.
    """
    if not (q.load_in_4bit or q.load_in_8bit):  # both at once is refused by StageConfig
        return None
    from transformers import BitsAndBytesConfig

    if q.load_in_8bit:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = getattr(torch, q.compute_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=compute if zero3 else torch.uint8,
    )


def load_tokenizer(path: str, model: ModelSection):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path, revision=model.revision, trust_remote_code=model.trust_remote_code)
    if tok.pad_token is None:
        if tok.unk_token is not None and tok.unk_token != tok.eos_token:
            tok.pad_token = tok.unk_token
        else:
            tok.pad_token = tok.eos_token
        log.info("tokenizer has no pad token; using %r", tok.pad_token)
    return tok


def _load_kwargs(cfg: StageConfig) -> dict:
    kwargs = {
        "revision": cfg.model.revision,
        "trust_remote_code": cfg.model.trust_remote_code,
        "dtype": torch_dtype(cfg.model.dtype),
    }
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    from transformers.integrations import is_deepspeed_zero3_enabled

    quant = bnb_config(cfg.quantization, zero3=is_deepspeed_zero3_enabled())
    if quant is not None:  # StageConfig guarantees lora.enabled here
        kwargs["quantization_config"] = quant
        kwargs["dtype"] = getattr(torch, cfg.quantization.compute_dtype)
    return kwargs


def load_causal_lm(path: str, cfg: StageConfig):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **_load_kwargs(cfg))
    _after_load(model, cfg)
    return model


def classifier_from_pretrained(path: str, cfg: StageConfig):
    """`AutoModelForSequenceClassification` with one label from `path`: a reward model, or a causal LM that gets a new
    score head. transformers reports the new head in a warning table of its own; it is expected here, and said in
    one line instead. Anything else missing, unexpected or mismatched is still a warning, naming the keys."""
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # only the load report: restored right after
    try:
        model, info = AutoModelForSequenceClassification.from_pretrained(path, num_labels=1, output_loading_info=True,
                                                                          **_load_kwargs(cfg))
    finally:
        hf_logging.set_verbosity(verbosity)
    head = [k for k in info.get("missing_keys", ()) if k.split(".")[0] in ("score", "classifier")]
    if head:
        log.info("%s has no score head: a new one is initialised (%s)", path, ", ".join(sorted(head)))
    other = {kind: sorted(keys) for kind, keys in info.items() if keys and kind != "error_msgs"}
    other["missing_keys"] = sorted(set(other.get("missing_keys", [])) - set(head))
    other = {kind: keys for kind, keys in other.items() if keys}
    if other:
        log.warning("loading %s as a sequence classifier: %s", path,
                    "; ".join(f"{kind} {', '.join(map(str, keys[:8]))}" for kind, keys in other.items()))
    return model


def load_reward_model(path: str, cfg: StageConfig, tokenizer):
    """A sequence classifier with one output (the score), initialised from a causal LM or a reward model."""
    model = classifier_from_pretrained(path, cfg)
    model.config.pad_token_id = tokenizer.pad_token_id
    _after_load(model, cfg)
    if cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit:
        # TRL's RewardTrainer casts the trainable parameters of a quantised model to bfloat16, the score head (a
        # PEFT modules_to_save copy, hooks included) too, while the final norm hands it float32: without this
        # cast every forward fails with "expected m1 and m2 to have the same dtype".
        for head in ("score", "classifier"):  # PEFT's modules_to_save for SEQ_CLS
            if isinstance(getattr(model, head, None), torch.nn.Linear):
                getattr(model, head).register_forward_pre_hook(_input_to_weight_dtype)
    return model


def load_frozen_reward_model(path: str, cfg: StageConfig, tokenizer):
    """A reward model that only scores (PPO): in 4 bit (or 8) when `cfg` quantises (QLoRA), else as saved; no
    LoRA and no `prepare_model_for_kbit_training` (nothing of it trains)."""
    if not (cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit):
        return load_reward_model(path, base_config(cfg), tokenizer)
    model = classifier_from_pretrained(path, cfg)
    model.config.pad_token_id = tokenizer.pad_token_id
    one_4bit_layout(model)
    return model


def one_4bit_layout(model) -> None:
    """Keep bitsandbytes' 4-bit weights in the layout they were loaded in.

    On a CPU with AVX512-BF16, bitsandbytes (0.50) repacks a 4-bit weight in place at its first forward in eval mode
    without gradients, and from then on computes with another kernel, one without a backward (torch warns that
    the gradient through it may be silently wrong). The numbers then depend on whether an evaluation ran first: a
    run resumed from a checkpoint (whose "before" evaluation is not repeated) drifted from the uninterrupted run
    after the first resumed step, and training after an evaluation went through that kernel. GPUs never take
    that path; on the CPU it only costs some inference speed.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def _input_to_weight_dtype(module, args):
    return tuple(a.to(module.weight.dtype) if torch.is_tensor(a) and a.is_floating_point() else a for a in args)


def _after_load(model, cfg: StageConfig) -> None:
    if cfg.quantization.load_in_4bit or cfg.quantization.load_in_8bit:
        from peft import prepare_model_for_kbit_training

        one_4bit_layout(model)
        prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(cfg.training.activation_checkpointing))


def peft_config(lora: LoraSection, task_type: str):
    """A peft.LoraSection for `task_type` ('CAUSAL_LM' or 'SEQ_CLS'), or None when LoRA is off."""
    if not lora.enabled:
        return None
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        task_type=task_type,
    )


def base_config(cfg: StageConfig) -> StageConfig:
    """`cfg` for loading the plain base model: no quantisation, no LoRA (to merge an adapter into, or frozen)."""
    return dataclasses.replace(cfg, quantization=QuantizationSection(), lora=LoraSection())


def save_model(trainer, tokenizer, out_dir: Path, cfg: StageConfig, loader) -> list[str]:
    """Save the trained model into `out_dir` (safetensors). Returns what was written.

    `loader(path, cfg)` loads the stage's model. A LoRA adapter is merged into a fresh, unquantised load
    of the base (on the main process only): the trained model may be 4-bit (QLoRA) or partitioned
    (ZeRO-3), and merging in place would change the model the trainer still holds.
    """
    from rlhf_dist.rl.distributed import replicated_loading

    out_dir = Path(out_dir)
    written = []
    acc = trainer.accelerator
    model = acc.unwrap_model(trainer.model)
    is_peft = hasattr(model, "peft_config")
    plugin = acc.state.deepspeed_plugin
    if not is_peft and plugin is not None and plugin.zero_stage < 3:
        # ZeRO-1/2 keep whole weights on every process. trainer.save_model would pass save_pretrained a cloned
        # state dict in which tied weights (lm_head = embeddings) are two tensors, and both would be saved.
        if trainer.is_world_process_zero():
            model.save_pretrained(str(out_dir), safe_serialization=True)
        acc.wait_for_everyone()
        written.append("model")
    elif not is_peft:
        trainer.save_model(str(out_dir))  # under ZeRO-3 this gathers the partitioned weights
        written.append("model")
    else:
        trainer.save_model(str(out_dir / "adapter"))
        written.append("adapter")
    if trainer.is_world_process_zero():
        if is_peft:  # the base's path relative to the run (`rlhf_dist.relocate`): a moved run's adapter still loads
            from rlhf_dist.relocate import fix_adapter_config

            fix_adapter_config(out_dir / "adapter")
        if is_peft and cfg.lora.merge:
            from peft import PeftModel

            with replicated_loading():  # only this process loads it: no ZeRO-3 partitioning, no collectives
                base = loader(cfg.init_from, base_config(cfg))
            merged = PeftModel.from_pretrained(base, str(out_dir / "adapter")).merge_and_unload()
            merged.save_pretrained(str(out_dir), safe_serialization=True)
            written.append("merged")
        tokenizer.save_pretrained(str(out_dir))
        # The Trainer pickles its arguments next to the weights; config.yaml holds them as text.
        for pickled in out_dir.rglob("training_args.bin"):
            pickled.unlink()
    return written


def load_adapter(adapter_dir: str | Path, cfg: StageConfig, loader=None, base: str | None = None, is_trainable=False):
    """A saved LoRA adapter on its base model (a PeftModel), from wherever the run directory is now.

    The base is `base` if given, else the one the adapter names (`relocate.adapter_base`: a run-relative
    ``./sft`` is resolved against the adapter's run directory, not the current one), loaded plain
    (`base_config`) by `loader(path, cfg)` (default `load_causal_lm`).
    """
    from peft import PeftModel

    from rlhf_dist.relocate import adapter_base

    base = base or adapter_base(adapter_dir)
    if not base:
        raise UserError(f"{adapter_dir}/adapter_config.json names no base_model_name_or_path; pass the base model")
    model = (loader or load_causal_lm)(base, base_config(cfg))
    return PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=is_trainable)
