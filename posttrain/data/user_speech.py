"""The user's speech data for the Talker: (audio, transcript) rows, validated, word-aligned,
encoded by the codec once and cached.

A row is a JSON object with
  ``audio``    path of the recording (relative paths are resolved from the data file's folder)
  ``text``     its transcript (``transcript`` is accepted too)
  ``speaker``  optional voice name (``voice`` is accepted too; default ``"user"``)
  ``words``    optional word timings ``[{"word", "start", "end"}]`` in seconds (skips the ASR)
or, as written by ``data_tools/aria_interleave``, already encoded:
  ``codes`` ``[groups][frames]``, ``word_frames`` ``[[start, end], ...]``, ``codec`` (its settings).

Word-level alignment, which ARIA needs, comes from the ASR's word timestamps: the transcript's
words are matched to the recognised words (difflib on normalised words); words the ASR missed
get times interpolated between their matched neighbours in proportion to their length.
``alignment="proportional"`` skips the ASR and spreads the words over the speech region
(for languages the packaged English ASR cannot hear).

Bad rows (missing or unreadable audio, too short, too long, silent, empty transcript, more
words than frames) are named with file, line and what to do; ``on_bad="skip"`` reports each and
goes on, ``"fail"`` stops at the first.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
import unicodedata
from dataclasses import dataclass, field

import numpy as np
import torch

from posttrain.data.io import load_rows
from posttrain.data.speech_corpus import Utterance
from posttrain.errors import ConfigError, DataError

CACHE_VERSION = 1


@dataclass
class UserSpeech:
    """Encoded utterances (``voice`` indexes ``speakers``), per-speaker reference embeddings
    for speaker similarity, and the rows that were skipped (with why)."""

    utterances: list[Utterance]
    speakers: list[str]
    references: dict[str, np.ndarray] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)


def normalise_word(word: str) -> str:
    """Lower case, accents kept, punctuation dropped: how words are compared for alignment."""
    word = unicodedata.normalize("NFKC", word).lower()
    return "".join(ch for ch in word if ch.isalnum() or ch == "'").strip("'")


def codec_fingerprint(codec) -> dict:
    """What codes depend on: the codec's settings and (for learned codecs) its codebooks."""
    info = {"frame_rate": float(codec.frame_rate), "groups": int(codec.num_groups), "codebook_size": int(codec.codebook_size)}
    books = getattr(codec, "codebooks", None)
    if isinstance(books, torch.Tensor):
        info["codebooks"] = hashlib.sha1(books.detach().cpu().numpy().tobytes()).hexdigest()[:12]
    return info


def check_codec_match(stored: dict, codec, where: str) -> None:
    """Codes made by one codec are meaningless to another: name the setting that differs."""
    mine = codec_fingerprint(codec)
    keys = {"groups": "codec.groups", "codebook_size": "codec.codebook_size", "frame_rate": "codec.frame_rate"}
    for k, key in keys.items():
        if k in stored and float(stored[k]) != float(mine[k]):
            raise ConfigError(
                f"{where}: the codes were made with {key}={stored[k]:g} but this run's codec has {key}={mine[k]:g}; "
                f"set {key}={stored[k]:g} or re-encode the audio with this codec (data_tools/aria_interleave)"
            )
    if "codebooks" in stored and "codebooks" in mine and stored["codebooks"] != mine["codebooks"]:
        raise ConfigError(
            f"{where}: the codes were made by another codec (codebooks {stored['codebooks']}, this run's {mine['codebooks']}); "
            "re-encode the audio with this run's codec (data_tools/aria_interleave), or use the codec they were made with"
        )


def align_words(words: list[str], recognised: list, duration: float, speech: tuple[float, float]) -> tuple[list[tuple[float, float]], int]:
    """``(start, end)`` seconds for each transcript word, and how many came from the ASR.

    ``recognised`` are ASR words (``.text``, ``.start``, ``.end``); ``speech`` is the region
    holding speech (silence trimmed), used where no recognised word anchors the times."""
    n = len(words)
    times: list[tuple[float, float] | None] = [None] * n
    if recognised:
        mine = [normalise_word(w) for w in words]
        theirs = [normalise_word(w.text) for w in recognised]
        matcher = difflib.SequenceMatcher(None, mine, theirs, autojunk=False)
        for block in matcher.get_matching_blocks():
            for k in range(block.size):
                w = recognised[block.b + k]
                times[block.a + k] = (max(0.0, float(w.start)), min(duration, max(float(w.end), float(w.start))))
    matched = sum(t is not None for t in times)
    # fill each run of unmatched words between anchors, in proportion to the word lengths
    i = 0
    while i < n:
        if times[i] is not None:
            i += 1
            continue
        j = i
        while j < n and times[j] is None:
            j += 1
        left = times[i - 1][1] if i > 0 else speech[0]
        right = times[j][0] if j < n else speech[1]
        if right < left:
            right = left
        weights = np.array([max(1, len(words[k])) for k in range(i, j)], dtype=float)
        edges = left + (right - left) * np.concatenate([[0.0], np.cumsum(weights) / weights.sum()])
        for k in range(i, j):
            times[k] = (float(edges[k - i]), float(edges[k - i + 1]))
        i = j
    # monotone: a word never starts before the previous one ends
    out, last = [], 0.0
    for a, b in times:  # type: ignore[misc]
        a = max(a, last)
        b = max(b, a)
        out.append((a, b))
        last = b
    return out, matched


def snap_boundaries(times: list[tuple[float, float]], wav: np.ndarray, sr: int, search: float = 0.15, hop: float = 0.01) -> list[tuple[float, float]]:
    """Move each boundary between two words to the quietest 10 ms within ``search`` seconds of
    it (ASR word times are coarse, often a tenth of a second off; pauses and stop closures
    between words are energy minima)."""
    if len(times) < 2:
        return times
    h = max(1, int(sr * hop))
    frames = len(wav) // h
    if frames < 3:
        return times
    energy = np.sqrt(np.mean(wav[: frames * h].reshape(frames, h).astype(np.float64) ** 2, axis=1))
    out = [list(t) for t in times]
    for i in range(len(out) - 1):
        middle = 0.5 * (out[i][1] + out[i + 1][0])
        lo = max(int((middle - search) / hop), int(out[i][0] / hop) + 1)
        hi = min(int((middle + search) / hop), int(out[i + 1][1] / hop) - 1, frames - 1)
        if hi <= lo:
            continue
        cut = (lo + int(np.argmin(energy[lo : hi + 1]))) * hop
        out[i][1] = min(out[i][1], cut)  # word i ends by the cut, word i + 1 starts after it
        out[i + 1][0] = max(out[i + 1][0], cut)
    return [(a, max(a, b)) for a, b in out]


def seconds_to_frames(times: list[tuple[float, float]], frame_rate: float, num_frames: int) -> list[tuple[int, int]]:
    """Frame spans of word times: every word gets at least one frame, spans in order."""
    spans, last = [], 0
    n = len(times)
    for i, (a, b) in enumerate(times):
        start = min(max(int(np.floor(a * frame_rate)), last), num_frames - (n - i))
        end = max(start + 1, min(int(np.ceil(b * frame_rate)), num_frames - (n - i - 1)))
        spans.append((start, end))
        last = end
    return spans


def _row_text(row: dict, where: str) -> str:
    text = row.get("text", row.get("transcript"))
    if text is None:
        raise DataError(f"{where}: missing field 'text' (the transcript of the recording)")
    if not isinstance(text, str) or not text.strip():
        raise DataError(f"{where}: the transcript is empty; write what is said in the recording in 'text', or remove the line")
    return " ".join(text.split())


def _row_speaker(row: dict, where: str) -> str:
    speaker = row.get("speaker", row.get("voice", "user"))
    if not isinstance(speaker, str) or not speaker.strip():
        raise DataError(f"{where}: field 'speaker' must be a non-empty string, got {speaker!r}")
    return speaker.strip()


def _given_word_times(row: dict, words: list[str], where: str) -> list[tuple[float, float]] | None:
    given = row.get("words")
    if given is None:
        return None
    if not isinstance(given, list) or len(given) != len(words):
        raise DataError(f"{where}: field 'words' must list one {{word, start, end}} per transcript word ({len(words)}), got {len(given) if isinstance(given, list) else type(given).__name__}")
    out = []
    for k, item in enumerate(given):
        try:
            out.append((float(item["start"]), float(item["end"])))
        except (KeyError, TypeError, ValueError):
            raise DataError(f"{where}: words[{k}] must be an object with numeric 'start' and 'end' (seconds), got {item!r}") from None
    return out


def _encoded_row(row: dict, codec, words: list[str], where: str) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """A row that already carries codes (from data_tools/aria_interleave)."""
    check_codec_match(row.get("codec") or {}, codec, where)
    try:
        codes = torch.tensor(row["codes"], dtype=torch.long)
    except (TypeError, ValueError):
        raise DataError(f"{where}: field 'codes' must be a [groups][frames] list of integers") from None
    codec.check_codes(codes, where)
    spans = row.get("word_frames")
    if not isinstance(spans, list) or len(spans) != len(words):
        raise DataError(f"{where}: field 'word_frames' must hold one [start, end] per transcript word ({len(words)})")
    return codes, [(int(a), int(b)) for a, b in spans]


@dataclass
class _Row:
    """A checked row on its way to an utterance: audio to encode and align, or codes given."""

    line: int
    text: str
    words: list[str]
    voice: int
    wav: np.ndarray | None
    codes: torch.Tensor | None
    spans: list[tuple[int, int]] | None
    times: list[tuple[float, float]] | None  # word times given by the row


def load_user_speech(
    path: str,
    codec,
    cache_dir: str | None,
    on_bad: str = "fail",
    min_seconds: float = 0.3,
    max_seconds: float = 20.0,
    alignment: str = "asr",
    asr_language: str | None = "en",
    reference_clips: int = 8,
    progress: bool = True,
) -> UserSpeech:
    """Validate, align and encode the rows of ``path`` (cached by file contents and codec)."""
    from tqdm.auto import tqdm

    from posttrain.audio.io import is_silent, load_audio, resample, validate_audio

    rows = load_rows(path)
    base = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else os.getcwd()
    key_source = json.dumps(
        {"v": CACHE_VERSION, "rows": [{k: v for k, v in r.items() if k != "_line"} for r in rows], "codec": codec_fingerprint(codec),
         "mtimes": [_mtime(os.path.join(base, r["audio"])) if isinstance(r.get("audio"), str) else None for r in rows],
         "limits": [min_seconds, max_seconds], "on_bad": on_bad, "alignment": alignment, "language": asr_language},
        sort_keys=True, default=str,
    )
    key = hashlib.sha1(key_source.encode()).hexdigest()[:12]
    cache_path = os.path.join(cache_dir, "speech", f"user-{key}.pt") if cache_dir else None
    if cache_path and os.path.exists(cache_path):
        stored = torch.load(cache_path, weights_only=True)
        for message in stored["skipped"]:
            print(f"skipped {message}", flush=True)
        return UserSpeech(
            [Utterance(u["text"], u["words"], u["voice"], u["codes"], [tuple(s) for s in u["spans"]]) for u in stored["utterances"]],
            stored["speakers"], {k: np.asarray(v) for k, v in stored["references"].items()}, stored["skipped"], stored["lines"],
        )

    speakers: list[str] = []
    pending: list[_Row] = []
    skipped: list[str] = []

    sr = codec.sample_rate
    for row in tqdm(rows, desc="checking recordings", disable=not progress, leave=False):
        where = f"{path}, line {row.get('_line', '?')}"
        try:
            text = _row_text(row, where)
            words = text.split()
            speaker = _row_speaker(row, where)
            if "codes" in row:
                codes, spans = _encoded_row(row, codec, words, where)
                wav, times = None, None
            else:
                audio = row.get("audio")
                if not isinstance(audio, str) or not audio.strip():
                    raise DataError(f"{where}: missing field 'audio' (the path of the recording)")
                audio_path = audio if os.path.isabs(audio) else os.path.join(base, audio)
                if not os.path.isfile(audio_path):
                    raise DataError(f"{where}: audio file {audio!r} does not exist (looked for {audio_path}; relative paths are resolved from the data file's folder)")
                try:
                    wav = load_audio(audio_path, sr)  # files over an hour are refused from the header
                except DataError as e:
                    raise DataError(f"{where}: {e}") from None
                validate_audio(wav, sr, f"{where} ({audio})", min_seconds=min_seconds, max_seconds=max_seconds)
                codes, spans = None, None
                times = _given_word_times(row, words, where)
                frames = int(len(wav) // codec.samples_per_frame)
                if len(words) > frames:
                    raise DataError(f"{where} ({audio}): {len(words)} words in {len(wav) / sr:.2f} s of audio; the transcript does not belong to this recording")
        except DataError as e:  # one bad recording: skipped or fatal, as configured
            if on_bad != "skip":
                raise DataError(f"{e} (or set data.on_bad=skip to leave such rows out)") from None
            skipped.append(str(e))
            print(f"skipped {e}", flush=True)
            continue
        if speaker not in speakers:
            speakers.append(speaker)
        pending.append(_Row(row.get("_line", 0), text, words, speakers.index(speaker), wav, codes, spans, times))
    if not pending:
        raise DataError(f"{path}: no usable recordings ({len(skipped)} skipped); see the messages above")

    # word times from the ASR, for rows that have neither codes nor given times
    need_asr = [i for i, p in enumerate(pending) if p.wav is not None and p.times is None]
    recognised: dict[int, list] = {}
    if need_asr and alignment == "asr":
        from posttrain.audio.asr import get_asr

        asr = get_asr(language=asr_language)
        batch = 16
        for s in tqdm(range(0, len(need_asr), batch), desc="aligning words (ASR)", disable=not progress, leave=False):
            idx = need_asr[s : s + batch]
            wavs16 = [resample(pending[i].wav, sr, asr.sample_rate) for i in idx]
            for i, ws in zip(idx, asr.transcribe_with_words(wavs16)):
                recognised[i] = ws

    import librosa

    utterances, lines, anchored, total_words = [], [], 0, 0
    for i, r in enumerate(tqdm(pending, desc="encoding recordings", disable=not progress, leave=False)):
        words, wav, codes, spans, times = r.words, r.wav, r.codes, r.spans, r.times
        if codes is None:
            codes = codec.encode([wav])[0]
            duration = len(wav) / sr
            if times is None:
                _, (a, b) = librosa.effects.trim(wav, top_db=35)
                times, n_matched = align_words(words, recognised.get(i, []), duration, (a / sr, b / sr))
                times = snap_boundaries(times, wav, sr)
                anchored += n_matched
            else:
                anchored += len(words)
            total_words += len(words)
            spans = seconds_to_frames(times, codec.frame_rate, codes.shape[1])
        utterances.append(Utterance(r.text, words, r.voice, codes, spans))
        lines.append(r.line)
    if total_words:
        print(f"word alignment: {anchored}/{total_words} words timed by {'the ASR' if alignment == 'asr' else 'the data'}, the rest interpolated", flush=True)

    references = {}
    from posttrain.audio.speaker import embed

    for v, name in enumerate(speakers):
        clips = [p.wav for p in pending if p.voice == v and p.wav is not None and not is_silent(p.wav)][:reference_clips]
        if clips:
            references[name] = np.mean([embed(c, sr, f"speaker {name}") for c in clips], axis=0)
    result = UserSpeech(utterances, speakers, references, skipped, lines)
    if cache_path:
        os.makedirs(os.path.dirname(cache_path), exist_ok=True)
        tmp = f"{cache_path}.tmp-{os.getpid()}"
        torch.save({
            "utterances": [{"text": u.text, "words": u.words, "voice": u.voice, "codes": u.codes, "spans": u.spans} for u in utterances],
            "speakers": speakers, "references": {k: v.tolist() for k, v in references.items()}, "skipped": skipped, "lines": lines,
        }, tmp)
        os.replace(tmp, cache_path)
    return result


def _mtime(path: str) -> float | None:
    try:
        st = os.stat(path)
        return st.st_mtime + st.st_size
    except OSError:
        return None
