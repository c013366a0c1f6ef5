"""torch.compile of the decode step (issue 17's last lever), measured: our decode loop (`rlhf_dist.rl.decode`) on the
ragged workload of ragged_rollouts.py (32 prompts, up to 128 new tokens, EOS at spread-out lengths), eager against
the policy's forward compiled with ``torch.compile(dynamic=True)``, the same seeds on both, one process.

    .venv/bin/python benchmarks/ragged_rollouts.py --model 27m --runs 1 --iterations 6   # builds the workload once
    .venv/bin/python benchmarks/compile_decode.py --model 27m --calls 8

Each call is timed whole, the compiled one's first call (and any recompilation for new shapes: the decode batch
shrinks as rows stop) included, since that is what a run pays. Both sides must sample the same tokens. Writes
benchmarks/results/compile_decode_<model>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import ragged_rollouts  # noqa: E402

PROMPTS = 32


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(common.MODELS), default="27m")
    p.add_argument("--calls", type=int, default=8, help="Decode calls per side (a new seed each).")
    args = p.parse_args(argv)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_dist.rl.decode import decode
    from rlhf_dist.rl.generation import left_pad

    common.pin_threads()
    folder = ragged_rollouts.prepare(args.model)
    info = common.load_prompts(folder)
    tokenizer = AutoTokenizer.from_pretrained(str(folder / "policy"))
    policy = AutoModelForCausalLM.from_pretrained(str(folder / "policy"), dtype=torch.float32).eval()
    q_ids, q_mask = left_pad(info["prompts"][:PROMPTS], tokenizer.pad_token_id)

    def call(seed: int) -> dict:
        t0 = time.perf_counter()
        with torch.no_grad():
            gen, _ = decode(policy, q_ids, q_mask, max_new_tokens=ragged_rollouts.NEW_TOKENS,
                            temperature=ragged_rollouts.TEMPERATURE, stop_ids=[tokenizer.eos_token_id],
                            pad_id=tokenizer.pad_token_id, generator_seed=seed, record_logprobs=True)
        return {"seconds": time.perf_counter() - t0, "tokens": gen.response_ids[gen.response_mask].tolist()}

    started = common.utc_now()
    eager = [call(seed) for seed in range(args.calls)]
    policy.forward = torch.compile(policy.forward, dynamic=True)
    compiled = [call(seed) for seed in range(args.calls)]
    same = all(a["tokens"] == b["tokens"] for a, b in zip(eager, compiled))
    rows = [{"seed": seed, "generated_tokens": len(a["tokens"]), "eager_s": a["seconds"], "compiled_s": b["seconds"]}
            for seed, (a, b) in enumerate(zip(eager, compiled))]
    total = {side: sum(r[f"{side}_s"] for r in rows) for side in ("eager", "compiled")}
    print(f"{'seed':>4} {'tokens':>7} {'eager s':>9} {'compiled s':>11}")
    for r in rows:
        print(f"{r['seed']:>4} {r['generated_tokens']:>7} {r['eager_s']:>9.2f} {r['compiled_s']:>11.2f}")
    print(f"total: eager {total['eager']:.1f} s, compiled {total['compiled']:.1f} s; same tokens: {same}")
    path = common.write_result(f"compile_decode_{args.model}", {
        "benchmark": "compile_decode", "model": args.model, "started_utc": started, "finished_utc": common.utc_now(),
        "machine": common.machine_info(), "settings": {"prompts": PROMPTS, "calls": args.calls,
                                                       "max_new_tokens": ragged_rollouts.NEW_TOKENS,
                                                       "compile": "torch.compile(policy.forward, dynamic=True)"},
        "calls": rows, "total_s": total, "same_tokens": same,
        "versions": common.versions("torch", "transformers")})
    print(f"wrote {path}")
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
