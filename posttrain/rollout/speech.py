"""Speech rollouts: the Talker speaks through the rollout engine and Code2Wav decodes.

A `SpeechRequest` is text to speak in a voice; a `SpeechCompletion` carries what the Talker
generated (codec codes, the ARIA stream, whether it ended at EOS, the behaviour log-prob)
and the decoded waveform, tagged with the weight version that produced it. Rewards then
score the waveform (``audio`` column, with ``sample_rate`` and ``text``), as a listener would.

`TalkerEngine` runs in-process on the trainer's model (weights shared, so `update_weights`
only bumps the version) or on its own copy (weights copied in). Generation is batched:
``batch_size`` rows share one KV cache under the ARIA constraint.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from posttrain.faults import fault_point
from posttrain.models.qwen_omni import talker_generate_batch, talker_of, thinker_of


@dataclass
class SpeechRequest:
    text: str
    voice: str | int
    temperature: float = 1.0
    top_k: int = 0
    request_id: Any = None
    code_temperature: float | None = None  # the code predictor's (groups 1..G-1); None = temperature


@dataclass
class SpeechCompletion:
    request_id: Any
    text: str
    voice: str
    voice_id: int
    codes: torch.Tensor  # [groups, frames]
    stream: list
    ended: bool  # True: the Talker ended at EOS; False: it hit the frame cap
    logp: float  # behaviour log-prob of every choice (masked ARIA policy, at the temperature)
    wav: np.ndarray
    sample_rate: int
    weight_version: int
    seconds: dict = field(default_factory=dict)

    @property
    def frames(self) -> int:
        return int(self.codes.shape[1])


class TalkerEngine:
    """Generates speech with a `posttrain.talker.TalkerBundle`."""

    def __init__(self, bundle, share_weights: bool = True, batch_size: int = 16):
        self.bundle = bundle if share_weights else _copied(bundle)
        self.shared = share_weights
        self.batch_size = batch_size
        self.weight_version = 0

    def update_weights(self, state: dict | None, version: int) -> None:
        """Load ``state`` (a Talker state dict; ``None`` when sharing the trainer's model)."""
        if state is not None:
            talker_of(self.bundle.model).load_state_dict(state, strict=False)
        fault_point("weight_sync")  # crash/resume tests: die mid-sync
        self.weight_version = version

    @torch.no_grad()
    def generate(self, requests: list[SpeechRequest], seed: int | None = None) -> list[SpeechCompletion]:
        """Completions in request order. Requests sharing a temperature are batched."""
        bundle = self.bundle
        model = bundle.model
        was_training = model.training
        model.eval()
        out: list[SpeechCompletion | None] = [None] * len(requests)
        try:
            def key(i):  # requests batch together when they sample alike
                r = requests[i]
                return (r.temperature, r.top_k, r.temperature if r.code_temperature is None else r.code_temperature)

            order = sorted(range(len(requests)), key=key)
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                groups: dict[tuple, list[int]] = {}
                for i in idx:
                    groups.setdefault(key(i), []).append(i)
                for (temperature, top_k, code_t), rows in groups.items():
                    t0 = time.perf_counter()
                    texts = [bundle.text_tokens(requests[i].text) for i in rows]
                    voices = [bundle.voice_id(requests[i].voice) for i in rows]
                    generated = talker_generate_batch(
                        talker_of(model), thinker_of(model).model.embed_tokens, texts, voices,
                        [bundle.rate(v) for v in voices], temperature=temperature, top_k=top_k,
                        seed=None if seed is None else seed + start,
                        code_temperature=code_t,
                    )
                    t1 = time.perf_counter()
                    for i, v, (codes, stream, ended, logp) in zip(rows, voices, generated):
                        d0 = time.perf_counter()
                        wav = decode_or_silence(bundle.codec, codes)
                        r = requests[i]
                        out[i] = SpeechCompletion(
                            r.request_id, r.text, bundle.voices[v], v, codes, stream, ended, logp, wav,
                            bundle.codec.sample_rate, self.weight_version,
                            {"generate": (t1 - t0) / len(rows), "decode": time.perf_counter() - d0},
                        )
        finally:
            model.train(was_training)
        return out  # type: ignore[return-value]


def decode_or_silence(codec, codes: torch.Tensor) -> np.ndarray:
    """The waveform of ``codes`` [groups, frames]; a Talker that said nothing gives silence,
    which the ASR hears as nothing (the worst WER), not a crash."""
    if codes.shape[1] >= 2:
        return codec.decode(codes.unsqueeze(0))[0]
    return np.zeros(codec.samples_per_frame * 4, dtype=np.float32)


def _copied(bundle):
    clone = copy.copy(bundle)
    clone.model = copy.deepcopy(bundle.model)
    return clone


def score_completions(rewards, completions: list[SpeechCompletion], **extra_columns) -> tuple[list[float], dict[str, list[float]]]:
    """Weighted and per-reward scores of speech completions: the rewards get the waveform as
    the ``audio`` column with ``sample_rate``, the text to be spoken as ``text``, and the voice."""
    texts = [c.text for c in completions]
    combined, per = rewards.score(
        texts, texts, audio=[c.wav for c in completions], sample_rate=[c.sample_rate for c in completions],
        text=texts, voice=[c.voice for c in completions], **extra_columns,
    )
    # a reward with no opinion (None) on a sample counts as its worst: a Talker that said
    # nothing must not escape the listener
    combined = [0.0 if v is None else float(v) for v in combined]
    per = {k: [0.0 if v is None else float(v) for v in vs] for k, vs in per.items()}
    return combined, per
