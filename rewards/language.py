"""Reply-language reward: the reply is in the required language, or mixes the requested ones.

How a reply is read: it is split into sentences, and each sentence into runs of one script
(Latin, Han, Cyrillic, Hangul, ...), so "这个project很重要" gives three segments. A segment's
script narrows its possible languages (Hangul -> ko, Han with kana -> ja, Han -> zh, Greek ->
el); where a script is shared (Latin, Cyrillic, Arabic, ...) the packaged language-identification
model of ``py3langid`` (langid.py's model, shipped inside the package: no download) picks the
most likely language among the candidate languages of that script. Segments shorter than
``min_words`` words are too short to identify and take the language of the nearest identified
segment of the same script (or, when the reply has none, of all its runs of that script read
together), except that a short insert in another script inside an identified reply
("这个project很重要") takes the required language of its script when there is exactly one.
Each segment weighs its number of words (one per character for Han and kana).
"""

from __future__ import annotations

import functools
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from posttrain.errors import RewardError
from rewards import as_text, column

# English names, for error messages and for instruction text a conversation generator writes.
LANGUAGE_NAMES = {
    "ar": "Arabic",
    "bg": "Bulgarian",
    "bn": "Bengali",
    "ca": "Catalan",
    "cs": "Czech",
    "da": "Danish",
    "de": "German",
    "el": "Greek",
    "en": "English",
    "es": "Spanish",
    "et": "Estonian",
    "fa": "Persian",
    "fi": "Finnish",
    "fr": "French",
    "he": "Hebrew",
    "hi": "Hindi",
    "hr": "Croatian",
    "hu": "Hungarian",
    "id": "Indonesian",
    "it": "Italian",
    "ja": "Japanese",
    "ko": "Korean",
    "lt": "Lithuanian",
    "lv": "Latvian",
    "ms": "Malay",
    "nl": "Dutch",
    "no": "Norwegian",
    "pl": "Polish",
    "pt": "Portuguese",
    "ro": "Romanian",
    "ru": "Russian",
    "sk": "Slovak",
    "sl": "Slovenian",
    "sr": "Serbian",
    "sv": "Swedish",
    "sw": "Swahili",
    "ta": "Tamil",
    "th": "Thai",
    "tl": "Tagalog",
    "tr": "Turkish",
    "uk": "Ukrainian",
    "ur": "Urdu",
    "vi": "Vietnamese",
    "zh": "Chinese",
}
_NAME_ALIASES = {"mandarin": "zh", "cantonese": "zh", "farsi": "fa", "filipino": "tl"}

# Languages a segment is identified among by default (plus every language the sample asks for).
# A short list keeps langid accurate on short sentences; bind `candidates` to widen it.
DEFAULT_CANDIDATES = (
    "en",
    "zh",
    "de",
    "fr",
    "es",
    "it",
    "pt",
    "nl",
    "ru",
    "ja",
    "ko",
    "ar",
    "hi",
    "pl",
    "tr",
    "vi",
    "id",
    "sv",
    "uk",
    "el",
    "he",
    "th",
    "cs",
    "da",
    "fi",
    "no",
    "hu",
    "ro",
)

# Scripts other than Latin, with the (ISO 639-1) languages written in them; every other
# supported language is Latin-script. Serbian is written in both.
_SCRIPT_LANGUAGES = {
    "Han": ("zh", "ja"),
    "Hangul": ("ko",),
    "Greek": ("el",),
    "Hebrew": ("he",),
    "Cyrillic": ("ru", "uk", "bg", "be", "mk", "sr", "kk", "ky", "mn", "tg", "tt", "ba"),
    "Arabic": ("ar", "fa", "ur", "ps", "ug"),
    "Devanagari": ("hi", "mr", "ne", "sa"),
    "Bengali": ("bn", "as"),
    "Thai": ("th",),
    "Georgian": ("ka",),
    "Armenian": ("hy",),
    "Tamil": ("ta",),
    "Telugu": ("te",),
    "Kannada": ("kn",),
    "Malayalam": ("ml",),
    "Gujarati": ("gu",),
    "Gurmukhi": ("pa",),
    "Sinhala": ("si",),
    "Khmer": ("km",),
    "Lao": ("lo",),
    "Ethiopic": ("am",),
    "Tibetan": ("dz",),
    "Myanmar": ("my",),
    "Oriya": ("or",),
}
# Scripts written without spaces: each character counts as a word (Han, kana), or a few do.
_CHARS_PER_WORD = {"Han": 1, "Thai": 4, "Lao": 4, "Khmer": 4, "Myanmar": 4, "Tibetan": 4}

_SENTENCE_SPLIT = re.compile(r"(?<=[.!?;…])\s+|(?<=[。！？；])|\n+")


@functools.lru_cache(maxsize=1)
def _identifier():
    """The packaged langid model, loaded once per process (about a second)."""
    from py3langid.langid import MODEL_FILE, LanguageIdentifier

    return LanguageIdentifier.from_model_file(MODEL_FILE)


@functools.lru_cache(maxsize=1)
def supported_languages() -> tuple[str, ...]:
    """The ISO 639-1 codes this reward can require (those the packaged model knows)."""
    return tuple(sorted(code for code in _identifier().labels if len(code) == 2))


def normalize_language_code(code: Any) -> str:
    """``code`` as a supported ISO 639-1 code: "de", "DE", "de-AT", "zh_Hans", "German" all work.

    Raises RewardError listing the supported codes for anything else.
    """
    if isinstance(code, str):
        text = code.strip().lower()
        primary = re.split(r"[-_]", text)[0]
        if primary in supported_languages():
            return primary
        by_name = {name.lower(): c for c, name in LANGUAGE_NAMES.items()} | _NAME_ALIASES
        if text in by_name:
            return by_name[text]
    raise RewardError(
        f"unknown language code {code!r}; use an ISO 639-1 code, one of: "
        + ", ".join(supported_languages())
    )


def language_codes(value: Any) -> list[str]:
    """A column value holding one code, a list of codes or "en,zh" as normalised codes."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [v for v in re.split(r"[,;/\s]+", value) if v]
    elif not isinstance(value, (list, tuple)):
        value = [value]
    return list(dict.fromkeys(normalize_language_code(v) for v in value))


@functools.lru_cache(maxsize=4096)
def _script(ch: str) -> str | None:
    """The script of a letter ("Latin", "Han", "Cyrillic", ...); None for non-letters."""
    if not ch.isalpha():
        return None
    if ord(ch) < 0x250 or 0x1E00 <= ord(ch) < 0x1F00:
        return "Latin"
    words = unicodedata.name(ch, "UNKNOWN").split()
    first = words[1] if words[0] in ("HALFWIDTH", "FULLWIDTH") and len(words) > 1 else words[0]
    if first in ("CJK", "IDEOGRAPHIC"):
        return "Han"
    if first.startswith(("HIRAGANA", "KATAKANA")):
        return "Kana"
    return first.title()


def _script_group(script: str) -> str:
    return "Han" if script == "Kana" else script  # Japanese mixes kanji and kana in one run


def languages_of_script(script: str) -> tuple[str, ...]:
    """The supported languages written in ``script``."""
    if script == "Latin":
        other = {c for langs in _SCRIPT_LANGUAGES.values() for c in langs} - {"sr"}
        return tuple(c for c in supported_languages() if c not in other)
    return tuple(c for c in _SCRIPT_LANGUAGES.get(script, ()) if c in supported_languages())


@dataclass
class Segment:
    """A one-script piece of a sentence and the language it was identified as."""

    text: str
    script: str
    weight: float
    has_kana: bool = False
    language: str | None = None


def _script_runs(sentence: str) -> Iterable[tuple[str, str, bool]]:
    """(text, script group, contains kana) for each maximal run of one script."""
    runs: list[list] = []  # [script, chars, has_kana]
    for ch in sentence:
        script = _script(ch)
        if script is None:
            if runs:
                runs[-1][1].append(ch)
            continue
        group = _script_group(script)
        if runs and runs[-1][0] == group:
            runs[-1][1].append(ch)
            runs[-1][2] |= script == "Kana"
        else:
            runs.append([group, [ch], script == "Kana"])
    for group, chars, kana in runs:
        yield "".join(chars).strip(), group, kana


def _weight(text: str, script: str) -> float:
    per_word = _CHARS_PER_WORD.get(script)
    if per_word is None:
        return float(sum(1 for w in text.split() if any(c.isalpha() for c in w)))
    letters = sum(1 for c in text if c.isalpha())
    return max(1.0, letters / per_word)


def segments(text: str) -> list[Segment]:
    """The reply's one-script segments, sentence by sentence, not yet identified."""
    out = []
    for sentence in _SENTENCE_SPLIT.split(text):
        for run, script, kana in _script_runs(sentence):
            if run:
                out.append(Segment(run, script, _weight(run, script), kana))
    return out


def _identify(text: str, script: str, has_kana: bool, candidates: Sequence[str]) -> str:
    if script == "Han":
        return "ja" if has_kana else "zh"
    possible = languages_of_script(script)
    choices = [c for c in candidates if c in possible]
    if not choices:
        return possible[0] if possible else script.lower()
    if len(choices) == 1:
        return choices[0]
    for code, _ in _identifier().rank(text):
        if code in choices:
            return code
    return choices[0]


def identify_segments(
    text: str,
    candidates: Iterable[str] = DEFAULT_CANDIDATES,
    min_words: int = 3,
    prefer: Iterable[str] = (),
) -> list[Segment]:
    """The reply's segments, each labelled with its language (see the module docstring).

    A short insert in another script ("这个project很重要") cannot be identified from its own
    few letters; when exactly one ``prefer`` language fits its script, it gets that language.
    """
    candidates = list(dict.fromkeys(candidates))
    prefer = list(prefer)
    segs = segments(text)
    long_enough = [s.weight >= min_words or s.script == "Han" for s in segs]
    for seg, ok in zip(segs, long_enough, strict=True):
        if ok:
            seg.language = _identify(seg.text, seg.script, seg.has_kana, candidates)
    for i, seg in enumerate(segs):
        if seg.language is not None:
            continue
        # nearest identified segment of the same script, looking back first
        order = list(range(i - 1, -1, -1)) + list(range(i + 1, len(segs)))
        near = next(
            (segs[j] for j in order if long_enough[j] and segs[j].script == seg.script), None
        )
        inserts = [c for c in prefer if c in languages_of_script(seg.script)]
        if near is not None:
            seg.language = near.language
        elif any(long_enough) and len(inserts) == 1:
            seg.language = inserts[0]
        else:
            together = " ".join(s.text for s in segs if s.script == seg.script)
            seg.language = _identify(together, seg.script, seg.has_kana, candidates)
    return segs


def language_shares(segs: Sequence[Segment]) -> dict[str, float]:
    """Language -> fraction of the words of ``segs`` in that language."""
    total = sum(s.weight for s in segs)
    shares: dict[str, float] = {}
    for s in segs:
        shares[s.language] = shares.get(s.language, 0.0) + s.weight / total
    return shares


def language_score(
    text: str,
    allowed: Iterable[str],
    required: Iterable[str] | None = None,
    *,
    candidates: Iterable[str] = DEFAULT_CANDIDATES,
    min_words: int = 3,
) -> float | None:
    """Fraction of ``text`` (by words) in an ``allowed`` language, times the fraction of
    ``required`` languages (default: all allowed ones) that appear in it at all; None when the
    text has no words. Codes must already be normalised."""
    allowed = list(allowed)
    required = allowed if required is None else list(required)
    segs = identify_segments(text, list(candidates) + allowed + required, min_words, allowed)
    if not segs:
        return None
    in_allowed = sum(s.weight for s in segs if s.language in allowed) / sum(s.weight for s in segs)
    present = {s.language for s in segs}
    coverage = sum(1 for code in required if code in present) / max(1, len(required))
    return in_allowed * coverage


def last_user_text(prompt: Any) -> str:
    """The last user message of a conversational prompt, or a plain prompt's text."""
    if isinstance(prompt, (list, tuple)):
        for message in reversed(prompt):
            if isinstance(message, dict) and message.get("role") == "user":
                return as_text(message)
        return ""
    return as_text(prompt)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "y")
    return bool(value)


def language(
    prompts: Sequence,
    completions: Sequence,
    *,
    candidates: Sequence[str] = DEFAULT_CANDIDATES,
    min_words: int = 3,
    code_switch_share: float = 0.1,
    **columns: Any,
) -> list[float | None]:
    """Reply in the required language(s): fraction of the reply's words in them, in [0, 1].

    What is required, per sample (columns optional):
    - ``languages`` (list or "zh,en"): code-switching; the score is the fraction of the reply in
      any listed language times the fraction of listed languages that appear at all;
    - ``language`` (ISO 639-1 code, e.g. "de"): the fraction of the reply in that language;
    - ``follow_user_language`` true, or neither column given: the language of the last user
      message in the prompt. Its main language must be used; any other language making up at
      least ``code_switch_share`` of the user's words is allowed too (the user code-switches).
      ``follow_user_language`` false with no language given means no requirement: None.
    None also for a reply (or, when following the user, a user message) with no words.
    An unknown language code raises RewardError naming the sample.
    """
    n = len(completions)
    prompts = list(prompts) if prompts is not None else [None] * n
    try:
        candidates = [normalize_language_code(c) for c in candidates]
    except RewardError as e:
        raise RewardError(f"language reward, parameter 'candidates': {e}") from None
    wanted_one = column(columns, "language", n)
    wanted_many = column(columns, "languages", n)
    follow = column(columns, "follow_user_language", n)
    scores: list[float | None] = []
    for i in range(n):
        try:
            allowed = language_codes(wanted_many[i]) + language_codes(wanted_one[i])
        except RewardError as e:
            raise RewardError(
                f"language reward, sample {i}, column 'language'/'languages': {e}"
            ) from None
        required = list(allowed)
        follow_user = _truthy(follow[i]) if follow[i] is not None else not allowed
        if follow_user:
            user = identify_segments(last_user_text(prompts[i]), candidates, min_words)
            if not user:
                scores.append(None)
                continue
            shares = language_shares(user)
            main = max(shares, key=shares.get)
            required = [main]
            allowed = [code for code, share in shares.items() if share >= code_switch_share]
        if not allowed:
            scores.append(None)
            continue
        scores.append(
            language_score(
                as_text(completions[i]),
                allowed,
                required,
                candidates=candidates,
                min_words=min_words,
            )
        )
    return scores
