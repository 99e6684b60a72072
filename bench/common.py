"""Shared by the benchmarks: explicit thread counts and side-by-side alternating timing.

Absolute times on a shared machine mean nothing; a ratio of two sides measured in the same
run, in alternating order (A B, B A, A B, ...), cancels most of the drift from other jobs.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)


def set_threads(n: int = 1) -> None:
    """Pin this process's math libraries to ``n`` threads (and children, through the env)."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[name] = str(n)
    import torch

    torch.set_num_threads(n)


def alternate(sides: dict[str, Callable[[], float | None]], reps: int) -> dict[str, list[float]]:
    """Run every side ``reps`` times, the order flipped each repetition. A side returns its own
    measurement (seconds of the part that matters) or None to be timed whole here."""
    names = list(sides)
    out = {name: [] for name in names}
    for rep in range(reps):
        for name in names if rep % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            value = sides[name]()
            out[name].append(time.perf_counter() - start if value is None else value)
    return out


def median(values: list[float]) -> float:
    return statistics.median(values)


def result(ratio: float, goal: str, **extra) -> dict:
    """One entry of bench/results.json."""
    return {"ratio": round(float(ratio), 3), "goal": goal, **extra}


def _spin(seconds: float, out) -> None:
    start, cpu = time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        pass
    out.put((time.process_time() - cpu) / (time.perf_counter() - start))


def free_cores(processes: int = 2, seconds: float = 2.0) -> float:
    """How many cores this run actually gets now: ``processes`` busy loops side by side, the sum
    of the CPU share each one got (2.0 on an idle 2-core machine; other jobs take their share).
    A ratio that needs parallel processes cannot exceed it."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    workers = [ctx.Process(target=_spin, args=(seconds, out)) for _ in range(processes)]
    for w in workers:
        w.start()
    shares = [out.get() for _ in workers]
    for w in workers:
        w.join()
    return round(sum(shares), 2)
