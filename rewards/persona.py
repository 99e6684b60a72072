"""Persona reward: the reply stays in character, consistent with a persona card.

A persona card holds a name, facts and style markers. It comes from the ``persona`` column
(a dict, a JSON string or the text format below) or, when that is empty, from the system
message of a conversational prompt.

Dict format (flat keys work too: unknown top-level keys are facts, style keys are style)::

    {"name": "Mia Schulz",
     "facts": {"age": 34, "city": "Hamburg", "job": "nurse", "favorite food": "Labskaus"},
     "style": {"sign_off": "Cheers, Mia", "greeting": "Moin", "formality": "informal",
               "required": ["mate"], "forbidden": ["honestly"], "emoji": "never"},
     "allow_ai": false}

Text format, for a system prompt or a text column: ``Key: value`` items separated by ``;``
or new lines; ``Facts:`` and ``Style:`` hold ``key=value`` pairs separated by commas (quote a
value that has a comma); list values are separated by ``|``::

    Name: Mia Schulz; Age: 34; City: Hamburg; Job: nurse
    Style: sign_off="Cheers, Mia", formality=informal, forbidden=honestly|literally

A system message is read as a card when it has a ``Name:`` (or ``Persona:``) item; prose lines
around the card are ignored. A system message without one still gives the name in "You are
Mia" or "Your name is Mia".

Fact keys the reply is checked against (English, German, French, Spanish and Chinese
phrasings): ``name`` ("my name is X", "call me X", "ich heiße X", "je m'appelle X",
"me llamo X", "我叫X"), ``age`` ("I'm 34 years old", "I just turned 34", "ich bin 34 Jahre alt",
"j'ai 34 ans", "tengo 34 años", "我34岁"; digits, English number words or Chinese numerals),
``city`` where the persona lives ("I live in X", "I'm based in X", "ich wohne in X", "我住在X"),
``hometown`` ("I'm from X", "I grew up in X", "I was born in X", "我来自X"; compared with
``city`` when the card has no hometown), ``job`` ("I work as a X", "my job is X", "ich arbeite
als X", "trabajo como X", "我是一名X"), and any other key K through "my K is V". Places and
names are compared as written (containment, case-insensitive); jobs and other facts by shared
word stems.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.errors import RewardError
from rewards import as_text, column
from rewards.number_rendering import words_to_number

STYLE_KEYS = ("sign_off", "greeting", "required", "forbidden", "formality", "emoji")
_KEY_ALIASES = {
    "signoff": "sign_off",
    "sign_off_phrase": "sign_off",
    "signature": "sign_off",
    "closing": "sign_off",
    "always_sign_off": "sign_off",
    "opening": "greeting",
    "required_phrases": "required",
    "always_say": "required",
    "catchphrase": "required",
    "catchphrases": "required",
    "forbidden_phrases": "forbidden",
    "never_say": "forbidden",
    "avoid": "forbidden",
    "register": "formality",
    "emojis": "emoji",
    "occupation": "job",
    "profession": "job",
    "work": "job",
    "lives_in": "city",
    "location": "city",
    "residence": "city",
    "home_town": "hometown",
    "birthplace": "hometown",
    "from": "hometown",
    "is_ai": "allow_ai",
    "ai": "allow_ai",
    "favourite": "favorite",
}

# Phrases that break character. Those about being an AI are skipped for an AI persona.
AI_DISCLOSURE_PATTERNS = (
    r"\bas an? (?:ai|a\.i\.|artificial intelligence|(?:large )?language model|llm|chatbot)\b",
    r"\bi(?: am|'m) (?:just |only |merely )?(?:an? )?(?:ai|a\.i\.|artificial intelligence|"
    r"(?:large )?language model|llm|chatbot|virtual assistant|computer program|bot)\b",
    r"\bi(?: am|'m) not (?:a )?(?:real|human|an actual) ?(?:person|human)?\b",
    r"\bi (?:was|have been) (?:created|trained|developed|programmed) by\b",
    r"\bmy training data\b",
    r"\bi (?:do not|don't|cannot|can't) have (?:a )?(?:physical body|body|personal experiences|"
    r"personal opinions|feelings|emotions|a real name)\b",
    r"\bals (?:eine )?(?:ki|künstliche intelligenz|sprachmodell)\b",
    r"\ben tant qu'(?:ia|intelligence artificielle|modèle de langage)\b",
    r"\bcomo (?:una )?(?:ia|inteligencia artificial|modelo de lenguaje)\b",
    r"作为(?:一个)?(?:人工智能|AI|语言模型)",
    r"我是(?:一个)?(?:人工智能|AI|语言模型)",
)
OUT_OF_CHARACTER_PATTERNS = (
    r"\bbreaking character\b",
    r"\bout of character\b",
    r"\b(?:this|my) (?:persona|role[- ]?play|character) (?:is|was) (?:fictional|made up)\b",
    r"\bi(?: am|'m) (?:only )?(?:playing|pretending to be) (?:a |the )?"
    r"(?:character|role|persona)\b",
)

_SLANG = (
    "gonna",
    "wanna",
    "gotta",
    "yeah",
    "yep",
    "nope",
    "hey",
    "lol",
    "omg",
    "btw",
    "dude",
    "kinda",
    "sorta",
    "ya",
    "u",
    "ur",
    "thx",
    "cool",
    "awesome",
    "stuff",
)
_CONTRACTION = re.compile(
    r"\b\w+(?:n't|'re|'ve|'ll|'m|'d)\b|\b(?:let's|it's|that's|what's)\b", re.I
)
_FORMAL_MARKERS = (
    "dear sir",
    "dear madam",
    "yours sincerely",
    "yours faithfully",
    "sincerely",
    "kind regards",
    "best regards",
    "furthermore",
    "moreover",
    "hereby",
    "pursuant",
    "i would be delighted",
    "please do not hesitate",
    "sehr geehrte",
    "mit freundlichen grüßen",
    "veuillez agréer",
    "atentamente",
    "estimado",
)
_EMOJI = re.compile("[\U0001f300-\U0001faff\U00002600-\U000027bf\U0001f000-\U0001f2ff]")


@dataclass
class PersonaCard:
    """Who the model plays: name, facts (key -> value), style markers."""

    name: str | None = None
    facts: dict[str, str] = field(default_factory=dict)
    sign_off: str | None = None
    greeting: str | None = None
    required: list[str] = field(default_factory=list)
    forbidden: list[str] = field(default_factory=list)
    formality: str | None = None  # "formal" | "informal"
    emoji: str | None = None  # "never" | "always"
    allow_ai: bool = False


def _key(raw: str) -> str:
    key = re.sub(r"[\s\-]+", "_", str(raw).strip().lower())
    key = key.replace("favourite", "favorite")
    return _KEY_ALIASES.get(key, key)


def _split_outside_quotes(text: str, seps: str) -> list[str]:
    parts, buf, quote = [], [], None
    for ch in text:
        if quote:
            if ch == quote:
                quote = None
            buf.append(ch)
        elif ch in '"“”' and (not buf or "".join(buf).rstrip().endswith(("=", ":"))):
            quote = "”" if ch == "“" else ch
            buf.append(ch)
        elif ch in seps:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return [p.strip() for p in parts if p.strip()]


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] in "\"“'" and value[-1] in "\"”'":
        return value[1:-1]
    return value


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if str(v).strip()]
    return [_unquote(v) for v in str(value).split("|") if v.strip()]


def _set(card: PersonaCard, key: str, value: Any, where: str) -> None:
    key = _key(key)
    if key == "name":
        card.name = _unquote(str(value))
    elif key == "facts":
        pairs = value.items() if isinstance(value, dict) else _pairs(str(value), where)
        for k, v in pairs:
            card.facts[_key(k)] = _unquote(str(v))
    elif key == "style":
        pairs = value.items() if isinstance(value, dict) else _pairs(str(value), where)
        for k, v in pairs:
            if _key(k) not in STYLE_KEYS:
                raise RewardError(
                    f"{where}: unknown style key {k!r}; style keys are {', '.join(STYLE_KEYS)}"
                )
            _set(card, k, v, where)
    elif key in ("required", "forbidden"):
        getattr(card, key).extend(_as_list(value))
    elif key in ("sign_off", "greeting"):
        setattr(card, key, _unquote(str(value)))
    elif key == "formality":
        value = str(value).strip().lower()
        if value not in ("formal", "informal"):
            raise RewardError(f"{where}: formality must be 'formal' or 'informal', not {value!r}")
        card.formality = value
    elif key == "emoji":
        text = str(value).strip().lower()
        value = {
            "false": "never",
            "no": "never",
            "none": "never",
            "true": "always",
            "yes": "always",
        }.get(text, text)
        if value not in ("never", "always"):
            raise RewardError(f"{where}: emoji must be 'never' or 'always', not {text!r}")
        card.emoji = value
    elif key == "allow_ai":
        card.allow_ai = str(value).strip().lower() in ("1", "true", "yes")
    elif key == "persona":
        card.name = card.name or _unquote(str(value))
    else:
        card.facts[key] = _unquote(str(value))


def _pairs(text: str, where: str) -> list[tuple[str, str]]:
    out = []
    for item in _split_outside_quotes(text, ","):
        if "=" not in item:
            raise RewardError(f"{where}: {item!r} is not key=value (quote values with commas)")
        k, _, v = item.partition("=")
        out.append((k, v))
    return out


def parse_persona(value: Any, where: str = "persona") -> PersonaCard | None:
    """A persona card from a dict, JSON text or ``Key: value; ...`` text; None when empty."""
    if value is None or isinstance(value, PersonaCard):
        return value
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise RewardError(
                    f"{where}: persona looks like JSON but does not parse: {e}"
                ) from None
        else:
            card = PersonaCard()
            for item in _split_outside_quotes(text, ";\n"):
                k, sep, v = item.partition(":")
                if not sep or not v.strip():
                    raise RewardError(
                        f"{where}: persona item {item!r} is not 'Key: value' "
                        "(e.g. 'Name: Mia; Age: 34; Style: sign_off=\"Cheers, Mia\"')"
                    )
                _set(card, k, v.strip(), where)
            return card
    if not isinstance(value, dict):
        raise RewardError(f"{where}: a persona is a dict or text, not {type(value).__name__}")
    card = PersonaCard()
    for k, v in value.items():
        if v is not None:
            _set(card, k, v, where)
    return card


_CARD_ITEM = re.compile(r"^\s*[-*]?\s*([A-Za-z][\w \-]{0,30}):\s*(\S.*)$")


def persona_from_system(text: str, where: str = "system message") -> PersonaCard | None:
    """The persona card in a system message (see the module docstring), or None."""
    items = []
    for line in text.splitlines():
        for part in _split_outside_quotes(line, ";"):
            m = _CARD_ITEM.match(part)
            if m:
                items.append((m.group(1), m.group(2).strip()))
    if any(_key(k) in ("name", "persona") for k, _ in items):
        card = PersonaCard()
        for k, v in items:
            _set(card, k, v, where)
        return card
    m = re.search(
        r"\b(?:[Yy]ou are|[Yy]our name is|[Yy]ou're)\s+([A-Z][\w'-]+(?:\s+[A-Z][\w'-]+)?)", text
    )
    return PersonaCard(name=m.group(1)) if m else None


# --------------------------------------------------------------------------- stated facts

_NAME = r"([A-ZÀ-Þ][\w'-]*(?:\s+[A-ZÀ-Þ][\w'-]*)?)"
_PLACE = r"([A-ZÀ-Þ][\w'.-]*(?:\s+[A-ZÀ-Þ][\w'.-]*){0,2})"
_CJK = r"([\u4e00-\u9fff]{1,4})"
_NUM = r"(\d{1,3}|[A-Za-z]+(?:[- ][A-Za-z]+)?|[零一二两三四五六七八九十]{1,3})"
_PHRASE = r"([^\W\d][\w'-]*(?:[ ][^\W\d][\w'-]*){0,3})"

FACT_PATTERNS = {
    "name": (
        r"(?i:\bmy name(?: is|'s)\s+)" + _NAME,
        r"(?i:\bcall me\s+)" + _NAME,
        r"(?i:\bi(?: am|'m) called\s+)" + _NAME,
        r"(?i:\bthe name(?: is|'s)\s+)" + _NAME,
        r"(?i:\bich hei(?:ß|ss)e\s+)" + _NAME,
        r"(?i:\bmein name ist\s+)" + _NAME,
        r"(?i:\bje m'appelle\s+)" + _NAME,
        r"(?i:\bme llamo\s+)" + _NAME,
        r"(?i:\bmi nombre es\s+)" + _NAME,
        r"我叫\s*" + _CJK,
        r"我的名字(?:是|叫)\s*" + _CJK,
    ),
    "age": (
        r"(?i:\bi(?: am|'m)\s+)" + _NUM + r"(?i:\s+(?:years?|yrs?)\s+(?:old|of age)\b)",
        r"(?i:\bi(?: am|'m) (?:an? )?)" + _NUM + r"(?i:[- ]years?[- ]old\b)",
        r"(?i:\bmy age is\s+)" + _NUM + r"\b",
        r"(?i:\bi (?:just )?turned\s+)" + _NUM + r"\b",
        r"(?i:\bich bin\s+)" + _NUM + r"(?i:\s+jahre alt\b)",
        r"(?i:\bj'ai\s+)" + _NUM + r"(?i:\s+ans\b)",
        r"(?i:\btengo\s+)" + _NUM + r"(?i:\s+años)",
        r"我(?:今年)?\s*" + _NUM + r"\s*岁",
    ),
    "city": (
        r"(?i:\bi (?:live|am living|'m living|currently live) in\s+)" + _PLACE,
        r"(?i:\bi(?: am|'m) based in\s+)" + _PLACE,
        r"(?i:\bich (?:wohne|lebe) in\s+)" + _PLACE,
        r"(?i:\b(?:j'habite|je vis) (?:à|a)\s+)" + _PLACE,
        r"(?i:\bvivo en\s+)" + _PLACE,
        r"我(?:住|生活)在\s*" + _CJK,
    ),
    "hometown": (
        r"(?i:\bi(?: am|'m) (?:originally )?from\s+)" + _PLACE,
        r"(?i:\bi (?:grew up|was born) in\s+)" + _PLACE,
        r"(?i:\bich komme (?:ursprünglich )?aus\s+)" + _PLACE,
        r"(?i:\bje viens de\s+)" + _PLACE,
        r"(?i:\bsoy de\s+)" + _PLACE,
        r"我来自\s*" + _CJK,
    ),
    "job": (
        r"(?i:\bi work as (?:an? )?)" + _PHRASE,
        r"(?i:\bmy (?:job|profession|occupation) is (?:being )?(?:an? )?)" + _PHRASE,
        r"(?i:\bi(?: am|'m) (?:an? )?)" + _PHRASE + r"(?i: by (?:profession|trade)\b)",
        r"(?i:\bich arbeite als\s+)" + _PHRASE,
        r"(?i:\bje travaille comme\s+)" + _PHRASE,
        r"(?i:\btrabajo como\s+)" + _PHRASE,
        r"我是一名\s*([\u4e00-\u9fff]{1,6})",
        r"我的(?:工作|职业)是\s*([\u4e00-\u9fff]{1,6})",
    ),
}
_STOPWORDS = {"the", "a", "an", "at", "in", "of", "for", "and", "with", "my", "on", "to"}
_CJK_DIGITS = {
    "零": 0,
    "一": 1,
    "二": 2,
    "两": 2,
    "三": 3,
    "四": 4,
    "五": 5,
    "六": 6,
    "七": 7,
    "八": 8,
    "九": 9,
}


def _chinese_number(text: str) -> int | None:
    """一 .. 九十九 as an int; None for anything else."""
    if not text or any(c not in _CJK_DIGITS and c != "十" for c in text):
        return None
    if "十" not in text:
        return _CJK_DIGITS[text] if len(text) == 1 else None
    tens, _, ones = text.partition("十")
    if len(tens) > 1 or len(ones) > 1:
        return None
    return (_CJK_DIGITS[tens] if tens else 1) * 10 + (_CJK_DIGITS[ones] if ones else 0)


def _age(text: str) -> int | None:
    if text.isdigit():
        return int(text)
    n = _chinese_number(text)
    if n is not None:
        return n
    value = words_to_number(text)
    return int(value) if value is not None and value == int(value) else None


def _generic_pattern(key: str) -> str:
    words = key.replace("_", " ").split()
    body = r"[\s_-]+".join("favou?rite" if w == "favorite" else re.escape(w) for w in words)
    return r"(?i:\bmy " + body + r" (?:is|are|was|'s)\s+)" + _PHRASE


def stated_facts(text: str, keys: Sequence[str] = ()) -> dict[str, list[str]]:
    """Facts the speaker states about themself in ``text``: kind -> values, in order.

    Looks for the built-in kinds, "my favorite X is Y", and "my K is V" for each of ``keys``.
    """
    found: dict[str, list[tuple[int, str]]] = {}
    for kind, patterns in FACT_PATTERNS.items():
        for pattern in patterns:
            for m in re.finditer(pattern, text):
                found.setdefault(kind, []).append((m.start(), m.group(1).strip()))
    for m in re.finditer(
        r"(?i:\bmy favou?rite ([a-z]+(?: [a-z]+)?) (?:is|are)\s+)" + _PHRASE, text
    ):
        found.setdefault(_key("favorite " + m.group(1)), []).append((m.start(), m.group(2).strip()))
    for key in keys:
        if key in FACT_PATTERNS or key in found:
            continue
        for m in re.finditer(_generic_pattern(key), text):
            found.setdefault(key, []).append((m.start(), m.group(1).strip()))
    return {k: [v for _, v in sorted(vs)] for k, vs in found.items()}


def _stems(text: str) -> set[str]:
    return {w for w in re.findall(r"\w+", text.lower()) if w not in _STOPWORDS}


def _share_stem(a: str, b: str) -> bool:
    for x in _stems(a):
        for y in _stems(b):
            if x == y:
                return True
            n = 0
            while n < min(len(x), len(y)) and x[n] == y[n]:
                n += 1
            if n >= 4:
                return True
    return a.strip() in b or b.strip() in a  # Chinese has no spaces


def _contains_either(a: str, b: str) -> bool:
    a, b = a.casefold().strip(), b.casefold().strip()
    return bool(a) and bool(b) and (a in b or b in a)


def consistent(kind: str, expected: str, stated: str) -> bool:
    """Whether a stated value agrees with the card's value for a fact ``kind``."""
    if kind == "age":
        want, got = _age(str(expected).strip()), _age(stated)
        return got is None or want is None or want == got  # unparsable: no contradiction
    if kind in ("name", "city", "hometown"):
        if kind == "name" and _stems(expected) & _stems(stated):
            return True
        return _contains_either(expected, stated)
    return _share_stem(expected, stated)


# --------------------------------------------------------------------------- style


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text.casefold()).strip()


def _strip_edges(text: str) -> str:
    return re.sub(r"^[\W_]+|[\W_]+$", "", text)


def style_checks(card: PersonaCard, reply: str) -> list[tuple[str, bool]]:
    """(marker, satisfied) for each style marker on the card."""
    text = _norm(reply)
    checks = []
    if card.sign_off:
        lines = [line for line in reply.strip().splitlines() if line.strip()]
        tail = _norm(" ".join(lines[-2:]))[-max(200, 2 * len(card.sign_off)) :]
        checks.append(("sign_off", _strip_edges(_norm(card.sign_off)) in tail))
    if card.greeting:
        head = _strip_edges(text)
        checks.append(("greeting", head.startswith(_strip_edges(_norm(card.greeting)))))
    for phrase in card.required:
        checks.append((f"required {phrase!r}", _norm(phrase) in text))
    for phrase in card.forbidden:
        checks.append((f"forbidden {phrase!r}", _norm(phrase) not in text))
    if card.formality == "formal":
        slang = any(re.search(rf"\b{re.escape(w)}\b", text) for w in _SLANG)
        checks.append(("formal", not slang and not _CONTRACTION.search(reply.replace("’", "'"))))
    elif card.formality == "informal":
        checks.append(("informal", not any(m in text for m in _FORMAL_MARKERS)))
    if card.emoji == "never":
        checks.append(("no emoji", not _EMOJI.search(reply)))
    elif card.emoji == "always":
        checks.append(("emoji", bool(_EMOJI.search(reply))))
    return checks


def _is_ai_persona(card: PersonaCard) -> bool:
    about = " ".join([card.name or ""] + list(card.facts.values()))
    return (
        card.allow_ai
        or re.search(
            r"\b(?:ai|a\.i\.|artificial intelligence|chatbot|language model|robot|android)\b",
            about,
            re.I,
        )
        is not None
    )


def breaks_character(card: PersonaCard, reply: str, patterns: Sequence[str] = ()) -> bool:
    """Whether the reply steps out of the persona ("as an AI language model", ...)."""
    checks = list(OUT_OF_CHARACTER_PATTERNS) + list(patterns)
    if not _is_ai_persona(card):
        checks += list(AI_DISCLOSURE_PATTERNS)
    text = reply.replace("’", "'")
    return any(re.search(p, text, re.IGNORECASE) for p in checks)


def fact_checks(card: PersonaCard, reply: str) -> list[tuple[str, bool]]:
    """(fact, consistent) for each card fact the reply states something about."""
    expected = dict(card.facts)
    if card.name:
        expected["name"] = card.name
    if "hometown" not in expected and "city" in expected:
        expected["hometown"] = expected["city"]  # "I'm from X" vs where the persona lives
    out = []
    for kind, values in stated_facts(reply, list(expected)).items():
        if kind in expected:
            for value in values:
                out.append((kind, consistent(kind, str(expected[kind]), value)))
    return out


def persona_score(card: PersonaCard, reply: str, *, break_patterns: Sequence[str] = ()) -> float:
    """0 when the reply breaks character; else (consistent stated facts / stated facts) x
    (satisfied style markers / style markers), each 1 when there is nothing to check."""
    if breaks_character(card, reply, break_patterns):
        return 0.0
    facts = fact_checks(card, reply)
    style = style_checks(card, reply)
    fact_score = sum(ok for _, ok in facts) / len(facts) if facts else 1.0
    style_score = sum(ok for _, ok in style) / len(style) if style else 1.0
    return fact_score * style_score


def _system_text(prompt: Any) -> str:
    if isinstance(prompt, (list, tuple)):
        return "\n".join(
            as_text(m) for m in prompt if isinstance(m, dict) and m.get("role") == "system"
        )
    return ""


def _earlier_replies(prompt: Any) -> list[str]:
    if isinstance(prompt, (list, tuple)):
        return [as_text(m) for m in prompt if isinstance(m, dict) and m.get("role") == "assistant"]
    return []


def with_stated_facts(card: PersonaCard, earlier_replies: Sequence[str]) -> PersonaCard:
    """The card plus facts the persona stated in earlier turns (the card wins on conflict;
    the first statement wins among turns), so later turns must stay consistent with them."""
    facts = dict(card.facts)
    for reply in earlier_replies:
        for kind, values in stated_facts(reply, list(facts)).items():
            if kind == "name":
                continue
            facts.setdefault(kind, values[0])
    return PersonaCard(**{**card.__dict__, "facts": facts})


def persona(
    prompts: Sequence,
    completions: Sequence,
    *,
    track_stated_facts: bool = True,
    break_patterns: Sequence[str] = (),
    **columns: Any,
) -> list[float | None]:
    """Stays in character with the persona card, in [0, 1]; see the module docstring.

    The card comes from column ``persona`` or the prompt's system message. The reply scores 0
    when it breaks character (built-in phrases such as "as an AI language model", skipped for an
    AI persona, plus the regexes in ``break_patterns``); otherwise the fraction of the facts it
    states (name, age, city, job, ...) that agree with the card, times the fraction of the
    card's style markers it satisfies (sign-off, greeting, required and forbidden phrases,
    formality, emoji). With ``track_stated_facts`` facts stated by the assistant in earlier
    turns of the prompt join the card. None when a sample has no persona.
    """
    n = len(completions)
    prompts = list(prompts) if prompts is not None else [None] * n
    cards = column(columns, "persona", n)
    scores: list[float | None] = []
    for i in range(n):
        card = parse_persona(cards[i], where=f"persona reward, sample {i}, column 'persona'")
        system = _system_text(prompts[i])
        if card is None and system:
            card = persona_from_system(system, where=f"persona reward, sample {i}, system message")
        if card is None:
            scores.append(None)
            continue
        if track_stated_facts:
            card = with_stated_facts(card, _earlier_replies(prompts[i]))
        scores.append(persona_score(card, as_text(completions[i]), break_patterns=break_patterns))
    return scores
