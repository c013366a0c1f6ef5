"""Training curves as PNG files: one per stage (`OUTPUT/S/training.png`) and one per run (`OUTPUT/summary.png`).

Drawn from the Trainer's `log_history` (also saved as `OUTPUT/S/log_history.json`) with matplotlib's
file-only backend, so it works on headless machines.
"""

from __future__ import annotations

from pathlib import Path

LOSS_KEYS = (("loss", "train loss"), ("eval_loss", "eval loss"))
# The PPO stage's log (one entry per step): what a person watches, one panel each.
PPO_PANELS = (
    ("reward", (("objective/scores", "score (reward model)"), ("objective/rlhf_reward", "score - beta * KL"))),
    ("KL to the reference (nats / response)", (("objective/kl", "KL"),)),
    ("entropy (nats / token)", (("policy/entropy", "entropy"),)),
    ("update (share / nats)", (("policy/clipfrac", "clip fraction"), ("policy/approx_kl_k2", "approx KL k2 (old -> new)"),
                               ("value/clipfrac", "value clip fraction"))),
)


def is_ppo(history: list[dict]) -> bool:
    return any("objective/scores" in entry for entry in history)


def curves(history: list[dict], keys=LOSS_KEYS) -> dict[str, tuple[list[float], list[float]]]:
    """{"train loss": (steps, values), "eval loss": (...)} from a Trainer log_history (or other `keys`)."""
    out: dict[str, tuple[list[float], list[float]]] = {}
    for entry in history:
        step = entry.get("step")
        for key, name in keys:
            if step is not None and isinstance(entry.get(key), (int, float)):
                out.setdefault(name, ([], []))
                out[name][0].append(step)
                out[name][1].append(float(entry[key]))
    return out


def _draw(ax, history: list[dict], title: str) -> None:
    if is_ppo(history):
        _draw_ppo(ax, history, PPO_PANELS[0][1] + PPO_PANELS[1][1], title, "value")
        return
    found = curves(history)
    for name, (steps, values) in sorted(found.items(), reverse=True):  # train loss first, in the same colour
        ax.plot(steps, values, marker="o" if name == "eval loss" else None, markersize=4, label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if found:
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no losses logged\n(lower training.logging_steps)", ha="center", va="center",
                transform=ax.transAxes)


def _draw_ppo(ax, history: list[dict], keys, title: str, ylabel: str) -> None:
    drawn = curves(history, keys)
    for name, (steps, values) in drawn.items():
        ax.plot(steps, values, label=name)
    ax.set_title(title)
    ax.set_xlabel("PPO step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=8)
    else:  # e.g. every ratio undefined: all responses left out of the loss (overlong_filter)
        ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)


def plot_stage(history: list[dict], path: str | Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if is_ppo(history):  # reward, KL, entropy and the update's health, one panel each
        fig, axes = plt.subplots(2, 2, figsize=(11, 7), dpi=100)
        for ax, (name, keys) in zip(axes.flat, PPO_PANELS):
            _draw_ppo(ax, history, keys, name, name.split(" (")[0])
        fig.suptitle(title)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
        return Path(path)
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    _draw(ax, history, title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_run(histories: dict[str, list[dict]], path: str | Path) -> Path:
    """One panel per stage, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(len(histories), 1)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.8), dpi=100, squeeze=False)
    for ax, (stage, history) in zip(axes[0], histories.items()):
        _draw(ax, history, stage)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
