"""The user's (audio, transcript) data for the Talker: word alignment from ASR timestamps,
bad rows named, ARIA streams written by data_tools/aria_interleave, codec mismatches refused,
and talker_pretrain on such data."""

import json
import os

import numpy as np
import pytest
import soundfile as sf
import torch

from posttrain.data.aria import AriaRate, check_stream
from posttrain.errors import ConfigError, DataError
from posttrain.models.codec import MelRVQConfig, embedded_codec

SENTENCES = [
    "please open the window",
    "the train leaves at nine tonight",
    "my sister plays the violin",
    "bring me a glass of water",
    "we walked along the quiet beach",
    "turn left at the next corner",
    "the museum opens early on sunday",
    "he painted the fence bright yellow",
]


def _recording(sentence: str, voice: str) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """Words spoken one by one and joined, so the true word times are known."""
    from posttrain.data.speech_corpus import speak_word_by_word

    return speak_word_by_word(sentence, voice, pause_seconds=0.08, edge_seconds=0.2)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory):
    """A user dataset: 8 good rows (2 speakers, true word times kept aside) and 4 bad ones."""
    folder = tmp_path_factory.mktemp("recordings")
    rows, truth = [], []
    for i, s in enumerate(SENTENCES):
        voice = ["en-us", "en-gb"][i % 2]
        wav, times = _recording(s, voice)
        sf.write(folder / f"{i}.wav", wav, 16000)
        rows.append({"audio": f"{i}.wav", "text": s.capitalize() + ".", "speaker": voice})
        truth.append(times)
    sf.write(folder / "silent.wav", np.zeros(16000, np.float32), 16000)
    sf.write(folder / "short.wav", sf.read(folder / "0.wav")[0][:1600].astype(np.float32), 16000)
    bad = [
        {"audio": "silent.wav", "text": "nothing to hear"},
        {"audio": "short.wav", "text": "please"},
        {"audio": "0.wav", "text": "   "},
        {"audio": "missing.wav", "text": "where is it"},
    ]
    good_path, mixed_path = folder / "good.jsonl", folder / "mixed.jsonl"
    good_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    mixed_path.write_text("".join(json.dumps(r) + "\n" for r in rows[:2] + bad + rows[2:]))
    return {"good": str(good_path), "mixed": str(mixed_path), "truth": truth, "folder": folder}


@pytest.fixture(scope="module")
def codec(posttrain_cache):
    return embedded_codec(posttrain_cache, MelRVQConfig(num_groups=4, codebook_size=256))


def _midpoint_error(speech, truth, frame_rate):
    errors = []
    for u, times in zip(speech.utterances, truth):
        for (a, b), (ta, tb) in zip(u.spans, times):
            errors.append(abs((a + b) / 2 / frame_rate - (ta + tb) / 2))
    return float(np.mean(errors))


def test_asr_word_times_align_words_better_than_spreading_them(recordings, codec):
    from posttrain.data.user_speech import load_user_speech

    asr = load_user_speech(recordings["good"], codec, None, alignment="asr", progress=False)
    spread = load_user_speech(recordings["good"], codec, None, alignment="proportional", progress=False)
    assert asr.speakers == ["en-us", "en-gb"] and set(asr.references) == {"en-us", "en-gb"}
    for u, s in zip(asr.utterances, SENTENCES):
        assert u.codes.shape[0] == 4 and [w.lower().strip(".") for w in u.words] == s.split()
        assert all(b > a for a, b in u.spans) and all(u.spans[i][1] <= u.spans[i + 1][0] for i in range(len(u.spans) - 1))
        assert u.spans[-1][1] <= u.codes.shape[1]
    asr_error = _midpoint_error(asr, recordings["truth"], codec.frame_rate)
    spread_error = _midpoint_error(spread, recordings["truth"], codec.frame_rate)
    # measured: 0.088 s (ASR word times, boundaries snapped to energy minima) vs 0.148 s
    assert asr_error < 0.12 and asr_error < spread_error


def test_given_word_times_are_used_as_they_are(recordings, codec, tmp_path):
    from posttrain.data.user_speech import load_user_speech

    row = json.loads(open(recordings["good"]).readline())
    row["audio"] = str(recordings["folder"] / row["audio"])
    times = recordings["truth"][0]
    row["words"] = [{"word": w, "start": a, "end": b} for w, (a, b) in zip(row["text"].split(), times)]
    path = tmp_path / "timed.jsonl"
    path.write_text(json.dumps(row) + "\n")
    speech = load_user_speech(str(path), codec, None, progress=False)
    assert speech.utterances[0].spans[0][0] == int(np.floor(times[0][0] * 50))
    assert _midpoint_error(speech, recordings["truth"][:1], 50) < 0.02


def test_bad_rows_are_named_and_skipped_or_fatal(recordings, codec, capsys):
    from posttrain.data.user_speech import load_user_speech

    speech = load_user_speech(recordings["mixed"], codec, None, on_bad="skip", progress=False)
    assert len(speech.utterances) == 8 and speech.lines == [1, 2, 7, 8, 9, 10, 11, 12]
    out = capsys.readouterr().out
    for line, why in [(3, "silent"), (4, "shorter than the minimum 0.3 s"), (5, "transcript is empty"), (6, "does not exist")]:
        assert any(f"line {line}" in m and why in m for m in speech.skipped), (line, speech.skipped)
        assert f"line {line}" in out
    with pytest.raises(DataError, match=r"mixed.jsonl, line 3 \(silent.wav\): audio is silent.*data.on_bad=skip"):
        load_user_speech(recordings["mixed"], codec, None, on_bad="fail", progress=False)
    with pytest.raises(DataError, match=r"line 1 \(0.wav\): audio is .* longer than the maximum 1 s"):
        load_user_speech(recordings["good"], codec, None, max_seconds=1.0, progress=False)


def test_aria_interleave_writes_checked_streams_and_codec_mismatch_is_refused(recordings, codec, tmp_path, capsys):
    from data_tools.aria_interleave import main
    from posttrain.data.user_speech import load_user_speech

    out = tmp_path / "aria.jsonl"
    assert main(["--input", recordings["mixed"], "--output", str(out), "--on-bad", "skip", "--groups", "4"]) == 0
    assert "wrote 8 ARIA streams" in capsys.readouterr().out
    rows = [json.loads(line) for line in open(out)]
    rates = json.load(open(str(out) + ".rates.json"))
    assert set(rates) == {"*", "en-us", "en-gb"}
    for row in rows:
        rate = AriaRate(rates[row["speaker"]]["frames_per_token"], rates[row["speaker"]]["lead"])
        text = sum(1 for kind, _ in row["stream"] if kind == "text")
        frames = [v for kind, v in row["stream"] if kind == "speech"]
        assert check_stream([tuple(x) for x in row["stream"]], text, rate) is None
        assert frames == list(range(len(row["codes"][0]))) and len(row["codes"]) == 4
        # interleaved: some speech comes before the last text token
        assert row["stream"].index(["speech", 0]) < max(i for i, (k, _) in enumerate(row["stream"]) if k == "text")
    # the encoded rows load again without audio or ASR ...
    again = load_user_speech(str(out), codec, None, progress=False)
    assert [u.spans for u in again.utterances] == [[tuple(s) for s in r["word_frames"]] for r in rows]
    # ... but not with a codec of other settings, or another codec of the same settings
    other = embedded_codec(os.environ["POSTTRAIN_CACHE"], MelRVQConfig(num_groups=2, codebook_size=256))
    with pytest.raises(ConfigError, match=r"aria.jsonl, line 1: the codes were made with codec.groups=4 but this run's codec has codec.groups=2"):
        load_user_speech(str(out), other, None, progress=False)
    tampered = tmp_path / "tampered.jsonl"
    row = dict(rows[0], codec=dict(rows[0]["codec"], codebooks="0123456789ab"))
    tampered.write_text(json.dumps(row) + "\n")
    with pytest.raises(ConfigError, match="made by another codec"):
        load_user_speech(str(tampered), codec, None, progress=False)
    # a bad input file is one error line and exit 2
    assert main(["--input", str(tmp_path / "nope.jsonl"), "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_talker_bundle_with_a_codec_of_other_settings_is_refused(tmp_path, codec):
    from posttrain.errors import ModelError
    from posttrain.models.qwen_omni import TinyTalkerSpec, TinyThinkerSpec, build_tiny_omni
    from posttrain.models.tokenizer import build_embedded_tokenizer
    from posttrain.talker import TalkerBundle, load_bundle

    tok = build_embedded_tokenizer(SENTENCES, num_merges=10)
    model = build_tiny_omni(tok, TinyThinkerSpec(hidden_size=64, num_layers=1), TinyTalkerSpec(hidden_size=64, num_layers=1, num_code_groups=4))
    TalkerBundle(model, tok, codec, ["a"], {"*": AriaRate(5.0)}).save(str(tmp_path / "talker"))
    other = embedded_codec(os.environ["POSTTRAIN_CACHE"], MelRVQConfig(num_groups=2, codebook_size=256))
    other.save(str(tmp_path / "talker" / "codec"))
    with pytest.raises(ModelError, match=r"predicts 4 codebooks but its codec has 2 \(codec.groups\)"):
        load_bundle(str(tmp_path / "talker"))


@pytest.mark.slow
def test_talker_pretrain_on_user_recordings(recordings, tmp_path):
    from posttrain.config import load_config
    from recipes import defaults_path, load_recipe

    module = load_recipe("talker_pretrain")
    overrides = [
        f"data.path={recordings['mixed']}", "data.on_bad=skip", "data.eval_size=2", "max_steps=8", "batch_size=4",
        "long_context.steps=2", "long_context.lengths=[2]", "long_context.batch_size=2",
        "talker.hidden_size=64", "talker.num_layers=1", "save_every=0", "merges=50", f"output_dir={tmp_path}",
    ]
    result = module.run(load_config(module.Config, defaults_path("talker_pretrain"), overrides))
    metrics = result.summary["metrics"]
    assert metrics["loss"]["after"] < metrics["loss"]["before"]
    from posttrain.talker import load_bundle

    assert sorted(load_bundle(os.path.join(result.run_dir, "talker")).voices) == ["en-gb", "en-us"]


def test_talker_pretrain_user_data_errors(recordings, tmp_path):
    from tests.conftest import run_cli

    rc, _, err = run_cli("run", "talker_pretrain", f"data.path={tmp_path}/none.jsonl", f"output_dir={tmp_path}")
    assert rc == 2 and "data.path" in err and "does not exist" in err and "Traceback" not in err
    rc, _, err = run_cli("run", "talker_pretrain", f"data.path={recordings['mixed']}", "data.eval_size=2", f"output_dir={tmp_path}")
    assert rc == 2 and "line 3 (silent.wav): audio is silent" in err and "Traceback" not in err
    rc, _, err = run_cli("run", "talker_pretrain", f"data.path={recordings['good']}", f"output_dir={tmp_path}")
    assert rc == 2 and "8 usable recordings, but data.eval_size=20 are held out" in err
    assert not os.path.exists(tmp_path / "talker_pretrain")  # no run directory for a run that never started


def test_varied_corpus_encodes_each_utterance_whole_with_exact_word_spans(codec, posttrain_cache):
    """The 'varied' embedded corpus: a word sounds a little different each time (rate, pauses,
    encoded in context), unlike the 'clips' corpus where a word's codes are always the same."""
    import random

    from posttrain.data.speech_corpus import embedded_corpus, varied_utterance, word_waveforms

    train, held = embedded_corpus(codec, posttrain_cache, ["en-us"], 8, 2, seed=0, style="varied")
    clips_train, clips_held = embedded_corpus(codec, posttrain_cache, ["en-us"], 8, 2, seed=0, style="clips")
    assert [u.text for u in held] == [u.text for u in clips_held]  # the same held-out sentences
    assert not {u.text for u in held} & {u.text for u in train}
    for u in train + held:
        assert len(u.spans) == len(u.words)
        assert all(a < b for a, b in u.spans) and all(b0 <= a1 for (_, b0), (a1, _) in zip(u.spans, u.spans[1:]))
        assert u.spans[0][0] > 0 and u.spans[-1][1] < u.codes.shape[1]  # silence at both edges
    waves = word_waveforms(["en-us"], codec.sample_rate, posttrain_cache)
    rng = random.Random(0)
    takes = [varied_utterance("the cat sees a red ball", 0, waves, codec, rng) for _ in range(4)]
    assert len({t.codes.shape[1] for t in takes}) > 1 or any(not torch.equal(takes[0].codes, t.codes) for t in takes[1:])
    # in the clips corpus every "the" has the same codes
    the = [u.codes[:, a:b] for u in clips_train for w, (a, b) in zip(u.words, u.spans) if w == "the"]
    assert len(the) >= 2 and all(torch.equal(the[0], c) for c in the[1:])
