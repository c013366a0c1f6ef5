"""Where the PPO stage's models come from, checked before any model loads: the reward source (a reward model,
default the run's reward stage, or a reward function), the value model, the policy's base (an SFT adapter's base,
stored relative to the run), and the reward stage's adapter when it can score on the policy's own base.

Read from configs and files only (no weights are loaded), and free of the stages: `stages.common`, `pipeline`
and `fallback` ask these questions without importing the PPO stage.
"""

from __future__ import annotations

from pathlib import Path
from typing import Collection

from rlhf_dist import relocate, rundir
from rlhf_dist.errors import UserError


def check_sources(cfg, output: Path, upcoming: Collection[str] = ()) -> None:
    """The PPO stage's `sources` hook (`rlhf_dist.registry`): fill in and check the reward source, unless the reward
    stage is among the `upcoming` stages of a pipeline and no other reward is set (that stage will make it)."""
    if "reward" in upcoming and not (cfg.reward_fn or cfg.reward_model):
        composite(cfg)  # its components are checked now; a reward model comes from this pipeline's reward stage
        return
    resolve_reward(cfg, output)


def composite(cfg):
    """The composite reward of ppo.rewards (`rlhf_dist.rewards.Composite`, every component checked), or None."""
    if cfg.rewards is None:
        return None
    from rlhf_dist.rewards import Composite

    return Composite(cfg.rewards, "ppo.rewards")


def resolve_reward(cfg, output: Path) -> None:
    """Fill in cfg.reward_model (default: OUTPUT/reward) where a reward model scores, and check the reward source(s):
    ppo.reward_fn, the components of ppo.rewards, the reward model; one-line errors."""
    from rlhf_dist.rl.reward_fn import load_reward_fn

    rewards = composite(cfg)
    if cfg.reward_fn:
        load_reward_fn(cfg.reward_fn, "ppo.reward_fn")
    elif rewards is None or rewards.needs_model:
        if not cfg.reward_model:
            if not rundir.is_complete(output, "reward"):
                raise UserError("ppo: no reward; set ppo.reward_model (a reward model), ppo.reward_fn "
                                "(module:function) or ppo.rewards, or run the reward stage first (it writes OUTPUT/reward)")
            cfg.reward_model = str(rundir.stage_dir(output, "reward").resolve())
        check_classifier(cfg.reward_model, "ppo.reward_model", cfg)
    if cfg.value_model and cfg.training.advantage_estimator == "gae" and not cfg.value_head:
        check_classifier(cfg.value_model, "ppo.value_model", cfg, causal_ok=True)
        base = policy_base(cfg)
        vocab = {path: text_config(path, cfg).vocab_size for path in (cfg.value_model, base)}
        if vocab[cfg.value_model] != vocab[base]:
            raise UserError(f"ppo.value_model: {cfg.value_model} has a vocabulary of {vocab[cfg.value_model]} tokens, "
                            f"the policy {vocab[base]}; the value model reads the policy's tokens, so start "
                            "it from a model with the policy's tokenizer (or use ppo.value_head: true)")


def sft_adapter(cfg) -> str | None:
    """cfg.init_from when it is a LoRA adapter folder (an SFT run with lora.merge: false), else None."""
    path = Path(cfg.init_from)
    return str(path) if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file() else None


def policy_base(cfg) -> str:
    """The base model the policy is loaded from: init_from, or the base an SFT adapter was trained on."""
    adapter = sft_adapter(cfg)
    if adapter is None:
        return cfg.init_from
    base = relocate.adapter_base(adapter)  # stored relative to the run (./sft): resolved wherever the run is now
    if not base:
        raise UserError(f"ppo.init_from: {adapter}/adapter_config.json names no base_model_name_or_path; merge the "
                        "adapter into its base, or add the base's path to the file")
    return base


def reward_adapter_path(cfg) -> str | None:
    """The reward stage's LoRA adapter when PPO can score with it on the policy's own base, else None.

    Needs LoRA in PPO, a reward model folder with `adapter/` (a reward stage run with LoRA) trained on the policy's
    base. `ppo.reward_adapter: true` makes a missing condition an error; false turns it off.
    """
    if cfg.reward_fn or not cfg.reward_model or cfg.reward_adapter is False or not cfg.lora.enabled:
        if cfg.reward_adapter and not cfg.lora.enabled:
            raise UserError("ppo.reward_adapter: the reward adapter sits on the policy's LoRA base; set ppo.lora.enabled: true")
        return None
    path = Path(cfg.reward_model) / "adapter"
    why = None
    if not (path / "adapter_config.json").is_file():
        why = f"{cfg.reward_model} has no adapter/ (a reward stage trained with LoRA writes one)"
    else:
        trained_on = relocate.adapter_base(path) or "?"
        base = policy_base(cfg)
        if Path(trained_on).expanduser().resolve() != Path(base).expanduser().resolve():
            why = f"its adapter was trained on {trained_on}, the policy's base is {base}"
    if why is None:
        return str(path)
    if cfg.reward_adapter:
        raise UserError(f"ppo.reward_adapter: {why}; set ppo.reward_adapter: false to load the reward model on its own")
    return None


def text_config(path: str, cfg):
    """The (text) model config of a model folder or hub id, read without loading weights."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def check_classifier(path: str, key: str, cfg, causal_ok: bool = False) -> None:
    """A reward (or value) model must be a sequence classifier with one label (read from its config only)."""
    from transformers import AutoConfig

    from rlhf_dist.models import check_model_path

    check_model_path(path, key, cfg.model)
    config = AutoConfig.from_pretrained(path, revision=cfg.model.revision, trust_remote_code=cfg.model.trust_remote_code)
    archs = getattr(config, "architectures", None) or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        if config.num_labels != 1:
            raise UserError(f"{key}: {path} has a classification head with {config.num_labels} labels; a reward model "
                            "gives one score (num_labels=1): train it with the reward stage")
    elif not causal_ok:
        raise UserError(f"{key}: {path} is a {', '.join(archs) or 'model'} , not a sequence classifier; a reward model "
                        "gives one score (AutoModelForSequenceClassification, num_labels=1): train it with the reward stage")
