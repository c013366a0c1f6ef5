#!/usr/bin/env bash
# Launch one rlhf-dist stage on this machine with a strategy from this folder (launch/STRATEGY.yaml).
#
#   launch/launch.sh STAGE STRATEGY [NUM_PROCESSES] -- --recipe RECIPE --output RUN_DIR [KEY=VALUE ...]
#
#   launch/launch.sh sft zero3 8 -- --recipe my.yaml --output runs/x
#   launch/launch.sh ppo ddp 2 -- --recipe demo --output runs/demo ppo.training.kl_coef=0.05
#   DRY_RUN=1 launch/launch.sh dpo zero2 8 -- --recipe my.yaml --output runs/x     # print the command only
#   # machine 1 of 2 (run the same line with MACHINE_RANK=0 on machine 0, whose address is MAIN_PROCESS_IP):
#   NUM_MACHINES=2 MACHINE_RANK=1 MAIN_PROCESS_IP=10.0.0.1 launch/launch.sh sft zero3 8 -- --recipe my.yaml --output /shared/x
#
# Strategies: single, ddp, zero2, zero3, zero2_offload, zero3_offload. NUM_PROCESSES is per machine
# (default: the GPUs here, else 1). This is `rlhf-dist launch` (python -m rlhf_dist launch), which builds
# the exact `accelerate launch --config_file launch/STRATEGY.yaml [--deepspeed_config_file
# ds_configs/STRATEGY.json] ...` command, checks afterwards that the stage ran on that many processes,
# and passes USR1 on to the training processes (they checkpoint and stop; re-run with --resume).
# PYTHON selects the interpreter (default: python).
set -euo pipefail

usage() {
    sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}
[ "$#" -ge 2 ] || usage
stage=$1 strategy=$2
shift 2
args=(launch "$stage" --strategy "$strategy")
if [ "$#" -gt 0 ] && [ "$1" != "--" ]; then
    args+=(--num-processes "$1")
    shift
fi
[ "${1:-}" = "--" ] && shift
[ -n "${NUM_MACHINES:-}" ] && args+=(--num-machines "$NUM_MACHINES")
[ -n "${MACHINE_RANK:-}" ] && args+=(--machine-rank "$MACHINE_RANK")
[ -n "${MAIN_PROCESS_IP:-}" ] && args+=(--main-process-ip "$MAIN_PROCESS_IP")
[ -n "${MAIN_PROCESS_PORT:-}" ] && args+=(--main-process-port "$MAIN_PROCESS_PORT")
[ "${DRY_RUN:-0}" = 1 ] && args+=(--dry-run)
exec "${PYTHON:-python}" -m rlhf_dist "${args[@]}" "$@"
