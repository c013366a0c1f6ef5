"""Stage `sft`: supervised fine-tuning with TRL's SFTTrainer, full or LoRA; eval loss before and after.

Data: `text`, `prompt`/`completion` (strings or messages), or `messages` (a chat whose last,
assistant, message is the completion). The loss is on the completion only by default
(`sft.training.completion_only_loss`), and EOS is appended to string completions and never
masked, so the model learns to stop.

    rlhf-dist sft --recipe demo --output runs/demo
    accelerate launch -m rlhf_dist sft --recipe my.yaml --output runs/x
    rlhf-dist sft --recipe my.yaml --output runs/x sft.lora.enabled=true sft.lora.r=8

Writes OUTPUT/sft: model (merged; plus `adapter/` with LoRA), tokenizer, config.yaml, metrics.json, README.md.
"""

from __future__ import annotations

from rlhf_dist.models import load_causal_lm, peft_config, save_model
from rlhf_dist.stages.common import StageContext, perplexity
from rlhf_dist.stages.fit import fit


def run(ctx: StageContext) -> dict:
    from trl import SFTTrainer

    cfg = ctx.cfg
    model = load_causal_lm(cfg.init_from, cfg)
    trainer = SFTTrainer(model=model, args=cfg.training, train_dataset=ctx.train, eval_dataset=ctx.eval,
                         processing_class=ctx.tokenizer, peft_config=peft_config(cfg.lora, "CAUSAL_LM"))

    before, after, extra = fit(trainer, ctx, trainer.evaluate)
    save_model(trainer, ctx.tokenizer, ctx.final_dir, cfg, load_causal_lm)

    def report(m):
        out = {"eval_loss": m["eval_loss"], "perplexity": perplexity(m["eval_loss"])}
        if "eval_mean_token_accuracy" in m:
            out["token_accuracy"] = m["eval_mean_token_accuracy"]
        return out

    return {"before": report(before), "after": report(after), **extra}

