"""The stage registry: one `StageSpec` per stage, read by everything that needs to know which stages exist.

The CLI (`rlhf-dist STAGE`, `fields`), recipes (`stages:` and their order), the pipeline (order, summary table),
the data loading (which kind of rows), the length policy, the planner and `--fallback auto` (which models a stage
holds in memory) all read this list and know no stage by name. Adding a stage is one module
(`rlhf_dist/stages/<name>.py` with `run(ctx)`, optionally `check(ctx)`) plus one entry below; see
docs/architecture.md, "Adding a stage", for a complete example.

Light to import (no torch, no transformers): `rlhf-dist launch` and `--help` read it too. Classes and
functions are named by "module:attribute" strings and imported only when used.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StageSpec:
    """What is special about a stage, as data. Everything else (run directory, checks, metrics, model card,
    signals, watchdog) is the same for every stage (`rlhf_dist.stages.common.stage_main`)."""

    name: str
    summary: str  # one line: `rlhf-dist --help`, `rlhf-dist fields`
    config: str  # "module:Class" of its typed config (a `config.StageConfig` dataclass with a `training` field)
    data_kind: str  # the rows it reads (`rlhf_dist.data.KINDS`): pretrain | sft | preference | prompts
    upstream: tuple[str, ...] = ()  # stages whose output it starts from, most preferred first (the first complete wins)
    headline: tuple[str, ...] = ()  # the metrics of the pipeline's summary table
    length_rule: str | None = None  # how a row's tokens are measured and cut (`rlhf_dist.lengths.RULES`); None: no limit
    length_limit: str | None = None  # the `training` field that limits a row's tokens
    long_rows: str = "truncate"  # default of data.on_long_row: truncate | skip | error (what its trainer does)
    memory: str = "lm"  # the models it holds, for `rlhf-dist plan` and `--fallback auto` (`plan.estimate.PROFILES`)
    classifier: bool = False  # it trains a one-score sequence classifier, not a causal LM
    hf_trainer: bool = True  # a transformers/TRL Trainer: our `training` defaults apply (config.training_defaults)
    rows_one_for_one: bool = True  # the trainer trains on the given rows as given, so a count that differs is rows it dropped
    sources: str | None = None  # "module:function"(cfg, output, upcoming): fills in and checks other models it reads
    module: str = ""  # its entry point module; default rlhf_dist.stages.<name>

    def __post_init__(self):
        if not self.module:
            object.__setattr__(self, "module", f"rlhf_dist.stages.{self.name}")

    def config_class(self) -> type:
        return load(self.config)

    def entry(self) -> Any:
        """The stage's module: `run(ctx) -> metrics` and, if it has one, `check(ctx)`."""
        return importlib.import_module(self.module)


def load(reference: str) -> Any:
    """The object named by "package.module:attribute"."""
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


# The stages, in the order a pipeline runs them.
STAGES: dict[str, StageSpec] = {spec.name: spec for spec in (
    StageSpec("pretrain", "causal-LM training on raw text; perplexity before/after",
              "rlhf_dist.config.stages:PretrainStageConfig", "pretrain", upstream=(),
              headline=("perplexity", "eval_loss"), rows_one_for_one=False),
    StageSpec("sft", "supervised fine-tuning (TRL SFTTrainer), full, LoRA or QLoRA",
              "rlhf_dist.config.stages:SFTStageConfig", "sft", upstream=("pretrain",),
              headline=("eval_loss", "perplexity"), length_rule="completion", length_limit="max_length",
              memory="lm_chunked"),
    StageSpec("reward", "reward model (one-score sequence classifier) on preference pairs; pairwise accuracy",
              "rlhf_dist.config.stages:RewardStageConfig", "preference", upstream=("sft", "pretrain"),
              headline=("accuracy", "margin"), length_rule="tokenised_pair", length_limit="max_length",
              long_rows="skip", memory="classifier_pairs", classifier=True),
    StageSpec("ppo", "RLHF with our sharded PPO loop (or RLOO / GRPO) on prompts",
              "rlhf_dist.config.ppo:PPOStageConfig", "prompts", upstream=("sft", "pretrain"),
              headline=("score", "kl", "response_length", "eos_rate"), length_rule="prompt",
              length_limit="max_prompt_length", memory="ppo", hf_trainer=False, rows_one_for_one=False,
              sources="rlhf_dist.rl.sources:check_sources"),
    StageSpec("dpo", "direct preference optimisation (TRL DPOTrainer)",
              "rlhf_dist.config.stages:DPOStageConfig", "preference", upstream=("sft", "pretrain"),
              headline=("accuracy", "margin", "logp_chosen", "logp_rejected"), length_rule="pair",
              length_limit="max_length", memory="lm_pairs_reference"),
    StageSpec("kto", "Kahneman-Tversky optimisation (TRL KTOTrainer) on unpaired good / bad completions",
              "rlhf_dist.config.stages:KTOStageConfig", "unpaired", upstream=("sft", "pretrain"),
              headline=("accuracy", "margin", "kl"), length_rule="completion", length_limit="max_length",
              memory="lm_pairs_reference"),
    StageSpec("eval", "the run's policies vs the SFT model on held-out prompts: score, win rate, KL, degeneration",
              "rlhf_dist.stages.eval:EvalStageConfig", "prompts", upstream=("sft",),
              headline=("win_rate", "score", "kl", "degenerate"), length_rule="prompt",
              length_limit="max_prompt_length", memory="inference", hf_trainer=False, rows_one_for_one=False,
              sources="rlhf_dist.stages.eval:check_sources"),
)}


def get(name: str, where: str = "") -> StageSpec:
    """The spec of stage `name`; a one-line error naming the stages otherwise (`where`: the flag or key it came from)."""
    spec = STAGES.get(name)
    if spec is None:
        import difflib

        from rlhf_dist.errors import UserError

        close = difflib.get_close_matches(str(name), list(STAGES), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UserError(f"{where + ': ' if where else ''}unknown stage '{name}'; {hint}choose from {', '.join(STAGES)}")
    return spec
