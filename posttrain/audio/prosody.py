"""Prosody features measured with Praat (through parselmouth): pitch level and movement,
voicing, pauses and speaking rate of one utterance.

Definitions (all from Praat's autocorrelation pitch track at 10 ms steps and its intensity
contour):
- *speech span*: from the first to the last frame whose intensity is within ``silence_db``
  (25 dB) of the loudest frame; leading and trailing silence are not part of the utterance.
- ``f0_mean_hz``: mean F0 of voiced frames.
- ``f0_range_semitones``: 95th minus 5th percentile of voiced F0, in semitones. Percentiles,
  not min/max, so one octave error of the pitch tracker cannot fake an expressive contour.
  Monotone speech is near 0; read English speech is typically 5-12.
- ``f0_std_semitones``: standard deviation of voiced F0 in semitones.
- ``voiced_ratio``: voiced pitch frames / all pitch frames inside the speech span.
- ``pause_ratio``: time in silent stretches of at least ``min_pause_s`` (0.2 s) inside the
  speech span / the span's length.
- ``speaking_rate``: **words per second** over the speech span, from a word count the
  caller supplies (the transcript or the reference text); ``None`` without one. Words, not
  syllables, because the word count is known exactly from the text while syllable counts
  would have to be estimated.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from posttrain.audio.io import is_silent


@dataclass(frozen=True)
class ProsodyFeatures:
    """Prosody of one utterance; F0 fields are ``None`` when no frame is voiced."""

    duration_seconds: float
    speech_seconds: float
    f0_mean_hz: float | None
    f0_range_semitones: float | None
    f0_std_semitones: float | None
    voiced_ratio: float
    pause_ratio: float
    speaking_rate: float | None  # words per second over the speech span
    word_count: int | None

    @property
    def voiced(self) -> bool:
        return self.f0_mean_hz is not None

    def as_dict(self) -> dict:
        return asdict(self)


def semitones(f0_hz: np.ndarray, reference_hz: float = 100.0) -> np.ndarray:
    """F0 in semitones above ``reference_hz`` (range and spread do not depend on the reference)."""
    return 12.0 * np.log2(np.asarray(f0_hz, dtype=np.float64) / reference_hz)


def _speech_span(intensity_db: np.ndarray, times: np.ndarray, silence_db: float) -> tuple[int, int, np.ndarray]:
    loud = intensity_db > (np.max(intensity_db) - silence_db)
    idx = np.flatnonzero(loud)
    return int(idx[0]), int(idx[-1]), loud


def _pause_seconds(loud: np.ndarray, first: int, last: int, step: float, min_pause_s: float) -> float:
    total, run = 0.0, 0
    for is_loud in loud[first : last + 1]:
        if is_loud:
            if run * step >= min_pause_s:
                total += run * step
            run = 0
        else:
            run += 1
    return total


def prosody_features(
    wav: np.ndarray,
    sr: int,
    word_count: int | None = None,
    pitch_floor: float = 75.0,
    pitch_ceiling: float = 500.0,
    silence_db: float = 25.0,
    min_pause_s: float = 0.2,
) -> ProsodyFeatures:
    """Measure `ProsodyFeatures` of a mono waveform; see the module docstring for definitions.

    ``pitch_floor``/``pitch_ceiling`` bound the F0 search (Praat's defaults suit adult
    speech; raise the floor to 100 Hz for child or high female voices to avoid octave errors).
    Silent or empty audio gives zero speech and no F0.
    """
    import parselmouth

    wav = np.asarray(wav, dtype=np.float64)
    duration = wav.size / float(sr)
    # Praat needs a few pitch periods of signal to analyse at all.
    if is_silent(wav) or duration < 3.0 / pitch_floor:
        return ProsodyFeatures(duration, 0.0, None, None, None, 0.0, 0.0, None, word_count)

    sound = parselmouth.Sound(wav, sampling_frequency=float(sr))
    intensity = sound.to_intensity(minimum_pitch=pitch_floor, time_step=0.01)
    db = intensity.values[0]
    t = intensity.xs()
    first, last, loud = _speech_span(db, t, silence_db)
    step = float(intensity.time_step)
    start, end = float(t[first]) - step / 2, float(t[last]) + step / 2
    speech_seconds = max(end - start, step)
    pause_ratio = _pause_seconds(loud, first, last, step, min_pause_s) / speech_seconds

    pitch = sound.to_pitch(time_step=0.01, pitch_floor=pitch_floor, pitch_ceiling=pitch_ceiling)
    f0 = pitch.selected_array["frequency"]
    pt = pitch.xs()
    in_span = (pt >= start) & (pt <= end)
    voiced = f0[in_span & (f0 > 0)]
    voiced_ratio = float(np.count_nonzero(f0[in_span] > 0) / max(1, np.count_nonzero(in_span)))
    rate = None if not word_count else word_count / speech_seconds
    if voiced.size < 2:
        return ProsodyFeatures(duration, speech_seconds, None, None, None, voiced_ratio, pause_ratio, rate, word_count)
    st = semitones(voiced)
    return ProsodyFeatures(
        duration_seconds=duration,
        speech_seconds=speech_seconds,
        f0_mean_hz=float(voiced.mean()),
        f0_range_semitones=float(np.percentile(st, 95) - np.percentile(st, 5)),
        f0_std_semitones=float(st.std()),
        voiced_ratio=voiced_ratio,
        pause_ratio=float(pause_ratio),
        speaking_rate=rate,
        word_count=word_count,
    )
