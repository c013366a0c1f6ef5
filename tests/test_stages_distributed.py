"""2 processes equal 1 process: pretrain, sft (full and LoRA), reward and dpo under DDP, ZeRO-2 and ZeRO-3 (gloo, CPU).

One `accelerate launch --config_file launch/<case>.yaml --num_processes 2` per case, from the repository root,
runs this file as a script: it calls the stages one after the other in the same two processes, each
through the entry point of `python -m rlhf_dist STAGE` (`rlhf_dist.cli.main`), each in a fresh run
directory so that it starts from the tiny base model. One launch instead of one per stage saves about
15 s of imports per stage (4 launches of 2 processes on 2 cores cost ~25 s each before any training).
The one-process baseline runs the same script with `python`, with the SAME GLOBAL BATCH: 3 optimizer
steps of per_device_train_batch_size 4 on 1 process vs 2 on each of 2, no accumulation. The eval batch
per process is the same in both (8; pretrain 10, so that its 60 blocks fill whole batches on both ranks:
a batch padded by accelerate's even_batches shifts eval_loss by 2e-4, perplexity by 1e-3). The whole file
takes about 105 s on 2 cores: 3 launches of 25-30 s, and the one-process run.

Asserted per stage and case: world size 2, the accelerate distributed type and DeepSpeed ZeRO stage the
stage records, the saved weights, metrics.json's before/after metrics and every logged number of
log_history.json (timings aside) against the one-process run.

Stated tolerances, measured deviations (3 steps, learning rates of tests/conftest.py's recipe):
- Metrics and the log history: 1e-4 relative (1e-6 absolute). Measured at most 5e-6 (DPO rewards,
  grad_norm), most below 1e-6: float32 summation order (gradients all-reduced vs summed in one backward).
- TRL's token-weighted eval metrics (SFT `token_accuracy` = `eval_mean_token_accuracy`, `eval_entropy`; DPO
  `eval_logits/*`, `eval_mean_token_accuracy`, `eval_entropy`): 1e-2 relative (1e-4 absolute). Measured 1.4e-3
  (SFT token accuracy) and 2.0e-3 (DPO `eval_logits/rejected`, 4e-5 absolute). Not an error: TRL sums
  correct tokens over the processes of one eval step, then averages the steps; one eval step covers one
  batch on 1 process and 2 on 2 (the step-wise average is weighted differently). The same metrics during
  training, where a step covers the same global batch, match to 1e-6 and are held to 1e-4.
- Weights: 1e-4 absolute. Measured at most 1.1e-5 (reward), 5e-6 elsewhere, on weights that moved by up
  to 6e-3 (2e-3 in dpo): Adam divides each gradient by its running RMS, so elements whose gradient is near
  zero turn summation-order noise into updates of up to the learning rate. Unsynchronised processes (pretrain
  and sft when fit() evaluated before train(), which kept accelerate from wrapping the model in DDP) differ
  by 1.2e-2, and their eval_loss by 2e-2.
- The saved files hold the same tensors: under ZeRO-2 the stage saves the module itself (handing save_pretrained
  accelerate's cloned state dict would store the tied embedding twice, as `lm_head.weight` too), and a LoRA
  adapter is merged into a fresh load of the base (under ZeRO-3 the trained weights are partitioned).

DeepSpeed compiles its shared-memory comm op on first use (~55 s, cached in TORCH_EXTENSIONS_DIR).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import REPO, run_launched
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STAGES = ("pretrain", "sft", "reward", "dpo")
# run name -> (stage, extra overrides); sft_lora: a LoRA adapter, saved merged into the base (under ZeRO-3 the
# trained weights are partitioned, so the merge must not happen in place). Adapter dropout off: its random masks
# are drawn per process, so 2 processes cannot draw what 1 draws for the whole batch.
RUNS = {**{s: (s, []) for s in STAGES},
        "sft_lora": ("sft", ["sft.lora.enabled=true", "sft.lora.r=4", "sft.lora.dropout=0.0"])}
STEPS, BATCH = 3, 2  # optimizer steps; per-process train batch on 2 processes (2 * BATCH on one)
EVAL_BATCH = {"pretrain": 10, "sft": 8, "reward": 8, "dpo": 8}
TIMING = ("_runtime", "_per_second", "total_flos", "model_preparation_time")
STEP_AVERAGED = {"token_accuracy", "eval_mean_token_accuracy", "eval_entropy", "eval_logits/chosen", "eval_logits/rejected"}


def stage_overrides(stage: str, batch: int) -> list[str]:
    t = f"{stage}.training"
    return [f"{t}.max_steps={STEPS}", f"{t}.per_device_train_batch_size={batch}", f"{t}.logging_steps=1",
            f"{t}.per_device_eval_batch_size={EVAL_BATCH[stage]}"]


def run_stages(recipe: str, output: str, batch: str) -> int:
    """Script mode (under accelerate launch or plain python): every stage, each in OUTPUT/<stage>."""
    sys.path.insert(0, str(REPO))  # this checkout's rlhf_dist, as `python -m rlhf_dist` run from REPO imports it
    from rlhf_dist.cli import main

    for name, (stage, extra) in RUNS.items():
        code = main([stage, "--recipe", recipe, "--output", str(Path(output) / name), *stage_overrides(stage, int(batch)),
                     *extra])
        if code:
            return code
    return 0


def launch(prefix: list[str], rec: Path, out: Path, batch: int) -> subprocess.CompletedProcess:
    return run_launched([*prefix, str(Path(__file__).resolve()), str(rec), str(out), str(batch)], timeout=1200)


def stage_output(run: tuple[subprocess.CompletedProcess, Path], name: str) -> Path:
    """OUTPUT/<run name>/<stage>; the runs go in order in one launch: a stage that fails stops the later ones."""
    result, out = run
    folder = out / name / RUNS[name][0]
    errors = "\n".join([line for line in result.stderr.splitlines() if "Error:" in line][:6])
    assert (folder / "metrics.json").is_file(), (f"{name} did not run (exit {result.returncode}; runs in order: "
                                                 f"{', '.join(RUNS)}):\n{errors}\n...\n{result.stderr[-2000:]}")
    return folder


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, shared_recipe):
    out = tmp_path_factory.mktemp("stages_one")
    return launch([sys.executable], shared_recipe, out, 2 * BATCH), out


@pytest.fixture(scope="module", params=[("ddp", "MULTI_CPU", 0), ("zero2", "DEEPSPEED", 2), ("zero3", "DEEPSPEED", 3)],
                ids=["ddp", "zero2", "zero3"])
def two_processes(request, tmp_path_factory, shared_recipe):
    case, distributed_type, zero_stage = request.param
    out = tmp_path_factory.mktemp(f"stages_{case}")
    prefix = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/{case}.yaml", "--num_processes", "2"]
    return launch(prefix, shared_recipe, out, BATCH), out, case, distributed_type, zero_stage


def close(a: float, b: float, key: str) -> bool:
    """b matches a: within 1e-4 relative, or 1e-2 for TRL's eval-step-averaged token metrics (see the docstring)."""
    if key in STEP_AVERAGED:
        return b == pytest.approx(a, rel=1e-2, abs=1e-4)
    return b == pytest.approx(a, rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("name", RUNS)
def test_two_processes_equal_one(name, one_process, two_processes, tiny_model):
    result, out, case, distributed_type, zero_stage = two_processes
    stage = RUNS[name][0]
    single, multi = stage_output(one_process, name), stage_output((result, out), name)

    one_metrics = json.loads((single / "metrics.json").read_text())
    metrics = json.loads((multi / "metrics.json").read_text())
    assert one_metrics["world_size"] == 1
    assert metrics["world_size"] == 2  # really two processes (docs/cpu.md trap 1)
    assert metrics["train"]["distributed_type"] == distributed_type  # and really DeepSpeed, not DDP in disguise
    assert metrics["train"]["zero_stage"] == zero_stage
    assert one_metrics["train"]["global_step"] == metrics["train"]["global_step"] == STEPS
    # whole eval batches on both ranks (no padded batch, see the docstring)
    eval_items = metrics["blocks"]["eval"] if stage == "pretrain" else metrics["data"]["eval_rows"]
    assert eval_items % (2 * EVAL_BATCH[stage]) == 0, eval_items

    for phase in ("before", "after"):
        assert set(metrics[phase]) == set(one_metrics[phase])
        for k, v in one_metrics[phase].items():
            assert close(v, metrics[phase][k], k), (phase, k, v, metrics[phase][k])
    assert metrics["train"]["train_loss"] == pytest.approx(one_metrics["train"]["train_loss"], rel=1e-4)

    one_history = json.loads((single / "log_history.json").read_text())
    two_history = json.loads((multi / "log_history.json").read_text())
    assert [r["step"] for r in one_history] == [r["step"] for r in two_history]
    assert [r["step"] for r in one_history if "loss" in r] == list(range(1, STEPS + 1))
    for a, b in zip(one_history, two_history):
        keys = [k for k in a if not any(t in k for t in TIMING)]
        assert set(keys) <= set(b), (a["step"], set(keys) - set(b))
        for k in keys:
            assert close(a[k], b[k], k), (a["step"], k, a[k], b[k])

    a, b = load_file(single / "model.safetensors"), load_file(multi / "model.safetensors")
    assert set(a) == set(b)  # the same tensors: no second copy of tied weights, no adapter left unmerged
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-4, worst
    # the weights really moved (by 2e-3 to 6e-3): equality is not the trivial "nothing trained"
    start = load_file(tiny_model / "model.safetensors")
    moved = max(float((start[k] - b[k]).abs().max()) for k in start if k in b)
    assert moved > 1e-3, moved


if __name__ == "__main__":  # run by the fixtures above: python [or accelerate launch ...] THIS_FILE RECIPE OUTPUT BATCH
    raise SystemExit(run_stages(*sys.argv[1:]))
