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
