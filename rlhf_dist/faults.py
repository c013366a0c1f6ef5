"""Fault injection: make a real run die, stop or hang at an exact moment, so the tests can check what survives it.

The stages call ``faults.point(NAME, step)`` at the moments that matter for crash safety; with the environment
variable unset (every real run) it returns at once. The test suite sets, for one process::

    RLHF_DIST_FAULT="step@5:kill"            SIGKILL this process's whole group inside step 5
    RLHF_DIST_FAULT="checkpoint@4:kill"      ... once checkpoint-4 is written but before it is sealed
    RLHF_DIST_FAULT="trained:kill"           ... after the last step, before the stage is complete
    RLHF_DIST_FAULT="step@3:stop@rank1"      SIGSTOP rank 1 only (its peers then wait in a collective)
    RLHF_DIST_FAULT="step@2:term;step@6:kill"   several, separated by ';'

Points: ``step`` (inside training step N: gradients computed, optimizer not yet stepped; in PPO between the
rollout and the update), ``checkpoint`` (checkpoint N fully written, seal not yet written), ``trained`` (the
training loop is over; the stage's evaluation and saving have not run). Actions: ``kill`` (SIGKILL to the
process group, like ``kill -9 -PGID``: the test starts the run in a session of its own), ``term`` / ``int``
(the signal to this process), ``stop`` (SIGSTOP to this process), ``hang`` (sleep forever).
See docs/reliability.md.
"""

from __future__ import annotations

import os
import signal
import time

ENV = "RLHF_DIST_FAULT"
ACTIONS = ("kill", "term", "int", "stop", "hang")
POINTS = ("step", "checkpoint", "trained")


def parse(text: str) -> list[tuple[str, int | None, str, int | None]]:
    """'step@5:kill@rank1;trained:kill' -> [(point, step or None, action, rank or None), ...]."""
    faults = []
    for item in filter(None, (part.strip() for part in text.split(";"))):
        where, _, what = item.partition(":")
        name, _, step = where.partition("@")
        action, _, rank = what.partition("@")
        if name not in POINTS or action not in ACTIONS or (step and not step.isdigit()) or \
                (rank and not (rank.startswith("rank") and rank[4:].isdigit())):
            raise ValueError(f"{ENV}: cannot read '{item}'; write POINT[@STEP]:ACTION[@rankR] with POINT one of "
                             f"{', '.join(POINTS)} and ACTION one of {', '.join(ACTIONS)}")
        faults.append((name, int(step) if step else None, action, int(rank[4:]) if rank else None))
    return faults


def point(name: str, step: int | None = None) -> None:
    """A place where a test may inject a fault (see the module docstring); a no-op in real runs."""
    text = os.environ.get(ENV)
    if not text:
        return
    rank = int(os.environ.get("RANK", "0"))
    for where, at, action, only in parse(text):
        if where == name and (at is None or at == step) and (only is None or only == rank):
            _act(action)


def _act(action: str) -> None:
    import sys

    print(f"rlhf-dist fault injection: {action} (pid {os.getpid()}, time {time.time():.3f})", file=sys.stderr, flush=True)
    if action == "kill":
        os.killpg(os.getpgrp(), signal.SIGKILL)
    elif action in ("term", "int"):
        os.kill(os.getpid(), signal.SIGTERM if action == "term" else signal.SIGINT)
    elif action == "stop":
        os.kill(os.getpid(), signal.SIGSTOP)
    else:
        while True:
            time.sleep(3600)
