"""The embedded default models: tiny random Thinkers, and tiny specialist teachers trained
once on a checkable task and cached (so the teachers really are specialists)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict

import torch
from tqdm.auto import tqdm

from posttrain.data.tasks import TASKS
from posttrain.data.text import collate, encode_prompt, encode_response
from posttrain.losses import masked_mean, token_nll
from posttrain.models.hub import cache_root
from posttrain.models.qwen_omni import TinyThinkerSpec, build_tiny_thinker, load_tokenizer, save_model
from posttrain.rollout import GenerationRequest, HFEngine, SamplingParams
from posttrain.training import logits_of, make_optimizer, make_scheduler

SPECIALIST_VERSION = 2  # 2: expert weights initialised explicitly


def evaluate_task(engine, tokenizer, domain: str, rows: list[dict], max_new_tokens: int = 12) -> float:
    """Greedy accuracy of an engine's model on rows of a built-in task."""
    task = TASKS[domain]
    requests = [
        GenerationRequest(encode_prompt(tokenizer, r["prompt"]), SamplingParams(max_new_tokens, temperature=0.0), i)
        for i, r in enumerate(rows)
    ]
    completions = engine.generate(requests)
    return sum(task.check(c.text, r["answer"]) for c, r in zip(completions, rows)) / max(1, len(rows))


def train_specialist(
    domain: str,
    tokenizer,
    spec: TinyThinkerSpec,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
):
    """A tiny Thinker trained by supervised fine-tuning on fresh samples of ``domain``."""
    task = TASKS[domain]
    model = build_tiny_thinker(tokenizer, spec, seed=seed)
    model.train()
    optimizer = make_optimizer(model, lr)
    scheduler = make_scheduler(optimizer, warmup_steps=min(50, steps // 10), total_steps=steps)
    rng = random.Random(f"specialist-{domain}-{seed}")
    bar = tqdm(range(steps), desc=f"training the {domain} teacher (cached after this)", leave=False, mininterval=1.0)
    for _ in bar:
        pairs = [task.make(rng) for _ in range(batch_size)]
        batch = collate(
            [encode_prompt(tokenizer, p) for p, _ in pairs],
            [encode_response(tokenizer, a) for _, a in pairs],
            tokenizer.pad_token_id,
        )
        loss = masked_mean(token_nll(logits_of(model, batch), batch["targets"]), batch["response_mask"])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    model.eval()
    return model


def embedded_specialist(
    domain: str,
    tokenizer_name: str = "embedded",
    spec: TinyThinkerSpec | None = None,
    steps: int = 0,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
) -> str:
    """Folder of a tiny teacher specialised in built-in task ``domain``, trained on first use
    and cached under the posttrain cache (keyed by everything that shapes it).
    ``steps=0`` takes the task's own default."""
    spec = spec or TinyThinkerSpec()
    steps = steps or TASKS[domain].teacher_steps
    key = json.dumps(
        {"v": SPECIALIST_VERSION, "domain": domain, "tok": tokenizer_name, "spec": asdict(spec), "steps": steps,
         "bs": batch_size, "lr": lr, "seed": seed},
        sort_keys=True,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    path = os.path.join(cache_root(), "teachers", f"{domain}-{digest}")
    if os.path.exists(os.path.join(path, "specialist.json")):
        return path
    tokenizer = load_tokenizer(tokenizer_name)
    torch.manual_seed(seed)
    model = train_specialist(domain, tokenizer, spec, steps, batch_size, lr, seed)
    from posttrain.data.tasks import make_rows

    accuracy = evaluate_task(HFEngine(model, tokenizer), tokenizer, domain, make_rows(domain, 200, seed=10_000 + seed))
    tmp = f"{path}.tmp-{os.getpid()}"
    save_model(model, tokenizer, tmp)
    with open(os.path.join(tmp, "specialist.json"), "w") as fh:
        json.dump({"domain": domain, "accuracy": accuracy, "config": json.loads(key)}, fh, indent=2)
    try:
        os.rename(tmp, path)
    except OSError:  # built concurrently by another process
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"built the embedded {domain} teacher: accuracy {accuracy:.2f} on 200 fresh prompts -> {path}", flush=True)
    return path


# ---------------------------------------------------------------------------------------
# A tiny Thinker with ears: reads a text task, and has heard its spoken queries

HEARING_VERSION = 2  # 2: expert weights initialised explicitly
TRANSCRIBE_INSTRUCTION = "\nRepeat what you heard."


def train_hearing_thinker(
    tokenizer,
    spec: TinyThinkerSpec,
    text_rows: list[dict],
    clips: list[dict],
    transcripts: list[str],
    text_steps: int,
    ear_steps: int,
    batch_size: int = 32,
    lr: float = 3e-3,
    audio_lr: float = 3e-3,
    seed: int = 0,
    start=None,
):
    """A tiny Thinker (``start``, or a fresh one of size ``spec``) taught to answer ``text_rows`` (prompt -> answer) from text, then given
    ears: spoken query -> its transcript (``clips[i]`` -> ``transcripts[i]``), with text QA
    mixed in so it keeps reading. It never practises answering from audio: that gap is what
    audio distillation closes. The audio encoder gets its own (higher) learning rate because
    it starts from nothing while the decoder only has to keep what it knows."""
    from posttrain.models.qwen_omni import audio_placeholder, batch_audio_inputs

    model = start if start is not None else build_tiny_thinker(tokenizer, spec, seed=seed)
    model.train()
    rng = random.Random(f"hearing-{seed}")

    def text_loss(rows):
        batch = collate([encode_prompt(tokenizer, r["prompt"]) for r in rows],
                        [encode_response(tokenizer, str(r["answer"])) for r in rows], tokenizer.pad_token_id)
        return masked_mean(token_nll(logits_of(model, batch), batch["targets"]), batch["response_mask"])

    def step(loss, optimizer, scheduler):
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    optimizer = make_optimizer(model, lr)
    scheduler = make_scheduler(optimizer, warmup_steps=min(20, text_steps // 10), total_steps=text_steps)
    bar = tqdm(range(text_steps), desc="teaching the student to read (cached after this)", leave=False, mininterval=1.0)
    for _ in bar:
        loss = text_loss([text_rows[rng.randrange(len(text_rows))] for _ in range(2 * batch_size)])
        step(loss, optimizer, scheduler)
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)

    audio_ids = {id(p) for p in model.audio_tower.parameters()}
    groups = [
        {"params": list(model.audio_tower.parameters()), "lr": audio_lr},
        {"params": [p for p in model.parameters() if id(p) not in audio_ids], "lr": lr / 3},
    ]
    optimizer = torch.optim.AdamW(groups, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = make_scheduler(optimizer, warmup_steps=min(20, ear_steps // 10), total_steps=ear_steps)
    bar = tqdm(range(ear_steps), desc="giving the student ears (cached after this)", leave=False, mininterval=1.0)
    for _ in bar:
        idx = [rng.randrange(len(clips)) for _ in range(batch_size)]
        batch = collate(
            [encode_prompt(tokenizer, audio_placeholder(clips[i]["audio_tokens"]) + TRANSCRIBE_INSTRUCTION) for i in idx],
            [encode_response(tokenizer, transcripts[i]) for i in idx],
            tokenizer.pad_token_id,
        )
        hear = masked_mean(token_nll(logits_of(model, batch, batch_audio_inputs([clips[i] for i in idx])), batch["targets"]), batch["response_mask"])
        read = text_loss([text_rows[rng.randrange(len(text_rows))] for _ in range(batch_size)])
        step(hear + read, optimizer, scheduler)
        bar.set_postfix(hear=f"{hear.item():.3f}", read=f"{read.item():.3f}", refresh=False)
    model.eval()
    return model


def embedded_hearing_thinker(
    name: str,
    text_rows: list[dict],
    spoken_rows: list[dict],
    tokenizer_name: str = "embedded",
    spec: TinyThinkerSpec | None = None,
    text_steps: int = 300,
    ear_steps: int = 400,
    batch_size: int = 32,
    lr: float = 3e-3,
    audio_lr: float = 3e-3,
    seed: int = 0,
    start: str = "",
) -> str:
    """Folder of a tiny Thinker that reads task ``name`` (``text_rows``: prompt, answer) and has
    learnt to transcribe ``spoken_rows`` (prompt, audio = a 16 kHz file); built on first use and
    cached under the posttrain cache, keyed by everything that shapes it. ``start``: a Thinker
    folder to teach instead of a fresh tiny Thinker (its own tokenizer and size; e.g. the student
    of a previous stage)."""
    from posttrain.audio.io import load_audio
    from posttrain.models.qwen_omni import audio_inputs, load_language_model, split_audio_inputs

    spec = spec or TinyThinkerSpec()
    start_model = None
    if start:
        start_model, start_tokenizer = load_language_model(start, "ears.start")
        if not hasattr(start_model, "audio_tower"):
            from posttrain.errors import ModelError

            raise ModelError(f"ears.start {start!r} is not a Qwen-Omni Thinker (no audio encoder); give a Thinker folder")
        spec = TinyThinkerSpec(**{**asdict(spec), "num_mel_bins": start_model.config.audio_config.num_mel_bins})
        from posttrain.models.hub import resolve

        folder, weights = resolve(start, "ears.start"), hashlib.sha1()
        for f in sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")):  # the start's weights shape the result
            with open(os.path.join(folder, f), "rb") as fh:
                weights.update(fh.read())
        tokenizer_name = "start:" + weights.hexdigest()
    data_digest = hashlib.sha1(json.dumps(
        [[r["prompt"], str(r["answer"])] for r in text_rows] + [[r["prompt"], os.path.basename(r["audio"])] for r in spoken_rows]
    ).encode()).hexdigest()
    key = json.dumps(
        {"v": HEARING_VERSION, "name": name, "data": data_digest, "tok": tokenizer_name, "spec": asdict(spec),
         "text_steps": text_steps, "ear_steps": ear_steps, "bs": batch_size, "lr": lr, "audio_lr": audio_lr, "seed": seed},
        sort_keys=True,
    )
    digest = hashlib.sha1(key.encode()).hexdigest()[:10]
    path = os.path.join(cache_root(), "hearing", f"{name}-{digest}")
    if os.path.exists(os.path.join(path, "hearing.json")):
        return path
    tokenizer = start_tokenizer if start_model is not None else load_tokenizer(tokenizer_name)
    clips = []
    for start in range(0, len(spoken_rows), 64):
        wavs = [load_audio(r["audio"]) for r in spoken_rows[start:start + 64]]
        clips += split_audio_inputs(audio_inputs(wavs, spec.num_mel_bins))
    torch.manual_seed(seed)
    model = train_hearing_thinker(tokenizer, spec, text_rows, clips, [r["prompt"] for r in spoken_rows],
                                  text_steps, ear_steps, batch_size, lr, audio_lr, seed, start=start_model)
    tmp = f"{path}.tmp-{os.getpid()}"
    save_model(model, tokenizer, tmp)
    with open(os.path.join(tmp, "hearing.json"), "w") as fh:
        json.dump({"name": name, "config": json.loads(key)}, fh, indent=2)
    try:
        os.rename(tmp, path)
    except OSError:  # built concurrently by another process
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"built the embedded hearing Thinker for {name} -> {path}", flush=True)
    return path
