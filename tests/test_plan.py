"""`rlhf-dist plan`: exact parameter counts from configs, agreement with DeepSpeed's estimators, the CLI."""

from __future__ import annotations

import json
import re

import pytest

from rlhf_dist import cli, plan

GIB = 2**30
LLAMA_7B = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "num_hidden_layers": 32,
            "num_attention_heads": 32, "num_key_value_heads": 32, "intermediate_size": 11008, "vocab_size": 32000,
            "max_position_embeddings": 4096, "tie_word_embeddings": False}


def _tiny_configs():
    from transformers import GPT2Config, LlamaConfig, Qwen2Config

    llama = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=72)
    return {
        "llama-untied": LlamaConfig(**llama, tie_word_embeddings=False),
        "llama-tied": LlamaConfig(**llama, tie_word_embeddings=True),
        "llama-biases": LlamaConfig(**llama, attention_bias=True, mlp_bias=True),
        "llama-head_dim": LlamaConfig(**llama, head_dim=16),
        "qwen2": Qwen2Config(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                             num_key_value_heads=2, intermediate_size=80, tie_word_embeddings=False),
        "qwen2-tied": Qwen2Config(vocab_size=97, hidden_size=48, num_hidden_layers=3, num_attention_heads=6,
                                  num_key_value_heads=2, intermediate_size=80, tie_word_embeddings=True),
        "gpt2": GPT2Config(vocab_size=103, n_embd=32, n_layer=2, n_head=4, n_positions=64),
        "gpt2-untied": GPT2Config(vocab_size=103, n_embd=32, n_layer=2, n_head=4, n_positions=64, n_inner=40,
                                  tie_word_embeddings=False),
    }


@pytest.mark.parametrize("name", list(_tiny_configs()))
def test_param_count_matches_instantiated_model(name):
    """Closed form == meta-device count == numel of the real (CPU) model, shared (tied) weights counted once."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = _tiny_configs()[name]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    real = sum(p.numel() for p in model.parameters())
    assert plan.analytic_param_count(cfg) == real
    shape = plan.model_shape(cfg, "policy", False, 16)
    assert shape.params == real
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    assert shape.largest_layer == largest


def test_lora_params_match_peft():
    """r*(in+out) per 'all-linear' target, as peft builds it (the output head excluded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    cfg = _tiny_configs()["qwen2"]
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg), LoraConfig(r=8, target_modules="all-linear"))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert plan.model_shape(cfg, "policy", False, 8).lora_params[8] == trainable


# ------------------------------------------------------------------------------------------------ DeepSpeed
SIZES = [125_000_000, 1_300_000_000, 7_000_000_000, 70_000_000_000]
SETUPS = [(1, 1), (8, 1), (8, 2)]  # (GPUs per node, nodes)


@pytest.mark.parametrize("total", SIZES)
@pytest.mark.parametrize("gpus_per_node,nodes", SETUPS)
def test_model_states_agree_with_deepspeed(total, gpus_per_node, nodes):
    """Our model-state bytes against DeepSpeed 0.19's own estimators (the functions behind the `_all_cold` printers).

    Conventions compared (P parameters, N GPUs, n nodes, L largest layer's parameters):
    * ZeRO-2, GPU: both 2P + 18P/N (16-bit weights; 16-bit + fp32 gradients, fp32 master, Adam m, v partitioned):
      equal to the byte (DeepSpeed truncates to int).
    * ZeRO-2 offload, GPU: both 2P, equal. CPU: DeepSpeed gives P * max(4N, 16) * 1.5 for a node, i.e. it does not
      divide the 16P optimizer share by the nodes, takes the max with a one-off fp32 load of the model by every
      process (4 B/param x N), and multiplies by its `additional_buffer_factor` 1.5. We report the steady state
      16P/n per node, without the buffer factor; so DeepSpeed == 1.5 * max(4PN, 16P/n * n).
    * ZeRO-3, GPU: DeepSpeed 4L + 18P/N; ours 4L + 20P/N: we also keep the 16-bit gradient partition (2P/N).
      Equal after subtracting that stated 2P/N (ours is at most 11% higher).
    * ZeRO-3 offload (params + optimizer, zero_init), GPU: both 4L (the gathered largest layer and its gradient).
      CPU per node: DeepSpeed 18P/n * 1.5; ours 18P/n: equal after the 1.5 buffer factor.
    """
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    n_gpus = gpus_per_node * nodes
    largest = total // 50  # e.g. an embedding matrix; only enters as 4L on both sides

    def gpu(states):
        return states.weights + states.grads + states.optimizer

    ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload=False)
    ours = plan.trainable_states(total, largest, "zero2", n_gpus, nodes)
    assert abs(gpu(ours) - ds_gpu) <= 1

    ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(total, gpus_per_node, nodes, cpu_offload=True)
    ours = plan.trainable_states(total, largest, "zero2_offload", n_gpus, nodes)
    assert gpu(ours) == ds_gpu
    assert abs(ds_cpu - 1.5 * max(4 * total * n_gpus, ours.cpu_per_node * nodes)) <= 1

    ds_cpu, ds_gpu, ds_largest = estimate_zero3_model_states_mem_needs(total, largest, gpus_per_node, nodes,
                                                                       cpu_offload=False, cpu_offload_params=False)
    ours = plan.trainable_states(total, largest, "zero3", n_gpus, nodes)
    assert ds_largest == 4 * largest
    assert abs(gpu(ours) - 2 * total / n_gpus - ds_gpu) <= 1
    assert 1.0 < gpu(ours) / ds_gpu <= 20 / 18 + 1e-9

    ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(total, largest, gpus_per_node, nodes,
                                                              cpu_offload=True, cpu_offload_params=True, zero_init=True)
    ours = plan.trainable_states(total, largest, "zero3_offload", n_gpus, nodes)
    assert gpu(ours) == ds_gpu
    assert abs(1.5 * ours.cpu_per_node - ds_cpu) <= 1


def test_zero2_all_cold_printout_matches(capsys):
    """The public `_all_cold` printer (GiB, 2 decimals) shows the same per-GPU number as our ZeRO-2 row."""
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold

    total = 7_000_000_000
    estimate_zero2_model_states_mem_needs_all_cold(total, num_gpus_per_node=8, num_nodes=2)
    printed = capsys.readouterr().out
    line = next(ln for ln in printed.splitlines() if "offload_optimizer=none" in ln)
    ds_gpu_gib = float(re.findall(r"([\d.]+)GB", line)[1])
    ours = plan.trainable_states(total, 0, "zero2", 16, 2)
    assert abs((ours.weights + ours.grads + ours.optimizer) / GIB - ds_gpu_gib) < 0.01


# ------------------------------------------------------------------------------------------------------ CLI
@pytest.fixture
def tiny_dir(tmp_path):
    from transformers import LlamaConfig

    out = tmp_path / "tiny"
    LlamaConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                architectures=["LlamaForCausalLM"]).save_pretrained(out)
    return out


@pytest.fixture
def llama7b(tmp_path):
    out = tmp_path / "llama7b"
    out.mkdir()
    (out / "config.json").write_text(json.dumps(LLAMA_7B))
    return out


def _run(args, tmp_path, capsys):
    path = tmp_path / "plan.json"
    code = cli.main(["plan", *args, "--json", str(path)])
    out = capsys.readouterr()
    return code, out, json.loads(path.read_text()) if path.exists() else None


def _check_recommendation(result):
    """The recommended row fits by the planner's own numbers, and no row before it in the preference order fits."""
    rows, rec = result["options"], result["recommended"]
    order = [(r["method"], r["strategy"]) for r in rows]
    assert order == plan.options()
    i = order.index((rec["method"], rec["strategy"]))
    assert rec["total"] <= result["usable_gpu_gib"] and rec["fits"]
    for r in rows[:i]:
        assert not r["fits"]
        assert r["total"] > result["usable_gpu_gib"] or not r["fits_cpu"]
    for r in rows:
        parts = r["weights"] + r["grads"] + r["optimizer"] + max(r["activations"], r["kv_cache"])
        assert r["total"] == pytest.approx(parts)
    return i


def test_cli_ppo_tiny(tiny_dir, tmp_path, capsys):
    code, out, result = _run(["--model", str(tiny_dir), "--stage", "ppo", "--gpus-per-node", "1", "--nodes", "1",
                              "--gpu-memory", "24"], tmp_path, capsys)
    assert code == 0, out.err
    assert "method strategy" in out.out and "<- recommended" in out.out
    _check_recommendation(result)
    assert result["recommended"]["method"] == "full" and result["recommended"]["strategy"] == "ddp"
    assert "rlhf-dist launch ppo --recipe RECIPE.yaml --output runs/OUT --strategy ddp --num-processes 1" in out.out
    assert [m["role"] for m in result["models"]] == ["policy", "reward"]
    full_ddp = result["options"][0]
    assert full_ddp["kv_cache"] > 0
    # policy + value trained (20 B/param), reference + reward frozen (2 B/param)
    p_policy, p_rm = (m["params"] for m in result["models"])
    assert full_ddp["weights"] + full_ddp["grads"] + full_ddp["optimizer"] == \
        pytest.approx((20 * p_policy + 2 * p_policy + 2 * p_rm + 20 * p_rm) / GIB)


def test_7b_sft_single_24gb_gpu(llama7b, tmp_path, capsys):
    """Full fine-tuning of a 7B model does not fit on one 24 GB GPU (not even offloaded to a 64 GB host); QLoRA does
    (the QLoRA paper's setting)."""
    code, out, result = _run(["--model", str(llama7b), "--stage", "sft", "--gpus-per-node", "1", "--nodes", "1",
                              "--gpu-memory", "24", "--cpu-memory", "64"], tmp_path, capsys)
    assert code == 0, out.err
    assert result["models"][0]["params"] == 6_738_415_616  # Llama-2-7B
    rows = {(r["method"], r["strategy"]): r for r in result["options"]}
    assert not any(r["fits"] for (m, _), r in rows.items() if m == "full")
    assert not any(rows[("full", s)]["fits_gpu"] for s in ("ddp", "zero2", "zero3"))
    assert rows[("qlora", "ddp")]["fits"] and rows[("qlora", "ddp")]["total"] < 8
    # 6.476B linear weights in NF4 + double-quant constants; embeddings, head, norms (0.262B) in fp32
    quantized = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008)
    nf4 = quantized * (0.5 + 0.127 / 8) + (6_738_415_616 - quantized) * 4
    lora = 16 * 32 * (4 * (4096 + 4096) + 3 * (4096 + 11008))  # r*(in+out) for q, k, v, o, gate, up, down
    assert result["models"][0]["lora_params"] == lora
    assert rows[("qlora", "ddp")]["weights"] == pytest.approx((nf4 + 2 * lora) / GIB)  # + 16-bit adapters
    assert rows[("qlora", "ddp")]["optimizer"] == pytest.approx(12 * lora / GIB)
    i = _check_recommendation(result)
    assert plan.options()[i] == ("lora", "ddp")
    assert "sft.lora.enabled=true" in out.out
    # without --cpu-memory an offload option is never recommended
    code, out, result = _run(["--model", str(llama7b), "--stage", "sft", "--gpu-memory", "24"], tmp_path, capsys)
    assert result["recommended"]["method"] == "lora" and "cpu unknown" in out.out


def test_7b_sft_zero3_on_8x80(llama7b, tmp_path, capsys):
    code, out, result = _run(["--model", str(llama7b), "--stage", "sft", "--gpus-per-node", "8", "--nodes", "1",
                              "--gpu-memory", "80"], tmp_path, capsys)
    assert code == 0, out.err
    rows = {(r["method"], r["strategy"]): r for r in result["options"]}
    assert rows[("full", "zero3")]["fits"] and not rows[("full", "ddp")]["fits"]
    _check_recommendation(result)
    assert (result["recommended"]["method"], result["recommended"]["strategy"]) == ("full", "zero2")
    assert "--strategy zero2 --num-processes 8" in result["recommended"]["command"]


def test_7b_qlora_command_and_two_nodes(llama7b, tmp_path, capsys):
    code, out, result = _run(["--model", str(llama7b / "config.json"), "--stage", "dpo", "--gpus-per-node", "1",
                              "--nodes", "2", "--gpu-memory", "8", "--seq-len", "1024"], tmp_path, capsys)
    assert code == 0, out.err
    rec = result["recommended"]
    assert rec["method"] == "qlora"
    assert "dpo.quantization.load_in_4bit=true" in rec["command"] and "--num-machines 2" in rec["command"]
    _check_recommendation(result)


@pytest.mark.parametrize("args,message", [
    (["--stage", "rlhf"], "--stage: unknown stage 'rlhf'"),
    (["--stage", "sft", "--gpu-memory", "2"], "the smallest, qlora+ddp, needs 5.8 GiB"),
    (["--stage", "sft", "--gpu-memory", "2", "--cpu-memory", "1"], "fit the GPU but not the CPU memory"),
    (["--stage", "sft", "--gpus-per-node", "0"], "--gpus-per-node must be >= 1"),
])
def test_bad_input(args, message, llama7b, capsys):
    argv = ["plan", "--model", str(llama7b), "--gpu-memory", "24", *args]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_bad_model(tmp_path, capsys):
    assert cli.main(["plan", "--model", str(tmp_path / "nope"), "--stage", "sft", "--gpu-memory", "24"]) == 2
    assert "does not exist" in capsys.readouterr().err
    vit = tmp_path / "vit"
    vit.mkdir()
    (vit / "config.json").write_text(json.dumps({"model_type": "vit", "hidden_size": 32}))
    assert cli.main(["plan", "--model", str(vit), "--stage", "sft", "--gpu-memory", "24"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --model:") and "causal-LM" in err and "\n" not in err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli.main(["plan", "--model", str(empty), "--stage", "sft", "--gpu-memory", "24"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_plan_reads_the_recipe_in_its_vocabulary(llama7b, tmp_path, capsys):
    """--recipe R --stage S plans the stage's own settings (model, sequence length, micro-batch, checkpointing, LoRA
    rank, precision, ppo's reward model and generation batch); the same plan as the flags that say the same, and a
    flag given as well wins. The old flag names still work."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"""
model: {{name_or_path: "{llama7b}"}}
lora: {{r: 8}}
sft:
  training: {{max_length: 1536, per_device_train_batch_size: 4, activation_checkpointing: false, bf16: false}}
ppo:
  reward_model: "{llama7b}"
  training: {{max_prompt_length: 256, max_new_tokens: 128, per_device_train_batch_size: 2, generation_batch_size: 8,
             rollout_batch_size: 16, mini_batch_size: 16, activation_checkpointing: true}}
""")
    common = ["--gpus-per-node", "1", "--gpu-memory", "80"]
    _, out, from_recipe = _run(["--recipe", str(recipe), "--stage", "sft", *common], tmp_path, capsys)
    assert (from_recipe["seq_len"], from_recipe["per_device_train_batch_size"], from_recipe["activation_checkpointing"],
            from_recipe["lora_r"], from_recipe["precision"]) == (1536, 4, False, 8, "fp32")
    assert f"--recipe {recipe}" in out.out
    _, _, by_flags = _run(["--model", str(llama7b), "--stage", "sft", "--seq-len", "1536", "--per-device-train-batch-size",
                           "4", "--no-activation-checkpointing", "--lora-r", "8", "--precision", "fp32", *common],
                          tmp_path, capsys)
    assert rows(from_recipe) == rows(by_flags)
    _, _, old_names = _run(["--model", str(llama7b), "--stage", "sft", "--seq-len", "1536", "--micro-batch", "4",
                            "--no-gradient-checkpointing", "--lora-r", "8", "--precision", "fp32", *common],
                           tmp_path, capsys)
    assert rows(old_names) == rows(by_flags)
    _, _, overridden = _run(["--recipe", str(recipe), "--stage", "sft", "--per-device-train-batch-size", "1", *common],
                            tmp_path, capsys)
    assert overridden["per_device_train_batch_size"] == 1 and overridden["seq_len"] == 1536

    _, _, ppo = _run(["--recipe", str(recipe), "--stage", "ppo", *common], tmp_path, capsys)
    assert (ppo["seq_len"], ppo["per_device_train_batch_size"], ppo["activation_checkpointing"], ppo["precision"]) == \
        (384, 2, True, "bf16-mixed")  # prompt + new tokens; bf16 not turned off: the GPU convention
    _, _, ppo_flags = _run(["--model", str(llama7b), "--stage", "ppo", "--seq-len", "384", "--micro-batch", "2",
                            "--lora-r", "8", *common], tmp_path, capsys)
    kv = {r["method"] + r["strategy"]: r["kv_cache"] for r in ppo["options"]}
    assert all(kv[r["method"] + r["strategy"]] == 4 * r["kv_cache"] for r in ppo_flags["options"])  # 8 generated at once


def rows(result: dict) -> list[dict]:
    """The options' figures, without the recommended row's launch command (it names the recipe, or RECIPE.yaml)."""
    return [{k: v for k, v in row.items() if k != "command"} for row in result["options"]]


def test_plan_without_a_model_is_one_line(tmp_path, capsys):
    assert cli.main(["plan", "--stage", "sft", "--gpu-memory", "24"]) == 2
    assert capsys.readouterr().err.strip() == "error: --model or --recipe is needed: the model whose config is planned"


def test_text_config_is_the_language_model_part_of_a_composite_config():
    """A vision-language config's shapes are its text model's: the planner and the PPO models read the same part."""
    from transformers import LlamaConfig, LlavaConfig

    from rlhf_dist.plan import text_config
    from rlhf_dist.rl.generation import text_config_of

    text = LlamaConfig(hidden_size=96, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                       vocab_size=300)
    composite = LlavaConfig(text_config=text.to_dict())
    assert text_config(composite).hidden_size == 96 and text_config(text) is text

    class Wrapped:  # a model whose config is composite
        config = composite

    assert text_config_of(Wrapped()).hidden_size == 96
