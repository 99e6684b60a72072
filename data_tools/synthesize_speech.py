"""Turn a text-query dataset into a spoken one with espeak-ng voices.

    python -m data_tools.synthesize_speech --input queries.jsonl --output spoken/queries.jsonl \\
        [--field prompt] [--voices en-us en-gb en-us+f3] [--rates 140 170 200] \\
        [--pitches 35 50 65] [--noise-snr-db 20] [--noise-colors white pink] [--seed 0]

Each input row becomes one 16 kHz mono WAV in the audio folder (default: ``<output stem>_audio/``
next to the output jsonl) and one output row that keeps every input field and adds ``audio``
(the WAV path, RELATIVE TO THE OUTPUT JSONL'S FOLDER, so the jsonl and its audio folder can be
moved together; recipes resolve it with `resolve_audio_path`), ``text`` (the spoken text, when
the input has no ``text`` field), ``voice``, ``rate`` (words per minute), ``pitch`` (0-99),
``duration`` (seconds) and, with noise, ``noise`` (colour) and ``snr_db``.

Every sample picks its voice, rate, pitch (and noise colour / SNR) from the lists with a
random generator seeded by (seed, row index), so a dataset is reproducible and a row's choice
does not depend on the other rows. A WAV's name holds a hash of its text and settings, so a rerun
skips every sample whose WAV already exists and reads back as valid audio, and a changed setting
regenerates only what it changes. WAVs are written atomically; the jsonl is written at the end,
atomically.

Library use (the recipes' embedded defaults): `synthesize_dataset(rows, out_dir, ...)`.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from posttrain.errors import AudioError, DataError, UserError

#: Built-in voices: two accents, each with a female and a male variant.
DEFAULT_VOICES: tuple[str, ...] = ("en-us", "en-gb", "en-us+f3", "en-gb+m3", "en-us+f4", "en-gb+m1")
#: Speaking rates in words per minute: slow, normal, fast.
DEFAULT_RATES: tuple[int, ...] = (140, 170, 200)
#: Base pitches (espeak-ng's 0-99 scale; 50 is the voice's own).
DEFAULT_PITCHES: tuple[int, ...] = (35, 50, 65)
NOISE_COLORS: tuple[str, ...] = ("white", "pink")
#: The rate every speech model here expects (see posttrain.audio.io.SAMPLE_RATE).
SAMPLE_RATE = 16000


def _where(row: dict, index: int, source: str) -> str:
    # read_jsonl records the line number; rows built in memory are named by position.
    if "_line" in row:
        return f"{source}, line {row['_line']}"
    return f"{source}, row {index + 1}"


def spoken_text(row: Any, index: int, field: str = "prompt", source: str = "rows") -> str:
    """The text to speak from ``row[field]``; a `DataError` naming the line when it is missing,
    not text, or empty. A conversational prompt (list of messages) gives its last user turn."""
    if not isinstance(row, dict):
        raise DataError(f"{source}, row {index + 1}: expected a dict (one JSON object per line), "
                        f"got {type(row).__name__}")
    where = _where(row, index, source)
    if field not in row:
        fields = ", ".join(sorted(k for k in row if not k.startswith("_"))) or "none"
        raise DataError(f"{where}: no field {field!r} to speak (fields: {fields}); "
                        "choose the text field with --field")
    value = row[field]
    if isinstance(value, list):  # TRL conversational prompt: speak what the user said last
        users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
        value = users[-1] if users else None
    if not isinstance(value, str):
        raise DataError(f"{where}: field {field!r} must be text (or a list of messages with a "
                        f"user turn), got {type(value).__name__}")
    if not value.strip():
        raise DataError(f"{where}: field {field!r} is empty; there is nothing to speak, so fix "
                        "or remove the line")
    return value.strip()


def _as_list(values: Any, name: str) -> list:
    if values is None:
        raise UserError(f"{name}: give at least one value")
    if isinstance(values, (str, int, float)):
        values = [values]
    values = list(values)
    if not values:
        raise UserError(f"{name}: give at least one value")
    return values


def _check_settings(voices: list[str], rates: list, pitches: list, noise_snr_db: list | None,
                    noise_colors: list[str]) -> None:
    for rate in rates:
        if not isinstance(rate, (int, float)) or not 80 <= rate <= 450:
            raise UserError(f"rate {rate!r} is out of range: espeak-ng speaks 80-450 words per minute")
    for pitch in pitches:
        if not isinstance(pitch, (int, float)) or not 0 <= pitch <= 99:
            raise UserError(f"pitch {pitch!r} is out of range: espeak-ng pitches are 0-99")
    if noise_snr_db is not None:
        for snr in noise_snr_db:
            if not isinstance(snr, (int, float)) or not np.isfinite(snr):
                raise UserError(f"noise SNR {snr!r} is not a number of dB (e.g. 20)")
        for color in noise_colors:
            if color not in NOISE_COLORS:
                raise UserError(f"unknown noise colour {color!r}; use {', '.join(NOISE_COLORS)}")
    for voice in voices:
        if not isinstance(voice, str) or not voice.strip():
            raise UserError(f"voice {voice!r} is not an espeak-ng voice name (e.g. en-us, en-gb+f3)")


def colored_noise(n: int, color: str, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of unit-power white or pink (1/f power) noise."""
    white = rng.standard_normal(n)
    if color == "white":
        noise = white
    elif color == "pink":
        # Shape white noise's spectrum by 1/sqrt(f): power falls 3 dB per octave.
        spectrum = np.fft.rfft(white)
        freqs = np.arange(spectrum.size, dtype=np.float64)
        freqs[0] = 1.0  # keep DC finite; it is removed below anyway
        noise = np.fft.irfft(spectrum / np.sqrt(freqs), n)
        noise -= noise.mean()
    else:
        raise UserError(f"unknown noise colour {color!r}; use {', '.join(NOISE_COLORS)}")
    power = float(np.mean(noise**2)) or 1.0
    return (noise / np.sqrt(power)).astype(np.float32)


def add_noise(wav: np.ndarray, snr_db: float, color: str, rng: np.random.Generator) -> np.ndarray:
    """``wav`` plus noise at ``snr_db`` dB below the speech's power, scaled down if it would clip."""
    # Speech power over the voiced samples only: espeak-ng's trailing silence would otherwise
    # lower the measured power and make the noise quieter than asked.
    active = wav[np.abs(wav) > 1e-3]
    speech_power = float(np.mean(active**2)) if active.size else float(np.mean(wav**2))
    noise = colored_noise(wav.size, color, rng) * np.sqrt(speech_power / 10 ** (snr_db / 10))
    mixed = wav + noise
    peak = float(np.max(np.abs(mixed))) if mixed.size else 0.0
    if peak > 0.99:  # scale, don't clip: clipping would change the SNR and add distortion
        mixed *= 0.99 / peak
    return mixed.astype(np.float32)


def _readable_wav(path: str) -> float | None:
    """The duration of a usable 16 kHz mono WAV at ``path``, or None (missing or broken)."""
    if not os.path.isfile(path):
        return None
    import soundfile as sf

    from posttrain.audio.io import validate_audio

    try:
        info = sf.info(path)
        if info.samplerate != SAMPLE_RATE or info.channels != 1:
            return None
        wav, sr = sf.read(path, dtype="float32", always_2d=False)
        validate_audio(wav, sr, path)
    except Exception:  # unreadable, truncated, silent, NaN: whatever it is, make it again
        return None
    return wav.shape[0] / float(sr)


def sample_settings(
    index: int,
    seed: int,
    voices: Sequence[str] = DEFAULT_VOICES,
    rates: Sequence[int] = DEFAULT_RATES,
    pitches: Sequence[int] = DEFAULT_PITCHES,
    noise_snr_db: Sequence[float] | None = None,
    noise_colors: Sequence[str] = NOISE_COLORS,
) -> dict:
    """The voice, rate, pitch (and noise colour / SNR) of row ``index``: drawn by a generator
    seeded with (seed, index), so a row's choice never depends on the other rows."""
    rng = random.Random(f"synthesize-{seed}-{index}")
    plan = {"voice": rng.choice(list(voices)), "rate": int(rng.choice(list(rates))),
            "pitch": int(rng.choice(list(pitches)))}
    if noise_snr_db is not None:
        plan["noise"] = rng.choice(list(noise_colors))
        plan["snr_db"] = float(rng.choice(list(noise_snr_db)))
    return plan


def resolve_audio_path(audio: str, jsonl_path: str) -> str:
    """An ``audio`` value of a jsonl written by this tool as a usable path: relative paths are
    relative to the jsonl's folder (absolute ones are returned as they are)."""
    if os.path.isabs(audio):
        return audio
    return os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(jsonl_path)), audio))


def synthesize_dataset(
    rows: Sequence[dict],
    out_dir: str,
    field: str = "prompt",
    voices: Sequence[str] = DEFAULT_VOICES,
    rates: Sequence[int] = DEFAULT_RATES,
    pitches: Sequence[int] = DEFAULT_PITCHES,
    noise_snr_db: float | Sequence[float] | None = None,
    noise_colors: Sequence[str] = NOISE_COLORS,
    seed: int = 0,
    progress: bool = True,
    relative_to: str | None = None,
    workers: int = 1,
    source: str = "rows",
) -> list[dict]:
    """Speak ``row[field]`` of every row into a 16 kHz mono WAV under ``out_dir``.

    Returns one new row per input row: the input's fields (bookkeeping fields starting with
    ``_`` dropped), ``text`` (added when absent), ``audio`` (absolute path, or relative to
    ``relative_to`` when given: pass the folder of the jsonl you will write), ``voice``,
    ``rate``, ``pitch``, ``duration`` (seconds) and, when ``noise_snr_db`` is set, ``noise``
    and ``snr_db``. Each row's voice, rate, pitch and noise are drawn from the lists by a
    generator seeded with (``seed``, row index). Existing valid WAVs (same text and settings)
    are reused, so an interrupted run resumes. ``workers`` > 1 runs that many espeak-ng
    processes at once. ``source`` names the rows in errors (the CLI passes the file path).

    Raises `DataError` naming the line for a missing, non-text or empty field, and `UserError`
    for an unknown voice or an out-of-range rate, pitch or noise setting.
    """
    out, _ = _synthesize_rows(rows, out_dir, field, voices, rates, pitches, noise_snr_db, noise_colors,
                              seed, progress, relative_to, workers, source)
    return out


def _synthesize_rows(rows, out_dir, field, voices, rates, pitches, noise_snr_db, noise_colors, seed,
                     progress, relative_to, workers, source) -> tuple[list[dict], int]:
    """`synthesize_dataset`, plus how many WAVs were synthesized (the rest were reused)."""
    from posttrain.audio.io import resample, save_wav, validate_audio
    from posttrain.audio.tts import synthesize

    voices = [str(v).strip() for v in _as_list(voices, "voices")]
    rates = _as_list(rates, "rates")
    pitches = _as_list(pitches, "pitches")
    snrs = None if noise_snr_db is None else _as_list(noise_snr_db, "noise_snr_db")
    colors = _as_list(noise_colors, "noise_colors")
    _check_settings(voices, rates, pitches, snrs, colors)
    texts = [spoken_text(row, i, field, source) for i, row in enumerate(rows)]  # fail before any work
    os.makedirs(out_dir, exist_ok=True)

    plans = []
    for i, (row, text) in enumerate(zip(rows, texts)):
        plan = sample_settings(i, seed, voices, rates, pitches, snrs, colors)
        # The name hashes everything the audio depends on: a rerun with other settings or an
        # edited text cannot pick up a stale WAV.
        key = repr((text, sorted(plan.items()), seed if snrs is not None else None, SAMPLE_RATE))
        digest = hashlib.sha1(key.encode("utf-8")).hexdigest()[:12]
        path = os.path.join(out_dir, f"{i:06d}-{digest}.wav")
        plans.append([i, row, text, plan, path, _readable_wav(path)])

    todo = [p for p in plans if p[5] is None]
    # An unknown voice should fail once, up front, with espeak-ng's message, not mid-run.
    for voice in sorted({p[3]["voice"] for p in todo}):
        synthesize("test", voice=voice)

    def make_one(item: list) -> float:
        i, row, text, plan, path, _ = item
        wav, sr = synthesize(text, voice=plan["voice"], rate=plan["rate"], pitch=plan["pitch"])
        wav = resample(wav, sr, SAMPLE_RATE)
        if "noise" in plan:
            noise_rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, i])
            wav = add_noise(wav, plan["snr_db"], plan["noise"], noise_rng)
        try:
            validate_audio(wav, SAMPLE_RATE, _where(row, i, source))
        except AudioError as e:
            raise DataError(f"{e} (espeak-ng voice {plan['voice']!r} speaking {text[:60]!r}); "
                            "check that the text is speakable in that voice's language") from None
        save_wav(path, wav, SAMPLE_RATE)
        return wav.shape[0] / SAMPLE_RATE

    bar = None
    if progress and todo:
        from tqdm import tqdm

        bar = tqdm(total=len(todo), desc="synthesizing", unit="utt", file=sys.stderr)
    if workers > 1:
        with ThreadPoolExecutor(max_workers=int(workers)) as pool:  # espeak-ng runs as subprocesses
            for item, duration in zip(todo, pool.map(make_one, todo)):
                item[5] = duration
                if bar is not None:
                    bar.update(1)
    else:
        for item in todo:
            item[5] = make_one(item)
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    out = []
    for i, row, text, plan, path, duration in plans:
        new = {k: v for k, v in row.items() if not k.startswith("_")}
        new.setdefault("text", text)
        new["audio"] = os.path.relpath(path, relative_to) if relative_to else os.path.abspath(path)
        new.update(plan)
        new["duration"] = round(duration, 3)
        out.append(new)
    return out, len(todo)


def _list_arg(values: list[str] | None, cast=str) -> list | None:
    # Accept both "--voices en-us en-gb" and "--voices en-us,en-gb".
    if values is None:
        return None
    out = []
    for value in values:
        for part in value.split(","):
            if part.strip():
                try:
                    out.append(cast(part.strip()))
                except ValueError:
                    raise UserError(f"{part.strip()!r} is not a number") from None
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m data_tools.synthesize_speech",
        description="Speak the text field of a jsonl dataset with espeak-ng voices (16 kHz mono WAVs) "
        "and write a jsonl that keeps every field and adds audio (path relative to the output jsonl's "
        "folder), voice, rate, pitch and duration. Reruns reuse WAVs that already exist.",
    )
    parser.add_argument("--input", "-i", required=True, help="input jsonl (or json / parquet) with a text field")
    parser.add_argument("--output", "-o", required=True, help="output jsonl")
    parser.add_argument("--audio-dir", help="folder for the WAVs (default: <output stem>_audio next to the output)")
    parser.add_argument("--field", default="prompt", help="the text field to speak (default: prompt)")
    parser.add_argument("--voices", nargs="+",
                        help=f"espeak-ng voices, optionally +variant (default: {' '.join(DEFAULT_VOICES)})")
    parser.add_argument("--rates", nargs="+",
                        help=f"speaking rates, words per minute (default: {' '.join(map(str, DEFAULT_RATES))})")
    parser.add_argument("--pitches", nargs="+",
                        help=f"base pitches 0-99 (default: {' '.join(map(str, DEFAULT_PITCHES))})")
    parser.add_argument("--noise-snr-db", nargs="+",
                        help="add noise at this SNR in dB (one value, or several to draw from); default: no noise")
    parser.add_argument("--noise-colors", nargs="+", help="noise colours to draw from: white, pink (default: both)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the per-sample choices (default: 0)")
    parser.add_argument("--workers", type=int, default=1, help="espeak-ng processes at once (default: 1)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """The command line; returns the exit status (2 for bad input, with `error: ...` on stderr)."""
    args = build_parser().parse_args(argv)
    try:
        from posttrain.data.io import load_rows, write_jsonl

        if not os.path.exists(args.input):
            raise DataError(f"input file {args.input!r} does not exist; give --input a jsonl with a "
                            f"{args.field!r} field")
        rows = load_rows(args.input)
        out_path = os.path.abspath(args.output)
        audio_dir = args.audio_dir or os.path.splitext(out_path)[0] + "_audio"
        start = time.perf_counter()
        out, made = _synthesize_rows(
            rows,
            audio_dir,
            field=args.field,
            voices=_list_arg(args.voices) or DEFAULT_VOICES,
            rates=_list_arg(args.rates, int) or DEFAULT_RATES,
            pitches=_list_arg(args.pitches, int) or DEFAULT_PITCHES,
            noise_snr_db=_list_arg(args.noise_snr_db, float),
            noise_colors=_list_arg(args.noise_colors) or NOISE_COLORS,
            seed=args.seed,
            progress=not args.quiet,
            relative_to=os.path.dirname(out_path),
            workers=max(1, args.workers),
            source=args.input,
        )
        write_jsonl(out_path, out)
        seconds = time.perf_counter() - start
        rate = f", {made / seconds:.1f} utterances/s" if made and seconds > 0 else ""
        print(f"wrote {len(out)} rows to {args.output} ({made} synthesized, {len(out) - made} reused "
              f"from {audio_dir}; {seconds:.1f} s{rate})")
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
