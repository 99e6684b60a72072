"""ARIA: text tokens and speech frames in ONE interleaved stream.

A Talker that speaks while the text is still arriving must never let its speech run ahead of
the text it is speaking. ARIA keeps the two in one stream under an adaptive rate constraint:
after ``t`` text tokens, at most ``allowed_frames(t) = floor(rate * t) + lead`` speech frames
may have been emitted, where ``rate`` (frames per text token) is estimated per
language/voice from data and ``lead`` is a small slack. Text leads speech; when the text is
finished, speech may run to its end.

The same rule builds training streams (`build_stream`, from word-level alignments, which
word-by-word synthesis gives for free and ASR word timestamps give for user data) and
steers generation (`AriaScheduler`: forces the next text token whenever one more frame
would break the constraint, and ends cleanly). `check_stream` verifies every prefix.

A stream is a list of items ``("text", token_id)`` and ``("speech", frame_index)``.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Iterable, Sequence

from posttrain.errors import DataError

TEXT, SPEECH = "text", "speech"


@dataclass(frozen=True)
class AriaRate:
    """Speech frames per text token, and how many frames speech may run ahead."""

    frames_per_token: float
    lead: int = 4

    def allowed_frames(self, text_tokens: int, text_done: bool = False) -> float:
        """Most speech frames allowed after ``text_tokens`` text tokens."""
        if text_done:
            return math.inf
        return math.floor(self.frames_per_token * text_tokens) + self.lead


def estimate_rates(
    samples: Iterable[tuple[str, int, int]], slack: float = 1.15, lead: int = 4, min_samples: int = 3
) -> dict[str, AriaRate]:
    """Per-key rates from ``(key, text_tokens, frames)`` samples, e.g. key = language/voice.

    The rate is the pooled frames-per-token ratio times ``slack`` (so slower speakers within
    a key still fit); keys with fewer than ``min_samples`` samples fall back to the pooled
    rate of all keys, stored under ``"*"``.
    """
    tokens, frames, counts = defaultdict(int), defaultdict(int), defaultdict(int)
    for key, n_tokens, n_frames in samples:
        if n_tokens <= 0:
            raise DataError(f"ARIA rate sample for {key!r} has no text tokens")
        tokens[key] += n_tokens
        frames[key] += n_frames
        counts[key] += 1
    total_tokens, total_frames = sum(tokens.values()), sum(frames.values())
    if total_tokens == 0:
        raise DataError("no samples to estimate the ARIA speech-to-text rate from")
    pooled = AriaRate(total_frames / total_tokens * slack, lead)
    rates = {"*": pooled}
    for key in tokens:
        rates[key] = AriaRate(frames[key] / tokens[key] * slack, lead) if counts[key] >= min_samples else pooled
    return rates


def rate_for(rates: dict[str, AriaRate], key: str) -> AriaRate:
    """The rate of ``key``, or the pooled one."""
    return rates.get(key, rates["*"])


def build_stream(
    word_tokens: Sequence[Sequence[int]],
    word_frames: Sequence[tuple[int, int]],
    num_frames: int,
    rate: AriaRate,
) -> list[tuple[str, int]]:
    """The interleaved stream of one utterance.

    ``word_tokens[i]`` are the text tokens of word ``i``; ``word_frames[i] = (start, end)`` its
    speech frames (from the word-level alignment). Speech frame ``f`` needs the text of its
    word (so the Talker has read what it says), and the rate constraint must hold; text is
    emitted as late as those two rules allow, so the stream stays close to real-time.
    """
    if len(word_tokens) != len(word_frames):
        raise DataError(f"ARIA: {len(word_tokens)} words but {len(word_frames)} frame spans")
    flat_tokens = [t for w in word_tokens for t in w]
    # the number of text tokens that must be out before frame f: all tokens up to its word
    tokens_needed_by_frame = []
    word = 0
    cumulative = 0
    ends = [sum(len(w) for w in word_tokens[: i + 1]) for i in range(len(word_tokens))]
    for f in range(num_frames):
        while word < len(word_frames) - 1 and f >= word_frames[word][1]:
            word += 1
        cumulative = ends[word] if word_tokens else 0
        tokens_needed_by_frame.append(cumulative)
    stream: list[tuple[str, int]] = []
    emitted_text = 0
    total_text = len(flat_tokens)
    for f in range(num_frames):
        need = tokens_needed_by_frame[f]
        while emitted_text < total_text and (
            emitted_text < need or f + 1 > rate.allowed_frames(emitted_text, emitted_text == total_text)
        ):
            stream.append((TEXT, flat_tokens[emitted_text]))
            emitted_text += 1
        stream.append((SPEECH, f))
    while emitted_text < total_text:
        stream.append((TEXT, flat_tokens[emitted_text]))
        emitted_text += 1
    return stream


def build_plain_stream(tokens: Sequence[int], num_frames: int) -> list[tuple[str, int]]:
    """All text first, then all speech: the layout ARIA is compared against."""
    return [(TEXT, t) for t in tokens] + [(SPEECH, f) for f in range(num_frames)]


def check_stream(stream: Sequence[tuple[str, int]], total_text: int, rate: AriaRate) -> int | None:
    """Index of the first item at which speech runs ahead of the text (None if every prefix
    keeps the constraint)."""
    text = frames = 0
    for i, (kind, _) in enumerate(stream):
        if kind == TEXT:
            text += 1
        else:
            frames += 1
            if frames > rate.allowed_frames(text, text == total_text):
                return i
    return None


class AriaScheduler:
    """Steers generation under the ARIA constraint.

    The Talker proposes speech frames; before each one, ``next_item()`` says whether the
    next text token must be fed first. Once the text is finished speech runs until the model
    ends it or ``max_frames`` (a rate-based cap, so a model that never stops still ends
    cleanly).
    """

    def __init__(self, text_tokens: Sequence[int], rate: AriaRate, max_frames: int | None = None):
        self.text_tokens = list(text_tokens)
        self.rate = rate
        self.text_emitted = 0
        self.frames_emitted = 0
        tail = 2 * rate.lead + int(rate.frames_per_token * 2)
        self.max_frames = max_frames if max_frames is not None else int(rate.frames_per_token * len(self.text_tokens)) + tail

    @property
    def text_done(self) -> bool:
        return self.text_emitted >= len(self.text_tokens)

    def must_feed_text(self) -> bool:
        """True when one more frame now would run ahead of the text."""
        return not self.text_done and self.frames_emitted + 1 > self.rate.allowed_frames(self.text_emitted)

    def feed_text(self) -> int:
        token = self.text_tokens[self.text_emitted]
        self.text_emitted += 1
        return token

    def add_frame(self) -> None:
        if self.must_feed_text():
            raise RuntimeError("ARIA: a frame was added while the text had to come first")
        self.frames_emitted += 1

    @property
    def finished(self) -> bool:
        return self.frames_emitted >= self.max_frames
