"""Hang watchdog: every process knows its phase and step, and a phase that overruns its limit ends the job with
every thread's stack in the run directory.

A stalled process (a blocked filesystem, a reward function that never returns, a peer that stopped, a deadlocked
collective) looks like nothing from outside: the other processes wait in a collective at 0 % CPU, for as long as
the process group's timeout (torch's default: 30 minutes for gloo, then one traceback without a phase). Here the
training loops say where they are::

    with watchdog.phase("rollout", step):      # PPO: rollout, score, gather, update, save, evaluate
        ...
    watchdog.set_phase("train_step", step)      # the HF-Trainer stages: one optimizer step, from batch to update

and a thread of each process checks the clock. When a phase runs past its limit (the recipe's ``watchdog``
section, `rlhf_dist.config.sections.WatchdogSection`) it writes ``RUN/logs/STAGE/stall-rank<R>-<phase>-step<N>.txt`` (rank,
host, pid, phase, step, how long, the limit, then every thread's Python stack, the main thread first), logs one
line, notes it for the launcher (`rlhf_dist.failures`), and exits with status STALLED, so the launcher stops
every other process of the job. A phase without a limit (None) is not watched.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

log = logging.getLogger("rlhf_dist")

STALLED = 124  # like timeout(1): a phase ran past its limit
_active: "Watchdog | None" = None


class Watchdog:
    """One per process. ``limits``: phase -> seconds (None = not watched)."""

    def __init__(self, limits: dict[str, float | None], folder: Path, rank: int, stage: str, poll: float = 1.0):
        self.limits, self.folder, self.rank, self.stage, self.poll = dict(limits), Path(folder), rank, stage, poll
        self._stack: list[list] = []  # [phase, step, started (monotonic)], innermost last
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rlhf-dist-watchdog", daemon=True)

    def start(self) -> "Watchdog":
        global _active
        _active = self
        self._thread.start()
        return self

    def stop(self) -> None:
        global _active
        self._stop.set()
        if _active is self:
            _active = None

    def push(self, phase: str, step: int | None) -> None:
        with self._lock:
            self._stack.append([phase, step, time.monotonic()])

    def pop(self) -> None:
        """Leave the innermost phase; the one around it is watched again, its clock restarted (the time spent
        inside, e.g. a checkpoint between two training steps, is not charged to it)."""
        with self._lock:
            if self._stack:
                self._stack.pop()
            if self._stack:
                self._stack[-1][2] = time.monotonic()

    def replace(self, phase: str, step: int | None) -> None:
        """The innermost phase becomes (phase, step), its clock restarted (a loop's next iteration)."""
        with self._lock:
            if self._stack:
                self._stack.pop()
            self._stack.append([phase, step, time.monotonic()])

    def _watch(self) -> None:
        while not self._stop.wait(self.poll):
            with self._lock:  # the innermost phase is the one running
                current = tuple(self._stack[-1]) if self._stack else None
            if current is not None and self.limits.get(current[0]) is not None \
                    and time.monotonic() - current[2] > self.limits[current[0]]:
                self._fire(*current)
                return

    def _fire(self, phase: str, step: int | None, started: float) -> None:
        from rlhf_dist import failures

        took, limit = time.monotonic() - started, self.limits[phase]
        at = f" at step {step}" if step is not None else ""
        name = f"stall-rank{self.rank}-{phase}" + (f"-step{step}" if step is not None else "") + ".txt"
        path = self.folder / name
        header = (f"rlhf-dist watchdog: {self.stage} rank {self.rank} on {socket.gethostname()} (pid {os.getpid()}): "
                  f"phase '{phase}'{at} has run {took:.0f} s, over its limit of {limit:g} s (watchdog.{phase})\n"
                  f"time: {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            path.write_text(header + "\n" + all_stacks())
        except OSError as exc:  # the run directory is what hangs: the stacks still go to stderr
            print(f"{header}(could not write {path}: {exc})\n{all_stacks()}", file=sys.stderr, flush=True)
        reason = f"watchdog: phase '{phase}'{at} ran {took:.0f} s, over its limit of {limit:g} s (watchdog.{phase})"
        log.error("%s; every thread's stack: %s; ending this process (exit %d) so the job ends", reason, path, STALLED)
        failures.note(STALLED, reason, stack=path)
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(STALLED)


def all_stacks() -> str:
    """Every thread's Python stack, the main thread first, innermost frame last (as a traceback)."""
    frames = sys._current_frames()
    threads = {t.ident: t for t in threading.enumerate()}
    main = threading.main_thread().ident
    order = sorted(frames, key=lambda ident: (ident != main, threads[ident].name if ident in threads else ""))
    parts = []
    for ident in order:
        thread = threads.get(ident)
        label = thread.name if thread else f"thread {ident}"
        if ident == threading.get_ident():
            continue  # the watchdog itself
        parts.append(f"--- {label}{' (main thread)' if ident == main else ''} ---\n"
                     + "".join(traceback.format_stack(frames[ident])))
    return "\n".join(parts)


@contextlib.contextmanager
def phase(name: str, step: int | None = None):
    """Watch the block as phase `name` (a no-op when no watchdog runs in this process)."""
    dog = _active
    if dog is None:
        yield
        return
    dog.push(name, step)
    try:
        yield
    finally:
        dog.pop()


def set_phase(name: str, step: int | None = None) -> None:
    """Replace the innermost phase (its clock restarts): a loop moving on to its next step."""
    if _active is not None:
        _active.replace(name, step)
