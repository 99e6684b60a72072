"""Instruction-following reward: IFEval-style constraints, each verified by code.

A sample's constraints are a list of dicts in the ``constraints`` column, e.g.
``[{"type": "max_words", "value": 20}, {"type": "required_keywords", "value": ["Hamburg"]}]``.
Carrying them as data (not parsing them from the prompt) lets a conversation generator state a
constraint many turns before the reply it applies to; ``describe_constraint`` gives the
instruction text to put in the conversation and ``check_constraint`` the verdict.

Counting rules: words are whitespace-separated tokens with a letter or digit, plus one word per
Han/kana character (Chinese and Japanese have no spaces); sentences end at . ! ? 。！？ (or the
end of the text); paragraphs are separated by blank lines or a ``***`` line; bullets are lines
starting with ``-``, ``*``, ``•``, or ``1.``/``1)``; keywords match case-insensitively as
whole words (as substrings for Han/kana keywords).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from typing import Any

from posttrain.errors import RewardError
from rewards import as_text, column
from rewards.language import LANGUAGE_NAMES, language_score, normalize_language_code

# A reply satisfies a `language` constraint when at least this fraction of it is in that language.
LANGUAGE_MIN_SHARE = 0.8

_CJK_CHAR = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")
_SENTENCE_END = re.compile(r"[.!?。！？]+(?=\s|$|[\"'”’)\]])|[。！？]+")
_BULLET = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+\S", re.MULTILINE)
_PARAGRAPH_SPLIT = re.compile(r"\n\s*\n|\n\s*\*\*\*\s*\n")


def count_words(text: str) -> int:
    """Whitespace-separated tokens with a letter or digit, one per Han/kana character."""
    cjk = len(_CJK_CHAR.findall(text))
    rest = _CJK_CHAR.sub(" ", text)
    return cjk + sum(1 for t in rest.split() if any(c.isalnum() for c in t))


def count_sentences(text: str) -> int:
    """Sentences ending in . ! ? 。！？, plus a trailing one without a full stop."""
    stripped = text.strip()
    if not stripped:
        return 0
    ends = list(_SENTENCE_END.finditer(stripped))
    tail = stripped[ends[-1].end() :] if ends else stripped
    return len(ends) + (1 if any(c.isalnum() for c in tail) else 0)


def count_paragraphs(text: str) -> int:
    """Non-empty blocks separated by blank lines or ``***`` lines."""
    return sum(1 for p in _PARAGRAPH_SPLIT.split(text.strip()) if p.strip())


def count_bullets(text: str) -> int:
    """Lines that start a markdown bullet or a numbered item."""
    return len(_BULLET.findall(text))


def _has_keyword(text: str, keyword: str) -> bool:
    if _CJK_CHAR.search(keyword):
        return keyword.lower() in text.lower()
    return (
        re.search(r"(?<!\w)" + re.escape(keyword.strip()) + r"(?!\w)", text, re.IGNORECASE)
        is not None
    )


def _is_json(text: str) -> bool:
    body = text.strip()
    fenced = re.fullmatch(r"```(?:json)?\s*\n?(.*?)\n?```", body, re.DOTALL | re.IGNORECASE)
    if fenced:
        body = fenced.group(1)
    try:
        json.loads(body)
    except ValueError:
        return False
    return True


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().casefold()


def _int(value: Any, kind: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise RewardError(f"constraint {kind!r} needs an integer 'value', got {value!r}")
    try:
        number = float(value)
    except ValueError:
        raise RewardError(f"constraint {kind!r} needs an integer 'value', got {value!r}") from None
    if number != int(number) or number < 0:
        raise RewardError(
            f"constraint {kind!r} needs a non-negative integer 'value', got {value!r}"
        )
    return int(number)


def _phrases(value: Any, kind: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if (
        not isinstance(value, (list, tuple))
        or not value
        or not all(isinstance(v, str) and v.strip() for v in value)
    ):
        raise RewardError(
            f"constraint {kind!r} needs 'value': a keyword or a list of keywords, got {value!r}"
        )
    return list(value)


def _phrase(value: Any, kind: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RewardError(f"constraint {kind!r} needs 'value': a non-empty phrase, got {value!r}")
    return value


def _has_letters(text: str) -> bool:
    return any(c.isalpha() and c.lower() != c.upper() for c in text)


def _language(text: str, value: Any) -> bool:
    code = normalize_language_code(value)
    score = language_score(text, [code])
    return score is not None and score >= LANGUAGE_MIN_SHARE


# type -> (check(text, value) -> bool, instruction template, needs a value)
_CHECKS: dict[str, tuple[Callable[[str, Any], bool], str, bool]] = {
    "max_words": (
        lambda t, v: count_words(t) <= _int(v, "max_words"),
        "Answer in at most {value} words.",
        True,
    ),
    "min_words": (
        lambda t, v: count_words(t) >= _int(v, "min_words"),
        "Answer in at least {value} words.",
        True,
    ),
    "max_sentences": (
        lambda t, v: count_sentences(t) <= _int(v, "max_sentences"),
        "Use at most {value} sentences.",
        True,
    ),
    "min_sentences": (
        lambda t, v: count_sentences(t) >= _int(v, "min_sentences"),
        "Use at least {value} sentences.",
        True,
    ),
    "required_keywords": (
        lambda t, v: all(_has_keyword(t, k) for k in _phrases(v, "required_keywords")),
        "Include the words {value_list}.",
        True,
    ),
    "forbidden_keywords": (
        lambda t, v: not any(_has_keyword(t, k) for k in _phrases(v, "forbidden_keywords")),
        "Do not use the words {value_list}.",
        True,
    ),
    "json_format": (lambda t, v: _is_json(t), "Reply with valid JSON only.", False),
    "bullet_list": (
        lambda t, v: count_bullets(t) == _int(v, "bullet_list"),
        "Answer as a bullet list of exactly {value} items.",
        True,
    ),
    "language": (_language, "Answer in {language_name}.", True),
    "starts_with": (
        lambda t, v: _norm(t).startswith(_norm(_phrase(v, "starts_with"))),
        'Start your answer with "{value}".',
        True,
    ),
    "ends_with": (
        lambda t, v: _norm(t).endswith(_norm(_phrase(v, "ends_with"))),
        'End your answer with "{value}".',
        True,
    ),
    "all_lowercase": (
        lambda t, v: _has_letters(t) and t == t.lower(),
        "Write your whole answer in lowercase letters.",
        False,
    ),
    "all_uppercase": (
        lambda t, v: _has_letters(t) and t == t.upper(),
        "Write your whole answer in capital letters.",
        False,
    ),
    "num_paragraphs": (
        lambda t, v: count_paragraphs(t) == _int(v, "num_paragraphs"),
        "Write exactly {value} paragraphs, separated by blank lines.",
        True,
    ),
}

CONSTRAINT_TYPES: tuple[str, ...] = tuple(_CHECKS)


def _validated(constraint: Any) -> tuple[str, Any]:
    if isinstance(constraint, str):
        constraint = {"type": constraint}
    if not isinstance(constraint, dict) or "type" not in constraint:
        raise RewardError(
            f"a constraint is a dict with 'type' (and 'value'), e.g. "
            f"{{'type': 'max_words', 'value': 20}}; got {constraint!r}"
        )
    kind = constraint["type"]
    if not isinstance(kind, str) or kind not in _CHECKS:
        raise RewardError(
            f"unknown constraint type {kind!r}; valid types: {', '.join(CONSTRAINT_TYPES)}"
        )
    value = constraint.get("value")
    if _CHECKS[kind][2] and value is None:
        raise RewardError(f"constraint {kind!r} needs a 'value'")
    return kind, value


def check_constraint(constraint: dict | str, text: str) -> bool:
    """Whether ``text`` satisfies one constraint (``{"type": ..., "value": ...}``).

    Raises RewardError for an unknown type (listing the valid ones) or a bad value.
    """
    kind, value = _validated(constraint)
    return bool(_CHECKS[kind][0](text, value))


def describe_constraint(constraint: dict | str) -> str:
    """The instruction a user would say for ``constraint``, e.g. "Answer in at most 20 words."."""
    kind, value = _validated(constraint)
    template = _CHECKS[kind][1]
    language_name = ""
    if kind == "language":
        code = normalize_language_code(value)
        language_name = LANGUAGE_NAMES.get(code, code)
    value_list = ""
    if kind in ("required_keywords", "forbidden_keywords"):
        value_list = ", ".join(f'"{k}"' for k in _phrases(value, kind))
    return template.format(value=value, value_list=value_list, language_name=language_name)


def _constraints_of(value: Any, index: int) -> list:
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise RewardError(
                f"instruction_following reward, sample {index}: column 'constraints' is text but "
                f"not JSON ({e}); give a list of {{'type', 'value'}} dicts"
            ) from None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise RewardError(
            f"instruction_following reward, sample {index}: column 'constraints' must be a list "
            f"of {{'type', 'value'}} dicts, got {type(value).__name__}"
        )
    return list(value)


def instruction_following(
    prompts: Sequence, completions: Sequence, **columns: Any
) -> list[float | None]:
    """Fraction of the sample's constraints the reply satisfies, in [0, 1].

    Reads column ``constraints``: a list of ``{"type", "value"}`` dicts (or its JSON text);
    types are CONSTRAINT_TYPES (see check_constraint and the module docstring). None when a
    sample has no constraints. An unknown type or a bad value raises RewardError naming the
    sample and listing the valid types.
    """
    n = len(completions)
    all_constraints = column(columns, "constraints", n)
    scores: list[float | None] = []
    for i in range(n):
        constraints = _constraints_of(all_constraints[i], i)
        if not constraints:
            scores.append(None)
            continue
        text = as_text(completions[i])
        satisfied = 0
        for k, constraint in enumerate(constraints):
            try:
                satisfied += check_constraint(constraint, text)
            except RewardError as e:
                raise RewardError(
                    f"instruction_following reward, sample {i}, constraint {k}: {e}"
                ) from None
        scores.append(satisfied / len(constraints))
    return scores
