"""Text normalisation for WER/CER, following the Seed-TTS-eval protocol.

English: Whisper's ``EnglishTextNormalizer`` (spellings, contractions, spoken numbers ->
digits), then punctuation stripped and lower case. Other languages: Whisper's
``BasicTextNormalizer``. Then every digit is split off as its own token, on both sides: the
English normaliser turns "eight two four" into "824" but "8, 2, 4" into "8 2 4", and turns
"eight two four, five five five" into one token "824555", so without the split a correctly
spoken phone number could count as one to six word errors depending on how it was written.
Chinese (and Japanese) text is compared by character (CER): whitespace removed, one token per
character.
"""

from __future__ import annotations

import functools
import re
import unicodedata

#: Languages scored by character error rate: no spaces between words.
CER_LANGUAGES = frozenset({"zh", "cmn", "yue", "ja", "zh-cn", "zh-tw"})


def base_language(language: str | None) -> str:
    """``"en-US"`` -> ``"en"``; ``None`` -> ``"en"``."""
    if not language:
        return "en"
    language = language.lower().replace("_", "-")
    return language if language in CER_LANGUAGES else language.split("-")[0]


def uses_cer(language: str | None) -> bool:
    return base_language(language) in CER_LANGUAGES


@functools.lru_cache(maxsize=None)
def _whisper_normalizer(english: bool):
    # Imported lazily: `whisper` pulls in torch.
    from whisper.normalizers import BasicTextNormalizer, EnglishTextNormalizer

    return EnglishTextNormalizer() if english else BasicTextNormalizer()


def _strip_punctuation(text: str) -> str:
    # Unicode punctuation and symbols (P*, S*) become spaces, so "well-known" cannot fuse into
    # one token; apostrophes stay, as in Seed-TTS-eval ("o'clock").
    return "".join(
        " " if unicodedata.category(c)[0] in "PS" and c != "'" else c for c in text
    )


_DIGIT = re.compile(r"(\d)")


def normalize_text(text: str, language: str | None = "en") -> str:
    """``text`` normalised for WER: space-separated tokens (characters for CER languages)."""
    lang = base_language(language)
    text = _whisper_normalizer(lang == "en")(text or "")
    text = _strip_punctuation(text).lower()
    text = _DIGIT.sub(r" \1 ", text)
    if lang in CER_LANGUAGES:
        return " ".join(c for c in text if not c.isspace())
    return " ".join(text.split())
