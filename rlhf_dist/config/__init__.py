"""Typed configuration: one dataclass per stage, pipeline recipes in YAML, command-line overrides.

A *recipe* is one YAML file holding the shared sections (`model`, `lora`, `quantization`, `data`)
and one section per stage. A stage section may repeat any shared section to override it for that
stage, and has a `training` section that takes every field of the matching Hugging Face config
class (`transformers.TrainingArguments` for pretrain, `trl.SFTConfig`, `trl.RewardConfig`,
`trl.DPOConfig`)::

    model: {name_or_path: Qwen/Qwen2.5-0.5B, dtype: bfloat16}
    data: {num_proc: 4}                      # defaults for every stage's `data`
    stages: [sft, reward, dpo]
    sft:
      lora: {enabled: true, r: 16}
      data: {path: HuggingFaceH4/ultrachat_200k, split: train_sft}
      training: {learning_rate: 2.0e-5, num_train_epochs: 1}

Any field can be overridden on the command line as `section.key=value`, for example
`sft.training.learning_rate=1e-5` or `model.name_or_path=./my-model`. Unknown keys fail with a
suggestion, values are checked against the field's type and, for numbers, its valid range (`RANGES`:
every numeric field of our sections and the common ones of the Hugging Face/TRL `training` sections), and
`${output}` in any string is replaced by the run directory. `rlhf-dist fields STAGE` lists every field with
its help text.

The package, one concern a module (import from the module; this file imports nothing, so the light modules stay
light):

* `sections` - the shared sections (model, lora, quantization, data, watchdog) and `StageConfig`, their base
* `stages` - the typed configs of the Trainer stages (pretrain, sft, reward, dpo) and our `training` defaults
* `ppo` - the PPO stage's config: the loop's hyper-parameters and its guardrails
* `coerce` - valid ranges of every numeric field, and plain values turned into typed dataclasses
* `resolve` - a recipe (after overrides) resolved into one stage's typed config; redaction; `fields` help
* `identity` - what decides whether a run directory holds "the same run" (fingerprint, differing keys)

Which stages exist, and which config class each takes, is `rlhf_dist.registry`.
"""
