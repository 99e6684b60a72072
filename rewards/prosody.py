"""Prosody reward: penalises monotone speech, implausible speaking rates and speech broken up
by long pauses. Features come from Praat (`posttrain.audio.prosody`)."""

from __future__ import annotations

from typing import Any, Sequence

from posttrain.audio.io import SAMPLE_RATE, audio_column
from posttrain.audio.prosody import ProsodyFeatures, prosody_features
from posttrain.errors import RewardError
from rewards import as_text, column
from rewards._text_norm import normalize_text


def range_score(f0_range_semitones: float, target: float) -> float:
    """1 at or above ``target`` semitones of F0 range, falling linearly to 0 for flat pitch."""
    return min(1.0, max(0.0, f0_range_semitones) / target)


def rate_score(words_per_second: float | None, rate_min: float, rate_max: float) -> float:
    """1 inside ``[rate_min, rate_max]`` words/s; outside, the square of the factor by which the
    rate misses the range (twice too fast -> 0.25). ``None`` (no word count) -> 1."""
    if words_per_second is None:
        return 1.0
    if words_per_second < rate_min:
        return (words_per_second / rate_min) ** 2
    if words_per_second > rate_max:
        return (rate_max / words_per_second) ** 2
    return 1.0


def pause_score(pause_ratio: float, max_pause_ratio: float) -> float:
    """1 up to ``max_pause_ratio`` of the speech span in pauses, then linearly to 0 at all-pause."""
    if pause_ratio <= max_pause_ratio:
        return 1.0
    return max(0.0, (1.0 - pause_ratio) / (1.0 - max_pause_ratio))


def prosody_reward_from_features(
    f: ProsodyFeatures, f0_range_target: float, rate_min: float, rate_max: float, max_pause_ratio: float
) -> float:
    """``range_score * rate_score * pause_score``; 0 for audio with no voiced speech."""
    if not f.voiced:
        return 0.0
    return (
        range_score(f.f0_range_semitones, f0_range_target)
        * rate_score(f.speaking_rate, rate_min, rate_max)
        * pause_score(f.pause_ratio, max_pause_ratio)
    )


def prosody(
    prompts: Sequence | None,
    completions: Sequence,
    f0_range_target: float = 4.0,
    rate_min: float = 1.5,
    rate_max: float = 5.0,
    max_pause_ratio: float = 0.3,
    pitch_floor: float = 75.0,
    pitch_ceiling: float = 500.0,
    audio_key: str = "audio",
    **columns: Any,
) -> list[float | None]:
    """Reward for natural-sounding delivery, in [0, 1] (1 = no penalty).

    The product of three scores (see `range_score`, `rate_score`, `pause_score`):
    - pitch movement: F0 range (5th-95th percentile of voiced frames) at or above
      ``f0_range_target`` semitones scores 1; flat, monotone speech scores near 0. The default
      4 st is a floor for "not monotone" (espeak-ng's default intonation measures 4-6 st, with
      range 0 about 0.5 st; read human speech is usually wider), not a target for expressiveness;
    - speaking rate in words per second over the speech span, using the word count of the
      ``text`` column (or the prompt's text) after WER normalisation (numbers as digits, each
      digit one word); ``[rate_min, rate_max]`` (1.5-5 words/s,
      90-300 words per minute) scores 1; not scored when there is no text;
    - pauses: up to ``max_pause_ratio`` of the speech span in silent stretches >= 0.2 s is free.

    Audio that is silent or has no voiced frame scores 0, not None: speaking nothing must not
    escape the penalty. Unreadable audio (missing file, NaN samples) raises `AudioError`
    naming the sample. Columns: ``audio`` (path, array + ``sample_rate``, or
    ``{"array", "sampling_rate"}``), optional ``text``.
    """
    if f0_range_target <= 0 or not 0 < rate_min < rate_max or not 0 <= max_pause_ratio < 1:
        raise RewardError(
            "prosody: need f0_range_target > 0, 0 < rate_min < rate_max and 0 <= max_pause_ratio < 1; got "
            f"f0_range_target={f0_range_target}, rate_min={rate_min}, rate_max={rate_max}, "
            f"max_pause_ratio={max_pause_ratio}"
        )
    n = len(completions)
    waveforms = audio_column(columns, n, name=audio_key)
    prompts = list(prompts) if prompts is not None else [None] * n
    texts = column(columns, "text", n)
    rewards: list[float | None] = []
    for wav, text, prompt in zip(waveforms, texts, prompts):
        reference = as_text(text) if text is not None else as_text(prompt)
        words = len(normalize_text(reference).split()) or None
        f = prosody_features(wav, SAMPLE_RATE, words, pitch_floor=pitch_floor, pitch_ceiling=pitch_ceiling)
        rewards.append(prosody_reward_from_features(f, f0_range_target, rate_min, rate_max, max_pause_ratio))
    return rewards
