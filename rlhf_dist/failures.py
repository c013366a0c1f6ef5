"""A failed run explains itself: every process's stderr and how it ended are kept in the run directory, and the
launcher ends with one line that says which process failed, where, how, and which file to read.

    RUN/logs/STAGE/rank<R>.log         that process's stderr, every attempt appended (each opens with a header line)
    RUN/logs/STAGE/rank<R>.exit.json   how its latest attempt ended: exit status, reason, host, node, pid, time, and
                                       the files that explain it (the stack file of a stall, the checkpoint of a stop)

The training side (`start`, `note`) runs in every stage process once its run directory is claimed; the launcher
side (`explain`) runs in `rlhf-dist launch` and `rlhf-dist pipeline` and imports nothing heavy. How a process
that could write nothing (SIGKILL, the kernel's OOM killer) ended comes from its parent: torch's elastic agent
under `rlhf-dist launch` (see `rlhf_dist.agent`), the stage process itself under `pipeline`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

LOGS = "logs"
# Copy fd 2 into the run directory: on when rlhf-dist runs as a program (cli.main without argv), off when a test
# calls a stage in-process (fd 2 is then pytest's, and several stages share one process).
keep_stderr_default = False
_state: dict = {}  # this process: {"folder", "rank", "stage", "host", "node"} once `start` ran


def log_dir(output: str | Path, stage: str) -> Path:
    return Path(output) / LOGS / stage


def node_rank() -> int:
    """This machine's rank in the job: torchrun's GROUP_RANK, Slurm's SLURM_NODEID, else 0."""
    for key in ("GROUP_RANK", "SLURM_NODEID"):
        if os.environ.get(key, "").isdigit():
            return int(os.environ[key])
    return 0


def start(output: str | Path, stage: str, rank: int, keep_stderr: bool = True) -> Path:
    """In a stage process, once the run directory is claimed: keep stderr in RUN/logs/STAGE/rank<R>.log (it still
    reaches the console, byte for byte, progress bars included) and note that this attempt is running."""
    folder = log_dir(output, stage)
    folder.mkdir(parents=True, exist_ok=True)
    _state.update(folder=folder, rank=rank, stage=stage, host=socket.gethostname(), node=node_rank())
    path = folder / f"rank{rank}.log"
    with path.open("a") as fh:
        fh.write(f"==== rlhf-dist {stage}: rank {rank} on {_state['host']} (node {_state['node']}, pid {os.getpid()}), "
                 f"started {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n")
    if keep_stderr:
        _tee_stderr(path)
    note(None, "running")
    return path


def _tee_stderr(path: Path) -> None:
    """fd 2 -> a `tee -a` of its own session -> the file and the console.

    tee (not a thread) writes every byte as it comes, so the file is complete even when this process is killed.
    It must outlive this process's own last words: in its own session a signal to this process group (Ctrl-C,
    `kill -- -PGID`) does not reach it, and it ignores the stop signals, which Slurm sends to every process of a job
    step (a dead tee would turn the stage's next line of output into a BrokenPipeError). It exits when every writer
    (this process and its children) has closed the pipe.
    """
    import shutil

    tee = shutil.which("tee")
    if tee is None:  # not a GNU/BSD system: the console only
        return

    def ignore_signals():  # an ignored signal stays ignored across exec
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)

    sys.stderr.flush()
    proc = subprocess.Popen([tee, "-a", str(path)], stdin=subprocess.PIPE, stdout=sys.__stderr__.fileno(),
                            start_new_session=True, preexec_fn=ignore_signals)
    os.dup2(proc.stdin.fileno(), 2)
    proc.stdin.close()


def note(status: int | None, reason: str, **files: str | Path) -> None:
    """Record how this process ends (status None: still running). A no-op before `start`."""
    if not _state:
        return
    from rlhf_dist.atomic import write_json

    record = {"stage": _state["stage"], "rank": _state["rank"], "node": _state["node"], "host": _state["host"],
              "pid": os.getpid(), "status": status, "reason": reason, "time": time.time(),
              "stderr": str(_state["folder"] / f"rank{_state['rank']}.log"), **{k: str(v) for k, v in files.items()}}
    try:
        write_json(_state["folder"] / f"rank{_state['rank']}.exit.json", record)
    except OSError:  # the run directory went away (a full disk, a lost mount): the console still has it
        pass


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


# -- the launcher's side -------------------------------------------------------------------------------------

def read_notes(output: str | Path, stage: str, since: float) -> dict[int, dict]:
    """rank -> exit note written by this attempt (at or after `since`)."""
    notes = {}
    for path in log_dir(output, stage).glob("rank*.exit.json"):
        try:
            note_ = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if note_.get("time", 0) >= since:
            notes[int(note_["rank"])] = note_
    return notes


def how(exitcode: int) -> str:
    """'exit 1', 'killed by SIGKILL' (a negative code, as subprocess and torch's agent report a signal)."""
    if exitcode < 0:
        try:
            return f"killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            return f"killed by signal {-exitcode}"
    return f"exit {exitcode}"


def explain(output: str | Path, stage: str, code: int, since: float, processes: list[dict] | None = None,
            stopped: list[int] = ()) -> str:
    """One line on why `stage` failed: the first process that failed, where, how, and the file to read.

    ``processes``: the failed processes as the launcher saw them ({"rank", "exitcode", "host", "pid", "time"}; torch's
    elastic agent under `rlhf-dist launch`); without them, the stage process's own exit code. ``stopped``: pids the
    agent found stopped (SIGSTOP) when it ended the job. The processes' notes (written by each rank) add the reason:
    a stall with its stack file, a guardrail, an exception.
    """
    notes = read_notes(output, stage, since)
    halted = set(stopped)

    def when(p):  # the agent's times are whole seconds; a process's own note is more precise
        n = notes.get(p["rank"], {})
        return n["time"] if n.get("status") is not None else p.get("time", 0)

    # The first failure: not a process the agent killed because it was stopped (said below); a process killed by a
    # signal before any that exited (the peers of a killed process fail in their collectives within milliseconds,
    # and the agent may only see the killed one up to its poll interval later: times cannot order them); then time.
    failed = sorted(processes or [], key=lambda p: (p["pid"] in halted, p["exitcode"] >= 0, when(p), p["rank"]))
    if not failed:  # no agent (one process under `pipeline`): the stage process's own exit code
        ended = {r: n for r, n in notes.items() if n.get("status") not in (None, 0)}
        failed = [{"rank": min(ended, key=lambda r: ended[r]["time"]) if ended else 0, "exitcode": code}]
    first = failed[0]
    rank, status = first["rank"], first["exitcode"]
    n = notes.get(rank, {})
    parts = [f"{stage} failed: rank {rank} on node {n.get('node', '?')} ({n.get('host', first.get('host', '?'))}, pid "
             f"{n.get('pid', first.get('pid', '?'))}): {how(status)}"]
    if n.get("status") not in (None, 0):
        parts.append(n["reason"])
    elif n:  # it noted that it was running, and never how it ended
        parts.append("it wrote no reason" + (" (killed from outside, or by the kernel's OOM killer: see `dmesg`)"
                                             if status < 0 else ""))
    if n.get("stack"):
        parts.append(f"every thread's stack: {n['stack']}")
    stderr = n.get("stderr") or str(log_dir(output, stage) / f"rank{rank}.log")
    parts.append(f"its stderr: {stderr}" if Path(stderr).is_file() else "no stderr file (it failed before the run "
                 "directory was claimed; see the console)")
    stalled = sorted(r for r, n_ in notes.items() if n_.get("pid") in halted)
    if stalled:
        parts.append(f"rank(s) {', '.join(map(str, stalled))} had been stopped (SIGSTOP, state T: doing nothing, "
                     "holding up every collective) and were killed")
    others = len({p["rank"] for p in failed} - {rank} - set(stalled))
    if others > 0:
        parts.append(f"{others} more process(es) failed after it")
    return "; ".join(parts)
