"""Audio for speech post-training: I/O and validation (`io`), speech recognition (`asr`),
espeak-ng synthesis (`tts`), Praat prosody features (`prosody`) and speaker embeddings
(`speaker`).

Only the light I/O helpers are imported here; the model-holding modules load their models
(Whisper, the speaker encoder) on first use, once per process.
"""

from posttrain.audio.io import (
    SAMPLE_RATE,
    audio_column,
    audio_item_to_array,
    load_audio,
    resample,
    save_wav,
    validate_audio,
)

__all__ = [
    "SAMPLE_RATE",
    "audio_column",
    "audio_item_to_array",
    "load_audio",
    "resample",
    "save_wav",
    "validate_audio",
]
