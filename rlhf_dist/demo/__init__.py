"""`rlhf-dist demo`: the whole pipeline on a tiny model and synthetic data, on a laptop CPU, offline.

1. generate the synthetic world's data into OUT/data (see `synthetic.py`);
2. train a BPE tokenizer and build a tiny random Llama into OUT/base_model (see `tiny.py`);
3. run the shipped `demo` recipe through `rlhf-dist pipeline` and print the summary table.

    rlhf-dist demo --output runs/demo
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rlhf_dist import rundir

DEMO_SEED = 0


def prepare_inputs(output: Path) -> None:
    """Create the demo's data and base model in `output` unless they are already there."""
    from rlhf_dist.demo import synthetic, tiny

    data = output / "data"
    if not all((data / f"{n}.jsonl").is_file() for n in ("pretrain", "sft", "preference", "prompts")):
        started = time.time()
        synthetic.generate(data, seed=DEMO_SEED)
        print(f"demo: wrote synthetic data to {data} ({time.time() - started:.1f}s)", flush=True)
    base = output / "base_model"
    if not (base / "config.json").is_file():
        started = time.time()
        tiny.save_tiny(base, synthetic.corpus(DEMO_SEED), vocab_size=1000, hidden_size=64, num_layers=2)
        print(f"demo: built tokenizer and tiny Llama in {base} ({time.time() - started:.1f}s)", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    from rlhf_dist.pipeline import run_pipeline
    from rlhf_dist.stages.common import quiet_device_probe

    quiet_device_probe()
    output = Path(args.output).expanduser().resolve()
    rundir.check_output_root(output)
    output.mkdir(parents=True, exist_ok=True)
    if not (output / rundir.MARKER).exists():
        rundir.write_json(output / rundir.MARKER, {"created_by": "rlhf-dist", "format": 1})
    started = time.time()
    prepare_inputs(output)
    args.recipe = "demo"
    code = run_pipeline(args)
    if code == 0:
        print(f"demo: finished in {time.time() - started:.0f}s")
    return code
