"""``posttrain rewards list|score``: try reward plugins on a file before training with them."""

from __future__ import annotations

import importlib
import statistics

from posttrain.data.io import read_jsonl, write_jsonl
from posttrain.errors import RewardError, UserError
from posttrain.registry import builtin_rewards, call_reward, resolve_reward


def list_rewards() -> int:
    """Print every registered reward with the first line of its docstring."""
    rewards = builtin_rewards()
    width = max((len(n) for n in rewards), default=0)
    for name, target in sorted(rewards.items()):
        try:
            module, _, fn = target.partition(":")
            doc = (getattr(importlib.import_module(module), fn).__doc__ or "").strip().splitlines()
            summary = doc[0] if doc else ""
        except Exception as e:  # a broken built-in should not hide the others
            summary = f"(cannot import: {type(e).__name__}: {e})"
        print(f"{name:<{width}}  {summary}")
    return 0


def _parse_params(params: list[str]) -> dict:
    import yaml

    out = {}
    for p in params:
        if "=" not in p:
            raise UserError(f"bad --param {p!r}: write key=value")
        k, _, v = p.partition("=")
        out[k] = yaml.safe_load(v)
    return out


def score_file(reward: str, data: str, output: str | None, params: list[str], timeout_s: float | None = None) -> int:
    """Score every sample of a jsonl with one reward; print a summary, optionally write scores."""
    fn = resolve_reward(reward)
    bound = _parse_params(params)
    rows = read_jsonl(data)
    for row in rows:
        if "completion" not in row:
            raise RewardError(f"{data}, line {row['_line']}: missing field 'completion'")
    prompts = [row.get("prompt", "") for row in rows]
    completions = [row["completion"] for row in rows]
    keys = sorted({k for row in rows for k in row if k not in ("prompt", "completion") and not k.startswith("_")})
    columns = {k: [row.get(k) for row in rows] for k in keys}
    scores = call_reward(reward, lambda **kw: fn(**kw, **bound), prompts, completions, columns, timeout_s)
    values = [s for s in scores if s is not None]
    print(f"reward {reward} on {len(rows)} samples from {data}")
    if values:
        print(
            f"  mean {statistics.fmean(values):.4f}  min {min(values):.4f}  max {max(values):.4f}  "
            f"none {len(scores) - len(values)}"
        )
    else:
        print(f"  no opinion on any sample (none {len(scores)})")
    if output:
        write_jsonl(output, [{"line": row["_line"], "score": s} for row, s in zip(rows, scores)])
        print(f"  per-sample scores written to {output}")
    return 0
