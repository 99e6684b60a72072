"""Speaker-similarity reward: does the generated speech sound like the target voice?"""

from __future__ import annotations

import os
from typing import Any, Sequence

import numpy as np

from posttrain.audio.io import SAMPLE_RATE, audio_column, audio_item_to_array, is_silent
from posttrain.audio.speaker import NoSpeechError, cosine_similarity, embed, reference_embedding
from posttrain.errors import RewardError


def _reference_for(item: Any, sample_rate: Any, index: int) -> np.ndarray:
    if isinstance(item, (str, os.PathLike)):
        return reference_embedding(item)  # cached per file
    label = f"sample {index} reference_audio"
    wav = audio_item_to_array(item, sample_rate, label)
    return embed(wav, SAMPLE_RATE, name=label)


def speaker_similarity(
    prompts: Sequence | None,
    completions: Sequence,
    reference: str | None = None,
    audio_key: str = "audio",
    **columns: Any,
) -> list[float | None]:
    """Reward for speaking in the target voice: cosine similarity between the speaker
    embedding (Resemblyzer, 256-d) of the sample's audio and that of a reference voice.

    Range [-1, 1]; in practice [0, 1], since the embeddings are non-negative: same voice on
    different sentences ~0.8-0.95, clearly different voices lower (espeak-ng en-us vs its
    female variant f3: ~0.65). Silent audio scores 0 (it has no voice to match).

    The reference comes from the ``reference_audio`` column (per sample: a path, an array with
    a ``reference_sample_rate`` or ``sample_rate`` column, or an ``{"array", "sampling_rate"}``
    dict) or, when that column is absent, from the ``reference`` parameter: a WAV/FLAC path or a
    ``.npy`` file holding a saved embedding. Reference files are embedded once and cached.
    Unreadable audio raises `AudioError` naming the sample.
    """
    n = len(completions)
    waveforms = audio_column(columns, n, name=audio_key)
    ref_items = columns.get("reference_audio")
    if ref_items is None:
        if reference is None:
            raise RewardError(
                "speaker_similarity needs a target voice: add a 'reference_audio' column or set the "
                "reward's 'reference' parameter to a WAV file or a .npy embedding"
            )
        fixed = reference_embedding(reference)
        references = [fixed] * n
    else:
        ref_items = list(ref_items)
        if len(ref_items) != n:
            raise RewardError(f"column 'reference_audio' has {len(ref_items)} values for {n} samples")
        rates = columns.get("reference_sample_rate", columns.get("sample_rate"))
        rates = list(rates) if isinstance(rates, (list, tuple, np.ndarray)) else [rates] * n
        references = [_reference_for(item, sr, i) for i, (item, sr) in enumerate(zip(ref_items, rates))]

    rewards: list[float | None] = []
    for i, (wav, ref) in enumerate(zip(waveforms, references)):
        if is_silent(wav):
            rewards.append(0.0)
            continue
        try:
            rewards.append(cosine_similarity(embed(wav, SAMPLE_RATE, name=f"sample {i}"), ref))
        except NoSpeechError:  # audible, but no voice activity: nothing to match
            rewards.append(0.0)
    return rewards
