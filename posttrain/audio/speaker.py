"""Speaker embeddings: who is speaking, as a 256-d unit vector.

The encoder is Resemblyzer's pretrained GE2E ``VoiceEncoder`` (a 3-layer LSTM over 40-band
mel frames); its weights ship inside the ``resemblyzer`` wheel, so nothing is downloaded.
It is loaded once per process. Embeddings are L2-normalised and non-negative (the model ends in
a ReLU), so cosine similarity lies in [0, 1] in practice: around 0.8-0.95 for the same voice
on different sentences, lower for different voices.
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings

import numpy as np

from posttrain.audio.io import SAMPLE_RATE, is_silent, resample
from posttrain.errors import AudioError, ModelError

EMBEDDING_DIM = 256


class NoSpeechError(AudioError):
    """Audio that is audible but holds no speech to embed (voice activity detection found none)."""


def _resemblyzer():
    try:
        with warnings.catch_warnings():  # it imports a deprecated scipy.ndimage path
            warnings.simplefilter("ignore", DeprecationWarning)
            import resemblyzer
    except ImportError as e:
        raise ModelError(f"speaker embeddings need the 'resemblyzer' package ({e}): "
                         "pip install resemblyzer webrtcvad-wheels (or posttrain[speech])") from None
    return resemblyzer


@functools.lru_cache(maxsize=1)
def voice_encoder(device: str = "cpu"):
    """The pretrained Resemblyzer encoder, loaded once per process."""
    return _resemblyzer().VoiceEncoder(device, verbose=False)


@contextlib.contextmanager
def _denormals_flushed_on_one_thread():
    """Run torch on the calling thread only, with denormal floats flushed to zero.

    The encoder's LSTM produces denormal floats on some utterances, and x86 CPUs handle those
    in microcode: one 5 s sentence took 7.5 CPU-s instead of 0.04. Flush-to-zero (which changes
    nothing above 1e-38) is a per-thread CPU flag, and torch's worker threads already exist
    without it, so the LSTM runs on this thread alone; it is too small to gain from more.
    torch has no getter for the flag, so it stays on for this thread afterwards.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def embed(wav: np.ndarray, sr: int = SAMPLE_RATE, name: str = "audio") -> np.ndarray:
    """The speaker embedding of a mono waveform: float32, shape ``[256]``, unit length.

    Resemblyzer's preprocessing normalises loudness and cuts silences longer than ~0.3 s
    (webrtcvad) before embedding. Raises `AudioError` naming ``name`` when nothing is left
    to embed (silent or empty audio).
    """
    preprocess_wav = _resemblyzer().preprocess_wav
    wav = resample(np.asarray(wav, dtype=np.float32), sr, SAMPLE_RATE)
    if is_silent(wav):
        raise AudioError(f"{name}: audio is silent or empty, so it has no voice to embed")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # log10 of tiny RMS inside resemblyzer
        processed = preprocess_wav(wav, source_sr=SAMPLE_RATE)
    if processed.size < SAMPLE_RATE // 10:
        raise NoSpeechError(f"{name}: no speech found (voice activity detection kept "
                         f"{processed.size / SAMPLE_RATE:.2f} s); nothing to embed")
    encoder = voice_encoder()
    with _denormals_flushed_on_one_thread():
        e = encoder.embed_utterance(processed).astype(np.float32)
    return e / max(float(np.linalg.norm(e)), 1e-12)


def cosine_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Cosine of the angle between two embeddings, in [-1, 1]."""
    a, b = np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"embeddings differ in size: {a.shape[0]} vs {b.shape[0]}")
    denom = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denom) if denom > 0 else 0.0


@functools.lru_cache(maxsize=64)
def _reference_embedding_cached(path: str, mtime: float) -> np.ndarray:
    if path.endswith(".npy"):
        try:
            e = np.load(path).astype(np.float32).ravel()
        except Exception as err:
            raise AudioError(f"speaker reference {path!r} cannot be read as a .npy array ({err})") from None
        if e.shape != (EMBEDDING_DIM,):
            raise AudioError(f"speaker reference {path!r} holds an array of shape {e.shape}; expected a "
                             f"{EMBEDDING_DIM}-d embedding saved with np.save(path, embed(wav, sr))")
        return e / max(float(np.linalg.norm(e)), 1e-12)
    from posttrain.audio.io import load_audio

    return embed(load_audio(path, SAMPLE_RATE), SAMPLE_RATE, name=path)


def reference_embedding(path: str | os.PathLike) -> np.ndarray:
    """The embedding of a reference voice: an audio file, or a ``.npy`` holding an embedding.
    Cached per file (and its modification time)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"speaker reference {path!r} does not exist; give a WAV/FLAC file of the "
                         "target voice or a .npy embedding")
    return _reference_embedding_cached(path, os.path.getmtime(path))
