"""Speech rewards (wer, prosody, speaker_similarity) on real espeak-ng speech through the real
embedded ASR and speaker encoder: they must rank good speech above bad."""

from __future__ import annotations

import math
import random
from types import SimpleNamespace

import numpy as np
import pytest

from posttrain.audio.io import save_wav
from posttrain.audio.speaker import embed
from posttrain.audio.tts import synthesize
from posttrain.errors import AudioError, ModelError, RewardError
from posttrain.registry import RewardSet
from rewards._text_norm import normalize_text
from rewards.asr_likelihood import asr_likelihood, reference_logprobs
from rewards.prosody import prosody
from rewards.speaker import speaker_similarity
from rewards.wer import TRANSFORMS, transcribe_and_score, wer, wer_stats, word_error_rate

SR = 16000

SENTENCES = [
    "Please call Stella and ask her to bring these things with her from the store.",
    "My phone number is eight two four, five five five, one two three four.",
    "We met Alice and Bob at the station at seven o'clock.",
    "She sold twenty three paintings in a single week.",
    "Open the window, the room is getting too warm.",
    "John Smith lives in London with his two dogs.",
    "The train to Paris leaves from platform nine.",
    "Water boils at one hundred degrees Celsius.",
    "Can you help me find my keys before we leave?",
    "The museum opens at ten and closes at five.",
    "It rained all day, so we stayed inside and read books.",
    "The company hired forty new engineers this year.",
    "Turn left at the next corner and walk two blocks.",
    "Our flight was delayed by almost two hours.",
    "The children are playing football in the park.",
    "I would like a cup of coffee with milk, please.",
    "The library has more than a million books.",
    "Peter and Susan are getting married in June.",
    "Doctor Brown will see you at half past three.",
    "The package weighs about twelve kilograms.",
    "Mount Everest is the highest mountain in the world.",
    "Sarah drove from Boston to Chicago in two days.",
]


def corrupt(sentence: str, rng: random.Random) -> str:
    """The sentence with one word dropped and two neighbouring words swapped."""
    words = sentence.rstrip(".?!").split()
    del words[rng.randrange(1, len(words) - 1)]
    j = rng.randrange(0, len(words) - 1)
    words[j], words[j + 1] = words[j + 1], words[j]
    return " ".join(words) + "."


@pytest.fixture(scope="session")
def speech_files(tmp_path_factory):
    """The SENTENCES, and corrupted versions of them, spoken once per session and saved as WAV."""
    root = tmp_path_factory.mktemp("speech")
    rng = random.Random(0)
    good, bad, flat = [], [], []
    for i, sentence in enumerate(SENTENCES):
        good.append(save_wav(root / f"good_{i:02d}.wav", *synthesize(sentence, rate=150)))
        bad.append(save_wav(root / f"bad_{i:02d}.wav", *synthesize(corrupt(sentence, rng), rate=150)))
        flat.append(save_wav(root / f"flat_{i:02d}.wav", *synthesize(sentence, rate=150, pitch_range=0)))
    return {"good": good, "bad": bad, "flat": flat}


@pytest.fixture(scope="session")
def good_scores(speech_files):
    return transcribe_and_score(SENTENCES, [""] * len(SENTENCES), audio=speech_files["good"])


# -- text normalisation and WER ----------------------------------------------------------


def test_digits_are_split_on_both_sides_after_normalisation():
    assert normalize_text("eight two four") == "8 2 4"
    assert normalize_text("8, 2, 4") == "8 2 4"
    # The Whisper normaliser alone fuses comma-separated spoken groups into one number.
    assert normalize_text("eight two four, five five five") == "8 2 4 5 5 5"
    assert word_error_rate("Call 824-555-1234 now!", "call eight two four five five five one two three four now") == 0.0
    assert word_error_rate("Room 824.", "room eight two five") == pytest.approx(1 / 4)


def test_normalisation_follows_seed_tts_eval():
    assert normalize_text("It's SEVEN o'clock, Mr. Smith!") == normalize_text("it is 7 o'clock mister smith")
    assert normalize_text("well-known colour") == "well known color"
    assert word_error_rate("Hello, world!", "hello world") == 0.0
    assert word_error_rate("a b c d", "a x c d e f") == pytest.approx(3 / 4)  # uncapped: can pass 1
    assert word_error_rate("a b", "a b c d e f") == pytest.approx(2.0)
    assert word_error_rate("!!!", "anything") is None
    assert word_error_rate("你好，世界！", "你好世", language="zh") == pytest.approx(1 / 4)  # CER


def test_wer_stats_reports_capped_and_uncapped_means():
    stats = wer_stats([0.0, 0.5, 3.0, None])
    assert stats == {"mean_capped": pytest.approx(0.5), "mean_uncapped": pytest.approx(3.5 / 3),
                     "median": 0.5, "count": 3}
    assert wer_stats([None])["mean_capped"] is None


def test_transforms():
    assert TRANSFORMS["1-tanh(3*wer)"](0.0) == 1.0
    assert TRANSFORMS["1-tanh(3*wer)"](1.0) == pytest.approx(1 - math.tanh(3))
    assert TRANSFORMS["neg_wer"](0.25) == -0.25 and TRANSFORMS["1-wer"](0.25) == 0.75


# -- wer reward on real speech -----------------------------------------------------------


def test_espeak_speech_through_embedded_asr_has_low_wer(good_scores):
    wers = [s["wer"] for s in good_scores]
    stats = wer_stats(wers)
    assert stats["mean_capped"] <= 0.2, [(s["reference"], s["transcript"]) for s in good_scores if s["wer"] > 0]
    assert stats["median"] == 0.0
    # The spoken phone number comes back as digits and still scores (digit splitting).
    phone = good_scores[1]
    assert any(c.isdigit() for c in phone["transcript"]) and phone["wer"] <= 0.1, phone


def test_dropped_and_swapped_words_score_lower_even_in_the_same_packed_batch(speech_files):
    # Good and corrupted takes of the same sentence sit next to each other in one call, as
    # the rollouts of one prompt do in a GSPO group, so they share ASR windows.
    n = len(SENTENCES)
    audio = [a for pair in zip(speech_files["good"], speech_files["bad"]) for a in pair]
    prompts = [s for s in SENTENCES for _ in range(2)]
    rewards = wer(prompts, [""] * 2 * n, audio=audio)
    good, bad = np.array(rewards[0::2]), np.array(rewards[1::2])
    assert good.mean() > 0.6 and bad.mean() < good.mean() - 0.25
    assert np.mean(good > bad) >= 0.85
    assert all(0.0 <= r <= 1.0 for r in rewards)


def test_wer_reward_accepts_arrays_dicts_text_column_and_chat_prompts():
    sentence = SENTENCES[5]
    wav22, sr22 = synthesize(sentence, rate=150)
    chat_prompt = [{"role": "user", "content": sentence}]
    by_array = wer([chat_prompt], ["x"], audio=[wav22], sample_rate=[sr22], transform="1-wer")
    by_dict = wer(["ignored prompt"], ["x"], audio=[{"array": wav22, "sampling_rate": sr22}],
                  text=[sentence], transform="1-wer")
    assert by_array == by_dict == [1.0]


def test_wer_reward_caps_at_one_and_handles_silence_and_empty_references():
    wav, sr = synthesize("the cat sat on the mat and then the dog sat on the log", rate=150)
    out = wer(["a", "!!!", "hello"], [""] * 3, audio=[wav, wav, np.zeros(sr, np.float32)],
              sample_rate=sr, transform="neg_wer")
    assert out[0] == -1.0  # 13 inserted words against a one-word reference: capped at 1
    assert out[1] is None  # nothing to compare against: no opinion
    assert out[2] == -1.0  # silence transcribes to nothing


def test_wer_reward_errors_name_the_sample(tmp_path, speech_files):
    with pytest.raises(AudioError, match=r"sample 1: .*missing\.wav.*does not exist"):
        wer(["a", "b"], ["", ""], audio=[speech_files["good"][0], str(tmp_path / "missing.wav")])
    with pytest.raises(RewardError, match="unknown transform"):
        wer(["a"], [""], audio=[speech_files["good"][0]], transform="exp(-wer)")
    with pytest.raises(ModelError, match="English-only"):
        wer(["你好"], [""], audio=[speech_files["good"][0]], language=["zh"])


def test_wer_runs_through_the_reward_registry(speech_files):
    # A spec is what the config gives the registry: name, weight, params.
    spec = SimpleNamespace(name="rewards.wer:wer", weight=1.0, params={"transform": "1-wer"})
    rewards = RewardSet([spec])
    combined, per_reward = rewards.score(SENTENCES[:2], ["", ""], audio=speech_files["good"][:2])
    assert per_reward["wer"] == combined and all(v >= 0.8 for v in combined)  # at most one word in five misheard


# -- asr_likelihood ----------------------------------------------------------------------


def test_asr_likelihood_ranks_the_right_words_above_corrupted_ones_and_is_deterministic(speech_files):
    n = len(SENTENCES)
    good = asr_likelihood(SENTENCES, [""] * n, audio=speech_files["good"])
    bad = asr_likelihood(SENTENCES, [""] * n, audio=speech_files["bad"])
    assert all(0.0 <= r <= 1.0 for r in good + bad)
    # the reference read against its own audio beats it read against audio missing a word
    assert np.mean(np.array(good) > np.array(bad)) >= 0.9
    assert np.mean(good) > np.mean(bad) + 0.1  # (0.1 = one nat per token)
    assert asr_likelihood(SENTENCES[:3], [""] * 3, audio=speech_files["good"][:3]) == good[:3]  # same audio, same reward


def test_asr_likelihood_is_the_geometric_mean_token_probability(speech_files):
    logps = reference_logprobs(SENTENCES[:2], ["", ""], audio=speech_files["good"][:2])
    assert all(len(lp) >= 10 and all(v <= 0.0 for v in lp) for lp in logps)  # one per reference token
    rewards = asr_likelihood(SENTENCES[:2], ["", ""], audio=speech_files["good"][:2], transform="prob")
    assert rewards == pytest.approx([math.exp(sum(lp) / len(lp)) for lp in logps])
    logprob = asr_likelihood(SENTENCES[:2], ["", ""], audio=speech_files["good"][:2])
    assert logprob == pytest.approx([max(0.0, 1 + sum(lp) / len(lp) / 10) for lp in logps])
    # another sentence's audio: the reference is far less probable
    swapped = asr_likelihood(SENTENCES[:2], ["", ""], audio=speech_files["good"][2:4], transform="prob")
    assert max(swapped) < 0.5 * min(rewards)
    with pytest.raises(RewardError, match="unknown transform"):
        asr_likelihood(["a"], [""], audio=speech_files["good"][:1], transform="exp")
    assert asr_likelihood(["!!!", ""], ["", ""], audio=speech_files["good"][:2], text=["", None]) == [None, None]
    with pytest.raises(RewardError, match="needs faster-whisper"):
        asr_likelihood(["a"], [""], audio=speech_files["good"][:1], backend="openai-whisper")


# -- prosody -----------------------------------------------------------------------------


def test_flat_pitch_scores_lower_on_prosody_than_varied(speech_files):
    n = len(SENTENCES)
    varied = prosody(SENTENCES, [""] * n, audio=speech_files["good"])
    flat = prosody(SENTENCES, [""] * n, audio=speech_files["flat"])
    assert all(f < v for f, v in zip(flat, varied))
    assert np.mean(varied) > 0.9 and np.mean(flat) < 0.3


def test_prosody_penalises_implausible_rate_and_silence():
    text = "Please call Stella and ask her to bring these things with her from the store."
    normal, sr = synthesize(text, rate=160)
    rushed, _ = synthesize(text, rate=450)
    dragged, _ = synthesize(text, rate=80, word_gap=40)
    scores = prosody([text] * 4, [""] * 4, audio=[normal, rushed, dragged, np.zeros(sr, np.float32)], sample_rate=sr)
    assert scores[0] > 0.9
    assert scores[1] < 0.6 * scores[0] and scores[2] < 0.6 * scores[0]
    assert scores[3] == 0.0
    # Without a text the rate is not judged.
    assert prosody([""], [""], audio=[rushed], sample_rate=sr)[0] > scores[1]
    with pytest.raises(RewardError, match="rate_min < rate_max"):
        prosody([text], [""], audio=[normal], sample_rate=sr, rate_min=5, rate_max=2)


# -- speaker similarity ------------------------------------------------------------------


def test_same_voice_scores_higher_than_a_different_voice(tmp_path):
    ref_path = save_wav(tmp_path / "ref.wav", *synthesize("The quick brown fox jumps over the lazy dog by the river."))
    text = "Please call Stella and ask her to bring these things with her from the store."
    same, sr = synthesize(text)
    other, _ = synthesize(text, voice="en-us+f3")
    scores = speaker_similarity([text] * 3, [""] * 3, audio=[same, other, np.zeros(sr, np.float32)],
                                sample_rate=sr, reference=ref_path)
    assert scores[0] > 0.75 and scores[0] > scores[1] + 0.1
    assert scores[2] == 0.0

    # The same numbers from a saved .npy embedding, and from a per-sample reference column.
    npy = tmp_path / "voice.npy"
    np.save(npy, embed(*synthesize("The quick brown fox jumps over the lazy dog by the river.")))
    assert speaker_similarity([text] * 2, [""] * 2, audio=[same, other], sample_rate=sr,
                              reference=str(npy)) == pytest.approx(scores[:2], abs=1e-5)
    ref_wav, _ = synthesize("The quick brown fox jumps over the lazy dog by the river.")
    by_column = speaker_similarity([text] * 2, [""] * 2, audio=[same, other], sample_rate=sr,
                                   reference_audio=[ref_wav, ref_path])
    assert by_column == pytest.approx(scores[:2], abs=2e-3)


def test_speaker_similarity_needs_a_reference():
    wav, sr = synthesize("hello there")
    with pytest.raises(RewardError, match="reference_audio"):
        speaker_similarity(["x"], [""], audio=[wav], sample_rate=sr)
    with pytest.raises(AudioError, match="no_voice.wav.*does not exist"):
        speaker_similarity(["x"], [""], audio=[wav], sample_rate=sr, reference="no_voice.wav")
