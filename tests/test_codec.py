"""The embedded speech codec: a real ASR model hears its round trip, and corrupted codes
are heard as wrong."""

import numpy as np
import pytest
import torch

from posttrain.errors import UserError
from posttrain.models.codec import MelRVQCodec, MelRVQConfig, embedded_codec

HELD_OUT = [
    "the weather will be sunny tomorrow afternoon",
    "please bring two cups of coffee to the office",
    "my brother lives in a small house near the lake",
    "the library closes at eight on fridays",
    "we need four more chairs for the meeting",
    "she found a black dog in the garden",
    "the bus stops in front of the old church",
    "turn off the lights when you leave the room",
]


@pytest.fixture(scope="module")
def codec(posttrain_cache):
    return embedded_codec(posttrain_cache)


@pytest.fixture(scope="module")
def held_out_speech():
    from posttrain.audio.tts import synthesize

    return [synthesize(t, voice="en-us", rate=150, sample_rate=16000)[0] for t in HELD_OUT]


def _mean_wer(wavs):
    from rewards.wer import wer_stats, word_error_rate
    from posttrain.audio.asr import get_asr

    texts = get_asr().transcribe(wavs)
    return wer_stats([word_error_rate(ref, hyp, "en") for ref, hyp in zip(HELD_OUT, texts)])["mean_capped"]


def test_round_trip_keeps_what_asr_hears_and_corruption_breaks_it(codec, held_out_speech):
    codes = codec.encode(held_out_speech)
    assert codes[0].shape[0] == codec.num_groups == 16 and codec.frame_rate == 50
    decoded = [codec.decode(c)[0] for c in codes]
    original, round_trip = _mean_wer(held_out_speech), _mean_wer(decoded)
    assert round_trip <= original + 0.1, (original, round_trip)
    g = torch.Generator().manual_seed(0)
    corrupted = []
    for c in codes:
        c = c.clone()
        mask = torch.rand(c.shape[1], generator=g) < 0.3  # replace 30% of codebook-0 tokens
        c[0, mask] = torch.randint(0, codec.codebook_size, (int(mask.sum()),), generator=g)
        corrupted.append(codec.decode(c)[0])
    assert _mean_wer(corrupted) > round_trip + 0.2


def test_streaming_decode_matches_length_and_save_load(codec, held_out_speech, tmp_path):
    codes = codec.encode(held_out_speech[:1])[0]
    chunks = list(codec.decode_stream(codes, chunk_frames=20))
    assert len(chunks) == -(-codes.shape[1] // 20)
    assert sum(len(c) for c in chunks) == codes.shape[1] * codec.samples_per_frame
    codec.save(str(tmp_path / "codec"))
    again = MelRVQCodec.load(str(tmp_path / "codec"))
    assert torch.equal(again.encode(held_out_speech[:1])[0], codes)


def test_codes_that_do_not_fit_are_named(codec):
    with pytest.raises(UserError, match="do not fit this codec.*codec.groups"):
        codec.decode(torch.zeros(1, 4, 10, dtype=torch.long))
    with pytest.raises(UserError, match="outside the codebook size"):
        codec.decode(torch.full((1, 16, 10), 999))
    small = MelRVQCodec(MelRVQConfig(num_groups=2, codebook_size=4, kmeans_iters=2))
    small.fit([np.random.default_rng(0).normal(size=16000).astype(np.float32) * 0.1])
    with pytest.raises(UserError, match="too short"):
        small.encode([np.zeros(100, dtype=np.float32)])
