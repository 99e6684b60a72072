"""Graded intelligibility reward: how probable the ASR finds the reference text given the audio.

`wer` counts the words a greedy Whisper transcript gets wrong: an utterance whose words are
almost right and one that is unintelligible can both score WER 1, and a small change in the
audio can flip a whole word. For RL on an early speech generator that count is a weak signal:
most rollouts of one prompt tie. This reward instead forces Whisper to read the reference text
(teacher forcing, CTranslate2's ``align``: the same pass faster-whisper runs for word
timestamps) and takes the probability it gives each token: deterministic, graded, and it keeps
rising as speech gets clearer long after the greedy transcript stopped changing.

    m = mean over the reference's tokens of log p(token | audio, earlier tokens)
    transform "logprob" (default): reward = max(0, 1 + m / 10), in [0, 1]
    transform "prob":              reward = exp(m), the geometric-mean token probability

Measured on espeak-ng speech with the packaged tiny.en: the right sentence m = -1.07, another
sentence's audio -7.8, the right sentence under loud noise -6.2. On rollouts of an early Talker
(8 per sentence, temperature 0.3) eight samples that all had WER 1 spread over m = -6.2 ... -3.8,
and within a sentence m rose with 1 - WER. The log form keeps that spread on one scale at every
quality (exp(m) squeezes poor speech towards 0, where the other rewards' spread would swamp it
in a weighted sum).
"""

from __future__ import annotations

import math
from typing import Any, Sequence

from posttrain.errors import RewardError
from rewards.wer import per_language, speech_inputs

__all__ = ["asr_likelihood", "reference_logprobs", "TRANSFORMS"]

#: Reward as a function of the mean token log-probability m.
TRANSFORMS = {
    "logprob": lambda m: max(0.0, 1.0 + m / 10.0),
    "prob": math.exp,
}


def reference_logprobs(
    prompts: Sequence | None,
    completions: Sequence,
    backend: str = "faster-whisper",
    model: str = "embedded",
    language: str | Sequence[str] | None = "en",
    audio_key: str = "audio",
    **columns: Any,
) -> list[list[float]]:
    """Per sample, the log-probability of each reference token (``[]`` for an empty reference).
    The reference is the ``text`` column when present, else the prompt's text."""
    from posttrain.audio.asr import get_asr

    if backend != "faster-whisper":
        raise RewardError(f"asr_likelihood: backend {backend!r} is not supported; it needs faster-whisper (CTranslate2's align)")
    references, waveforms, languages = speech_inputs(prompts, completions, language, audio_key, columns)
    return per_language(
        languages,
        lambda lang, idx: get_asr(backend=backend, model=model, language=lang).reference_logprobs(
            [waveforms[i] for i in idx], [references[i] for i in idx]
        ),
    )


def asr_likelihood(
    prompts: Sequence | None,
    completions: Sequence,
    backend: str = "faster-whisper",
    model: str = "embedded",
    language: str | Sequence[str] | None = "en",
    audio_key: str = "audio",
    transform: str = "logprob",
    **columns: Any,
) -> list[float | None]:
    """Reward for speech from which the ASR reads exactly the reference: the mean log-probability
    Whisper, teacher-forced on the reference, gives its tokens, as ``max(0, 1 + m / 10)``
    (``transform="logprob"``, [0, 1]) or ``exp(m)`` (``"prob"``, the geometric-mean probability).

    Columns as for `wer`: ``audio`` (path, array + ``sample_rate``, or dict), optional ``text``
    (the reference; default the prompt's text), optional ``language``. ``None`` for a sample
    whose reference is empty. Params: ``model`` ("embedded" = the packaged tiny.en, or a
    CTranslate2 Whisper folder), ``language``, ``transform``. Only the faster-whisper backend.
    """
    to_reward = TRANSFORMS.get(str(transform).replace(" ", "").lower())
    if to_reward is None:
        raise RewardError(f"asr_likelihood: unknown transform {transform!r}; one of {', '.join(TRANSFORMS)}")
    logps = reference_logprobs(prompts, completions, backend, model, language, audio_key, **columns)
    return [float(to_reward(sum(lp) / len(lp))) if lp else None for lp in logps]
