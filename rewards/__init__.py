"""Built-in reward plugins.

Every reward is a plain function ``f(prompts, completions, **columns) -> list[float | None]``,
the same shape as a TRL GRPOTrainer reward function. ``None`` means "no opinion on this
sample". Built-ins are registered under the ``posttrain.rewards`` entry-point group in
``pyproject.toml``; users name them in a config by entry-point name or ``module:function``.
"""

from __future__ import annotations

from typing import Any


def as_text(x: Any) -> str:
    """The text of a prompt or completion, plain or in TRL's conversational format.

    Conversational values are lists of ``{"role", "content"}`` messages; the text is the
    content of the last message (for a completion, the assistant's reply).
    """
    if x is None:
        return ""
    if isinstance(x, str):
        return x
    if isinstance(x, dict):
        content = x.get("content", "")
        if isinstance(content, list):  # multimodal content parts
            return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
        return str(content)
    if isinstance(x, (list, tuple)):
        return as_text(x[-1]) if x else ""
    return str(x)


def column(columns: dict, name: str, n: int, default: Any = None) -> list:
    """A keyword column as a list of length ``n`` (missing column -> ``[default] * n``)."""
    values = columns.get(name)
    if values is None:
        return [default] * n
    values = list(values)
    if len(values) != n:
        raise ValueError(f"column {name!r} has {len(values)} values for {n} samples")
    return values
