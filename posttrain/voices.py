"""Voice adapters: a voice learned by ``talker_speaker_ft`` as a LoRA adapter (peft) plus its
speaker-token vector and speaker embedding, stored apart from the base Talker::

    voices/NAME/
      adapter/             peft LoRA adapter (adapter_config.json + adapter_model.safetensors)
      speaker_token.safetensors   the learned row of the Talker's codec embedding for this voice
      reference.npy        speaker embedding (Resemblyzer) of the recordings it learned from
      voice.json           name, speaker slot, ARIA rate, the base Talker it belongs to

Voices are installed into a library (``$POSTTRAIN_VOICES`` or ``<posttrain cache>/voices``) and
applied by name (``voice=NAME``) on top of the base Talker at load time, merged in memory: the
base folder is never modified.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

import numpy as np
import torch

from posttrain.errors import ModelError

#: Attention and MLP projections of the Talker and its code predictor, the Talker's codec head
#: and the code predictor's per-codebook heads (a new voice's codes need new mappings there).
LORA_TARGETS = r".*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$|.*codec_head$|.*lm_head\.\d+$"


def voices_root() -> str:
    from posttrain.models.hub import cache_root

    root = os.environ.get("POSTTRAIN_VOICES") or os.path.join(cache_root(), "voices")
    os.makedirs(root, exist_ok=True)
    return root


def base_fingerprint(talker_dir: str) -> str:
    """Identifies a saved base Talker: the id written into its talker.json when it was saved
    (every save gets a new one), or for older folders a hash of its weights file."""
    meta = os.path.join(talker_dir, "talker.json")
    if os.path.exists(meta):
        with open(meta) as fh:
            saved_id = json.load(fh).get("id")
        if saved_id:
            return saved_id
    h = hashlib.sha1()
    with open(os.path.join(talker_dir, "model", "model.safetensors"), "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def voice_path(name_or_path: str) -> str:
    """The folder of a voice: a path to one, or a name in the voice library."""
    if os.path.isdir(name_or_path) and os.path.exists(os.path.join(name_or_path, "voice.json")):
        return name_or_path
    path = os.path.join(voices_root(), name_or_path)
    if not os.path.exists(os.path.join(path, "voice.json")):
        known = sorted(d for d in os.listdir(voices_root()) if os.path.exists(os.path.join(voices_root(), d, "voice.json")))
        raise ModelError(f"unknown voice {name_or_path!r}; voices in {voices_root()}: {', '.join(known) or 'none'} (train one with talker_speaker_ft)")
    return path


def add_lora(talker, rank: int, alpha: float, dropout: float = 0.0):
    """Inject LoRA layers into the Talker and its code predictor (in place); returns the peft
    config. Only the LoRA weights are trainable afterwards."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=LORA_TARGETS, bias="none")
    inject_adapter_in_model(config, talker)
    for name, p in talker.named_parameters():
        p.requires_grad_("lora_" in name)
    return config


def save_voice(folder: str, talker, lora_config, name: str, speaker_id: int, speaker_row: torch.Tensor,
               reference: np.ndarray, rate: dict, base_dir: str, extra: dict | None = None) -> str:
    """Write a voice folder atomically."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = f"{folder.rstrip('/')}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.join(tmp, "adapter"))
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(talker).items()}
    save_file(state, os.path.join(tmp, "adapter", "adapter_model.safetensors"))
    lora_config.save_pretrained(os.path.join(tmp, "adapter"))
    save_file({"speaker_token": speaker_row.detach().cpu().contiguous()}, os.path.join(tmp, "speaker_token.safetensors"))
    np.save(os.path.join(tmp, "reference.npy"), reference)
    meta = {"name": name, "speaker_id": speaker_id, "rate": rate, "base": base_fingerprint(base_dir), "base_path": os.path.abspath(base_dir), **(extra or {})}
    with open(os.path.join(tmp, "voice.json"), "w") as fh:
        json.dump(meta, fh, indent=2)
    if os.path.exists(folder):
        shutil.rmtree(folder)
    os.makedirs(os.path.dirname(os.path.abspath(folder)), exist_ok=True)
    os.rename(tmp, folder)
    return folder


def install_voice(folder: str, name: str) -> str:
    """Copy a voice folder into the library under ``name`` (atomically)."""
    dest = os.path.join(voices_root(), name)
    tmp = f"{dest}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(folder, tmp)
    if os.path.exists(dest):
        shutil.rmtree(dest)
    os.rename(tmp, dest)
    return dest


def apply_voice(bundle, talker_dir: str, name_or_path: str):
    """Apply a voice to a loaded base Talker bundle (LoRA merged into the weights, speaker row
    written, voice and rate registered). Refuses a voice trained on another base Talker."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    from posttrain.data.aria import AriaRate
    from posttrain.models.qwen_omni import speaker_token

    folder = voice_path(name_or_path)
    with open(os.path.join(folder, "voice.json")) as fh:
        meta = json.load(fh)
    if meta.get("base") != base_fingerprint(talker_dir):
        raise ModelError(
            f"voice {meta.get('name')!r} ({folder}) was trained on another base Talker ({meta.get('base_path')}); "
            f"apply it to that Talker, or fine-tune the voice again on {talker_dir}"
        )
    talker = bundle.talker
    config = LoraConfig.from_pretrained(os.path.join(folder, "adapter"))
    inject_adapter_in_model(config, talker)
    set_peft_model_state_dict(talker, load_file(os.path.join(folder, "adapter", "adapter_model.safetensors")))
    merge_lora(talker)
    row = load_file(os.path.join(folder, "speaker_token.safetensors"))["speaker_token"]
    sid = int(meta["speaker_id"])
    with torch.no_grad():
        talker.model.codec_embedding.weight[speaker_token(talker, sid)] = row
    name = meta["name"]
    while len(bundle.voices) < sid:
        bundle.voices.append(f"slot-{len(bundle.voices)}")
    if len(bundle.voices) == sid:
        bundle.voices.append(name)
    else:
        bundle.voices[sid] = name
    bundle.rates[name] = AriaRate(meta["rate"]["frames_per_token"], meta["rate"]["lead"])
    return bundle


def merge_lora(module) -> None:
    """Fold every LoRA layer into its base weight and put the plain layer back."""
    from peft.tuners.lora import LoraLayer

    for name, child in list(module.named_modules()):
        if isinstance(child, LoraLayer):
            child.merge()
            parent = module.get_submodule(name.rpartition(".")[0]) if "." in name else module
            setattr(parent, name.rpartition(".")[2], child.get_base_layer())
