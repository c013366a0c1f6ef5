"""The benchmarks' arithmetic and plumbing (benchmarks/, issue 6); never their timings.

The FLOP counts behind the utilisation figures are checked against torch's own FLOP counter on a real model;
a benchmark script runs end to end on the tiny model and the JSON it writes is checked.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402

SHAPE = {"vocab_size": 300, "hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 160}


@pytest.fixture(scope="module")
def llama():
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    config = LlamaConfig(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["hidden_size"],
                         intermediate_size=SHAPE["intermediate_size"], num_hidden_layers=SHAPE["num_layers"],
                         num_attention_heads=SHAPE["num_heads"], num_key_value_heads=SHAPE["num_heads"],
                         max_position_embeddings=128, pad_token_id=0, num_labels=1)
    config._attn_implementation = "eager"  # torch's counter has no formula for the CPU flash-attention kernel
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval(), LlamaForSequenceClassification(config).eval()


def counted(fn) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def test_forward_flops_match_torch_flop_counter(llama):
    policy, classifier = llama
    B, prompt, new = 3, 7, 5
    ids = torch.randint(1, 300, (B, prompt + new))
    with torch.no_grad():
        lm = counted(lambda: policy(input_ids=ids, logits_to_keep=new))
        body = counted(lambda: classifier.model(input_ids=ids))
    assert lm == pytest.approx(common._forward_flops(SHAPE, B, prompt + new, new, True), rel=1e-9)
    assert body == pytest.approx(common._forward_flops(SHAPE, B, prompt + new, 0, False), rel=1e-9)
    flops = common.phase_flops(SHAPE, B, prompt, new, value="model")
    assert flops["reference_forward"] == lm and flops["reward_forward"] == body
    assert flops["update_forward"] == lm + body and flops["update_backward"] == 2 * (lm + body)
    assert common.phase_flops(SHAPE, B, prompt, new, value=None)["update_forward"] == lm


def test_backward_flops_are_twice_the_forward(llama):
    policy, _ = llama
    ids = torch.randint(1, 300, (2, 9))

    def fwd_bwd():
        policy(input_ids=ids, logits_to_keep=4).logits.sum().backward()

    forward = counted(lambda: policy(input_ids=ids, logits_to_keep=4))
    both = counted(fwd_bwd)
    policy.zero_grad(set_to_none=True)
    assert (both - forward) / forward == pytest.approx(2.0, rel=0.02)  # input and weight gradients


def test_generate_flops_match_torch_flop_counter(llama):
    policy, _ = llama
    B, prompt, new = 4, 6, 8
    ids = torch.randint(1, 300, (B, prompt))
    with torch.no_grad():
        flops = counted(lambda: policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                                max_new_tokens=new, min_new_tokens=new, pad_token_id=0,
                                                eos_token_id=None, top_k=0))
    assert flops == pytest.approx(common._generate_flops(SHAPE, B, prompt, new), rel=1e-9)


def test_utilisation_is_flops_over_time_over_the_matmul_rate():
    flops = {"generate": 4e9, "reference_forward": 2e9, "update_forward": 3e9, "update_backward": 6e9}
    side = {"matmul_gflops": 10.0, "seconds": 2.5, "rollout_s": 1.0, "update_s": 1.5,
            "phases_s": {"generate": 0.8, "reference_forward": 0.2, "update_forward": 0.5, "update_backward": 0.9,
                         "optimizer_step": 0.1}}
    used = common.utilisation(side, flops)
    assert used["generate"] == pytest.approx(0.5) and used["reference_forward"] == pytest.approx(1.0)
    assert used["update (whole phase)"] == pytest.approx(9e9 / 1.5 / 1e10)
    assert used["rollout (whole phase)"] == pytest.approx(6e9 / 1.0 / 1e10)
    assert used["iteration"] == pytest.approx(15e9 / 2.5 / 1e10)
    assert "optimizer_step" not in used


@pytest.mark.slow
def test_grpo_benchmark_runs_both_sides_and_writes_its_json(tmp_path):
    """benchmarks/grpo_vs_trl_grpo.py on the tiny model, one short run (the peer, TRL 1.16, is our venv's own):
    both sides do the same 16 x 32 tokens every iteration, and every figure the table needs is in the JSON."""
    import json
    import os
    import subprocess

    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path / "results"), "BENCH_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(BENCH / "grpo_vs_trl_grpo.py"), "--model", "tiny", "--runs", "1",
                           "--iterations", "6"], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "samples/s ours/peer" in proc.stdout
    result = json.loads((tmp_path / "results" / "grpo_vs_trl_grpo_tiny.json").read_text())
    summary = result["summary"]
    sides = [name for name in summary if name == "ours" or name.startswith("trl-")]
    assert sorted(sides) == ["ours", "trl-1.16.0"]
    for name in sides:
        runs = result["per_run"][name]
        assert len(runs) == 1 and runs[0]["iterations_kept"] == 5
        for row in runs[0]["raw"]["iterations"]:  # each side checked its own work; the parent kept every row
            assert row["seconds"] > 0 and row["rollout_s"] > 0 and row["update_s"] > 0
        side = summary[name]
        assert side["samples_per_s"] == pytest.approx(16 / side["seconds"])
        assert side["peak_rss_mib"] > side["import_rss_mib"] > 0
        assert 0 < side["utilisation"]["update (whole phase)"] < 2  # a rate, of the side's own matmul rate
        assert {"generate", "reference_forward", "reward_forward", "update_forward", "update_backward"} <= set(
            side["phases_s"])
    ratio = summary["ratio_samples_per_s_ours_over_peer"]
    assert ratio["median"] == pytest.approx(summary["ours"]["samples_per_s"] / summary["trl-1.16.0"]["samples_per_s"])
    assert result["not_equal"] and result["settings"]["ours"]["rollout_logprobs"] == "generate"
    assert result["summary"]["flops_per_iteration"]["generate"] == common._generate_flops(
        common.MODELS["tiny"], 16, result["models"]["prompt_length"], 32)


def test_phase_timer_sums_each_phase_and_the_peak_it_raised():
    class Owner:
        def work(self, n):
            return sum(range(n))

    owner = Owner()
    timer = common.PhaseTimer(peak_growth=True)
    timer.wrap(owner, "work", lambda args: "big" if args[0] > 10 else "small")
    assert owner.work(3) == 3 and owner.work(100) == 4950 and owner.work(2) == 1
    sums = timer.take()
    assert set(sums) == {"small", "big"} and all(v >= 0 for v in sums.values())
    assert timer.take() == {} and set(timer.growth) == {"small", "big"}  # the growth is kept for the whole run
    assert common.PhaseTimer().growth is None


@pytest.fixture(scope="module")
def bench_folder(tmp_path_factory):
    """The benchmarks' tiny models and prompts (`common.prepare_models`), in a temporary cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(common, "CACHE", tmp_path_factory.mktemp("bench_cache"))
        yield common.prepare_models("tiny")


LORA = {"r": 4, "alpha": 8, "dropout": 0.0, "target_modules": "all-linear"}


@pytest.mark.parametrize("value", ["model", "head", None, "adapter"])
def test_ours_is_built_by_the_ppo_stages_build_ppo(bench_folder, value, monkeypatch):
    """Our side's models come from rlhf_dist.rl.models.build_ppo (the PPO stage's own), in fp32, dropout off, the
    reward model frozen, with the value function each benchmark asks for."""
    import rlhf_dist.rl.models as models

    calls = []
    build_ppo = models.build_ppo
    monkeypatch.setattr(models, "build_ppo", lambda *a: calls.append(a) or build_ppo(*a))
    grpo = {"advantage_estimator": "grpo", "samples_per_prompt": 2} if value is None else {}
    args = common.ours_training(6, seed=3, rollout_batch_size=4, generation_batch_size=4, mini_batch_size=4,
                                per_device_train_batch_size=4, max_new_tokens=4, **grpo)
    ours = common.build_ours(bench_folder, args, value=value, lora=LORA if value == "adapter" else None)
    assert len(calls) == 1 and calls[0][0] is ours.cfg and ours.cfg.training is args
    assert ours.cfg.init_from == str(bench_folder / "policy") and ours.cfg.reward_model == str(bench_folder / "reward")
    m = ours.models
    ac, reward = m.actor_critic, m.reward.model
    assert {p.dtype for p in ac.parameters()} == {torch.float32}
    assert not reward.training and not any(p.requires_grad for p in reward.parameters())
    assert m.reward.tokenizer is None  # the policy's tokens are scored as they are
    dropouts = [mod.p for mod in ac.modules() if isinstance(mod, torch.nn.modules.dropout._DropoutNd)]
    assert all(p == 0.0 for p in dropouts)
    assert (ac.value_model is not None) == (value == "model")
    assert (ac.value_head is not None) == (value in ("head", "adapter"))
    assert (ac.value_adapter is not None) == (value == "adapter") == (m.reference is None)
    with pytest.raises(ValueError, match="value adapter goes with LoRA"):
        common.build_ours(bench_folder, args, value="adapter")


def test_ours_phases_are_timed_where_the_loop_looks_its_calls_up(bench_folder, monkeypatch):
    """Every phase of our loop gets time: the wrappers sit where sampler.py / scoring.py look the calls up."""
    from rlhf_dist.rl import sampler, scoring

    for module, name in ((sampler, "generate"), (sampler, "forward_logprobs"), (scoring, "sequence_scores")):
        monkeypatch.setattr(module, name, getattr(module, name))  # the test restores what the wrappers replace
    args = common.ours_training(2, seed=3, rollout_batch_size=4, generation_batch_size=4, mini_batch_size=4,
                                per_device_train_batch_size=4, max_new_tokens=4)
    ours = common.build_ours(bench_folder, args, value="model")
    prompts = common.load_prompts(bench_folder)["prompts"]
    loop = ours.loop(prompts, prompts[:4])
    timer = common.PhaseTimer()
    common.wrap_ours_phases(timer, loop, "model")
    metrics, batch = loop.train_step(1)
    phases = timer.take()
    assert set(phases) == {"generate", "reference_forward", "reward_forward", "value_forward", "update_forward",
                           "update_backward", "optimizer_step"}
    assert all(v > 0 for v in phases.values())
    assert sum(phases.values()) <= metrics["time/rollout"] + metrics["time/update"] + 0.05
    assert len(batch) == 4 and batch.response_ids.shape[1] == 4


def test_ragged_benchmark_counts_the_work_each_side_wastes(tmp_path):
    """benchmarks/ragged_rollouts.py on the tiny model, one short run of its three sides: responses stop at EOS at
    spread-out lengths, and the counted work shows what the levers remove -- finished rows and repeated prefills in
    generation, padding in the forwards of the policy, the reference and the reward model."""
    import json
    import os
    import subprocess

    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path / "results"), "BENCH_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(BENCH / "ragged_rollouts.py"), "--model", "tiny", "--runs", "1",
                           "--iterations", "6", "--max-new-tokens", "48", "--prompts", "4"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours / trl: samples/s" in proc.stdout
    result = json.loads((tmp_path / "results" / "ragged_rollouts_tiny.json").read_text())
    eos = result["models"]["eos"]["calibration_lengths"]
    assert eos["min"] < eos["median"] < eos["max"] == 128  # the workload: lengths from a few tokens to the cap
    assert result["models"]["prompt_lengths"]["max"] > 2 * result["models"]["prompt_lengths"]["min"]
    s = result["summary"]
    for side in ("ours", "ours-levers-off", "trl"):
        run = result["per_run"][side][0]
        assert run["iterations_kept"] == 5
        for it in run["raw"]["iterations"]:
            assert it["rollouts"] == 16 and max(it["lengths"]) > min(it["lengths"])  # ragged, not fixed-length
            work = it["work"]
            for what in ("slots", "pairs"):
                assert all(0 < work[f"needed_{what}"][p] <= work[f"computed_{what}"][p] for p in work["needed_slots"])
    ours, off, trl = s["ours"]["wasted_share"], s["ours-levers-off"]["wasted_share"], s["trl"]["wasted_share"]
    assert ours["generation"] < 0.5 * off["generation"] and off["generation"] > 0.3 and trl["generation"] > 0.3
    # the forwards: packed in bins (no padding, attention across sequences under 5% of a forward's FLOPs)
    for phase in ("scoring", "update"):
        assert ours[phase] < 0.05 < 0.1 < min(off[phase], trl[phase])
    assert s["ours_over_trl"]["samples_per_s"]["median"] == pytest.approx(
        result["per_run"]["ours"][0]["samples_per_s"] / result["per_run"]["trl"][0]["samples_per_s"])
    assert result["per_run"]["ours"][0]["raw"]["end"]["compact_decode"] is True


def test_ragged_benchmark_ppo_against_trl_112_counts_the_same_work(tmp_path):
    """--algorithm ppo: our PPO (value model, GAE) against TRL 1.12's PPOTrainer stopping at EOS, on the tiny model.
    Every side scores 16 ragged responses per iteration with four models (policy, reference, value, reward); ours
    packs every forward in bins (no padding left in scoring or update), the levers-off side and TRL pad them."""
    import json
    import os
    import subprocess

    peers = BENCH / ".peers"
    if not (peers / "trl-1.12.0" / "trl").is_dir():  # a fresh clone: install the peer as the README says, aside
        peers = tmp_path / "peers"
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target",
                              str(peers / "trl-1.12.0"), "trl==1.12.0"], capture_output=True, text=True, timeout=600)
        assert pip.returncode == 0, f"installing the peer TRL 1.12 failed: {pip.stderr[-2000:]}"
    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path / "results"), "BENCH_CACHE_DIR": str(tmp_path / "cache"),
           "BENCH_PEERS_DIR": str(peers)}
    proc = subprocess.run([sys.executable, str(BENCH / "ragged_rollouts.py"), "--algorithm", "ppo", "--model", "tiny",
                           "--runs", "1", "--iterations", "6", "--max-new-tokens", "48", "--prompts", "16"], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ours / trl-1.12: samples/s" in proc.stdout
    result = json.loads((tmp_path / "results" / "ragged_rollouts_ppo_tiny.json").read_text())
    assert result["algorithm"] == "ppo" and result["settings"]["samples_per_prompt"] == 1
    s = result["summary"]
    for side in ("ours", "ours-levers-off", "trl-1.12"):
        for it in result["per_run"][side][0]["raw"]["iterations"]:
            assert it["rollouts"] == 16 and max(it["lengths"]) > min(it["lengths"]) and max(it["lengths"]) <= 48
            work = it["work"]
            for what in ("slots", "pairs"):
                assert all(0 < work[f"needed_{what}"][p] <= work[f"computed_{what}"][p] for p in work["needed_slots"])
    ours, off, trl = (s[side]["wasted_share"] for side in ("ours", "ours-levers-off", "trl-1.12"))
    for phase in ("scoring", "update"):
        assert ours[phase] < 0.05 < 0.2 < min(off[phase], trl[phase])
    assert ours["generation"] < 0.5 * min(off["generation"], trl["generation"])
    assert "Packing(capacity=" in result["per_run"]["ours"][0]["raw"]["end"]["packed_forwards"]


def test_compile_decode_benchmark_compares_the_same_tokens(tmp_path):
    """benchmarks/compile_decode.py on the tiny model, 2 calls a side: eager and compiled decoding sample the same
    tokens, and each call's time (the compiled side's compilation included) is in the JSON."""
    import json
    import os
    import subprocess

    env = {**os.environ, "BENCH_RESULTS_DIR": str(tmp_path / "results"), "BENCH_CACHE_DIR": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, str(BENCH / "compile_decode.py"), "--model", "tiny", "--calls", "2"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "compile_decode_tiny.json").read_text())
    assert result["same_tokens"] is True and len(result["calls"]) == 2
    for row in result["calls"]:
        assert row["generated_tokens"] > 32 and row["eager_s"] > 0 and row["compiled_s"] > 0
    assert result["calls"][0]["compiled_s"] > result["calls"][0]["eager_s"]  # the first compiled call compiles


def test_gpu_check_runs_its_two_ppo_runs_on_cpu_with_a_tiny_shape(tmp_path):
    """benchmarks/gpu_check.py is meant for one CUDA GPU; --device cpu --shape tiny runs the very same path (model
    built here, the ppo stage in bf16's place in fp32, then QLoRA PPO on a 4-bit base, the planner's rows) and the
    JSON holds each run's rates and the planner's figure for its method. (No GPU figure is claimed from this.)"""
    import json
    import subprocess

    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--shape", "tiny", "--device", "cpu",
                           "--steps", "2", "--max-new-tokens", "12", "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["device"] == {"name": "cpu"} and result["policy_parameters"] > 10_000
    for name, method in (("bf16", "full"), ("qlora_4bit", "qlora")):
        run = result["runs"][name]
        assert run["steps_measured"] == 1 and run["rollout_generated_tokens_per_s"] > 0
        assert run["update_samples_per_s"] > 0 and 0 < run["mean_response_length"] <= 12
        assert run["planner"]["row"]["method"] == method and run["planner"]["row"]["total"] > 0
    if torch.cuda.is_available():  # (on a GPU machine the default would run the real 0.5B check: not here)
        return
    no_gpu = subprocess.run([sys.executable, str(BENCH / "gpu_check.py"), "--out", str(tmp_path / "x.json")],
                            capture_output=True, text=True, timeout=300)
    assert no_gpu.returncode == 2 and "no CUDA GPU" in no_gpu.stderr and not (tmp_path / "x.json").exists()
