"""The embedded speech corpus for the Talker: sentences over a bounded vocabulary, spoken by
several espeak-ng voices, encoded by the codec once and cached.

Synthesis is word by word: each word of each voice is spoken alone, trimmed, encoded once,
and utterances are the words' codes joined with short pauses. So the word-level alignment
ARIA needs comes for free, and thousands of utterances cost one synthesis per word.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

SUBJECTS = ["the cat", "the dog", "my friend", "the teacher", "a bird", "the child", "our team", "the old man"]
VERBS = ["sees", "finds", "likes", "takes", "wants", "brings", "needs", "moves"]
ADJECTIVES = ["red", "green", "blue", "big", "small", "new", "old", "warm"]
OBJECTS = ["ball", "book", "car", "house", "cup", "hat", "box", "chair"]
PLACES = ["today", "at home", "in the park", "after lunch", "every day", "near the river"]
NUMBERS = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]

VOCABULARY = sorted({w for phrase in SUBJECTS + VERBS + ADJECTIVES + OBJECTS + PLACES + NUMBERS for w in phrase.split()})


def make_sentence(rng: random.Random) -> str:
    """One sentence of the bounded grammar ("the cat sees two red cups in the park")."""
    obj = rng.choice(OBJECTS)
    count = rng.choice(NUMBERS + ["the", "a"])
    if count not in ("the", "a", "one"):
        obj = obj + ("es" if obj.endswith("x") else "s")
    parts = [rng.choice(SUBJECTS), rng.choice(VERBS), count, rng.choice(ADJECTIVES), obj]
    if rng.random() < 0.5:
        parts.append(rng.choice(PLACES))
    return " ".join(parts)


def sentence_words(sentence: str) -> list[str]:
    return sentence.split()


def all_words() -> list[str]:
    """Every word a sentence of the grammar can contain (plurals included)."""
    words = set(VOCABULARY)
    for obj in OBJECTS:
        words.add(obj + ("es" if obj.endswith("x") else "s"))
    return sorted(words)


@dataclass
class Utterance:
    text: str
    words: list[str]
    voice: int
    codes: torch.Tensor  # [groups, frames]
    spans: list[tuple[int, int]]  # frames of each word


def encode_word_clips(codec, voices: list[str], rate: int = 160) -> dict[tuple[int, str], torch.Tensor]:
    """Codes of every word of the grammar spoken alone by every voice (silence trimmed)."""
    import librosa

    from posttrain.audio.tts import synthesize

    out = {}
    for v, voice in enumerate(voices):
        for word in all_words():
            wav, _ = synthesize(word, voice=voice, rate=rate, sample_rate=codec.sample_rate)
            trimmed, _ = librosa.effects.trim(wav, top_db=35)
            if len(trimmed) < codec.samples_per_frame * 4:
                trimmed = np.pad(trimmed, (0, codec.samples_per_frame * 4 - len(trimmed)))
            out[(v, word)] = codec.encode([trimmed])[0]
    return out


def join_words(wavs: list[np.ndarray], gaps: list[float], sample_rate: int) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Word waveforms joined by silences of ``gaps`` seconds (one before the first word, one
    between each two, one after the last); returns the waveform and each word's (start, end)
    in seconds, counted in the samples actually written."""
    silences = [np.zeros(int(g * sample_rate), np.float32) for g in gaps]
    parts, times, n = [silences[0]], [], len(silences[0])
    for wav, silence in zip(wavs, silences[1:]):
        times.append((n / sample_rate, (n + len(wav)) / sample_rate))
        parts += [wav.astype(np.float32), silence]
        n += len(wav) + len(silence)
    return np.concatenate(parts), times


def speak_word_by_word(sentence: str, voice: str, sample_rate: int = 16000, rate: int = 160, pause_seconds: float = 0.06,
                       edge_seconds: float = 0.1) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """A sentence spoken one word at a time by espeak-ng and joined with short pauses, as the
    embedded corpus speaks; returns the waveform and each word's (start, end) in seconds."""
    import librosa

    from posttrain.audio.tts import synthesize

    wavs = [librosa.effects.trim(synthesize(word, voice=voice, rate=rate, sample_rate=sample_rate)[0], top_db=35)[0]
            for word in sentence.split()]
    return join_words(wavs, [edge_seconds] + [pause_seconds] * (len(wavs) - 1) + [edge_seconds], sample_rate)


def silence_codes(codec, frames: int) -> torch.Tensor:
    """Codes of ``frames`` frames of (near) silence."""
    wav = np.random.default_rng(0).normal(0, 1e-4, size=(frames + 2) * codec.samples_per_frame).astype(np.float32)
    return codec.encode([wav])[0][:, :frames]


def build_utterance(sentence: str, voice: int, clips: dict, pause: torch.Tensor) -> Utterance:
    """An utterance from word clips joined by a short pause, with its word spans."""
    parts, spans, frame = [], [], 0
    for i, word in enumerate(sentence_words(sentence)):
        if i:
            parts.append(pause)
            frame += pause.shape[1]
        codes = clips[(voice, word)]
        spans.append((frame, frame + codes.shape[1]))
        frame += codes.shape[1]
        parts.append(codes)
    return Utterance(sentence, sentence_words(sentence), voice, torch.cat(parts, dim=1), spans)


VARIED_RATES = (140, 160, 180)


def _save_cache(path: str, tensors: dict[str, torch.Tensor]) -> None:
    """A cache file written whole or not at all (temp file, then rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(tensors, tmp)
    os.replace(tmp, path)


def word_waveforms(voices: list[str], sample_rate: int, cache_root: str, rates=VARIED_RATES) -> dict[tuple[int, str, int], np.ndarray]:
    """Waveforms of every word of the grammar spoken alone by every voice at every rate
    (silence trimmed), synthesised once and cached."""
    import librosa

    from posttrain.audio.tts import synthesize

    key = hashlib.sha1(json.dumps({"v": 1, "sr": sample_rate, "voices": voices, "rates": list(rates)}).encode()).hexdigest()[:10]
    path = os.path.join(cache_root, "speech", f"word-waves-{key}.pt")
    if os.path.exists(path):
        stored = torch.load(path, weights_only=True)
        return {(int(k.split("|")[0]), k.split("|")[1], int(k.split("|")[2])): v.float().numpy() for k, v in stored.items()}
    out = {}
    for v, voice in enumerate(voices):
        for word in all_words():
            for rate in rates:
                wav, _ = synthesize(word, voice=voice, rate=rate, sample_rate=sample_rate)
                out[(v, word, rate)] = librosa.effects.trim(wav, top_db=35)[0].astype(np.float32)
    _save_cache(path, {f"{v}|{w}|{r}": torch.from_numpy(x).half() for (v, w, r), x in out.items()})
    return out


def varied_utterance(sentence: str, voice: int, waves: dict, codec, rng: random.Random, rates=VARIED_RATES) -> Utterance:
    """An utterance whose waveform is built first and encoded whole: one speaking rate per
    sentence, pauses of random length between words and at the edges, so the same word never
    has quite the same codes twice (as in a user's recordings), unlike `build_utterance`."""
    from posttrain.data.user_speech import seconds_to_frames

    rate = rng.choice(list(rates))
    words = sentence_words(sentence)
    gaps = [rng.uniform(0.05, 0.2)] + [rng.uniform(0.02, 0.15) for _ in words[1:]] + [rng.uniform(0.05, 0.2)]
    wav, times = join_words([waves[(voice, w, rate)] for w in words], gaps, codec.sample_rate)
    codes = codec.encode([wav])[0]
    return Utterance(sentence, words, voice, codes, seconds_to_frames(times, codec.frame_rate, codes.shape[1]))


def cached_word_clips(codec, cache_root: str, voices: list[str]) -> dict[tuple[int, str], torch.Tensor]:
    """`encode_word_clips`, synthesised and encoded once per codec and voice set, then cached."""
    key = hashlib.sha1(json.dumps({"v": 1, "codec": codec.config.__dict__, "voices": voices}, sort_keys=True, default=str).encode()).hexdigest()[:10]
    path = os.path.join(cache_root, "speech", f"word-clips-{key}.pt")
    if os.path.exists(path):
        stored = torch.load(path, weights_only=True)
        return {(int(k.split("|")[0]), k.split("|")[1]): v for k, v in stored.items()}
    clips = encode_word_clips(codec, voices)
    _save_cache(path, {f"{v}|{w}": c for (v, w), c in clips.items()})
    return clips


def embedded_corpus(codec, cache_root: str, voices: list[str], n_train: int, n_eval: int, seed: int = 0, style: str = "clips"):
    """(train, held-out) utterances; held-out sentences never occur in training. ``style``
    ``clips``: word clips synthesised and encoded once per codec and voice set (cached), joined
    by a fixed pause; ``varied``: each utterance's waveform built from words at one of several
    rates with random pauses and encoded whole (`varied_utterance`)."""
    if style == "varied":
        waves = word_waveforms(voices, codec.sample_rate, cache_root)
        varied_rng = random.Random(f"varied-{seed}")
        make = lambda s, v: varied_utterance(s, v, waves, codec, varied_rng)  # noqa: E731
    else:
        clips, pause = cached_word_clips(codec, cache_root, voices), silence_codes(codec, 3)
        make = lambda s, v: build_utterance(s, v, clips, pause)  # noqa: E731
    rng = random.Random(seed)
    held_out_sentences = set()
    while len(held_out_sentences) < n_eval:
        held_out_sentences.add(make_sentence(random.Random(f"eval-{seed}-{len(held_out_sentences)}-{rng.random()}")))
    held_out = [make(s, i % len(voices)) for i, s in enumerate(sorted(held_out_sentences))]
    train = []
    while len(train) < n_train:
        s = make_sentence(rng)
        if s in held_out_sentences:
            continue
        train.append(make(s, rng.randrange(len(voices))))
    return train, held_out


def concat_utterances(utterances: list[Utterance], pause: torch.Tensor) -> Utterance:
    """One long utterance from several of the same voice (long-context training and tests)."""
    parts, spans, words, frame = [], [], [], 0
    for i, u in enumerate(utterances):
        if i:
            parts.append(pause)
            frame += pause.shape[1]
        parts.append(u.codes)
        spans += [(a + frame, b + frame) for a, b in u.spans]
        words += u.words
        frame += u.codes.shape[1]
    return Utterance(" ".join(u.text for u in utterances), words, utterances[0].voice, torch.cat(parts, dim=1), spans)


def word_token_groups(tokenizer, words: list[str]) -> list[list[int]]:
    """Text tokens of each word as the tokenizer splits the whole sentence (a word after the
    first carries its leading space, as byte-level BPE sees it)."""
    return [tokenizer(("" if i == 0 else " ") + w, add_special_tokens=False)["input_ids"] for i, w in enumerate(words)]
