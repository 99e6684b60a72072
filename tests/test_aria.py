"""ARIA: the rate constraint holds on every prefix of built and generated streams."""

import random

import pytest

from posttrain.data.aria import (
    SPEECH,
    TEXT,
    AriaRate,
    AriaScheduler,
    build_plain_stream,
    build_stream,
    check_stream,
    estimate_rates,
)
from posttrain.errors import DataError


def _random_utterance(rng):
    words = rng.randint(1, 12)
    word_tokens, spans, frame = [], [], rng.randint(0, 5)
    token = 0
    for _ in range(words):
        n = rng.randint(1, 6)
        word_tokens.append(list(range(token, token + n)))
        token += n
        length = rng.randint(5, 30)
        spans.append((frame, frame + length))
        frame += length + rng.randint(0, 6)
    return word_tokens, spans, frame + rng.randint(0, 5)


@pytest.mark.parametrize("seed", range(40))
def test_built_streams_keep_the_constraint_on_every_prefix(seed):
    rng = random.Random(seed)
    word_tokens, spans, frames = _random_utterance(rng)
    rate = AriaRate(frames_per_token=rng.uniform(1.0, 8.0), lead=rng.randint(0, 6))
    stream = build_stream(word_tokens, spans, frames, rate)
    total = sum(len(w) for w in word_tokens)
    assert check_stream(stream, total, rate) is None
    # everything is there, each track in order
    assert [v for k, v in stream if k == TEXT] == [t for w in word_tokens for t in w]
    assert [v for k, v in stream if k == SPEECH] == list(range(frames))
    # a frame comes after all the text of its word
    seen_text = 0
    for kind, value in stream:
        if kind == TEXT:
            seen_text += 1
            continue
        for w, (start, end) in enumerate(spans):
            if start <= value < end:
                assert seen_text >= sum(len(x) for x in word_tokens[: w + 1])


def test_plain_layout_runs_ahead_and_aria_interleaves():
    word_tokens = [[1, 2], [3], [4, 5, 6], [7]]
    spans = [(0, 10), (10, 20), (20, 40), (40, 50)]
    rate = AriaRate(frames_per_token=50 / 7 * 1.15, lead=2)
    stream = build_stream(word_tokens, spans, 50, rate)
    kinds = "".join("t" if k == TEXT else "s" for k, _ in stream)
    assert kinds.startswith("tt") and "st" in kinds  # text is spread through the speech
    # speech first / text first would break the rule here: e.g. all speech after one token
    bad = [(TEXT, 1)] + [(SPEECH, f) for f in range(50)] + [(TEXT, t) for t in range(2, 8)]
    assert check_stream(bad, 7, rate) == 1 + rate.allowed_frames(1)
    assert check_stream(build_plain_stream(range(1, 8), 50), 7, rate) is None  # text first never runs ahead


def test_rates_are_estimated_per_key_with_a_pooled_fallback():
    samples = [("en/us", 10, 60)] * 5 + [("de/de", 10, 90)] * 5 + [("fr/fr", 10, 200)]
    rates = estimate_rates(samples, slack=1.0, lead=3)
    assert rates["en/us"].frames_per_token == pytest.approx(6.0)
    assert rates["de/de"].frames_per_token == pytest.approx(9.0)
    assert rates["fr/fr"] == rates["*"]  # too few samples of its own
    assert rates["*"].frames_per_token == pytest.approx((300 + 450 + 200) / 110)
    with pytest.raises(DataError, match="no text tokens"):
        estimate_rates([("x", 0, 10)])


@pytest.mark.parametrize("seed", range(10))
def test_scheduler_keeps_generated_streams_within_the_rate_and_ends(seed):
    rng = random.Random(seed)
    text = list(range(rng.randint(1, 30)))
    rate = AriaRate(frames_per_token=rng.uniform(2.0, 7.0), lead=rng.randint(1, 5))
    sched = AriaScheduler(text, rate)
    stream = []
    while not sched.finished:
        # a model that always wants to speak: the scheduler must hold it back
        while sched.must_feed_text():
            stream.append((TEXT, sched.feed_text()))
        sched.add_frame()
        stream.append((SPEECH, sched.frames_emitted - 1))
        if sched.text_done and rng.random() < 0.02:  # the model ends the utterance itself
            break
    while not sched.text_done:
        stream.append((TEXT, sched.feed_text()))
    assert check_stream(stream, len(text), rate) is None
    assert [v for k, v in stream if k == TEXT] == text
    assert sched.frames_emitted <= sched.max_frames
