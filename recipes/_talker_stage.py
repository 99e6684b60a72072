"""What the Talker alignment stages (talker_dpo, talker_gspo, talker_speaker_ft) share: the
starting Talker, prompts outside its held-out set, the held-out split, what trains."""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch

from posttrain.config import option
from posttrain.errors import ConfigError, DataError
from posttrain.faults import fault_point


@dataclass
class TalkerPolicyConfig:
    """The Talker an alignment stage starts from and what it trains."""

    path: str = option("embedded", "a Talker folder (the 'talker' folder of a talker_pretrain run) or 'embedded' (an early talker_pretrain checkpoint, built once and cached)")
    pretrain_steps: int = option(150, "embedded start: talker_pretrain steps (early and imperfect, so there is room to improve)", min=1)
    pretrain_style: str = option("clips", "embedded start: the corpus it is pretrained on (talker_pretrain's data.style)", choices=["clips", "varied"])
    train: str = option("talker", "what trains: the Talker and its code predictor (talker) or the Talker alone (talker_only)", choices=["talker", "talker_only"])

    def check(self) -> None:
        if self.path != "embedded" and not os.path.isdir(self.path):
            raise ConfigError(f"config key 'policy.path': {self.path!r} is not a folder; give a Talker folder or 'embedded'")


@dataclass
class OptimConfig:
    """AdamW with warm-up and gradient clipping (each recipe's YAML sets its values)."""

    lr: float = option(1e-4, "learning rate", min=0.0)
    warmup_steps: int = option(5, "warm-up steps", min=0)
    grad_clip: float = option(1.0, "gradient norm clip", min=0.0)


def optimizer_step(loss: torch.Tensor, params, optimizer, scheduler, grad_clip: float) -> None:
    """Backward, clip, step, schedule, zero."""
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    fault_point("step")  # crash/resume tests: die between a step and its checkpoint


def resolve_talker(path: str, pretrain_steps: int, seed: int = 0, style: str = "clips") -> str:
    """A Talker folder: ``path`` itself, or for ``"embedded"`` an early ``talker_pretrain``
    checkpoint of ``pretrain_steps`` steps on the embedded corpus of ``style`` (its
    ``data.style``), built once and cached."""
    if path != "embedded":
        return path
    from recipes.talker_pretrain import embedded_checkpoint

    return embedded_checkpoint(pretrain_steps, seed=seed, overrides=[] if style == "clips" else [f"data.style={style}"])


def training_prompts(bundle, n: int, seed: int, salt: str = "prompts") -> list[tuple[str, str]]:
    """``n`` (sentence, voice) prompts of the embedded grammar outside the Talker's held-out set."""
    from posttrain.data.speech_corpus import make_sentence

    held = {t for t, _ in bundle.held_out}
    rng = random.Random(f"{salt}-{seed}")
    out = []
    while len(out) < n:
        s = make_sentence(rng)
        if s not in held:
            out.append((s, bundle.voices[rng.randrange(len(bundle.voices))]))
    return out


def split_held_out(bundle, n_eval_sentences: int, n_pair_prompts: int = 0) -> tuple[list, list]:
    """Held-out (sentence, voice) pairs for the WER, and held-out prompts for other held-out
    measurements (disjoint sentences when there are enough; none was ever trained on)."""
    held = list(bundle.held_out)
    if not held:
        raise DataError("the Talker has no held-out sentences (talker.json 'held_out'); train it with talker_pretrain")
    wer_set = held[:n_eval_sentences]
    rest = held[n_eval_sentences:] or held
    voices = bundle.voices
    prompts = [(rest[i % len(rest)][0], voices[(i // len(rest) + i) % len(voices)]) for i in range(n_pair_prompts)]
    return wer_set, prompts


def make_trainable(bundle, code_predictor: bool = True):
    """Freeze everything but the Talker (and, unless told otherwise, its code predictor)."""
    talker = bundle.talker
    for p in bundle.model.parameters():
        p.requires_grad_(False)
    for p in talker.parameters():
        p.requires_grad_(True)
    if not code_predictor:
        for p in talker.code_predictor.parameters():
            p.requires_grad_(False)
    return talker


def frozen_copy(bundle):
    import copy

    ref = copy.deepcopy(bundle)
    ref.model.eval()
    for p in ref.model.parameters():
        p.requires_grad_(False)
    return ref
