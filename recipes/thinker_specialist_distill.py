"""Several domain teachers teach one Thinker student; each sample goes to its domain's teacher.

Two modes:
  sequence  the teachers answer the training prompts; the student is fine-tuned on those
            answers (sequence-level KD, Kim & Rush 2016).
  token     the student matches each teacher's next-token distribution (forward KL, reverse
            KL or generalised JSD, as in GKD) on sequences written by the teachers, sampled
            by the student itself (on-policy), taken from the data, or a mix.

TRL's GKD trainer distils from ONE teacher; routing every sample to its own domain's
teacher (teachers may differ in size and chat template) is why this loop is our own.

Target metrics per domain on held-out prompts: ``kl/<domain>`` = KL(student || teacher) per
response token on the teacher's greedy answers (lower is better) and ``accuracy/<domain>``
= the student's greedy task accuracy where the domain is checkable (higher is better).
Reward plugins named in ``rewards`` score the same held-out answers (``reward/<name>``).
"""

from __future__ import annotations

import random
from collections import defaultdict
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from posttrain.checkpoint import save_checkpoint
from posttrain.faults import fault_point
from posttrain.config import RunConfig, option
from posttrain.data.io import load_rows, require_fields, write_jsonl
from posttrain.data.tasks import TASKS, checker_for, make_rows
from posttrain.data.text import encode_prompt, encode_response
from posttrain.errors import ConfigError, DataError
from posttrain.logging import Run, RunResult, format_metrics, quiet_libraries
from posttrain.losses import DIVERGENCES, divergence_per_token, masked_mean, reverse_kl_per_token, token_nll
from posttrain.models import hub
from posttrain.registry import RewardSet
from posttrain.models.embedded import embedded_specialist
from posttrain.models.qwen_omni import (
    TRAINABLE_PARTS,
    TinyThinkerSpec,
    build_tiny_thinker,
    load_language_model,
    load_tokenizer,
    save_model,
    set_trainable,
)
from posttrain.models.tokenizer import check_same_tokenizer, tokenizer_fingerprint
from posttrain.rollout import GenerationRequest, HFEngine, SamplingParams
from posttrain.training import batch_indices, make_optimizer, make_scheduler, response_view

RECIPE = "thinker_specialist_distill"


# --------------------------------------------------------------------------- config


@dataclass
class StudentConfig:
    path: str = option("embedded", "student model: 'embedded' (tiny random Thinker), 'smollm2', a folder or a hub name")
    tokenizer: str = option("embedded", "tokenizer of an embedded student: 'embedded', 'smollm2', a folder or hub name")
    size: TinyThinkerSpec = option(default_factory=TinyThinkerSpec, help="size of an embedded student")
    train: str = option("thinker_text", "which parameters train", choices=list(TRAINABLE_PARTS))


@dataclass
class TeacherBuildConfig:
    steps: int = option(0, "SFT steps that make an embedded teacher a specialist (built once, cached); 0 = the task's default (arithmetic 900, strings 400)", min=0)
    batch_size: int = option(64, "SFT batch size for embedded teachers", min=1)
    lr: float = option(3e-3, "SFT learning rate for embedded teachers", min=0.0)
    size: TinyThinkerSpec = option(default_factory=TinyThinkerSpec, help="size of embedded teachers")


@dataclass
class DataConfig:
    path: str = option("embedded", "jsonl / parquet / dataset folder with prompt, domain (response, answer optional); 'embedded' makes the built-in tasks")
    domains: list[str] = option(["arithmetic", "strings"], "built-in domains of the embedded data", choices=list(TASKS))
    train_size: int = option(3000, "embedded training prompts per domain", min=1)
    eval_size: int = option(100, "held-out prompts per domain", min=1)
    eval_path: str = option("", "a separate held-out file (default: eval_size rows per domain split off data.path)")


@dataclass
class KDConfig:
    divergence: str = option("forward_kl", "token-level divergence", choices=list(DIVERGENCES))
    beta: float = option(0.5, "JSD interpolation (0 = forward KL, 1 = reverse KL)", min=0.0, max=1.0)
    temperature: float = option(1.0, "softmax temperature of both models in the divergence", min=1e-3)
    sequences: str = option("teacher", "whose sequences are scored: the teachers', the student's own samples, the data's responses, or a mix", choices=["teacher", "student", "data", "mixed"])
    student_fraction: float = option(0.5, "with sequences=mixed, fraction of steps on the student's own samples (GKD's lambda)", min=0.0, max=1.0)
    sft_weight: float = option(0.0, "weight of an added cross-entropy term on the scored sequences", min=0.0)


@dataclass
class GenerationConfig:
    max_new_tokens: int = option(12, "longest response", min=1)
    student_temperature: float = option(1.0, "sampling temperature of on-policy student samples", min=0.0)
    teacher_temperature: float = option(0.0, "teacher temperature for training responses (0 = greedy)", min=0.0)


@dataclass
class OptimConfig:
    lr: float = option(2e-3, "peak learning rate", min=0.0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    warmup_steps: int = option(50, "linear warm-up steps", min=0)
    schedule: str = option("cosine", "learning-rate schedule after warm-up", choices=["cosine", "linear", "constant"])
    grad_clip: float = option(1.0, "gradient norm clip (0 = off)", min=0.0)


@dataclass
class Config(RunConfig):
    student: StudentConfig = option(default_factory=StudentConfig, help="the student")
    teachers: dict[str, str] = option({"arithmetic": "embedded", "strings": "embedded"}, "domain -> teacher ('embedded' for built-in domains, 'smollm2', folder or hub name)")
    teacher_build: TeacherBuildConfig = option(default_factory=TeacherBuildConfig, help="how embedded teachers are built")
    data: DataConfig = option(default_factory=DataConfig, help="training and held-out data")
    mode: str = option("token", "sequence-level (SFT on teacher answers) or token-level KD", choices=["sequence", "token"])
    kd: KDConfig = option(default_factory=KDConfig, help="token-level distillation")
    generation: GenerationConfig = option(default_factory=GenerationConfig, help="sampling")
    optim: OptimConfig = option(default_factory=OptimConfig, help="optimiser")
    batch_size: int = option(64, "sequences per optimiser step", min=1)
    eval_every: int = option(250, "evaluate KL and accuracy every N steps (0 = only before and after)", min=0)

    def validate(self) -> None:
        if not self.teachers:
            raise ConfigError("config key 'teachers': map at least one domain to a teacher, e.g. teachers.math=PATH")
        for domain, path in self.teachers.items():
            if path == "embedded" and domain not in TASKS:
                raise ConfigError(
                    f"config key 'teachers.{domain}': 'embedded' teachers exist only for the built-in domains "
                    f"({', '.join(TASKS)}); give a model folder or hub name for {domain!r}"
                )
        if self.mode == "sequence" and self.kd.sequences in ("student", "mixed"):
            raise ConfigError("config key 'kd.sequences': mode=sequence trains on teacher or data answers; use teacher or data")


# --------------------------------------------------------------------------- data


def load_data(cfg: Config) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows), every row with ``prompt`` and a ``domain`` that has a teacher."""
    if cfg.data.path == "embedded":
        train, held_out = [], []
        for domain in cfg.data.domains:
            if domain not in cfg.teachers:
                raise ConfigError(f"config key 'data.domains': domain {domain!r} has no teacher; add teachers.{domain}=embedded")
            rows = make_rows(domain, cfg.data.train_size, seed=cfg.seed)
            train += rows
            held_out += make_rows(domain, cfg.data.eval_size, seed=cfg.seed + 1, exclude={r["prompt"] for r in rows})
        return train, held_out
    rows = load_rows(cfg.data.path)
    require_fields(rows, ["domain"], cfg.data.path)
    for row in rows:
        if "prompt" not in row or not row["prompt"]:
            raise DataError(f"{cfg.data.path}, line {row['_line']}: missing field 'prompt'")
        if row["domain"] not in cfg.teachers:
            raise DataError(
                f"{cfg.data.path}, line {row['_line']}: domain {row['domain']!r} has no teacher; configured: "
                f"{', '.join(sorted(cfg.teachers))} (add teachers.{row['domain']}=PATH or fix the line)"
            )
        if cfg.kd.sequences == "data" and not row.get("response"):
            raise DataError(f"{cfg.data.path}, line {row['_line']}: kd.sequences=data needs a 'response' field")
    if cfg.data.eval_path:
        held_out = load_rows(cfg.data.eval_path)
        return rows, held_out
    by_domain = defaultdict(list)
    for row in rows:
        by_domain[row["domain"]].append(row)
    train, held_out = [], []
    for domain, domain_rows in sorted(by_domain.items()):
        random.Random(f"{cfg.seed}-{domain}").shuffle(domain_rows)
        k = min(cfg.data.eval_size, max(1, len(domain_rows) // 5))
        held_out += domain_rows[:k]
        train += domain_rows[k:]
    return train, held_out


# --------------------------------------------------------------------------- models


def load_student(cfg: Config):
    if cfg.student.path == "embedded":
        tokenizer = load_tokenizer(cfg.student.tokenizer)
        return build_tiny_thinker(tokenizer, cfg.student.size, seed=cfg.seed), tokenizer
    return load_language_model(cfg.student.path, "student")


def load_teachers(cfg: Config, student_tokenizer) -> dict[str, tuple]:
    """Domain -> (model, tokenizer, engine); one model per distinct path, frozen."""
    by_path = {}
    teachers = {}
    for domain, path in sorted(cfg.teachers.items()):
        if path == "embedded":
            tb = cfg.teacher_build
            path = embedded_specialist(domain, cfg.student.tokenizer, tb.size, tb.steps, tb.batch_size, tb.lr, seed=cfg.seed)
        if path not in by_path:
            model, tokenizer = load_language_model(path, f"teacher for domain {domain!r}")
            model.eval().requires_grad_(False)
            if cfg.mode == "token":
                check_same_tokenizer(student_tokenizer, tokenizer, "the student", f"the {domain} teacher ({path})")
            by_path[path] = (model, tokenizer, HFEngine(model, tokenizer))
        teachers[domain] = by_path[path]
    return teachers


# --------------------------------------------------------------------------- evaluation


def teacher_answers(teachers, rows: list[dict], cfg: Config, temperature: float, seed: int) -> list[str]:
    """Each row's answer from its own domain's teacher."""
    answers = [""] * len(rows)
    for domain in sorted({r["domain"] for r in rows}):
        _, tokenizer, engine = teachers[domain]
        idx = [i for i, r in enumerate(rows) if r["domain"] == domain]
        sampling = SamplingParams(cfg.generation.max_new_tokens, temperature=temperature)
        requests = [GenerationRequest(encode_prompt(tokenizer, rows[i]["prompt"]), sampling, i) for i in idx]
        for i, c in zip(idx, engine.generate(requests, seed=seed)):
            answers[i] = c.text
    return answers


@torch.no_grad()
def evaluate(student, tokenizer, engine, teachers, held_out: list[dict], cfg: Config, rewards: RewardSet | None) -> dict[str, float]:
    """Per domain: KL(student || teacher) on the teacher's held-out answers and accuracy of
    the student's greedy answers; the configured reward plugins on those answers."""
    metrics = {}
    vocab = len(tokenizer)
    student.eval()
    sampling = SamplingParams(cfg.generation.max_new_tokens, temperature=0.0)
    requests = [GenerationRequest(encode_prompt(tokenizer, r["prompt"]), sampling, i) for i, r in enumerate(held_out)]
    answers = [c.text for c in engine.generate(requests)]
    for domain in sorted({r["domain"] for r in held_out}):
        idx = [i for i, r in enumerate(held_out) if r["domain"] == domain]
        rows = [held_out[i] for i in idx]
        teacher, t_tok, _ = teachers[domain]
        if tokenizer_fingerprint(t_tok) == tokenizer_fingerprint(tokenizer):  # KL needs one vocabulary
            total, count = 0.0, 0.0
            for start in range(0, len(rows), 64):
                chunk = rows[start:start + 64]
                responses = [encode_response(tokenizer, r["teacher_answer"]) for r in chunk]
                s_logits, mask, _ = response_view(student, [encode_prompt(tokenizer, r["prompt"]) for r in chunk], responses, tokenizer.pad_token_id, vocab)
                t_logits, _, _ = response_view(teacher, [encode_prompt(t_tok, r["prompt"]) for r in chunk], responses, t_tok.pad_token_id, vocab)
                kl = reverse_kl_per_token(s_logits, t_logits)
                total += float((kl * mask).sum())
                count += float(mask.sum())
            metrics[f"kl/{domain}"] = total / max(count, 1.0)
        if domain in TASKS or all(r.get("answer") for r in rows):
            check = checker_for(domain)
            metrics[f"accuracy/{domain}"] = sum(check(answers[i], str(held_out[i]["answer"])) for i in idx) / len(idx)
    if rewards is not None and len(rewards):
        columns = {k: [r.get(k) for r in held_out] for k in sorted({k for r in held_out for k in r}) if k not in ("prompt", "teacher_answer") and not k.startswith("_")}
        combined, per_reward = rewards.score([r["prompt"] for r in held_out], answers, **columns)
        for name, values in [("combined", combined)] + list(per_reward.items()):
            scored = [v for v in values if v is not None]
            metrics[f"reward/{name}"] = sum(scored) / len(scored) if scored else None
    student.train()
    return metrics


# --------------------------------------------------------------------------- the recipe


def run(cfg: Config) -> RunResult:
    quiet_libraries()
    # 1. Data and model paths are checked before anything is written.
    train_rows, held_out = load_data(cfg)
    for name, path in [("student.path", cfg.student.path)] + [(f"teachers.{d}", p) for d, p in cfg.teachers.items()]:
        if path != "embedded":
            hub.resolve(path, f"{name} ({path})")
    rewards = RewardSet(cfg.rewards) if cfg.rewards else None  # extra metrics on held-out answers
    run_dir = Run(RECIPE, cfg)
    torch.manual_seed(cfg.seed)
    print(f"{RECIPE}: run directory {run_dir.path}", flush=True)

    # Student and teachers (each domain routed to its own teacher).
    student, tokenizer = load_student(cfg)
    teachers = load_teachers(cfg, tokenizer)
    set_trainable(student, cfg.student.train)
    engine = HFEngine(student, tokenizer)  # colocated: shares the student's weights
    vocab = len(tokenizer)
    print(
        f"student: {sum(p.numel() for p in student.parameters()) / 1e6:.2f}M parameters; "
        f"{len(train_rows)} training / {len(held_out)} held-out prompts over domains "
        f"{', '.join(sorted({r['domain'] for r in train_rows}))}; mode={cfg.mode}",
        flush=True,
    )

    # 2. Teacher answers: for the held-out KL metric, and as training sequences. Kept in the
    #    run directory so a resumed run reuses them.
    cached = run_dir.load_json("teacher_answers.json") or {}
    if "held_out" not in cached:
        cached["held_out"] = teacher_answers(teachers, held_out, cfg, 0.0, cfg.seed)
    for row, answer in zip(held_out, cached["held_out"]):
        row["teacher_answer"] = answer
    needs_teacher_seqs = cfg.kd.sequences in ("teacher", "mixed")
    if needs_teacher_seqs and "train" not in cached:
        print(f"teachers answer {len(train_rows)} training prompts ...", flush=True)
        cached["train"] = teacher_answers(teachers, train_rows, cfg, cfg.generation.teacher_temperature, cfg.seed)
    run_dir.save_json("teacher_answers.json", cached)
    for i, row in enumerate(train_rows):
        row["teacher_answer"] = cached["train"][i] if "train" in cached else None
    write_jsonl(run_dir.file("data", "held_out.jsonl"), held_out)
    teacher_metrics = {}
    for domain in sorted({r["domain"] for r in held_out}):
        rows = [r for r in held_out if r["domain"] == domain]
        if domain in TASKS or all(r.get("answer") for r in rows):
            check = checker_for(domain)
            teacher_metrics[f"teacher_accuracy/{domain}"] = sum(check(r["teacher_answer"], str(r["answer"])) for r in rows) / len(rows)
    if teacher_metrics:
        print("teachers on held-out prompts: " + ", ".join(f"{k.split('/')[1]} {v:.2f}" for k, v in teacher_metrics.items()), flush=True)

    # 3. Optimiser; resume from the last checkpoint if asked.
    optimizer = make_optimizer(student, cfg.optim.lr, cfg.optim.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.schedule)
    start_step = run_dir.resume({"student": student}, optimizer, scheduler)
    before = run_dir.load_json("before.json")
    if before is None:
        before = evaluate(student, tokenizer, engine, teachers, held_out, cfg, rewards)
        run_dir.save_json("before.json", before)
        run_dir.log(0, before)
    print("before: " + format_metrics(before), flush=True)

    # 4. The loop: pick sequences, score them with each sample's own teacher, step.
    student.train()
    bar = tqdm(range(start_step, cfg.max_steps), desc=RECIPE, initial=start_step, total=cfg.max_steps, mininterval=1.0)
    for step in bar:
        rows = [train_rows[i] for i in batch_indices(len(train_rows), cfg.batch_size, cfg.seed, step)]
        prompts = [encode_prompt(tokenizer, r["prompt"]) for r in rows]
        source = cfg.kd.sequences
        if source == "mixed":
            source = "student" if random.Random(f"mix-{cfg.seed}-{step}").random() < cfg.kd.student_fraction else "teacher"
        if source == "student":
            sampling = SamplingParams(cfg.generation.max_new_tokens, temperature=cfg.generation.student_temperature)
            completions = engine.generate([GenerationRequest(p, sampling, i) for i, p in enumerate(prompts)], seed=cfg.seed * 100_003 + step)
            responses = [c.token_ids if c.token_ids else [tokenizer.eos_token_id] for c in completions]
        else:
            texts = [r["teacher_answer"] if source == "teacher" else r["response"] for r in rows]
            responses = [encode_response(tokenizer, t) for t in texts]

        s_logits, mask, targets = response_view(student, prompts, responses, tokenizer.pad_token_id, vocab)
        metrics = {}
        if cfg.mode == "sequence":
            loss = masked_mean(token_nll(s_logits, targets), mask)
        else:
            t_logits = torch.zeros_like(s_logits)
            with torch.no_grad():
                for domain in sorted({r["domain"] for r in rows}):
                    teacher, t_tok, _ = teachers[domain]
                    idx = [i for i, r in enumerate(rows) if r["domain"] == domain]
                    t_prompts = [encode_prompt(t_tok, rows[i]["prompt"]) for i in idx]
                    logits, _, _ = response_view(teacher, t_prompts, [responses[i] for i in idx], t_tok.pad_token_id, vocab)
                    t_logits[idx, : logits.shape[1]] = logits
            div = divergence_per_token(cfg.kd.divergence, s_logits, t_logits, cfg.kd.beta, cfg.kd.temperature)
            loss = masked_mean(div, mask)
            metrics["divergence"] = loss.item()
            if cfg.kd.sft_weight > 0:
                loss = loss + cfg.kd.sft_weight * masked_mean(token_nll(s_logits, targets), mask)
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
            run_dir.log(done, {"loss": loss.item(), "lr": scheduler.get_last_lr()[0], **metrics})
        if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.max_steps:
            ev = evaluate(student, tokenizer, engine, teachers, held_out, cfg, rewards)
            run_dir.log(done, ev)
            bar.write(f"step {done}: " + format_metrics(ev))
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
            save_checkpoint(run_dir.checkpoints, done, {"student": student}, optimizer, scheduler, keep=cfg.keep_checkpoints)
    bar.close()

    # 5. After: evaluate, save the model in Hugging Face format, summarise.
    after = evaluate(student, tokenizer, engine, teachers, held_out, cfg, rewards)
    run_dir.log(cfg.max_steps, after)
    save_checkpoint(run_dir.checkpoints, cfg.max_steps, {"student": student}, optimizer, scheduler, keep=cfg.keep_checkpoints)
    save_model(student, tokenizer, run_dir.file("model"))
    targets = {k: (before.get(k), after[k], "lower" if k.startswith("kl/") else "higher") for k in sorted(after)}
    return run_dir.finish(targets, extra={"teachers": teacher_metrics})
