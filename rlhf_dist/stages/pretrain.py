"""Stage `pretrain`: domain-adaptive causal-LM training on raw text; reports perplexity before and after.

Texts are tokenised (each followed by EOS), concatenated and cut into `block_size`-token blocks
whose labels are the inputs (the classic `group_texts` recipe); the tail shorter than a block is
dropped.

    rlhf-dist pretrain --recipe demo --output runs/demo                      # one process
    accelerate launch -m rlhf_dist pretrain --recipe my.yaml --output runs/x   # several GPUs
    rlhf-dist pretrain --recipe my.yaml --output runs/x pretrain.training.max_steps=100

Writes OUTPUT/pretrain: model (safetensors), tokenizer, config.yaml, metrics.json, README.md.
"""

from __future__ import annotations

import logging
from itertools import chain

from rlhf_dist.errors import DataError
from rlhf_dist.models import load_causal_lm, peft_config, save_model
from rlhf_dist.stages.common import StageContext, perplexity
from rlhf_dist.stages.fit import fit

log = logging.getLogger("rlhf_dist")


def group_texts(dataset, tokenizer, block_size: int, num_proc: int | None, source: str):
    """Tokenise `text` (EOS after each), concatenate, and cut into blocks of `block_size` with labels."""

    def tokenize(batch):
        return tokenizer([t + tokenizer.eos_token for t in batch["text"]], add_special_tokens=True)

    def group(batch):
        joined = {k: list(chain.from_iterable(batch[k])) for k in ("input_ids", "attention_mask")}
        total = (len(joined["input_ids"]) // block_size) * block_size
        blocks = {k: [v[i : i + block_size] for i in range(0, total, block_size)] for k, v in joined.items()}
        blocks["labels"] = [list(b) for b in blocks["input_ids"]]
        return blocks

    tokens = dataset.map(tokenize, batched=True, num_proc=num_proc, remove_columns=dataset.column_names,
                         desc="Tokenizing")
    blocks = tokens.map(group, batched=True, batch_size=1000, num_proc=num_proc, desc=f"Grouping into {block_size}-token blocks")
    if len(blocks) == 0:
        raise DataError(f"{source}: fewer tokens than one block of {block_size}; lower pretrain.block_size or add text")
    return blocks, sum(len(ids) for ids in tokens["input_ids"])


def run(ctx: StageContext) -> dict:
    from transformers import Trainer, default_data_collator

    cfg = ctx.cfg
    model = load_causal_lm(cfg.init_from, cfg)
    block = min(cfg.block_size, getattr(model.config, "max_position_embeddings", cfg.block_size))
    with cfg.training.main_process_first(desc="tokenising"):  # ranks share the datasets cache
        train, train_tokens = group_texts(ctx.train, ctx.tokenizer, block, cfg.data.num_proc, ctx.data_source)
        evaluation, eval_tokens = group_texts(ctx.eval, ctx.tokenizer, block, cfg.data.num_proc, ctx.data_source + " (eval)")
    if block < cfg.block_size:
        log.warning("pretrain: block_size %d is more than the model's %d positions; blocks of %d tokens are used",
                    cfg.block_size, block, block)
    # Every text is used whole: they are concatenated, so no text is too long; what is left over at the end of each
    # 1000-text group (shorter than a block) is not trained on, and counted here.
    tokens = {"train": train_tokens, "eval": eval_tokens,
              "train_dropped": train_tokens - len(train) * block, "eval_dropped": eval_tokens - len(evaluation) * block}
    lora = peft_config(cfg.lora, "CAUSAL_LM")
    if lora is not None:
        from peft import get_peft_model

        model = get_peft_model(model, lora)
    trainer = Trainer(model=model, args=cfg.training, train_dataset=train, eval_dataset=evaluation,
                      data_collator=default_data_collator, processing_class=ctx.tokenizer)

    before, after, extra = fit(trainer, ctx, trainer.evaluate)
    save_model(trainer, ctx.tokenizer, ctx.final_dir, cfg, load_causal_lm)

    def report(m):
        return {"eval_loss": m["eval_loss"], "perplexity": perplexity(m["eval_loss"])}

    return {"before": report(before), "after": report(after), **extra,
            "blocks": {"block_size": block, "train": len(train), "eval": len(evaluation)}, "tokens": tokens}

