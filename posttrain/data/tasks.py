"""Checkable synthetic tasks for the embedded defaults: each makes (prompt, answer) pairs
from a seed and checks a model's response. Small enough for a tiny model to learn on a CPU
in a minute, hard enough that a random model scores zero."""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Callable

LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _arithmetic(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} + {b}?", str(a + b)


def _check_integer(response: str, answer: str) -> bool:
    match = re.search(r"-?\d+", response)
    return match is not None and match.group() == answer.strip()


def _strings(rng: random.Random) -> tuple[str, str]:
    word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(3, 6)))
    if rng.random() < 0.5:
        return f"Reverse: {word}", word[::-1]
    return f"Uppercase: {word}", word.upper()


def check_exact(response: str, answer: str) -> bool:
    """Exact match after trimming whitespace and a trailing full stop."""
    return response.strip().rstrip(".").strip() == answer.strip()


@dataclass(frozen=True)
class Task:
    """A checkable domain: ``make(rng) -> (prompt, answer)`` and ``check(response, answer)``."""

    name: str
    make: Callable[[random.Random], tuple[str, str]]
    check: Callable[[str, str], bool]
    description: str
    teacher_steps: int = 900  # SFT steps (batch 64) that make a tiny Thinker good at it


TASKS: dict[str, Task] = {
    "arithmetic": Task("arithmetic", _arithmetic, _check_integer, "two-number addition, 0-99 + 0-99", 900),
    "strings": Task("strings", _strings, check_exact, "reverse or upper-case a 3-6 letter word", 400),
}


def make_rows(domain: str, n: int, seed: int, exclude: set[str] | None = None) -> list[dict]:
    """``n`` distinct rows ``{prompt, answer, domain}`` of a built-in task."""
    task = TASKS[domain]
    rng = random.Random(f"{domain}-{seed}")
    seen = set(exclude or ())
    rows = []
    for _ in range(n * 50):
        if len(rows) == n:
            break
        prompt, answer = task.make(rng)
        if prompt in seen:
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "answer": answer, "domain": domain})
    return rows


def checker_for(domain: str) -> Callable[[str, str], bool]:
    """How to check a response in ``domain``: the task's own checker, or exact match of the
    row's ``answer`` for user domains."""
    return TASKS[domain].check if domain in TASKS else check_exact
