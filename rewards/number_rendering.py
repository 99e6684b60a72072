"""Number-rendering reward: numbers are written (or spoken) the way the reference writes them.

A number mention has a canonical value and a rendering style:

- plain numbers: "42", "3.5", "1,000", "-7", "3 million" (style ``digits``) and "forty-two",
  "three point five", "one thousand", "minus seven" (style ``words``), value = the number;
- ordinals: "3rd" (``digits``) and "third" (``words``), value = ("ordinal", 3);
- dates: "2024-03-03", "03/03/2024", "3.3.2024" (``numeric``), "March 3rd, 2024",
  "3 March 2024" (``digits``: month name, day and year in digits) and "the third of March,
  twenty twenty-four" (``words``), value = (year, month, day), missing parts None; slashed dates
  read month first unless the first part is over 12;
- quantities: a number with a unit, currency or percent sign: "5 km", "$5", "50%" (unit as
  symbol) or "five kilometres", "five dollars", "fifty percent" (unit as word); value =
  (number, canonical unit), style = number style + unit style ("digits+symbol",
  "words+word", ...). Units are not converted: "5 km" and "3.1 miles" differ;
- clock times: "10:30", "10:30 pm" (``digits`` only: spoken times are not parsed), value =
  ("time", hour, minute) on a 24-hour clock.

Number words are English; digits are read in any language.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from rewards import as_text, column

_UNITS = {
    "zero": 0,
    "one": 1,
    "two": 2,
    "three": 3,
    "four": 4,
    "five": 5,
    "six": 6,
    "seven": 7,
    "eight": 8,
    "nine": 9,
}
_TEENS = {
    "ten": 10,
    "eleven": 11,
    "twelve": 12,
    "thirteen": 13,
    "fourteen": 14,
    "fifteen": 15,
    "sixteen": 16,
    "seventeen": 17,
    "eighteen": 18,
    "nineteen": 19,
}
_TENS = {
    "twenty": 20,
    "thirty": 30,
    "forty": 40,
    "fourty": 40,
    "fifty": 50,
    "sixty": 60,
    "seventy": 70,
    "eighty": 80,
    "ninety": 90,
}
_SCALES = {"thousand": 10**3, "million": 10**6, "billion": 10**9, "trillion": 10**12}
_ORDINAL_TO_CARDINAL = {
    "first": "one",
    "second": "two",
    "third": "three",
    "fifth": "five",
    "eighth": "eight",
    "ninth": "nine",
    "twelfth": "twelve",
    **{
        w + "th": w
        for w in (
            "four",
            "six",
            "seven",
            "ten",
            "eleven",
            "thirteen",
            "fourteen",
            "fifteen",
            "sixteen",
            "seventeen",
            "eighteen",
            "nineteen",
            "hundred",
            "thousand",
            "million",
            "billion",
        )
    },
    **{w[:-1] + "ieth": w for w in _TENS if w != "fourty"},
}
_MONTHS = {
    "january": 1,
    "february": 2,
    "march": 3,
    "april": 4,
    "may": 5,
    "june": 6,
    "july": 7,
    "august": 8,
    "september": 9,
    "october": 10,
    "november": 11,
    "december": 12,
    "jan": 1,
    "feb": 2,
    "mar": 3,
    "apr": 4,
    "jun": 6,
    "jul": 7,
    "aug": 8,
    "sep": 9,
    "sept": 9,
    "oct": 10,
    "nov": 11,
    "dec": 12,
}
# canonical unit -> (symbols, words); symbols match case-sensitively, words case-insensitively
_UNIT_TABLE = {
    "km/h": (
        ("km/h", "kph", "kmh"),
        ("kilometres per hour", "kilometers per hour", "kilometre per hour", "kilometer per hour"),
    ),
    "mph": (("mph",), ("miles per hour", "mile per hour")),
    "km": (("km",), ("kilometres", "kilometers", "kilometre", "kilometer")),
    "cm": (("cm",), ("centimetres", "centimeters", "centimetre", "centimeter")),
    "mm": (("mm",), ("millimetres", "millimeters", "millimetre", "millimeter")),
    "m": (("m",), ("metres", "meters", "metre", "meter")),
    "mi": (("mi",), ("miles", "mile")),
    "ft": (("ft",), ("feet", "foot")),
    "in": ((), ("inches", "inch")),
    "kg": (("kg",), ("kilograms", "kilogram", "kilogrammes", "kilos", "kilo")),
    "g": (("g",), ("grams", "gram", "grammes")),
    "mg": (("mg",), ("milligrams", "milligram")),
    "lb": (("lb", "lbs"), ("pounds", "pound")),
    "l": (("l", "L"), ("litres", "liters", "litre", "liter")),
    "ml": (("ml", "mL"), ("millilitres", "milliliters", "millilitre", "milliliter")),
    "h": (("h", "hr", "hrs"), ("hours", "hour")),
    "min": (("min", "mins"), ("minutes", "minute")),
    "s": (("s", "sec", "secs"), ("seconds", "second")),
    "ms": (("ms",), ("milliseconds", "millisecond")),
    "°C": (("°C", "℃"), ("degrees celsius", "degree celsius", "degrees centigrade")),
    "°F": (("°F", "℉"), ("degrees fahrenheit", "degree fahrenheit")),
    "°": (("°",), ("degrees", "degree")),
    "%": (("%",), ("percent", "per cent", "percentage points")),
    "GB": (("GB",), ("gigabytes", "gigabyte")),
    "MB": (("MB",), ("megabytes", "megabyte")),
    "kWh": (("kWh",), ("kilowatt hours", "kilowatt-hours", "kilowatt hour")),
    "USD": (("$", "US$"), ("dollars", "dollar", "bucks")),
    "EUR": (("€",), ("euros", "euro")),
    "GBP": (("£",), ("pounds sterling",)),
    "JPY": (("¥",), ("yen",)),
}
_CURRENCY_PREFIX = {"$": "USD", "US$": "USD", "€": "EUR", "£": "GBP", "¥": "JPY"}

_CARDINAL_WORDS = set(_UNITS) | set(_TEENS) | set(_TENS) | set(_SCALES) | {"hundred"}
_WORD_NUMBER_WORDS = _CARDINAL_WORDS | set(_ORDINAL_TO_CARDINAL)

_DIGIT_NUMBER = re.compile(
    r"(?<![\w.,])(?P<sign>[-−])?(?P<int>\d{1,3}(?:,\d{3})+|\d+)(?P<frac>\.\d+)?"
    r"(?P<ord>st|nd|rd|th)?(?![\w])"
    r"(?:\s+(?P<scale>thousand|million|billion|trillion)\b)?",
    re.IGNORECASE,
)
_NUMERIC_DATE = re.compile(
    r"(?<![\w/.-])(?:(?P<y1>\d{4})[-/](?P<m1>\d{1,2})[-/](?P<d1>\d{1,2})"
    r"|(?P<a>\d{1,2})(?P<sep>[/.])(?P<b>\d{1,2})(?P=sep)(?P<y2>\d{4}))(?![\w/-]|\.\d)"
)
_CLOCK_TIME = re.compile(
    r"(?<![\w:.])(?P<h>\d{1,2}):(?P<m>\d{2})(?::\d{2})?(?:\s*(?P<ampm>[ap])\.?m\b\.?)?(?![\w:])",
    re.IGNORECASE,
)
_WORD_TOKEN = re.compile(r"[A-Za-z]+")


@dataclass
class Mention:
    """One number in a text: its canonical value, how it is rendered, where it is."""

    value: Any
    style: str
    start: int
    end: int
    text: str = ""


# --------------------------------------------------------------------------- number words


def _words_value(words: list[str]) -> tuple[Decimal, bool] | None:
    """The value of a well-formed English number-word sequence, and whether it is ordinal;
    None when the words are not one number ("five six", "twenty thirty")."""
    total, current = 0, 0
    last = last_scale = None  # kind of the previous word; the last scale word's value
    ordinal = False
    for w in words:
        if ordinal:
            return None  # an ordinal word ends a number
        if w in _ORDINAL_TO_CARDINAL:
            w, ordinal = _ORDINAL_TO_CARDINAL[w], True
        if w == "hundred":
            if last not in (None, "unit", "teen") or current >= 100:
                return None
            current = (current or 1) * 100
            last = "hundred"
        elif w in _SCALES:
            scale = _SCALES[w]
            if last == "scale" or (last_scale is not None and scale >= last_scale):
                return None
            total += (current or 1) * scale
            current, last, last_scale = 0, "scale", scale
        else:
            if w in _UNITS:
                v, kind, follows = _UNITS[w], "unit", (None, "ten", "hundred", "scale")
            elif w in _TEENS:
                v, kind, follows = _TEENS[w], "teen", (None, "hundred", "scale")
            elif w in _TENS:
                v, kind, follows = _TENS[w], "ten", (None, "hundred", "scale")
            else:
                return None
            if last not in follows or (w == "zero" and last):
                return None
            current += v
            last = kind
    return Decimal(total + current), ordinal


def _parse_word_numbers(text: str, taken: list[tuple[int, int]]) -> list[Mention]:
    """English number-word mentions outside the ``taken`` spans."""
    tokens = [(m.group().lower(), m.start(), m.end()) for m in _WORD_TOKEN.finditer(text)]
    words = [t[0] for t in tokens]

    def free(k: int) -> bool:
        return not any(tokens[k][1] < e and s < tokens[k][2] for s, e in taken)

    def gap(k: int) -> str:
        """The text between token k-1 and token k."""
        return text[tokens[k - 1][2] : tokens[k][1]]

    mentions: list[Mention] = []
    i = 0
    while i < len(tokens):
        w = words[i]
        nxt = words[i + 1] if i + 1 < len(tokens) else ""
        lead = 0  # "a hundred", "minus five": a word before the number that belongs to it
        if w == "a" and nxt in ("hundred", "thousand", "million", "billion"):
            lead = 1
        elif w in ("minus", "negative") and nxt in _WORD_NUMBER_WORDS:
            lead = 1
        elif w not in _WORD_NUMBER_WORDS:
            i += 1
            continue
        if w == "second" and not (
            (i > 0 and words[i - 1] in _MONTHS)
            or (nxt == "of" and i + 2 < len(tokens) and words[i + 2] in _MONTHS)
        ):
            i += 1  # "second" is mostly a unit of time; as an ordinal only in dates
            continue
        if w == "one" and nxt in ("of", "another"):
            i += 1  # a pronoun, not a count
            continue
        best = None
        seq: list[str] = []
        k = i + lead
        while k < len(tokens) and free(k):
            if (
                words[k] == "and"  # "one hundred and five"
                and seq
                and seq[-1] in ("hundred", *_SCALES)
                and k + 1 < len(tokens)
                and words[k + 1] in _WORD_NUMBER_WORDS
                and gap(k + 1).strip() == ""
            ):
                k += 1
            elif seq and gap(k).strip() not in ("", "-"):
                break
            if words[k] not in _WORD_NUMBER_WORDS:
                break
            parsed = _words_value(seq + [words[k]])
            if parsed is None:
                break
            seq.append(words[k])
            best = (k, parsed)
            k += 1
        if best is None:
            i += 1
            continue
        k, (value, ordinal) = best
        if not ordinal and k + 2 < len(tokens) and words[k + 1] == "point":
            digits, m = [], k + 2  # "three point one four"
            while m < len(tokens) and (words[m] in _UNITS or words[m] == "oh"):
                digits.append(str(_UNITS.get(words[m], 0)))
                m += 1
            if digits:
                value = Decimal(f"{int(value)}.{''.join(digits)}")
                k = m - 1
        if lead and w != "a":
            value = -value
        start, end = tokens[i][1], tokens[k][2]
        value = ("ordinal", int(value)) if ordinal else value
        mentions.append(Mention(value, "words", start, end, text[start:end]))
        i = k + 1
    return _merge_spoken_years(text, mentions)


def _merge_spoken_years(text: str, mentions: list[Mention]) -> list[Mention]:
    """ "twenty twenty-four" and "nineteen oh five" are years: merge the two halves."""
    out: list[Mention] = []
    for m in mentions:
        prev = out[-1] if out else None
        if (
            prev is not None
            and isinstance(prev.value, Decimal)
            and isinstance(m.value, Decimal)
            and prev.value in range(15, 21)
            and (
                (m.value in range(10, 100) and text[prev.end : m.start].strip() == "")
                or (m.value in range(1, 10) and text[prev.end : m.start].strip().lower() == "oh")
            )
        ):
            year = Decimal(int(prev.value) * 100 + int(m.value))
            out[-1] = Mention(year, "words", prev.start, m.end, text[prev.start : m.end])
        else:
            out.append(m)
    return out


def words_to_number(text: str) -> Decimal | None:
    """The value of ``text`` if it is one English number in words ("forty-two") or digits."""
    found = extract_numbers(text)
    if len(found) == 1 and isinstance(found[0].value, Decimal):
        return found[0].value
    return None


# --------------------------------------------------------------------------- extraction


def _digit_mentions(text: str, taken: list[tuple[int, int]]) -> list[Mention]:
    out = []
    for m in _DIGIT_NUMBER.finditer(text):
        if any(m.start() < e and s < m.end() for s, e in taken):
            continue
        try:
            value = Decimal(m.group("int").replace(",", "") + (m.group("frac") or ""))
        except InvalidOperation:
            continue
        if m.group("sign"):
            value = -value
        if m.group("ord"):
            if m.group("frac") or m.group("sign"):
                continue
            out.append(Mention(("ordinal", int(value)), "digits", m.start(), m.end(), m.group()))
            continue
        if m.group("scale"):
            value *= _SCALES[m.group("scale").lower()]
        out.append(Mention(value, "digits", m.start(), m.end(), m.group()))
    return out


def _numeric_dates(text: str) -> list[Mention]:
    out = []
    for m in _NUMERIC_DATE.finditer(text):
        if m.group("y1"):
            y, mo, d = int(m.group("y1")), int(m.group("m1")), int(m.group("d1"))
        else:
            a, b, y = int(m.group("a")), int(m.group("b")), int(m.group("y2"))
            if m.group("sep") == ".":
                d, mo = a, b  # 3.4.2024 is day.month.year
            else:
                mo, d = (b, a) if a > 12 else (a, b)
        if 1 <= mo <= 12 and 1 <= d <= 31:
            out.append(Mention(("date", y, mo, d), "numeric", m.start(), m.end(), m.group()))
    return out


_MONTH_RE = re.compile(
    r"\b(" + "|".join(sorted(_MONTHS, key=len, reverse=True)) + r")\b\.?", re.IGNORECASE
)


def _day_of(m: Mention) -> int | None:
    v = m.value[1] if isinstance(m.value, tuple) and m.value[0] == "ordinal" else m.value
    if isinstance(v, Decimal) and v != int(v):
        return None
    return int(v) if isinstance(v, (int, Decimal)) and 1 <= v <= 31 else None


def _year_of(m: Mention) -> int | None:
    v = m.value
    return int(v) if isinstance(v, Decimal) and v == int(v) and 1000 <= v <= 2999 else None


def _month_dates(text: str, numbers: list[Mention]) -> tuple[list[Mention], list[Mention]]:
    """Combine month names with neighbouring day/year mentions into dates.

    Returns (dates, numbers not used by a date).
    """
    used: set[int] = set()
    dates = []
    by_start = sorted(range(len(numbers)), key=lambda k: numbers[k].start)
    for mm in _MONTH_RE.finditer(text):
        word = mm.group(1)
        if word.lower() == "may" and word == "may":
            continue  # the verb
        if (
            word.lower()
            in ("mar", "jan", "jun", "oct", "dec", "sep", "aug", "nov", "feb", "apr", "jul", "sept")
            and not word[0].isupper()
        ):
            continue
        month = _MONTHS[word.lower()]
        start, end = mm.start(), mm.end()
        day = year = None
        parts: list[Mention] = []
        before = [k for k in by_start if numbers[k].end <= start and k not in used]
        if before:
            k = before[-1]
            gap = text[numbers[k].end : start]
            if re.fullmatch(r"\s*(of\s+)?|\.\s*", gap, re.IGNORECASE) and _day_of(numbers[k]):
                day = _day_of(numbers[k])
                parts.append(numbers[k])
                used.add(k)
                the = re.search(r"\bthe\s+$", text[: numbers[k].start], re.IGNORECASE)
                start = the.start() if the else numbers[k].start
        after = [k for k in by_start if numbers[k].start >= end and k not in used]
        if after and day is None:
            k = after[0]
            gap = text[end : numbers[k].start]
            if (
                re.fullmatch(r"\s*(the\s+)?", gap, re.IGNORECASE)
                and _day_of(numbers[k])
                and not _year_of(numbers[k])
            ):
                day = _day_of(numbers[k])
                parts.append(numbers[k])
                used.add(k)
                end = numbers[k].end
                after = after[1:]
        if after:
            k = after[0]
            gap = text[end : numbers[k].start]
            if re.fullmatch(r"\s*,?\s*(of\s+)?", gap) and _year_of(numbers[k]):
                year = _year_of(numbers[k])
                parts.append(numbers[k])
                used.add(k)
                end = numbers[k].end
        if day is None and year is None:
            continue
        style = "words" if any(p.style == "words" for p in parts) else "digits"
        dates.append(Mention(("date", year, month, day), style, start, end, text[start:end]))
    rest = [m for k, m in enumerate(numbers) if k not in used]
    return dates, rest


def _unit_after(text: str, pos: int) -> tuple[str, str, int] | None:
    """(canonical unit, "symbol"|"word", end) for a unit written right after ``pos``."""
    rest = text[pos : pos + 40]
    best = None
    for unit, (symbols, words) in _UNIT_TABLE.items():
        for sym in symbols:
            m = re.match(r"\s?" + re.escape(sym) + r"(?![A-Za-z])", rest)
            if m and (best is None or m.end() > best[2] - pos):
                best = (unit, "symbol", pos + m.end())
        for word in words:
            m = re.match(r"[\s-]+" + re.escape(word) + r"\b", rest, re.IGNORECASE)
            if m and (best is None or m.end() > best[2] - pos):
                best = (unit, "word", pos + m.end())
    return best


def _attach_units(text: str, numbers: list[Mention]) -> list[Mention]:
    out = []
    for m in numbers:
        if not isinstance(m.value, Decimal):
            out.append(m)
            continue
        start, unit = m.start, None
        prefix = re.search(r"(US\$|[$€£¥])\s?$", text[max(0, m.start - 4) : m.start])
        if prefix and m.style == "digits":
            unit = (_CURRENCY_PREFIX[prefix.group(1)], "symbol", m.end)
            start = m.start - len(prefix.group(0))
        else:
            unit = _unit_after(text, m.end)
            if unit and unit[0] == "s" and unit[1] == "symbol" and m.style == "words":
                unit = None
        if unit is None:
            out.append(m)
            continue
        name, unit_style, end = unit
        out.append(Mention((m.value, name), f"{m.style}+{unit_style}", start, end, text[start:end]))
    return out


def _clock_times(text: str) -> list[Mention]:
    out = []
    for m in _CLOCK_TIME.finditer(text):
        hour, minute = int(m.group("h")), int(m.group("m"))
        ampm = (m.group("ampm") or "").lower()
        if ampm == "p" and hour < 12:
            hour += 12
        elif ampm == "a" and hour == 12:
            hour = 0
        if hour < 24 and minute < 60:
            out.append(Mention(("time", hour, minute), "digits", m.start(), m.end(), m.group()))
    return out


def extract_numbers(text: str) -> list[Mention]:
    """Every number mention in ``text`` (dates, times, quantities, ordinals, plain numbers),
    in order."""
    dates = _numeric_dates(text)
    dates += _clock_times(text)
    taken = [(d.start, d.end) for d in dates]
    numbers = _digit_mentions(text, taken)
    taken += [(m.start, m.end) for m in numbers]
    numbers += _parse_word_numbers(text, taken)
    numbers.sort(key=lambda m: m.start)
    month_dates, numbers = _month_dates(text, numbers)
    mentions = dates + month_dates + _attach_units(text, numbers)
    return sorted(mentions, key=lambda m: m.start)


# --------------------------------------------------------------------------- reward


def rendering_score(
    reference: str, completion: str, *, style_credit: float = 0.5, count_extra: bool = False
) -> float | None:
    """Credit per reference number found in ``completion`` (1 in the same style,
    ``style_credit`` in another style), over the number of reference numbers (or of the
    completion's, when ``count_extra`` and it has more). None if the reference has none."""
    ref = extract_numbers(reference)
    if not ref:
        return None
    got = extract_numbers(completion)
    unused = list(range(len(got)))
    credit = 0.0
    pending = []
    for r in ref:  # exact value and style first, so a wrong-style copy cannot steal a match
        k = next((k for k in unused if got[k].value == r.value and got[k].style == r.style), None)
        if k is None:
            pending.append(r)
        else:
            unused.remove(k)
            credit += 1.0
    for r in pending:
        k = next((k for k in unused if got[k].value == r.value), None)
        if k is not None:
            unused.remove(k)
            credit += style_credit
    denominator = max(len(ref), len(got)) if count_extra else len(ref)
    return credit / denominator


def number_rendering(
    prompts: Sequence,
    completions: Sequence,
    *,
    style_credit: float = 0.5,
    count_extra: bool = False,
    **columns: Any,
) -> list[float | None]:
    """Numbers rendered like the reference (digits vs words, dates, units), in [0, 1].

    Reads column ``reference`` (or ``text`` when there is no ``reference``). For each number in
    the reference (see the module docstring for what counts), the completion earns 1 if it has
    the same value in the same style, ``style_credit`` if it has the same value in another
    style (e.g. "42" for "forty-two", "2024-03-03" for "March 3rd, 2024", "5 kilometres" for
    "5 km"), and 0 if the value is missing; the reward is the mean over reference numbers. With
    ``count_extra`` the completion's numbers count in the denominator when there are more of
    them (penalising invented numbers). None when the sample has no reference or its reference
    has no number.
    """
    n = len(completions)
    references = column(columns, "reference", n)
    texts = column(columns, "text", n)
    scores: list[float | None] = []
    for i in range(n):
        reference = references[i] if references[i] is not None else texts[i]
        if reference is None:
            scores.append(None)
            continue
        scores.append(
            rendering_score(
                as_text(reference),
                as_text(completions[i]),
                style_credit=style_credit,
                count_extra=count_extra,
            )
        )
    return scores
