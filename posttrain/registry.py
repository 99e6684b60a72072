"""Reward plugin registry: find reward functions by entry-point name or ``module:function``,
call them safely, and combine them with weights.

A reward plugin is ``f(prompts, completions, **columns) -> list[float | None]`` (TRL's
reward-function shape). Anything wrong with a plugin becomes a `RewardError` that names
the plugin and, where it can be found, the sample index.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import math
import os
import signal
import sys
import threading
from contextlib import contextmanager
from importlib.metadata import entry_points
from typing import Any, Callable, Sequence

from posttrain.errors import RewardError

ENTRY_POINT_GROUP = "posttrain.rewards"

RewardFn = Callable[..., list]


def builtin_rewards() -> dict[str, str]:
    """Entry-point name -> ``module:function`` for every registered reward."""
    return {ep.name: ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)}


def _load_module_from_file(path: str):
    name = "posttrain_user_plugin_" + os.path.splitext(os.path.basename(path))[0]
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise RewardError(f"reward plugin file {path!r} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def resolve_reward(name: str) -> RewardFn:
    """The reward function called ``name``: an entry-point name, ``module:function``,
    or ``path/to/file.py:function``."""
    registered = builtin_rewards()
    target = registered.get(name)
    if target is None:
        if ":" not in name:
            raise RewardError(
                f"unknown reward {name!r}: not a registered reward "
                f"({', '.join(sorted(registered)) or 'none registered'}) and not 'module:function'"
            )
        target = name
    module_name, _, func_name = target.rpartition(":")
    try:
        if module_name.endswith(".py") or os.sep in module_name:
            if not os.path.exists(module_name):
                raise RewardError(f"reward plugin {name!r}: file {module_name!r} does not exist")
            module = _load_module_from_file(module_name)
        else:
            if os.getcwd() not in sys.path and "" not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(module_name)
    except RewardError:
        raise
    except Exception as e:  # a plugin's import can fail in any way
        raise RewardError(
            f"reward plugin {name!r}: importing {module_name!r} failed: {type(e).__name__}: {e}"
        ) from None
    fn = getattr(module, func_name, None)
    if fn is None or not callable(fn):
        raise RewardError(f"reward plugin {name!r}: {module_name!r} has no function {func_name!r}")
    return fn


def _check_value(plugin: str, index: int, value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            import numpy as np

            if isinstance(value, np.generic) and np.issubdtype(type(value), np.number):
                value = float(value)
            else:
                raise TypeError
        except TypeError:
            raise RewardError(
                f"reward {plugin!r} returned {type(value).__name__} {value!r} for sample {index}; "
                "a reward must be a number or None"
            ) from None
    value = float(value)
    if math.isnan(value) or math.isinf(value):
        raise RewardError(
            f"reward {plugin!r} returned {value} for sample {index}; return None for 'no opinion'"
        )
    return value


class _RewardTimeout(BaseException):
    """Raised inside a reward call that ran past its time limit (a BaseException so that a
    plugin's own ``except Exception`` cannot swallow it)."""


@contextmanager
def _time_limit(seconds: float | None):
    """Interrupt the block after ``seconds`` with `_RewardTimeout` (SIGALRM, so only in the
    main thread; elsewhere, and for None or 0, no limit)."""
    if not seconds or threading.current_thread() is not threading.main_thread() or not hasattr(signal, "setitimer"):
        yield
        return

    def expire(signum, frame):
        raise _RewardTimeout()

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, float(seconds))
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def call_reward(
    plugin: str,
    fn: RewardFn,
    prompts: Sequence,
    completions: Sequence,
    columns: dict[str, Sequence],
    timeout_s: float | None = None,
) -> list[float | None]:
    """Call one reward plugin and validate what it returns; a call longer than ``timeout_s``
    seconds is stopped with a `RewardError` naming the plugin."""
    n = len(completions)
    try:
        with _time_limit(timeout_s):
            values = fn(prompts=list(prompts), completions=list(completions), **columns)
    except _RewardTimeout:
        raise RewardError(
            f"reward {plugin!r} took longer than {timeout_s:g} s on {n} samples and was stopped; make it "
            "faster (load models once, batch the work) or raise its timeout_s (0 = no limit)"
        ) from None
    except RewardError:
        raise
    except Exception as e:
        index = _find_failing_sample(fn, prompts, completions, columns)
        where = f" on sample {index}" if index is not None else ""
        raise RewardError(f"reward {plugin!r} raised{where}: {type(e).__name__}: {e}") from None
    try:
        values = list(values)
    except TypeError:
        raise RewardError(
            f"reward {plugin!r} returned {type(values).__name__}, expected a list of {n} numbers"
        ) from None
    if len(values) != n:
        raise RewardError(f"reward {plugin!r} returned {len(values)} values for {n} samples")
    return [_check_value(plugin, i, v) for i, v in enumerate(values)]


def _find_failing_sample(fn, prompts, completions, columns) -> int | None:
    """Re-run the plugin one sample at a time to name the sample that makes it raise."""
    for i in range(len(completions)):
        one = {k: [v[i]] for k, v in columns.items()}
        try:
            fn(prompts=[prompts[i]], completions=[completions[i]], **one)
        except Exception:
            return i
    return None


class RewardSet:
    """The configured rewards, resolved once, called together, combined by weight."""

    def __init__(self, specs: Sequence):
        """``specs``: objects with ``name``, ``weight`` and ``params`` (config.RewardConfig)."""
        self.specs = list(specs)
        self.functions: dict[str, RewardFn] = {}
        for spec in self.specs:
            fn = resolve_reward(spec.name)
            if spec.params:
                fn = functools.partial(fn, **spec.params)
            self.functions[self.label(spec)] = fn

    @staticmethod
    def label(spec) -> str:
        return spec.name.rpartition(":")[2] if ":" in spec.name else spec.name

    def __len__(self) -> int:
        return len(self.specs)

    def score(
        self, prompts: Sequence, completions: Sequence, **columns: Sequence
    ) -> tuple[list[float | None], dict[str, list[float | None]]]:
        """Per-reward values and their weighted combination (``None`` values are skipped and
        the weights of the rest renormalised: ``sum(w*v) / sum(|w|)``; a sample no reward has an
        opinion on gets None)."""
        per_reward = {}
        for spec in self.specs:
            label = self.label(spec)
            per_reward[label] = call_reward(
                spec.name, self.functions[label], prompts, completions, columns, getattr(spec, "timeout_s", None)
            )
        combined: list[float | None] = []
        for i in range(len(completions)):
            total, weight = 0.0, 0.0
            for spec in self.specs:
                v = per_reward[self.label(spec)][i]
                if v is not None:
                    total += spec.weight * v
                    weight += abs(spec.weight)
            combined.append(total / weight if weight > 0 else None)
        return combined, per_reward
