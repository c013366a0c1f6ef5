"""The checks that need the tokenizer, before any model loads: chat roles and the length policy.

Length policy (``data.on_long_row``: truncate | skip | error; null = the stage's default). A row longer
than the stage's limit is never dropped or cut silently: it is counted (log, metrics.json
``data.too_long``) and handled as the option says. A stage's entry in `rlhf_dist.registry` names its rule
(`length_rule`, one of `RULES`), the `training` field that limits it (`length_limit`) and its default
(`long_rows`):

| rule           | stage  | limit (training.)  | measured                          | default  | truncate keeps             |
|----------------|--------|--------------------|-----------------------------------|----------|----------------------------|
| completion     | sft    | max_length         | prompt + completion (+ EOS)       | truncate | the start (TRL's collator) |
| tokenised_pair | reward | max_length         | prompt + the longer answer (+EOS) | skip     | the start (tokenised here) |
| pair           | dpo    | max_length         | prompt + the longer answer (+EOS) | truncate | the start (TRL's collator) |
| prompt         | ppo    | max_prompt_length  | the prompt                        | truncate | the end (left truncation)  |

The defaults are what the trainers do on their own (TRL's SFT and DPO collators truncate, TRL's
RewardTrainer drops pairs over max_length; prompts are cut on the left as TRL's GRPO does, keeping the
turn the model answers). A DPO row whose prompt alone fills max_length keeps no answer token under
truncation: TRL drops it, and here it is counted as skipped (``prompt_fills_max_length``); so does TRL's
SFTTrainer with a prompt that fills max_length (when the loss is on the completion only). The reward
stage's rows are tokenised here exactly as TRL's RewardTrainer would, so the counts are exact and
`truncate` is possible there too. Pretraining has no such rows: texts are concatenated into blocks.
"""

from __future__ import annotations

import logging
from typing import Any

from rlhf_dist import registry
from rlhf_dist.errors import DataError

log = logging.getLogger("rlhf_dist")

RULES = ("completion", "pair", "tokenised_pair", "prompt")
PROBE = "rlhf-dist-role-probe"


def token_ids(tokenizer, value: Any, generation_prompt: bool = False) -> list[int]:
    """Token ids of a string, or of a message list through the chat template (as TRL tokenises them)."""
    if isinstance(value, list):
        kw = {"add_generation_prompt": True} if generation_prompt else {}
        return list(tokenizer.apply_chat_template(value, tokenize=True, return_dict=True, **kw)["input_ids"])
    return list(tokenizer(text=value)["input_ids"])


def _with_eos(tokenizer, text: Any) -> Any:
    eos = tokenizer.eos_token
    return text + eos if isinstance(text, str) and eos and not text.endswith(eos) else text


# ----------------------------------------------------------------------------------------------
# Chat roles
# ----------------------------------------------------------------------------------------------
def template_roles(tokenizer, roles: set[str]) -> dict[str, bool]:
    """For each role, whether the chat template renders a message of it (its text appears in the output)."""
    out = {}
    for role in sorted(roles):
        probe = {"role": role, "content": PROBE}
        ok = False
        for messages in ([probe], [{"role": "user", "content": "hi"}, probe], [probe, {"role": "user", "content": "hi"}]):
            try:
                text = tokenizer.apply_chat_template(messages, tokenize=False)
            except Exception:  # templates raise on roles (or orders) they do not take
                continue
            if PROBE in text:
                ok = True
                break
        out[role] = ok
    return out


def check_roles(tokenizer, roles: set[str], source: str, model: str) -> None:
    """Message lists need a chat template, and every role in them must be one the template renders."""
    if not roles:
        return
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"{source}: the data holds chat messages, but the tokenizer of {model} has no chat template; "
                        "use a chat (instruct) model's tokenizer, or give the data as plain strings")
    support = template_roles(tokenizer, roles | {"user", "assistant", "system"})
    unknown = sorted(r for r in roles if not support[r])
    if unknown:
        known = ", ".join(r for r, ok in support.items() if ok and r not in unknown) or "none"
        raise DataError(f"{source}: chat role(s) {', '.join(repr(r) for r in unknown)} are not rendered by the chat "
                        f"template of {model} (it renders: {known}); rename them in the data (e.g. human -> user, "
                        "gpt -> assistant)")


# ----------------------------------------------------------------------------------------------
# Lengths
# ----------------------------------------------------------------------------------------------
def measure(rule: str, row: dict, tokenizer) -> tuple[int, int]:
    """(length compared with the limit, prompt length) of one canonical row under the `completion` or `pair` rule
    (reward pairs and PPO prompts are measured on their token ids, see `apply`)."""
    if rule == "completion" and "text" in row:
        return len(token_ids(tokenizer, _with_eos(tokenizer, row["text"]))), 0
    prompt = row["prompt"]
    answers = [row["completion"]] if rule == "completion" else [row["chosen"], row["rejected"]]
    lengths = [len(token_ids(tokenizer, prompt + _with_eos(tokenizer, a))) for a in answers]
    return max(lengths), len(token_ids(tokenizer, prompt, generation_prompt=isinstance(prompt, list)))


def policy(stage: str, data_cfg) -> str:
    """What happens to a row over the limit: data.on_long_row, else the stage's default."""
    return data_cfg.on_long_row or registry.get(stage).long_rows


def apply(stage: str, cfg, datasets_: dict[str, Any], tokenizer, report) -> dict[str, Any]:
    """Apply the stage's length policy to each split ({"train": ds, "eval": ds}); returns the new splits.

    Counts go to ``report.too_long[split]``; under the `tokenised_pair` rule (reward) the splits come back
    tokenised (``chosen_ids`` / ``rejected_ids``), under `prompt` (ppo) with ``input_ids`` (the prompt).
    """
    spec = registry.get(stage)
    rule = spec.length_rule
    if rule is None:
        return datasets_
    if rule not in RULES:
        raise ValueError(f"stage {stage}: unknown length_rule {rule!r}; choose from {', '.join(RULES)}")
    limit = getattr(cfg.training, spec.length_limit, None)
    action = policy(stage, cfg.data)
    key = f"{stage}.training.{spec.length_limit}"
    # Every row is measured here and a long one counted and handled as `action` says: the tokenizer's own warning
    # about sequences longer than its model_max_length would only repeat it (marked as given, as the tokenizer does).
    getattr(tokenizer, "deprecation_warnings", {})["sequence-length-is-longer-than-the-specified-maximum"] = True
    out = {}
    for split, ds in datasets_.items():
        if ds is None:
            out[split] = ds
            continue
        rows = ds.to_list()
        keep, counts, over = [], {}, []
        for i, text_row in enumerate(rows):
            row = text_row
            if rule == "tokenised_pair":  # tokenised once, as TRL would: the lengths are those of what is trained
                row = _tokenised_pair(text_row, tokenizer)
                n, prompt_n = max(len(row["chosen_ids"]), len(row["rejected_ids"])), 0
            elif rule == "prompt":
                row = {**text_row, "input_ids": token_ids(tokenizer, text_row["prompt"], generation_prompt=True)}
                n = prompt_n = len(row["input_ids"])
            else:
                n, prompt_n = measure(rule, text_row, tokenizer)
            if limit is not None and n > limit:
                over.append((i, n, text_row))
                if action == "skip":
                    counts["skipped"] = counts.get("skipped", 0) + 1
                    continue
                if action == "truncate":
                    if prompt_n >= limit and _answer_lost(rule, cfg):  # TRL would drop it: no answer token is left
                        counts["prompt_fills_max_length"] = counts.get("prompt_fills_max_length", 0) + 1
                        continue
                    counts["truncated"] = counts.get("truncated", 0) + 1
                    if rule == "tokenised_pair":
                        row = {**row, "chosen_ids": row["chosen_ids"][:limit], "rejected_ids": row["rejected_ids"][:limit]}
                    elif rule == "prompt":
                        row = {**row, "input_ids": row["input_ids"][-limit:]}
            keep.append(row)
        source = cfg.data.eval_path if split == "eval" and cfg.data.eval_path else cfg.data.path
        if over and action == "error":
            longest = max(over, key=lambda x: x[1])
            preview = str(longest[2].get("prompt", longest[2].get("text", "")))[:60].replace("\n", " ")
            raise DataError(f"{source}: {len(over)} of {len(rows)} {split} rows are longer "
                            f"than {key}={limit} tokens (longest {longest[1]}: '{preview}...'); raise the limit, or set "
                            f"{stage}.data.on_long_row=truncate or skip")
        if counts:
            report.too_long[split] = {"limit": limit, "action": action, **counts}
            log.warning("%s: %d of %d %s rows are longer than %s=%d tokens: %s", stage, len(over), len(rows), split, key,
                        limit, ", ".join(f"{k} {v}" for k, v in counts.items()))
        if not keep:
            raise DataError(f"{source}: no {split} rows are left after the length policy ({action} rows over {key}="
                            f"{limit}); raise the limit or set {stage}.data.on_long_row=truncate")
        if len(keep) == len(rows) and rule in ("completion", "pair"):  # nothing dropped, no columns added: the same rows
            out[split] = ds
            continue
        import datasets

        out[split] = datasets.Dataset.from_list(keep)
    return out


def _answer_lost(rule: str, cfg) -> bool:
    """Whether TRL drops a row whose prompt alone fills max_length (its loss would have no token left)."""
    if rule == "pair":
        return True
    return rule == "completion" and getattr(cfg.training, "completion_only_loss", None) is not False


def _tokenised_pair(row: dict, tokenizer) -> dict:
    """A reward pair as TRL's RewardTrainer tokenises it (EOS after string answers; prompt + answer)."""
    prompt = row["prompt"]
    return {
        "chosen_ids": token_ids(tokenizer, prompt + _with_eos(tokenizer, row["chosen"])),
        "rejected_ids": token_ids(tokenizer, prompt + _with_eos(tokenizer, row["rejected"])),
    }
