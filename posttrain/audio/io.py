"""Audio I/O: load any audio file or in-memory waveform as float32 mono at one sample rate,
check that it is usable speech input, and write WAV files atomically.

Every function that can fail on user data raises `AudioError` with the file (or sample)
named and what to do about it.
"""

from __future__ import annotations

import io
import math
import os
import tempfile
import warnings
from typing import Any

import numpy as np

from posttrain.errors import AudioError

#: The rate every speech model here (Whisper, the speaker encoder) expects.
SAMPLE_RATE = 16000

#: Peak below -60 dBFS: nothing a listener or an ASR model would hear as speech.
SILENCE_PEAK = 10 ** (-60 / 20)
#: Samples at or above this magnitude count as clipped (full scale, allowing for 16-bit rounding).
CLIP_LEVEL = 0.999
#: More than this fraction of samples clipped: a square wave / DC / broken export, not speech.
MAX_CLIPPED_FRACTION = 0.5
#: Below this rate a file cannot hold speech (telephone audio is 8 kHz).
MIN_SAMPLE_RATE = 8000
#: The longest file any loader decodes unless the caller allows more: longer is a recording
#: session, not a sample, and decoding it would take gigabytes of memory.
MAX_FILE_SECONDS = 3600.0


def to_mono(wav: np.ndarray, name: str = "audio") -> np.ndarray:
    """Average the channels of a ``[time]``, ``[time, channels]`` or ``[channels, time]`` array."""
    wav = np.asarray(wav)
    if wav.ndim == 1:
        return wav
    if wav.ndim != 2:
        raise AudioError(f"{name}: audio array has shape {wav.shape}; expected [time] or [time, channels]")
    # soundfile gives [time, channels]; torch/torchaudio give [channels, time]. Channels are few.
    axis = 1 if wav.shape[1] <= wav.shape[0] else 0
    return wav.mean(axis=axis)


def resample(wav: np.ndarray, orig_sr: int, target_sr: int) -> np.ndarray:
    """``wav`` resampled from ``orig_sr`` to ``target_sr`` (librosa, soxr high quality)."""
    if int(orig_sr) == int(target_sr) or wav.size == 0:
        return wav.astype(np.float32, copy=False)
    import librosa

    return librosa.resample(wav.astype(np.float32, copy=False), orig_sr=int(orig_sr), target_sr=int(target_sr))


def _as_float32(wav: np.ndarray) -> np.ndarray:
    """Integer PCM scaled to [-1, 1]; floats cast to float32."""
    wav = np.asarray(wav)
    if np.issubdtype(wav.dtype, np.integer):
        scale = float(np.iinfo(wav.dtype).max) + 1.0
        return (wav.astype(np.float32) / scale).astype(np.float32)
    if wav.dtype == np.bool_ or not np.issubdtype(wav.dtype, np.number):
        raise TypeError(f"audio samples have dtype {wav.dtype}")
    return wav.astype(np.float32, copy=False)


def _check_finite(wav: np.ndarray, name: str) -> np.ndarray:
    if wav.size and not np.all(np.isfinite(wav)):
        validate_audio(wav, 1, name)  # raises the NaN/inf message
    return wav


def load_audio(
    path: str | os.PathLike, target_sr: int | None = SAMPLE_RATE, max_seconds: float | None = MAX_FILE_SECONDS
) -> np.ndarray:
    """The audio file at ``path`` as a float32 mono array at ``target_sr`` Hz (``None``: keep
    the file's rate; use `load_audio_with_rate` to learn it).

    Raises `AudioError` naming the file when it is missing or cannot be decoded, when its
    rate is below 8 kHz, when its header says it is longer than ``max_seconds`` (checked before
    decoding), or when its channels cancel each other in the mono mix.
    """
    wav, _ = load_audio_with_rate(path, target_sr, max_seconds)
    return wav


def _check_header(path: str, max_seconds: float | None) -> None:
    """Rate and length from the file header, before the samples are decoded."""
    import soundfile as sf

    try:
        info = sf.info(path)
    except Exception:
        return  # not a libsndfile format: checked after decoding
    _check_rate_and_length(path, int(info.samplerate), info.frames, max_seconds)


def _check_rate_and_length(path: str, sr: int, frames: int, max_seconds: float | None) -> None:
    if sr < MIN_SAMPLE_RATE:
        raise AudioError(
            f"audio file {path!r} has a sample rate of {sr} Hz, too low to hold speech (at least "
            f"{MIN_SAMPLE_RATE} Hz); re-export it at 16 kHz (e.g. ffmpeg -i IN -ar 16000 -ac 1 OUT.wav)"
        )
    seconds = frames / float(sr)
    if max_seconds is not None and seconds > max_seconds:
        hours, rest = divmod(int(seconds), 3600)
        raise AudioError(
            f"audio file {path!r} is {hours}:{rest // 60:02d}:{rest % 60:02d} long, longer than the maximum "
            f"{max_seconds:g} s for one sample; cut it into utterances (e.g. with a VAD) or raise the limit"
        )


def _mix_to_mono(data: np.ndarray, path: str) -> np.ndarray:
    """Channels averaged; refuse a mix that cancels (one channel phase-inverted), which would
    otherwise pass as a silent recording."""
    wav = to_mono(data, name=path)
    if data.ndim == 2 and wav.size and np.all(np.isfinite(data)):
        loudest = float(np.max(np.abs(data)))
        if loudest >= SILENCE_PEAK * 10 and float(np.max(np.abs(wav))) < SILENCE_PEAK:
            raise AudioError(
                f"audio file {path!r}: its channels cancel when mixed to mono (one is phase-inverted), "
                "leaving silence; export a single channel (e.g. ffmpeg -i IN -af pan=mono|c0=c0 OUT.wav)"
            )
    return wav


def load_audio_with_rate(
    path: str | os.PathLike, target_sr: int | None = SAMPLE_RATE, max_seconds: float | None = MAX_FILE_SECONDS
) -> tuple[np.ndarray, int]:
    """``(wav, sample_rate)`` for the file at ``path``; see `load_audio`."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise AudioError(f"audio file {path!r} does not exist; check the path (relative paths are "
                         f"resolved from {os.getcwd()!r})")
    if os.path.isdir(path):
        raise AudioError(f"audio path {path!r} is a directory; give an audio file")
    import soundfile as sf

    _check_header(path, max_seconds)
    try:
        data, sr = sf.read(path, dtype="float32", always_2d=False)
    except Exception as sf_error:
        # libsndfile reads WAV/FLAC/OGG/MP3; anything else (m4a, webm...) goes through
        # librosa's audioread fallback, which needs ffmpeg on the machine.
        try:
            import librosa

            with warnings.catch_warnings():  # librosa warns that it is falling back; we know
                warnings.simplefilter("ignore")
                data, sr = librosa.load(path, sr=None, mono=False)
        except Exception:
            raise AudioError(
                f"audio file {path!r} cannot be decoded ({sf_error}); convert it to WAV or FLAC "
                "(e.g. ffmpeg -i IN -ar 16000 -ac 1 OUT.wav)"
            ) from None
        data = np.asarray(data, dtype=np.float32)
        if data.ndim == 2:  # librosa gives [channels, time]
            data = data.T
        _check_rate_and_length(path, int(sr), data.shape[0], max_seconds)
    wav = _check_finite(_mix_to_mono(np.asarray(data, dtype=np.float32), path), path)
    if target_sr is not None:
        wav = resample(wav, sr, target_sr)
        sr = target_sr
    return np.ascontiguousarray(wav, dtype=np.float32), int(sr)


def validate_audio(
    wav: np.ndarray,
    sr: int,
    name: str = "audio",
    min_seconds: float = 0.0,
    max_seconds: float | None = None,
    allow_silent: bool = False,
) -> np.ndarray:
    """Check that ``wav`` can be used as speech and return it unchanged.

    Raises `AudioError` naming ``name`` (a file path or ``"sample 3"``) when the audio is
    empty, contains NaN/inf samples, is silent (peak below -60 dBFS; skipped when
    ``allow_silent``), is mostly clipped (over half the samples at full scale), or is
    shorter than ``min_seconds`` / longer than ``max_seconds``.
    """
    wav = np.asarray(wav)
    if wav.size == 0:
        raise AudioError(f"{name}: audio is empty (0 samples); regenerate or remove it")
    if not np.all(np.isfinite(wav)):
        bad = int(np.size(wav) - np.count_nonzero(np.isfinite(wav)))
        raise AudioError(
            f"{name}: audio has {bad} NaN/inf samples; the file or the model that produced it is "
            "broken, regenerate it"
        )
    seconds = wav.shape[0] / float(sr)
    if seconds < min_seconds:
        raise AudioError(f"{name}: audio is {seconds:.2f} s long, shorter than the minimum {min_seconds:g} s")
    if max_seconds is not None and seconds > max_seconds:
        raise AudioError(
            f"{name}: audio is {seconds:.1f} s long, longer than the maximum {max_seconds:g} s; "
            "split it into shorter clips or raise the limit"
        )
    peak = float(np.max(np.abs(wav)))
    if not allow_silent and peak < SILENCE_PEAK:
        db = 20 * math.log10(peak) if peak > 0 else -math.inf
        raise AudioError(
            f"{name}: audio is silent (peak {db:.0f} dBFS, below -60 dBFS); check the recording "
            "or the model that produced it"
        )
    clipped = float(np.mean(np.abs(wav) >= CLIP_LEVEL))
    if clipped > MAX_CLIPPED_FRACTION:
        raise AudioError(
            f"{name}: {clipped:.0%} of the samples are clipped at full scale, so this is not "
            "speech (a square wave, DC or a broken export); re-export it at a lower gain"
        )
    return wav


def is_silent(wav: np.ndarray) -> bool:
    """True when ``wav`` is empty or its peak is below -60 dBFS."""
    return wav.size == 0 or float(np.max(np.abs(wav))) < SILENCE_PEAK


def audio_item_to_array(
    item: Any, sample_rate: int | None = None, name: str = "audio", target_sr: int = SAMPLE_RATE
) -> np.ndarray:
    """One value of an ``audio`` column as float32 mono at ``target_sr``.

    Accepted: a file path; a numpy array / torch tensor / list of samples (its rate in
    ``sample_rate``); a Hugging Face datasets ``Audio`` dict ``{"array", "sampling_rate"}``
    or ``{"path"}`` / ``{"bytes"}``. NaN/inf samples raise `AudioError`; silent or empty
    audio is returned as is (a model that speaks nothing should score badly, not crash a run).
    """
    if item is None:
        raise AudioError(f"{name}: no audio (None); every sample needs an audio value")
    if isinstance(item, (str, os.PathLike)):
        wav = load_audio(item, target_sr)
        name = os.fspath(item)
    elif isinstance(item, dict):
        if item.get("array") is not None:
            sr = item.get("sampling_rate", item.get("sample_rate", sample_rate))
            return audio_item_to_array(np.asarray(item["array"]), sr, name, target_sr)
        if item.get("bytes") is not None:
            import soundfile as sf

            try:
                data, sr = sf.read(io.BytesIO(item["bytes"]), dtype="float32", always_2d=False)
            except Exception as e:
                raise AudioError(f"{name}: audio bytes cannot be decoded ({e}); store WAV or FLAC") from None
            wav = resample(_check_finite(to_mono(data, name), name), sr, target_sr)
        elif item.get("path"):
            return audio_item_to_array(item["path"], sample_rate, name, target_sr)
        else:
            raise AudioError(f"{name}: audio dict has keys {sorted(item)}; expected 'array' and "
                             "'sampling_rate', 'path' or 'bytes'")
    else:
        if hasattr(item, "detach"):  # torch tensor, without importing torch here
            item = item.detach().float().cpu().numpy()
        try:
            wav = _as_float32(np.asarray(item))
        except (TypeError, ValueError):
            raise AudioError(f"{name}: audio of type {type(item).__name__} is neither a path nor "
                             "an array of samples") from None
        if sample_rate is None:
            raise AudioError(f"{name}: audio is an array but no sample rate was given; add a "
                             "'sample_rate' column (or use {'array', 'sampling_rate'} dicts)")
        wav = resample(_check_finite(to_mono(wav, name), name), int(sample_rate), target_sr)
    return np.ascontiguousarray(wav, dtype=np.float32)


def audio_column(
    columns: dict, n: int, name: str = "audio", rate_column: str = "sample_rate", target_sr: int = SAMPLE_RATE
) -> list[np.ndarray]:
    """The ``name`` column of a reward call as ``n`` float32 mono waveforms at ``target_sr``.

    Array items take their rate from the ``rate_column`` column (one value per sample, or one
    number for all). Errors name the sample index (and file, for paths).
    """
    items = columns.get(name)
    if items is None:
        raise AudioError(f"no {name!r} column: this reward scores speech, so each sample needs an "
                         f"{name!r} value (a file path or an array with a {rate_column!r} column); "
                         f"columns present: {sorted(columns) or 'none'}")
    items = list(items)
    if len(items) != n:
        raise AudioError(f"column {name!r} has {len(items)} values for {n} samples")
    rates = columns.get(rate_column)
    if rates is None or isinstance(rates, (int, float, np.integer, np.floating)):
        rates = [rates] * n
    rates = list(rates)
    out = []
    for i, (item, sr) in enumerate(zip(items, rates)):
        label = f"sample {i}"
        try:
            out.append(audio_item_to_array(item, sr, label, target_sr))
        except AudioError as e:
            # Array errors already start with the label; file errors name the file: add the index.
            msg = str(e)
            raise AudioError(msg if msg.startswith(label + ":") else f"{label}: {msg}") from None
    return out


def save_wav(path: str | os.PathLike, wav: np.ndarray, sr: int, subtype: str = "PCM_16") -> str:
    """Write ``wav`` (float in [-1, 1]) to ``path`` as WAV, atomically: a reader never sees a
    half-written file, because the data goes to a temporary file in the same directory that
    then replaces ``path``. Returns the path."""
    import soundfile as sf

    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    wav = np.asarray(wav, dtype=np.float32)
    if subtype.startswith("PCM"):
        wav = np.clip(wav, -1.0, 1.0)  # integer PCM wraps around instead of clipping
    fd, tmp = tempfile.mkstemp(suffix=".wav.tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            sf.write(f, wav, int(sr), subtype=subtype, format="WAV")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path
