"""An Anthropic-HH-format file, as downloaded (gzipped JSON lines of whole conversations, with empty final turns,
identical pairs and over-long prompts), through sft, reward, ppo and dpo with recipe options only; the counts in
every metrics.json must match what was read, skipped, cut and trained."""

from __future__ import annotations

import json

import pytest
from helpers import cli

N, EMPTY, IDENTICAL, LONG = 160, 4, 3, 5


@pytest.mark.slow
def test_hh_file_through_every_stage_with_recipe_options_only(tmp_path, tiny_model):
    from rlhf_dist.demo import synthetic

    hh = tmp_path / "harmless-base" / "train.jsonl.gz"
    synthetic.hh_pairs(hh, n=N, n_empty=EMPTY, n_identical=IDENTICAL, n_long=LONG, long_words=120)
    common = 'per_device_train_batch_size: 8, save_strategy: "no", seed: 0, max_steps: 6, learning_rate: 1.0e-3'
    recipe = tmp_path / "hh.yaml"
    recipe.write_text(f"""
model: {{name_or_path: "{tiny_model}", dtype: float32}}
data: {{path: "{hh}", eval_fraction: 0.2, on_bad_row: skip, seed: 0}}
stages: [sft, reward, ppo, dpo]
sft:
  training: {{max_length: 96, {common}}}
reward:
  training: {{max_length: 96, {common}}}
dpo:
  training: {{max_length: 96, {common}}}
ppo:
  training: {{max_steps: 2, rollout_batch_size: 8, generation_batch_size: 4, mini_batch_size: 8,
             per_device_train_batch_size: 4, max_prompt_length: 64, max_new_tokens: 8, save_steps: 0, seed: 0,
             eval_max_prompts: 8}}
""")
    out = tmp_path / "run"
    first = cli("pipeline", "--recipe", str(recipe), "--output", str(out), timeout=900)
    assert first.returncode == 0, first.stderr[-4000:]
    usable = N - EMPTY - IDENTICAL
    for stage in ("sft", "reward", "ppo", "dpo"):
        data = json.loads((out / stage / "metrics.json").read_text())["data"]
        assert data["rows_read"] == N, (stage, data)
        assert data["bad_rows_skipped"] == {"empty_response": EMPTY, "identical": IDENTICAL}, (stage, data)
        long = data.get("too_long", {})
        counted = {split: {k: v for k, v in d.items() if k not in ("limit", "action")} for split, d in long.items()}
        cut = sum(sum(d.values()) for d in counted.values())
        assert cut >= LONG, (stage, data)  # every over-long prompt is counted (some answers may be over too)
        dropped = sum(d.get("skipped", 0) + d.get("prompt_fills_max_length", 0) for d in counted.values())
        assert data["train_rows"] + data["eval_rows"] == usable - dropped, (stage, data)
        if stage != "ppo":  # the trainer used exactly the rows it was given: TRL dropped nothing on its own
            assert data["train_rows_used"] == data["train_rows"] and data["eval_rows_used"] == data["eval_rows"], data
            assert not any(k.endswith("dropped_by_trainer") for k in data), data
        if stage == "reward":
            assert all(d["action"] == "skip" for d in long.values()) and dropped >= LONG
        if stage == "ppo":
            assert all(d["action"] == "truncate" for d in long.values()) and dropped == 0
        if stage in ("sft", "dpo"):  # truncated; only rows whose prompt alone fills max_length are dropped
            assert all(d["action"] == "truncate" and "skipped" not in d for d in long.values())
    reward = json.loads((out / "reward" / "metrics.json").read_text())
    assert reward["after"]["pairs"] == reward["data"]["eval_rows"]  # every held-out pair evaluated
    dpo = json.loads((out / "dpo" / "metrics.json").read_text())
    assert dpo["before"]["ties"] == 1.0 and dpo["before"]["accuracy"] == 0.5  # policy == reference: all ties, half
    assert dpo["before"]["trl_accuracy"] == 0.0  # TRL's own counts a tie as wrong
    assert dpo["after"]["pairs"] == dpo["data"]["eval_rows"]
