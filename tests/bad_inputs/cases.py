"""The bad-input corpus: one declarative case per kind of bad input.

A case is the command line a user would type (``{tmp}`` stands for the case's own folder), the
files it needs (text, bytes, or a fixture function that writes the path), and the fragments the
one-line error must contain: the fault named and what to do. Every case must end with exit
code 2, no traceback, and nothing under ``{tmp}`` that looks like a finished run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Union

from tests.bad_inputs import fixtures as fx

FileSpec = Union[str, bytes, Callable[[str], None]]


@dataclass(frozen=True)
class Case:
    name: str  # "<area>/<kind>"
    argv: list[str]
    expect: list[str]  # fragments of stderr, in any order
    files: dict[str, FileSpec] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)
    inject: str | None = None  # an in-process fault (see tests/test_bad_inputs.py)
    exit_code: int = 2


SD = "thinker_specialist_distill"
TP = "talker_pretrain"
AD = "thinker_audio_distill"
RL = "thinker_interaction_rl"

GOOD_ROW = {"prompt": "What is 1 + 2?", "domain": "arithmetic"}
SAMPLES = fx.jsonl({"prompt": "Say hi", "completion": "hi"}, {"prompt": "Say bye", "completion": "bye"})


def sd(*overrides: str) -> list[str]:
    return ["run", SD, *overrides]


def speech(name: str, maker, expect: list[str], row_extra: dict | None = None) -> Case:
    """A talker_pretrain run on one user recording made by ``maker``."""
    row = {"audio": "clip.wav", "text": "hello there", **(row_extra or {})}
    return Case(
        f"audio/{name}", ["run", TP, "data.path={tmp}/rows.jsonl"], expect,
        files={"rows.jsonl": fx.jsonl(row), "clip.wav": maker},
    )


def score(plugin: str, *extra: str, samples: str = SAMPLES) -> list[str]:
    return ["rewards", "score", "--reward", plugin, "--data", "{tmp}/samples.jsonl", *extra]


def reward(name: str, body: str, expect: list[str], *extra: str) -> Case:
    """`posttrain rewards score` with a plugin file of the user's."""
    module = f"plugin_{name.replace('-', '_')}.py"
    return Case(
        f"reward/{name}", score(f"{{tmp}}/{module}:reward", *extra), expect,
        files={module: fx.plugin(body), "samples.jsonl": SAMPLES},
    )


CASES: list[Case] = [
    # ------------------------------------------------------------------ config
    Case("config/unknown-key", sd("max_stepz=3"), ["unknown config key 'max_stepz'", "did you mean max_steps"]),
    Case("config/unknown-nested-key", sd("kd.divergnce=jsd"), ["unknown config key 'kd.divergnce'", "kd.divergence"]),
    Case("config/wrong-type", sd("max_steps=many"), ["'max_steps': expected an integer, got 'many'"]),
    Case("config/wrong-type-bool", sd("resume=maybe"), ["'resume': expected true or false"]),
    Case("config/out-of-range", sd("max_steps=-5"), ["'max_steps'", "below the minimum 0"]),
    Case("config/out-of-range-float", sd("kd.beta=1.5"), ["'kd.beta'", "above the maximum 1.0"]),
    Case("config/invalid-choice", sd("kd.divergence=kl"), ["'kd.divergence'", "forward_kl, reverse_kl, jsd"]),
    Case("config/bad-override-syntax", sd("max_steps"), ["bad override 'max_steps'", "write key=value"]),
    Case("config/empty-key-part", sd("kd..beta=0.1"), ["bad override 'kd..beta=0.1'", "empty part"]),
    Case("config/subkey-of-scalar", sd("max_steps.x=1"), ["'max_steps.x'", "has no sub-keys"]),
    Case("config/unparsable-value", sd("rewards=[{name: x"), ["config key 'rewards'", "cannot parse"]),
    Case("config/unknown-recipe", ["run", "thinker_specialist_distil"], ["unknown recipe 'thinker_specialist_distil'", "did you mean thinker_specialist_distill"]),
    Case("config/yaml-syntax-error", sd("config={tmp}/my.yaml"), ["my.yaml", "line 2", "YAML syntax error"],
         files={"my.yaml": "max_steps: 3\nseed: 1: 2\n"}),
    Case("config/yaml-missing", sd("config={tmp}/nope.yaml"), ["nope.yaml", "does not exist"]),
    Case("config/yaml-not-a-mapping", sd("config={tmp}/list.yaml"), ["list.yaml", "expected a mapping"],
         files={"list.yaml": "- max_steps: 3\n"}),
    Case("config/yaml-unknown-key", sd("config={tmp}/my.yaml"), ["unknown config key 'optim.learning_rate'", "optim.lr"],
         files={"my.yaml": "optim:\n  learning_rate: 0.1\n"}),
    Case("config/yaml-wrong-type", sd("config={tmp}/my.yaml"), ["'batch_size': expected an integer, got 'lots'"],
         files={"my.yaml": "batch_size: lots\n"}),
    Case("config/yaml-not-utf8", sd("config={tmp}/my.yaml"), ["my.yaml", "not UTF-8"],
         files={"my.yaml": "run_name: caf\u00e9\n".encode("latin-1")}),
    Case("config/negative-reward-timeout", sd("rewards=[{name: language, timeout_s: -1}]"), ["'rewards[0].timeout_s'", "below the minimum 0"]),
    Case("config/lora-sync-without-lora-policy", ["run", RL, "rollout.engines=1", "rollout.sync=lora"],
         ["'rollout.sync'", "set policy.lora_rank"]),
    Case("config/tensor-parallel-without-gpus", ["run", RL, "rollout.engines=1", "rollout.kind=vllm", "rollout.tensor_parallel=2"],
         ["'rollout.tensor_parallel'", "set rollout.engine_gpus=2"]),
    Case("config/gspo-sampled-codes-outside-the-ratio", ["run", "talker_gspo", "gspo.sample_residual_codes=true"],
         ["'gspo.code_predictor_weight'", "the ratio would ignore sampled decisions", "gspo.code_predictor_weight=1"]),
    Case("config/dpo-weights-residual-codes-it-did-not-sample", ["run", "talker_dpo", "dpo.code_predictor_weight=1"],
         ["'dpo.code_predictor_weight'", "not a choice the pairs compare", "dpo.code_predictor_weight=0"]),
    # ------------------------------------------------------------------ data
    Case("data/missing-file", sd("data.path={tmp}/missing.jsonl"), ["missing.jsonl", "does not exist", "set data.path"]),
    Case("data/malformed-jsonl-line", sd("data.path={tmp}/d.jsonl"), ["d.jsonl, line 2: not valid JSON", "fix or remove the line"],
         files={"d.jsonl": fx.jsonl(GOOD_ROW, '{"prompt": "What is 2 + 2?", "domain": ', GOOD_ROW)}),
    Case("data/line-not-an-object", sd("data.path={tmp}/d.jsonl"), ["d.jsonl, line 2: expected a JSON object per line, got list"],
         files={"d.jsonl": fx.jsonl(GOOD_ROW, [1, 2])}),
    Case("data/missing-field", sd("data.path={tmp}/d.jsonl"), ["d.jsonl, line 2: missing field 'domain'"],
         files={"d.jsonl": fx.jsonl(GOOD_ROW, {"prompt": "no domain"})}),
    Case("data/wrong-type", sd("data.path={tmp}/d.jsonl"), ["d.jsonl, line 1: field 'domain' must be a non-empty string, got 7"],
         files={"d.jsonl": fx.jsonl({"prompt": "x", "domain": 7})}),
    Case("data/wrong-type-conversation", ["run", RL, "data.path={tmp}/c.jsonl"], ["c.jsonl, line 1", "'prompt' must be a list of {role, content} messages"],
         files={"c.jsonl": fx.jsonl({"prompt": 42, "language": "en"})}),
    Case("data/empty-file", sd("data.path={tmp}/d.jsonl"), ["d.jsonl' is empty", "one JSON object per line"], files={"d.jsonl": ""}),
    Case("data/unknown-domain", sd("data.path={tmp}/d.jsonl"), ["line 2: domain 'chemistry' has no teacher", "teachers.chemistry=PATH"],
         files={"d.jsonl": fx.jsonl(GOOD_ROW, {"prompt": "pH of water?", "domain": "chemistry"})}),
    Case("data/unknown-language", ["run", RL, "data.path={tmp}/c.jsonl"], ["c.jsonl, line 1, field 'language'", "xx"],
         files={"c.jsonl": fx.jsonl({"prompt": [{"role": "user", "content": "hi"}], "language": "xx"})}),
    Case("data/duplicate-ids", sd("data.path={tmp}/d.jsonl"), ["d.jsonl, line 3: duplicate id 'q1' (first on line 1)", "own id"],
         files={"d.jsonl": fx.jsonl(dict(GOOD_ROW, id="q1"), dict(GOOD_ROW, id="q2"), dict(GOOD_ROW, id="q1"))}),
    Case("data/non-utf8", sd("data.path={tmp}/d.jsonl"), ["d.jsonl: not UTF-8 text", "save the file as UTF-8"], files={"d.jsonl": fx.make_non_utf8}),
    Case("data/unknown-format", sd("data.path={tmp}/d.txt"), ["d.txt: unknown data format", ".jsonl"], files={"d.txt": "prompt,domain\n"}),
    Case("data/broken-parquet", sd("data.path={tmp}/d.parquet"), ["d.parquet: cannot read parquet"], files={"d.parquet": fx.make_not_a_parquet}),
    Case("data/hub-dataset-not-cached", sd("data.path=nobody-xyz/not-a-dataset"), ["dataset 'nobody-xyz/not-a-dataset'", "local Hugging Face cache"],
         env={"HF_HOME": "{tmp}/hf", "HF_DATASETS_CACHE": "{tmp}/hf/datasets", "HF_HUB_CACHE": "{tmp}/hf/hub"}),
    # ------------------------------------------------------------------ audio (talker_pretrain user recordings)
    speech("missing", None, ["rows.jsonl, line 1: audio file 'clip.wav' does not exist", "data.on_bad=skip"]),
    speech("unreadable", fx.make_garbage, ["rows.jsonl, line 1", "cannot be decoded", "convert it to WAV or FLAC"]),
    speech("empty", fx.make_empty_wav, ["rows.jsonl, line 1 (clip.wav): audio is empty (0 samples)"]),
    speech("silent", fx.make_silent_wav, ["rows.jsonl, line 1 (clip.wav): audio is silent", "check the recording"]),
    speech("too-short", fx.make_short_wav, ["rows.jsonl, line 1 (clip.wav)", "shorter than the minimum 0.3 s"]),
    speech("clipped", fx.make_clipped_wav, ["rows.jsonl, line 1 (clip.wav)", "clipped at full scale", "lower gain"]),
    speech("wrong-sample-rate", fx.make_low_rate_wav, ["rows.jsonl, line 1", "sample rate of 2000 Hz", "re-export it at 16 kHz"]),
    speech("stereo-cancelling", fx.make_cancelling_stereo_wav, ["rows.jsonl, line 1", "channels cancel when mixed to mono", "single channel"]),
    speech("two-hour-file", fx.make_two_hour_wav, ["rows.jsonl, line 1", "is 2:00:00 long", "cut it into utterances"]),
    speech("nan-samples", fx.make_nan_wav, ["rows.jsonl, line 1", "100 NaN/inf samples", "regenerate it"]),
    speech("empty-transcript", fx.make_good_wav, ["rows.jsonl, line 1: the transcript is empty"], {"text": "  "}),
    speech("transcript-too-long", fx.make_good_wav, ["rows.jsonl, line 1 (clip.wav): 200 words in 1.50 s", "does not belong"], {"text": "word " * 200}),
    Case("audio/path-is-directory", ["run", TP, "data.path={tmp}/rows.jsonl"], ["rows.jsonl, line 1: audio file 'clips' does not exist"],
         files={"rows.jsonl": fx.jsonl({"audio": "clips", "text": "hi"}), "clips/x.txt": "a folder"}),
    Case("audio/silent-spoken-query", ["run", AD, "student.path={tmp}/thinker", "data.path={tmp}/q.jsonl", "data.on_bad_audio=fail"],
         ["q.jsonl, line", "q.wav: audio is silent", "data.on_bad_audio=skip"],
         files={"thinker": fx.make_thinker_config, "q.jsonl": fx.jsonl(*[{"prompt": "one plus two", "audio": "q.wav"}] * 3), "q.wav": fx.make_silent_wav}),
    # ------------------------------------------------------------------ models
    Case("model/missing-path", sd("student.path={tmp}/no-model"), ["student.path", "no-model", "does not exist"]),
    Case("model/path-is-file", sd("student.path={tmp}/model.bin"), ["model.bin' is a file", "Hugging Face model folder"], files={"model.bin": b"\0" * 16}),
    Case("model/folder-without-config", sd("student.path={tmp}/m"), ["m' is a folder without config.json"], files={"m": fx.make_folder_without_config}),
    Case("model/broken-config-json", sd("teachers.arithmetic={tmp}/m"), ["m/config.json", "cannot read"], files={"m": fx.make_broken_config_model}),
    Case("model/wrong-architecture", sd("student.path={tmp}/m"), ["'resnet' model (ResNetForImageClassification), not a text generator", "causal language model"],
         files={"m": fx.make_image_model}),
    Case("model/unknown-model-type", sd("student.path={tmp}/m"), ["model_type 'frobnicator'", "does not know"], files={"m": fx.make_unknown_type_model}),
    Case("model/asks-for-remote-code", sd("teachers.arithmetic={tmp}/m"), ["teachers.arithmetic", "asks to run its own Python code", "trust_remote_code=true"],
         files={"m": fx.make_remote_code_model}),
    Case("model/hub-name-not-cached", sd("student.path=nobody-xyz/tiny-model"), ["'nobody-xyz/tiny-model' is not in the local Hugging Face cache", "hf download nobody-xyz/tiny-model"],
         env={"HF_HOME": "{tmp}/hf", "HF_HUB_CACHE": "{tmp}/hf/hub"}),
    Case("model/tokenizer-mismatch", sd("teachers.arithmetic={tmp}/m", "teachers.strings={tmp}/m", "data.train_size=4", "data.eval_size=2"),
         ["uses a different tokenizer from the student", "mode=sequence"], files={"m": fx.make_other_tokenizer_model}),
    Case("model/not-a-talker-folder", ["eval", "tts", "--talker", "{tmp}/nothing"], ["is not a Talker folder (no talker.json)"]),
    # ------------------------------------------------------------------ reward plugins
    Case("reward/unknown-name", score("no_such_reward"), ["unknown reward 'no_such_reward'", "module:function"], files={"samples.jsonl": SAMPLES}),
    Case("reward/missing-module", score("no_such_module_xyz:reward"), ["importing 'no_such_module_xyz' failed", "ModuleNotFoundError"], files={"samples.jsonl": SAMPLES}),
    Case("reward/missing-file", score("{tmp}/gone.py:reward"), ["gone.py' does not exist"], files={"samples.jsonl": SAMPLES}),
    reward("import-error", "import not_installed_package_xyz\n\ndef reward(prompts, completions, **kw):\n    return [1.0] * len(completions)",
           ["importing", "plugin_import_error.py", "No module named 'not_installed_package_xyz'"]),
    reward("no-such-function", "def other(prompts, completions, **kw):\n    return []", ["has no function 'reward'"]),
    reward("raises", "def reward(prompts, completions, **kw):\n    return [1.0 / (c == 'hi') for c in completions]", ["raised on sample 1: ZeroDivisionError"]),
    reward("wrong-length", "def reward(prompts, completions, **kw):\n    return [1.0]", ["returned 1 values for 2 samples"]),
    reward("nan", "def reward(prompts, completions, **kw):\n    return [0.5, math.nan]", ["returned nan for sample 1", "return None"]),
    reward("returns-strings", "def reward(prompts, completions, **kw):\n    return ['good', 'bad']", ["returned str 'good' for sample 0", "a number or None"]),
    reward("not-a-list", "def reward(prompts, completions, **kw):\n    return 3.0", ["returned float, expected a list of 2 numbers"]),
    reward("very-slow", "def reward(prompts, completions, **kw):\n    time.sleep(60)\n    return [1.0] * len(completions)",
           ["took longer than 0.2 s", "raise its timeout_s"], "--timeout", "0.2"),
    Case("reward/in-run-config-unknown", sd("rewards=[{name: no_such_reward}]"), ["unknown reward 'no_such_reward'"]),
    Case("reward/score-data-missing-completion", score("language"), ["samples.jsonl, line 1: missing field 'completion'"],
         files={"samples.jsonl": fx.jsonl({"prompt": "hi"})}),
    # ------------------------------------------------------------------ disk
    Case("disk/output-parent-is-a-file", sd("output_dir={tmp}/blocker/runs"), ["cannot write the run directory", "set output_dir to a writable folder"],
         files={"blocker": fx.make_file_parent}),
    Case("disk/output-in-proc", sd("output_dir=/proc/posttrain-runs"), ["cannot write the run directory", "/proc/posttrain-runs"]),
    Case("disk/score-output-unwritable", score("language", "--output", "{tmp}/blocker/scores.jsonl"), ["cannot write", "scores.jsonl", "writable path"],
         files={"blocker": fx.make_file_parent, "samples.jsonl": SAMPLES}),
    Case("disk/full-while-saving-checkpoint",
         ["run", TP, "data.path={tmp}/rows.jsonl", "data.alignment=proportional", "data.eval_size=2", "max_steps=4", "save_every=2",
          "keep_checkpoints=3", "eval_before=false", "long_context.steps=0", "batch_size=4", "talker.hidden_size=64", "talker.num_layers=1"],
         ["could not write checkpoint", "step-000004", "No space left on device", "free disk space"], inject="enospc-on-second-checkpoint",
         files={"rows.jsonl": fx.jsonl(*[{"audio": "clip.wav", "text": t} for t in ("hello there", "good morning", "see you", "thank you",
                                                                                     "one two", "red blue", "yes no", "up down")]),
                "clip.wav": fx.make_spoken_wav}),
]
