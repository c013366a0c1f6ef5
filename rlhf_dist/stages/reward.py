"""Stage `reward`: a reward model (sequence classifier, one score) trained on preference pairs.

Loss: -log sigmoid(r(chosen) - r(rejected)) (Bradley-Terry), TRL's RewardTrainer. Reported: the
pairwise accuracy (share of held-out pairs with r(chosen) > r(rejected), a tie counting one half), the
share of ties and the mean margin, before and after training, computed over every held-out pair.
The pairs come tokenised from `rlhf_dist.lengths` (as TRL would tokenise them), so what the length
policy counted is exactly what is trained.

    rlhf-dist reward --recipe demo --output runs/demo
    accelerate launch -m rlhf_dist reward --recipe my.yaml --output runs/x
    rlhf-dist reward --recipe my.yaml --output runs/x reward.data.path=Anthropic/hh-rlhf

Writes OUTPUT/reward: model, tokenizer, config.yaml, metrics.json, README.md.
"""

from __future__ import annotations

import torch

from rlhf_dist.models import load_reward_model, peft_config, save_model
from rlhf_dist.stages.common import StageContext
from rlhf_dist.stages.fit import fit


@torch.no_grad()
def held_out_margins(trainer, margin) -> torch.Tensor:
    """`margin(batch)` ([B] for a [chosen; rejected] batch of 2B rows) over every held-out pair of every process, the
    model in eval mode (restored after)."""
    model = trainer.model
    was_training = model.training
    model.eval()
    margins = [trainer.accelerator.gather_for_metrics(margin(batch)) for batch in trainer.get_eval_dataloader()]
    model.train(was_training)
    return torch.cat(margins)


def pairwise_eval(trainer) -> dict:
    """Accuracy and mean margin of r(chosen) - r(rejected) over the whole eval set (all ranks)."""

    def margin(batch):
        batch = {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask")}
        chosen, rejected = trainer.model(**batch, use_cache=False).logits.squeeze(-1).float().chunk(2)
        return chosen - rejected

    return pair_metrics(held_out_margins(trainer, margin))


def pair_metrics(margins: torch.Tensor) -> dict:
    """Pairwise accuracy with a tie (margin exactly 0) counted as one half, the tie share, the mean margin."""
    wins, ties = (margins > 0).float(), (margins == 0).float()
    return {"accuracy": (wins + 0.5 * ties).mean().item(), "ties": ties.mean().item(), "margin": margins.mean().item(),
            "pairs": len(margins)}


def run(ctx: StageContext) -> dict:
    from trl import RewardTrainer

    cfg = ctx.cfg

    def loader(path, c):
        return load_reward_model(path, c, ctx.tokenizer)

    model = loader(cfg.init_from, cfg)
    trainer = RewardTrainer(model=model, args=cfg.training, train_dataset=ctx.train, eval_dataset=ctx.eval,
                            processing_class=ctx.tokenizer, peft_config=peft_config(cfg.lora, "SEQ_CLS"))

    before, after, extra = fit(trainer, ctx, lambda: pairwise_eval(trainer))
    save_model(trainer, ctx.tokenizer, ctx.final_dir, cfg, loader)
    return {"before": before, "after": after, **extra}

