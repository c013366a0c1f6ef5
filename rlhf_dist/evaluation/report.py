"""The eval stage's figures per model, and what a person reads: a table (`table.txt`), a plot (`eval.png`) and the
samples (`samples.jsonl`). Knows no stage; `figures` turns one model's completions into its numbers."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path
from typing import Any

from rlhf_dist.evaluation.metrics import distinct_n, win_rate

# metrics.json keys per model -> column header; the table shows them in this order
COLUMNS = (("score", "score"), ("greedy_score", "greedy score"), ("win_rate", "win rate [CI]"), ("kl", "KL"),
           ("response_length", "length"), ("eos_rate", "EOS"), ("distinct_1", "dist-1"), ("distinct_2", "dist-2"),
           ("perplexity", "ppl"), ("degenerate", "degenerate"))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def figures(sampled, greedy, reference_sampled, reference_greedy, prompts: int, settings,
            ppl: float | None) -> dict[str, Any]:
    """One model's numbers (see the eval stage's docstring for each definition); score and win rates only when the
    completions carry scores. `reference_*`: the reference's completions (the model's own for the reference)."""
    from rlhf_dist.evaluation.measure import per_prompt

    out: dict[str, Any] = {}
    if sampled and sampled[0].score is not None:
        boot = {"resamples": settings.bootstrap_resamples, "seed": settings.seed, "confidence": settings.confidence,
                "tie_margin": settings.tie_margin}
        out["score"] = _mean([c.score for c in sampled])
        out["greedy_score"] = _mean([c.score for c in greedy])
        w = win_rate(per_prompt(sampled, prompts), per_prompt(reference_sampled, prompts), **boot)
        out.update(w)
        g = win_rate(per_prompt(greedy, prompts), per_prompt(reference_greedy, prompts), **boot)
        out.update({"greedy_win_rate": g["win_rate"], "greedy_ci_low": g["ci_low"], "greedy_ci_high": g["ci_high"]})
    if sampled and sampled[0].kl is not None:
        out["kl"] = _mean([c.kl for c in sampled])
    out["response_length"] = _mean([c.length for c in sampled])
    out["eos_rate"] = _mean([float(c.ended) for c in sampled])
    words = [c.text.split() for c in sampled]
    out["distinct_1"], out["distinct_2"] = distinct_n(words, 1), distinct_n(words, 2)
    if ppl is not None:
        out["perplexity"] = ppl
    out["degenerate"] = _mean([float(bool(c.flags)) for c in greedy])
    out["degenerate_reasons"] = dict(sorted(collections.Counter(f for c in greedy for f in c.flags).items()))
    out["greedy_response_length"] = _mean([c.length for c in greedy])
    return out


def numbers(fig: dict) -> dict[str, float]:
    """The plain numbers of a model's figures (what metrics.json's before / after hold)."""
    return {k: v for k, v in fig.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _cell(fig: dict, key: str) -> str:
    value = fig.get(key)
    if value is None:
        return "-"
    if key == "win_rate":
        return f"{value:.2f} [{fig['ci_low']:.2f}, {fig['ci_high']:.2f}]"
    if key == "response_length":
        return f"{value:.1f}"
    return f"{value:.2f}" if abs(value) < 1000 else f"{value:.3g}"


def table(models: dict[str, dict], reference: str, header: str = "") -> str:
    """Models as rows (the reference first), metrics as columns, fixed width."""
    names = {name: f"{name} (reference)" if name == reference else name for name in models}
    rows = [["model", *(title for _, title in COLUMNS)]]
    rows += [[names[name], *(_cell(fig, key) for key, _ in COLUMNS)] for name, fig in models.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return (header + "\n" if header else "") + "\n".join(lines)


def shown_samples(prompt_texts: list[str], completions: dict[str, list], count: int) -> str:
    """The first `count` prompts with every model's greedy completion and its degeneration flags."""
    lines = []
    for i, prompt in enumerate(prompt_texts[:count]):
        lines.append(f"prompt: {prompt!r}")
        width = max(len(name) for name in completions)
        for name, greedy in completions.items():
            c = greedy[i]
            flag = f"  [degenerate: {', '.join(c.flags)}]" if c.flags else ""
            lines.append(f"  {name:<{width}}  {c.text!r}{flag}")
    return "\n".join(lines)


def samples(prompt_texts: list[str], model: str, sampled, greedy, count: int, samples_per_prompt: int) -> list[dict]:
    """samples.jsonl rows of one model: the first `count` prompts, greedy and first sampled completion side by side."""
    rows = []
    for i, prompt in enumerate(prompt_texts[:count]):
        g, s = greedy[i], sampled[i * samples_per_prompt]
        rows.append({"model": model, "prompt": prompt, "greedy": g.text, "greedy_flags": g.flags,
                     "greedy_score": g.score, "greedy_ended": g.ended, "sampled": s.text, "sampled_score": s.score,
                     "sampled_kl": s.kl, "sampled_ended": s.ended})
    return rows


def write_samples(path: Path, rows: list[dict]) -> None:
    from rlhf_dist.atomic import write_text

    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def plot(models: dict[str, dict], reference: str, path: str | Path, title: str, judge: str = "reward model") -> Path:
    """Win rate against the reference with its interval (sampled) and the greedy one; mean score, sampled and greedy;
    the share of degenerate greedy completions and the EOS rate. One panel each, models on the x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(models)
    x = list(range(len(names)))
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), dpi=100)
    ax = axes[0]
    if any("win_rate" in f for f in models.values()):
        wr = [models[n].get("win_rate", math.nan) for n in names]
        low = [max(w - models[n].get("ci_low", w), 0) for w, n in zip(wr, names)]
        high = [max(models[n].get("ci_high", w) - w, 0) for w, n in zip(wr, names)]
        ax.errorbar(x, wr, yerr=[low, high], fmt="o", capsize=6, label="sampled (95% CI)" if names else None)
        ax.plot(x, [models[n].get("greedy_win_rate", math.nan) for n in names], "x", markersize=9, label="greedy")
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no reward model or function:\nno win rate", ha="center", va="center", transform=ax.transAxes)
    ax.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax.set_ylim(0, 1.03)
    ax.set_title(f"win rate vs {reference} ({judge})")
    ax = axes[1]
    width = 0.38
    ax.bar([i - width / 2 for i in x], [models[n].get("score", math.nan) for n in names], width, label="sampled")
    ax.bar([i + width / 2 for i in x], [models[n].get("greedy_score", math.nan) for n in names], width, label="greedy")
    ax.set_title("mean score")
    ax.legend(fontsize=8)
    ax = axes[2]
    ax.bar([i - width / 2 for i in x], [models[n]["degenerate"] for n in names], width, color="tab:red",
           label="degenerate (greedy)")
    ax.bar([i + width / 2 for i in x], [models[n]["eos_rate"] for n in names], width, color="tab:green",
           label="EOS rate (sampled)")
    ax.set_ylim(0, 1.05)
    ax.set_title("share of completions")
    ax.legend(fontsize=8)
    for ax in axes:
        ax.set_xticks(x, [f"{n}\n(reference)" if n == reference else n for n in names])
        ax.grid(alpha=0.3, axis="y")
    fig.suptitle(title)
    fig.tight_layout()
    tmp = Path(path).with_name(Path(path).name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return Path(path)
