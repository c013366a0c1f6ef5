"""Run identity: which keys of a resolved config decide what a stage computes, its fingerprint, and the keys in which
two runs differ. `rlhf_dist.rundir` asks it whether a run directory holds "the same run". Light: no torch."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from rlhf_dist.config.sections import WatchdogSection

# Keys of the resolved config that do not change what a stage computes; ignored when deciding
# whether a run directory holds "the same run" (so such a change neither refuses nor re-runs a stage).
VOLATILE_KEYS = {"run_dir", "data.num_proc"} | {f"watchdog.{f.name}" for f in dataclasses.fields(WatchdogSection)} | {
    f"training.{k}" for k in (
    "output_dir", "logging_dir", "run_name", "report_to", "disable_tqdm", "logging_steps", "logging_strategy",
    "logging_first_step", "log_level", "log_level_replica", "hub_token", "push_to_hub", "hub_model_id", "hub_strategy",
    "hub_private_repo", "save_strategy", "save_steps", "save_total_limit", "save_only_model", "per_device_eval_batch_size",
    "eval_accumulation_steps", "dataloader_num_workers", "dataloader_pin_memory", "dataloader_persistent_workers",
    "dataloader_prefetch_factor", "dataset_num_proc", "num_sample_completions", "eval_max_prompts", "ddp_timeout",
)}


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _stable(resolved: dict) -> dict[str, str]:
    """Dotted key -> JSON value, volatile keys dropped, the run directory written as ${output}."""
    run_dir = resolved.get("run_dir")
    out = {}
    for key, value in _flatten(resolved).items():
        if key in VOLATILE_KEYS:
            continue
        text = json.dumps(value, sort_keys=True)
        out[key] = text.replace(run_dir, "${output}") if run_dir else text
    return out


def fingerprint(resolved: dict) -> str:
    """Hash of what decides a stage's result; unchanged by volatile keys or by moving the run directory."""
    return hashlib.sha256(json.dumps(_stable(resolved), sort_keys=True).encode()).hexdigest()[:16]


def diff_keys(old: dict, new: dict) -> list[str]:
    """Dotted keys whose values differ between two resolved configs (volatile keys ignored)."""
    a, b = _stable(old), _stable(new)
    return sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
