"""QLoRA sft (4-bit NF4 base + LoRA) on 2 processes equals 1 process: DDP, DeepSpeed ZeRO-2 and ZeRO-3 (gloo, CPU).

As in tests/test_stages_distributed.py, one `accelerate launch --config_file launch/<case>.yaml --num_processes 2`
per case runs this file as a script (the sft stage through `rlhf_dist.cli.main`), and the one-process
baseline runs it with `python`, with the same global batch: 3 steps of 4 rows on 1 process vs 2 on each of
2. Each process also writes what its trained model holds: every quantised weight's class, dtype and, under
ZeRO-3, its partition. About 110 s on 2 cores: ~35 s per case, the first with the one-process baseline
(one ZeRO-2 run took 180 s on a busy machine).

What runs where, measured (see also rlhf_dist/models.py):
- DDP and ZeRO-2: the 4-bit base (uint8 storage) is replicated, only the adapter is trained and all-reduced.
- ZeRO-3: transformers loads a quantised model without zero.Init (whole, on every process); the DeepSpeed
  engine then partitions every parameter, the packed 4-bit weights included: each process keeps half of each
  (ds_tensor) and gathers the rest for a forward. models.bnb_config stores the packed weights as the model's
  dtype under ZeRO-3 (float32 here: the same bytes, identical logits); uint8 storage also trains on CPU with
  the same numbers, so on CPU the storage dtype is a precaution for DeepSpeed's casts (bf16/fp16 configs).

Stated tolerances, measured deviations (3 steps, learning rate 1e-2):
- Metrics (eval loss before and after, train loss): 1e-4 relative; measured <= 1.7e-5 (eval loss 6.3543,
  off by up to 1.04e-4 absolute under ZeRO-2). Perplexity, exp(eval loss), turns that absolute deviation into
  a relative one: 1e-3 relative; measured 1.04e-4. TRL's eval-step-averaged token accuracy: 1e-2 relative
  (see test_stages_distributed); measured 6e-4.
- The adapter: TRL trains a quantised model's adapter in bfloat16 (tests/test_qlora.py), and Adam turns
  summation-order noise on near-zero gradients into updates of up to the learning rate, which bf16 then
  rounds: measured max |difference| 1.26e-2 (about the learning rate, ~20 of 11776 elements), mean 9e-5,
  99th percentile 5.5e-4. Held to: max <= 2 * learning rate, mean < 3e-4, 99th percentile < 2e-3.
- The merged weights: every weight without an adapter (embeddings, norms) equals the base's bit for bit.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, run_launched
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

STEPS, BATCH, LR = 3, 2, 1e-2  # optimizer steps; per-process train batch on 2 processes (2 * BATCH on one)
QLORA = ["sft.quantization.load_in_4bit=true", "sft.quantization.compute_dtype=float32", "sft.lora.enabled=true",
         "sft.lora.r=4", "sft.lora.dropout=0.0", f"sft.training.max_steps={STEPS}", f"sft.training.learning_rate={LR}",
         "sft.training.logging_steps=1", "sft.training.per_device_eval_batch_size=8"]


def quantised_weights(model) -> list[dict]:
    """What this process holds of each bitsandbytes weight (under ZeRO-3: its partition)."""
    rows = []
    for name, p in model.named_parameters():
        if type(p).__name__ in ("Params4bit", "Int8Params"):
            rows.append({"name": name, "class": type(p).__name__, "dtype": str(p.dtype), "local": p.data.numel(),
                         "ds_numel": getattr(p, "ds_numel", None),
                         "ds_local": p.ds_tensor.numel() if hasattr(p, "ds_tensor") else None,
                         "requires_grad": p.requires_grad})
    return rows


def run_sft(recipe: str, output: str, batch: str) -> int:
    """Script mode (under accelerate launch or plain python): the QLoRA sft stage, then this process's report."""
    sys.path.insert(0, str(REPO))
    import torch.distributed as dist

    from rlhf_dist.cli import main
    from rlhf_dist.stages import sft

    caught, save = {}, sft.save_model

    def catch(trainer, *args):
        caught["model"] = trainer.accelerator.unwrap_model(trainer.model)
        return save(trainer, *args)

    sft.save_model = catch
    code = main(["sft", "--recipe", recipe, "--output", output, f"sft.training.per_device_train_batch_size={batch}", *QLORA])
    rank = dist.get_rank() if dist.is_initialized() else 0
    model = caught["model"]
    storage = str(model.config.quantization_config.bnb_4bit_quant_storage)
    report = {"rank": rank, "quant_storage": storage, "weights": quantised_weights(model)}
    (Path(output) / f"rank{rank}.json").write_text(json.dumps(report))
    return code


def launch(prefix: list[str], rec: Path, out: Path, batch: int) -> subprocess.CompletedProcess:
    return run_launched([*prefix, str(Path(__file__).resolve()), str(rec), str(out), str(batch)])


def finished(result: subprocess.CompletedProcess, out: Path) -> Path:
    errors = "\n".join([line for line in result.stderr.splitlines() if "Error" in line][:6])
    assert result.returncode == 0 and (out / "sft" / "metrics.json").is_file(), (
        f"exit {result.returncode}:\n{errors}\n...\n{result.stderr[-3000:]}")
    return out / "sft"


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, shared_recipe):
    out = tmp_path_factory.mktemp("qlora_one")
    return launch([sys.executable], shared_recipe, out, 2 * BATCH), out


@pytest.mark.parametrize("case,distributed_type,zero_stage", [("ddp", "MULTI_CPU", 0), ("zero2", "DEEPSPEED", 2),
                                                              ("zero3", "DEEPSPEED", 3)])
def test_qlora_sft_two_processes_equal_one(case, distributed_type, zero_stage, one_process, shared_recipe, tmp_path, tiny_model):
    out = tmp_path / case
    prefix = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", f"launch/{case}.yaml", "--num_processes", "2"]
    single, multi = finished(*one_process), finished(launch(prefix, shared_recipe, out, BATCH), out)

    one, two = json.loads((single / "metrics.json").read_text()), json.loads((multi / "metrics.json").read_text())
    assert one["world_size"] == 1 and two["world_size"] == 2  # really two processes (docs/cpu.md trap 1)
    assert two["train"]["distributed_type"] == distributed_type and two["train"]["zero_stage"] == zero_stage
    assert one["train"]["global_step"] == two["train"]["global_step"] == STEPS
    assert two["train"]["train_loss"] == pytest.approx(one["train"]["train_loss"], rel=1e-4)
    for phase in ("before", "after"):
        for k, v in one[phase].items():
            rel = {"token_accuracy": 1e-2, "perplexity": 1e-3}.get(k, 1e-4)
            assert two[phase][k] == pytest.approx(v, rel=rel, abs=1e-6), (phase, k, v, two[phase][k])
    assert one["after"]["eval_loss"] < one["before"]["eval_loss"] - 0.1  # it trained

    # The base is still 4-bit on every process: 14 packed weights, frozen; under ZeRO-3 stored as float32 and
    # partitioned (half of each on each process), elsewhere uint8 and whole.
    base = json.loads((single.parent / "rank0.json").read_text())
    for rank in (0, 1):
        report = json.loads((out / f"rank{rank}.json").read_text())
        weights = report["weights"]
        assert len(weights) == 14 and all(w["class"] == "Params4bit" and not w["requires_grad"] for w in weights)
        full = {w["name"]: w["local"] for w in base["weights"]}
        if zero_stage == 3:
            assert report["quant_storage"] == "torch.float32" and {w["dtype"] for w in weights} == {"torch.float32"}
            for w in weights:  # bytes of the packed weight: 4 per float32 element
                assert 4 * w["ds_numel"] == full[w["name"]] and w["ds_local"] == -(-w["ds_numel"] // 2), w
        else:
            assert report["quant_storage"] == "torch.uint8" and {w["dtype"] for w in weights} == {"torch.uint8"}
            assert {w["name"]: w["local"] for w in weights} == full

    a = load_file(single / "adapter" / "adapter_model.safetensors")
    b = load_file(multi / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k].float() - b[k].float()).abs().flatten() for k in a])
    print(f"\n{case}: adapter max|diff| {diff.max():.3g}, mean {diff.mean():.3g}, q99 {diff.quantile(0.99):.3g}; "
          f"eval_loss {one['after']['eval_loss']:.6f} vs {two['after']['eval_loss']:.6f}", file=sys.stderr)
    assert diff.max() <= 2 * LR and diff.mean() < 3e-4 and diff.quantile(0.99) < 2e-3, diff.max()
    merged, start = load_file(multi / "model.safetensors"), load_file(tiny_model / "model.safetensors")
    assert all(torch.equal(merged[k], v) for k, v in start.items() if not k.endswith("_proj.weight"))


if __name__ == "__main__":  # run by the tests above: python [or accelerate launch ...] THIS_FILE RECIPE OUTPUT BATCH
    raise SystemExit(run_sft(*sys.argv[1:]))
