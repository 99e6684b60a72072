"""Multi-turn interaction quality for a Thinker: GSPO with rule-based rewards (language, persona, instructions).

The policy answers the last user turn of multi-turn conversations; weighted reward plugins
score each reply: ``language`` (the reply in the language the user asked for, following
switches between turns), ``persona`` (facts and style of the persona card kept, never breaking
character) and ``instruction_following`` (rules stated in the first user turn, many turns
before the reply, still obeyed). GSPO (Zheng et al. 2025) optimises the weighted reward: one
importance ratio per sequence (the geometric mean of its token ratios), clipped to
``[1 - gspo.epsilon, 1 + gspo.epsilon_high]``, with group-normalised advantages over
``gspo.num_generations`` replies per conversation and no KL term by default.

The loop is TRL's GRPOTrainer with ``importance_sampling_level="sequence"`` (TRL's GSPO); the
only change (posttrain.trainers.gspo) is that completions come from our rollout engine, which
receives the new weights after every optimiser step.

Target metrics on held-out conversations (replies sampled with a fixed seed; higher is better):
``reward/combined`` and ``reward/<name>`` per plugin, and the same on a held-out long-context
set whose conversations are longer than any training conversation (``reward/combined_long``,
``reward/<name>_long``). In metrics.jsonl, ``reward/<name>`` is the mean over each rollout
batch and ``held_out/<name>`` the held-out evaluations.

Embedded default: a tiny Thinker with a byte-level BPE whose merges are learned from generated
conversations, first fine-tuned (once, then cached) on template replies from
`posttrain.data.conversations` of which, on purpose, about ``warmup.flaw_rate`` show each of the
typical failures: answering in the previous turn's language, forgetting the rules of the first
turn, breaking character. The warmed-up model speaks the templates but slips as often as its
teacher did; RL has to make it stop slipping.

What the rewards do not check: that the reply answers the question asked. Trained on these
three alone, the embedded policy also learns to prefer short replies stating a fact it gets
right, whatever the question; add a relevance reward (e.g. overlap with the embedded data's
``reference`` column, which the rewards receive) to counter that.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import asdict, dataclass

import torch
from tqdm.auto import tqdm

from posttrain.config import RewardConfig, RunConfig, option
from posttrain.data import conversations as conv
from posttrain.data.io import load_rows, write_jsonl
from posttrain.data.text import collate, encode_prompt, encode_response
from posttrain.distributed import deepspeed_config
from posttrain.errors import ConfigError, DataError, RewardError
from posttrain.logging import Run, RunResult, quiet_libraries
from posttrain.losses import masked_mean, token_nll
from posttrain.models import hub
from posttrain.models.qwen_omni import (
    TRAINABLE_PARTS,
    TinyThinkerSpec,
    build_tiny_thinker,
    load_language_model,
    load_tokenizer,
    save_model,
    set_trainable,
)
from posttrain.registry import RewardSet
from posttrain.rollout import GenerationRequest, HFEngine, SamplingParams
from posttrain.training import logits_of, make_optimizer, make_scheduler

RECIPE = "thinker_interaction_rl"
WARMUP_VERSION = 1


# --------------------------------------------------------------------------- config


@dataclass
class PolicyConfig:
    path: str = option("embedded", "policy model: 'embedded' (tiny Thinker, warmed up once and cached), 'smollm2', a folder or a hub name")
    tokenizer: str = option("conversations", "tokenizer of the embedded policy: 'conversations' (the embedded byte-level BPE with merges learned from generated conversations, built once), 'embedded' (bytes only), 'smollm2', a folder or hub name")
    size: TinyThinkerSpec = option(default_factory=TinyThinkerSpec, help="size of the embedded policy")
    train: str = option("thinker_text", "which parameters train", choices=list(TRAINABLE_PARTS))
    lora_rank: int = option(0, "train a LoRA adapter (peft, rank N, alpha 2N, on the text decoder's attention projections) instead of policy.train's parameters; 0 = full training. rollout.sync=lora sends only this adapter", min=0)


@dataclass
class WarmupConfig:
    steps: int = option(300, "SFT steps that teach the embedded policy the conversation templates (built once, cached); 0 = start from random weights", min=0)
    batch_size: int = option(32, "SFT batch size", min=1)
    lr: float = option(3e-3, "SFT learning rate", min=0.0)
    flaw_rate: float = option(0.5, "chance that an SFT reply shows each failure (wrong language, forgotten rules, broken character): how often the warmed-up policy slips", min=0.0, max=1.0)


@dataclass
class DataConfig:
    path: str = option("embedded", "jsonl / parquet / dataset folder with a conversational 'prompt' (list of {role, content} ending with a user turn); optional columns persona, language, constraints go to the rewards. 'embedded' generates conversations")
    eval_path: str = option("", "a separate held-out file (default: eval_size rows split off data.path)")
    long_eval_path: str = option("", "a held-out file of long conversations for reward/*_long (embedded data: generated)")
    train_size: int = option(2000, "embedded training conversations", min=1)
    eval_size: int = option(64, "held-out conversations", min=1)
    long_eval_size: int = option(32, "held-out long-context conversations (embedded data)", min=0)
    turns: int = option(2, "user turns per embedded conversation (training and held-out)", min=1)
    long_context_chars: int = option(1000, "characters of a held-out long conversation (story filler between the rules and the last turn); must exceed every training conversation", min=0)
    languages: list[str] = option(list(conv.SUPPORTED_LANGUAGES), "languages of embedded conversations", choices=list(conv.SUPPORTED_LANGUAGES))


@dataclass
class GSPOConfig:
    num_generations: int = option(8, "replies sampled per conversation (the group advantages are normalised over)", min=2)
    batch_size: int = option(32, "replies per optimiser step (a multiple of num_generations)", min=1)
    steps_per_generation: int = option(4, "optimiser steps per rollout batch (the GSPO paper splits each rollout batch into 4 mini-batches)", min=1)
    num_iterations: int = option(1, "passes over each rollout batch", min=1)
    epsilon: float = option(3e-4, "lower clipping range of the sequence ratio (GSPO paper: 3e-4)", min=0.0)
    epsilon_high: float = option(4e-4, "upper clipping range of the sequence ratio (GSPO paper: 4e-4)", min=0.0)
    beta: float = option(0.0, "KL coefficient to the initial policy (GSPO: 0, no reference model)", min=0.0)
    importance_sampling_level: str = option("sequence", "sequence = GSPO; token = GRPO's per-token ratio", choices=["sequence", "token"])
    loss_type: str = option("grpo", "TRL loss aggregation (GSPO: grpo = mean over sequences)", choices=["grpo", "bnpo", "dr_grpo", "dapo"])
    scale_rewards: str = option("group", "advantage scaling: by the group's std (GRPO/GSPO), the batch's, or none (Dr. GRPO)", choices=["group", "batch", "none"])
    temperature: float = option(1.0, "sampling temperature of the rollouts", min=1e-3)
    top_p: float = option(1.0, "nucleus sampling of the rollouts", min=0.0, max=1.0)
    max_completion_length: int = option(48, "longest reply in tokens", min=1)


@dataclass
class OptimConfig:
    lr: float = option(5e-4, "peak learning rate", min=0.0)
    weight_decay: float = option(0.0, "AdamW weight decay", min=0.0)
    warmup_steps: int = option(5, "linear warm-up steps", min=0)
    schedule: str = option("constant", "learning-rate schedule after warm-up", choices=["cosine", "linear", "constant"])
    grad_clip: float = option(1.0, "gradient norm clip (0 = off)", min=0.0)


@dataclass
class RolloutConfig:
    engines: int = option(0, "rollout engines: 0 = in-process (shares the policy object), N = a Ray pool of N engine actors that receive the weights after every optimiser step", min=0)
    kind: str = option("hf", "engine of each pool actor: hf (Hugging Face generate) or vllm (posttrain.rollout.vllm_engine)", choices=["hf", "vllm"])
    ray_address: str = option("local", "Ray: local (a private local Ray), auto (the cluster this machine belongs to) or ray://host:port")
    sync: str = option("full", "what a weight sync sends: full (the state dict) or lora (the peft adapter only; needs a LoRA policy)", choices=["full", "lora"])
    one_step_off: bool = option(False, "generate the next rollout batch with weights one version old while the trainer trains (staleness 1, importance-corrected with the engine's sampling log-probs)")
    reward_workers: int = option(0, "reward workers: 0 = score in-process, N = N Ray actors (each loads the reward models once)", min=0)
    timeout_s: float = option(300.0, "seconds an engine may take for its share of a batch before it is named, restarted and the run stops", min=1.0)
    engine_cpus: float = option(1.0, "CPUs per engine actor", min=0.0)
    engine_gpus: float = option(0.0, "GPUs per engine actor", min=0.0)
    tensor_parallel: int = option(1, "vllm: GPUs each engine shards the model over (vLLM tensor_parallel_size); rollout.engine_gpus must cover them", min=1)


@dataclass
class EvalConfig:
    temperature: float = option(1.0, "sampling temperature of held-out replies (0 = greedy); the seed is fixed, so before and after see the same draws", min=0.0)
    samples: int = option(2, "replies per held-out conversation", min=1)
    every: int = option(0, "evaluate every N steps as well (0 = only before and after)", min=0)


def _default_rewards() -> list[RewardConfig]:
    return [RewardConfig("language", 1.0), RewardConfig("persona", 1.0), RewardConfig("instruction_following", 1.0)]


@dataclass
class Config(RunConfig):
    policy: PolicyConfig = option(default_factory=PolicyConfig, help="the policy")
    warmup: WarmupConfig = option(default_factory=WarmupConfig, help="SFT warm-up of the embedded policy")
    data: DataConfig = option(default_factory=DataConfig, help="training and held-out conversations")
    gspo: GSPOConfig = option(default_factory=GSPOConfig, help="GSPO (TRL GRPOTrainer settings)")
    optim: OptimConfig = option(default_factory=OptimConfig, help="optimiser")
    eval: EvalConfig = option(default_factory=EvalConfig, help="held-out evaluation")
    rollout: RolloutConfig = option(default_factory=RolloutConfig, help="where rollouts are generated and scored (in-process or a Ray pool)")
    rewards: list[RewardConfig] = option(default_factory=_default_rewards, help="weighted reward plugins [{name, weight, params}] (entry-point name or module:function)")

    def validate(self) -> None:
        if self.rollout.sync == "lora" and not self.policy.lora_rank:
            raise ConfigError(
                f"config key 'rollout.sync': lora sends only a LoRA adapter, but the policy's '{self.policy.train}' "
                "parameters train in full; set policy.lora_rank (e.g. 16) or use rollout.sync=full"
            )
        if self.rollout.kind == "vllm" and not self.rollout.engines:
            raise ConfigError("config key 'rollout.kind': vllm engines run in a Ray pool; set rollout.engines to 1 or more")
        if self.rollout.tensor_parallel > 1:
            if self.rollout.kind != "vllm" or not self.rollout.engines:
                raise ConfigError("config key 'rollout.tensor_parallel': tensor parallelism is for vllm engines; set rollout.kind=vllm and rollout.engines to 1 or more")
            if self.rollout.engine_gpus < self.rollout.tensor_parallel:
                raise ConfigError(
                    f"config key 'rollout.tensor_parallel': {self.rollout.tensor_parallel} GPUs per engine, but rollout.engine_gpus "
                    f"is {self.rollout.engine_gpus:g}; set rollout.engine_gpus={self.rollout.tensor_parallel}"
                )
        if not self.rewards:
            raise ConfigError("config key 'rewards': give at least one reward plugin, e.g. rewards=[{name: language}]")
        if self.gspo.batch_size % self.gspo.num_generations:
            raise ConfigError(
                f"config key 'gspo.batch_size': {self.gspo.batch_size} replies per step must be a multiple of "
                f"gspo.num_generations ({self.gspo.num_generations})"
            )


# --------------------------------------------------------------------------- data

ROLES = ("system", "user", "assistant")


def check_row(row: dict, where: str) -> dict:
    """A user row as the trainer and the rewards read it; one clear DataError per problem."""
    from rewards.instruction_following import describe_constraint
    from rewards.language import language_codes
    from rewards.persona import parse_persona

    prompt = row.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        prompt = [{"role": "user", "content": prompt}]
    if not isinstance(prompt, list) or not prompt:
        raise DataError(f"{where}: 'prompt' must be a list of {{role, content}} messages (TRL conversational format), got {type(prompt).__name__}")
    for k, message in enumerate(prompt):
        if not isinstance(message, dict) or message.get("role") not in ROLES or not isinstance(message.get("content"), str):
            raise DataError(f"{where}: prompt message {k} must be {{'role': one of {', '.join(ROLES)}, 'content': text}}, got {message!r}")
    if not any(m["role"] == "user" for m in prompt):
        raise DataError(f"{where}: the conversation has no user turn; add a message with role 'user' for the model to answer")
    if prompt[-1]["role"] != "user":
        raise DataError(f"{where}: the conversation ends with a {prompt[-1]['role']!r} message; it must end with the user turn the model answers")
    out = {k: v for k, v in row.items() if not k.startswith("_")}
    out["prompt"] = [{"role": m["role"], "content": m["content"]} for m in prompt]
    # The columns the default rewards read, checked here so a bad value names its line.
    for key in ("language", "languages"):
        if row.get(key) is not None:
            try:
                language_codes(row[key])
            except RewardError as e:
                raise DataError(f"{where}, field {key!r}: {e}") from None
    if row.get("persona") is not None:
        try:
            parse_persona(row["persona"], where="field 'persona'")
        except RewardError as e:
            raise DataError(f"{where}: {e}") from None
    constraints = row.get("constraints")
    try:
        if isinstance(constraints, str):
            constraints = json.loads(constraints)
        for constraint in [constraints] if isinstance(constraints, dict) else constraints or []:
            describe_constraint(constraint)
    except (RewardError, json.JSONDecodeError) as e:
        raise DataError(f"{where}, field 'constraints': {e}") from None
    # One Arrow type per column, whatever the rows hold: structured columns travel as JSON text
    # (both rewards read it).
    for key in ("persona", "constraints"):
        if out.get(key) is not None and not isinstance(out[key], str):
            out[key] = json.dumps(out[key], ensure_ascii=False)
    return out


def read_conversations(path: str) -> list[dict]:
    return [check_row(row, f"{path}, line {row.get('_line', i + 1)}") for i, row in enumerate(load_rows(path))]


def load_data(cfg: Config) -> tuple[list[dict], dict[str, list[dict]]]:
    """(training conversations, held-out sets by metric suffix: '' and '_long')."""
    d = cfg.data
    if d.path == "embedded":
        train = conv.make_conversations(d.train_size, turns=d.turns, seed=cfg.seed, languages=d.languages)
        seen = {json.dumps(r["prompt"]) for r in train}
        held = [r for r in conv.make_conversations(d.eval_size * 2, turns=d.turns, seed=cfg.seed + 1, languages=d.languages) if json.dumps(r["prompt"]) not in seen][: d.eval_size]
    else:
        rows = read_conversations(d.path)
        if d.eval_path:
            train, held = rows, read_conversations(d.eval_path)
        else:
            random.Random(cfg.seed).shuffle(rows)
            k = min(d.eval_size, max(1, len(rows) // 5))
            held, train = rows[:k], rows[k:]
        per_rollout = cfg.gspo.batch_size * cfg.gspo.steps_per_generation // cfg.gspo.num_generations
        if len(train) < per_rollout:
            raise DataError(
                f"{d.path}: {len(train)} training conversations (after holding out {len(held)}), but one rollout batch "
                f"samples {per_rollout} different ones (gspo.batch_size x gspo.steps_per_generation / gspo.num_generations); "
                "add rows, set data.eval_path, or lower gspo.batch_size"
            )
    sets = {"": held}
    if d.long_eval_path:
        sets["_long"] = read_conversations(d.long_eval_path)
    elif d.path == "embedded" and d.long_eval_size:
        longest = max(r["context_chars"] for r in train)
        if d.long_context_chars <= longest:
            raise ConfigError(f"config key 'data.long_context_chars': {d.long_context_chars} is not longer than the longest training conversation ({longest} characters)")
        sets["_long"] = conv.make_conversations(d.long_eval_size, turns=d.turns, seed=cfg.seed + 2, languages=d.languages, long_context_chars=d.long_context_chars)
    return train, sets


# --------------------------------------------------------------------------- embedded warm-up

# Breaking character, in each template language (phrasings the persona reward recognises).
AI_DISCLOSURE = {
    "en": "As an AI language model, I have no real life.",
    "de": "Als KI habe ich kein echtes Leben.",
    "fr": "En tant qu'IA, je n'ai pas de vraie vie.",
    "es": "Como IA, no tengo una vida real.",
    "zh": "作为人工智能，我没有真正的生活。",
}
FLAWS = ("language", "rules", "persona")


def template_reply(row: dict, flaws: set[str], rng: random.Random) -> str:
    """The final reply of a generated conversation, with some typical failures: ``language``
    (answers in the previous turn's language, or another one), ``rules`` (forgets the rules of
    the first turn), ``persona`` (breaks character). No flaws gives the row's reference."""
    from rewards.persona import parse_persona

    card = parse_persona(row["persona"])
    language = row["language"]
    question = row["prompt"][-1]["content"]
    kind = next(k for k, by in conv.QUESTIONS.items() if language in by and by[language][0] in question)
    rules = {c["type"]: c["value"] for c in row["constraints"]}
    if "language" in flaws:
        previous = row["turn_languages"][-2] if len(row["turn_languages"]) > 1 else None
        others = [code for code in conv.QUESTIONS[kind] if code != language]
        if others:
            language = previous if previous in others else rng.choice(others)
    facts = {**card.facts, "name": card.name}
    job = str(facts.get("job", ""))
    sentences = [conv.QUESTIONS[kind][language][1].format(
        name=card.name, age=facts.get("age", ""), city=facts.get("city", ""), job=job,
        article="an" if job[:1].lower() in "aeiou" else "a",
    )]
    forget = "rules" in flaws
    if "required_keywords" in rules and not forget:
        sentences.append(conv.KEYWORD_SENTENCE[language].format(kw=rules["required_keywords"]))
    if "persona" in flaws:
        sentences.insert(0, AI_DISCLOSURE[language])
    text = ("" if language == "zh" else " ").join(sentences)
    if "ends_with" in rules and not forget:
        text += " " + rules["ends_with"]
    if "all_lowercase" in rules and not forget:
        text = text.lower()
    return text


CONVERSATION_MERGES = 1000
TOKENIZER_VERSION = 1


def policy_tokenizer(cfg: Config):
    """The embedded policy's tokenizer. 'conversations': the embedded byte-level BPE (Qwen's special
    tokens and chat template) with merges learned from generated conversations of a seed range
    of their own, so template words are single tokens and a prompt is ~3x shorter than in bytes."""
    name = cfg.policy.tokenizer
    if name != "conversations":
        return load_tokenizer(name)
    from posttrain.models.tokenizer import build_embedded_tokenizer

    key = json.dumps({"v": TOKENIZER_VERSION, "merges": CONVERSATION_MERGES, "languages": cfg.data.languages}, sort_keys=True)
    path = os.path.join(hub.cache_root(), "tokenizers", f"conversations-{hashlib.sha1(key.encode()).hexdigest()[:10]}")
    if not os.path.exists(os.path.join(path, "tokenizer.json")):
        rows = conv.make_conversations(1500, turns=3, seed=50_000, languages=cfg.data.languages)
        rows += conv.make_conversations(200, turns=3, seed=50_001, languages=cfg.data.languages, long_context_chars=2000)
        corpus = [m["content"] for r in rows for m in r["prompt"]] + [r["reference"] for r in rows] + list(AI_DISCLOSURE.values())
        tmp = f"{path}.tmp-{os.getpid()}"
        build_embedded_tokenizer(corpus, CONVERSATION_MERGES).save_pretrained(tmp)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            os.rename(tmp, path)
        except OSError:  # built concurrently by another process
            shutil.rmtree(tmp, ignore_errors=True)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, local_files_only=True)


def embedded_warmup(cfg: Config) -> str:
    """Folder of the embedded policy after its SFT warm-up on flawed template replies: trained
    on first use, cached under the posttrain cache, keyed by everything that shapes it."""
    w, d = cfg.warmup, cfg.data
    key = json.dumps(
        {"v": WARMUP_VERSION, "tok": cfg.policy.tokenizer, "tok_v": [TOKENIZER_VERSION, CONVERSATION_MERGES], "spec": asdict(cfg.policy.size), "steps": w.steps,
         "bs": w.batch_size, "lr": w.lr, "flaw_rate": w.flaw_rate, "turns": d.turns, "languages": d.languages, "seed": cfg.seed},
        sort_keys=True,
    )
    path = os.path.join(hub.cache_root(), "interaction", f"warmup-{hashlib.sha1(key.encode()).hexdigest()[:10]}")
    if os.path.exists(os.path.join(path, "warmup.json")):
        return path
    tokenizer = policy_tokenizer(cfg)
    model = build_tiny_thinker(tokenizer, cfg.policy.size, seed=cfg.seed)
    if w.steps:
        # Conversations of their own seed range: the warm-up never sees a held-out conversation.
        rows = conv.make_conversations(w.steps * w.batch_size // 4 + 1, turns=d.turns, seed=cfg.seed + 1000, languages=d.languages)
        rng = random.Random(f"warmup-{cfg.seed}")
        optimizer = make_optimizer(model, w.lr)
        scheduler = make_scheduler(optimizer, warmup_steps=min(20, w.steps // 10), total_steps=w.steps)
        model.train()
        bar = tqdm(range(w.steps), desc="warming up the embedded policy (cached after this)", leave=False, mininterval=1.0)
        for _ in bar:
            batch_rows = [rows[rng.randrange(len(rows))] for _ in range(w.batch_size)]
            replies = [template_reply(r, {f for f in FLAWS if rng.random() < w.flaw_rate}, rng) for r in batch_rows]
            batch = collate([encode_prompt(tokenizer, r["prompt"]) for r in batch_rows], [encode_response(tokenizer, x) for x in replies], tokenizer.pad_token_id)
            loss = masked_mean(token_nll(logits_of(model, batch), batch["targets"]), batch["response_mask"])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
        bar.close()
    model.eval()
    tmp = f"{path}.tmp-{os.getpid()}"
    save_model(model, tokenizer, tmp)
    with open(os.path.join(tmp, "warmup.json"), "w") as fh:
        json.dump({"config": json.loads(key)}, fh, indent=2)
    try:
        os.rename(tmp, path)
    except OSError:  # built concurrently by another process
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"built the embedded policy: {w.steps} SFT steps on template replies (flaw rate {w.flaw_rate}) -> {path}", flush=True)
    return path


#: LoRA targets: the text decoder's attention projections (not the audio encoder's).
LORA_TARGETS = r"(?!.*audio_tower).*layers\.\d+\.self_attn\.(q|k|v|o)_proj"


def add_policy_lora(policy, rank: int):
    """The policy wrapped in a peft LoRA adapter (rank ``rank``, alpha 2 x rank): only the
    adapter trains, and ``rollout.sync=lora`` sends only it to the engines."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(policy, LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=LORA_TARGETS))
    if not any("lora_" in n for n, _ in model.named_parameters()):
        raise ConfigError("config key 'policy.lora_rank': the policy has no attention projections named q_proj/k_proj/v_proj/o_proj to adapt")
    return model


def load_policy(cfg: Config):
    if cfg.policy.path == "embedded":
        return load_language_model(embedded_warmup(cfg), "embedded policy")
    return load_language_model(cfg.policy.path, "policy")


# --------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(engine, tokenizer, sets: dict[str, list[dict]], cfg: Config, rewards: RewardSet) -> dict[str, float]:
    """Mean reward (combined and per plugin) of sampled replies on each held-out set; the
    sampling seed is fixed, so two evaluations differ only by the weights."""
    metrics = {}
    sampling = SamplingParams(cfg.gspo.max_completion_length, temperature=cfg.eval.temperature, top_p=cfg.gspo.top_p)
    for suffix, rows in sets.items():
        rows = [r for r in rows for _ in range(cfg.eval.samples)]
        requests = [GenerationRequest(encode_prompt(tokenizer, r["prompt"]), sampling, i) for i, r in enumerate(rows)]
        replies = [c.text for c in engine.generate(requests, seed=cfg.seed + 7919)]
        keys = sorted({k for r in rows for k in r} - {"prompt"})
        columns = {k: [r.get(k) for r in rows] for k in keys}
        combined, per_reward = rewards.score([r["prompt"] for r in rows], replies, **columns)
        for name, values in [("combined", combined)] + list(per_reward.items()):
            scored = [v for v in values if v is not None]
            metrics[f"reward/{name}{suffix}"] = sum(scored) / len(scored) if scored else None
    return metrics


def mean_chars(rows: list[dict]) -> float:
    return sum(sum(len(m["content"]) for m in r["prompt"]) for r in rows) / max(1, len(rows))


def as_curve(metrics: dict) -> dict:
    """Held-out metrics under their own plot family (``reward/*`` in metrics.jsonl are the
    training batches' rewards)."""
    return {"held_out/" + k.split("/", 1)[1]: v for k, v in metrics.items()}


def make_rollout(cfg: Config, policy, tokenizer):
    """(rollout engine, reward pool or None) as ``cfg.rollout`` asks."""
    r = cfg.rollout
    if not r.engines:
        engine = HFEngine(policy, tokenizer)
    else:
        from posttrain.rollout.pool import EngineSpec, RolloutPool

        path = embedded_warmup(cfg) if cfg.policy.path == "embedded" else cfg.policy.path
        kwargs = {"model_path": path, "tensor_parallel_size": r.tensor_parallel} if r.kind == "vllm" else {}
        spec = EngineSpec(r.kind, path, num_cpus=r.engine_cpus, num_gpus=r.engine_gpus, kwargs=kwargs)
        engine = RolloutPool(spec, num_engines=r.engines, address=r.ray_address, timeout_s=r.timeout_s,
                             num_cpus=max(2, r.engines + r.reward_workers))
        print(f"rollout: a Ray pool of {r.engines} {r.kind} engines" + (", one step off" if r.one_step_off else ""), flush=True)
    reward_pool = None
    if r.reward_workers:
        from posttrain.rollout.reward_pool import RewardPool

        reward_pool = RewardPool(cfg.rewards, num_workers=r.reward_workers, address=r.ray_address, num_cpus=0.5)
    return engine, reward_pool


# --------------------------------------------------------------------------- the recipe


def run(cfg: Config) -> RunResult:
    quiet_libraries()
    from datasets import Dataset
    from trl import GRPOConfig
    from transformers import PrinterCallback, ProgressCallback

    from posttrain.trainers import AtomicCheckpointCallback, EngineGRPOTrainer, RunDirCallback, trl_reward_functions

    # 1. Data, rewards and model paths are checked before anything is written.
    train_rows, held_out = load_data(cfg)
    rewards = RewardSet(cfg.rewards)
    deepspeed = deepspeed_config(cfg.deepspeed)  # None = the plain backend; refused on CPU
    if cfg.policy.path != "embedded":
        hub.resolve(cfg.policy.path, f"policy.path ({cfg.policy.path})")
    run_dir = Run(RECIPE, cfg)
    torch.manual_seed(cfg.seed)
    print(f"{RECIPE}: run directory {run_dir.path}", flush=True)
    for suffix, rows in held_out.items():
        write_jsonl(run_dir.file("data", f"held_out{suffix}.jsonl"), rows)

    # 2. The policy, and the rollout engine that samples from it: in-process (colocated: it holds
    #    the same model object, so a weight update only advances its version) or a Ray pool of
    #    engines, each loading the starting weights and then receiving every update.
    policy, tokenizer = load_policy(cfg)
    set_trainable(policy, cfg.policy.train)
    if cfg.policy.lora_rank:
        policy = add_policy_lora(policy, cfg.policy.lora_rank)
    engine, reward_pool = make_rollout(cfg, policy, tokenizer)
    print(
        f"policy: {sum(p.numel() for p in policy.parameters()) / 1e6:.2f}M parameters; {len(train_rows)} training conversations "
        f"(~{mean_chars(train_rows):.0f} characters); held-out: "
        + ", ".join(f"{len(rows)}{' long' if s else ''} (~{mean_chars(rows):.0f} characters)" for s, rows in held_out.items())
        + f"; rewards: {', '.join(f'{rewards.label(s)} x{s.weight:g}' for s in rewards.specs)}",
        flush=True,
    )

    # 3. Before: held-out rewards of the starting policy (kept, so a resumed run reuses them).
    checkpoint = run_dir.latest_checkpoint()
    before = run_dir.load_json("before.json")
    if before is None:
        before = evaluate(engine, tokenizer, held_out, cfg, rewards)
        run_dir.save_json("before.json", before)
        run_dir.log(0, as_curve(before))
    print("before: " + ", ".join(f"{k} {v:.3f}" for k, v in before.items() if v is not None), flush=True)

    # 4. GSPO: TRL's GRPOTrainer with a sequence-level ratio; completions from our engine,
    #    rewards from the plugins (TRL combines them with the configured weights).
    g = cfg.gspo
    reward_funcs, reward_weights = trl_reward_functions(rewards)
    staging = os.path.join(run_dir.checkpoints, ".trainer")
    shutil.rmtree(staging, ignore_errors=True)  # a checkpoint the Trainer left half-written
    args = GRPOConfig(
        output_dir=staging,
        importance_sampling_level=g.importance_sampling_level,
        loss_type=g.loss_type,
        beta=g.beta,
        epsilon=g.epsilon,
        epsilon_high=g.epsilon_high,
        num_generations=g.num_generations,
        per_device_train_batch_size=g.batch_size,
        steps_per_generation=g.steps_per_generation,
        gradient_accumulation_steps=1,
        num_iterations=g.num_iterations,
        scale_rewards=g.scale_rewards,
        reward_weights=reward_weights,
        temperature=g.temperature,
        top_p=g.top_p,
        top_k=0,
        max_completion_length=g.max_completion_length,
        max_steps=cfg.max_steps,
        max_grad_norm=cfg.optim.grad_clip or None,
        seed=cfg.seed,
        logging_steps=cfg.log_every,
        save_strategy="steps" if cfg.save_every else "no",
        save_steps=cfg.save_every or 1,
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        disable_tqdm=True,
        shuffle_dataset=True,
        deepspeed=deepspeed,
    )
    optimizer = make_optimizer(policy, cfg.optim.lr, cfg.optim.weight_decay)
    scheduler = make_scheduler(optimizer, cfg.optim.warmup_steps, cfg.max_steps, cfg.optim.schedule)
    columns = sorted({k for r in train_rows for k in r})  # every row gets every column (None where missing)
    def evaluate_now(step: int) -> dict:
        with trainer.full_weights():  # (all weights gathered under ZeRO-3; else a no-op)
            return as_curve(evaluate(engine, tokenizer, held_out, cfg, rewards))

    trainer = EngineGRPOTrainer(
        model=policy,
        engine=engine,
        sync=cfg.rollout.sync,
        one_step_off=cfg.rollout.one_step_off,
        reward_pool=reward_pool,
        reward_funcs=reward_funcs,
        args=args,
        train_dataset=Dataset.from_list([{k: r.get(k) for k in columns} for r in train_rows]),
        processing_class=tokenizer,
        optimizers=(optimizer, scheduler),
        callbacks=[
            RunDirCallback(run_dir, RECIPE, evaluate_now, cfg.eval.every),
            AtomicCheckpointCallback(run_dir.checkpoints, keep=cfg.keep_checkpoints),
        ],
    )
    trainer.remove_callback(ProgressCallback)  # RunDirCallback shows the one progress bar
    trainer.remove_callback(PrinterCallback)
    if checkpoint:
        run_dir.rewind(int(os.path.basename(checkpoint).split("-")[1]))
        print(f"resuming from {checkpoint}", flush=True)
    try:
        # The controller: TRL's loop generates (engine), scores (rewards), trains and, after
        # every optimiser step, syncs the weights to the engine (EngineGRPOTrainer).
        if cfg.max_steps:  # (max_steps=0 would make the Trainer count epochs instead)
            trainer.train(resume_from_checkpoint=checkpoint)
        shutil.rmtree(staging, ignore_errors=True)

        # 5. After: the same held-out sets, the same sampling seed; save the model; summarise.
        with trainer.full_weights():
            after = evaluate(engine, tokenizer, held_out, cfg, rewards)
            # a LoRA policy is saved merged: the next stage reads a plain model folder
            save_model(policy.merge_and_unload() if cfg.policy.lora_rank else policy, tokenizer, run_dir.file("model"))
    finally:
        engine.close()
        if reward_pool is not None:
            reward_pool.close()
    run_dir.log(cfg.max_steps, as_curve(after))
    targets = {k: (before.get(k), after[k], "higher") for k in after}
    return run_dir.finish(targets)
