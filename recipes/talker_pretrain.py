"""Talker speech pretraining on (text, codec codes) in ARIA layout, then long-context continual pretraining.

Stage 1 teaches the Talker (codebook 0, plus READ decisions and EOS) and the code predictor
(codebooks 1..G-1) to speak text: loss = talker CE + ``loss.code_predictor_weight`` x
code-predictor CE. The text and speech of an utterance share one interleaved stream in which
speech never runs more than ``aria.lead`` frames ahead of the rate the text allows
(``layout=plain`` puts all text first, for comparison). Stage 2 continues on streams of
several utterances joined, lengthening them step by step (``long_context.lengths``), and
reports the teacher-forced loss at 1x and at the longest length.

The embedded default speaks a bounded vocabulary in several espeak-ng voices through the
embedded mel-RVQ codec; the target metric ``wer`` is the capped per-utterance WER of a real
ASR model listening to the Talker speak held-out sentences (free-running, greedy).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from posttrain.checkpoint import save_checkpoint
from posttrain.faults import fault_point
from posttrain.config import RunConfig, option
from posttrain.data.aria import build_plain_stream, build_stream, check_stream, estimate_rates
from posttrain.data.speech_corpus import concat_utterances, embedded_corpus, make_sentence, silence_codes, word_token_groups
from posttrain.data.user_speech import load_user_speech
from posttrain.errors import ConfigError, DataError
from posttrain.eval_tts import format_summary, score_speech, write_report
from posttrain.logging import Run, RunResult, format_metrics, quiet_libraries
from posttrain.models.codec import MelRVQConfig, embedded_codec
from posttrain.models.hub import cache_root
from posttrain.models.qwen_omni import (
    TinyTalkerSpec,
    TinyThinkerSpec,
    build_tiny_omni,
    set_trainable,
    speaker_slots,
    talker_losses,
    talker_of,
    talker_stream_batch,
    thinker_of,
)
from posttrain.models.tokenizer import build_embedded_tokenizer
from posttrain.talker import TalkerBundle, speak, voice_reference_embeddings
from posttrain.training import batch_indices, make_optimizer, make_scheduler, step_generator
from recipes._talker_stage import OptimConfig, optimizer_step

RECIPE = "talker_pretrain"


@dataclass
class CodecConfig:
    path: str = option("embedded", "codec: 'embedded' (mel RVQ + Griffin-Lim, built from espeak-ng speech and cached)")
    groups: int = option(4, "codebooks per frame (group 0 from the Talker, the rest from the code predictor)", min=2)
    codebook_size: int = option(256, "entries per codebook", min=2)
    frame_rate: int = option(50, "codec frames per second", choices=[50, 25])


@dataclass
class DataConfig:
    path: str = option("embedded", "'embedded' (espeak-ng voices, bounded vocabulary) or a jsonl/parquet of audio + text (+ speaker) rows")
    voices: list[str] = option(["en-us", "en-gb", "en-us+f3", "en-gb+m3"], "espeak-ng voices of the embedded corpus")
    style: str = option("clips", "embedded: 'clips' (each word's codes encoded once and joined: a word always sounds the "
                        "same) or 'varied' (each utterance built at one of several rates with random pauses, encoded whole)",
                        choices=["clips", "varied"])
    train_size: int = option(2000, "training utterances (embedded corpus)", min=1)
    eval_size: int = option(20, "held-out sentences spoken by the Talker for the WER (user data: rows split off)", min=1)
    on_bad: str = option("fail", "user data: a bad recording or transcript stops the run (fail) or is reported and left out (skip)", choices=["fail", "skip"])
    min_seconds: float = option(0.3, "user data: shortest usable recording", min=0.0)
    max_seconds: float = option(20.0, "user data: longest usable recording (split longer ones)", min=0.1)
    alignment: str = option("asr", "user data: word times from ASR word timestamps (asr) or spread over the speech (proportional)", choices=["asr", "proportional"])
    language: str = option("en", "user data: language of the recordings, for the ASR")


@dataclass
class AriaConfig:
    lead: int = option(4, "frames speech may run ahead of what the text allows", min=0)
    slack: float = option(1.15, "rate slack over the measured frames per text token", min=1.0)


@dataclass
class LossConfig:
    code_predictor_weight: float = option(0.3, "weight of the code-predictor loss next to the Talker's", min=0.0)
    input_noise: float = option(0.0, "probability that a frame fed back as input is swapped for another frame of the "
                                "utterance (targets stay true; against exposure bias)", min=0.0, max=0.5)


@dataclass
class LongContextConfig:
    steps: int = option(60, "continual pretraining steps on long streams (0 = skip)", min=0)
    lengths: list[int] = option([2, 4], "curriculum: utterances joined per stream, stage by stage")
    batch_size: int = option(4, "long streams per step", min=1)
    lr: float = option(5e-4, "learning rate of the continual stage", min=0.0)
    replay: int = option(0, "short training streams replayed in every long batch (0 = none)", min=0)


@dataclass
class Config(RunConfig):
    talker: TinyTalkerSpec = option(default_factory=TinyTalkerSpec, help="size of the embedded Talker")
    codec: CodecConfig = option(default_factory=CodecConfig, help="the speech codec")
    data: DataConfig = option(default_factory=DataConfig, help="speech data")
    layout: str = option("aria", "interleaved text/speech (aria) or all text first (plain)", choices=["aria", "plain"])
    aria: AriaConfig = option(default_factory=AriaConfig, help="the ARIA rate constraint")
    loss: LossConfig = option(default_factory=LossConfig, help="loss weights")
    long_context: LongContextConfig = option(default_factory=LongContextConfig, help="long-context continual stage")
    optim: OptimConfig = option(default_factory=OptimConfig, help="optimiser")
    batch_size: int = option(16, "utterances per step", min=1)
    merges: int = option(400, "BPE merges of the embedded tokenizer learned from the corpus (words become single tokens)", min=0)
    eval_before: bool = option(True, "measure the untrained Talker first (the 'before' of before -> after)")

    def validate(self) -> None:
        if self.codec.path != "embedded":
            raise ConfigError("config key 'codec.path': only the embedded codec can encode speech for pretraining; Code2Wav only decodes")
        if self.data.path != "embedded" and not os.path.exists(self.data.path):
            raise ConfigError(f"config key 'data.path': {self.data.path!r} does not exist; give 'embedded' or a jsonl of audio + text rows")
        if self.codec.codebook_size != self.talker.codebook_size or self.codec.groups != self.talker.num_code_groups:
            self.talker.codebook_size = self.codec.codebook_size
            self.talker.num_code_groups = self.codec.groups


# --------------------------------------------------------------------------- pieces


def make_streams(utterances, tokenizer, rates, layout):
    streams = []
    for u in utterances:
        groups = word_token_groups(tokenizer, u.words)
        rate = rates.get(str(u.voice), rates["*"])
        if layout == "aria":
            stream = build_stream(groups, u.spans, u.codes.shape[1], rate)
            assert check_stream(stream, sum(map(len, groups)), rate) is None
        else:
            stream = build_plain_stream([t for g in groups for t in g], u.codes.shape[1])
        streams.append(stream)
    return streams


@torch.no_grad()
def mean_loss(talker, embed, utterances, streams, cfg, batch_size=8) -> float:
    """Teacher-forced Talker + weighted code-predictor loss over utterances."""
    talker.eval()
    total, n = 0.0, 0
    for i in range(0, len(utterances), batch_size):
        us, ss = utterances[i : i + batch_size], streams[i : i + batch_size]
        l0, l1 = talker_losses(talker, talker_stream_batch(talker, embed, ss, [u.codes for u in us], [u.voice for u in us]))
        total += float(l0 + cfg.loss.code_predictor_weight * l1) * len(us)
        n += len(us)
    talker.train()
    return total / max(n, 1)


def evaluate_speech(bundle: TalkerBundle, held_out, references) -> tuple[list[dict], dict, list]:
    """The Talker speaks every held-out sentence (greedy); a real ASR listens."""
    bundle.model.eval()
    samples = [speak(bundle, u.text, u.voice) for u in tqdm(held_out, desc="speaking held-out sentences", leave=False)]
    rows, summary = score_speech(samples, references)
    bundle.model.train()
    return rows, summary, samples


def load_speech(cfg: Config, codec):
    """(train, held-out, voice names, speaker reference embeddings, tokenizer texts)."""
    if cfg.data.path == "embedded":
        train, held_out = embedded_corpus(codec, cache_root(), cfg.data.voices, cfg.data.train_size, cfg.data.eval_size, seed=cfg.seed,
                                          style=cfg.data.style)
        rng = random.Random(cfg.seed)
        return train, held_out, list(cfg.data.voices), voice_reference_embeddings(cfg.data.voices), [make_sentence(rng) for _ in range(3000)]
    user = load_user_speech(
        cfg.data.path, codec, cache_root(), on_bad=cfg.data.on_bad, min_seconds=cfg.data.min_seconds,
        max_seconds=cfg.data.max_seconds, alignment=cfg.data.alignment, asr_language=cfg.data.language,
    )
    n = len(user.utterances)
    if n <= cfg.data.eval_size:
        raise DataError(f"{cfg.data.path}: {n} usable recordings, but data.eval_size={cfg.data.eval_size} are held out; add recordings or lower data.eval_size")
    order = list(range(n))
    random.Random(cfg.seed).shuffle(order)
    held_out = [user.utterances[i] for i in order[: cfg.data.eval_size]]
    train = [user.utterances[i] for i in order[cfg.data.eval_size :]]
    if user.skipped:
        print(f"{len(user.skipped)} of {n + len(user.skipped)} rows skipped (listed above)", flush=True)
    return train, held_out, user.speakers, user.references, [u.text for u in user.utterances]


def joined(utterances, k: int, seed: int, pause):
    """Streams of ``k`` utterances of one voice joined by a pause (long-context data)."""
    by_voice = {}
    for u in utterances:
        by_voice.setdefault(u.voice, []).append(u)
    out = []
    for voice, us in sorted(by_voice.items()):
        for i in range(0, len(us) - k + 1, k):
            out.append(concat_utterances(us[i : i + k], pause))
    random.Random(seed).shuffle(out)
    return out


def continual_pretrain(talker, embed, train, train_streams, tokenizer, rates, pause, cfg, log) -> None:
    """Long-context continual pretraining: stage by stage through ``long_context.lengths``
    (utterances joined per stream), each batch of long streams joined by
    ``long_context.replay`` short training streams, so the Talker lengthens its context
    without forgetting single utterances."""
    lc = cfg.long_context
    if not (lc.steps and lc.lengths):
        return
    opt = make_optimizer(talker, lc.lr)
    per_stage = max(1, lc.steps // len(lc.lengths))
    step = cfg.max_steps
    for k in lc.lengths:
        pool = joined(train[: max(200, lc.batch_size * k * 10)], k, cfg.seed + k, pause)
        pool_streams = make_streams(pool, tokenizer, rates, cfg.layout)
        for s in tqdm(range(per_stage), desc=f"long context x{k}", leave=False):
            idx = batch_indices(len(pool), lc.batch_size, cfg.seed + k, s)
            streams = [pool_streams[i] for i in idx]
            codes = [pool[i].codes for i in idx]
            voices = [pool[i].voice for i in idx]
            if lc.replay:
                short = batch_indices(len(train), lc.replay, cfg.seed + 1000 + k, s)
                streams += [train_streams[i] for i in short]
                codes += [train[i].codes for i in short]
                voices += [train[i].voice for i in short]
            l0, l1 = talker_losses(talker, talker_stream_batch(talker, embed, streams, codes, voices))
            loss = l0 + cfg.loss.code_predictor_weight * l1
            loss.backward()
            torch.nn.utils.clip_grad_norm_(talker.parameters(), cfg.optim.grad_clip)
            opt.step()
            opt.zero_grad(set_to_none=True)
            fault_point("step")  # crash/resume tests
            step += 1
            if step % cfg.log_every == 0:
                log(step, {f"loss/long_x{k}": loss.item()})


# --------------------------------------------------------------------------- the recipe


def run(cfg: Config) -> RunResult:
    quiet_libraries()
    torch.manual_seed(cfg.seed)

    # 1. Codec, corpus, tokenizer, ARIA rates (per voice, from the data). Bad data fails here,
    #    before a run directory exists.
    stack = 1 if cfg.codec.frame_rate == 50 else 2
    codec = embedded_codec(cache_root(), MelRVQConfig(num_groups=cfg.codec.groups, codebook_size=cfg.codec.codebook_size, stack=stack))
    train, held_out, voices, references, texts = load_speech(cfg, codec)
    run_dir = Run(RECIPE, cfg)
    print(f"{RECIPE}: run directory {run_dir.path}", flush=True)
    tokenizer = build_embedded_tokenizer(texts, num_merges=cfg.merges)
    samples = [(str(u.voice), sum(map(len, word_token_groups(tokenizer, u.words))), u.codes.shape[1]) for u in train]
    rates = estimate_rates(samples, slack=cfg.aria.slack, lead=cfg.aria.lead)
    named_rates = {"*": rates["*"], **{voices[int(k)]: r for k, r in rates.items() if k != "*"}}
    train_streams = make_streams(train, tokenizer, rates, cfg.layout)
    held_streams = make_streams(held_out, tokenizer, rates, cfg.layout)
    print(
        f"{len(train)} training utterances ({np.mean([u.codes.shape[1] for u in train]) / codec.frame_rate:.1f} s on average), "
        f"{len(held_out)} held-out sentences, {len(voices)} voices, codec {codec.frame_rate:.0f} Hz x {codec.num_groups} codebooks; "
        f"ARIA rate {rates['*'].frames_per_token:.1f} frames per text token, lead {cfg.aria.lead}, layout={cfg.layout}",
        flush=True,
    )

    # 2. The tiny Talker (the Thinker's token embeddings feed it text; the Thinker stays frozen).
    model = build_tiny_omni(tokenizer, TinyThinkerSpec(hidden_size=64, num_layers=1), cfg.talker, seed=cfg.seed)
    talker, embed = talker_of(model), thinker_of(model).model.embed_tokens
    set_trainable(model, "talker")
    for p in talker.code_predictor.parameters():
        p.requires_grad_(True)
    slots = speaker_slots(talker)
    if len(voices) > slots:
        raise ConfigError(f"config key 'data.path': {len(voices)} speakers but the Talker has {slots} speaker slots; raise talker.codebook_size or merge speakers")
    bundle = TalkerBundle(model, tokenizer, codec, list(voices), named_rates, cfg.layout, [(u.text, voices[u.voice]) for u in held_out])
    print(f"talker: {sum(p.numel() for p in talker.parameters()) / 1e6:.2f}M parameters", flush=True)

    optimizer = make_optimizer(talker, cfg.optim.lr)
    scheduler = make_scheduler(optimizer, cfg.optim.warmup_steps, cfg.max_steps)
    start_step = run_dir.resume({"talker": talker}, optimizer, scheduler)
    before = run_dir.load_json("before.json")
    if before is None and not cfg.eval_before:
        before = {"loss": mean_loss(talker, embed, held_out, held_streams, cfg), "wer": None, "speaker_similarity": None, "f0_range": None}
        run_dir.save_json("before.json", before)
    if before is None:
        _, summary, _ = evaluate_speech(bundle, held_out, references)
        before = {"loss": mean_loss(talker, embed, held_out, held_streams, cfg), **summary}
        run_dir.save_json("before.json", before)
        run_dir.log(0, {k: v for k, v in before.items() if isinstance(v, float)})
    print("before: " + format_metrics({k: before[k] for k in ("loss", "wer", "speaker_similarity")}), flush=True)

    # 3. Stage 1: speech pretraining on short streams.
    talker.train()
    bar = tqdm(range(start_step, cfg.max_steps), desc=RECIPE, initial=start_step, total=cfg.max_steps, mininterval=1.0)
    for step in bar:
        idx = batch_indices(len(train), cfg.batch_size, cfg.seed, step)
        batch = talker_stream_batch(talker, embed, [train_streams[i] for i in idx], [train[i].codes for i in idx], [train[i].voice for i in idx],
                                    input_noise=cfg.loss.input_noise, generator=step_generator(cfg.seed, step))
        l0, l1 = talker_losses(talker, batch)
        loss = l0 + cfg.loss.code_predictor_weight * l1
        optimizer_step(loss, talker.parameters(), optimizer, scheduler, cfg.optim.grad_clip)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            run_dir.log(done, {"loss": loss.item(), "loss/talker": l0.item(), "loss/code_predictor": l1.item()})
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
            save_checkpoint(run_dir.checkpoints, done, {"talker": talker}, optimizer, scheduler, keep=cfg.keep_checkpoints)
    bar.close()

    # 4. Stage 2: long-context continual pretraining with a length curriculum.
    pause = silence_codes(codec, 3)
    longest = max(cfg.long_context.lengths) if cfg.long_context.lengths else 1
    long_held = joined(held_out, longest, cfg.seed, pause)
    long_held_streams = make_streams(long_held, tokenizer, rates, cfg.layout)
    loss_1x_before_long = mean_loss(talker, embed, held_out, held_streams, cfg)
    loss_long_before = mean_loss(talker, embed, long_held, long_held_streams, cfg, batch_size=2) if long_held else None
    continual_pretrain(talker, embed, train, train_streams, tokenizer, rates, pause, cfg, run_dir.log)
    loss_1x = mean_loss(talker, embed, held_out, held_streams, cfg)
    loss_long = mean_loss(talker, embed, long_held, long_held_streams, cfg, batch_size=2) if long_held else None
    print(
        f"long context: held-out loss at 1x {loss_1x_before_long:.3f} -> {loss_1x:.3f}, "
        f"at {longest}x {loss_long_before if loss_long_before is None else round(loss_long_before, 3)} -> {loss_long if loss_long is None else round(loss_long, 3)}",
        flush=True,
    )

    # 5. After: the Talker speaks held-out sentences; save the Talker; summarise.
    rows, summary, samples = evaluate_speech(bundle, held_out, references)
    write_report(run_dir.file("eval"), rows, summary, samples)
    print("eval: " + format_summary(summary), flush=True)
    after = {"loss": loss_1x, **summary}
    run_dir.log(cfg.max_steps, {k: v for k, v in after.items() if isinstance(v, float)})
    save_checkpoint(run_dir.checkpoints, cfg.max_steps, {"talker": talker}, optimizer, scheduler, keep=cfg.keep_checkpoints)
    bundle.save(run_dir.file("talker"))
    targets = {
        "loss": (before["loss"], after["loss"], "lower"),
        "wer": (before["wer"], after["wer"], "lower"),
        "speaker_similarity": (before["speaker_similarity"], after["speaker_similarity"], "higher"),
        "f0_range": (before["f0_range"], after["f0_range"], "higher"),
    }
    extra = {
        "long_context": {"loss_1x": loss_1x, f"loss_{longest}x": loss_long, "ratio": (loss_long / loss_1x) if loss_long and loss_1x else None},
        "layout": cfg.layout,
        "eval": summary,
    }
    return run_dir.finish(targets, extra=extra)


# --------------------------------------------------------------------------- cached checkpoints

#: bump when the embedded pretraining changes, so cached Talkers are rebuilt
CHECKPOINT_VERSION = 1


def embedded_checkpoint(steps: int, seed: int = 0, overrides: list[str] | None = None) -> str:
    """The ``talker/`` folder of an embedded ``talker_pretrain`` run of ``steps`` steps (short
    stage only), built once and cached: the start of the later Talker stages (an early,
    imperfect checkpoint leaves them room to improve)."""
    import hashlib
    import shutil

    from posttrain.config import load_config
    from recipes import defaults_path

    overrides = list(overrides or [])
    key = hashlib.sha1(f"{CHECKPOINT_VERSION}|{steps}|{seed}|{overrides}".encode()).hexdigest()[:10]
    folder = os.path.join(cache_root(), "talker", f"pretrain-{steps}-{key}")
    talker_dir = os.path.join(folder, "talker")
    if os.path.exists(os.path.join(talker_dir, "talker.json")):
        return talker_dir
    print(f"building the embedded Talker start ({steps} pretraining steps; cached in {folder})", flush=True)
    work = f"{folder}.tmp-{os.getpid()}"
    shutil.rmtree(work, ignore_errors=True)
    cfg = load_config(Config, defaults_path(RECIPE), [
        f"max_steps={steps}", "long_context.steps=0", "save_every=0", "eval_before=false", f"seed={seed}",
        f"output_dir={work}", "run_name=build", *overrides,
    ])
    result = run(cfg)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    shutil.rmtree(folder, ignore_errors=True)
    os.makedirs(work + "-done")
    shutil.move(os.path.join(result.run_dir, "talker"), os.path.join(work + "-done", "talker"))
    shutil.copy(os.path.join(result.run_dir, "summary.json"), os.path.join(work + "-done", "summary.json"))
    os.rename(work + "-done", folder)
    shutil.rmtree(work, ignore_errors=True)
    return talker_dir
