"""The first recipe end to end on tiny settings: parameters move, KL falls, accuracy is
reported, a killed run resumes to the same result as an uninterrupted one."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from posttrain.config import load_config
from recipes import defaults_path, load_recipe
from tests.conftest import REPO

RECIPE = "thinker_specialist_distill"
TINY = [
    "student.size.hidden_size=64",
    "student.size.num_layers=1",
    "teacher_build.size.hidden_size=64",
    "teacher_build.size.num_layers=1",
    "teacher_build.steps=200",
    "teacher_build.batch_size=32",
    "data.train_size=256",
    "data.eval_size=16",
    "batch_size=16",
    "eval_every=0",
    "log_every=5",
]


def _config(tmp_path, *extra):
    module = load_recipe(RECIPE)
    return module, load_config(module.Config, defaults_path(RECIPE), TINY + [f"output_dir={tmp_path}", *extra])


def test_token_kd_moves_parameters_and_lowers_kl(tmp_path):
    module, cfg = _config(tmp_path, "max_steps=60", "save_every=0", "kd.divergence=jsd", "kd.beta=0.5")
    original = {}

    real_set_trainable = module.set_trainable

    def spy(student, part):  # keep a copy of the student's starting weights
        original.update({k: v.detach().clone() for k, v in student.state_dict().items()})
        return real_set_trainable(student, part)

    module.set_trainable = spy
    try:
        result = module.run(cfg)
    finally:
        module.set_trainable = real_set_trainable
    summary = json.load(open(os.path.join(result.run_dir, "summary.json")))
    metrics = summary["metrics"]
    for domain in ("arithmetic", "strings"):
        kl = metrics[f"kl/{domain}"]
        assert kl["better"] == "lower" and kl["after"] < 0.8 * kl["before"], kl
        assert metrics[f"accuracy/{domain}"]["better"] == "higher"
    from safetensors.torch import load_file

    trained = load_file(os.path.join(result.run_dir, "model", "model.safetensors"))
    moved = [k for k in trained if k in original and not torch.equal(trained[k], original[k])]
    assert any("layers.0.self_attn" in k for k in moved) and any("embed_tokens" in k for k in moved)
    frozen = [k for k in trained if k.startswith("audio_tower.") and k in original]
    assert frozen and all(torch.equal(trained[k], original[k]) for k in frozen)  # thinker_text leaves the ears alone
    run_files = os.listdir(result.run_dir)
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "plots", "model", "checkpoints"):
        assert name in run_files
    assert os.path.exists(os.path.join(result.run_dir, "plots", "kl.png"))


def test_sequence_mode_with_user_reward_plugins(tmp_path):
    plugin = tmp_path / "user_rewards.py"
    plugin.write_text(
        "def short_answer(completions, **kwargs):\n"  # TRL's reward-function shape
        "    return [1.0 if len(c) <= 4 else 0.0 for c in completions]\n"
    )
    rewards = f"rewards=[{{name: '{plugin}:short_answer', weight: 1.0}}, {{name: number_rendering, weight: 1.0}}]"
    module, cfg = _config(tmp_path, "max_steps=12", "save_every=0", "mode=sequence", rewards)
    seq = module.run(cfg).summary["metrics"]
    assert seq["kl/arithmetic"]["after"] < seq["kl/arithmetic"]["before"]
    assert 0.0 <= seq["reward/short_answer"]["after"] <= 1.0
    assert "reward/combined" in seq

def test_on_policy_mixed_run(tmp_path):
    module, cfg = _config(tmp_path, "max_steps=12", "save_every=0", "kd.sequences=mixed", "kd.student_fraction=0.5", "kd.divergence=reverse_kl")
    mixed = module.run(cfg).summary["metrics"]
    assert mixed["kl/strings"]["after"] < mixed["kl/strings"]["before"]


def _cli(*args):
    return [sys.executable, "-m", "posttrain", "run", RECIPE, *TINY, *args]


@pytest.mark.slow
def test_killed_run_resumes_to_the_same_result(tmp_path):
    common = ["max_steps=60", "save_every=10", f"output_dir={tmp_path}"]
    # Warm the teacher cache so the timing below is about training.
    subprocess.run(_cli(*common, "max_steps=1", "run_name=warm"), check=True, capture_output=True, cwd=REPO)

    proc = subprocess.Popen(_cli(*common, "run_name=killed"), cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / RECIPE / "killed" / "checkpoints"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (ckpts / "step-000020").exists():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / RECIPE / "killed" / "summary.json").exists()

    done = subprocess.run(_cli(*common, "run_name=killed", "resume=true"), capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert "resumed from" in done.stdout
    straight = subprocess.run(_cli(*common, "run_name=straight"), capture_output=True, text=True, cwd=REPO)
    assert straight.returncode == 0, straight.stderr

    resumed = json.load(open(tmp_path / RECIPE / "killed" / "summary.json"))["metrics"]
    uninterrupted = json.load(open(tmp_path / RECIPE / "straight" / "summary.json"))["metrics"]
    for name, value in uninterrupted.items():
        assert resumed[name]["before"] == pytest.approx(value["before"], rel=1e-4, abs=1e-6)
        assert resumed[name]["after"] == pytest.approx(value["after"], rel=1e-3, abs=1e-4), name
    # metrics.jsonl has each training step's line once: the killed run's lines past the
    # checkpoint were dropped on resume and written again
    lines = [json.loads(line) for line in open(tmp_path / RECIPE / "killed" / "metrics.jsonl")]
    loss_steps = [row["step"] for row in lines if "loss" in row]
    assert loss_steps == sorted(set(loss_steps)) and loss_steps[-1] == 60
