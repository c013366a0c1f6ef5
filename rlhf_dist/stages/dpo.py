"""Stage `dpo`: direct preference optimisation (TRL DPOTrainer) on preference pairs.

The reference model is a frozen copy of the starting model, or, with LoRA, the same model with
its adapter disabled (no second copy in memory). Reported on held-out pairs, before and after:
the implicit-reward accuracy and margin, beta * [(log pi - log pi_ref)(chosen) - (...)(rejected)],
and the policy's log-probabilities of chosen and rejected answers.

    rlhf-dist dpo --recipe demo --output runs/demo
    accelerate launch -m rlhf_dist dpo --recipe my.yaml --output runs/x
    rlhf-dist dpo --recipe my.yaml --output runs/x dpo.training.beta=0.05

Writes OUTPUT/dpo: model (merged; plus `adapter/` with LoRA), tokenizer, config.yaml, metrics.json, README.md.
"""

from __future__ import annotations

from rlhf_dist.models import load_causal_lm, peft_config, save_model
from rlhf_dist.stages.common import StageContext, stage_main
from rlhf_dist.stages.fit import fit

STAGE, DATA_KIND = "dpo", "preference"


def run(ctx: StageContext) -> dict:
    from trl import DPOTrainer

    cfg = ctx.cfg
    model = load_causal_lm(cfg.init_from, cfg)
    lora = peft_config(cfg.lora, "CAUSAL_LM")
    ref_model = None if lora is not None else load_causal_lm(cfg.init_from, cfg)
    trainer = DPOTrainer(model=model, ref_model=ref_model, args=cfg.training, train_dataset=ctx.train,
                         eval_dataset=ctx.eval, processing_class=ctx.tokenizer, peft_config=lora)

    before, after, extra = fit(trainer, ctx, trainer.evaluate)
    save_model(trainer, ctx.tokenizer, ctx.final_dir, cfg, load_causal_lm)

    def report(m):
        return {
            "accuracy": m["eval_rewards/accuracies"],
            "margin": m["eval_rewards/margins"],
            "logp_chosen": m["eval_logps/chosen"],
            "logp_rejected": m["eval_logps/rejected"],
            "eval_loss": m["eval_loss"],
        }

    return {"before": report(before), "after": report(after), **extra}


def main(argv: list[str] | None = None) -> int:
    return stage_main(STAGE, DATA_KIND, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
