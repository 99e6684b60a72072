"""DeepSpeed configs and the `deepspeed` run key: the shipped ZeRO configs are what the Hugging
Face Trainer (and so TRL) expects, CPU runs are refused with one clear message, and on a GPU
machine the interaction RL recipe trains under ZeRO-2 and ZeRO-3 (skipped, with the reason,
elsewhere)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch

from posttrain.distributed import CONFIG_DIR, CPU_REFUSAL, check_recipe_supports, deepspeed_config, load_config, zero_stage
from posttrain.errors import ConfigError
from tests.conftest import REPO, run_cli


def _autos(node, path=""):
    """Every key of a nested config whose value is still "auto"."""
    if isinstance(node, dict):
        return [k for key, value in node.items() for k in _autos(value, f"{path}{key}.")]
    return [path.rstrip(".")] if node == "auto" else []


def _trainer_filled(config: dict, hidden_size: int, tmp_path) -> dict:
    """``config`` after the Hugging Face Trainer's own "auto" filling (the code TrainingArguments
    and Trainer run when given ``deepspeed=``), applied without DeepSpeed installed."""
    from accelerate.utils.deepspeed import HfDeepSpeedConfig
    from transformers import PretrainedConfig, TrainingArguments
    from transformers.integrations.deepspeed import HfTrainerDeepSpeedConfig as Hf

    class TrainerFill(HfDeepSpeedConfig):  # the Trainer's filling logic on accelerate's config object
        is_auto, fill_match, fill_only = Hf.is_auto, Hf.fill_match, Hf.fill_only
        trainer_config_process, trainer_config_finalize = Hf.trainer_config_process, Hf.trainer_config_finalize

    args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, per_device_train_batch_size=8,
                             gradient_accumulation_steps=2, max_grad_norm=0.5, report_to="none")
    fill = TrainerFill(config)
    fill.mismatches = []
    fill.trainer_config_process(args)
    model = torch.nn.Module()
    model.config = PretrainedConfig(hidden_size=hidden_size)
    fill.trainer_config_finalize(args, model, num_training_steps=10)
    return fill


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3)])
def test_shipped_configs_have_their_stage_and_only_trainer_filled_autos(name, stage, tmp_path):
    config = load_config(name)
    assert zero_stage(name) == stage
    assert config["zero_optimization"]["stage"] == stage
    assert _autos(config), "the shipped configs leave batch sizes etc. to the trainer"
    fill = _trainer_filled(config, hidden_size=64, tmp_path=tmp_path)
    assert fill.is_zero3() == (stage == 3) and fill.is_zero2() == (stage == 2)
    assert _autos(fill.config) == [], "every 'auto' is one the Trainer fills"
    assert fill.config["train_micro_batch_size_per_gpu"] == 8
    assert fill.config["train_batch_size"] == 16 and fill.config["gradient_accumulation_steps"] == 2
    assert fill.config["gradient_clipping"] == 0.5
    assert fill.config["zero_optimization"]["reduce_bucket_size"] == 64 * 64
    if stage == 3:
        assert fill.config["zero_optimization"]["stage3_param_persistence_threshold"] == 640


def test_accelerate_config_launches_one_process_per_gpu():
    import yaml

    with open(os.path.join(CONFIG_DIR, "accelerate_multi_gpu.yaml")) as fh:
        config = yaml.safe_load(fh)
    assert config["distributed_type"] == "MULTI_GPU" and config["use_cpu"] is False
    # the recipes keep their own precision (float32): accelerate must not switch it
    assert config["mixed_precision"] == "no"


def test_empty_key_is_the_plain_backend_and_bad_files_are_named(tmp_path):
    assert deepspeed_config("") is None
    with pytest.raises(ConfigError, match=r"'deepspeed': 'zero4' is neither zero2 nor zero3"):
        deepspeed_config("zero4")
    bad = tmp_path / "ds.json"
    bad.write_text('{\n  "zero_optimization": {"stage": 2,}\n}\n')
    with pytest.raises(ConfigError, match=r"ds.json, line 2: not valid JSON"):
        deepspeed_config(str(bad))
    bad.write_text('{"zero_optimization": {"stage": 5}}')
    with pytest.raises(ConfigError, match=r"zero_optimization.stage 0, 1, 2 or 3, got 5"):
        deepspeed_config(str(bad))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU refusal is for machines without GPUs")
def test_cpu_run_is_refused_before_any_work(tmp_path):
    with pytest.raises(ConfigError) as err:
        deepspeed_config("zero3")
    assert str(err.value) == f"config key 'deepspeed': {CPU_REFUSAL}"
    # through the real CLI: one line, exit 2, no traceback, no run directory
    rc, out, err = run_cli("run", "thinker_interaction_rl", "deepspeed=zero2", f"output_dir={tmp_path}")
    assert rc == 2 and "Traceback" not in err, err
    assert "DeepSpeed ZeRO needs GPUs; CPU runs use the plain backend: drop deepspeed=" in err
    assert not os.path.exists(tmp_path / "thinker_interaction_rl")


def test_recipes_with_their_own_loop_refuse_the_key():
    class Cfg:
        deepspeed = "zero2"

    check_recipe_supports("thinker_interaction_rl", Cfg())
    with pytest.raises(ConfigError, match="talker_pretrain trains with its own single-process loop"):
        check_recipe_supports("talker_pretrain", Cfg())
    Cfg.deepspeed = ""
    check_recipe_supports("talker_pretrain", Cfg())


def _gpu_skip_reason() -> str | None:
    if not torch.cuda.is_available():
        return "DeepSpeed ZeRO needs a CUDA GPU (none here)"
    if importlib.util.find_spec("deepspeed") is None:
        return "DeepSpeed is not installed (the `gpu` extra)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_gpu_skip_reason() is not None, reason=_gpu_skip_reason() or "")
@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_interaction_rl_trains_under_zero_on_gpu(stage, tmp_path):
    """Two GSPO steps of the interaction RL recipe under `accelerate launch` with DeepSpeed."""
    overrides = [
        f"deepspeed={stage}", f"output_dir={tmp_path}", "run_name=ds", "max_steps=2", "save_every=0", "log_every=1",
        "warmup.steps=20", "data.train_size=64", "data.eval_size=4", "data.long_eval_size=0",
        "gspo.batch_size=8", "gspo.num_generations=4", "gspo.steps_per_generation=2", "gspo.max_completion_length=8",
    ]
    # one process: accelerate's simple launcher, which leaves the torch.distributed rendezvous
    # (that DeepSpeed needs even alone) to the environment
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT="29517", RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file", os.path.join(CONFIG_DIR, "accelerate_multi_gpu.yaml"),
         "--num_processes", "1", "-m", "posttrain", "run", "thinker_interaction_rl", *overrides],
        capture_output=True, text=True, cwd=REPO, timeout=1200, env=env,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "thinker_interaction_rl" / "ds"
    with open(run_dir / "summary.json") as fh:
        summary = json.load(fh)
    assert "reward/combined" in summary["metrics"]
    losses = [json.loads(line).get("loss") for line in open(run_dir / "metrics.jsonl")]
    assert any(loss is not None for loss in losses)
