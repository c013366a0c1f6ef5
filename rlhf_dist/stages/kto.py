"""Stage `kto`: Kahneman-Tversky optimisation (TRL KTOTrainer) on unpaired good / bad completions.

KTO (Ethayarajh et al. 2024) learns from single completions labelled desirable or not (thumbs up / down), not
pairs. Data: `prompt` + `completion` + `label` (true / false), strings or messages; preference pairs work too,
each giving its chosen answer labelled true and its rejected one false. The reference is a frozen copy of the
starting model or, with LoRA, the same model with its adapter disabled.

Reported on every held-out row, before and after: the implicit reward r = beta * (log pi - log pi_ref) of the
completion; `accuracy` the share of rows whose reward has the label's sign (r > 0 for a desirable completion,
r < 0 for an undesirable one; r = 0, as before training, counts one half), `ties`, `margin` (the mean reward of
the desirable rows minus that of the undesirable ones), `rows`, and TRL's `kl` and eval loss.

    rlhf-dist kto --recipe demo --output runs/demo
    accelerate launch -m rlhf_dist kto --recipe my.yaml --output runs/x
    rlhf-dist kto --recipe my.yaml --output runs/x kto.training.desirable_weight=1.33

Writes OUTPUT/kto: model (merged; plus `adapter/` with LoRA), tokenizer, config.yaml, metrics.json, README.md.
"""

from __future__ import annotations

import torch

from rlhf_dist.stages.common import StageContext
from rlhf_dist.stages.dpo import log_ratio, train_against_reference
from rlhf_dist.stages.reward import held_out_margins


def label_metrics(rewards: torch.Tensor, labels: torch.Tensor) -> dict:
    """Label agreement of implicit rewards [N] with good/bad labels [N] (a zero reward counts one half), the tie share,
    and the margin: mean reward of the good rows minus that of the bad ones (0 for a side that has no row)."""
    good = labels.bool()
    signed = torch.where(good, rewards, -rewards)
    wins, ties = (signed > 0).float(), (signed == 0).float()
    mean = {side: float(rewards[mask].mean()) if bool(mask.any()) else 0.0 for side, mask in (("good", good), ("bad", ~good))}
    return {"accuracy": float((wins + 0.5 * ties).mean()), "ties": float(ties.mean()), "margin": mean["good"] - mean["bad"],
            "rows": len(rewards)}


def label_eval(trainer) -> dict:
    """`label_metrics` over every held-out row of every process."""

    def reward_and_label(batch):
        batch = trainer._prepare_inputs(batch)
        return torch.stack([trainer.beta * log_ratio(trainer, batch), batch["label"].float()], dim=1)

    both = held_out_margins(trainer, reward_and_label)
    return label_metrics(both[:, 0], both[:, 1])


def run(ctx: StageContext) -> dict:
    from trl import KTOTrainer

    before, after, extra = train_against_reference(ctx, KTOTrainer, label_eval)

    def report(m):
        return {"accuracy": m["accuracy"], "ties": m["ties"], "margin": m["margin"], "rows": m["rows"],
                "kl": m.get("eval_kl"), "eval_loss": m["eval_loss"]}

    return {"before": report(before), "after": report(after), **extra}
