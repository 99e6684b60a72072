"""Seed-TTS-eval style evaluation of generated speech: WER (CER for Chinese) by ASR with the
same normalisation as the ``wer`` reward, speaker similarity to the intended voice, F0
range, real-time factor of generation + decoding, and first-packet latency of streaming
output (time until the first decoded audio chunk exists).

Every Talker recipe reports through `score_speech`; ``posttrain eval tts`` writes the table
(markdown + json) and a few example wavs.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import numpy as np


@dataclass
class SpokenSample:
    """One generated utterance and how long it took."""

    text: str
    voice: str
    wav: np.ndarray
    sample_rate: int
    generate_seconds: float
    decode_seconds: float
    first_packet_seconds: float | None = None
    language: str = "en"
    extra: dict = field(default_factory=dict)

    @property
    def duration(self) -> float:
        return len(self.wav) / float(self.sample_rate)


def score_speech(samples: list[SpokenSample], reference_embeddings: dict[str, np.ndarray] | None = None,
                 extra_references: dict[str, dict[str, np.ndarray]] | None = None) -> tuple[list[dict], dict]:
    """Per-sample rows and a summary: ``wer`` (mean of per-utterance WER capped at 1),
    ``wer_uncapped``, ``wer_median``, ``speaker_similarity``, ``f0_range``, ``rtf``,
    ``first_packet_latency``. ``extra_references`` (NAME -> voice -> embedding) adds
    ``speaker_similarity_NAME`` against other references of the same voices (each sample is
    embedded once)."""
    from posttrain.audio.asr import get_asr
    from posttrain.audio.io import resample
    from posttrain.audio.prosody import prosody_features
    from rewards.wer import wer_stats, word_error_rate

    wavs16 = [resample(s.wav, s.sample_rate, 16000) if s.sample_rate != 16000 else s.wav for s in samples]
    transcripts = get_asr().transcribe(wavs16)
    rows = []
    for s, wav, hyp in zip(samples, wavs16, transcripts):
        row = {
            "text": s.text,
            "voice": s.voice,
            "transcript": hyp,
            "wer": word_error_rate(s.text, hyp, s.language),
            "seconds": round(s.duration, 3),
            "rtf": (s.generate_seconds + s.decode_seconds) / max(s.duration, 1e-6),
            "first_packet_latency": s.first_packet_seconds,
        }
        feats = prosody_features(wav, 16000, word_count=len(s.text.split()))
        row["f0_range"] = feats.f0_range_semitones
        targets = {"speaker_similarity": (reference_embeddings or {}).get(s.voice)}
        for name, refs in (extra_references or {}).items():
            targets[f"speaker_similarity_{name}"] = refs.get(s.voice)
        if any(ref is not None for ref in targets.values()):
            from posttrain.audio.speaker import cosine_similarity, embed

            try:
                emb = embed(wav, 16000, s.text)
            except Exception:  # no speech to embed: the worst similarity, not a crash
                emb = None
            for key, ref in targets.items():
                if ref is not None:
                    row[key] = cosine_similarity(emb, ref) if emb is not None else 0.0
        row.update(s.extra)
        rows.append(row)
    stats = wer_stats([r["wer"] for r in rows])

    def mean(key):
        values = [r[key] for r in rows if r.get(key) is not None]
        return float(np.mean(values)) if values else None

    summary = {
        "wer": stats["mean_capped"],
        "wer_uncapped": stats["mean_uncapped"],
        "wer_median": stats["median"],
        "speaker_similarity": mean("speaker_similarity"),
        **{f"speaker_similarity_{name}": mean(f"speaker_similarity_{name}") for name in (extra_references or {})},
        "f0_range": mean("f0_range"),
        "rtf": mean("rtf"),
        "first_packet_latency": mean("first_packet_latency"),
        "count": len(rows),
    }
    return rows, summary


def write_report(out_dir: str, rows: list[dict], summary: dict, samples: list[SpokenSample] | None = None, examples: int = 3) -> str:
    """``tts_eval.md`` + ``tts_eval.json`` and a few example wavs under ``out_dir``."""
    from posttrain.audio.io import save_wav
    from posttrain.logging import write_json_atomic, write_text_atomic

    os.makedirs(out_dir, exist_ok=True)
    write_json_atomic(os.path.join(out_dir, "tts_eval.json"), {"summary": summary, "samples": rows})
    lines = ["| metric | value |", "|---|---|"]
    for key, value in summary.items():
        lines.append(f"| {key} | {value:.4g} |" if isinstance(value, float) else f"| {key} | {value} |")
    lines += ["", "| text | voice | transcript | WER | F0 range (st) | RTF |", "|---|---|---|---|---|---|"]
    for r in rows:
        f0 = f"{r['f0_range']:.1f}" if r.get("f0_range") is not None else "-"
        wer = f"{r['wer']:.2f}" if r.get("wer") is not None else "-"
        lines.append(f"| {r['text']} | {r['voice']} | {r['transcript']} | {wer} | {f0} | {r['rtf']:.2f} |")
    path = os.path.join(out_dir, "tts_eval.md")
    write_text_atomic(path, "\n".join(lines) + "\n")
    for i, s in enumerate((samples or [])[:examples]):
        save_wav(os.path.join(out_dir, "examples", f"{i:02d}.wav"), s.wav, s.sample_rate)
    return path


def format_summary(summary: dict) -> str:
    """One line of the headline numbers."""
    parts = []
    for key in ("wer", "wer_median", "speaker_similarity", "f0_range", "rtf", "first_packet_latency"):
        value = summary.get(key)
        if value is not None:
            parts.append(f"{key} {value:.3f}")
    return ", ".join(parts)


__all__ = ["SpokenSample", "format_summary", "score_speech", "write_report", "asdict"]
