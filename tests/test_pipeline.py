"""The pipeline recipe on tiny settings: every stage runs in its own folder and starts from the
previous stage's output, one table and one figure, resume=true re-runs only the unfinished
stage; config mistakes fail before any stage runs, naming the stage and key."""

import json
import os
import re

import pytest
import yaml

from posttrain.config import load_config
from posttrain.errors import ConfigError
from recipes import defaults_path
from recipes.pipeline import RECIPE, STAGES, Config, flatten, improvement, run, verdict

# The smoke tests' tiny settings of each stage (tests/test_<stage>.py), a few steps each.
TINY_STAGES = {
    "thinker_specialist_distill": {
        "student.size": {"hidden_size": 64, "num_layers": 1, "audio_hidden": 64, "audio_layers": 1, "num_mel_bins": 32},
        "teacher_build": {"size": {"hidden_size": 64, "num_layers": 1}, "steps": 30, "batch_size": 16},
        "data": {"train_size": 64, "eval_size": 8}, "batch_size": 8, "max_steps": 4, "save_every": 0, "eval_every": 0,
    },
    "thinker_audio_distill": {
        "student.size": {"num_mel_bins": 32},
        "ears": {"text_steps": 6, "ear_steps": 4, "batch_size": 8},
        "data": {"repeats": 1, "eval_size": 4, "pitches": [50]},
        "batch_size": 4, "max_steps": 2, "save_every": 0, "eval_every": 0, "generation.max_new_tokens": 3,
    },
    "thinker_interaction_rl": {
        "policy.size": {"hidden_size": 64, "num_layers": 1, "num_heads": 2, "num_kv_heads": 1},
        "warmup": {"steps": 3, "batch_size": 4},
        "data": {"train_size": 16, "eval_size": 2, "long_eval_size": 1, "long_context_chars": 800},
        "gspo": {"num_generations": 2, "batch_size": 4, "steps_per_generation": 2, "max_completion_length": 8},
        "eval.samples": 1, "max_steps": 2, "save_every": 0, "log_every": 1,
    },
    "talker_pretrain": {
        "max_steps": 4, "batch_size": 4, "save_every": 0, "talker": {"hidden_size": 64, "num_layers": 1},
        "data": {"train_size": 24, "eval_size": 2, "voices": ["en-us", "en-gb"]},
        "long_context": {"steps": 1, "lengths": [2], "batch_size": 2, "replay": 0},
    },
    "talker_dpo": {
        "pairs": {"train_prompts": 3, "eval_prompts": 2, "candidates": 2, "margin": 0.0},
        "eval.sentences": 2, "max_steps": 2, "dpo.batch_size": 2, "save_every": 0, "rewards": [{"name": "wer"}],
    },
    "talker_gspo": {
        "max_steps": 1, "gspo": {"prompts_per_step": 2, "num_generations": 2}, "eval": {"sentences": 2, "examples": 0},
        "save_every": 0, "rewards": [{"name": "wer", "params": {"transform": "1-wer"}}],
    },
    "talker_speaker_ft": {
        "data.clips": 6, "max_steps": 2, "batch_size": 2, "eval.sentences": 2, "save_every": 0, "voice.name": "pipeline-test-voice",
    },
}


def _tiny_config(tmp_path, *extra):
    """The shipped pipeline.yaml (with its hand-offs), every stage shrunk to a few steps."""
    overrides = [f"output_dir={tmp_path}", "run_name=tiny"]
    for stage, values in TINY_STAGES.items():
        for key, value in flatten(values).items():
            overrides.append(f"stages.{stage}.{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    return load_config(Config, defaults_path(RECIPE), overrides + list(extra))


def _stage_config(run_dir, stage):
    with open(os.path.join(run_dir, stage, "run", "config.yaml")) as fh:
        return yaml.safe_load(fh)


@pytest.mark.slow
def test_tiny_pipeline_hands_off_tabulates_plots_and_resumes_only_the_unfinished_stage(tmp_path, capsys):
    result = run(_tiny_config(tmp_path))
    run_dir = result.run_dir
    assert run_dir == os.path.join(str(tmp_path), RECIPE, "tiny")
    for stage in STAGES:
        assert os.path.exists(os.path.join(run_dir, stage, "run", "summary.json")), stage

    # Hand-offs: each stage's start is the previous stage's output (as the stage recorded it).
    specialist, audio = (os.path.join(run_dir, s, "run") for s in STAGES[:2])
    assert _stage_config(run_dir, "thinker_audio_distill")["ears"]["start"] == os.path.join(specialist, "model")
    assert _stage_config(run_dir, "thinker_interaction_rl")["policy"]["path"] == "embedded"  # another vocabulary: not handed off
    chain = ["talker_pretrain", "talker_dpo", "talker_gspo", "talker_speaker_ft"]
    for prev, stage in zip(chain, chain[1:]):
        start = os.path.join(run_dir, prev, "run", "talker")
        assert _stage_config(run_dir, stage)["policy"]["path"] == start
        assert os.path.exists(os.path.join(start, "talker.json"))
    assert json.load(open(os.path.join(run_dir, "talker_dpo", "run", "summary.json")))["start"] == os.path.join(run_dir, "talker_pretrain", "run", "talker")
    assert json.load(open(os.path.join(run_dir, "talker_speaker_ft", "run", "summary.json")))["base"] == os.path.join(run_dir, "talker_gspo", "run", "talker")
    # the audio student really is the specialist student with ears: same tokenizer, same decoder shape
    from posttrain.models.qwen_omni import load_language_model

    a, tok_a = load_language_model(os.path.join(specialist, "model"))
    b, tok_b = load_language_model(os.path.join(audio, "model"))
    assert tok_a.get_vocab() == tok_b.get_vocab()
    assert {k: v.shape for k, v in a.state_dict().items()} == {k: v.shape for k, v in b.state_dict().items()}

    # One table and one figure over every stage's target metrics.
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["recipe"] == RECIPE
    for stage in STAGES:
        stage_metrics = json.load(open(os.path.join(run_dir, stage, "run", "summary.json")))["metrics"]
        for metric, m in stage_metrics.items():
            assert summary["metrics"][f"{stage}/{metric}"] == {"before": m["before"], "after": m["after"], "better": m["better"]}
    assert [s["stage"] for s in summary["stages"]] == list(STAGES) and all(s["ran"] for s in summary["stages"])
    table = open(os.path.join(run_dir, "summary.md")).read()
    assert table.count("| talker_gspo | wer *") == 1 and "| thinker_audio_distill | accuracy_gap *" in table
    rows = [line for line in table.splitlines() if line.startswith("| thinker_") or line.startswith("| talker_")]
    assert len([r for r in rows if r.count("|") == 7]) == len(summary["metrics"])
    out = capsys.readouterr().out
    assert re.search(r"\ntalker_speaker_ft +speaker_similarity \* +[-0-9.]+ +[-0-9.]+ +higher", out)
    with open(os.path.join(run_dir, "plots", "pipeline.png"), "rb") as fh:
        assert fh.read(8) == b"\x89PNG\r\n\x1a\n"

    # A pipeline killed during its last stage: only that stage runs again, from its own folder.
    finished = {s: os.path.getmtime(os.path.join(run_dir, s, "run", "summary.json")) for s in STAGES[:-1]}
    os.remove(os.path.join(run_dir, "talker_speaker_ft", "run", "summary.json"))
    os.remove(os.path.join(run_dir, "summary.json"))
    resumed = run(_tiny_config(tmp_path, "resume=true"))
    assert resumed.run_dir == run_dir
    out = capsys.readouterr().out
    assert out.count("finished before, skipped") == len(STAGES) - 1
    assert "stage 7/7: talker_speaker_ft (resuming)" in out
    assert {s: os.path.getmtime(os.path.join(run_dir, s, "run", "summary.json")) for s in STAGES[:-1]} == finished
    assert [s["ran"] for s in resumed.summary["stages"]] == [False] * 6 + [True]
    assert set(resumed.summary["metrics"]) == set(summary["metrics"])


def test_config_mistakes_fail_before_any_stage_runs(tmp_path):
    def fails(*overrides):
        with pytest.raises(ConfigError) as e:
            run(load_config(Config, defaults_path(RECIPE), [f"output_dir={tmp_path}", *overrides]))
        return str(e.value)

    assert "stages.talker_gspo: unknown config key 'gspo.prompts_per_stp'" in fails("stages.talker_gspo.gspo.prompts_per_stp=4")
    assert "did you mean talker_dpo" in fails("stages.talker_dop.max_steps=3")
    assert "{talker_speaker_ft} is not an earlier stage" in fails("stages.talker_gspo.policy.path={talker_speaker_ft}/talker")
    assert "skip talker_gspo too" in fails("skip=[talker_dpo]")
    assert "the pipeline sets it" in fails("stages.talker_dpo.output_dir=/tmp/x")
    assert not os.path.exists(os.path.join(tmp_path, RECIPE))  # nothing was written


def test_verdict_and_relative_improvement():
    assert verdict(1.0, 0.4, "lower") == "✓" and verdict(0.4, 1.0, "lower") == "✗" and verdict(0.5, 0.5, "higher") == "="
    assert verdict(None, 0.5, "higher") == "n/a"
    assert improvement(0.0, 0.95, "higher") == pytest.approx(1.0)
    assert improvement(1.0, 0.4, "lower") == pytest.approx(0.6)
    assert improvement(0.5, 0.4, "higher") == pytest.approx(-0.2)
    assert improvement(0.0, 0.0, "lower") == 0.0
