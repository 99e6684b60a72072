"""Training at scale: the run config's ``deepspeed`` key, turned into what TRL's trainers take.

``deepspeed=zero2`` or ``deepspeed=zero3`` names a DeepSpeed config shipped in
``recipes/configs/`` (any other value is a path to a DeepSpeed JSON file of your own). The
shipped configs leave batch sizes, gradient clipping, precision and bucket sizes as ``"auto"``:
the Hugging Face Trainer (and so TRL's trainers) fills them from the recipe's own settings, so
one config serves every recipe. The trainer processes are started by ``accelerate launch``
(``recipes/configs/accelerate_multi_gpu.yaml``); an empty ``deepspeed`` is the plain backend,
the only one a CPU run uses.

    args = GRPOConfig(..., deepspeed=deepspeed_config(cfg.deepspeed))
"""

from __future__ import annotations

import importlib.util
import json
import os

from posttrain.errors import ConfigError

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "configs")
NAMED_CONFIGS = {"zero2": "zero2.json", "zero3": "zero3.json"}
CPU_REFUSAL = "DeepSpeed ZeRO needs GPUs; CPU runs use the plain backend: drop deepspeed="


def config_path(name: str, key: str = "deepspeed") -> str:
    """The DeepSpeed JSON file that ``name`` (``zero2``, ``zero3`` or a path) stands for."""
    if name in NAMED_CONFIGS:
        return os.path.join(CONFIG_DIR, NAMED_CONFIGS[name])
    if not os.path.isfile(name):
        raise ConfigError(
            f"config key '{key}': {name!r} is neither {' nor '.join(NAMED_CONFIGS)} (the configs in recipes/configs/) "
            "nor an existing DeepSpeed JSON file"
        )
    return name


def load_config(name: str, key: str = "deepspeed") -> dict:
    """The DeepSpeed config ``name`` stands for, checked: valid JSON with a ZeRO stage 0-3."""
    path = config_path(name, key)
    try:
        with open(path, encoding="utf-8") as fh:
            config = json.load(fh)
    except json.JSONDecodeError as e:
        raise ConfigError(f"config key '{key}': {path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config key '{key}': {path} must hold a JSON object (a DeepSpeed config)")
    stage = config.get("zero_optimization", {}).get("stage")
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"config key '{key}': {path} needs zero_optimization.stage 0, 1, 2 or 3, got {stage!r}")
    return config


def zero_stage(name: str, key: str = "deepspeed") -> int:
    """The ZeRO stage of the config ``name`` stands for."""
    return int(load_config(name, key)["zero_optimization"]["stage"])


def deepspeed_config(name: str, key: str = "deepspeed") -> str | None:
    """``TrainingArguments(deepspeed=...)`` for the run config's ``deepspeed`` key: ``None`` for the
    plain backend (an empty key), else the path of a checked DeepSpeed config. Refuses, with a
    ConfigError, a run without GPUs and a machine without DeepSpeed installed."""
    if not name:
        return None
    load_config(name, key)
    import torch

    if not torch.cuda.is_available():
        raise ConfigError(f"config key '{key}': {CPU_REFUSAL}")
    if importlib.util.find_spec("deepspeed") is None:
        raise ConfigError(
            f"config key '{key}': DeepSpeed is not installed; install posttrain's `gpu` extra "
            "(pip install -e '.[gpu]') or drop deepspeed="
        )
    return config_path(name, key)


# The recipes whose trainer is TRL's (the Hugging Face Trainer, which takes a DeepSpeed config);
# the others train with their own single-process loop and refuse the key rather than ignore it.
DEEPSPEED_RECIPES = ("thinker_interaction_rl",)


def check_recipe_supports(recipe: str, cfg, key: str = "deepspeed") -> None:
    """A ConfigError when ``cfg.deepspeed`` is set for a recipe that does not train under DeepSpeed."""
    if getattr(cfg, "deepspeed", "") and recipe not in DEEPSPEED_RECIPES:
        raise ConfigError(
            f"config key '{key}': {recipe} trains with its own single-process loop, not under DeepSpeed "
            f"(DeepSpeed ZeRO runs in {', '.join(DEEPSPEED_RECIPES)}); drop deepspeed="
        )
