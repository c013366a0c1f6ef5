"""Stop requests: USR1, TERM or INT make a stage save a checkpoint at the step it is in, stop, and resume later.

Slurm sends USR1 before a time limit or a preemption (``#SBATCH --signal=B:USR1@N``) and TERM when it ends a job
(``scancel``, the time limit, then SIGKILL after its KillWait, 30 s by default); Kubernetes sends TERM on eviction;
Ctrl-C is INT. In a training process each of them only sets a flag: after the current optimizer step all
processes agree on it in one collective, save a checkpoint at that step and stop, with exit status ``PREEMPTED``
(75; given by the launcher when there is one: its processes exit 0, so torch's launcher does not report them as
failed). Re-running the same command (or with ``--resume``) continues from there.

TERM and INT start a grace period (``--grace-period``, default GRACE_SECONDS, inside Slurm's default KillWait):
if the step and its checkpoint are not done by then, the process exits without saving (status 128 + signal; the
last complete checkpoint stays). A second TERM or INT exits at once, unless it comes within DUPLICATE_SECONDS
of the first: one request fanned out by several senders (Slurm signals every process of a job step, and the
launcher passes the signal on as well) is one request. USR1 starts no grace period: it is a warning ahead of
the TERM that ends the job.

The launcher (`rlhf-dist launch`, `pipeline`) starts its processes with the three signals ignored, so that
accelerate's launcher and torch's elastic agent (which would die of USR1, or turn a TERM into their own kill
after 30 s) leave them alone, and passes each signal it gets on to every process below it that handles it, once
(a training process handles them from `install` on; one still starting up gets it when it does).
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

PREEMPTED = 75  # EX_TEMPFAIL: the stage stopped early on request, its checkpoint is saved; re-run with --resume
LAUNCHER_ENV = "RLHF_DIST_FORWARDS_USR1"  # set for the processes under run_forwarding, which reports PREEMPTED itself
SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)
TERMINAL = (signal.SIGTERM, signal.SIGINT)  # they end the job: a grace period, and a second one exits at once
GRACE_SECONDS = 25.0  # Slurm's default KillWait is 30 s between TERM and KILL
DUPLICATE_SECONDS = 2.0

_pid: int | None = None  # the process that installed the handlers (not a forked DataLoader worker)
_requested: int | None = None  # the first stop signal
_terminal_at: float | None = None
_grace = GRACE_SECONDS
_timer: threading.Timer | None = None


class Preempted(Exception):
    """Raised by a training loop after it saved its checkpoint on a stop request."""

    def __init__(self, step: int, checkpoint: str | Path):
        why = f" on {signal_name(_requested)}" if _requested else ""
        super().__init__(f"preempted at step {step}{why}; checkpoint saved in {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


def signal_name(signum: int | None) -> str:
    return signal.Signals(signum).name if signum else "?"


def _exit_now(signum: int, reason: str) -> None:
    from rlhf_dist import failures

    print(f"rlhf-dist: {reason}", file=sys.stderr, flush=True)
    failures.note(128 + signum, reason)
    os._exit(128 + signum)


def _on_signal(signum, frame) -> None:
    global _requested, _terminal_at
    if os.getpid() != _pid:  # a forked child (a DataLoader worker) inherited the handler: not its business
        return
    now = time.monotonic()
    first = _requested is None
    if first:
        _requested = signum
        then = "" if signum not in TERMINAL else (f"; exiting without one if that takes over {_grace:g} s "
                                                  f"(--grace-period), or at once on a second TERM or INT")
        print(f"rlhf-dist: got {signal_name(signum)}: finishing the step in progress, then a checkpoint and stop{then}",
              file=sys.stderr, flush=True)
    if signum not in TERMINAL:
        return
    if _terminal_at is None:
        _terminal_at = now
        if not first:  # after a USR1: the stop goes on, now against the clock
            print(f"rlhf-dist: got {signal_name(signum)} while stopping: exiting without a checkpoint if that takes "
                  f"over {_grace:g} s (--grace-period)", file=sys.stderr, flush=True)
        _start_grace(signum)
    elif now - _terminal_at > DUPLICATE_SECONDS:
        _exit_now(signum, f"a second {signal_name(signum)}: exiting at once, without a checkpoint (the last complete "
                          "one stays)")


def _start_grace(signum: int) -> None:
    global _timer

    def over():
        _exit_now(signum, f"stopping on {signal_name(signum)}, but the step in progress and its checkpoint did not "
                          f"finish within the grace period of {_grace:g} s (--grace-period); exited without saving "
                          "(the last complete checkpoint stays)")

    _timer = threading.Timer(_grace, over)
    _timer.daemon = True
    _timer.start()


def exit_status() -> int:
    """What a preempted stage process exits with: 0 under run_forwarding (which then says PREEMPTED), else PREEMPTED."""
    return 0 if os.environ.get(LAUNCHER_ENV) == "1" else PREEMPTED


def install(grace_seconds: float = GRACE_SECONDS) -> None:
    """In a training process: remember USR1, TERM and INT instead of dying of them."""
    global _pid, _requested, _terminal_at, _grace, _timer
    _pid, _requested, _terminal_at, _grace, _timer = os.getpid(), None, None, grace_seconds, None
    for sig in SIGNALS:
        signal.signal(sig, _on_signal)
    atexit.register(_ignore_at_exit)


def _ignore_at_exit() -> None:
    """Once the stage is over: a late stop signal changes nothing. Python resets handlers it set to the default
    action while it shuts down (not ignored ones), and a USR1 arriving then would kill the finished process
    (seen on Slurm: the signal before a time limit came as the stage completed, and the job looked failed)."""
    if os.getpid() == _pid:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def checkpoint_saved() -> None:
    """The stop's checkpoint is complete: the grace period no longer matters."""
    if _timer is not None:
        _timer.cancel()


def requested_here() -> bool:
    return _requested is not None


def requested() -> bool:
    """Whether any training process got a stop signal; every process must call this at the same point."""
    from accelerate import PartialState

    state = PartialState()
    if state.num_processes == 1:
        return _requested is not None
    import torch
    import torch.distributed as dist

    flag = torch.tensor([1.0 if _requested is not None else 0.0], device=state.device)
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


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (Linux /proc: the SigCgt mask)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


def run_forwarding(cmd: list[str], poll: float = 0.25) -> tuple[int, str | None]:
    """Run `cmd`, passing USR1, TERM and INT on to the processes under it that handle them, once each.

    Returns (exit code, the name of the first stop signal that came, or None).
    """
    got: list[int] = []  # the signals that came, in order
    sent: list[set[int]] = []  # for each of them, the processes it was passed to

    def pass_on():
        below = descendants(proc.pid)
        for signum, done in zip(got, sent):
            for pid in below:
                if pid not in done and catches(pid, signum):  # a process still starting up gets it once it can act
                    try:
                        os.kill(pid, signum)
                    except ProcessLookupError:
                        pass
                    done.add(pid)

    def forward(signum, frame):
        got.append(signum)
        sent.append(set())
        print(f"rlhf-dist: got {signal_name(signum)}; asking the training processes to checkpoint and stop",
              file=sys.stderr, flush=True)
        pass_on()

    def ignore_stop_signals():  # in the child, before exec: an ignored signal stays ignored across exec
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in SIGNALS}
    try:
        proc = subprocess.Popen(cmd, preexec_fn=ignore_stop_signals, env={**os.environ, LAUNCHER_ENV: "1"})
        for sig in SIGNALS:
            signal.signal(sig, forward)
        while True:
            try:
                code = proc.wait(timeout=poll)
                break
            except subprocess.TimeoutExpired:
                if got:
                    pass_on()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, signal_name(got[0]) if got else None
