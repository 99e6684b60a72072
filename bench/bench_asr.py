"""Packed vs one-at-a-time ASR, measured side by side in one run.

Whisper pads every input to 30 s, so transcribing short utterances one at a time spends most
of the encoder's work on padding. Packing concatenates utterances into <= 30 s windows with
silence between them and maps the words back by time (`posttrain.audio.asr`). This bench
synthesises 24 English sentences with espeak-ng, transcribes them both ways with the embedded
faster-whisper tiny.en, and prints the CPU-time ratio, both mean WERs, and how often the two
transcripts agree after normalisation.

    python bench/bench_asr.py          # or: make bench
Goal: packed is >= 2.5x cheaper in CPU time at the same mean WER (within 0.02, or better).
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "Please call Stella and ask her to bring these things with her from the store.",
    "My phone number is eight two four, five five five, one two three four.",
    "We met Alice and Bob at the station at seven o'clock.",
    "The meeting has been moved to Thursday afternoon.",
    "She sold twenty three paintings in a single week.",
    "Open the window, the room is getting too warm.",
    "John Smith lives in London with his two dogs.",
    "The train to Paris leaves from platform nine.",
    "Water boils at one hundred degrees Celsius.",
    "Can you help me find my keys before we leave?",
    "The museum opens at ten and closes at five.",
    "Maria bought three apples and a loaf of bread.",
    "It rained all day, so we stayed inside and read books.",
    "The company hired forty new engineers this year.",
    "David plays the guitar in a small jazz band.",
    "Turn left at the next corner and walk two blocks.",
    "Our flight was delayed by almost two hours.",
    "The children are playing football in the park.",
    "I would like a cup of coffee with milk, please.",
    "Emma finished the race in fifteen minutes.",
    "The library has more than a million books.",
    "Remember to water the plants every morning.",
    "Peter and Susan are getting married in June.",
]


def _timed(fn):
    cpu, wall = time.process_time(), time.perf_counter()
    out = fn()
    return out, time.process_time() - cpu, time.perf_counter() - wall


def run(voice: str = "en-us", rate: int = 150) -> dict:
    """Measure both ways; returns ``{"asr_batched_vs_single": {...}}`` for `make bench`."""
    from posttrain.audio.asr import FasterWhisperASR
    from posttrain.audio.tts import synthesize
    from rewards.wer import normalize_text, word_error_rate

    wavs = [synthesize(s, voice=voice, rate=rate, sample_rate=16000)[0] for s in SENTENCES]
    audio_seconds = sum(len(w) for w in wavs) / 16000

    model, load_cpu, load_wall = _timed(lambda: FasterWhisperASR(packed=False))
    model.transcribe([wavs[0]])  # warm-up: first-call allocations are not per-utterance cost

    model.packed = False
    single, single_cpu, single_wall = _timed(lambda: model.transcribe(wavs))
    model.packed = True
    packed, packed_cpu, packed_wall = _timed(lambda: model.transcribe(wavs))

    wer_single = [word_error_rate(r, h) for r, h in zip(SENTENCES, single)]
    wer_packed = [word_error_rate(r, h) for r, h in zip(SENTENCES, packed)]
    agree = sum(normalize_text(a) == normalize_text(b) for a, b in zip(single, packed))
    n = len(SENTENCES)
    result = {
        "ratio": round(single_cpu / packed_cpu, 2),
        "goal": ">= 2.5",
        "unit": "CPU seconds, one-at-a-time / packed",
        "wall_ratio": round(single_wall / packed_wall, 2),
        "utterances": n,
        "audio_seconds": round(audio_seconds, 1),
        "single_cpu_s_per_utterance": round(single_cpu / n, 3),
        "packed_cpu_s_per_utterance": round(packed_cpu / n, 3),
        "mean_wer_single": round(float(np.mean(wer_single)), 4),
        "mean_wer_packed": round(float(np.mean(wer_packed)), 4),
        "wer_goal": "packed <= single + 0.02",
        "transcripts_identical": f"{agree}/{n}",
        "utterances_packed_better": int(sum(p < s for p, s in zip(wer_packed, wer_single))),
        "utterances_packed_worse": int(sum(p > s for p, s in zip(wer_packed, wer_single))),
        "model_load_cpu_s": round(load_cpu, 2),
        "model_load_wall_s": round(load_wall, 2),
        "espeak": f"{voice} at {rate} wpm",
    }
    return {"asr_batched_vs_single": result}


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
