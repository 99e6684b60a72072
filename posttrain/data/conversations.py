"""Multi-turn conversations for interaction RL: a persona to keep, languages to follow, rules
to remember over long contexts; every requirement recorded as a column the rewards check.

One row is one conversation whose last message is a user turn; the model writes the reply.

- ``prompt``: TRL conversational format, ``[{"role", "content"}, ...]``: a system turn holding the
  persona card, then user/assistant turns, ending with a user turn. Earlier assistant turns are
  template-made replies that obey everything below, so the conversation is consistent.
- ``persona``: the persona card as text (the format `rewards.persona` parses:
  ``Name: ...; Age: ...; City: ...; Job: ...; Style: emoji=never, ...``).
- ``language``: the language the final reply must be in (ISO 639-1: en, de, fr, es, zh), for
  `rewards.language`. The user may switch language at any turn; each user turn says in its
  last sentence which language to answer in ("Bitte antworte auf Deutsch."), so the cue is
  clear even for a tiny model. ``turn_languages`` lists the reply language of every user turn.
- ``constraints``: rules stated once, in the first user turn (worded by
  `rewards.instruction_following.describe_constraint`), that hold for every reply, the last
  one included: ``max_words``, ``required_keywords``, ``forbidden_keywords``,
  ``all_lowercase``, ``ends_with``. Values are strings (``{"type": "max_words", "value":
  "25"}``), so the column has one Arrow type for `datasets`; `check_constraint` reads them.
- ``reference``: a template-made correct final reply (for tests, an SFT warm-up, or a sanity
  check of the rewards: it scores 1.0 on all three).
- ``id``, ``num_turns`` (user turns), ``context_chars`` (characters of all prompt messages).

The vocabulary is small on purpose: a handful of questions about the persona (name, age, city,
job, plans for the day) and short story sentences as filler, in five languages, so a tiny
model can learn to satisfy the rewards. Why some combinations are avoided: the persona reward
compares stated facts with the card as written, so a reply only states facts it can state in
that language with the card's own words (Chinese replies state the age, never a Latin-script
name or city, which would also count as a non-Chinese segment); required keywords are numbers
("42"), which count as no language; ``all_lowercase`` needs letters with case, so it is never
combined with Chinese turns.

User data (`read_user_data`): a jsonl whose rows hold a ``persona`` (card text or dict) and/or
user turns (``messages``: a list of ``{"role", "content"}``; or ``turns``: a list of strings).
User turns replace the templated turns before the final one (the final turn stays templated, so
the language cue is always clear); their language is the message's or row's ``language`` field,
or is identified from the text.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from posttrain.errors import DataError, UserError

SUPPORTED_LANGUAGES: tuple[str, ...] = ("en", "de", "fr", "es", "zh")
#: Constraint types the generator states (all language-neutral; see the module docstring).
CONVERSATION_CONSTRAINTS: tuple[str, ...] = (
    "max_words", "required_keywords", "forbidden_keywords", "all_lowercase", "ends_with",
)

# ---------------------------------------------------------------------------------- templates

HELLO = {"en": "Hi!", "de": "Hallo!", "fr": "Salut !", "es": "¡Hola!", "zh": "你好！"}
# The last sentence of every user turn: which language to answer in.
CUE = {
    "en": "Please answer in English.",
    "de": "Bitte antworte auf Deutsch.",
    "fr": "Réponds en français, s'il te plaît.",
    "es": "Responde en español, por favor.",
    "zh": "请用中文回答。",
}
RULES_HEADER = "Rules for every answer in this chat:"

# question kind -> language -> (user question, persona reply template). A kind is asked only in
# languages where the reply can state the fact in words the persona reward matches to the card.
QUESTIONS: dict[str, dict[str, tuple[str, str]]] = {
    "name": {
        "en": ("What is your name?", "Hello, my name is {name} and it is nice to talk with you."),
        "de": ("Wie heißt du?", "Hallo, ich heiße {name} und es freut mich, mit dir zu sprechen."),
        "fr": ("Comment tu t'appelles ?", "Bonjour, je m'appelle {name} et c'est un plaisir de parler avec toi."),
        "es": ("¿Cómo te llamas?", "Hola, me llamo {name} y es un placer hablar contigo."),
    },
    "age": {
        "en": ("How old are you?", "I am {age} years old, thank you for asking me."),
        "de": ("Wie alt bist du?", "Ich bin {age} Jahre alt, danke für deine Frage."),
        "fr": ("Quel âge as-tu ?", "J'ai {age} ans, merci pour ta question."),
        "es": ("¿Cuántos años tienes?", "Tengo {age} años, gracias por tu pregunta."),
        "zh": ("你今年多大？", "我今年{age}岁。谢谢你的问题。"),
    },
    "city": {
        "en": ("Where do you live?", "I live in {city} and it is a lovely place to live."),
        "de": ("Wo wohnst du?", "Ich wohne in {city} und die Stadt gefällt mir sehr gut."),
        "fr": ("Où habites-tu ?", "J'habite à {city} et c'est une ville très agréable."),
        "es": ("¿Dónde vives?", "Vivo en {city} y es una ciudad muy bonita."),
    },
    "job": {
        "en": ("What do you do for work?", "I work as {article} {job}. I like my work a lot."),
    },
    "day": {
        "en": ("What are your plans for today?", "Today I want to read a book and cook dinner at home."),
        "de": ("Was machst du heute?", "Heute lese ich ein Buch und koche am Abend zu Hause."),
        "fr": ("Qu'est-ce que tu fais aujourd'hui ?", "Aujourd'hui je lis un livre et je cuisine le soir à la maison."),
        "es": ("¿Qué haces hoy?", "Hoy leo un libro y por la noche cocino en casa."),
        "zh": ("你今天打算做什么？", "今天我在家看书，晚上做饭。"),
    },
}
# The fact each question kind needs on the card.
_NEEDS = {"name": "name", "age": "age", "city": "city", "job": "job", "day": None}

# Filler: a short story the user tells, to make contexts long; the reply thanks them first.
STORY_INTRO = {
    "en": "Let me tell you about my week.",
    "de": "Ich erzähle dir von meiner Woche.",
    "fr": "Je te raconte ma semaine.",
    "es": "Te cuento mi semana.",
    "zh": "我跟你说说我这周的事。",
}
STORY_SENTENCES = {
    "en": ("On Monday I went to the market.", "The weather was cold and windy.",
           "My sister called me in the evening.", "I bought fresh bread and some apples.",
           "We walked along the river after dinner.", "The train to work was late again.",
           "On Friday I cleaned the whole kitchen.", "My neighbour gave me a small plant."),
    "de": ("Am Montag war ich auf dem Markt.", "Das Wetter war kalt und windig.",
           "Meine Schwester hat mich am Abend angerufen.", "Ich habe frisches Brot und Äpfel gekauft.",
           "Nach dem Essen sind wir am Fluss spazieren gegangen.", "Der Zug zur Arbeit hatte wieder Verspätung.",
           "Am Freitag habe ich die ganze Küche geputzt.", "Mein Nachbar hat mir eine kleine Pflanze geschenkt."),
    "fr": ("Lundi je suis allé au marché.", "Il faisait froid et il y avait du vent.",
           "Ma sœur m'a appelé le soir.", "J'ai acheté du pain frais et des pommes.",
           "Après le dîner nous avons marché le long de la rivière.", "Le train pour le travail était encore en retard.",
           "Vendredi j'ai nettoyé toute la cuisine.", "Mon voisin m'a donné une petite plante."),
    "es": ("El lunes fui al mercado.", "El tiempo estaba frío y con viento.",
           "Mi hermana me llamó por la noche.", "Compré pan fresco y unas manzanas.",
           "Después de cenar paseamos junto al río.", "El tren al trabajo llegó tarde otra vez.",
           "El viernes limpié toda la cocina.", "Mi vecino me regaló una planta pequeña."),
    "zh": ("星期一我去了市场。", "天气又冷又有风。", "我姐姐晚上给我打了电话。", "我买了新鲜的面包和苹果。",
           "晚饭后我们在河边散步。", "去上班的火车又晚点了。", "星期五我打扫了整个厨房。", "我的邻居送给我一盆小植物。"),
}
THANKS_FOR_STORY = {
    "en": "Thank you for telling me about your week.",
    "de": "Danke, dass du mir von deiner Woche erzählst.",
    "fr": "Merci de me raconter ta semaine.",
    "es": "Gracias por contarme tu semana.",
    "zh": "谢谢你告诉我你这周的事。",
}
# The reply to a user's own turn (user data), whose content templates cannot answer.
GENERIC_REPLY = {
    "en": "Thank you for your message. I am happy to help you with that.",
    "de": "Danke für deine Nachricht. Ich helfe dir gern dabei.",
    "fr": "Merci pour ton message. Je suis heureux de t'aider avec ça.",
    "es": "Gracias por tu mensaje. Con gusto te ayudo con eso.",
    "zh": "谢谢你的消息。我很乐意帮你。",
}
# Required keywords are numbers: they count as no language, so any reply can carry them.
KEYWORD_SENTENCE = {
    "en": "My number is {kw}.",
    "de": "Meine Zahl ist {kw}.",
    "fr": "Mon numéro est {kw}.",
    "es": "Mi número es {kw}.",
    "zh": "我的数字是 {kw} 。",  # spaces: a keyword must stand as a whole word
}
FORBIDDEN_WORDS = ("really", "very", "maybe", "honestly", "basically", "literally")
# Endings a Latin-script reply can carry (a lone "Over." takes the language of the sentence
# before it); with Chinese turns only symbols, which count as no language.
LATIN_ENDINGS = ("Over.", "Bye.", "###", "~~")
SYMBOL_ENDINGS = ("###", "~~")

BUILTIN_PERSONAS: tuple[dict, ...] = (
    {"name": "Mia Schulz", "age": 34, "city": "Hamburg", "job": "nurse"},
    {"name": "Lucas Martin", "age": 41, "city": "Lyon", "job": "baker"},
    {"name": "Sofia Garcia", "age": 28, "city": "Sevilla", "job": "teacher"},
    {"name": "Tom Baker", "age": 52, "city": "Leeds", "job": "pilot"},
    {"name": "Lena Vogel", "age": 23, "city": "Graz", "job": "student"},
    {"name": "Wei Chen", "age": 37, "city": "Chengdu", "job": "engineer"},
)


# ---------------------------------------------------------------------------------- personas


@dataclass
class Persona:
    """A persona card plus what the templates need from it."""

    card: Any  # rewards.persona.PersonaCard
    text: str  # the card as text, for the system turn and the `persona` column
    where: str = "built-in persona"

    @property
    def facts(self) -> dict[str, str]:
        facts = dict(self.card.facts)
        if self.card.name:
            facts["name"] = self.card.name
        return facts


def _quote(value: str) -> str:
    # Values with separators need quotes in the card text (rewards.persona's format).
    return f'"{value}"' if re.search(r'[;,|=\n:"]', value) else value


def persona_card_text(card: Any) -> str:
    """A `rewards.persona.PersonaCard` in the text format ``Name: ...; Age: ...; Style: ...``."""
    items = []
    if card.name:
        items.append(f"Name: {_quote(card.name)}")
    for key, value in card.facts.items():
        items.append(f"{key.replace('_', ' ').capitalize()}: {_quote(str(value))}")
    style = []
    if card.greeting:
        style.append(f"greeting={_quote(card.greeting)}")
    if card.sign_off:
        style.append(f"sign_off={_quote(card.sign_off)}")
    if card.required:
        style.append("required=" + "|".join(_quote(p) for p in card.required))
    if card.forbidden:
        style.append("forbidden=" + "|".join(_quote(p) for p in card.forbidden))
    if card.formality:
        style.append(f"formality={card.formality}")
    if card.emoji:
        style.append(f"emoji={card.emoji}")
    if style:
        items.append("Style: " + ", ".join(style))
    if card.allow_ai:
        items.append("Allow ai: true")
    return "; ".join(items)


def make_persona(value: Any, where: str = "persona") -> Persona:
    """A `Persona` from a card (dict, JSON text or ``Key: value; ...`` text); it needs a name."""
    from rewards.persona import parse_persona

    from posttrain.errors import RewardError

    try:
        card = parse_persona(value, where=where)
    except RewardError as e:
        raise DataError(str(e)) from None
    if card is None or not card.name:
        raise DataError(f"{where}: a persona needs a name, e.g. 'Name: Mia Schulz; Age: 34; City: Hamburg'")
    return Persona(card=card, text=persona_card_text(card), where=where)


def _builtin_persona(spec: dict, rng: random.Random) -> Persona:
    style = {"emoji": "never", "formality": rng.choice(("formal", "informal")),
             "forbidden": [rng.choice(FORBIDDEN_WORDS)]}
    facts = {k: v for k, v in spec.items() if k != "name"}
    return make_persona({"name": spec["name"], "facts": facts, "style": style}, "built-in persona")


# ---------------------------------------------------------------------------------- user data


@dataclass
class UserConversation:
    """User turns from a user's jsonl line: (text, language) pairs."""

    turns: list[tuple[str, str]] = field(default_factory=list)
    where: str = ""


def _check_language(code: Any, what: str) -> str:
    if not isinstance(code, str) or code.strip().lower() not in SUPPORTED_LANGUAGES:
        raise DataError(f"{what}: unknown language code {code!r}; supported: {', '.join(SUPPORTED_LANGUAGES)}")
    return code.strip().lower()


def _identify_language(text: str, where: str) -> str:
    from rewards.language import identify_segments, language_shares

    segs = identify_segments(text, SUPPORTED_LANGUAGES)
    if not segs:
        raise DataError(f"{where}: the user turn has no words; give it text or remove it")
    shares = language_shares(segs)
    main = max(shares, key=shares.get)
    if main not in SUPPORTED_LANGUAGES:
        raise DataError(f"{where}: the user turn looks like {main!r}, which the templates do not speak; "
                        f"add a 'language' field ({', '.join(SUPPORTED_LANGUAGES)})")
    return main


def read_user_data(rows: Sequence[dict], source: str = "user data") -> tuple[list[Persona], list[UserConversation]]:
    """Personas and user conversations from user rows (see the module docstring).

    A row with a ``messages`` list and no user turn, a bad persona, an unknown ``language`` or a
    row with neither persona nor turns is a `DataError` naming the line.
    """
    personas, conversations = [], []
    for i, row in enumerate(rows):
        where = f"{source}, line {row.get('_line', i + 1)}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object")
        used = False
        if row.get("persona") is not None:
            personas.append(make_persona(row["persona"], f"{where}, field 'persona'"))
            used = True
        row_language = row.get("language")
        if row_language is not None:
            row_language = _check_language(row_language, f"{where}, field 'language'")
        for key in ("messages", "turns"):
            if row.get(key) is None:
                continue
            value = row[key]
            if not isinstance(value, list):
                raise DataError(f"{where}: field {key!r} must be a list, got {type(value).__name__}")
            conv = UserConversation(where=where)
            for k, item in enumerate(value):
                turn_where = f"{where}, {key}[{k}]"
                if isinstance(item, str):
                    message = {"role": "user", "content": item}
                elif isinstance(item, dict):
                    message = item
                else:
                    raise DataError(f"{turn_where}: expected a message {{'role', 'content'}} or a string")
                if message.get("role") != "user":
                    continue  # assistant turns are rewritten from templates, system turns replaced
                content = message.get("content")
                if not isinstance(content, str) or not content.strip():
                    raise DataError(f"{turn_where}: a user turn needs non-empty text in 'content'")
                language = message.get("language")
                if language is not None:
                    language = _check_language(language, f"{turn_where}, field 'language'")
                else:
                    language = row_language or _identify_language(content, turn_where)
                conv.turns.append((content.strip(), language))
            if not conv.turns:
                raise DataError(f"{where}: the conversation in {key!r} has no user turn "
                                "(no message with role 'user'); add one or remove the line")
            conversations.append(conv)
            used = True
        if not used:
            fields = ", ".join(sorted(k for k in row if not k.startswith("_"))) or "none"
            raise DataError(f"{where}: nothing to use (fields: {fields}); give 'persona' and/or "
                            "'messages' (list of {role, content}) or 'turns' (list of strings)")
    return personas, conversations


# ---------------------------------------------------------------------------------- generation


def _check_languages(languages: Sequence[str]) -> list[str]:
    if isinstance(languages, str):
        languages = [c for c in re.split(r"[,\s]+", languages) if c]
    out = [_check_language(code, "languages") for code in languages]
    if not out:
        raise UserError(f"languages: give at least one of {', '.join(SUPPORTED_LANGUAGES)}")
    return list(dict.fromkeys(out))


def _kinds_for(persona: Persona, language: str) -> list[str]:
    facts = persona.facts
    return [kind for kind, by_lang in QUESTIONS.items()
            if language in by_lang and (_NEEDS[kind] is None or facts.get(_NEEDS[kind]))]


def _answer(kind: str, language: str, persona: Persona) -> str:
    facts = persona.facts
    job = str(facts.get("job", ""))
    return QUESTIONS[kind][language][1].format(
        name=facts.get("name", ""), age=facts.get("age", ""), city=facts.get("city", ""), job=job,
        article="an" if job[:1].lower() in "aeiou" else "a",
    )


@dataclass
class _Turn:
    language: str
    question: str = ""  # template question kind, or "" for a user's own turn
    user_text: str = ""  # a user's own turn
    story: list[str] = field(default_factory=list)


def _user_message(turn: _Turn, rules: str | None) -> str:
    parts = []
    if rules:
        parts.append(f"{HELLO[turn.language]} {rules}")
    if turn.story:
        parts.append(" ".join([STORY_INTRO[turn.language]] + turn.story))
    if turn.user_text:
        parts.append(f"{turn.user_text} {CUE[turn.language]}")
    else:
        parts.append(f"{QUESTIONS[turn.question][turn.language][0]} {CUE[turn.language]}")
    return "\n".join(parts)


def _join(language: str, sentences: list[str]) -> str:
    return ("" if language == "zh" else " ").join(s for s in sentences if s)


def _reply(turn: _Turn, persona: Persona, constraints: dict[str, str]) -> str:
    """A template reply to ``turn`` that keeps the persona and every constraint."""
    lang = turn.language
    card = persona.card
    sentences = []
    if turn.story:
        sentences.append(THANKS_FOR_STORY[lang])
    sentences.append(GENERIC_REPLY[lang] if turn.user_text else _answer(turn.question, lang, persona))
    if "required_keywords" in constraints:
        sentences.append(KEYWORD_SENTENCE[lang].format(kw=constraints["required_keywords"]))
    for phrase in card.required:  # a user persona's catchphrases
        sentences.append(phrase if phrase.rstrip()[-1:] in ".!?。！？" else phrase + ".")
    text = _join(lang, sentences)
    if card.greeting:
        text = f"{card.greeting} {text}"
    if card.emoji == "always":
        text += " 🙂"
    if card.sign_off:
        text += f"\n{card.sign_off}"
    if "ends_with" in constraints:
        text += " " + constraints["ends_with"]
    if "all_lowercase" in constraints:
        text = text.lower()
    return text


def _choose_constraints(rng: random.Random, kinds: Sequence[str], count: int, languages_used: set[str],
                        persona: Persona) -> dict[str, str]:
    """Constraint type -> value (max_words is filled in once the replies exist)."""
    usable = [k for k in kinds if not (k == "all_lowercase" and "zh" in languages_used)]
    chosen = rng.sample(usable, min(count, len(usable)))
    out: dict[str, str] = {}
    for kind in chosen:
        if kind == "required_keywords":
            out[kind] = str(rng.randint(10, 99))
        elif kind == "forbidden_keywords":
            out[kind] = rng.choice([w for w in FORBIDDEN_WORDS if w not in persona.card.required] or FORBIDDEN_WORDS)
        elif kind == "ends_with":
            latin_only = "zh" not in languages_used
            out[kind] = rng.choice(LATIN_ENDINGS if latin_only else SYMBOL_ENDINGS)
        else:
            out[kind] = ""
    return out


def _constraint_list(values: dict[str, str]) -> list[dict]:
    # A fixed order keeps rows comparable; values are strings (one Arrow type, see above).
    return [{"type": kind, "value": values[kind] or None} for kind in CONVERSATION_CONSTRAINTS if kind in values]


def _verify(reply: str, persona: Persona, constraints: list[dict], language: str, where: str) -> None:
    """A template reply must pass the rewards it teaches; fail loudly when a user persona's style
    markers or facts make that impossible."""
    from rewards.instruction_following import check_constraint
    from rewards.language import language_score
    from rewards.persona import persona_score

    problems = [f"constraint {c['type']}" for c in constraints if not check_constraint(c, reply)]
    if persona_score(persona.card, reply) < 1.0:
        problems.append("persona")
    score = language_score(reply, [language])
    if score is None or score < 1.0:
        problems.append(f"language {language}")
    if problems:
        hint = ("the persona's style markers (greeting, sign_off, required, forbidden) must fit "
                "every template reply" if persona.where != "built-in persona" else "this is a bug in the templates")
        raise DataError(f"{where}: the template reply {reply!r} fails {', '.join(problems)} "
                        f"({persona.where}); {hint}")


def make_conversations(
    n: int,
    turns: int = 3,
    seed: int = 0,
    languages: Sequence[str] = SUPPORTED_LANGUAGES,
    long_context_chars: int | None = None,
    personas: Sequence[Any] | None = None,
    user_conversations: Sequence[UserConversation] | None = None,
    constraint_types: Sequence[str] = CONVERSATION_CONSTRAINTS,
    min_constraints: int = 1,
    max_constraints: int = 3,
    switch_probability: float = 0.5,
    verify: bool = True,
) -> list[dict]:
    """``n`` conversations of ``turns`` user turns each (see the module docstring for columns).

    Args:
        languages: the languages template turns are drawn from (en, de, fr, es, zh).
        long_context_chars: pad the turns before the last with story filler until the prompt
            holds at least this many characters (the last turn keeps only question and cue).
        personas: persona cards (dicts, card text, or `Persona`); default: built-in ones.
        user_conversations: user turns (from `read_user_data`) to use before the final turn.
        constraint_types: the kinds to draw from; each conversation gets between
            ``min_constraints`` and ``max_constraints`` of them.
        switch_probability: chance that a user turn is in another language than the one before.
        verify: check every template reply against the rewards (cheap; catches a user persona
            whose style markers no template can satisfy).

    Conversation ``i`` depends only on (seed, i), so the first rows do not change with ``n``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise UserError(f"n must be a non-negative integer, got {n!r}")
    if isinstance(turns, bool) or not isinstance(turns, int) or turns < 1:
        raise UserError(f"turns must be at least 1 (user turns per conversation), got {turns!r}")
    if long_context_chars is not None and (not isinstance(long_context_chars, int) or long_context_chars < 0):
        raise UserError(f"long_context_chars must be a non-negative integer, got {long_context_chars!r}")
    if not 0 <= switch_probability <= 1:
        raise UserError(f"switch_probability must be in [0, 1], got {switch_probability!r}")
    if not 0 <= min_constraints <= max_constraints:
        raise UserError(f"need 0 <= min_constraints <= max_constraints, got {min_constraints}, {max_constraints}")
    languages = _check_languages(languages)
    kinds = list(dict.fromkeys(constraint_types))
    for kind in kinds:
        if kind not in CONVERSATION_CONSTRAINTS:
            raise UserError(f"constraint type {kind!r} is not one the conversation templates can obey; "
                            f"use {', '.join(CONVERSATION_CONSTRAINTS)}")
    cards = [p if isinstance(p, Persona) else make_persona(p, f"personas[{k}]") for k, p in enumerate(personas or [])]
    user_conversations = list(user_conversations or [])

    rows = []
    for i in range(n):
        rng = random.Random(f"conversations-{seed}-{i}")
        persona = rng.choice(cards) if cards else _builtin_persona(rng.choice(BUILTIN_PERSONAS), rng)
        plan = _plan_turns(rng, persona, turns, languages, user_conversations, switch_probability)
        count = rng.randint(min_constraints, max_constraints)
        values = _choose_constraints(rng, kinds, count, {t.language for t in plan}, persona)
        messages, replies = _fit(rng, plan, persona, values, long_context_chars)
        constraints = _constraint_list(values)
        if verify:
            for k, (turn, reply) in enumerate(zip(plan, replies)):
                _verify(reply, persona, constraints, turn.language, f"conversation {i}, assistant turn {k + 1}")
        rows.append({
            "id": f"conv-{seed}-{i:06d}",
            "prompt": messages,
            "persona": persona.text,
            "language": plan[-1].language,
            "constraints": constraints,
            "turn_languages": [t.language for t in plan],
            "num_turns": len(plan),
            "context_chars": _chars(messages),
            "reference": replies[-1],
        })
    return rows


def _plan_turns(rng: random.Random, persona: Persona, turns: int, languages: list[str],
                user_conversations: list[UserConversation], switch_probability: float) -> list[_Turn]:
    """The user turns: a user's own turns first (if any), then template questions; the language
    switches with ``switch_probability`` per turn, and template turns stay within ``languages``."""
    own = rng.choice(user_conversations).turns[: turns - 1] if user_conversations else []
    plan = [_Turn(language=lang, user_text=text) for text, lang in own]
    while len(plan) < turns:
        last = plan[-1].language if plan else None
        if last in languages and (len(languages) == 1 or rng.random() >= switch_probability):
            language = last
        else:
            language = rng.choice([c for c in languages if c != last] or languages)
        plan.append(_Turn(language=language))
    previous = None
    for turn in plan:
        if turn.user_text:
            continue
        options = _kinds_for(persona, turn.language)
        if len(options) > 1 and previous in options:
            options = [k for k in options if k != previous]  # do not ask the same thing twice in a row
        turn.question = previous = rng.choice(options)
    return plan


def _chars(messages: list[dict]) -> int:
    return sum(len(m["content"]) for m in messages)


def _render(plan: list[_Turn], persona: Persona, values: dict[str, str]) -> tuple[list[dict], list[str]]:
    """(prompt messages, every assistant reply including the final reference)."""
    from rewards.instruction_following import describe_constraint

    listed = _constraint_list(values)
    rules = " ".join([RULES_HEADER] + [describe_constraint(c) for c in listed]) if listed else None
    replies = [_reply(t, persona, values) for t in plan]
    messages = [{"role": "system", "content": f"You are {persona.card.name}. Stay in character and "
                 f"follow the user's rules in every reply.\n{persona.text}"}]
    for k, turn in enumerate(plan):
        messages.append({"role": "user", "content": _user_message(turn, rules if k == 0 else None)})
        if k < len(plan) - 1:
            messages.append({"role": "assistant", "content": replies[k]})
    return messages, replies


def _fit(rng: random.Random, plan: list[_Turn], persona: Persona, values: dict[str, str],
         long_context_chars: int | None) -> tuple[list[dict], list[str]]:
    """Add story filler until the prompt reaches ``long_context_chars``, and set the word limit
    to fit the longest reply; returns the rendered conversation."""
    from rewards.instruction_following import count_words

    # Filler goes into the turns before the last, round-robin (a one-turn conversation carries
    # its own); the last turn keeps only its question and cue, so its cue stays in plain view.
    fillable = plan[:-1] or plan
    k = 0
    while True:
        if "max_words" in values:
            values["max_words"] = "99"  # a stand-in of the usual width while measuring
        messages, replies = _render(plan, persona, values)
        missing = (long_context_chars or 0) - _chars(messages)
        # Add roughly what is missing, then measure again (rendering per sentence is quadratic).
        while missing > 0:
            turn = fillable[k % len(fillable)]
            sentence = rng.choice(STORY_SENTENCES[turn.language])
            if not turn.story:
                missing -= len(STORY_INTRO[turn.language]) + 2
            turn.story.append(sentence)
            missing -= len(sentence) + 1
            k += 1
        if "max_words" in values:
            longest = max(count_words(r) for r in _render(plan, persona, values)[1])
            values["max_words"] = str(5 * -(-longest // 5) + rng.choice((0, 5, 10)))
        messages, replies = _render(plan, persona, values)
        if _chars(messages) >= (long_context_chars or 0):
            return messages, replies


