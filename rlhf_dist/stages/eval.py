"""Stage `eval`: which of the run's models is better, on held-out prompts, side by side.

Every policy the run trained (default: each complete stage whose output is a causal LM answering prompts: sft, ppo,
dpo, kto, ...; not pretrain, not a reward model) is compared with the reference (default: the run's sft stage), one
model at a time, with the reference and the reward model (or function) loaded once:

* score            mean reward-model (or reward-function) score of the sampled completions;
* win_rate         paired win rate against the reference: per prompt, the model's mean score over its samples
                   against the reference's (a tie counts one half), with a seeded percentile-bootstrap interval
                   over prompts (ci_low, ci_high; `rlhf_dist.evaluation.metrics`); greedy_win_rate: the same on
                   the greedy completions;
* kl               mean over sampled completions of sum_t log pi(y_t) - log pi_ref(y_t) (k1, at the sampling
                   temperature: the PPO stage's held-out KL);
* response_length  mean tokens per sampled completion, its stop token included; eos_rate: share that stopped;
* distinct_1/2     distinct word uni-/bigrams over all sampled completions / all of them;
* perplexity       exp(mean NLL per token) of held-out answers (default: the reference stage's own held-out split,
                   e.g. SFT's completions given their prompts);
* degenerate       share of greedy completions flagged (`metrics.degeneration`: empty, not text, one token
                   repeated, a short loop), with degenerate_reasons.

Every model samples with the same seeds (derived per chunk from training.seed), so the comparison is paired and an
identical completion is a tie; greedy completions are argmax decoding. The prompts are this stage's held-out split
(`eval.data`; default the data section of the run's prompts stage, ppo, so the same prompts PPO held out), at most
training.max_prompts. metrics.json: `models` {name: figures}, `before` = the reference's figures, `after` = the best
model's (highest win rate; `best`), `lm_eval` when tasks are given. Also `table.txt` (printed by the pipeline),
`eval.png` and `samples.jsonl` (greedy and sampled completions, flags, scores).

    rlhf-dist eval --recipe demo --output runs/demo                      (on any run: the complete stages)
    rlhf-dist eval --recipe my.yaml --output runs/x eval.models=[ppo,dpo] eval.training.samples_per_prompt=8

Runs on the main process (others wait). lm-eval tasks (`eval.lm_eval_tasks`) need `pip install lm-eval`.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection

from rlhf_dist import registry, relocate, rundir
from rlhf_dist.config.coerce import check_ranges
from rlhf_dist.config.sections import StageConfig
from rlhf_dist.config.sections import option as _f
from rlhf_dist.errors import ConfigError, UserError

log = logging.getLogger("rlhf_dist")

STAGE = "eval"
REFERENCE = "sft"  # the default reference: the run's SFT model


@dataclass
class EvalTrainingConfig:
    """How the eval stage samples and counts (no training: the name `training` is every stage's section for it)."""

    output_dir: str = _f("", "Set by --output (the stage's work directory); not a recipe key.")
    seed: int = _f(0, "Seed of the sampled completions (each chunk's seed derives from it, the same for every model) "
                   "and of the bootstrap.")
    max_prompts: int | None = _f(None, "Held-out prompts evaluated (the first ones); null = all.")
    max_prompt_length: int = _f(512, "Longest prompt in tokens; longer ones are cut on the left (data.on_long_row).")
    max_new_tokens: int = _f(64, "Longest completion in tokens.")
    temperature: float = _f(1.0, "Temperature of the sampled completions (the KL is that of the tempered distributions).")
    samples_per_prompt: int = _f(4, "Sampled completions per prompt (score, win rate, KL, length, EOS, distinct-n).")
    generation_batch_size: int = _f(16, "Sequences generated at once (and scored, with their KL, in the same batch).")
    per_device_train_batch_size: int = _f(16, "Rows per forward pass of the held-out perplexity (every stage's name for "
                                          "its batch: rlhf-dist plan and --fallback auto set it).")
    activation_checkpointing: bool = _f(False, "Unused (no backward pass); accepted as every stage's.")
    cpu_threads: int | None = _f(None, "Without a GPU: torch's threads (torch.set_num_threads); null = torch's default. "
                                 "A small model generates fastest on 1 (more threads spin-wait on a busy CPU).")
    stop_tokens: list[str] = _f([], "Tokens that end a completion besides the tokenizer's EOS.")
    bootstrap_resamples: int = _f(1000, "Bootstrap resamples of the win rate's interval.")
    confidence: float = _f(0.95, "Confidence level of the win rate's interval.")
    tie_margin: float = _f(0.0, "Per-prompt score differences up to this count as ties in the win rate (one half); "
                           "0: only equal scores.")
    num_samples: int = _f(4, "Prompts per model whose greedy and sampled completions go to samples.jsonl.")
    max_perplexity_rows: int | None = _f(256, "Held-out rows of the perplexity (the first ones); null = all.")
    bf16: bool = _f(False, "Unused (models run in model.dtype); set by the device defaults of every stage.")
    fp16: bool = _f(False, "Unused (models run in model.dtype).")

    def __post_init__(self):
        check_ranges(self, "training.")  # the fields named in config.RANGES (seed, lengths, temperature, ...)
        for name, low in (("max_prompts", 1), ("bootstrap_resamples", 1), ("num_samples", 0), ("max_perplexity_rows", 1),
                          ("cpu_threads", 1)):
            value = getattr(self, name)
            if value is not None and value < low:
                raise ValueError(f"training.{name} must be >= {low}, got {value}")
        if not self.tie_margin >= 0:
            raise ValueError(f"training.tie_margin must be >= 0, got {self.tie_margin}")
        if not 0 < self.confidence < 1:
            raise ValueError(f"training.confidence must be within (0, 1), got {self.confidence}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class EvalStageConfig(StageConfig):
    """Held-out comparison of the run's policies with the reference: score, win rate, KL, length, diversity,
    perplexity, degeneration."""

    models: list[str] = _f([], "Stages of this run (or model folders) to evaluate. Default: every complete policy stage "
                           "(a causal LM trained on prompts: sft, ppo, dpo, kto, ...) other than the reference.")
    reference: str | None = _f(None, "The model every other is compared with (a stage of this run or a model folder). "
                               "Default: the run's sft stage. (eval.init_from is replaced by it.)")
    reward_model: str | None = _f(None, "Reward model that scores completions (a stage or a folder). Default: the run's "
                                  "reward stage, else the reward model or function of a stage that used one (ppo).")
    reward_fn: str | None = _f(None, "Instead of a reward model: module:function(prompts, completions) -> scores.")
    perplexity_data: str | None = _f(None, "A data file (SFT rows: the completion's perplexity given its prompt; or "
                                     "text rows) for the held-out perplexity. Default: the held-out split of the "
                                     "reference stage's own data; 'none' for no perplexity.")
    lm_eval_tasks: list[str] = _f([], "lm-eval tasks run on every model (lm_eval.simple_evaluate; pip install lm-eval).")
    lm_eval_args: dict[str, Any] = _f({}, "More keyword arguments of lm_eval.simple_evaluate, e.g. {limit: 100, "
                                      "num_fewshot: 0, batch_size: 8}.")
    lm_eval_include_path: str | None = _f(None, "A folder of local lm-eval task YAML files (TaskManager include_path).")
    training: EvalTrainingConfig | None = None

    def __post_init__(self):
        super().__post_init__()
        if self.reward_model and self.reward_fn:
            raise ValueError("reward_model and reward_fn are both set; choose one source of scores")

    def sequence_length(self, max_positions: int) -> int:
        return min(self.training.max_prompt_length + self.training.max_new_tokens, max_positions)


# ----------------------------------------------------------------------------------------------
# Sources: which models, which reference, which reward (the spec's `sources` hook; configs and files only)
# ----------------------------------------------------------------------------------------------
def policy_stages() -> list[str]:
    """Stages whose output is a policy: a causal LM trained on prompts (not raw text, not a classifier), but this one."""
    return [name for name, spec in registry.STAGES.items()
            if name != STAGE and not spec.classifier and spec.data_kind != "pretrain"]


def model_folder(path: Path) -> Path | None:
    """The folder a causal LM loads from: full weights (config.json), else a LoRA adapter (adapter/ or the folder)."""
    if (path / "config.json").is_file():
        return path
    for folder in (path / "adapter", path):
        if (folder / "adapter_config.json").is_file():
            return folder
    return None


def _source(entry: str, key: str, output: Path, upcoming: set[str], policy: bool = True) -> str | None:
    """A stage name (its output in this run) or a model folder -> its path; None while a pipeline is yet to make it."""
    if entry in registry.STAGES:
        spec = registry.get(entry)
        if entry == STAGE or (policy and spec.classifier):
            kind = "this evaluation" if entry == STAGE else "a reward model (a classifier)"
            raise ConfigError(f"{key}: '{entry}' is {kind}, not a policy; choose from {', '.join(policy_stages())}")
        if rundir.is_complete(output, entry):
            return str(rundir.stage_dir(output, entry).resolve())
        if entry in upcoming:
            return None
        raise UserError(f"{key}: stage '{entry}' of {output} is not complete; run it first (rlhf-dist {entry} --recipe "
                        f"... --output {output}) or leave it out of {key}")
    path = Path(entry).expanduser()
    if path.is_dir():
        if model_folder(path) is None:
            raise UserError(f"{key}: {entry} holds no model (no config.json or adapter_config.json)")
        return str(path.resolve())
    close = difflib.get_close_matches(entry, list(registry.STAGES), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(f"{key}: '{entry}' is neither a stage nor a model folder; {hint}name a stage of the run "
                      f"({', '.join(policy_stages())}) or a model folder")


def _saved_config(folder: Path) -> dict:
    import yaml

    path = folder / rundir.CONFIG_FILE
    return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}


def _default_data(cfg, output: Path, upcoming: set[str]) -> None:
    """eval.data unset: the data section of the run's first complete prompts stage (ppo), so its held-out prompts."""
    if cfg.data.path:
        return
    from rlhf_dist.config.coerce import build
    from rlhf_dist.config.sections import DataSection

    for name, spec in registry.STAGES.items():
        if name != STAGE and spec.data_kind == "prompts" and rundir.is_complete(output, name):
            data = _saved_config(rundir.stage_dir(output, name)).get("data") or {}
            data = {k: relocate.resolve(v, output) if k in ("path", "eval_path") else v for k, v in data.items()}
            cfg.data = build(DataSection, data, f"{name}.data (from {name}/{rundir.CONFIG_FILE})")
            return
        if name != STAGE and spec.data_kind == "prompts" and name in upcoming:
            return
    raise ConfigError("eval.data.path is not set and the run has no complete stage with prompts (ppo) to take them "
                      "from; set eval.data.path to a prompts file (or run ppo first)")


def _default_reward(cfg, output: Path, upcoming: set[str]) -> None:
    """The run's reward stage, else the reward model or function a complete stage used (ppo's), else none."""
    from rlhf_dist.rl.reward_fn import load_reward_fn
    from rlhf_dist.rl.sources import check_classifier

    if cfg.reward_fn:
        load_reward_fn(cfg.reward_fn, "eval.reward_fn")
        return
    if cfg.reward_model:
        path = _source(cfg.reward_model, "eval.reward_model", output, upcoming, policy=False)
        if path is not None:
            check_classifier(path, "eval.reward_model", cfg)
        cfg.reward_model = path
        return
    for name, spec in registry.STAGES.items():
        if spec.classifier and rundir.is_complete(output, name):
            cfg.reward_model = str(rundir.stage_dir(output, name).resolve())
            return
        if spec.classifier and name in upcoming:
            return
    for name in registry.STAGES:
        if name != STAGE and rundir.is_complete(output, name):
            saved = _saved_config(rundir.stage_dir(output, name))
            if saved.get("reward_fn"):
                cfg.reward_fn = saved["reward_fn"]
                load_reward_fn(cfg.reward_fn, f"eval.reward_fn (from {name}/{rundir.CONFIG_FILE})")
                return
            model = relocate.resolve(saved.get("reward_model"), output)
            if isinstance(model, str) and Path(model).is_dir():
                cfg.reward_model = model
                return


def check_sources(cfg, output: Path, upcoming: Collection[str] = ()) -> None:
    """The eval spec's `sources` hook: fill in and check the reference, the models, the reward and the prompts, from
    the run directory's complete stages (a pipeline's `upcoming` stages count as coming). One-line errors."""
    output, upcoming = Path(output), set(upcoming) - {STAGE}
    if cfg.lm_eval_tasks:
        import importlib.util

        if importlib.util.find_spec("lm_eval") is None:
            raise ConfigError("eval.lm_eval_tasks: lm-eval is not installed; pip install lm-eval (or "
                              "'rlhf-dist[lm-eval]'), or remove eval.lm_eval_tasks")
    if cfg.perplexity_data and cfg.perplexity_data != "none":
        from rlhf_dist.data import check_local_path

        check_local_path(cfg.perplexity_data, "eval.perplexity_data")
    if cfg.reference:
        reference = _source(cfg.reference, "eval.reference", output, upcoming)
    elif rundir.is_complete(output, REFERENCE):
        reference = str(rundir.stage_dir(output, REFERENCE).resolve())
    elif REFERENCE in upcoming:
        reference = None
    else:
        raise UserError(f"eval: no reference model: {output} has no complete {REFERENCE} stage; run it first "
                        f"(rlhf-dist {REFERENCE} --recipe ... --output {output}) or set eval.reference (a stage or a folder)")
    if cfg.models:
        models = [_source(m, f"eval.models[{i}]", output, upcoming) for i, m in enumerate(cfg.models)]
    else:
        candidates = [s for s in policy_stages() if s in upcoming or rundir.is_complete(output, s)]
        models = [None if not rundir.is_complete(output, s) else str(rundir.stage_dir(output, s).resolve())
                  for s in candidates if model_folder(rundir.stage_dir(output, s)) is not None or s in upcoming]
    models = [m for m in models if m is None or m != reference]
    if not models:
        raise UserError(f"eval: no policy to evaluate in {output}: none of {', '.join(policy_stages())} is complete "
                        f"(other than the reference); run one first (e.g. rlhf-dist dpo --recipe ... --output {output}) "
                        "or name models in eval.models")
    _default_data(cfg, output, upcoming)
    _default_reward(cfg, output, upcoming)
    if reference is None or None in models:  # a pipeline's check before its stages ran: nothing more to fill in
        return
    cfg.reference = cfg.init_from = reference  # the tokenizer, the model card's "from": the reference
    cfg.models = list(dict.fromkeys(models))


def model_names(cfg) -> dict[str, str]:
    """{name: folder} of the reference and every model, named by their folders (a stage's name), made unique."""
    out: dict[str, str] = {}
    for path in [cfg.reference, *cfg.models]:
        name, k = Path(path).name, 2
        while name in out:
            name, k = f"{Path(path).name}_{k}", k + 1
        out[name] = path
    return out


# ----------------------------------------------------------------------------------------------
# Checks before any model loads
# ----------------------------------------------------------------------------------------------
def check(ctx) -> None:
    """Same tokenizer everywhere, prompts + completions within every model's positions, stop tokens, generation
    configs that do not reshape sampling, the perplexity rows: all from configs and files, before any weights load."""
    from transformers import AutoConfig, GenerationConfig

    from rlhf_dist.models import load_tokenizer
    from rlhf_dist.rl.generation import check_generation_config, stop_token_ids

    cfg, s = ctx.cfg, ctx.cfg.training
    try:
        stop_token_ids(ctx.tokenizer, s.stop_tokens)
    except ValueError as exc:
        raise ConfigError(str(exc).replace("ppo.training", "eval.training")) from None
    vocab = ctx.tokenizer.get_vocab()
    longest = max(len(p) for p in ctx.eval["input_ids"])
    for name, path in model_names(cfg).items():
        folder = model_folder(Path(path))
        if load_tokenizer(path, cfg.model).get_vocab() != vocab:
            raise UserError(f"eval: {name} ({path}) has another tokenizer than the reference {cfg.reference}; the KL and "
                            "the paired comparison need one tokenizer: evaluate models trained from the same base")
        if (folder / "config.json").is_file():
            config = AutoConfig.from_pretrained(folder, revision=cfg.model.revision,
                                                trust_remote_code=cfg.model.trust_remote_code)
            limit = getattr(config.get_text_config(), "max_position_embeddings", None)
            if limit is not None and longest + s.max_new_tokens > limit:
                raise ConfigError(f"eval: the longest prompt ({longest} tokens) + max_new_tokens ({s.max_new_tokens}) "
                                  f"exceeds {name}'s {limit} positions; lower eval.training.max_new_tokens or "
                                  "eval.training.max_prompt_length")
            try:
                gen = GenerationConfig.from_pretrained(folder)
            except OSError:
                gen = None
            if gen is not None:
                try:
                    check_generation_config(type("M", (), {"generation_config": gen})(), {})
                except ValueError as exc:
                    raise UserError(f"eval: {folder}/generation_config.json: {exc}") from None
    ctx.perplexity_rows = perplexity_source(cfg, ctx.output)


def perplexity_source(cfg, output: Path) -> list[dict]:
    """The held-out rows of the perplexity: eval.perplexity_data (all its rows), else the held-out split of the
    reference stage's data (from its config.yaml, with the kind of rows its stage reads); [] for none."""
    from rlhf_dist.config.coerce import build
    from rlhf_dist.config.sections import DataSection
    from rlhf_dist.data import load_splits

    s = cfg.training
    if cfg.perplexity_data == "none":
        return []
    if cfg.perplexity_data:
        data = DataSection(path=cfg.perplexity_data, eval_fraction=0.0)
        rows, _, _ = load_splits(data, "sft", "eval.perplexity_data")
    else:
        folder = Path(cfg.reference)
        stage = folder.name if folder.parent.resolve() == Path(output).resolve() else None
        saved = _saved_config(folder).get("data") if stage in registry.STAGES else None
        kind = registry.get(stage).data_kind if saved else None
        if kind not in ("sft", "pretrain") or not saved.get("path"):
            return []
        saved = {k: relocate.resolve(v, output) if k in ("path", "eval_path") else v for k, v in saved.items()}
        _, rows, _ = load_splits(build(DataSection, saved, f"{stage}.data"), kind, f"eval (perplexity on {stage}'s data)")
    if rows is None:
        return []
    rows = rows.to_list()
    return rows[:s.max_perplexity_rows] if s.max_perplexity_rows else rows


# ----------------------------------------------------------------------------------------------
# The evaluation
# ----------------------------------------------------------------------------------------------
def load_policy(path: str, cfg, device):
    """A causal LM for inference: full weights, or a LoRA adapter on its base; eval mode, no grad, no dropout."""
    from rlhf_dist.models import load_adapter, load_causal_lm
    from rlhf_dist.rl.generation import disable_dropout

    folder = model_folder(Path(path))
    model = load_causal_lm(str(folder), cfg) if (folder / "config.json").is_file() else load_adapter(folder, cfg)
    disable_dropout(model).requires_grad_(False)
    return model.eval().to(device)


def load_reward(cfg, tokenizer, device):
    """The RewardSource of eval.reward_fn or eval.reward_model (its own tokenizer: responses re-encoded), or None."""
    from rlhf_dist.models import load_frozen_reward_model, load_tokenizer
    from rlhf_dist.rl.reward_fn import load_reward_fn
    from rlhf_dist.rl.scoring import RewardSource

    if cfg.reward_fn:
        return RewardSource(fn=load_reward_fn(cfg.reward_fn, "eval.reward_fn"), fn_name=cfg.reward_fn)
    if not cfg.reward_model:
        return None
    reward_tok = load_tokenizer(cfg.reward_model, cfg.model)
    same = reward_tok.get_vocab() == tokenizer.get_vocab() and reward_tok.eos_token == tokenizer.eos_token
    model = load_frozen_reward_model(cfg.reward_model, cfg, reward_tok).requires_grad_(False).eval().to(device)
    return RewardSource(model=model, tokenizer=None if same else reward_tok,
                        max_length=getattr(model.config, "max_position_embeddings", None))


def run(ctx) -> dict:
    import gc

    from rlhf_dist.evaluation import measure, report
    from rlhf_dist.rl.generation import stop_token_ids
    from rlhf_dist.stages.common import process_state

    state = process_state()
    if not state.is_main_process:  # one process evaluates; the others wait for it (stages.common's last barrier)
        return {"before": {}, "after": {}}
    cfg, s, tok, device = ctx.cfg, ctx.cfg.training, ctx.tokenizer, state.device
    if device.type == "cpu" and s.cpu_threads:
        import torch

        torch.set_num_threads(s.cpu_threads)
    prompts = [list(p) for p in ctx.eval["input_ids"]][:s.max_prompts]
    prompt_texts = [tok.decode(p, skip_special_tokens=True) for p in prompts]
    stop_ids = stop_token_ids(tok, s.stop_tokens)
    reward = load_reward(cfg, tok, device)
    if reward is None:
        log.warning("eval: no reward model or function (no reward stage in the run; set eval.reward_model or "
                    "eval.reward_fn): no score and no win rate")
    names = model_names(cfg)
    reference = load_policy(cfg.reference, cfg, device)
    positions = getattr(reference.config.get_text_config(), "max_position_embeddings", None) or 4096
    held_out = ctx.perplexity_rows if hasattr(ctx, "perplexity_rows") else perplexity_source(cfg, ctx.output)
    rows = measure.perplexity_rows(held_out, tok, positions)
    done: dict[str, tuple] = {}
    lm_eval: dict[str, Any] = {}
    for name, path in names.items():
        model = reference if path == cfg.reference else load_policy(path, cfg, device)
        kw = {"settings": s, "stop_ids": stop_ids, "device": device, "reward": reward}
        sampled = measure.complete(model, prompts, tok, greedy=False, reference=reference, **kw)
        greedy = measure.complete(model, prompts, tok, greedy=True, **kw)
        ppl = measure.perplexity(model, rows, tok.pad_token_id, s.per_device_train_batch_size, device)
        done[name] = (sampled, greedy, ppl)
        if model is not reference:
            del model
            gc.collect()
        if cfg.lm_eval_tasks:
            folder = model_folder(Path(path))
            base = None if (folder / "config.json").is_file() else relocate.adapter_base(folder)
            lm_eval[name] = measure.lm_eval_results(folder, cfg.lm_eval_tasks, cfg.lm_eval_args, cfg.lm_eval_include_path,
                                                    device, cfg.model.dtype, base)
        log.info("eval: %s done (%d prompts x %d samples + greedy)", name, len(prompts), s.samples_per_prompt)
    ref_name = next(iter(names))
    ref_sampled, ref_greedy, _ = done[ref_name]
    models = {name: report.figures(sampled, greedy, ref_sampled, ref_greedy, len(prompts), s, ppl)
              for name, (sampled, greedy, ppl) in done.items()}
    for name in models:
        if lm_eval.get(name):
            models[name]["lm_eval"] = lm_eval[name]
    others = [n for n in models if n != ref_name]
    best = max(others, key=lambda n: models[n].get("win_rate", 0.0))  # the first of equals: the registry's order
    return _write(ctx, models, ref_name, best, prompts, prompt_texts, done, reward is not None)


def _write(ctx, models: dict, ref_name: str, best: str, prompts: list, prompt_texts: list[str], done: dict,
           scored: bool) -> dict:
    from rlhf_dist.evaluation import report

    cfg, s, out = ctx.cfg, ctx.cfg.training, ctx.final_dir
    out.mkdir(parents=True, exist_ok=True)
    source = cfg.reward_fn or (Path(cfg.reward_model).name if cfg.reward_model else "none")
    header = (f"eval: {len(prompts)} held-out prompts x {s.samples_per_prompt} samples (temperature {s.temperature:g}, "
              f"max_new_tokens {s.max_new_tokens}) + greedy; scores: {source}; win rate vs {ref_name} per prompt"
              f"{f' (ties within {s.tie_margin:g})' if s.tie_margin else ''}, {s.confidence:.0%} bootstrap CI "
              f"({s.bootstrap_resamples} resamples, seed {s.seed})")
    shown = report.shown_samples(prompt_texts, {name: greedy for name, (_, greedy, _) in done.items()},
                                 min(2, s.num_samples))
    text = report.table(models, ref_name, header) + ("\n\ngreedy completions:\n" + shown if shown else "") + "\n"
    rundir.write_text(out / "table.txt", text)
    report.plot(models, ref_name, out / "eval.png", f"eval: {', '.join(models)} vs {ref_name}",
                "reward function" if cfg.reward_fn else "reward model")
    samples = [row for name, (sampled, greedy, _) in done.items()
               for row in report.samples(prompt_texts, name, sampled, greedy, s.num_samples, s.samples_per_prompt)]
    report.write_samples(out / "samples.jsonl", samples)
    log.info("eval:\n%s", text)
    return {"before": report.numbers(models[ref_name]), "after": report.numbers(models[best]), "best": best,
            "reference": ref_name, "models": models, "scored": scored,
            "settings": {"prompts": len(prompts), "samples_per_prompt": s.samples_per_prompt,
                         "temperature": s.temperature, "max_new_tokens": s.max_new_tokens, "seed": s.seed,
                         "bootstrap_resamples": s.bootstrap_resamples, "confidence": s.confidence,
                         "tie_margin": s.tie_margin,
                         "scores": cfg.reward_fn or cfg.reward_model},
            "rows": {"eval": len(prompts)}}
