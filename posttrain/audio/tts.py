"""Speech synthesis with espeak-ng: the offline voice behind the embedded default's spoken data.

espeak-ng is a formant synthesiser: robotic, but intelligible, deterministic, fast (tens of
milliseconds per sentence), with 100+ voice variants and SSML control of pitch, range and rate.
It is a Debian package (``apt-get install espeak-ng``), run as a subprocess with an argument
list (never through a shell) and the text on stdin, so no text can be read as an option.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from xml.sax.saxutils import escape

import numpy as np

from posttrain.errors import UserError

ESPEAK = "espeak-ng"
#: espeak-ng always writes 22.05 kHz mono 16-bit WAV.
ESPEAK_SAMPLE_RATE = 22050


@dataclass(frozen=True)
class Voice:
    """One espeak-ng voice: ``name`` is what `synthesize` takes as ``voice``."""

    name: str
    language: str
    gender: str
    description: str


def espeak_binary() -> str:
    """The path of the espeak-ng executable, or a `UserError` saying how to install it."""
    path = shutil.which(ESPEAK)
    if path is None:
        raise UserError(
            "espeak-ng is not installed, and speech synthesis needs it: run "
            "`apt-get install espeak-ng` (Debian/Ubuntu), `brew install espeak-ng` (macOS), "
            "or `make setup`, which installs it"
        )
    return path


def synthesize(
    text: str,
    voice: str = "en-us",
    rate: int = 175,
    pitch: int = 50,
    pitch_range: int | None = None,
    amplitude: int = 100,
    word_gap: int = 0,
    ssml: bool = False,
    sample_rate: int | None = None,
) -> tuple[np.ndarray, int]:
    """Speak ``text`` with espeak-ng; returns ``(wav, sr)``, ``wav`` float32 mono in [-1, 1].

    Args:
        voice: an espeak-ng voice (``"en-us"``, ``"en-gb-x-rp"``), optionally with a variant
            (``"en-us+f3"``, ``"en-us+m1"``); see `list_voices` and `list_variants`.
        rate: speaking rate in words per minute (espeak-ng's ``-s``; 80-450).
        pitch: base pitch, 0-99 (``-p``; 50 is the voice's default).
        pitch_range: intonation range in percent of the voice's normal range (SSML
            ``<prosody range>``): 0 gives flat, monotone speech, 100 normal, 200 exaggerated.
            ``None`` leaves the voice's own.
        amplitude: loudness, 0-200 (``-a``).
        word_gap: extra pause between words, in units of 10 ms (``-g``).
        ssml: ``text`` is SSML markup (``<speak>...</speak>``) rather than plain text.
        sample_rate: resample the result to this rate (default: espeak-ng's 22050 Hz).
    """
    binary = espeak_binary()
    _check_variant(voice)
    if pitch_range is not None:
        body = text if ssml else escape(text)
        if ssml and body.lstrip().startswith("<speak"):
            raise UserError("synthesize(): give either pitch_range or a full <speak> SSML document, not both")
        text = f'<speak><prosody range="{int(pitch_range)}%">{body}</prosody></speak>'
        ssml = True
    fd, wav_path = tempfile.mkstemp(suffix=".wav", prefix="espeak_")
    os.close(fd)
    args = [binary, "-v", voice, "-s", str(int(rate)), "-p", str(int(pitch)), "-a", str(int(amplitude)),
            "-g", str(int(word_gap)), "-b", "1", "-w", wav_path, "--stdin"]
    if ssml:
        args.insert(1, "-m")
    try:
        result = subprocess.run(args, input=text.encode("utf-8"), capture_output=True, timeout=120)
        if result.returncode != 0:
            raise UserError(
                f"espeak-ng failed for voice {voice!r} (exit {result.returncode}): "
                f"{result.stderr.decode(errors='replace').strip()}; see `espeak-ng --voices` for voices"
            )
        import soundfile as sf

        data, sr = sf.read(wav_path, dtype="float32", always_2d=False)
    finally:
        if os.path.exists(wav_path):
            os.unlink(wav_path)
    stderr = result.stderr.decode(errors="replace")
    if data.size == 0 and text.strip():
        raise UserError(f"espeak-ng produced no speech for voice {voice!r}: {stderr.strip() or 'no output'}; "
                        "see `espeak-ng --voices` for the installed voices")
    wav = np.asarray(data, dtype=np.float32)
    if sample_rate is not None and sample_rate != sr:
        from posttrain.audio.io import resample

        wav, sr = resample(wav, sr, sample_rate), sample_rate
    return wav, int(sr)


def _check_variant(voice: str) -> None:
    # espeak-ng silently falls back to the plain voice for an unknown variant; a user asking
    # for "en-us+f9" should hear about the typo, not get a different voice.
    if "+" in voice:
        variant = voice.split("+", 1)[1]
        if variant.lower() not in {v.lower() for v in list_variants()}:
            raise UserError(f"espeak-ng has no voice variant {variant!r} (in voice {voice!r}); "
                            f"variants: {', '.join(sorted(list_variants(), key=str.lower))}")


def _voices_table(argument: str) -> list[list[str]]:
    out = subprocess.run([espeak_binary(), argument], capture_output=True, text=True, timeout=60).stdout
    rows = []
    for line in out.splitlines()[1:]:  # first line is the header
        fields = line.split()
        if len(fields) >= 5:
            rows.append(fields)
    return rows


@functools.lru_cache(maxsize=None)
def list_voices(language: str | None = None) -> list[Voice]:
    """The espeak-ng voices, optionally only those whose language starts with ``language``.

    MBROLA voices are left out: they need separately installed MBROLA databases.
    """
    voices = []
    for fields in _voices_table("--voices" if language is None else f"--voices={language}"):
        _, lang, age_gender, name, path = fields[:5]
        if path.startswith("mb/") or path.startswith("!v/"):
            continue
        voices.append(Voice(name=lang, language=lang, gender=age_gender.split("/")[-1], description=name))
    return voices


@functools.lru_cache(maxsize=None)
def list_variants() -> list[str]:
    """Voice variants (``"f3"``, ``"m1"``, ``"klatt"``...), used as ``voice="en-us+f3"``."""
    return [fields[4].split("/", 1)[1] for fields in _voices_table("--voices=variant") if fields[4].startswith("!v/")]
