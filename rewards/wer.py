"""Intelligibility reward: WER (CER for Chinese) of an ASR transcript of the spoken audio
against the text it should say.

Protocol (Seed-TTS-eval): Whisper transcribes the audio (greedy, temperature 0, no fallback);
reference and transcript are normalised by Whisper's English text normaliser (Basic for
other languages), punctuation stripped, lower-cased, digit runs split into single digits;
WER is computed per utterance with jiwer. See `rewards._text_norm` for why digits are split.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import numpy as np

from posttrain.audio.io import audio_column
from posttrain.errors import RewardError
from rewards import as_text, column
from rewards._text_norm import base_language, normalize_text

__all__ = ["wer", "word_error_rate", "wer_stats", "transcribe_and_score", "normalize_text", "TRANSFORMS"]

DEFAULT_TRANSFORM = "1 - tanh(3 * wer)"

#: Reward as a function of the per-utterance WER capped at 1.
TRANSFORMS: dict[str, Callable[[float], float]] = {
    # Steep near 0, where a TTS model lives: WER 0 -> 1.0, 0.1 -> 0.71, 0.3 -> 0.28, 1 -> 0.005.
    "1-tanh(3*wer)": lambda w: 1.0 - math.tanh(3.0 * w),
    "1-wer": lambda w: 1.0 - w,
    "neg_wer": lambda w: -w,
}


def get_transform(transform: str | Callable[[float], float]) -> Callable[[float], float]:
    """The WER -> reward function named ``transform`` (spaces ignored), or a callable as is."""
    if callable(transform):
        return transform
    fn = TRANSFORMS.get(str(transform).replace(" ", "").lower())
    if fn is None:
        raise RewardError(f"wer: unknown transform {transform!r}; choose one of "
                          f"{', '.join(repr(k) for k in ['1 - tanh(3 * wer)', '1-wer', 'neg_wer'])}")
    return fn


def word_error_rate(reference: str, hypothesis: str, language: str | None = "en") -> float | None:
    """Uncapped WER of ``hypothesis`` against ``reference`` after normalisation (CER for
    Chinese/Japanese). Can exceed 1 when the hypothesis has many inserted words. ``None`` when
    the reference normalises to nothing (WER is undefined)."""
    import jiwer

    ref = normalize_text(reference, language)
    if not ref:
        return None
    hyp = normalize_text(hypothesis, language)
    return float(jiwer.wer(ref, hyp))


def wer_stats(wers: Sequence[float | None]) -> dict[str, float | int | None]:
    """Summary of per-utterance WERs for reports: the mean with each utterance capped at 1
    (what the reward sees), the plain mean, the median, and how many were scored."""
    values = np.array([w for w in wers if w is not None], dtype=np.float64)
    if values.size == 0:
        return {"mean_capped": None, "mean_uncapped": None, "median": None, "count": 0}
    return {
        "mean_capped": float(np.minimum(values, 1.0).mean()),
        "mean_uncapped": float(values.mean()),
        "median": float(np.median(values)),
        "count": int(values.size),
    }


def _per_sample_languages(language: Any, n: int) -> list[str]:
    # `language` is a reward parameter (one string) or a dataset column (one value per sample).
    if language is None or isinstance(language, str):
        return [base_language(language)] * n
    values = list(language)
    if len(values) != n:
        raise RewardError(f"wer: column 'language' has {len(values)} values for {n} samples")
    return [base_language(v) for v in values]


def speech_inputs(prompts: Sequence | None, completions: Sequence, language, audio_key: str, columns: dict):
    """``(references, waveforms, languages)`` of a speech reward's call: the reference is the
    ``text`` column when present, else the prompt's text; the audio comes from ``audio_key``."""
    n = len(completions)
    prompts = list(prompts) if prompts is not None else [None] * n
    texts = column(columns, "text", n)
    references = [as_text(t) if t is not None else as_text(p) for t, p in zip(texts, prompts)]
    return references, audio_column(columns, n, name=audio_key), _per_sample_languages(language, n)


def per_language(languages: Sequence[str], run: Callable[[str, list[int]], Sequence]) -> list:
    """One result per sample from one ``run(language, indices)`` call per language (an ASR is
    loaded per language), put back in sample order."""
    out: list = [None] * len(languages)
    for lang in sorted(set(languages)):
        idx = [i for i, sample_lang in enumerate(languages) if sample_lang == lang]
        for i, value in zip(idx, run(lang, idx)):
            out[i] = value
    return out


def transcribe_and_score(
    prompts: Sequence | None,
    completions: Sequence,
    backend: str = "faster-whisper",
    model: str = "embedded",
    language: str | Sequence[str] | None = "en",
    packed: bool = True,
    audio_key: str = "audio",
    **columns: Any,
) -> list[dict]:
    """Per sample: ``{"reference", "transcript", "language", "wer"}`` (uncapped WER, ``None``
    when the reference is empty). The reference is the ``text`` column when present, else the
    prompt's text."""
    from posttrain.audio.asr import get_asr

    references, waveforms, languages = speech_inputs(prompts, completions, language, audio_key, columns)
    transcripts = per_language(
        languages,  # one ASR pass per language, packed across samples
        lambda lang, idx: get_asr(backend=backend, model=model, language=lang, packed=packed).transcribe([waveforms[i] for i in idx]),
    )
    return [
        {"reference": r, "transcript": t, "language": lang, "wer": word_error_rate(r, t, lang)}
        for r, t, lang in zip(references, transcripts, languages)
    ]


def wer(
    prompts: Sequence | None,
    completions: Sequence,
    backend: str = "faster-whisper",
    model: str = "embedded",
    language: str | Sequence[str] | None = "en",
    transform: str | Callable[[float], float] = DEFAULT_TRANSFORM,
    packed: bool = True,
    audio_key: str = "audio",
    **columns: Any,
) -> list[float | None]:
    """Reward for saying the right words: ``transform(min(WER, 1))`` per sample.

    Rewards intelligible speech of exactly the reference text. With the default transform,
    ``1 - tanh(3 * wer)``, the range is [0.005, 1] (1 = every word right); ``"1-wer"`` gives
    [0, 1] and ``"neg_wer"`` [-1, 0]. CER replaces WER for Chinese (``language`` "zh").

    Columns: ``audio`` (a file path, an array with a ``sample_rate`` column, or a
    ``{"array", "sampling_rate"}`` dict; ``audio_key`` names another column), optional
    ``text`` (the reference; default: the prompt's text), optional ``language`` (per sample;
    otherwise the ``language`` parameter). Silent audio transcribes to nothing (WER 1).
    Returns ``None`` (no opinion) for a sample whose reference normalises to nothing.
    Unreadable audio raises `AudioError` naming the sample.

    Params: ``backend`` (faster-whisper | openai-whisper), ``model`` ("embedded" = the
    packaged tiny.en), ``language``, ``transform``, ``packed`` (pack short utterances into
    30 s ASR windows: ~3x cheaper, see ``posttrain.audio.asr``).
    """
    to_reward = get_transform(transform)
    scored = transcribe_and_score(prompts, completions, backend, model, language, packed, audio_key, **columns)
    return [None if s["wer"] is None else float(to_reward(min(s["wer"], 1.0))) for s in scored]
