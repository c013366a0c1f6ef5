"""`python -m rlhf_dist.agent RECORD -- ACCELERATE_LAUNCH_ARGS...`: `accelerate launch`, recording how its processes failed.

`rlhf-dist launch` runs the stage through this module rather than `python -m accelerate.commands.launch` (which
`--dry-run` prints, and which works the same by hand). Two differences, both for `rlhf-dist launch`'s sake:

* When a training process fails, torch's elastic agent knows its global rank, exit code or signal, pid, host and
  time, but only prints them in a block of text. Here the failures are written to RECORD (JSON) for the
  launcher's one-line diagnosis (`rlhf_dist.failures.explain`).
* The elastic agent runs in a thread, so it installs no signal handlers: the launcher passes USR1, TERM and INT
  to the training processes itself (`rlhf_dist.preempt`), and the agent's own handler would send them a second
  TERM (read as "exit at once, no checkpoint") and SIGKILL them 30 s later. This process keeps the signals
  ignored, as the launcher started it.
* When one process failed, the agent ends the others with TERM and waits 30 s before SIGKILL. A process that is
  stopped (SIGSTOP, state T: it can act on no signal) gets SIGKILL at once instead, and is recorded as stopped:
  a stalled rank then ends the job within the watchdog's limit plus a second or two.
"""

from __future__ import annotations

import json
import logging
import socket
import sys
import threading
import time


def main(argv: list[str]) -> int:
    record, rest = argv[0], argv[2:] if argv[1:2] == ["--"] else argv[1:]
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    # "Failed to register signal handlers since torchelastic is running on a child thread": on purpose, see above.
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").setLevel(logging.ERROR)
    args = launch_command_parser().parse_args(rest)
    outcome: dict = {"code": 0}
    stopped = _kill_stopped_processes_at_once()

    def launch():
        try:
            launch_command(args)
        except ChildFailedError as exc:
            host = socket.getfqdn()
            outcome["code"] = 1
            outcome["failures"] = [{"rank": rank, "local_rank": f.local_rank, "exitcode": f.exitcode, "pid": f.pid,
                                    "time": f.timestamp, "host": host, "message": str(f.message)[:2000]}
                                   for rank, f in exc.failures.items()]
            print(exc, file=sys.stderr, flush=True)  # torch's own account, as accelerate launch prints it
        except SystemExit as exc:
            outcome["code"] = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - reported, and the exit status says it failed
            outcome["code"] = 1
            outcome["error"] = f"{type(exc).__name__}: {exc}"
            print(f"rlhf-dist agent: {outcome['error']}", file=sys.stderr, flush=True)

    thread = threading.Thread(target=launch, name="elastic-agent")
    started = time.time()
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
    with open(record, "w") as fh:
        json.dump({"started": started, "stopped": sorted(stopped), **outcome}, fh)
    return int(outcome["code"])


def _state(pid: int) -> str:
    """The process state letter from /proc (R, S, D, T = stopped, Z...), '' if it is gone."""
    try:
        stat = open(f"/proc/{pid}/stat").read()
        return stat[stat.rindex(")") + 2]
    except (OSError, ValueError, IndexError):
        return ""


def _kill_stopped_processes_at_once() -> set[int]:
    """Make torch's SubprocessHandler.close send SIGKILL to a stopped worker; returns the pids it found stopped."""
    import os
    import signal

    from torch.distributed.elastic.multiprocessing.subprocess_handler import subprocess_handler

    found: set[int] = set()
    original = subprocess_handler.SubprocessHandler.close

    def close(self, death_sig=None):
        if death_sig not in (None, signal.SIGKILL) and self.proc.poll() is None and _state(self.proc.pid) == "T":
            found.add(self.proc.pid)
            print(f"rlhf-dist agent: process {self.proc.pid} is stopped (state T) and can act on no signal: SIGKILL",
                  file=sys.stderr, flush=True)
            os.killpg(self.proc.pid, signal.SIGKILL)
        return original(self, death_sig)

    subprocess_handler.SubprocessHandler.close = close
    return found


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
