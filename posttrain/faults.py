"""Fault injection for the crash/resume tests: ``fault_point(name)`` marks a place where a real
run can die (``step``: after an optimiser step; ``checkpoint``: inside a checkpoint save;
``weight_sync``: while a rollout engine takes new weights).

``POSTTRAIN_KILL_AT=NAME:N`` makes the process SIGKILL itself at the N-th time it passes
``fault_point(NAME)`` (N counts from 1; ``NAME:N,NAME2:M`` arms several, the first reached
wins). SIGKILL, not an exception: nothing is flushed, no ``finally`` runs, exactly as when the
kernel's OOM killer or a pre-empted node ends a run. Without the variable a fault point is one
global lookup and a return.
"""

from __future__ import annotations

import os
import signal
import sys

ENV = "POSTTRAIN_KILL_AT"
POINTS = ("step", "checkpoint", "weight_sync")


def _parse(spec: str | None) -> dict[str, int] | None:
    if not spec:
        return None
    plan = {}
    for part in spec.split(","):
        name, _, n = part.strip().partition(":")
        if name not in POINTS or not n.isdigit() or int(n) < 1:
            raise ValueError(f"{ENV}={spec!r}: expected NAME:N with NAME one of {', '.join(POINTS)} and N >= 1")
        plan[name] = int(n)
    return plan


_PLAN = _parse(os.environ.get(ENV))
_HITS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Die here (SIGKILL) if ``POSTTRAIN_KILL_AT`` says so; otherwise do nothing."""
    if _PLAN is None or name not in _PLAN:
        return
    _HITS[name] = _HITS.get(name, 0) + 1
    if _HITS[name] == _PLAN[name]:
        # One line on stderr so a test can tell which point fired; then die without cleanup.
        os.write(sys.stderr.fileno(), f"posttrain fault: SIGKILL at {name} #{_HITS[name]}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)


def hits(name: str) -> int:
    """How often this process passed ``fault_point(name)`` (counted only while armed)."""
    return _HITS.get(name, 0)
