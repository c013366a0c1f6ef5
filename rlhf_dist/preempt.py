"""Preemption: save a checkpoint on SIGUSR1, stop, and let the job be restarted with ``--resume``.

Slurm sends USR1 before a time limit or a preemption (``#SBATCH --signal=B:USR1@N``); the batch
script forwards it to the job step, where it reaches ``rlhf-dist launch`` (or ``rlhf-dist
pipeline``). Neither accelerate's launcher nor torch's elastic agent handles USR1 (its default
action would kill them and orphan the training processes), so the launcher starts them with USR1
ignored and, on the signal, passes it on to every training process it started (they run in their
own sessions, so a process-group signal would miss them). A training process that gets it only
sets a flag; after the current optimizer step all processes agree on the flag in one collective,
save a checkpoint at that step, and stop: exit status ``PREEMPTED`` (75), given by the launcher
when there is one (its processes exit 0, so torch's launcher does not report them as failed).
Re-running with ``--resume`` continues from there.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

PREEMPTED = 75  # EX_TEMPFAIL: the stage stopped early on request, its checkpoint is saved; re-run with --resume
LAUNCHER_ENV = "RLHF_DIST_FORWARDS_USR1"  # set for the processes under run_forwarding, which reports PREEMPTED itself
SIGNAL = signal.SIGUSR1

REPEAT_SECONDS = 10  # the launcher passes the signal on again this often until its processes end

_requested = False


class Preempted(Exception):
    """Raised by a training loop after it saved its checkpoint on a preemption request."""

    def __init__(self, step: int, checkpoint: str | Path):
        super().__init__(f"preempted at step {step}; checkpoint saved in {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def _on_signal(signum, frame) -> None:
    global _requested
    _requested = True


def exit_status() -> int:
    """What a preempted stage process exits with: 0 under run_forwarding (which then says PREEMPTED), else PREEMPTED."""
    return 0 if os.environ.get(LAUNCHER_ENV) == "1" else PREEMPTED


def install() -> None:
    """In a training process: remember a USR1 instead of dying of it."""
    global _requested
    _requested = False
    signal.signal(SIGNAL, _on_signal)


def requested_here() -> bool:
    return _requested


def requested() -> bool:
    """Whether any training process got the signal; every process must call this at the same point."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes == 1:
        return _requested
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if _requested else 0.0], device=state.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item() > 0)


def trainer_callback():
    """A transformers TrainerCallback: at the end of the step in which the signal came, save and stop."""
    from transformers import TrainerCallback

    class PreemptionCallback(TrainerCallback):
        def __init__(self):
            self.stopped_at: int | None = None

        def on_step_end(self, args, state, control, **kwargs):
            if requested():
                self.stopped_at = state.global_step
                control.should_save = True
                control.should_training_stop = True
            return control

    return PreemptionCallback()


# -- the launcher's side -------------------------------------------------------------------------------

def descendants(pid: int) -> list[int]:
    """All live processes below `pid` (Linux /proc), children first."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])  # the name may contain spaces and parentheses
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def run_forwarding(cmd: list[str]) -> tuple[int, bool]:
    """Run `cmd`, passing USR1 on to every process under it; returns (exit code, whether USR1 came)."""
    got = False

    def pass_on():
        for pid in descendants(proc.pid):
            try:
                os.kill(pid, SIGNAL)  # launchers ignore it (inherited SIG_IGN); training processes act on it
            except ProcessLookupError:
                pass

    def forward(signum, frame):
        nonlocal got
        got = True
        print("rlhf-dist: got USR1; asking the training processes to checkpoint and stop", file=sys.stderr, flush=True)
        pass_on()

    def ignore_usr1():  # in the child, before exec: an ignored signal stays ignored across exec
        signal.signal(SIGNAL, signal.SIG_IGN)

    previous = signal.signal(SIGNAL, signal.SIG_IGN)
    try:
        proc = subprocess.Popen(cmd, preexec_fn=ignore_usr1, env={**os.environ, LAUNCHER_ENV: "1"})
        signal.signal(SIGNAL, forward)
        try:
            waited = 0.0
            while True:
                try:
                    code = proc.wait(timeout=1.0)
                    break
                except subprocess.TimeoutExpired:
                    waited = waited + 1.0 if got else 0.0
                    if waited >= REPEAT_SECONDS:  # again, for processes that were still starting up (they ignore it
                        pass_on()                 # until their handler is installed); a repeated request changes nothing
                        waited = 0.0
        except KeyboardInterrupt:
            proc.wait()
            raise
    finally:
        signal.signal(SIGNAL, previous)
    return code, got
