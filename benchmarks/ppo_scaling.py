"""Scaling of our PPO from 1 to 2 processes (DDP, gloo, CPU) at an equal number of cores (issue 6).

    .venv/bin/python benchmarks/ppo_scaling.py --model tiny --runs 3 --iterations 6
    .venv/bin/python benchmarks/ppo_scaling.py --model 27m --runs 3 --iterations 6 --oversubscribed

The workload of ppo_vs_trl_ppo.py (our side): one iteration = 16 prompts x 1 sample x exactly 32 generated
tokens, then 1 PPO epoch of 2 minibatches of 8, fp32, separate frozen reference, reward model, value model
started from the reward model, models from `common.prepare_models`. Configurations, A B A B per run:

* ``1x2``: 1 process x 2 threads (plain ``python``, as the tests' one-process run);
* ``2x1``: 2 processes x 1 thread each, ``accelerate launch --config_file launch/ddp.yaml --num_processes 2``
  (as tests/test_ppo_distributed.py; torchrun underneath, gloo on CPU): each rank generates 8 of the 16
  rollouts (one chunk of generation_batch_size=8, sampled with the seed of its GLOBAL chunk, as the
  1-process run's two chunks of 8) and trains on 4 of each minibatch of 8 (one micro-batch, DDP all-reduce);
* ``2x2`` (``--oversubscribed``, information only): 2 processes x 2 threads on the 2 cores.

efficiency = (samples/s of 2x1) / (samples/s of 1x2) / 1 (the same 2 cores: efficiency = speed-up at equal
cores), taken within each run, median over runs; also for the rollout and the update phase alone.
Cross-check: the 2-process run's metrics of step 1 equal the 1-process run's (tolerance as the tests).
Run on a quiet machine: under other load a 2-thread process slows down far more than two 1-thread processes
(its OpenMP team waits for whichever thread was descheduled), which inflates the efficiency; the table shows
the load average at each launch's start and warns when other work was running.
Writes benchmarks/results/ppo_scaling_<model>.json and prints a table.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

ROLLOUTS, MINI_BATCH, NEW_TOKENS, TEMPERATURE, SEED = 16, 8, 32, 0.7, 42
GENERATION_BATCH = 8  # the same chunks on 1 and 2 processes: 2 chunks of 8 in one process, 1 per rank on two
ROLLOUT_LOGPROBS = "generate"  # as ppo_vs_trl_ppo.py
TIMING = ("time/", "rollout/tokens_per_second", "train/samples_per_second")  # as tests/test_ppo_distributed.py
REL_TOL, ABS_TOL = 1e-4, 1e-6  # as tests/test_ppo_distributed.py
PHASES = ("rollout_local", "generate", "value_forward", "policy_value_forward", "reference_forward", "reward_forward",
          "gather", "update_forward", "update_backward", "optimizer_step")

# name: (processes, threads per process)
CONFIGS = {"1x2": (1, 2), "2x1": (2, 1), "2x2": (2, 2)}
BASE, SCALED, OVER = "1x2", "2x1", "2x2"

SETTINGS = {
    "rollouts_per_iteration": ROLLOUTS, "samples_per_prompt": 1, "generated_tokens_per_rollout": NEW_TOKENS,
    "ppo_epochs": 1, "minibatches": ROLLOUTS // MINI_BATCH, "mini_batch_size": MINI_BATCH,
    "generation_batch_size": GENERATION_BATCH, "temperature": TEMPERATURE, "dtype": "float32",
    "value_function": "separate value model, initialised from the reward model",
    "reference": "separate frozen copy of the policy", "reward": "one reward model (frozen), each process holds a copy",
    "ours": {"rollout_batch_size": ROLLOUTS, "generation_batch_size": GENERATION_BATCH, "mini_batch_size": MINI_BATCH,
             "per_device_train_batch_size": "mini_batch_size / processes (8 on 1 process, 4 on 2): one micro-batch "
                                            "per process per minibatch, no gradient accumulation",
             "ppo_epochs": 1, "max_new_tokens": NEW_TOKENS, "ignore_eos": True, "stop_ids": [],
             "rollout_logprobs": ROLLOUT_LOGPROBS, "max_grad_norm": None, "report_to": [], "save_steps": 0,
             "built_by": "rlhf_dist.rl.models.build_ppo (model.dtype float32, value_model = the reward folder), as "
                         "the PPO stage builds them, on every rank"},
    "configurations": {
        "1x2": "1 process x 2 threads: python benchmarks/ppo_scaling.py --child (OMP/MKL_NUM_THREADS=2, "
               "torch.set_num_threads(2))",
        "2x1": "2 processes x 1 thread: python -m accelerate.commands.launch --config_file launch/ddp.yaml "
               "--num_processes 2 --num_cpu_threads_per_process 1 benchmarks/ppo_scaling.py --child "
               "(torchrun underneath; DDP, gloo; OMP/MKL_NUM_THREADS=1, torch.set_num_threads(1))",
        "2x2": "2 processes x 2 threads (oversubscribed: 4 threads on 2 cores), as 2x1 otherwise; information only",
    },
    "interop_threads": 1,
    "seconds_per_iteration": "wall time of barrier -> train_step -> barrier on every rank, the max over ranks "
                             "(after the closing barrier the ranks differ by the barrier's exit skew only); "
                             "median of the iterations after 1 warm-up",
    "rollout_s": "train_step's time/rollout: each rank's own rollout (generate + forwards + scores), max over ranks; "
                 "excludes the gather of the rollouts",
    "update_s": "train_step's time/update (the PPO epoch incl. DDP all-reduces and the metric reduction), max over ranks",
    "phases_s": "per phase, the max over ranks of that rank's summed wall time in the phase (thin wrappers, "
                "measurement only); per-rank values in per_run[].raw.iterations[].phases_per_rank",
    "peak_rss": "VmHWM of each process at the end; 'summed' adds the ranks (the launcher processes not counted)",
    "efficiency": "samples/s(2x1) / samples/s(1x2) / 1: the same 2 cores on both sides, so efficiency = speed-up at "
                  "equal cores (1.0 = no loss from distributing); per run, median over runs",
}


# ---------------------------------------------------------------------------------------------
# A child: one process of one configuration (rank 0 emits, gathered over ranks)
# ---------------------------------------------------------------------------------------------

def _gather_rows(accelerator, values: list[float]) -> list[list[float]]:
    """Every rank's list of floats (same length everywhere), on every rank: [rank][i]."""
    import torch

    t = torch.tensor([values], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.gather(t)
    return t.tolist()


def run_child(folder: Path, iterations: int, threads: int) -> None:
    import torch

    import rlhf_dist.rl.trainer as trainer_module
    from rlhf_dist.rl.distributed import make_accelerator

    common.import_ours()
    common.THREADS = threads  # pin_threads sets common.THREADS intra-op threads, 1 inter-op thread
    common.pin_threads()
    if torch.get_num_threads() != threads:
        raise SystemExit(f"child: asked for {threads} torch threads, got {torch.get_num_threads()}")
    import_rss = common.peak_rss_mib()
    info = common.load_prompts(folder)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(SEED)
    args = common.ours_training(iterations, seed=SEED, rollout_batch_size=ROLLOUTS, samples_per_prompt=1,
                                generation_batch_size=GENERATION_BATCH, mini_batch_size=MINI_BATCH,
                                per_device_train_batch_size=MINI_BATCH // world, ppo_epochs=1,
                                max_new_tokens=NEW_TOKENS, temperature=TEMPERATURE, max_grad_norm=None,
                                rollout_logprobs=ROLLOUT_LOGPROBS)
    accelerator = make_accelerator(args, world, info["config"]["hidden_size"])
    if accelerator.num_processes != world:
        raise SystemExit(f"child: WORLD_SIZE={world} but the accelerator has {accelerator.num_processes} processes")
    main = accelerator.is_main_process
    accelerator.wait_for_everyone()  # both ranks measure their matmul rate at the same time (sharing the cores)
    start_rows = _gather_rows(accelerator, [import_rss, common.matmul_gflops()])
    if main:
        common.emit("start", import_rss_mib=max(r[0] for r in start_rows), matmul_gflops=start_rows[0][1],
                    loadavg=os.getloadavg(),
                    import_rss_mib_per_rank=[r[0] for r in start_rows], matmul_gflops_per_rank=[r[1] for r in start_rows])

    # every rank builds the four models as the PPO stage does (value model started from the reward model)
    ours = common.build_ours(folder, args, value="model", accelerator=accelerator)
    loop = ours.loop(info["prompts"], info["prompts"][:ROLLOUTS], prefix=f"bench_scaling_{accelerator.process_index}_")
    if loop.stop_ids:
        raise SystemExit(f"stop ids {loop.stop_ids}: expected none (ignore_eos, no stop_tokens)")

    local_sizes: list[int] = []
    original_rollout = loop.rollout

    def rollout(prompts, seed_parts, columns=None):  # records this rank's shard: 16 / processes rollouts
        out = original_rollout(prompts, seed_parts, columns)
        local_sizes.append(len(out))
        return out

    loop.rollout = rollout
    timer = common.PhaseTimer()  # measurement only: wrappers around the loop's own calls
    timer.wrap(loop, "rollout", "rollout_local")  # PPOLoop.rollout: this rank's sampler.rollout
    timer.wrap(trainer_module, "gather_batch", "gather")  # train_step's gather of the step's rollouts
    common.wrap_ours_phases(timer, loop, value="model")
    for step in range(1, iterations + 1):
        local_sizes.clear()
        accelerator.wait_for_everyone()
        t0 = time.perf_counter()
        metrics, batch = loop.train_step(step)
        step_s = time.perf_counter() - t0  # this rank alone, before it waits for the other
        accelerator.wait_for_everyone()
        seconds = time.perf_counter() - t0
        phases = timer.take()
        lengths = batch.response_mask.sum(1)
        if (batch.response_ids.shape[1] != NEW_TOKENS or int(lengths.min()) != NEW_TOKENS or len(batch) != ROLLOUTS
                or local_sizes != [ROLLOUTS // world]):
            raise SystemExit(f"rank {accelerator.process_index}: unequal work: {len(batch)} gathered rollouts, "
                             f"local shard {local_sizes}, lengths {lengths.tolist()}")
        rows = _gather_rows(accelerator, [seconds, step_s, metrics["time/update"], local_sizes[0]]
                            + [phases.get(k, 0.0) for k in PHASES])
        if main:
            response_ids = batch.response_ids.cpu()
            common.emit(
                "iteration", step=step, seconds=max(r[0] for r in rows), seconds_per_rank=[r[0] for r in rows],
                step_s_per_rank=[r[1] for r in rows], rollout_s=metrics["time/rollout"],
                update_s=max(r[2] for r in rows), update_s_per_rank=[r[2] for r in rows],
                phases={k: max(r[4 + i] for r in rows) for i, k in enumerate(PHASES)},
                phases_per_rank=[{k: r[4 + i] for i, k in enumerate(PHASES)} for r in rows],
                rollouts=len(batch), local_rollouts_per_rank=[int(r[3]) for r in rows],
                min_tokens=int(lengths.min()), max_tokens=int(lengths.max()),
                metrics={k: v for k, v in metrics.items() if not k.startswith(TIMING)},
                responses_sha256=hashlib.sha256(response_ids.numpy().tobytes()).hexdigest(),
                response_ids=response_ids.tolist() if step == 1 else None)
    end_rows = _gather_rows(accelerator, [common.peak_rss_mib(), common.matmul_gflops()])
    if main:
        import torch.distributed as dist

        common.emit("end", peak_rss_mib=max(r[0] for r in end_rows), peak_rss_mib_per_rank=[r[0] for r in end_rows],
                    peak_rss_mib_summed=sum(r[0] for r in end_rows), matmul_gflops_end_per_rank=[r[1] for r in end_rows],
                    loadavg=os.getloadavg(), world_size=accelerator.num_processes,
                    distributed_type=str(accelerator.distributed_type),
                    backend=dist.get_backend() if dist.is_initialized() else None,
                    torch_threads=torch.get_num_threads(), torch_interop_threads=torch.get_num_interop_threads(),
                    omp_num_threads=os.environ.get("OMP_NUM_THREADS"), mkl_num_threads=os.environ.get("MKL_NUM_THREADS"),
                    versions=common.versions(*common.OURS_PACKAGES))


# ---------------------------------------------------------------------------------------------
# The parent
# ---------------------------------------------------------------------------------------------

def command(name: str, folder: Path, iterations: int) -> tuple[list[str], dict[str, str]]:
    processes, threads = CONFIGS[name]
    script = [str(Path(__file__).resolve()), "--child", "--threads", str(threads), "--iterations", str(iterations),
              "--folder", str(folder)]
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONFAULTHANDLER": "1", "TORCH_SHOW_CPP_STACKTRACES": "1"}  # where a crashed rank was, in the stderr tail
    if processes == 1:
        return [common.python(), *script], env
    launcher = [common.python(), "-m", "accelerate.commands.launch", "--config_file", "launch/ddp.yaml",
                "--num_processes", str(processes), "--num_cpu_threads_per_process", str(threads)]
    return [*launcher, *script], env


def _close(a: float, b: float) -> bool:
    return abs(b - a) <= max(REL_TOL * abs(a), ABS_TOL)


def cross_check(base: dict, other: dict) -> dict:
    """`other`'s per-step metrics against `base`'s (the same run): the tests' tolerance, and the sampled tokens."""
    steps = []
    for a, b in zip(base["raw"]["iterations"], other["raw"]["iterations"]):
        ma, mb = a["metrics"], b["metrics"]
        missing = sorted(set(ma) - set(mb))
        worst_key, worst = None, 0.0
        failed = []
        for k, va in ma.items():
            if k in missing or va is None or mb[k] is None:
                continue
            diff = abs(mb[k] - va) / max(abs(va), ABS_TOL / REL_TOL)
            if diff > worst:
                worst_key, worst = k, diff
            if not _close(va, mb[k]):
                failed.append(k)
        steps.append({"step": a["step"], "within_tolerance": not failed and not missing, "failed_keys": failed,
                      "missing_keys": missing, "max_rel_diff": worst, "max_rel_diff_key": worst_key,
                      "same_tokens": a["responses_sha256"] == b["responses_sha256"]})
    ta, tb = base["raw"]["iterations"][0]["response_ids"], other["raw"]["iterations"][0]["response_ids"]
    flat_a, flat_b = [x for row in ta for x in row], [x for row in tb for x in row]
    return {"step1_within_tolerance": steps[0]["within_tolerance"],
            "step1_equal_token_fraction": sum(x == y for x, y in zip(flat_a, flat_b)) / len(flat_a),
            "tolerance": {"rel": REL_TOL, "abs": ABS_TOL, "excluded_prefixes": list(TIMING)}, "steps": steps}


def aggregate(per_side: dict[str, list[dict]]) -> dict:
    keys = ("seconds", "rollout_s", "update_s", "other_s", "samples_per_s", "tokens_per_s")
    out: dict = {}
    for name, rows in per_side.items():
        med = {k: statistics.median(r[k] for r in rows) for k in keys}
        end = [r["raw"]["end"] for r in rows]
        start = [r["raw"]["start"] for r in rows]
        ranks = len(end[0]["peak_rss_mib_per_rank"])
        med["processes"], med["threads_per_process"] = CONFIGS[name]
        med["peak_rss_mib_per_rank"] = [statistics.median(e["peak_rss_mib_per_rank"][i] for e in end) for i in range(ranks)]
        med["peak_rss_mib"] = max(med["peak_rss_mib_per_rank"])
        med["peak_rss_mib_summed"] = statistics.median(e["peak_rss_mib_summed"] for e in end)
        med["import_rss_mib"] = statistics.median(s["import_rss_mib"] for s in start)
        med["loadavg_1min_at_start"] = statistics.median(s["loadavg"][0] for s in start)  # other work on the machine
        med["matmul_gflops_per_rank"] = [statistics.median(s["matmul_gflops_per_rank"][i] for s in start)
                                         for i in range(ranks)]
        med["matmul_gflops"] = sum(med["matmul_gflops_per_rank"])
        phase_keys = sorted({k for r in rows for k in r["phases_s"]})
        med["phases_s"] = {k: statistics.median(r["phases_s"].get(k, 0.0) for r in rows) for k in phase_keys}
        out[name] = med

    def ratio(num: str, get, inverse: bool) -> dict:  # per run: num / BASE (or BASE / num for times)
        per_run = [get(b) / get(a) if inverse else get(a) / get(b) for a, b in zip(per_side[num], per_side[BASE])]
        return {"per_run": per_run, "median": statistics.median(per_run)}

    for name in per_side:
        if name == BASE:
            continue
        label = "efficiency" if name == SCALED else "speedup_oversubscribed_information_only"
        out[f"{label}_{name}_over_{BASE}"] = {
            "samples_per_s": ratio(name, lambda r: r["samples_per_s"], inverse=False),
            # rollout-only (update-only) samples/s ratio = the inverse ratio of the phase's seconds
            "rollout": ratio(name, lambda r: r["rollout_s"], inverse=True),
            "update": ratio(name, lambda r: r["update_s"], inverse=True),
            "peak_rss_summed": ratio(name, lambda r: r["raw"]["end"]["peak_rss_mib_summed"], inverse=False),
        }
    return out


def print_table(summary: dict, names: list[str]) -> None:
    rows = [("processes x threads", None, None), ("s / iteration", "seconds", "{:.3f}"),
            ("samples / s", "samples_per_s", "{:.2f}"), ("tokens / s", "tokens_per_s", "{:.1f}"),
            ("rollout s", "rollout_s", "{:.3f}"), ("update s", "update_s", "{:.3f}"), ("other s", "other_s", "{:.3f}"),
            ("peak RSS / process MiB", "peak_rss_mib", "{:.0f}"), ("peak RSS summed MiB", "peak_rss_mib_summed", "{:.0f}"),
            ("import-only RSS MiB", "import_rss_mib", "{:.0f}"), ("matmul GFLOP/s (sum)", "matmul_gflops", "{:.0f}"),
            ("load avg 1 min at start", "loadavg_1min_at_start", "{:.2f}")]
    print(f"\n{'':24}" + "".join(f"{n:>12}" for n in names))
    for label, key, fmt in rows:
        if key is None:
            cells = [f"{summary[n]['processes']}x{summary[n]['threads_per_process']}" for n in names]
        else:
            cells = [fmt.format(summary[n][key]) for n in names]
        print(f"{label:24}" + "".join(f"{c:>12}" for c in cells))
    for n in names:
        phases = summary[n].get("phases_s", {})
        print(f"{n} phases (s/iteration, max over ranks): " + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))
    for n in names:
        if n == BASE:
            continue
        label = "efficiency" if n == SCALED else "speed-up (oversubscribed, information only)"
        e = summary[f"{'efficiency' if n == SCALED else 'speedup_oversubscribed_information_only'}_{n}_over_{BASE}"]
        runs = ", ".join(f"{x:.2f}" for x in e["samples_per_s"]["per_run"])
        print(f"\n{label} {n} vs {BASE}: {e['samples_per_s']['median']:.2f} (per run: {runs}); "
              f"rollout only {e['rollout']['median']:.2f}, update only {e['update']['median']:.2f}; "
              f"summed peak RSS x{e['peak_rss_summed']['median']:.2f}")
    for n, check in summary.get("cross_check", {}).items():
        verdict = "PASS" if all(c["step1_within_tolerance"] for c in check) else "FAIL"
        worst = max(c["steps"][0]["max_rel_diff"] for c in check)
        tokens = min(c["step1_equal_token_fraction"] for c in check)
        later = sum(s["within_tolerance"] for c in check for s in c["steps"][1:])
        total = sum(len(c["steps"]) - 1 for c in check)
        print(f"cross-check {n} vs {BASE}, step 1 metrics within rel {REL_TOL:g}/abs {ABS_TOL:g}: {verdict} "
              f"(max rel diff {worst:.1e}; equal sampled tokens {tokens:.1%}); later steps within: {later}/{total}")


def main(argv: list[str] | None = None) -> int:
    p = common.parser(__doc__, per="launch", sides=False, side="configuration")
    p.add_argument("--oversubscribed", action="store_true",
                   help="Also run 2 processes x 2 threads (4 threads on 2 cores), for information.")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, help=argparse.SUPPRESS)
    args = common.parse(p, argv)
    if args.child:
        run_child(Path(args.folder), args.iterations, args.threads)
        return 0
    folder = common.prepare_models(args.model)
    info = common.load_prompts(folder)
    names = [BASE, SCALED] + ([OVER] if args.oversubscribed else [])
    sides = {name: command(name, folder, args.iterations) for name in names}
    machine = common.machine_info() | {"torch_threads": "per configuration (see settings.configurations)"}
    started = common.utc_now()
    per_side = common.run_interleaved(sides, args.runs, warmup=1, samples=ROLLOUTS, tokens=ROLLOUTS * NEW_TOKENS)
    problems = []
    for name, rows in per_side.items():
        processes, threads = CONFIGS[name]
        for r in rows:
            end = r["raw"]["end"]
            if end["world_size"] != processes or end["torch_threads"] != threads:
                problems.append(f"{name} run {r['run']}: world {end['world_size']}, threads {end['torch_threads']}")
            if processes > 1 and end["backend"] != "gloo":
                problems.append(f"{name} run {r['run']}: backend {end['backend']}, expected gloo")
            for it in r["raw"]["iterations"]:
                if it["rollouts"] != ROLLOUTS or it["local_rollouts_per_rank"] != [ROLLOUTS // processes] * processes:
                    problems.append(f"{name} run {r['run']} step {it['step']}: rollouts {it['rollouts']}, "
                                    f"per rank {it['local_rollouts_per_rank']}")
    summary = aggregate(per_side)
    summary["cross_check"] = {name: [cross_check(a, b) for a, b in zip(per_side[BASE], per_side[name])]
                              for name in names if name != BASE}
    run = common.Comparison(folder, info, started, machine, per_side, summary)
    equal_work = {"checked": "every iteration of every configuration: 16 gathered rollouts x exactly 32 tokens, "
                             "16 / processes rollouts generated on each rank, world size, torch threads, backend",
                  "problems": problems}
    path = common.write_result(f"ppo_scaling_{args.model}", common.result(
        "ppo_scaling", args, run, SETTINGS, versions=per_side[BASE][0]["raw"]["end"]["versions"],
        commands={name: " ".join(cmd) for name, (cmd, _) in sides.items()}, equal_work=equal_work))
    print_table(summary, names)
    print(f"\nwrote {path}")
    busiest = max(r["raw"]["start"]["loadavg"][0] for rows in per_side.values() for r in rows)
    if busiest > (os.cpu_count() or 1) + 2:  # ours alone: about the previous launch's threads (2, or 4 after 2x2)
        print(f"WARNING: 1-minute load average up to {busiest:.1f} at a launch's start on {os.cpu_count()} cores: other "
              "work was running; a 2-thread process is hit hardest (its OpenMP team waits for a descheduled thread), "
              "so these timings and the efficiency are not meaningful; rerun on a quiet machine")
    failed = [n for n, checks in summary["cross_check"].items() if not all(c["step1_within_tolerance"] for c in checks)]
    if problems or failed:
        print("PROBLEMS: " + "; ".join(problems + [f"{n}: step-1 metrics differ from {BASE}" for n in failed]))
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
