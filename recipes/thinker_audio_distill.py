"""Close the gap between a Thinker hearing a query and reading it: on-policy audio -> text distillation.

The student is the Thinker given the SPOKEN query (through its audio encoder); the teacher is a
frozen model given the same query as TEXT (by default the student's own starting text view).
Each step:
  1. the student samples answers on-policy from the audio view (the rollout engine, audio in);
  2. the teacher scores exactly those tokens from the text view;
  3. loss = per-token reverse KL(student_audio || teacher_text) on the sampled answers
     (JSD selectable), optionally + a supervised term on the teacher's greedy answer,
     + a text-view anchor: the student's own TEXT view distilled from the teacher on the same
     answers, so hearing is not bought by forgetting how to read.
The two views have different prompts (audio placeholders vs words) and lengths; they are
aligned on the response tokens (``response_view``).

Why not TRL's GKDTrainer: it feeds teacher and student the same prompt. Here the prompts
differ by design, and the student's prompt carries audio features, so the loop is ours; the
divergence is the same function as the first recipe's.

Target metrics on held-out spoken queries: ``audio_text_divergence`` = KL(student audio view ||
teacher text view) per token on the teacher's greedy answers (lower is better),
``accuracy/audio`` and ``accuracy/text`` (the student's greedy answers from each view) and
``accuracy_gap`` = text - audio (lower is better).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from data_tools.synthesize_speech import resolve_audio_path, synthesize_dataset
from posttrain.audio.io import load_audio, validate_audio
from posttrain.checkpoint import save_checkpoint
from posttrain.faults import fault_point
from posttrain.config import RunConfig, option
from posttrain.data.io import load_rows, write_jsonl
from posttrain.data.tasks import check_exact
from posttrain.data.text import encode_prompt, encode_response
from posttrain.errors import AudioError, ConfigError, DataError
from posttrain.logging import Run, RunResult, quiet_libraries
from posttrain.losses import DIVERGENCES, divergence_per_token, masked_mean, reverse_kl_per_token, token_nll
from posttrain.models import hub
from posttrain.models.embedded import embedded_hearing_thinker
from posttrain.models.qwen_omni import (
    TRAINABLE_PARTS,
    TinyThinkerSpec,
    audio_inputs,
    audio_placeholder,
    batch_audio_inputs,
    load_language_model,
    save_model,
    set_trainable,
    split_audio_inputs,
)
from posttrain.models.tokenizer import check_same_tokenizer
from posttrain.registry import RewardSet
from posttrain.rollout import GenerationRequest, HFEngine, SamplingParams
from posttrain.training import batch_indices, make_scheduler, response_view

RECIPE = "thinker_audio_distill"


# --------------------------------------------------------------------------- the embedded task

# Single-digit spoken addition, "3 + 4" (spoken "three plus four"): ten digit words a tiny audio
# encoder learns to tell apart on a CPU in minutes, and an answer that depends on hearing BOTH
# numbers. Measured: two-digit "What is 47 + 12?" clips were not heard after 400 alignment
# steps, nor single digits wrapped in "What is ...?" after 400; the bare "a + b" was (short
# clips, and every transcript token that is not fixed is a digit).
def spoken_addition_rows() -> list[dict]:
    """All 100 queries ``a + b`` (a, b in 0..9) with their answers."""
    return [{"prompt": f"{a} + {b}", "answer": str(a + b)} for a in range(10) for b in range(10)]


# --------------------------------------------------------------------------- config


@dataclass
class StudentConfig:
    path: str = option("embedded", "student Thinker: 'embedded' (a tiny Thinker that reads the task and has ears, built once and cached) or a folder / hub name of a Qwen-Omni Thinker")
    tokenizer: str = option("embedded", "tokenizer of an embedded student")
    size: TinyThinkerSpec = option(default_factory=lambda: TinyThinkerSpec(audio_hidden=128, num_mel_bins=64), help="size of an embedded student")
    train: str = option("thinker", "which parameters train (thinker = decoder + audio encoder)", choices=list(TRAINABLE_PARTS))


@dataclass
class EarsConfig:
    text_steps: int = option(200, "embedded student: text SFT steps on the task (it learns to read)", min=0)
    ear_steps: int = option(600, "embedded student: audio -> transcript steps (it learns to hear), text QA mixed in", min=0)
    batch_size: int = option(32, "batch size of both build steps", min=1)
    lr: float = option(3e-3, "learning rate of the text steps (a third of it for the decoder during the ear steps)", min=0.0)
    audio_lr: float = option(5e-3, "learning rate of the audio encoder during the ear steps", min=0.0)
    start: str = option("", "embedded student: a Thinker folder (e.g. a previous stage's model/) that the text and ear steps teach instead of a fresh tiny Thinker; its tokenizer and size are kept")


@dataclass
class DataConfig:
    path: str = option("embedded", "jsonl / parquet / dataset folder with prompt (the query as text), audio (the spoken query; paths relative to the file) and optional answer; 'embedded' speaks single-digit addition")
    eval_size: int = option(40, "held-out spoken queries (split off data.path; embedded: new recordings of that many queries)", min=1)
    eval_path: str = option("", "a separate held-out file (same fields)")
    on_bad_audio: str = option("skip", "a row whose audio is missing or unreadable: skip it (counted and named) or fail", choices=["skip", "fail"])
    voices: list[str] = option(["en-us"], "embedded data: espeak-ng voices")
    rates: list[int] = option([260], "embedded data: speaking rates, words per minute (fast = short clips)")
    pitches: list[int] = option([40, 60], "embedded data: base pitches (0-99) of the training clips")
    held_out_pitches: list[int] = option([50], "embedded data: base pitches of the held-out clips (unheard in training)")
    repeats: int = option(2, "embedded data: spoken versions of each training query", min=1)


@dataclass
class KDConfig:
    divergence: str = option("reverse_kl", "per-token divergence of the audio view from the teacher", choices=list(DIVERGENCES))
    beta: float = option(0.5, "JSD interpolation (0 = forward KL, 1 = reverse KL)", min=0.0, max=1.0)
    temperature: float = option(1.0, "softmax temperature of both models in the divergence", min=1e-3)
    anchor_weight: float = option(1.0, "weight of the text-view anchor (student's text view distilled from the teacher on the same answers)", min=0.0)
    # Reverse KL alone stalls here: the audio view starts confidently wrong (it transcribes), where
    # reverse KL's gradient toward the teacher's tokens is tiny (measured: audio accuracy 0.05
    # after 200 steps without this term, 0.35 with it).
    sft_weight: float = option(1.0, "weight of a supervised term: the audio view's NLL of the teacher's greedy answer", min=0.0)


@dataclass
class GenerationConfig:
    max_new_tokens: int = option(6, "longest response", min=1)
    student_temperature: float = option(1.0, "sampling temperature of the on-policy audio-view samples", min=0.0)


@dataclass
class OptimConfig:
    lr: float = option(5e-4, "peak learning rate of the decoder", min=0.0)
    audio_lr: float = option(3e-3, "peak learning rate of the audio encoder", min=0.0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    warmup_steps: int = option(20, "linear warm-up steps", min=0)
    schedule: str = option("cosine", "learning-rate schedule after warm-up", choices=["cosine", "linear", "constant"])
    grad_clip: float = option(1.0, "gradient norm clip (0 = off)", min=0.0)


@dataclass
class Config(RunConfig):
    student: StudentConfig = option(default_factory=StudentConfig, help="the student (hears the query)")
    teacher: str = option("student", "the teacher (reads the query): 'student' = a frozen copy of the student's starting text view, or a folder / hub name of a text model with the student's tokenizer")
    ears: EarsConfig = option(default_factory=EarsConfig, help="how the embedded student gets its ears")
    data: DataConfig = option(default_factory=DataConfig, help="spoken training and held-out queries")
    kd: KDConfig = option(default_factory=KDConfig, help="the distillation loss")
    generation: GenerationConfig = option(default_factory=GenerationConfig, help="sampling")
    optim: OptimConfig = option(default_factory=OptimConfig, help="optimiser")
    batch_size: int = option(32, "spoken queries per optimiser step", min=1)
    eval_every: int = option(100, "evaluate every N steps (0 = only before and after)", min=0)

    def validate(self) -> None:
        if self.student.path == "embedded" and self.data.path != "embedded":
            raise ConfigError(
                "config key 'student.path': the embedded student knows only the embedded task (spoken "
                "single-digit addition); with your own data.path give a Qwen-Omni Thinker folder or hub name"
            )


# --------------------------------------------------------------------------- data


def embedded_data(cfg: Config) -> tuple[list[dict], list[dict], list[dict]]:
    """(train, held-out, text rows): spoken single-digit additions. Held-out clips are new
    recordings, in a voice pitch never heard in training, of ``eval_size`` of the queries.
    Queries are not held out: the task has only 100, the text-view teacher knows them all, and
    a tiny decoder did not learn arithmetic on heard digits for pairs it never heard (measured:
    audio accuracy on 20 held-out pairs stayed 0.00 after 300 steps)."""
    rows = spoken_addition_rows()
    held_prompts = random.Random(f"{RECIPE}-{cfg.seed}").sample(rows, min(cfg.data.eval_size, len(rows)))
    folder = os.path.join(hub.cache_root(), "spoken", RECIPE)
    speak = dict(voices=cfg.data.voices, rates=cfg.data.rates, progress=False)
    train = synthesize_dataset(rows * cfg.data.repeats, os.path.join(folder, "train"), pitches=cfg.data.pitches, seed=cfg.seed, **speak)
    held_out = synthesize_dataset(held_prompts, os.path.join(folder, "held_out"), pitches=cfg.data.held_out_pitches, seed=cfg.seed + 1, **speak)
    return train, held_out, rows


def read_spoken_rows(path: str) -> list[dict]:
    """Rows of a user file with ``prompt`` and ``audio`` (resolved relative to the file)."""
    rows = load_rows(path)
    for row in rows:
        where = f"{path}, line {row.get('_line', '?')}"
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise DataError(f"{where}: missing field 'prompt' (the query as text, which the teacher reads)")
        if not isinstance(row.get("audio"), str) or not row["audio"].strip():
            raise DataError(f"{where}: missing field 'audio' (path of the spoken query)")
        row["audio"] = resolve_audio_path(row["audio"], path)
        row["_where"] = where
    return rows


def load_data(cfg: Config) -> tuple[list[dict], list[dict], list[dict] | None]:
    """(train rows, held-out rows, text rows of the embedded task or None); every row has
    ``prompt`` and ``audio``."""
    if cfg.data.path == "embedded":
        return embedded_data(cfg)
    rows = read_spoken_rows(cfg.data.path)
    if cfg.data.eval_path:
        return rows, read_spoken_rows(cfg.data.eval_path), None
    random.Random(f"{cfg.seed}-split").shuffle(rows)
    k = min(cfg.data.eval_size, max(1, len(rows) // 5))
    return rows[k:], rows[:k], None


def attach_audio(rows: list[dict], cfg: Config, what: str, num_mel_bins: int | None = None) -> list[dict]:
    """Load every row's audio into model inputs (``row["clip"]``; log-mel features with the
    student's ``num_mel_bins``, by default the embedded student's). A missing or unreadable file
    is skipped (counted and named) or fails, as ``data.on_bad_audio`` says; never silently."""
    good, bad = [], []
    for i, row in enumerate(rows):
        where = row.get("_where", f"{what} row {i + 1}")
        try:
            wav = validate_audio(load_audio(row["audio"]), 16000, row["audio"])
        except AudioError as e:
            if cfg.data.on_bad_audio == "fail":
                raise DataError(f"{where}: {e} (set data.on_bad_audio=skip to leave such samples out)") from None
            bad.append(f"{where}: {e}")
            continue
        good.append((row, wav))
    if bad:
        print(f"skipped {len(bad)} of {len(rows)} {what} samples with missing or unreadable audio:", flush=True)
        for line in bad[:10]:
            print(f"  {line}", flush=True)
        if len(bad) > 10:
            print(f"  ... and {len(bad) - 10} more", flush=True)
    if not good:
        raise DataError(f"no {what} sample has usable audio ({len(rows)} rows, all skipped); check the 'audio' paths")
    for start in range(0, len(good), 64):
        chunk = good[start:start + 64]
        mel = num_mel_bins or cfg.student.size.num_mel_bins
        for (row, _), clip in zip(chunk, split_audio_inputs(audio_inputs([w for _, w in chunk], mel))):
            row["clip"] = clip
    return [row for row, _ in good]


# --------------------------------------------------------------------------- models


def load_student(cfg: Config, text_rows: list[dict] | None, train_rows: list[dict]):
    """(student, tokenizer); the embedded student is built (reads + hears) once and cached."""
    path = cfg.student.path
    if path == "embedded":
        e = cfg.ears
        path = embedded_hearing_thinker(
            "spoken_addition", text_rows, train_rows, cfg.student.tokenizer, cfg.student.size,
            e.text_steps, e.ear_steps, e.batch_size, e.lr, e.audio_lr, seed=cfg.seed, start=e.start,
        )
    model, tokenizer = load_language_model(path, "student")
    if not hasattr(model, "audio_tower"):
        raise ConfigError(f"config key 'student.path': {cfg.student.path!r} is not a Qwen-Omni Thinker (no audio encoder), so it cannot hear")
    return model, tokenizer


def load_teacher(cfg: Config, student, tokenizer):
    """The frozen text-view teacher: a copy of the starting student, or another model with the
    same tokenizer."""
    if cfg.teacher == "student":
        import copy

        teacher, t_tok = copy.deepcopy(student), tokenizer
    else:
        teacher, t_tok = load_language_model(cfg.teacher, "teacher")
        check_same_tokenizer(tokenizer, t_tok, "the student", f"the teacher ({cfg.teacher})")
    teacher.eval().requires_grad_(False)
    return teacher, t_tok


def make_optimizer_two_rates(model, lr: float, audio_lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with the audio encoder on its own learning rate (it is the part that must change)."""
    audio = {id(p) for p in getattr(model, "audio_tower", torch.nn.Module()).parameters()}
    groups = [
        {"params": [p for p in model.parameters() if p.requires_grad and id(p) in audio], "lr": audio_lr},
        {"params": [p for p in model.parameters() if p.requires_grad and id(p) not in audio], "lr": lr},
    ]
    return torch.optim.AdamW([g for g in groups if g["params"]], betas=(0.9, 0.95), weight_decay=weight_decay)


# --------------------------------------------------------------------------- the two views


def audio_prompt(tokenizer, row: dict) -> list[int]:
    """The student's prompt: the clip's audio placeholder tokens where the text would be."""
    return encode_prompt(tokenizer, audio_placeholder(row["clip"]["audio_tokens"]))


def text_prompt(tokenizer, row: dict) -> list[int]:
    """The teacher's (and the anchor's) prompt: the query as words."""
    return encode_prompt(tokenizer, row["prompt"])


def placeholder_ids(tokenizer) -> set[int]:
    """Ids of the tokens that stand for audio / image / video inputs in a prompt."""
    ids = tokenizer.get_vocab()
    names = ("<|audio_pad|>", "<|audio_start|>", "<|audio_end|>", "<|image_pad|>", "<|video_pad|>", "<|vision_start|>")
    return {ids[n] for n in names if n in ids}


def clean_response(ids: list[int], banned: set[int], eos_id: int) -> list[int]:
    """A sampled response cut before any input-placeholder token (a sampling student can emit
    one, and the model would then look for audio features that do not exist), ending in EOS."""
    for k, t in enumerate(ids):
        if t in banned:
            return ids[:k] + [eos_id]
    return ids if ids else [eos_id]


def answers_from(engine, tokenizer, rows: list[dict], view: str, max_new_tokens: int, temperature: float = 0.0, seed: int | None = None):
    """Completions of ``rows`` from one view (``audio`` or ``text``); greedy at temperature 0."""
    sampling = SamplingParams(max_new_tokens, temperature=temperature)
    if view == "audio":
        requests = [GenerationRequest(audio_prompt(tokenizer, r), sampling, i, inputs=r["clip"]) for i, r in enumerate(rows)]
    else:
        requests = [GenerationRequest(text_prompt(tokenizer, r), sampling, i) for i, r in enumerate(rows)]
    return engine.generate(requests, seed=seed)


@torch.no_grad()
def evaluate(student, tokenizer, engine, teacher, t_tok, held_out: list[dict], cfg: Config, rewards: RewardSet | None = None) -> dict[str, float]:
    """Held-out: KL(student audio view || teacher text view) per token on the teacher's greedy
    answers; greedy accuracy of both views (against ``answer``, else agreement with the
    teacher's answer); the gap between them; reward plugins on the audio view's answers."""
    student.eval()
    vocab = len(tokenizer)
    banned = placeholder_ids(tokenizer)
    total, count, text_total = 0.0, 0.0, 0.0
    for start in range(0, len(held_out), 64):
        rows = held_out[start:start + 64]
        responses = [clean_response(encode_response(tokenizer, r["teacher_answer"]), banned, tokenizer.eos_token_id) for r in rows]
        t_logits, mask, _ = response_view(teacher, [text_prompt(t_tok, r) for r in rows], responses, t_tok.pad_token_id, vocab)
        a_logits, _, _ = response_view(student, [audio_prompt(tokenizer, r) for r in rows], responses, tokenizer.pad_token_id, vocab,
                                       batch_audio_inputs([r["clip"] for r in rows]))
        x_logits, _, _ = response_view(student, [text_prompt(tokenizer, r) for r in rows], responses, tokenizer.pad_token_id, vocab)
        total += float((reverse_kl_per_token(a_logits, t_logits) * mask).sum())
        text_total += float((reverse_kl_per_token(x_logits, t_logits) * mask).sum())
        count += float(mask.sum())
    metrics = {"audio_text_divergence": total / max(count, 1.0), "text_view_divergence": text_total / max(count, 1.0)}
    for view in ("audio", "text"):
        answers = answers_from(engine, tokenizer, held_out, view, cfg.generation.max_new_tokens)
        metrics[f"accuracy/{view}"] = sum(check_exact(c.text, r["reference"]) for c, r in zip(answers, held_out)) / len(held_out)
        if view == "audio" and rewards is not None and len(rewards):
            skip = {"prompt", "teacher_answer", "reference", "clip"}
            columns = {k: [r.get(k) for r in held_out] for k in sorted({k for r in held_out for k in r}) if k not in skip and not k.startswith("_")}
            combined, per_reward = rewards.score([r["prompt"] for r in held_out], [c.text for c in answers], **columns)
            for name, values in [("combined", combined)] + list(per_reward.items()):
                scored = [v for v in values if v is not None]
                metrics[f"reward/{name}"] = sum(scored) / len(scored) if scored else None
    metrics["accuracy_gap"] = metrics["accuracy/text"] - metrics["accuracy/audio"]
    student.train()
    return metrics


# --------------------------------------------------------------------------- the recipe


def run(cfg: Config) -> RunResult:
    quiet_libraries()
    # 1. Data (audio loaded and checked) and model paths, before anything is written.
    for name, path in (("student.path", cfg.student.path), ("teacher", cfg.teacher)):
        if path not in ("embedded", "student"):
            hub.resolve(path, f"{name} ({path})")
    rewards = RewardSet(cfg.rewards) if cfg.rewards else None  # extra metrics on the audio view's answers
    train_rows, held_out, text_rows = load_data(cfg)
    train_rows = attach_audio(train_rows, cfg, "training")
    held_out = attach_audio(held_out, cfg, "held-out")
    student, tokenizer = load_student(cfg, text_rows, train_rows)
    mel = student.config.audio_config.num_mel_bins
    if mel != cfg.student.size.num_mel_bins:  # a loaded Thinker reads its own number of mel bins
        train_rows = attach_audio(train_rows, cfg, "training", mel)
        held_out = attach_audio(held_out, cfg, "held-out", mel)
    teacher, t_tok = load_teacher(cfg, student, tokenizer)
    run_dir = Run(RECIPE, cfg)
    torch.manual_seed(cfg.seed)
    print(f"{RECIPE}: run directory {run_dir.path}", flush=True)

    set_trainable(student, cfg.student.train)
    engine = HFEngine(student, tokenizer)  # colocated: shares the student's weights
    teacher_engine = HFEngine(teacher, t_tok)
    vocab = len(tokenizer)
    print(
        f"student: {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters "
        f"(audio encoder {sum(p.numel() for p in student.audio_tower.parameters()) / 1e6:.2f}M); "
        f"{len(train_rows)} training / {len(held_out)} held-out spoken queries; teacher: {cfg.teacher}",
        flush=True,
    )

    # 2. The teacher's greedy text-view answers: the fixed sequences of the divergence metric
    #    (and of the optional supervised term). Kept in the run directory for a resumed run.
    cached = run_dir.load_json("teacher_answers.json") or {}
    if "held_out" not in cached:
        cached["held_out"] = [c.text for c in answers_from(teacher_engine, t_tok, held_out, "text", cfg.generation.max_new_tokens)]
    if cfg.kd.sft_weight > 0 and "train" not in cached:
        cached["train"] = [c.text for c in answers_from(teacher_engine, t_tok, train_rows, "text", cfg.generation.max_new_tokens)]
    run_dir.save_json("teacher_answers.json", cached)
    for row, answer in zip(held_out, cached["held_out"]):
        row["teacher_answer"] = answer
        row["reference"] = str(row["answer"]) if row.get("answer") not in (None, "") else answer
    for i, row in enumerate(train_rows):
        row["teacher_answer"] = cached["train"][i] if "train" in cached else None
    write_jsonl(run_dir.file("data", "held_out.jsonl"), [{k: v for k, v in r.items() if k != "clip"} for r in held_out])
    teacher_accuracy = sum(check_exact(r["teacher_answer"], r["reference"]) for r in held_out) / len(held_out)
    print(f"teacher (text view) on held-out queries: accuracy {teacher_accuracy:.2f}", flush=True)

    # 3. Optimiser; resume from the last checkpoint if asked.
    optimizer = make_optimizer_two_rates(student, cfg.optim.lr, cfg.optim.audio_lr, cfg.optim.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.schedule)
    start_step = run_dir.resume({"student": student}, optimizer, scheduler)
    before = run_dir.load_json("before.json")
    if before is None:
        before = evaluate(student, tokenizer, engine, teacher, t_tok, held_out, cfg, rewards)
        run_dir.save_json("before.json", before)
        run_dir.log(0, before)
    print("before: " + ", ".join(f"{k} {v:.3f}" for k, v in before.items() if v is not None), flush=True)

    # 4. The loop: the student samples from what it hears; the teacher scores those tokens from
    #    what it reads; the audio view moves toward the teacher, the text view stays anchored.
    student.train()
    pad = tokenizer.pad_token_id
    banned = placeholder_ids(tokenizer)
    bar = tqdm(range(start_step, cfg.max_steps), desc=RECIPE, initial=start_step, total=cfg.max_steps, mininterval=1.0)
    for step in bar:
        rows = [train_rows[i] for i in batch_indices(len(train_rows), cfg.batch_size, cfg.seed, step)]
        completions = answers_from(engine, tokenizer, rows, "audio", cfg.generation.max_new_tokens,
                             cfg.generation.student_temperature, seed=cfg.seed * 100_003 + step)
        responses = [clean_response(c.token_ids, banned, tokenizer.eos_token_id) for c in completions]
        audio = batch_audio_inputs([r["clip"] for r in rows])

        with torch.no_grad():
            t_logits, _, _ = response_view(teacher, [text_prompt(t_tok, r) for r in rows], responses, t_tok.pad_token_id, vocab)
        a_logits, mask, _ = response_view(student, [audio_prompt(tokenizer, r) for r in rows], responses, pad, vocab, audio)
        hearing = masked_mean(divergence_per_token(cfg.kd.divergence, a_logits, t_logits, cfg.kd.beta, cfg.kd.temperature), mask)
        loss = hearing
        metrics = {"divergence/audio": hearing.item()}
        if cfg.kd.anchor_weight > 0:
            x_logits, _, _ = response_view(student, [text_prompt(tokenizer, r) for r in rows], responses, pad, vocab)
            reading = masked_mean(divergence_per_token(cfg.kd.divergence, x_logits, t_logits, cfg.kd.beta, cfg.kd.temperature), mask)
            loss = loss + cfg.kd.anchor_weight * reading
            metrics["divergence/text_anchor"] = reading.item()
        if cfg.kd.sft_weight > 0:
            targets = [clean_response(encode_response(tokenizer, r["teacher_answer"]), banned, tokenizer.eos_token_id) for r in rows]
            s_logits, s_mask, s_targets = response_view(student, [audio_prompt(tokenizer, r) for r in rows], targets, pad, vocab, audio)
            sft = masked_mean(token_nll(s_logits, s_targets), s_mask)
            loss = loss + cfg.kd.sft_weight * sft
            metrics["sft"] = sft.item()
        loss.backward()
        if cfg.optim.grad_clip > 0:
            metrics["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.optim.grad_clip))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        fault_point("step")  # crash/resume tests
        engine.update_weights(None, step + 1)  # colocated engine: the new weights are already there
        bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)

        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            run_dir.log(done, {"loss": loss.item(), "lr": scheduler.get_last_lr()[-1], **metrics})
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
            ev = evaluate(student, tokenizer, engine, teacher, t_tok, held_out, cfg, rewards)
            run_dir.log(done, ev)
            bar.write(f"step {done}: " + ", ".join(f"{k} {v:.3f}" for k, v in ev.items() if v is not None))
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
            save_checkpoint(run_dir.checkpoints, done, {"student": student}, optimizer, scheduler, keep=cfg.keep_checkpoints)
    bar.close()

    # 5. After: evaluate, save the model in Hugging Face format, summarise.
    after = evaluate(student, tokenizer, engine, teacher, t_tok, held_out, cfg, rewards)
    run_dir.log(cfg.max_steps, after)
    save_checkpoint(run_dir.checkpoints, cfg.max_steps, {"student": student}, optimizer, scheduler, keep=cfg.keep_checkpoints)
    save_model(student, tokenizer, run_dir.file("model"))
    better = {"audio_text_divergence": "lower", "accuracy/audio": "higher", "accuracy/text": "higher", "accuracy_gap": "lower"}
    better.update({k: "higher" for k in after if k.startswith("reward/")})
    targets = {k: (before.get(k), after[k], b) for k, b in better.items()}
    return run_dir.finish(targets, extra={"teacher_accuracy": teacher_accuracy})
