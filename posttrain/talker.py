"""A Talker ready to speak: the model (Thinker embeddings + Talker + code predictor), its
tokenizer, its codec, its voices and ARIA rates, saved together as one folder::

    talker/
      model/        Hugging Face folder of the Qwen3-Omni model (safetensors)
      codec/        the codec (embedded mel-RVQ codebooks)
      talker.json   voices, ARIA rates and lead, layout

`speak` generates codes under the ARIA constraint and decodes them, timing generation,
decoding and the first streamed packet, for `posttrain.eval_tts`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import torch

from posttrain.data.aria import AriaRate
from posttrain.errors import ModelError
from posttrain.eval_tts import SpokenSample
from posttrain.models.codec import MelRVQCodec
from posttrain.models.qwen_omni import save_model, talker_generate, talker_of, thinker_of
from posttrain.rollout.speech import decode_or_silence


@dataclass
class TalkerBundle:
    model: torch.nn.Module
    tokenizer: object
    codec: MelRVQCodec
    voices: list[str]
    rates: dict[str, AriaRate]
    layout: str = "aria"
    #: held-out (text, voice) pairs the Talker never trained on, for later stages' before -> after
    held_out: list = field(default_factory=list)

    @property
    def talker(self):
        return talker_of(self.model)

    @property
    def text_embed(self):
        return thinker_of(self.model).model.embed_tokens

    def voice_id(self, voice: str | int) -> int:
        if isinstance(voice, int):
            return voice
        if voice not in self.voices:
            raise ModelError(f"unknown voice {voice!r}; this Talker knows {', '.join(self.voices)}")
        return self.voices.index(voice)

    def rate(self, voice: str | int) -> AriaRate:
        name = self.voices[self.voice_id(voice)]
        return self.rates.get(name, self.rates["*"])

    def text_tokens(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def save(self, path: str) -> str:
        tmp = f"{path.rstrip('/')}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        save_model(self.model, self.tokenizer, os.path.join(tmp, "model"))
        self.codec.save(os.path.join(tmp, "codec"))
        meta = {
            "voices": self.voices,
            "rates": {k: {"frames_per_token": r.frames_per_token, "lead": r.lead} for k, r in self.rates.items()},
            "layout": self.layout,
            "held_out": [[t, v] for t, v in self.held_out],
            "id": uuid.uuid4().hex,  # voice adapters record the exact base they were trained on
        }
        with open(os.path.join(tmp, "talker.json"), "w") as fh:
            json.dump(meta, fh, indent=2)
        if os.path.exists(path):
            shutil.rmtree(path)
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        os.rename(tmp, path)
        return path


def check_talker_codec(model, codec, where: str) -> None:
    """The Talker predicts the codec's codes: groups and codebook size must agree."""
    talker = talker_of(model)
    groups = int(talker.config.num_code_groups)
    size = int(talker.code_predictor.config.vocab_size)
    if groups != codec.num_groups:
        raise ModelError(f"{where}: the Talker predicts {groups} codebooks but its codec has {codec.num_groups} (codec.groups); they were saved from different runs")
    if size != codec.codebook_size:
        raise ModelError(f"{where}: the Talker's codebooks have {size} entries but its codec has {codec.codebook_size} (codec.codebook_size); they were saved from different runs")


def load_bundle(path: str, voice: str | None = None) -> TalkerBundle:
    """A Talker bundle saved by `TalkerBundle.save` (weights as safetensors, no remote code);
    ``voice``: a voice adapter (name in the voice library, or folder) applied on top."""
    from transformers import AutoTokenizer, Qwen3OmniMoeForConditionalGeneration

    meta_path = os.path.join(path, "talker.json")
    if not os.path.exists(meta_path):
        raise ModelError(f"{path!r} is not a Talker folder (no talker.json); point at the 'talker' folder of a talker_pretrain run")
    with open(meta_path) as fh:
        meta = json.load(fh)
    model = Qwen3OmniMoeForConditionalGeneration.from_pretrained(os.path.join(path, "model"), local_files_only=True, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(os.path.join(path, "model"), local_files_only=True)
    codec = MelRVQCodec.load(os.path.join(path, "codec"))
    check_talker_codec(model, codec, path)
    rates = {k: AriaRate(v["frames_per_token"], v["lead"]) for k, v in meta["rates"].items()}
    held_out = [(str(t), str(v)) for t, v in meta.get("held_out", [])]
    bundle = TalkerBundle(model.eval(), tokenizer, codec, meta["voices"], rates, meta.get("layout", "aria"), held_out)
    if voice is not None and voice not in bundle.voices:
        from posttrain.voices import apply_voice

        apply_voice(bundle, path, voice)
    return bundle


def speak(bundle: TalkerBundle, text: str, voice: str | int, temperature: float = 0.0, seed: int | None = None, chunk_frames: int = 10) -> SpokenSample:
    """Generate and decode one utterance, timing generation, decoding and the first packet
    (the first ``chunk_frames`` frames decoded, as a streaming client would hear them)."""
    start = time.perf_counter()
    first_chunk = {}

    def on_frame(n_frames: int, frames: list) -> None:
        if n_frames == chunk_frames and "t" not in first_chunk:
            codes = torch.tensor(frames, dtype=torch.long).T
            bundle.codec.decode(codes.unsqueeze(0))  # what a streaming client would get first
            first_chunk["t"] = time.perf_counter() - start

    codes, stream = talker_generate(
        bundle.talker, bundle.text_embed, bundle.text_tokens(text), bundle.voice_id(voice), bundle.rate(voice),
        temperature=temperature, seed=seed, on_frame=on_frame,
    )
    generated = time.perf_counter()
    wav = decode_or_silence(bundle.codec, codes)
    decoded = time.perf_counter()
    name = bundle.voices[bundle.voice_id(voice)]
    return SpokenSample(
        text=text, voice=name, wav=wav, sample_rate=bundle.codec.sample_rate,
        generate_seconds=generated - start, decode_seconds=decoded - generated,
        first_packet_seconds=first_chunk.get("t", decoded - start),
        extra={"frames": int(codes.shape[1])},
    )


# --------------------------------------------------------------------------- helpers for the Talker stages


def candidate_logps(bundle: TalkerBundle, candidates, voices, temperature: float = 1.0, code_predictor_weight: float = 1.0):
    """Per-sequence log-probs (`talker_sequence_logps`) of generated candidates (objects with
    ``codes``, ``stream``, ``ended``) under ``bundle``'s Talker, with its ARIA masks."""
    from posttrain.models.qwen_omni import talker_sequence_logps, talker_stream_batch

    ids = [bundle.voice_id(v) for v in voices]
    batch = talker_stream_batch(
        bundle.talker, bundle.text_embed, [c.stream for c in candidates], [c.codes for c in candidates], ids,
        rates=[bundle.rate(i) for i in ids], ended=[c.ended for c in candidates],
    )
    return talker_sequence_logps(bundle.talker, batch, temperature=temperature, code_predictor_weight=code_predictor_weight)


@torch.no_grad()
def candidate_logps_chunked(bundle: TalkerBundle, candidates, voices, chunk: int = 16, **options) -> dict[str, torch.Tensor]:
    """`candidate_logps` without gradients, ``chunk`` candidates at a time, concatenated."""
    parts = [candidate_logps(bundle, candidates[i : i + chunk], voices[i : i + chunk], **options) for i in range(0, len(candidates), chunk)]
    if not parts:
        return {"total": torch.zeros(0), "tokens": torch.zeros(0, dtype=torch.long)}
    return {k: torch.cat([p[k] for p in parts]) for k in parts[0]}


def speak_all(engine, sentences, references=None, temperature: float = 0.0, seed: int = 0, extra_references=None):
    """The engine speaks every ``(text, voice)`` (batched, greedy by default); scored like
    `posttrain eval tts` (`score_speech`, with its ``extra_references``). Returns
    ``(rows, summary, samples)``."""
    from posttrain.eval_tts import score_speech
    from posttrain.rollout.speech import SpeechRequest

    completions = engine.generate([SpeechRequest(t, v, temperature, request_id=i) for i, (t, v) in enumerate(sentences)], seed=seed)
    samples = [
        SpokenSample(
            text=c.text, voice=c.voice, wav=c.wav, sample_rate=c.sample_rate,
            generate_seconds=c.seconds["generate"], decode_seconds=c.seconds["decode"], first_packet_seconds=None,
            extra={"frames": c.frames},
        )
        for c in completions
    ]
    rows, summary = score_speech(samples, references, extra_references)
    return rows, summary, samples


def voice_reference_embeddings(voices: list[str]) -> dict[str, np.ndarray]:
    """Speaker embeddings of espeak-ng voices on a sentence outside every corpus (the target of
    speaker similarity for the embedded voices)."""
    from posttrain.audio.speaker import embed
    from posttrain.audio.tts import synthesize

    from posttrain.errors import UserError

    out = {}
    for v in voices:
        try:
            wav, sr = synthesize("please read this short reference sentence for the speaker encoder", voice=v, rate=160, sample_rate=16000)
        except UserError:  # not an espeak-ng voice (a user's speaker): no synthetic reference
            continue
        out[v] = embed(wav, sr, f"reference for {v}")
    return out
