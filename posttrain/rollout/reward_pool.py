"""Reward workers: N Ray actors that each build the recipe's `RewardSet` once (an ASR or speaker
model loads once per worker) and score chunks of samples asynchronously.

    from posttrain.rollout.reward_pool import RewardPool

    pool = RewardPool(cfg.rewards, num_workers=2)         # starts / joins Ray like RolloutPool
    pending = pool.submit(prompts, completions, columns)  # returns at once: generate meanwhile
    combined, per_reward = pool.collect(pending)          # what RewardSet.score returns
    pool.close()

A worker that dies mid-chunk is restarted (Ray ``max_restarts``) and only its unfinished chunks
are sent again; a chunk's scores are kept once, from the call that finished, so every sample is
scored exactly once. A reward plugin's own error (`RewardError`) comes back as itself.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

from posttrain.registry import RewardSet
from posttrain.rollout.pool import RolloutTimeoutError, ray_get, start_ray, wait_restarted


class RewardWorker:
    """The body of one reward actor: the reward plugins, resolved and loaded once."""

    def __init__(self, specs: list):
        self.rewards = RewardSet(specs)

    def pid(self) -> int:
        import os

        return os.getpid()

    def score(self, prompts: list, completions: list, columns: dict) -> dict[str, list]:
        return self.rewards.score(prompts, completions, **columns)[1]


def combine(specs: Sequence, per_reward: dict[str, list]) -> list[float | None]:
    """Weighted combination as `RewardSet.score` makes it (None skipped, weights renormalised)."""
    n = len(next(iter(per_reward.values()))) if per_reward else 0
    combined = []
    for i in range(n):
        total = weight = 0.0
        for spec in specs:
            v = per_reward[RewardSet.label(spec)][i]
            if v is not None:
                total += spec.weight * v
                weight += abs(spec.weight)
        combined.append(total / weight if weight > 0 else None)
    return combined


@dataclass
class PendingScores:
    n: int
    outstanding: dict  # ObjectRef -> (worker index, start, stop, chunk payload)
    started: float


class RewardPool:
    """Reward plugins scored by ``num_workers`` Ray actors (see the module docstring)."""

    def __init__(self, specs: Sequence, num_workers: int = 2, address: str = "local", num_cpus: float = 1.0,
                 max_restarts: int = 3, timeout_s: float = 600.0, chunk_size: int | None = None):
        import ray

        self.specs = list(specs)
        RewardSet(self.specs)  # resolve every plugin here first: a bad name fails before any actor starts
        self.labels = [RewardSet.label(s) for s in self.specs]
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.chunk_size = chunk_size
        self._owns_ray = start_ray(address, max(2, int(num_workers * num_cpus + 0.999)))
        remote = ray.remote(RewardWorker).options(num_cpus=num_cpus, max_restarts=max_restarts, max_task_retries=0)
        self.workers = [remote.remote(self.specs) for _ in range(num_workers)]
        self.pids = ray.get([w.pid.remote() for w in self.workers], timeout=self.timeout_s)
        self.restarts = 0  # worker deaths recovered from
        self.resent_samples = 0
        self.score_seconds = 0.0

    def submit(self, prompts: Sequence, completions: Sequence, columns: dict[str, Sequence] | None = None) -> PendingScores:
        columns = columns or {}
        n = len(completions)
        size = self.chunk_size or max(1, -(-n // self.num_workers))
        pending = PendingScores(n, {}, time.monotonic())
        for k, start in enumerate(range(0, n, size)):
            stop = min(n, start + size)
            chunk = (list(prompts[start:stop]), list(completions[start:stop]), {c: list(v[start:stop]) for c, v in columns.items()})
            self._send(pending, k % self.num_workers, start, stop, chunk)
        return pending

    def _send(self, pending: PendingScores, i: int, start: int, stop: int, chunk) -> None:
        ref = self.workers[i].score.remote(*chunk)
        pending.outstanding[ref] = (i, start, stop, chunk)

    def collect(self, pending: PendingScores) -> tuple[list[float | None], dict[str, list[float | None]]]:
        import ray

        per_reward = {label: [None] * pending.n for label in self.labels}
        while pending.outstanding:
            wait = max(0.0, pending.started + self.timeout_s - time.monotonic())
            ready, _ = ray.wait(list(pending.outstanding), num_returns=1, timeout=wait)
            if not ready:
                late = sorted({i for i, *_ in pending.outstanding.values()})
                pending.outstanding.clear()
                raise RolloutTimeoutError(", ".join(f"reward worker {i + 1} of {self.num_workers}" for i in late)
                                          + f" did not answer within {self.timeout_s:g} s")
            for ref in ready:
                i, start, stop, chunk = pending.outstanding.pop(ref)
                try:
                    scores = ray_get(ref)
                except ray.exceptions.RayActorError:
                    # died mid-chunk: wait for the restart, then this chunk (and only it) goes again
                    try:
                        pid = wait_restarted(self.workers[i].pid.remote, self.timeout_s)
                    except ray.exceptions.RayActorError as e:
                        raise RuntimeError(f"reward worker {i + 1} of {self.num_workers} died and could not be restarted: {e}") from None
                    if pid != self.pids[i]:  # one death, however many of its chunks failed
                        self.pids[i] = pid
                        self.restarts += 1
                    self.resent_samples += stop - start
                    self._send(pending, i, start, stop, chunk)
                    continue
                for label in self.labels:
                    per_reward[label][start:stop] = scores[label]
        self.score_seconds += time.monotonic() - pending.started
        return combine(self.specs, per_reward), per_reward

    def score(self, prompts: Sequence, completions: Sequence, **columns: Sequence):
        """`RewardSet.score`, on the workers."""
        return self.collect(self.submit(prompts, completions, columns))

    def close(self) -> None:
        import ray

        if not ray.is_initialized():
            return
        for worker in self.workers:
            ray.kill(worker, no_restart=True)
        self.workers = []
        if self._owns_ray:
            ray.shutdown()
