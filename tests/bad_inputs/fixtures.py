"""Tiny bad files for the bad-input corpus, generated at test time (no committed binaries).

Each ``make_*`` takes the path to write and writes one kind of broken input there.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

SR = 16000


def _speechlike(seconds: float, sr: int = SR) -> np.ndarray:
    """A modulated tone: not silent, not clipped, long enough to hold a few words."""
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * 220 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 3 * t))).astype(np.float32)


def _write(path: str, wav: np.ndarray, sr: int = SR, subtype: str = "PCM_16") -> None:
    import soundfile as sf

    sf.write(path, wav, sr, subtype=subtype, format="WAV")


def make_good_wav(path: str) -> None:
    _write(path, _speechlike(1.5))


def make_spoken_wav(path: str) -> None:
    """Real speech (espeak-ng), for cases that must get past voice activity detection."""
    from posttrain.audio.tts import synthesize

    _write(path, synthesize("hello there, good morning to you", voice="en-us", rate=150, sample_rate=SR)[0])


def make_empty_wav(path: str) -> None:
    _write(path, np.zeros(0, dtype=np.float32))


def make_silent_wav(path: str) -> None:
    _write(path, np.zeros(SR * 2, dtype=np.float32))


def make_short_wav(path: str) -> None:
    _write(path, _speechlike(0.1))


def make_clipped_wav(path: str) -> None:
    t = np.arange(SR * 2) / SR
    _write(path, np.sign(np.sin(2 * np.pi * 100 * t)).astype(np.float32))


def make_low_rate_wav(path: str) -> None:
    """2 kHz: no speech survives at that rate."""
    _write(path, _speechlike(1.5, 2000), sr=2000)


def make_cancelling_stereo_wav(path: str) -> None:
    """Left and right in opposite phase: the mono mix is silence."""
    wav = _speechlike(1.5)
    _write(path, np.stack([wav, -wav], axis=1))


def make_nan_wav(path: str) -> None:
    wav = _speechlike(1.5)
    wav[1000:1100] = np.nan
    _write(path, wav, subtype="FLOAT")


def make_two_hour_wav(path: str) -> None:
    """A valid 16-bit mono WAV header for two hours of audio; the data is a sparse hole, so the
    file takes no disk space and is refused from its header before anything is decoded."""
    data_bytes = 2 * 3600 * SR * 2
    header = b"RIFF" + struct.pack("<I", 36 + data_bytes) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 1, SR, SR * 2, 2, 16)
    header += b"data" + struct.pack("<I", data_bytes)
    with open(path, "wb") as fh:
        fh.write(header)
        fh.truncate(len(header) + data_bytes)


def make_garbage(path: str) -> None:
    with open(path, "wb") as fh:
        fh.write(b"this is not audio, just bytes with a .wav name\n" * 4)


def make_non_utf8(path: str) -> None:
    with open(path, "wb") as fh:
        fh.write('{"prompt": "caf\u00e9", "domain": "arithmetic"}\n'.encode("latin-1"))


def make_not_a_parquet(path: str) -> None:
    with open(path, "wb") as fh:
        fh.write(b"PAR1 but not really a parquet file")


def _model_folder(path: str, config: dict | str) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as fh:
        fh.write(config if isinstance(config, str) else json.dumps(config))


def make_remote_code_model(path: str) -> None:
    _model_folder(path, {
        "model_type": "llama", "architectures": ["EvilForCausalLM"],
        "auto_map": {"AutoConfig": "modeling_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"},
    })
    with open(os.path.join(path, "modeling_evil.py"), "w") as fh:
        fh.write("raise SystemExit('remote code ran')\n")


def make_image_model(path: str) -> None:
    """An image classifier's folder where a text generator is expected."""
    _model_folder(path, {"model_type": "resnet", "architectures": ["ResNetForImageClassification"]})


def make_unknown_type_model(path: str) -> None:
    _model_folder(path, {"model_type": "frobnicator", "architectures": ["FrobnicatorForCausalLM"]})


def make_broken_config_model(path: str) -> None:
    _model_folder(path, '{"model_type": "llama", ')


def make_folder_without_config(path: str) -> None:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "model.safetensors"), "wb") as fh:
        fh.write(b"\0" * 8)


def make_thinker_config(path: str) -> None:
    """Only a Thinker config.json: enough for the path checks; the run fails on the data first."""
    _model_folder(path, {"model_type": "qwen3_omni_moe_thinker"})


def make_other_tokenizer_model(path: str) -> None:
    """A real, loadable tiny Llama whose tokenizer is not the embedded student's."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    words = ["<pad>", "<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(60)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    cfg = LlamaConfig(vocab_size=len(words), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=2, eos_token_id=3)
    LlamaForCausalLM(cfg).save_pretrained(path)
    fast.save_pretrained(path)


def make_file_parent(path: str) -> None:
    """A regular file, so that a folder below it can never be created (root ignores chmod)."""
    with open(path, "w") as fh:
        fh.write("a file, not a folder\n")


def jsonl(*rows) -> str:
    """Rows as jsonl text; a str row is written as is (a malformed line)."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def plugin(body: str) -> str:
    """Source of a reward plugin module."""
    return "import math, time\n\n" + body.strip() + "\n"
