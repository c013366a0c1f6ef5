"""What the eval stage measures, as helpers that know no stage: `metrics` (pure: win rate and its bootstrap interval,
distinct-n, degeneration flags, the k1 KL), `measure` (one model on held-out prompts: greedy and sampled completions,
scores, KL, perplexity), `report` (the table, the plot, the samples file)."""

from rlhf_dist.evaluation.metrics import bootstrap_interval, degeneration, distinct_n, kl_k1, outcomes, win_rate

__all__ = ["bootstrap_interval", "degeneration", "distinct_n", "kl_k1", "outcomes", "win_rate"]
