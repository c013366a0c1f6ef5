"""The eval stage: its pure helpers (hand-computed), the degeneration flag on a model made to repeat a token, the stage
on a tiny run (metrics.json, table, plot, samples), bad input in one line before any model loads, and skip / re-run."""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from helpers import tiny_recipe

from rlhf_dist.cli import main
from rlhf_dist.evaluation.metrics import bootstrap_interval, degeneration, distinct_n, kl_k1, longest_loop, outcomes, win_rate


# ---------------------------------------------------------------------------------------------
# Helpers, by hand
# ---------------------------------------------------------------------------------------------
def test_win_rate_counts_ties_as_one_half_and_its_interval_is_seeded():
    a, b = [3.0, 1.0, 2.0, 2.0], [1.0, 2.0, 2.0, 0.0]
    assert outcomes(a, b).tolist() == [1.0, 0.0, 0.5, 1.0]
    w = win_rate(a, b, resamples=2000, seed=3)
    assert (w["win_rate"], w["wins"], w["ties"], w["losses"], w["prompts"]) == (0.625, 2, 1, 1, 4)
    assert w["ci_low"] <= 0.625 <= w["ci_high"] and w == win_rate(a, b, resamples=2000, seed=3)  # same seed, same CI
    assert win_rate(a, b, resamples=2000, seed=4)["ci_low"] >= 0.0
    # a model against itself: every prompt a tie, the interval a point
    assert {k: win_rate(a, a)[k] for k in ("win_rate", "ci_low", "ci_high", "ties")} == \
        {"win_rate": 0.5, "ci_low": 0.5, "ci_high": 0.5, "ties": 4}
    # equal up to float rounding is a tie; a margin widens it
    assert outcomes([1.0 + 1e-9], [1.0]).tolist() == [0.5]
    assert outcomes([1.0, 2.0], [1.005, 1.0], tie_margin=0.01).tolist() == [0.5, 1.0]
    with pytest.raises(ValueError, match="equally long"):
        win_rate([1.0], [1.0, 2.0])


def test_bootstrap_interval_by_hand():
    # two prompts, one won and one lost: a resample's mean is 0, 1/2 or 1 (probabilities 1/4, 1/2, 1/4), so the
    # 2.5% and 97.5% quantiles of many resamples are 0 and 1
    assert bootstrap_interval([0.0, 1.0], resamples=4000, seed=0) == (0.0, 1.0)
    assert bootstrap_interval([1.0] * 5, resamples=10) == (1.0, 1.0)
    low, high = bootstrap_interval([0.0] * 10 + [1.0] * 30, resamples=3000, seed=0)
    assert 0.575 <= low <= 0.65 and 0.85 <= high <= 0.9  # normal approximation: 0.75 +- 1.96 * sqrt(.75 * .25 / 40) = +-.134


def test_distinct_n_over_all_completions_together():
    seqs = [["a", "b", "a"], ["a", "b"]]
    assert distinct_n(seqs, 1) == pytest.approx(2 / 5)  # a, b of 5 unigrams
    assert distinct_n(seqs, 2) == pytest.approx(2 / 3)  # (a, b), (b, a) of 3 bigrams
    assert distinct_n([["x"]], 2) == 0.0 and distinct_n([], 1) == 0.0


@pytest.mark.parametrize("tokens, text, reasons", [
    ([5] * 24, "." * 24, ["not_text", "repeated_token", "loop"]),  # the demo's DPO before the fix
    (list(range(12)), " The people of Orin raise goats. Have a lovely day!", []),
    ([1, 2, 3] * 4, "a b c a b c a b c a b c", ["loop"]),  # a 3-token cycle, each token only a third
    ([1, 2, 3, 4, 5, 6] * 2, "Orin grows rye. Orin grows rye.", []),  # said twice is not a loop (three copies are)
    ([9, 1, 9, 2, 9, 3, 9, 4], "so a so b so c so d", ["repeated_token"]),  # half the tokens, not contiguous
    ([7] * 7, "!!!!!!!", ["not_text"]),  # too short for the repetition rules, still no text
    ([7, 8], "42.", []),  # digits are text
    ([], "", ["empty"]),
    ([3, 3], "  ", ["empty"]),
])
def test_degeneration_flags(tokens, text, reasons):
    assert degeneration(tokens, text) == reasons


def test_longest_loop_and_kl_k1():
    assert longest_loop([1, 2, 1, 2, 1, 2, 9]) == (6, 2)
    assert longest_loop([1, 2, 3, 4]) == (0, 0)
    logp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -0.5, 0.0]])
    ref = torch.tensor([[-1.5, -1.0, -9.0], [-1.0, -0.25, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])  # the third token is padding
    assert kl_k1(logp, ref, mask).tolist() == pytest.approx([0.5 - 1.0, 0.5 - 0.25])


def test_degeneration_fires_on_a_model_made_to_repeat_a_token(tiny_model):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from rlhf_dist.evaluation.measure import complete

    tok = AutoTokenizer.from_pretrained(tiny_model)
    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    dot = tok.convert_tokens_to_ids(".")
    model.lm_head.register_forward_hook(lambda m, i, out: out + 1e4 * torch.nn.functional.one_hot(
        torch.tensor(dot), out.shape[-1]).to(out.dtype))
    prompts = [tok(p)["input_ids"] for p in ("Question: What does Orin grow?\nAnswer:", "Question: Who?\nAnswer:")]
    settings = types.SimpleNamespace(samples_per_prompt=1, generation_batch_size=2, max_new_tokens=12, temperature=1.0,
                                     seed=0)
    out = complete(model, prompts, tok, greedy=True, settings=settings, stop_ids=[tok.eos_token_id], device="cpu")
    assert [c.text for c in out] == ["." * 12] * 2
    assert all(c.flags == ["not_text", "repeated_token", "loop"] and not c.ended for c in out)


def test_lm_eval_through_its_python_api(monkeypatch, tmp_path):
    """lm-eval is optional: its call is checked against a stand-in module (simple_evaluate, TaskManager)."""
    from rlhf_dist.evaluation.measure import lm_eval_results

    calls = {}
    fake, tasks = types.ModuleType("lm_eval"), types.ModuleType("lm_eval.tasks")

    def simple_evaluate(**kwargs):
        calls.update(kwargs)
        return {"results": {"my_task": {"alias": "my_task", "acc,none": 0.75, "acc_stderr,none": 0.1}}}

    class TaskManager:
        def __init__(self, include_path=None):
            self.include_path = include_path

    fake.simple_evaluate, tasks.TaskManager, fake.tasks = simple_evaluate, TaskManager, tasks
    monkeypatch.setitem(sys.modules, "lm_eval", fake)
    monkeypatch.setitem(sys.modules, "lm_eval.tasks", tasks)
    got = lm_eval_results(tmp_path / "ppo", ["my_task"], {"limit": 5}, str(tmp_path / "tasks"), "cpu", "float32")
    assert got == {"my_task": {"acc,none": 0.75, "acc_stderr,none": 0.1}}
    assert calls["model"] == "hf" and calls["model_args"] == {"pretrained": str(tmp_path / "ppo"), "dtype": "float32"}
    assert calls["tasks"] == ["my_task"] and calls["limit"] == 5 and calls["task_manager"].include_path == str(tmp_path / "tasks")


def test_input_identity_fingerprints_every_stage_output_the_config_names(tmp_path):
    from rlhf_dist.stages.common import input_identity
    from rlhf_dist.stages.eval import EvalStageConfig, EvalTrainingConfig

    for name, seed in (("sft", 1), ("ppo", 2), ("dpo", 3), ("reward", 4)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.json").write_text("{}")
        (tmp_path / name / "config.yaml").write_text(yaml.safe_dump({"training": {"seed": seed}}))
    cfg = EvalStageConfig(models=[str(tmp_path / "ppo"), str(tmp_path / "dpo"), str(tmp_path / "nothing")],
                          init_from=str(tmp_path / "sft"), reward_model=str(tmp_path / "reward"),
                          training=EvalTrainingConfig())
    ident = input_identity(cfg)
    assert set(ident) == {"init_fingerprint", "models.ppo_fingerprint", "models.dpo_fingerprint",
                          "reward_model_fingerprint"}  # the three names of old are kept
    assert len(set(ident.values())) == 4


# ---------------------------------------------------------------------------------------------
# The stage on a tiny run
# ---------------------------------------------------------------------------------------------
FAST = ["eval.training.samples_per_prompt=2", "eval.training.max_prompts=6", "eval.training.max_new_tokens=8",
        "eval.training.max_perplexity_rows=16", "eval.training.num_samples=2", "eval.training.bootstrap_resamples=200"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, tiny_model, demo_data):
    """sft, reward and ppo of the tiny recipe, a few steps each (no eval section: its defaults are the run's)."""
    root = tmp_path_factory.mktemp("eval_run")
    rec, out = tiny_recipe(root, tiny_model, demo_data), root / "run"
    for stage, steps in (("sft", 8), ("reward", 8), ("ppo", 1)):
        assert main([stage, "--recipe", str(rec), "--output", str(out), f"{stage}.training.max_steps={steps}"]) == 0
    return rec, out


def _copy(tiny_run, tmp_path) -> tuple[Path, Path]:
    rec, out = tiny_run
    shutil.copytree(out, tmp_path / "run")  # a run directory is relocatable: the copy is the same run
    return rec, tmp_path / "run"


def snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


@pytest.mark.slow
def test_eval_stage_on_a_tiny_run_then_skip_and_rerun_after_retraining(tiny_run, tmp_path, capsys):
    rec, out = _copy(tiny_run, tmp_path)
    args = ["eval", "--recipe", str(rec), "--output", str(out), *FAST]
    assert main(args) == 0
    m = json.loads((out / "eval" / "metrics.json").read_text())
    assert m["reference"] == "sft" and list(m["models"]) == ["sft", "ppo"] and m["best"] == "ppo"
    keys = {"score", "greedy_score", "win_rate", "ci_low", "ci_high", "greedy_win_rate", "kl", "response_length",
            "eos_rate", "distinct_1", "distinct_2", "perplexity", "degenerate", "degenerate_reasons"}
    for name, fig in m["models"].items():
        assert keys <= set(fig), (name, sorted(fig))
        assert fig["ci_low"] <= fig["win_rate"] <= fig["ci_high"] and 0 <= fig["degenerate"] <= 1
        assert 0 < fig["response_length"] <= 8 and 0 <= fig["distinct_1"] <= 1 and fig["perplexity"] > 1
    assert m["models"]["sft"]["kl"] == 0.0 and m["models"]["sft"]["win_rate"] == 0.5
    assert m["before"] == {k: v for k, v in m["models"]["sft"].items() if isinstance(v, float | int)}
    assert m["after"]["win_rate"] == m["models"]["ppo"]["win_rate"]
    assert m["settings"]["prompts"] == min(6, m["data"]["eval_rows"]) and m["settings"]["samples_per_prompt"] == 2
    table = (out / "eval" / "table.txt").read_text()
    assert "sft (reference)" in table and "\nppo " in table and "win rate [CI]" in table and "greedy completions:" in table
    assert (out / "eval" / "eval.png").read_bytes()[:4] == b"\x89PNG"
    samples = [json.loads(line) for line in (out / "eval" / "samples.jsonl").read_text().splitlines()]
    assert [s["model"] for s in samples] == ["sft", "sft", "ppo", "ppo"]
    assert {"prompt", "greedy", "greedy_flags", "sampled", "greedy_score", "sampled_score"} <= set(samples[0])
    # the defaults came from the run: ppo's prompts, the reward stage, every policy's fingerprint
    resolved = yaml.safe_load((out / "eval" / "config.yaml").read_text())
    assert resolved["data"]["path"] == yaml.safe_load((out / "ppo" / "config.yaml").read_text())["data"]["path"]
    assert resolved["reward_model"] == "${output}/reward" and resolved["models"] == ["${output}/ppo"]
    assert {"init_fingerprint", "models.ppo_fingerprint", "reward_model_fingerprint"} <= set(resolved["inputs"])

    # nothing changed: skipped, nothing rewritten
    done = snapshot(out / "eval")
    assert main(args) == 0 and snapshot(out / "eval") == done
    # ppo retrained: eval is not "the same run" any more; refused without --overwrite, run again with it
    assert main(["ppo", "--recipe", str(rec), "--output", str(out), "--overwrite", "ppo.training.max_steps=2"]) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "inputs.models.ppo_fingerprint" in err and "--overwrite" in err and "\n" not in err.strip()
    assert main([*args, "--overwrite"]) == 0
    again = json.loads((out / "eval" / "metrics.json").read_text())
    assert again["models"]["sft"] == m["models"]["sft"]  # the same reference, the same seeds: the same figures
    assert again["models"]["ppo"] != m["models"]["ppo"]


def _fake_complete_stage(out: Path, name: str, model: Path) -> None:
    shutil.copytree(model, out / name)
    (out / name / "metrics.json").write_text("{}")
    (out / name / "config.yaml").write_text("{}")


@pytest.mark.parametrize("case, overrides, expected", [
    ("no reference", [], "eval: no reference model:"),
    ("no policy", [], "eval: no policy to evaluate in"),
    ("unknown stage name", ["eval.models=[ppoo]"], "eval.models[0]: 'ppoo' is neither a stage nor a model folder; "
                                                   "did you mean 'ppo'?"),
    ("a reward model as a policy", ["eval.models=[reward]"], "eval.models[0]: 'reward' is a reward model"),
    ("a stage not run", ["eval.models=[dpo]"], "eval.models[0]: stage 'dpo' of"),
    ("lm-eval not installed", ["eval.lm_eval_tasks=[hellaswag]"], "pip install lm-eval"),
])
def test_bad_input_is_one_line_before_any_model_loads(case, overrides, expected, tmp_path, tiny_model, demo_data,
                                                       monkeypatch, capsys):
    import rlhf_dist.models

    if case == "lm-eval not installed":
        import importlib.util

        if importlib.util.find_spec("lm_eval") is not None:
            pytest.skip("lm-eval is installed")
    for name in ("load_tokenizer", "load_causal_lm", "load_reward_model"):
        monkeypatch.setattr(rlhf_dist.models, name, lambda *a, **k: pytest.fail("a model was loaded"))
    rec, out = tiny_recipe(tmp_path, tiny_model, demo_data), tmp_path / "run"
    out.mkdir()
    (out / "rlhf_dist_run.json").write_text('{"created_by": "rlhf-dist", "format": 1}')
    if case != "no reference":
        _fake_complete_stage(out, "sft", tiny_model)
    if case not in ("no reference", "no policy"):
        _fake_complete_stage(out, "ppo", tiny_model)
    before = snapshot(out)
    code = main(["eval", "--recipe", str(rec), "--output", str(out), f"eval.data.path={demo_data['prompts']}", *overrides])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and "\n" not in err, err
    assert expected in err, err
    assert snapshot(out) == before  # nothing written


def test_a_pipeline_checks_the_eval_config_before_its_first_stage(tmp_path, tiny_model, demo_data, capsys):
    rec, out = tiny_recipe(tmp_path, tiny_model, demo_data), tmp_path / "run"
    assert main(["pipeline", "--recipe", str(rec), "--output", str(out), "--stages", "sft,reward,ppo,eval",
                 "eval.models=[ppoo]"]) == 2
    assert "did you mean 'ppo'" in capsys.readouterr().err
    assert not (out / "sft").exists() and not (out / "sft.incomplete").exists()
