"""KTO (unpaired good / bad data, or pairs unpaired) and DPO's loss variants as recipe options, on the tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from helpers import tiny_recipe as recipe

from rlhf_dist.config.sections import DataSection
from rlhf_dist.data import DataReport, load_splits
from rlhf_dist.errors import DataError
from rlhf_dist.stages.kto import label_metrics


def run_stage(stage: str, rec: Path, out: Path, *overrides: str) -> dict:
    from rlhf_dist.cli import main

    assert main([stage, "--recipe", str(rec), "--output", str(out), *overrides]) == 0
    return json.loads((out / stage / "metrics.json").read_text())


def write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# ------------------------------------------------------------------------------------------------- data
def test_unpaired_rows_and_pairs_unpaired(tmp_path):
    rows = [{"prompt": "Q: a?", "completion": " yes.", "label": True}, {"prompt": "Q: b?", "completion": " no.", "label": 0},
            {"prompt": [{"role": "user", "content": "c?"}], "completion": [{"role": "assistant", "content": "ok"}],
             "label": 1}]
    cfg = DataSection(path=str(write(tmp_path / "u.jsonl", rows[:2])), eval_fraction=0.0)
    train, _, _ = load_splits(cfg, "unpaired", "kto")
    assert train.to_list() == [{"prompt": "Q: a?", "completion": " yes.", "label": True},
                               {"prompt": "Q: b?", "completion": " no.", "label": False}]
    pairs = [{"prompt": "Q: x?", "chosen": " good.", "rejected": " bad."}, {"chosen": "Q: y? fine", "rejected": "Q: y? rude"}]
    report = DataReport()
    train, _, _ = load_splits(DataSection(path=str(write(tmp_path / "p.jsonl", pairs)), eval_fraction=0.0), "unpaired",
                              "kto", report)
    assert report.rows_read == 2 and len(train) == 4  # each pair: its chosen answer good, its rejected one bad
    assert [(r["prompt"], r["completion"], r["label"]) for r in train.to_list()] == [
        ("Q: x?", " good.", True), ("Q: x?", " bad.", False), ("Q: y? ", "fine", True), ("Q: y? ", "rude", False)]


@pytest.mark.parametrize("row,message", [
    ({"prompt": "p", "completion": "c", "label": "yes"}, r"line 1: field 'label' should be true or false \(or 1 or 0"),
    ({"prompt": "p", "completion": "c", "label": 2}, r"line 1: field 'label' should be true or false"),
    ({"prompt": "p", "completion": "c", "label": None}, r"line 1: field 'label' is missing"),
    ({"prompt": "p", "completion": " ", "label": True}, r"line 1: field 'completion' is empty"),
    ({"prompt": "p", "completion": [{"role": "assistant", "content": "x"}], "label": True},
     r"field 'completion' must be a string when prompt is a string"),
])
def test_bad_unpaired_rows_are_one_line(tmp_path, row, message):
    path = write(tmp_path / "bad.jsonl", [row, {"prompt": "p2", "completion": "c2", "label": False}])
    with pytest.raises(DataError, match=message) as caught:
        load_splits(DataSection(path=str(path), eval_fraction=0.0), "unpaired", "kto")
    assert "\n" not in str(caught.value) and str(path) in str(caught.value) and "kto.data.on_bad_row=skip" in str(caught.value)


def test_unpaired_data_without_its_columns_names_them(tmp_path):
    path = write(tmp_path / "sft.jsonl", [{"prompt": "p", "completion": "c"}])
    with pytest.raises(DataError, match=r"no 'label' column for unpaired \(KTO\) data"):
        load_splits(DataSection(path=str(path), eval_fraction=0.0), "unpaired", "kto")


def test_label_metrics_by_hand():
    rewards = torch.tensor([0.5, -0.2, 0.0, -1.0, 0.3])
    labels = torch.tensor([1, 1, 0, 0, 0])
    m = label_metrics(rewards, labels)
    # good rows: 0.5 right, -0.2 wrong; bad rows: 0.0 tie (1/2), -1.0 right, 0.3 wrong -> (1 + 0 + 0.5 + 1 + 0) / 5
    assert m["accuracy"] == pytest.approx(2.5 / 5) and m["ties"] == pytest.approx(1 / 5) and m["rows"] == 5
    assert m["margin"] == pytest.approx((0.5 - 0.2) / 2 - (0.0 - 1.0 + 0.3) / 3)
    assert label_metrics(torch.zeros(4), torch.tensor([1, 0, 1, 0]))["accuracy"] == 0.5  # policy == reference


# ------------------------------------------------------------------------------------------------- stages
@pytest.mark.slow
def test_kto_raises_its_held_out_metric_on_the_demo_pairs(tmp_path, tiny_model, demo_data):
    """The demo's preference pairs, unpaired (chosen good, rejected bad): the label agreement of the implicit reward
    starts at one half (every reward is 0: the policy is the reference) and rises, and so does the margin. (The
    LoRA reference, the adapter turned off, is the DPO stage's code: tests/test_stages.py runs it.)"""
    rec = recipe(tmp_path, tiny_model, demo_data, extra=f"""kto:
  data: {{path: "{demo_data['preference']}"}}
  training: {{max_steps: 30, learning_rate: 1.0e-3, max_length: 96, per_device_train_batch_size: 16,
             save_strategy: "no", seed: 0}}
""")
    out = tmp_path / "run"
    m = run_stage("kto", rec, out)
    assert m["before"]["accuracy"] == pytest.approx(0.5) and m["before"]["ties"] == pytest.approx(1.0)
    assert m["after"]["accuracy"] > 0.8 and m["after"]["margin"] > m["before"]["margin"] + 0.1
    assert m["data"]["rows_read"] * 2 == m["data"]["train_rows"] + m["data"]["eval_rows"]  # each pair gave two rows
    assert (out / "kto" / "model.safetensors").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("losses", [["ipo"], ["robust", "hinge"]], ids=["ipo", "robust+hinge"])
def test_dpo_loss_variants_are_recipe_options(tmp_path, tiny_model, demo_data, losses):
    """TRL's DPO loss variants (dpo.training.loss_type, a list: several are summed with loss_weights) train through the
    stage: the held-out margin rises. (The demo trains with [sigmoid, sft], SFT-regularised DPO: its test checks it.)"""
    weights = [f"dpo.training.loss_weights=[{', '.join('1.0' for _ in losses)}]"] if len(losses) > 1 else []
    m = run_stage("dpo", recipe(tmp_path, tiny_model, demo_data), tmp_path / "run",
                  f"dpo.training.loss_type=[{', '.join(losses)}]", *weights, "dpo.training.max_steps=15")
    assert m["after"]["margin"] > m["before"]["margin"] + 0.05
    assert m["after"]["accuracy"] > m["before"]["accuracy"]
    resolved = (tmp_path / "run" / "dpo" / "config.yaml").read_text()
    assert all(f"- {name}" in resolved for name in losses)
