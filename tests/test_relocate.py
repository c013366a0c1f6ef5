"""Relocatable runs (`rlhf_dist.relocate`): paths in a run stored relative to it; a moved run's adapter still loads."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from rlhf_dist.relocate import (
    adapter_base,
    fix_adapter_config,
    relocatable_base,
    resolve,
    run_root,
    to_relative,
)


@pytest.fixture
def run(tmp_path) -> Path:
    root = tmp_path / "RUN"
    (root / "sft").mkdir(parents=True)
    (root / "rlhf_dist_run.json").write_text("{}")
    return root


def test_paths_inside_the_run_become_placeholders_and_back(run, tmp_path):
    obj = {
        "run_dir": str(run),
        "init_from": str(run / "sft"),
        "nested": {"list": [str(run / "dpo" / "adapter"), 3, None, True, 1.5], "tuple": (str(run / "x"),)},
        "outside": str(tmp_path / "models" / "base"),
        "sibling": str(run) + "2/sft",  # /x/RUN2 is not inside /x/RUN
        "prefix_of_name": str(run / "sft") + "x",  # RUN/sftx is inside RUN (as RUN/sftx), not RUN/sft
        "hub": "Qwen/Qwen2.5-0.5B",
        "relative": "data/train.jsonl",
        "text": f"started from `{run / 'sft'}` with --output {run} (see {run}/logs)",
        str(run / "key"): "keys are not rewritten",
    }
    rel = to_relative(obj, run)
    assert rel["run_dir"] == "${output}"
    assert rel["init_from"] == "${output}/sft"
    assert rel["nested"] == {"list": ["${output}/dpo/adapter", 3, None, True, 1.5], "tuple": ["${output}/x"]}
    assert rel["outside"] == obj["outside"] and rel["sibling"] == obj["sibling"]
    assert rel["prefix_of_name"] == "${output}/sftx"
    assert rel["hub"] == obj["hub"] and rel["relative"] == obj["relative"]
    assert rel["text"] == "started from `${output}/sft` with --output ${output} (see ${output}/logs)"
    assert rel[str(run / "key")] == "keys are not rewritten"
    assert str(run) + "/" not in json.dumps({k: v for k, v in rel.items() if k not in (str(run / "key"), "sibling")})
    assert obj["init_from"] == str(run / "sft"), "the input is not modified"

    back = resolve(rel, run)
    assert back == {**obj, "nested": {**obj["nested"], "tuple": [str(run / "x")]}}

    moved = tmp_path / "elsewhere" / "RUN"
    assert resolve(rel, moved)["init_from"] == str(moved / "sft")
    assert resolve(rel, moved)["run_dir"] == str(moved)
    assert resolve("${output}", moved) == str(moved) and resolve(7, moved) == 7


def test_run_dir_spellings(run, tmp_path, monkeypatch):
    # a trailing slash, a relative spelling (against the current directory), a link to the run: all the same run
    assert to_relative(str(run / "sft"), str(run) + "/") == "${output}/sft"
    monkeypatch.chdir(tmp_path)
    assert to_relative(str(run / "sft"), "RUN") == "${output}/sft"
    assert resolve("${output}/sft", "RUN") == str(run / "sft")
    link = tmp_path / "link"
    link.symlink_to(run)
    # the run directory given through a link: paths spelled either way are inside it (strings are not resolved
    # one by one, so a path spelled through a link the run directory is not given as stays as it is)
    assert to_relative([str(run / "sft"), str(link / "sft")], link) == ["${output}/sft", "${output}/sft"]
    assert to_relative("/", "/") == "/"  # the file system's root is no run directory to rewrite against


def test_relocatable_base(run, tmp_path, monkeypatch):
    assert relocatable_base(str(run / "sft"), run) == "./sft"
    assert relocatable_base(str(run), run) == "."
    assert relocatable_base("${output}/sft", run) == "./sft"
    assert relocatable_base("./sft", run) == "./sft"  # idempotent
    assert relocatable_base("Qwen/Qwen2.5-0.5B", run) == "Qwen/Qwen2.5-0.5B"
    assert relocatable_base(None, run) is None
    outside = tmp_path / "models" / "base"
    outside.mkdir(parents=True)
    assert relocatable_base(str(outside), run) == str(outside)
    monkeypatch.chdir(tmp_path)
    assert relocatable_base("models/base", run) == str(outside), "cwd-relative: made absolute"
    assert relocatable_base("RUN/sft", run) == "./sft"


def _adapter(folder: Path, base) -> Path:
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": base}))
    (folder / "README.md").write_text(f"---\nbase_model: {base}\nlibrary_name: peft\ntags:\n- base_model:adapter:{base}\n"
                                      f"- lora\n---\n\n# Model Card\n")
    return folder


def test_fix_adapter_config_and_adapter_base(run, tmp_path, monkeypatch):
    adapter = _adapter(run / "dpo" / "adapter", str(run / "sft"))
    assert fix_adapter_config(adapter) == "./sft"  # the run found by its marker file
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "./sft"
    card = (adapter / "README.md").read_text()
    assert "base_model: ./sft\n" in card and "- base_model:adapter:./sft\n" in card and str(run) not in card
    assert fix_adapter_config(adapter, run) == "./sft"  # idempotent
    assert adapter_base(adapter) == str(run / "sft")

    # while a stage saves, its adapter is in STAGE.incomplete/final/adapter; checkpoints in STAGE.incomplete/checkpoint-N
    saving = _adapter(run / "reward.incomplete" / "final" / "adapter", str(run / "sft"))
    checkpoint = _adapter(run / "reward.incomplete" / "checkpoint-2", str(run / "sft"))
    assert fix_adapter_config(saving) == fix_adapter_config(checkpoint) == "./sft"
    assert adapter_base(saving) == adapter_base(checkpoint) == str(run / "sft")

    outside = _adapter(run / "ppo" / "adapter", "Qwen/Qwen2.5-0.5B")
    assert fix_adapter_config(outside) == "Qwen/Qwen2.5-0.5B" and adapter_base(outside) == "Qwen/Qwen2.5-0.5B"
    assert fix_adapter_config(tmp_path) is None  # no adapter there

    moved = tmp_path / "moved" / "RUN"
    shutil.move(str(run), str(moved))
    for cwd in (tmp_path, moved, moved / "dpo" / "adapter", Path("/")):
        monkeypatch.chdir(cwd)
        assert adapter_base(moved / "dpo" / "adapter") == str(moved / "sft")
        assert adapter_base(moved / "reward.incomplete" / "checkpoint-2") == str(moved / "sft")
    assert run_root(moved / "dpo" / "adapter") == moved

    # without the marker file (a run's stage folders copied on their own): RUN/STAGE/adapter's grandparent
    (moved / "rlhf_dist_run.json").unlink()
    assert run_root(moved / "dpo" / "adapter") is None
    assert adapter_base(moved / "dpo" / "adapter") == str(moved / "sft")
    # an absolute base outside any run is kept; an adapter outside a run is left alone
    other = _adapter(tmp_path / "loose" / "adapter", str(tmp_path / "models"))
    assert fix_adapter_config(other) == str(tmp_path / "models") and adapter_base(other) == str(tmp_path / "models")


def test_a_moved_run_loads_in_plain_peft_and_with_our_loader(tmp_path, monkeypatch):
    """tmp/RUN/sft: a tiny Llama; tmp/RUN/dpo/adapter: a LoRA adapter on it saved as save_model does. After moving
    RUN, plain PEFT and our loader give exactly the logits of before; AutoPeftModel works from the run directory."""
    import torch
    from peft import AutoPeftModelForCausalLM, LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf_dist.config.sections import StageConfig
    from rlhf_dist.demo.tiny import save_tiny
    from rlhf_dist.models import load_adapter

    run = tmp_path / "RUN"
    run.mkdir()
    (run / "rlhf_dist_run.json").write_text(json.dumps({"created_by": "rlhf-dist", "format": 1}))
    texts = [f"the quick brown fox number {i} jumps over the lazy dog" for i in range(40)]
    save_tiny(run / "sft", texts, vocab_size=300, hidden_size=64, num_layers=2)
    base = AutoModelForCausalLM.from_pretrained(str(run / "sft"))
    torch.manual_seed(0)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                            init_lora_weights=False))  # random B: the adapter changes the outputs
    model.eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        before = model(ids).logits
        with model.disable_adapter():
            assert not torch.allclose(model(ids).logits, before)
    final = run / "dpo.incomplete" / "final"  # where save_model writes; rundir.finalize renames it to RUN/dpo
    model.save_pretrained(str(final / "adapter"))
    assert json.loads((final / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == str(run / "sft")
    fix_adapter_config(final / "adapter")
    os.replace(final, run / "dpo")
    shutil.rmtree(run / "dpo.incomplete")
    assert not any(str(tmp_path) in p.read_text() for p in (run / "dpo" / "adapter").glob("*.json"))

    new = tmp_path / "moved" / "NEW"
    new.parent.mkdir()
    shutil.move(str(run), str(new))
    assert not run.exists()
    monkeypatch.chdir(tmp_path)  # neither the old nor the new run directory
    with torch.no_grad():
        plain = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(new / "sft")), str(new / "dpo" / "adapter"))
        assert torch.equal(plain.eval()(ids).logits, before)
        ours = load_adapter(new / "dpo" / "adapter", StageConfig())
        assert ours.get_base_model().name_or_path == str(new / "sft")
        assert torch.equal(ours.eval()(ids).logits, before)
    monkeypatch.chdir(new)  # AutoPeftModel reads the stored base against the current directory: the run's
    with torch.no_grad():
        auto = AutoPeftModelForCausalLM.from_pretrained("dpo/adapter")
        assert torch.equal(auto.eval()(ids).logits, before)


def test_trackers_write_under_the_run(tmp_path, monkeypatch):
    """TensorBoard (the Trainer's callback) in WORK/tensorboard, W&B in the run directory, unless the user set
    them; copied into the stage's output; the environment restored after."""
    from transformers.integrations import TensorBoardCallback

    from rlhf_dist.rl.tracking import keep_tracker_files, tracker_env, tracker_env_vars

    run, work = tmp_path / "RUN", tmp_path / "RUN" / "sft.incomplete"
    work.mkdir(parents=True)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    with tracker_env(work, run) as added:
        assert added == {"TENSORBOARD_LOGGING_DIR": str(work / "tensorboard"), "WANDB_DIR": str(run)}
        assert os.environ["WANDB_DIR"] == str(run)
        assert TensorBoardCallback().logging_dir == str(work / "tensorboard")
    assert "TENSORBOARD_LOGGING_DIR" not in os.environ and "WANDB_DIR" not in os.environ

    monkeypatch.setenv("WANDB_DIR", "/somewhere/wandb")  # the user's choice is kept
    assert tracker_env_vars(work, run) == {"TENSORBOARD_LOGGING_DIR": str(work / "tensorboard")}
    with tracker_env(work, run):
        assert os.environ["WANDB_DIR"] == "/somewhere/wandb"
    assert os.environ["WANDB_DIR"] == "/somewhere/wandb"

    final = work / "final"
    assert keep_tracker_files(work, final) == []  # nothing logged
    (work / "tensorboard" / "x").mkdir(parents=True)
    (work / "tensorboard" / "x" / "events.out.tfevents.1").write_bytes(b"e")
    assert keep_tracker_files(work, final) == [final / "tensorboard"]
    assert (final / "tensorboard" / "x" / "events.out.tfevents.1").read_bytes() == b"e"


@pytest.mark.slow
def test_a_moved_run_resumes_and_its_adapter_loads_in_plain_peft(tmp_path, shared_recipe):
    """sft, then a LoRA dpo killed after its first checkpoint; the whole run is moved; --resume in the new place
    completes it, every stored path still means the run, and the adapter loads on the moved sft with plain PEFT."""
    import shutil

    import torch
    import yaml
    from helpers import EVERY, STEPS_CHECKPOINTED, checkpointed_args, stage_process
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    old, new = tmp_path / "old" / "run", tmp_path / "new" / "run"
    sft = stage_process("sft", "--recipe", str(shared_recipe), "--output", str(old), "sft.training.max_steps=4")
    assert sft.returncode == 0, sft.stderr[-3000:]
    args = [*checkpointed_args("dpo", shared_recipe, Path("unused")), "dpo.lora.enabled=true", "dpo.lora.r=4"]
    killed = stage_process("dpo", *args, "--output", str(old), fault=f"step@{EVERY['dpo'] + 2}:kill")
    assert killed.returncode != 0 and (old / "dpo.incomplete" / f"checkpoint-{EVERY['dpo']}").is_dir()
    new.parent.mkdir()
    shutil.move(str(old), str(new))
    done = stage_process("dpo", *args, "--output", str(new), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    checkpoint = new / "dpo.incomplete" / f"checkpoint-{EVERY['dpo']}"
    assert f"resuming from {checkpoint}" in done.stderr
    metrics = json.loads((new / "dpo" / "metrics.json").read_text())
    assert metrics["train"]["global_step"] == STEPS_CHECKPOINTED["dpo"] and metrics["init_from"] == "${output}/sft"
    config = yaml.safe_load((new / "dpo" / "config.yaml").read_text())
    assert config["init_from"] == "${output}/sft" and config["run_dir"] == "${output}"
    assert str(tmp_path) not in (new / "dpo" / "README.md").read_text()
    assert json.loads((new / "dpo" / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == "./sft"
    # plain transformers + peft, from the moved files only: the adapter on the sft model is the merged dpo model
    ids = torch.tensor([[5, 17, 42, 7, 99, 3]])
    with torch.no_grad():
        adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(new / "sft"), new / "dpo" / "adapter")
        merged = AutoModelForCausalLM.from_pretrained(new / "dpo")
        assert torch.allclose(adapted(ids).logits, merged(ids).logits, atol=1e-5)
        assert not torch.allclose(AutoModelForCausalLM.from_pretrained(new / "sft")(ids).logits, merged(ids).logits,
                                  atol=1e-5)  # and the adapter did train


def test_a_trainer_stage_logs_tensorboard_into_its_output(tmp_path, shared_recipe, monkeypatch):
    """A real sft run with report_to=tensorboard: the events end in RUN/sft/tensorboard, nothing in the cwd."""
    from rlhf_dist.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / "run"
    assert main(["sft", "--recipe", str(shared_recipe), "--output", str(out), "sft.training.max_steps=2",
                 "sft.training.report_to=[tensorboard]", "sft.training.logging_steps=1"]) == 0
    events = list((out / "sft" / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no runs/ or wandb/ where the command ran
