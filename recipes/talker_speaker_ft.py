"""Talker speaker fine-tuning: a new voice from 20-200 recordings, saved as a LoRA voice adapter loadable by name.

The recordings (a jsonl of ``audio`` + ``text`` rows, or a folder of ``NAME.wav`` +
``NAME.txt``) are validated (missing, unreadable, too short or long, silent, empty transcript:
named; ``data.on_bad=skip`` leaves them out), word-aligned by the packaged ASR's word
timestamps, encoded by the Talker's codec and laid out as ARIA streams at the speech rate
measured on them. The Talker and its code predictor get LoRA adapters (peft; attention and
MLP projections), and the voice a speaker token of its own (started from the closest
existing voice); training minimises Talker loss + ``loss.code_predictor_weight`` x
code-predictor loss at a low learning rate, with ``loss.input_noise`` of the frames fed back
swapped for others (so the voice learns to continue after its own mistakes). The embedded
base is a Talker pretrained on the ``varied`` corpus (words in context at several rates):
on the ``clips`` Talker, a table of word clips, a new voice loses its intelligibility. The voice is saved apart from the base model
(``voice/`` in the run directory, and installed in the voice library under ``voice.name``):
``posttrain eval tts --talker BASE --voice NAME`` and ``load_bundle(BASE, voice=NAME)`` apply it.

Target metrics on held-out sentences: ``speaker_similarity`` to the target voice (higher) and
``wer`` (lower; ``eval.wer_tolerance`` is the regression allowed). Before = the base Talker
speaking in its closest existing voice; after = the new voice. Similarity is measured
against the target's recordings resynthesised through the codec (the voice as this codec can
render it: the embedded mel codec alone costs an unseen voice ~0.17 of similarity) and, as
``speaker_similarity_raw``, against the recordings themselves.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from posttrain.checkpoint import save_checkpoint
from posttrain.config import RunConfig, option
from posttrain.data.aria import build_stream, estimate_rates
from posttrain.data.io import load_rows, write_jsonl
from posttrain.data.speech_corpus import word_token_groups
from posttrain.data.user_speech import load_user_speech
from posttrain.errors import ConfigError, DataError
from posttrain.eval_tts import format_summary, write_report
from posttrain.logging import Run, RunResult, format_metrics, quiet_libraries
from posttrain.models.hub import cache_root
from posttrain.models.qwen_omni import speaker_slots, speaker_token, talker_losses, talker_stream_batch
from posttrain.talker import load_bundle, speak_all, voice_reference_embeddings
from posttrain.training import batch_indices, make_scheduler, step_generator
from posttrain.voices import add_lora, install_voice, merge_lora, save_voice
from recipes._talker_stage import OptimConfig, optimizer_step, resolve_talker, split_held_out

RECIPE = "talker_speaker_ft"


@dataclass
class PolicyConfig:
    path: str = option("embedded", "the base Talker folder, or 'embedded' (the talker_pretrain default, built once and cached)")
    pretrain_steps: int = option(1200, "embedded base: talker_pretrain steps", min=1)
    pretrain_style: str = option("varied", "embedded base: the corpus it is pretrained on (talker_pretrain's data.style); a "
                                 "voice learnt on the 'clips' Talker (a table of word clips) loses intelligibility", choices=["clips", "varied"])


@dataclass
class DataConfig:
    path: str = option("embedded", "your recordings: a jsonl of audio + text rows or a folder of NAME.wav + NAME.txt; 'embedded' synthesises an espeak-ng voice the Talker never heard")
    voice: str = option("en-us+adam", "embedded: the espeak-ng voice to learn")
    clips: int = option(60, "embedded: recordings to synthesise", min=4)
    on_bad: str = option("fail", "a bad recording stops the run (fail) or is reported and left out (skip)", choices=["fail", "skip"])
    min_seconds: float = option(0.5, "shortest usable recording", min=0.0)
    max_seconds: float = option(20.0, "longest usable recording", min=0.1)


@dataclass
class VoiceConfig:
    name: str = option("my-voice", "name of the new voice (voice=NAME loads it later)")


@dataclass
class LoraConfig:
    rank: int = option(64, "LoRA rank", min=1)
    alpha: float = option(64.0, "LoRA alpha", min=0.0)
    dropout: float = option(0.0, "LoRA dropout", min=0.0, max=0.9)


@dataclass
class LossConfig:
    code_predictor_weight: float = option(0.3, "weight of the code-predictor loss next to the Talker's", min=0.0)
    input_noise: float = option(0.3, "probability that a frame fed back as input is swapped for another frame of the clip "
                                "(targets stay true): teaches the voice to recover from its own mistakes", min=0.0, max=0.5)


@dataclass
class EvalConfig:
    sentences: int = option(20, "held-out sentences spoken in the new voice", min=1)
    wer_tolerance: float = option(0.1, "WER increase allowed before the run is flagged as a regression", min=0.0)


@dataclass
class Config(RunConfig):
    policy: PolicyConfig = option(default_factory=PolicyConfig, help="the base Talker")
    data: DataConfig = option(default_factory=DataConfig, help="the target voice's recordings")
    voice: VoiceConfig = option(default_factory=VoiceConfig, help="the new voice")
    lora: LoraConfig = option(default_factory=LoraConfig, help="LoRA adapter")
    loss: LossConfig = option(default_factory=LossConfig, help="loss weights")
    eval: EvalConfig = option(default_factory=EvalConfig, help="held-out evaluation")
    optim: OptimConfig = option(default_factory=OptimConfig, help="optimiser")
    batch_size: int = option(8, "recordings per step", min=1)

    def validate(self) -> None:
        if self.policy.path != "embedded" and not os.path.isdir(self.policy.path):
            raise ConfigError(f"config key 'policy.path': {self.policy.path!r} is not a folder; give a Talker folder or 'embedded'")
        if self.data.path != "embedded" and not os.path.exists(self.data.path):
            raise ConfigError(f"config key 'data.path': {self.data.path!r} does not exist; give a jsonl, a folder of wav + txt, or 'embedded'")
        if not self.voice.name or "/" in self.voice.name or self.voice.name.startswith("."):
            raise ConfigError(f"config key 'voice.name': {self.voice.name!r} is not a usable name (letters, digits, - and _)")


# --------------------------------------------------------------------------- data


def embedded_recordings(cfg: Config, held_texts: set[str]) -> str:
    """Recordings of an espeak-ng voice the Talker never heard, made once and cached as WAV
    files + a jsonl of audio + text rows. Spoken word by word like the embedded pretraining
    corpus (a Talker pretrained on isolated-word speech does not model continuous speech),
    but aligned by the ASR like any user's recordings: no word times are passed on."""
    import random

    from posttrain.audio.io import save_wav
    from posttrain.data.speech_corpus import make_sentence, speak_word_by_word

    folder = os.path.join(cache_root(), "speech", f"speaker-ft-{cfg.data.voice.replace('+', '_')}-{cfg.data.clips}-s{cfg.seed}-v2")
    path = os.path.join(folder, "recordings.jsonl")
    if os.path.exists(path):
        return path
    rng = random.Random(f"{RECIPE}-{cfg.seed}")
    rows = []
    for i in tqdm(range(cfg.data.clips), desc=f"recording the target voice {cfg.data.voice} (cached)", leave=False):
        s = make_sentence(rng)
        while s in held_texts:
            s = make_sentence(rng)
        wav, _ = speak_word_by_word(s, cfg.data.voice, rate=rng.choice([150, 160, 170]))
        save_wav(os.path.join(folder, f"{i:04d}.wav"), wav, 16000)
        rows.append({"audio": f"{i:04d}.wav", "text": s, "speaker": cfg.voice.name})
    write_jsonl(path, rows)
    return path


def folder_recordings(folder: str, out_path: str) -> str:
    """A folder of NAME.wav + NAME.txt (or .lab) as a jsonl of audio + text rows."""
    rows = []
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in (".wav", ".flac", ".ogg", ".mp3"):
            continue
        text_file = next((os.path.join(folder, stem + e) for e in (".txt", ".lab") if os.path.exists(os.path.join(folder, stem + e))), None)
        if text_file is None:
            raise DataError(f"{os.path.join(folder, name)}: no transcript {stem}.txt beside it; add one or use a jsonl of audio + text rows")
        with open(text_file, encoding="utf-8") as fh:
            rows.append({"audio": os.path.abspath(os.path.join(folder, name)), "text": fh.read().strip()})
    if not rows:
        raise DataError(f"{folder}: no audio files (.wav, .flac, .ogg, .mp3)")
    write_jsonl(out_path, rows)
    return out_path


def codec_rendered_reference(codec, wavs: list[np.ndarray], sr: int) -> np.ndarray:
    """Mean speaker embedding of recordings resynthesised through the codec."""
    from posttrain.audio.speaker import embed

    return np.mean([embed(codec.decode(codec.encode([w])[0].unsqueeze(0))[0], sr, f"codec-rendered reference {i}") for i, w in enumerate(wavs)], axis=0)


# --------------------------------------------------------------------------- the recipe


def run(cfg: Config) -> RunResult:
    from posttrain.audio.io import load_audio
    from posttrain.audio.speaker import cosine_similarity

    quiet_libraries()
    torch.manual_seed(cfg.seed)
    base_dir = resolve_talker(cfg.policy.path, cfg.policy.pretrain_steps, cfg.seed, cfg.policy.pretrain_style)
    bundle = load_bundle(base_dir)
    if cfg.voice.name in bundle.voices:
        raise ConfigError(f"config key 'voice.name': {cfg.voice.name!r} is already a voice of the base Talker; choose another name")
    held_sentences, _ = split_held_out(bundle, cfg.eval.sentences)
    held_texts = {t for t, _ in bundle.held_out}

    # 1. Recordings: validated, aligned, encoded (all before a run directory exists).
    if cfg.data.path == "embedded":
        data_path = embedded_recordings(cfg, held_texts)
    elif os.path.isdir(cfg.data.path):
        data_path = folder_recordings(cfg.data.path, os.path.join(cache_root(), "speech", f"folder-{hashlib.sha1(os.path.abspath(cfg.data.path).encode()).hexdigest()[:12]}.jsonl"))
    else:
        data_path = cfg.data.path
    speech = load_user_speech(data_path, bundle.codec, cache_root(), on_bad=cfg.data.on_bad, min_seconds=cfg.data.min_seconds, max_seconds=cfg.data.max_seconds)
    if len(speech.utterances) < 4:
        raise DataError(f"{data_path}: {len(speech.utterances)} usable recordings; a voice needs at least 4 (20-200 recommended)")
    run_dir = Run(RECIPE, cfg)
    print(f"{RECIPE}: run directory {run_dir.path}; base Talker {base_dir}; {len(speech.utterances)} recordings"
          + (f" ({len(speech.skipped)} skipped)" if speech.skipped else ""), flush=True)

    # references: the recordings as they are, and as the codec renders them
    base = os.path.dirname(os.path.abspath(data_path))
    wavs = []
    for r in load_rows(data_path):
        if len(wavs) == 12:
            break
        if r.get("_line") in speech.lines and isinstance(r.get("audio"), str):
            p = r["audio"] if os.path.isabs(r["audio"]) else os.path.join(base, r["audio"])
            wavs.append(load_audio(p, bundle.codec.sample_rate))
    raw_reference = np.mean([speech.references[s] for s in speech.references], axis=0)
    rendered_reference = codec_rendered_reference(bundle.codec, wavs, bundle.codec.sample_rate)

    # 2. The closest existing voice: the 'before', and where the new speaker token starts.
    existing = voice_reference_embeddings(bundle.voices)
    closest = max(existing, key=lambda v: cosine_similarity(existing[v], raw_reference)) if existing else bundle.voices[0]
    name = cfg.voice.name

    def measure(voice: str) -> tuple[list[dict], dict, list]:
        sentences = [(t, voice) for t, _ in held_sentences]
        return speak_all(engine_for(bundle), sentences, {voice: rendered_reference}, extra_references={"raw": {voice: raw_reference}})

    before = run_dir.load_json("before.json")
    if before is None:
        _, before, _ = measure(closest)
        before["voice"] = closest
        run_dir.save_json("before.json", before)
    print(f"before (base Talker, closest voice {closest}): " + format_metrics({k: before[k] for k in ("speaker_similarity", "speaker_similarity_raw", "wer")}), flush=True)

    # 3. The new voice: a speaker slot, LoRA on the Talker and code predictor.
    talker = bundle.talker
    sid = len(bundle.voices)
    if sid >= speaker_slots(talker):
        raise ConfigError(f"the base Talker has no free speaker slot ({speaker_slots(talker)} used); fine-tune on a Talker with fewer voices")
    tok = speaker_token(talker, sid)
    lora_config = add_lora(talker, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
    emb = talker.model.codec_embedding.weight
    with torch.no_grad():
        emb[tok] = emb[speaker_token(talker, bundle.voice_id(closest))]
    emb.requires_grad_(True)
    row_mask = torch.zeros_like(emb)
    row_mask[tok] = 1.0
    emb.register_hook(lambda g: g * row_mask)  # only the new voice's row learns
    bundle.voices.append(name)
    tokens = [word_token_groups(bundle.tokenizer, u.words) for u in speech.utterances]
    rate = estimate_rates([(name, sum(map(len, g)), u.codes.shape[1]) for u, g in zip(speech.utterances, tokens)],
                          slack=1.15, lead=next(iter(bundle.rates.values())).lead)[name]
    bundle.rates[name] = rate
    streams = [build_stream(g, u.spans, u.codes.shape[1], rate) for u, g in zip(speech.utterances, tokens)]
    trainable = [p for p in talker.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for n, p in talker.named_parameters() if "lora_" in n)
    print(f"new voice {name!r}: speaker slot {sid}, {n_lora / 1e3:.0f}K LoRA parameters (rank {cfg.lora.rank}), "
          f"rate {rate.frames_per_token:.1f} frames per text token", flush=True)

    optimizer = torch.optim.AdamW([{"params": trainable, "weight_decay": 0.0}], lr=cfg.optim.lr, betas=(0.9, 0.95))
    scheduler = make_scheduler(optimizer, cfg.optim.warmup_steps, cfg.max_steps)
    modules = {"talker": talker}
    start_step = run_dir.resume(modules, optimizer, scheduler)
    talker.train()
    bar = tqdm(range(start_step, cfg.max_steps), desc=RECIPE, initial=start_step, total=cfg.max_steps, mininterval=1.0)
    for step in bar:
        idx = batch_indices(len(streams), cfg.batch_size, cfg.seed, step)
        batch = talker_stream_batch(talker, bundle.text_embed, [streams[i] for i in idx], [speech.utterances[i].codes for i in idx], [sid] * len(idx),
                                    input_noise=cfg.loss.input_noise, generator=step_generator(cfg.seed, step))
        l0, l1 = talker_losses(talker, batch)
        loss = l0 + cfg.loss.code_predictor_weight * l1
        optimizer_step(loss, trainable, optimizer, scheduler, cfg.optim.grad_clip)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            run_dir.log(done, {"loss": loss.item(), "loss/talker": l0.item(), "loss/code_predictor": l1.item()})
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
            save_checkpoint(run_dir.checkpoints, done, modules, optimizer, scheduler, keep=cfg.keep_checkpoints)
    bar.close()

    # 4. Save the voice (adapter + speaker token + reference), then measure it merged.
    talker.eval()
    save_checkpoint(run_dir.checkpoints, cfg.max_steps, modules, optimizer, scheduler, keep=cfg.keep_checkpoints)
    voice_dir = save_voice(
        run_dir.file("voice"), talker, lora_config, name, sid, emb[tok], raw_reference,
        {"frames_per_token": rate.frames_per_token, "lead": rate.lead}, base_dir,
        extra={"recordings": len(speech.utterances), "source": os.path.abspath(data_path)},
    )
    installed = install_voice(voice_dir, name)
    merge_lora(talker)
    rows, after, samples = measure(name)
    write_report(run_dir.file("eval"), rows, after, samples)
    print("eval: " + format_summary(after), flush=True)
    regression = after["wer"] - before["wer"]
    print(f"voice {name!r} saved to {voice_dir} and installed as {installed}; WER change {regression:+.3f} "
          f"({'within' if regression <= cfg.eval.wer_tolerance else 'BEYOND'} the tolerance {cfg.eval.wer_tolerance})", flush=True)
    targets = {
        "speaker_similarity": (before["speaker_similarity"], after["speaker_similarity"], "higher"),
        "speaker_similarity_raw": (before["speaker_similarity_raw"], after["speaker_similarity_raw"], "higher"),
        "wer": (before["wer"], after["wer"], "lower"),
    }
    return run_dir.finish(targets, extra={
        "voice": name, "voice_dir": installed, "closest_base_voice": closest, "base": base_dir,
        "wer_tolerance": cfg.eval.wer_tolerance, "wer_within_tolerance": regression <= cfg.eval.wer_tolerance,
        "recordings": len(speech.utterances), "eval": after,
    })


def engine_for(bundle):
    from posttrain.rollout.speech import TalkerEngine

    return TalkerEngine(bundle, share_weights=True, batch_size=32)
