"""The batch-size arithmetic of the PPO loop, shared by the trainer, the accelerator set-up and `rlhf-dist launch`.

Pure arithmetic on the `training` section (no torch), so the launcher checks a recipe's batch sizes against the
process count before it starts any process. Batch sizes count rollouts over all processes (see
`config.PPOTrainingConfig`); docs/ppo.md item 20: every process gets an equal, whole share.
"""

from __future__ import annotations


def micro_batches_per_process(args, world: int) -> int:
    """Gradient accumulation steps: micro-batches per process in one minibatch."""
    return args.mini_batch_size // world // args.per_device_train_batch_size


def check_batch_sizes(args, world: int) -> None:
    """Every process must get equal, whole shares (item 20); raise ValueError naming the fix otherwise."""
    rollouts_per_process = args.rollout_batch_size * args.samples_per_prompt // world
    problems = []
    if args.rollout_batch_size % world:
        problems.append(f"rollout_batch_size={args.rollout_batch_size} is not a multiple of the {world} processes")
    elif rollouts_per_process % args.generation_batch_size:
        problems.append(f"generation_batch_size={args.generation_batch_size} does not divide the "
                        f"{rollouts_per_process} rollouts per process")
    if args.mini_batch_size % (world * args.per_device_train_batch_size):
        problems.append(f"mini_batch_size={args.mini_batch_size} is not a multiple of {world} processes x "
                        f"per_device_train_batch_size={args.per_device_train_batch_size}")
    if problems:
        raise ValueError("ppo.training: " + "; ".join(problems) + " (every process must get an equal, whole share)")
