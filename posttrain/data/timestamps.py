"""Explicit timestamps in audio (and video) token streams, the way Qwen3-Omni reads time.

The model sees a clip as a run of encoder tokens; time strings such as ``<12.0 seconds>`` are
inserted into that run so the model can answer "what is said at 0:12?". The rules here:

- The clip is treated as starting ``offset_seconds`` into a longer recording. Marks sit on the
  grid ``every_seconds, 2 * every_seconds, ...`` of that recording's clock, and a mark goes
  right before the first token whose start time is at or after the mark's time. So with
  offset 0 and every 2 s the first mark is ``<2.0 seconds>``, before token ``ceil(2 * rate)``;
  a clip that ends at or before that token gets no mark at all.
- Training draws ``offset_seconds`` uniformly from ``[0, max_offset_seconds)`` per sample
  (`sample_offset`): both the labels and where they fall in the clip change from sample to
  sample, so the model learns to read the strings instead of memorising absolute positions.
  Evaluation uses offset 0.
- Labels have one decimal: ``<X.Y seconds>``.

Rate: Qwen3-Omni's audio encoder turns each 1-second chunk of 100 mel frames into 13 tokens
(three stride-2 convolutions: 100 -> 50 -> 25 -> 13; transformers' ``qwen3_omni_moe``
``_get_feat_extract_output_lengths``), i.e. 13 tokens per second for all whole seconds, about
77 ms per token; the often quoted "12.5 Hz / 80 ms" is the nominal rate of the 8x downsampling,
which drifts by one token every two seconds against the real count. The default here is the
exact 13.0; `qwen3_omni_audio_token_count` gives the exact count for a clip. For video pass the
frame rate times the tokens per frame and ``align`` = tokens per frame, so that marks fall
between frames.

Default spacing ``every_seconds = 2.0``: at 13 tokens/s that is one mark per 26 audio tokens;
a mark is about 5 tokens with a BPE vocabulary (14 with the embedded byte-level tokenizer),
so denser marks would spend a large share of the context on clock strings.

Caveat for the collator: the model fills ``<|audio_pad|>`` positions with encoder outputs in
order, so inserted text tokens do not disturb which feature lands where; but Qwen3-Omni's
``get_rope_index`` assumes an audio block's tokens are contiguous, so position ids for a
timestamped block must be computed accordingly.
"""

from __future__ import annotations

import math
import os
import random
import re
from collections.abc import Callable, Sequence
from typing import Any

from posttrain.errors import DataError, UserError

#: Qwen3-Omni audio encoder tokens per second of audio (13 per 100-frame chunk; see above).
QWEN3_OMNI_AUDIO_TOKENS_PER_SECOND = 13.0
#: Seconds between timestamp marks.
DEFAULT_EVERY_SECONDS = 2.0
#: The placeholder the Qwen-Omni processor expands to one token per audio encoder output.
AUDIO_PAD = "<|audio_pad|>"

# Tolerance for float grid arithmetic (a mark at exactly a token's start time goes before it).
_EPS = 1e-9


def format_timestamp(seconds: float) -> str:
    """``12.5`` -> ``"<12.5 seconds>"`` (one decimal, halves rounded up)."""
    tenths = math.floor(float(seconds) * 10 + 0.5 + _EPS)
    return f"<{tenths // 10}.{tenths % 10} seconds>"


def _check(num_tokens: int, tokens_per_second: float, every_seconds: float, offset_seconds: float,
           align: int = 1) -> None:
    if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
        raise UserError(f"num_tokens must be a non-negative integer, got {num_tokens!r}")
    if not tokens_per_second > 0:
        raise UserError(f"tokens_per_second must be positive, got {tokens_per_second!r} "
                        f"(Qwen3-Omni audio: {QWEN3_OMNI_AUDIO_TOKENS_PER_SECOND})")
    if not every_seconds > 0:
        raise UserError(f"every_seconds must be positive, got {every_seconds!r}")
    if not offset_seconds >= 0 or math.isinf(offset_seconds):
        raise UserError(f"offset_seconds must be a finite number >= 0, got {offset_seconds!r}")
    if isinstance(align, bool) or not isinstance(align, int) or align < 1:
        raise UserError(f"align must be a positive integer (tokens per video frame, 1 for audio), got {align!r}")


def timestamp_positions(
    num_tokens: int,
    tokens_per_second: float = QWEN3_OMNI_AUDIO_TOKENS_PER_SECOND,
    every_seconds: float = DEFAULT_EVERY_SECONDS,
    offset_seconds: float = 0.0,
    align: int = 1,
) -> list[tuple[int, float]]:
    """``(token_index, seconds)`` for each mark in a clip of ``num_tokens`` encoder tokens.

    ``seconds`` is a multiple of ``every_seconds`` on the clock of a recording the clip starts
    ``offset_seconds`` into; ``token_index`` is the first token starting at or after it (rounded
    up to a multiple of ``align``), and the mark goes before that token. Marks that would fall
    at or after the clip's end are left out.
    """
    _check(num_tokens, tokens_per_second, every_seconds, offset_seconds, align)
    positions = []
    k = math.floor(offset_seconds / every_seconds + _EPS) + 1  # first grid point after the start
    while True:
        seconds = k * every_seconds
        index = math.ceil((seconds - offset_seconds) * tokens_per_second - _EPS)
        index = -(-index // align) * align
        if index >= num_tokens:
            break
        if not positions or index > positions[-1][0]:  # marks closer than one token: keep the first
            positions.append((index, round(seconds, 6)))
        k += 1
    return positions


def sample_offset(rng: random.Random | int | str, max_offset_seconds: float, training: bool = True) -> float:
    """A training offset drawn uniformly from ``[0, max_offset_seconds)``; 0 at evaluation
    (``training=False``) or when ``max_offset_seconds`` is 0. ``rng`` may be a seed."""
    if not max_offset_seconds >= 0 or math.isinf(max_offset_seconds):
        raise UserError(f"max_offset_seconds must be a finite number >= 0, got {max_offset_seconds!r}")
    if not training or max_offset_seconds == 0:
        return 0.0
    if not isinstance(rng, random.Random):
        rng = random.Random(rng)
    return rng.random() * max_offset_seconds  # random() is in [0, 1): the bound is never reached


def _encoder(tokenizer_or_encode: Any) -> Callable[[str], list[int]]:
    if hasattr(tokenizer_or_encode, "encode"):
        tok = tokenizer_or_encode
        return lambda text: list(tok.encode(text, add_special_tokens=False))
    if callable(tokenizer_or_encode):
        return lambda text: list(tokenizer_or_encode(text))
    raise UserError(f"expected a tokenizer or an encode function (str -> list[int]), got "
                    f"{type(tokenizer_or_encode).__name__}")


def interleave_timestamps(
    audio_token_ids: Sequence[int],
    tokenizer: Any,
    tokens_per_second: float = QWEN3_OMNI_AUDIO_TOKENS_PER_SECOND,
    every_seconds: float = DEFAULT_EVERY_SECONDS,
    offset_seconds: float = 0.0,
    align: int = 1,
) -> list[int]:
    """The clip's token ids with each timestamp string's tokens inserted before its token.

    ``tokenizer`` is a Hugging Face tokenizer (``encode(text, add_special_tokens=False)`` is
    used) or any function from text to token ids. The audio ids keep their order and count.
    """
    audio = list(audio_token_ids)
    encode = _encoder(tokenizer)
    marks = dict(timestamp_positions(len(audio), tokens_per_second, every_seconds, offset_seconds, align))
    cache: dict[str, list[int]] = {}
    out: list[int] = []
    for index, token in enumerate(audio):
        if index in marks:
            label = format_timestamp(marks[index])
            if label not in cache:
                cache[label] = encode(label)
            out.extend(cache[label])
        out.append(token)
    return out


def timestamp_text(
    text: str,
    tokens_per_second: float = QWEN3_OMNI_AUDIO_TOKENS_PER_SECOND,
    every_seconds: float = DEFAULT_EVERY_SECONDS,
    offset_seconds: float | Sequence[float] = 0.0,
    pad_token: str = AUDIO_PAD,
    align: int = 1,
) -> str:
    """A prompt string with timestamp strings inserted into each run of ``pad_token``.

    Each maximal run of consecutive ``pad_token`` s (one per encoder token, as the processor
    expands them) is one clip. ``offset_seconds`` is one offset for every clip or one per clip,
    in order. Use ``pad_token="<|video_pad|>"`` with the video token rate and ``align`` for
    video.
    """
    runs = list(re.finditer(f"(?:{re.escape(pad_token)})+", text))
    if isinstance(offset_seconds, (int, float)):
        offsets = [float(offset_seconds)] * len(runs)
    else:
        offsets = [float(o) for o in offset_seconds]
        if len(offsets) != len(runs):
            raise UserError(f"timestamp_text: {len(offsets)} offsets for {len(runs)} runs of {pad_token}; "
                            "give one offset per clip, or a single number")
    pieces, last = [], 0
    for run, offset in zip(runs, offsets):
        pieces.append(text[last:run.start()])
        count = (run.end() - run.start()) // len(pad_token)
        marks = dict(timestamp_positions(count, tokens_per_second, every_seconds, offset, align))
        pieces.append("".join(format_timestamp(marks[i]) + pad_token if i in marks else pad_token
                              for i in range(count)))
        last = run.end()
    pieces.append(text[last:])
    return "".join(pieces)


def qwen3_omni_audio_token_count(num_samples: int, sample_rate: int = 16000, n_window: int = 50) -> int:
    """Qwen3-Omni's audio encoder output length for ``num_samples`` samples of audio.

    Mel frames at a 10 ms hop (ceil(seconds x 100), as the processor's feature mask counts
    them), then transformers' ``_get_feat_extract_output_lengths``: 13 tokens per whole chunk
    of ``2 * n_window`` frames, the rest through three stride-2 convolutions.
    """
    frames = math.ceil(num_samples * 100 / sample_rate - _EPS)
    if frames <= 0:
        return 0
    chunk = 2 * n_window
    rest = frames % chunk
    partial = 0
    if rest:
        partial = (((rest - 1) // 2 + 1 - 1) // 2 + 1 - 1) // 2 + 1
    return partial + (frames // chunk) * 13


def audio_token_count(seconds: float, tokens_per_second: float = QWEN3_OMNI_AUDIO_TOKENS_PER_SECOND,
                      sample_rate: int = 16000) -> int:
    """Encoder tokens for a clip of ``seconds``: Qwen3-Omni's exact count at its rate (13/s),
    otherwise ``ceil(seconds x tokens_per_second)``."""
    if tokens_per_second == QWEN3_OMNI_AUDIO_TOKENS_PER_SECOND:
        return qwen3_omni_audio_token_count(round(seconds * sample_rate), sample_rate)
    return max(0, math.ceil(seconds * tokens_per_second - _EPS))


def timestamp_layout(
    num_tokens: int,
    tokens_per_second: float = QWEN3_OMNI_AUDIO_TOKENS_PER_SECOND,
    every_seconds: float = DEFAULT_EVERY_SECONDS,
    offset_seconds: float = 0.0,
    align: int = 1,
) -> list[dict]:
    """The marks as JSON-ready dicts ``{"token_index", "seconds", "text"}``."""
    return [{"token_index": i, "seconds": s, "text": format_timestamp(s)}
            for i, s in timestamp_positions(num_tokens, tokens_per_second, every_seconds, offset_seconds, align)]


def num_tokens_of(row: dict, where: str, audio_base: str | None, tokens_per_second: float) -> int:
    """A row's clip length in tokens, from ``num_tokens`` or the duration of its ``audio`` file
    (relative paths resolved from ``audio_base``)."""
    if row.get("num_tokens") is not None:
        value = row["num_tokens"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DataError(f"{where}: num_tokens must be a non-negative integer, got {value!r}")
        return value
    audio = row.get("audio")
    if audio is None:
        raise DataError(f"{where}: needs 'num_tokens' (encoder tokens) or 'audio' (a file path)")
    if not isinstance(audio, str) or not audio.strip():
        raise DataError(f"{where}: 'audio' must be a file path, got {audio!r}")
    path = audio if os.path.isabs(audio) or audio_base is None else os.path.join(audio_base, audio)
    if not os.path.isfile(path):
        raise DataError(f"{where}: audio file {path!r} does not exist (relative paths are read from "
                        "the jsonl's folder)")
    import soundfile as sf

    try:
        info = sf.info(path)
    except Exception as e:
        raise DataError(f"{where}: cannot read audio file {path!r} ({e}); convert it to WAV or FLAC") from None
    return audio_token_count(info.frames / float(info.samplerate), tokens_per_second)
