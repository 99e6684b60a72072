"""Data tools: spoken datasets (espeak-ng), timestamp layouts, multi-turn conversations."""

import json
import os
import random
import re
import subprocess
import sys

import numpy as np
import pytest

from posttrain.errors import DataError, UserError
from tests.conftest import REPO

# ------------------------------------------------------------------------------ synthesis

QUERIES = [
    {"prompt": "What is 2 + 3?", "answer": "5", "domain": "arithmetic"},
    {"prompt": "What is 10 + 7?", "answer": "17", "domain": "arithmetic"},
    {"prompt": "What is 41 + 8?", "answer": "49", "domain": "arithmetic"},
]
VOICES = ("en-us", "en-gb+f3")


def _write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as fh:
        for row in rows:
            fh.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def spoken(tmp_path_factory):
    """QUERIES spoken once for the module (espeak-ng is the slow part)."""
    from data_tools.synthesize_speech import synthesize_dataset

    out_dir = tmp_path_factory.mktemp("spoken")
    rows = synthesize_dataset(QUERIES, str(out_dir / "audio"), voices=VOICES, rates=(150, 190),
                              pitches=(40, 60), seed=3, progress=False, relative_to=str(out_dir))
    return out_dir, rows


def test_synthesize_dataset_writes_16k_mono_wavs_and_keeps_fields(spoken):
    import soundfile as sf

    out_dir, rows = spoken
    assert len(rows) == len(QUERIES)
    for query, row in zip(QUERIES, rows):
        for key, value in query.items():
            assert row[key] == value
        assert row["text"] == query["prompt"]
        assert not os.path.isabs(row["audio"])  # relative to the jsonl's folder
        info = sf.info(os.path.join(out_dir, row["audio"]))
        assert (info.samplerate, info.channels) == (16000, 1)
        assert row["duration"] == pytest.approx(info.frames / 16000, abs=1e-3)
        assert 0.5 < row["duration"] < 5.0
        assert row["voice"] in VOICES and row["rate"] in (150, 190) and row["pitch"] in (40, 60)


def test_synthesis_choices_are_deterministic_by_seed_and_vary_across_rows(spoken):
    from data_tools.synthesize_speech import sample_settings

    _, rows = spoken
    for i, row in enumerate(rows):
        assert sample_settings(i, 3, VOICES, (150, 190), (40, 60)) == {k: row[k] for k in ("voice", "rate", "pitch")}
    plans = [sample_settings(i, 0) for i in range(40)]
    assert plans == [sample_settings(i, 0) for i in range(40)]
    assert plans != [sample_settings(i, 1) for i in range(40)]
    assert len({p["voice"] for p in plans}) >= 4 and len({p["rate"] for p in plans}) == 3
    noisy = [sample_settings(i, 0, noise_snr_db=[10, 20]) for i in range(40)]
    assert {p["noise"] for p in noisy} == {"white", "pink"} and {p["snr_db"] for p in noisy} == {10.0, 20.0}


def test_rerun_reuses_valid_wavs_and_remakes_broken_ones(tmp_path, monkeypatch):
    import data_tools.synthesize_speech as tool
    import posttrain.audio.tts as tts

    first = tool.synthesize_dataset(QUERIES[:2], str(tmp_path), voices=("en-us",), progress=False)
    calls = []
    real = tts.synthesize
    monkeypatch.setattr(tts, "synthesize", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = tool.synthesize_dataset(QUERIES[:2], str(tmp_path), voices=("en-us",), progress=False)
    assert again == first and calls == []  # nothing re-synthesized
    with open(first[1]["audio"], "r+b") as fh:  # a half-written file from a killed run
        fh.truncate(30)
    tool.synthesize_dataset(QUERIES[:2], str(tmp_path), voices=("en-us",), progress=False)
    assert any(a[0] == QUERIES[1]["prompt"] for a in calls)
    assert not any(a[0] == QUERIES[0]["prompt"] for a in calls)


def test_noise_is_added_at_the_requested_snr_and_pink_noise_tilts_to_low_frequencies():
    from data_tools.synthesize_speech import add_noise, colored_noise

    t = np.arange(16000) / 16000
    speech = (0.3 * np.sin(2 * np.pi * 220 * t)).astype(np.float32)
    noisy = add_noise(speech, 10.0, "white", np.random.default_rng(0))
    noise = noisy - speech
    snr = 10 * np.log10(np.mean(speech**2) / np.mean(noise**2))
    assert snr == pytest.approx(10.0, abs=0.3)
    pink = colored_noise(32000, "pink", np.random.default_rng(1))
    spectrum = np.abs(np.fft.rfft(pink)) ** 2
    assert spectrum[10:200].mean() > 10 * spectrum[-2000:].mean()
    white = colored_noise(32000, "white", np.random.default_rng(1))
    wspec = np.abs(np.fft.rfft(white)) ** 2
    assert 0.5 < wspec[10:200].mean() / wspec[-2000:].mean() < 2


def test_synthesize_cli_writes_relative_paths_and_noise_columns(tmp_path, capsys):
    from data_tools.synthesize_speech import main, resolve_audio_path

    src = _write_jsonl(tmp_path / "q.jsonl", [{"question": "What is one plus one?", "id": 7}])
    out = tmp_path / "out" / "spoken.jsonl"
    rc = main(["-i", src, "-o", str(out), "--field", "question", "--voices", "en-us", "--rates", "170",
               "--pitches", "50", "--noise-snr-db", "20", "--noise-colors", "pink", "--quiet"])
    assert rc == 0
    row = json.loads(out.read_text().splitlines()[0])
    assert row["id"] == 7 and row["question"] == "What is one plus one?"
    assert (row["voice"], row["rate"], row["pitch"], row["noise"], row["snr_db"]) == ("en-us", 170, 50, "pink", 20.0)
    assert row["audio"].startswith("spoken_audio/")
    assert os.path.isfile(resolve_audio_path(row["audio"], str(out)))
    assert "1 synthesized" in capsys.readouterr().out


@pytest.mark.parametrize(
    "lines, args, message",
    [
        (None, [], "does not exist"),
        (['{"prompt": "hi"}', '{"prompt": '], [], "bad.jsonl, line 2: not valid JSON"),
        (['{"prompt": "hi"}', '{"text": "no prompt"}'], [], "bad.jsonl, line 2: no field 'prompt'"),
        (['{"prompt": "hi"}', '{"prompt": "   "}'], [], "bad.jsonl, line 2: field 'prompt' is empty"),
        (['{"prompt": "hi"}'], ["--rates", "20"], "rate 20 is out of range"),
        (['{"prompt": "hi"}'], ["--voices", "zz-nope"], "zz-nope"),
    ],
)
def test_synthesize_cli_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, lines, args, message):
    from data_tools.synthesize_speech import main

    src = str(tmp_path / "bad.jsonl") if lines is None else _write_jsonl(tmp_path / "bad.jsonl", lines)
    rc = main(["-i", src, "-o", str(tmp_path / "out.jsonl"), "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "out.jsonl").exists()


@pytest.mark.parametrize("tool", ["synthesize_speech", "add_timestamps", "make_conversations", "aria_interleave", "build_preference_pairs"])
def test_every_tool_has_help(tool):
    proc = subprocess.run([sys.executable, "-m", f"data_tools.{tool}", "--help"], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 0
    assert proc.stdout.startswith(f"usage: python -m data_tools.{tool}")
    assert "--output" in proc.stdout


# ------------------------------------------------------------------------------ timestamps


def test_timestamp_format_is_exactly_one_decimal_seconds():
    from posttrain.data.timestamps import format_timestamp

    assert format_timestamp(12.5) == "<12.5 seconds>"
    assert format_timestamp(2) == "<2.0 seconds>"
    assert format_timestamp(0.25) == "<0.3 seconds>"  # halves round up, not to even
    assert format_timestamp(119.96) == "<120.0 seconds>"
    for s in np.linspace(0, 300, 77):
        assert re.fullmatch(r"<\d+\.\d seconds>", format_timestamp(float(s)))


@pytest.mark.parametrize("rate", [12.5, 13.0, 25.0])
def test_marks_every_n_seconds_before_the_first_token_at_or_after_them(rate):
    from posttrain.data.timestamps import timestamp_positions

    marks = timestamp_positions(int(30 * rate), rate, every_seconds=2.0)
    assert [s for _, s in marks] == [2.0 * k for k in range(1, 15)]  # 2, 4, ... 28 (30 s clip)
    for index, seconds in marks:
        assert index / rate >= seconds - 1e-9 > (index - 1) / rate
    gaps = {b - a for (a, _), (b, _) in zip(marks, marks[1:])}
    assert max(gaps) - min(gaps) <= 1  # evenly spaced up to token rounding


def test_no_mark_for_audio_shorter_than_the_first_mark():
    from posttrain.data.timestamps import interleave_timestamps, timestamp_positions, timestamp_text

    assert timestamp_positions(0) == []
    assert timestamp_positions(26, 13.0, 2.0) == []  # exactly 2.0 s: the mark would follow the last token
    assert timestamp_positions(27, 13.0, 2.0) == [(26, 2.0)]
    assert interleave_timestamps([5] * 20, lambda s: [1] * len(s), 13.0, 2.0) == [5] * 20
    assert timestamp_text("a" + "<|audio_pad|>" * 20 + "b") == "a" + "<|audio_pad|>" * 20 + "b"


def test_offsets_are_in_range_reproducible_and_zero_at_eval():
    from posttrain.data.timestamps import sample_offset, timestamp_positions

    offsets = [sample_offset(random.Random(i), 5.0) for i in range(300)]
    assert all(0.0 <= o < 5.0 for o in offsets)
    assert min(offsets) < 0.5 and max(offsets) > 4.5  # spread over the range
    assert sample_offset(42, 5.0) == sample_offset(42, 5.0) != sample_offset(43, 5.0)
    assert sample_offset(42, 5.0, training=False) == 0.0 and sample_offset(42, 0.0) == 0.0
    # An offset shifts both the labels and where they fall: a clip starting 1.3 s in sees 2.0 s
    # after 0.7 s of its own audio.
    marks = timestamp_positions(100, 12.5, 2.0, offset_seconds=1.3)
    assert marks[0] == (9, 2.0) and marks[1] == (34, 4.0)
    assert timestamp_positions(100, 12.5, 2.0, offset_seconds=7.9)[0] == (2, 8.0)
    with pytest.raises(UserError, match="max_offset_seconds"):
        sample_offset(1, -1.0)


def test_interleave_keeps_audio_tokens_and_inserts_tokenized_marks(tokenizer):
    from posttrain.data.timestamps import interleave_timestamps, timestamp_positions

    audio_id = tokenizer.convert_tokens_to_ids("<|audio_pad|>")
    ids = interleave_timestamps([audio_id] * 60, tokenizer, tokens_per_second=12.5, every_seconds=2.0,
                                offset_seconds=0.5)
    assert ids.count(audio_id) == 60
    text = tokenizer.decode(ids)
    assert re.findall(r"<\d+\.\d seconds>", text) == ["<2.0 seconds>", "<4.0 seconds>"]
    # each mark sits right before its audio token
    before = text.split("<2.0 seconds>")[0]
    assert before.count("<|audio_pad|>") == timestamp_positions(60, 12.5, 2.0, 0.5)[0][0] == 19


def test_timestamp_text_marks_each_audio_pad_run_with_its_own_offset():
    from posttrain.data.timestamps import timestamp_text

    pad = "<|audio_pad|>"
    text = "Listen: <|audio_start|>" + pad * 30 + "<|audio_end|> and " + pad * 15 + " end"
    out = timestamp_text(text, tokens_per_second=10.0, every_seconds=1.0, offset_seconds=[0.0, 3.5])
    assert out.count(pad) == 45
    first, second = out.split("<|audio_end|>")
    assert re.findall(r"<[\d.]+ seconds>", first) == ["<1.0 seconds>", "<2.0 seconds>"]
    assert re.findall(r"<[\d.]+ seconds>", second) == ["<4.0 seconds>"]
    assert (pad * 10 + "<1.0 seconds>" + pad) in first
    with pytest.raises(UserError, match="one offset per clip"):
        timestamp_text(text, offset_seconds=[0.0])


def test_qwen3_omni_token_count_matches_the_model_code():
    import torch
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    from posttrain.data.timestamps import audio_token_count, qwen3_omni_audio_token_count

    for frames in (1, 7, 50, 99, 100, 101, 250, 1000, 3017):
        expected = int(_get_feat_extract_output_lengths(torch.tensor(frames)))
        assert qwen3_omni_audio_token_count(frames * 160) == expected
    assert audio_token_count(10.0) == 130  # 13 tokens per whole second
    assert audio_token_count(10.0, tokens_per_second=12.5) == 125


def test_add_timestamps_cli_reads_num_tokens_and_audio_durations(tmp_path, capsys):
    from data_tools.add_timestamps import main
    from posttrain.audio.io import save_wav

    t = np.arange(int(16000 * 4.5)) / 16000
    save_wav(tmp_path / "clips" / "a.wav", 0.3 * np.sin(2 * np.pi * 200 * t), 16000)
    src = _write_jsonl(tmp_path / "in.jsonl", [{"num_tokens": 60, "k": 1}, {"audio": "clips/a.wav"}])
    out = tmp_path / "out.jsonl"
    assert main(["-i", src, "-o", str(out), "--tokens-per-second", "12.5"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows[0]["k"] == 1 and rows[0]["timestamp_offset"] == 0.0
    assert rows[0]["timestamps"] == [{"token_index": 25, "seconds": 2.0, "text": "<2.0 seconds>"},
                                     {"token_index": 50, "seconds": 4.0, "text": "<4.0 seconds>"}]
    assert rows[1]["num_tokens"] == 57  # ceil(4.5 s x 12.5)
    # training layout: offsets in range and the same on a rerun with the same seed
    argv = ["-i", src, "-o", str(out), "--max-offset-seconds", "3", "--seed", "5"]
    assert main(argv) == 0
    first = out.read_text()
    assert main(argv) == 0 and out.read_text() == first
    assert all(0 <= json.loads(line)["timestamp_offset"] < 3 for line in first.splitlines())
    bad = _write_jsonl(tmp_path / "bad.jsonl", [{"num_tokens": 5}, {"audio": "clips/missing.wav"}])
    assert main(["-i", bad, "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "bad.jsonl, line 2" in err and "missing.wav" in err


# ------------------------------------------------------------------------------ conversations


@pytest.fixture(scope="module")
def conversations():
    from posttrain.data.conversations import make_conversations

    return make_conversations(80, turns=4, seed=11)


def _columns(rows):
    return {k: [r[k] for r in rows] for k in ("persona", "language", "constraints")}


def _violate(row):
    """(constraint-breaking reply, other-language reply, out-of-character reply) for a row."""
    from posttrain.data.conversations import QUESTIONS

    ref = row["reference"]
    bad = ref
    for c in row["constraints"]:
        kind, value = c["type"], c["value"]
        if kind == "max_words":
            bad = bad + " more" * (int(value) + 1)
        elif kind == "required_keywords":
            bad = bad.replace(value, "")
        elif kind == "forbidden_keywords":
            bad = f"{value} {bad}"
        elif kind == "all_lowercase":
            bad = bad.upper()
        elif kind == "ends_with":
            bad = bad.replace(value, "") + " and that is all"
    other = "de" if row["language"] != "de" else "fr"
    wrong_language = QUESTIONS["day"][other][1]
    out_of_character = "As an AI language model, I have no name. " + ref
    return bad, wrong_language, out_of_character


def test_reference_replies_score_1_and_violations_score_lower(conversations):
    from rewards.instruction_following import instruction_following
    from rewards.language import language
    from rewards.persona import persona

    rows = conversations
    prompts = [r["prompt"] for r in rows]
    refs = [r["reference"] for r in rows]
    cols = _columns(rows)
    assert instruction_following(prompts, refs, **cols) == [1.0] * len(rows)
    assert language(prompts, refs, **cols) == [1.0] * len(rows)
    assert persona(prompts, refs, **cols) == [1.0] * len(rows)
    assert persona(prompts, refs) == [1.0] * len(rows)  # the card in the system turn alone works too
    broken, wrong_language, out_of_character = zip(*(_violate(r) for r in rows))
    assert all(s < 1.0 for s in instruction_following(prompts, list(broken), **cols))
    assert all(s < 0.5 for s in language(prompts, list(wrong_language), **cols))
    assert all(s == 0.0 for s in persona(prompts, list(out_of_character), **cols))


def test_wrong_persona_facts_score_lower():
    from posttrain.data.conversations import make_conversations
    from rewards.persona import persona

    rows = make_conversations(30, turns=2, seed=4, languages=["en"])
    name_rows = [r for r in rows if r["reference"].startswith("Hello, my name is")]
    assert name_rows  # several of 30 English conversations end by asking the name
    wrong = [re.sub(r"my name is [A-Z]\w+ [A-Z]\w+", "my name is Zora Quinn", r["reference"]) for r in name_rows]
    prompts = [r["prompt"] for r in name_rows]
    assert persona(prompts, wrong, persona=[r["persona"] for r in name_rows]) == [0.0] * len(name_rows)


def test_conversation_layout_turns_cues_and_early_constraints(conversations):
    from posttrain.data.conversations import CUE
    from rewards.instruction_following import describe_constraint
    from rewards.persona import parse_persona, persona_from_system

    languages, kinds = set(), set()
    for row in conversations:
        prompt = row["prompt"]
        roles = [m["role"] for m in prompt]
        assert roles == ["system"] + ["user", "assistant"] * 3 + ["user"]
        assert row["num_turns"] == 4 and len(row["turn_languages"]) == 4
        assert row["language"] == row["turn_languages"][-1]
        assert prompt[-1]["content"].endswith(CUE[row["language"]])
        for turn, lang in zip([m for m in prompt if m["role"] == "user"], row["turn_languages"]):
            assert turn["content"].endswith(CUE[lang])
        for c in row["constraints"]:  # stated in turn 1 only, checked in the final reply
            assert describe_constraint(c) in prompt[1]["content"]
            assert describe_constraint(c) not in prompt[-1]["content"]
            assert c["value"] is None or isinstance(c["value"], str)
        card = parse_persona(row["persona"])
        assert persona_from_system(prompt[0]["content"]).name == card.name
        assert row["context_chars"] == sum(len(m["content"]) for m in prompt)
        languages.add(row["language"])
        kinds.update(c["type"] for c in row["constraints"])
    assert languages == {"en", "de", "fr", "es", "zh"}
    assert kinds == {"max_words", "required_keywords", "forbidden_keywords", "all_lowercase", "ends_with"}
    assert any(len(set(r["turn_languages"])) > 1 for r in conversations)  # users switch language


def test_rows_are_arrow_friendly(conversations):
    import pyarrow as pa

    table = pa.Table.from_pylist(conversations)
    assert table.num_rows == len(conversations)


def test_long_context_and_turn_counts_are_honoured():
    from posttrain.data.conversations import make_conversations
    from rewards.instruction_following import instruction_following

    for turns, target in ((1, 1500), (3, 6000), (6, 20000)):
        rows = make_conversations(6, turns=turns, seed=2, long_context_chars=target)
        for row in rows:
            assert row["num_turns"] == turns
            assert sum(m["role"] == "user" for m in row["prompt"]) == turns
            assert target <= row["context_chars"] < target + 1000
        refs = [r["reference"] for r in rows]
        assert instruction_following([r["prompt"] for r in rows], refs, **_columns(rows)) == [1.0] * len(rows)


def test_conversations_are_deterministic_by_seed():
    from posttrain.data.conversations import make_conversations

    a = make_conversations(12, turns=3, seed=5)
    assert a == make_conversations(12, turns=3, seed=5)
    assert a[:4] == make_conversations(4, turns=3, seed=5)  # row i depends only on (seed, i)
    assert a != make_conversations(12, turns=3, seed=6)


def test_languages_and_constraint_types_can_be_restricted():
    from posttrain.data.conversations import make_conversations

    rows = make_conversations(20, turns=3, seed=1, languages=["de", "fr"], constraint_types=["all_lowercase"],
                              min_constraints=1, max_constraints=1)
    assert {lang for r in rows for lang in r["turn_languages"]} <= {"de", "fr"}
    assert all(r["constraints"] == [{"type": "all_lowercase", "value": None}] for r in rows)
    assert all(r["reference"] == r["reference"].lower() for r in rows)
    with pytest.raises(UserError, match="unknown language code 'it'.*en, de, fr, es, zh"):
        make_conversations(1, languages=["en", "it"])
    with pytest.raises(UserError, match="json_format"):
        make_conversations(1, constraint_types=["json_format"])


def test_user_data_personas_and_turns_are_used(tmp_path):
    from posttrain.data.conversations import make_conversations, read_user_data
    from posttrain.data.io import read_jsonl
    from rewards.persona import persona

    src = _write_jsonl(tmp_path / "user.jsonl", [
        {"persona": "Name: Ana Silva; Age: 30; City: Porto; Style: emoji=never"},
        {"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": "Ich plane eine Reise nach Wien."},
                      {"role": "assistant", "content": "ok"}, {"role": "user", "content": "Was soll ich dort sehen?"}],
         "language": "de"},
    ])
    personas, convs = read_user_data(read_jsonl(src), src)
    assert [p.card.name for p in personas] == ["Ana Silva"] and convs[0].turns[1] == ("Was soll ich dort sehen?", "de")
    rows = make_conversations(5, turns=4, seed=0, personas=personas, user_conversations=convs)
    for row in rows:
        users = [m["content"] for m in row["prompt"] if m["role"] == "user"]
        assert "Ich plane eine Reise nach Wien." in users[0] and users[1].startswith("Was soll ich dort sehen?")
        assert row["turn_languages"][:2] == ["de", "de"]
        assert "Ana Silva" in row["prompt"][0]["content"]
    assert persona([r["prompt"] for r in rows], [r["reference"] for r in rows],
                   persona=[r["persona"] for r in rows]) == [1.0] * len(rows)


@pytest.mark.parametrize(
    "row, message",
    [
        ({"messages": [{"role": "assistant", "content": "hello"}]}, "line 2: the conversation in 'messages' has no user turn"),
        ({"turns": ["ciao"], "language": "it"}, "line 2, field 'language': unknown language code 'it'; supported: en, de, fr, es, zh"),
        ({"persona": "Age: 30"}, "line 2, field 'persona': a persona needs a name"),
        ({"other": 1}, "line 2: nothing to use"),
    ],
)
def test_bad_user_data_names_the_line(tmp_path, capsys, row, message):
    from data_tools.make_conversations import main

    src = _write_jsonl(tmp_path / "user.jsonl", [{"turns": ["What is new?"]}, row])
    rc = main(["-o", str(tmp_path / "out.jsonl"), "--n", "2", "--user-data", src])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and message in err and "user.jsonl" in err


def test_make_conversations_cli_writes_jsonl(tmp_path, capsys):
    from data_tools.make_conversations import main

    out = tmp_path / "conv.jsonl"
    assert main(["-o", str(out), "--n", "5", "--turns", "2", "--languages", "en,zh", "--min-chars", "800"]) == 0
    rows = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(rows) == 5 and all(r["context_chars"] >= 800 and r["num_turns"] == 2 for r in rows)
    assert "wrote 5 conversations" in capsys.readouterr().out
    assert main(["-o", str(out), "--languages", "klingon"]) == 2
    assert "supported: en, de, fr, es, zh" in capsys.readouterr().err


def test_generation_rejects_a_persona_the_templates_cannot_satisfy():
    from posttrain.data.conversations import make_conversations

    # "is" is in most English templates, so a persona forbidding it cannot be played by them.
    with pytest.raises(DataError, match="fails persona"):
        make_conversations(10, turns=2, seed=0, languages=["en"],
                           personas=["Name: Bo Lind; Age: 40; Style: forbidden=is|am|ich|je|me"])
