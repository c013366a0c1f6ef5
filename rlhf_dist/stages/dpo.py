"""Stage `dpo`: direct preference optimisation (TRL DPOTrainer) on preference pairs.

The reference model is a frozen copy of the starting model, or, with LoRA, the same model with
its adapter disabled (no second copy in memory). Reported on every held-out pair, before and after:
the implicit-reward accuracy (a tie counts one half; TRL's own, ties as wrong, as trl_accuracy), the share
of ties, the margin, beta * [(log pi - log pi_ref)(chosen) - (...)(rejected)],
and the policy's log-probabilities of chosen and rejected answers.

    rlhf-dist dpo --recipe demo --output runs/demo
    accelerate launch -m rlhf_dist dpo --recipe my.yaml --output runs/x
    rlhf-dist dpo --recipe my.yaml --output runs/x dpo.training.beta=0.05

Writes OUTPUT/dpo: model (merged; plus `adapter/` with LoRA), tokenizer, config.yaml, metrics.json, README.md.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch

from rlhf_dist.models import load_causal_lm, peft_config, save_model
from rlhf_dist.stages.common import StageContext
from rlhf_dist.stages.fit import fit
from rlhf_dist.stages.reward import held_out_margins, pair_metrics


def _sequence_logps(model, batch) -> torch.Tensor:
    """Sum of log pi(token) over each row's completion tokens ([2B] for a [chosen; rejected] batch)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    logps = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    token = torch.gather(logps, 2, batch["input_ids"][:, 1:].unsqueeze(-1)).squeeze(-1)
    return (token * batch["completion_mask"][:, 1:]).sum(dim=1)


def log_ratio(trainer, batch) -> torch.Tensor:
    """log pi(completion) - log pi_ref(completion) of every row of a (TRL DPO or KTO) batch, summed over the completion
    tokens. The reference: the precomputed column (DPO's ref_chosen/rejected_logps, KTO's ref_logps), the trainer's
    ref_model, or with LoRA the policy with its adapter off."""
    from accelerate.utils import is_peft_model

    logps = _sequence_logps(trainer.model, batch)
    if "ref_chosen_logps" in batch:
        ref = torch.cat([batch["ref_chosen_logps"], batch["ref_rejected_logps"]])
    elif "ref_logps" in batch:
        ref = batch["ref_logps"]
    elif trainer.ref_model is not None:
        ref = _sequence_logps(trainer.ref_model, batch)
    else:  # LoRA: the reference is the policy with its adapter off
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        off = unwrapped.disable_adapter() if is_peft_model(unwrapped) else contextlib.nullcontext()
        with off:
            ref = _sequence_logps(trainer.model, batch)
    return logps - ref


def pairwise_eval(trainer) -> dict:
    """Implicit-reward accuracy over every held-out pair, a tie counting one half (TRL's own counts a tie as wrong:
    before training, when the policy is the reference, every pair ties and its accuracy reads 0).

    margin = beta * [(log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)], TRL's implicit reward.
    """

    def margin(batch):
        chosen, rejected = log_ratio(trainer, trainer._prepare_inputs(batch)).chunk(2)
        return trainer.beta * (chosen - rejected)

    return pair_metrics(held_out_margins(trainer, margin))


def train_against_reference(ctx: StageContext, trainer_class, held_out: Callable[[Any], dict]) -> tuple[dict, dict, dict]:
    """A TRL trainer with a frozen reference (`trainer_class`: DPOTrainer, KTOTrainer): a second copy of the starting
    model, or with LoRA none (the policy with its adapter off); trained by `fit`, its evaluation joined by
    `held_out(trainer)`'s figures, the model saved. Returns `fit`'s (before, after, extra)."""
    cfg = ctx.cfg
    model = load_causal_lm(cfg.init_from, cfg)
    lora = peft_config(cfg.lora, "CAUSAL_LM")
    ref_model = None if lora is not None else load_causal_lm(cfg.init_from, cfg)
    trainer = trainer_class(model=model, ref_model=ref_model, args=cfg.training, train_dataset=ctx.train,
                            eval_dataset=ctx.eval, processing_class=ctx.tokenizer, peft_config=lora)
    out = fit(trainer, ctx, lambda: {**trainer.evaluate(), **held_out(trainer)})
    save_model(trainer, ctx.tokenizer, ctx.final_dir, cfg, load_causal_lm)
    return out


def run(ctx: StageContext) -> dict:
    from trl import DPOTrainer

    before, after, extra = train_against_reference(ctx, DPOTrainer, pairwise_eval)

    def report(m):
        return {
            "accuracy": m["accuracy"],
            "ties": m["ties"],
            "margin": m["margin"],
            "pairs": m["pairs"],
            "trl_accuracy": m["eval_rewards/accuracies"],  # TRL's: a tie counts as wrong
            "logp_chosen": m["eval_logps/chosen"],
            "logp_rejected": m["eval_logps/rejected"],
            "eval_loss": m["eval_loss"],
        }

    return {"before": report(before), "after": report(after), **extra}

