"""Talker preference optimisation: DPO on codec-token sequences, pairs ranked by rule-based rewards on the decoded speech.

For each (text, voice) prompt the Talker samples ``pairs.candidates`` utterances through the
speech rollout engine (ARIA constraint on), Code2Wav decodes them, and the configured
rewards (default ``wer`` + ``prosody``) score what a listener hears. The best and the worst
candidate form a pair when their reward differs by at least ``pairs.margin``. DPO then raises
the chosen sequence's log-probability relative to a frozen reference and lowers the
rejected one's. A sequence's log-probability is that of every decision the Talker made:
codebook-0 tokens, READs and EOS under the ARIA masks (READs the rule forced count as
certain) plus, weighted by ``dpo.code_predictor_weight``, the code predictor's residual
codebooks. By default (``pairs.sample_residual_codes=false``) the candidates take the code
predictor's most likely residual codes, so they differ only in the Talker's own decisions, and
the residual codes stay out of the score (weight 0): sampled ones are noise there (measured:
held-out accuracy 0.538 with them, 0.667 without, on the same pairs).

Pairs are saved in the run directory (``data/pairs_train.jsonl``, ``data/pairs_eval.jsonl``;
``data_tools/build_preference_pairs`` makes them on their own) and can be reused with
``pairs.path``. TRL's DPOTrainer expects token-id prompts and completions; the Talker's
sequences interleave text embeddings and multi-codebook frames, so the loop is ours and the
loss is `posttrain.losses.dpo_loss` (TRL's sigmoid loss, tested against a hand computation).

Target metrics: ``preference_accuracy`` on held-out pairs (the share whose implicit reward
ranks chosen above rejected; ties count half, so the start is 0.5) and ``wer`` (the Talker
speaking held-out sentences, greedy, heard by the real ASR), plus ``f0_range``.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from posttrain.checkpoint import save_checkpoint
from posttrain.config import RewardConfig, RunConfig, option
from posttrain.data.preference_pairs import build_pairs, load_pairs, save_pairs
from posttrain.errors import ConfigError, DataError
from posttrain.eval_tts import format_summary, write_report
from posttrain.logging import Run, RunResult, format_metrics, quiet_libraries
from posttrain.losses import dpo_loss
from posttrain.registry import RewardSet
from posttrain.rollout.speech import TalkerEngine
from posttrain.talker import candidate_logps, candidate_logps_chunked, load_bundle, speak_all, voice_reference_embeddings
from posttrain.training import make_optimizer, make_scheduler
from recipes._talker_stage import OptimConfig, TalkerPolicyConfig, optimizer_step, frozen_copy, make_trainable, resolve_talker, split_held_out, training_prompts

RECIPE = "talker_dpo"


@dataclass
class PairsConfig:
    path: str = option("", "reuse saved pairs (jsonl from a previous run or data_tools/build_preference_pairs); empty = sample them now")
    eval_path: str = option("", "held-out pairs (jsonl); empty = sample them from held-out sentences")
    train_prompts: int = option(96, "prompts (sentence, voice) sampled for training pairs", min=1)
    eval_prompts: int = option(40, "held-out prompts for held-out pairs", min=1)
    candidates: int = option(4, "candidates sampled per prompt (chosen = best, rejected = worst)", min=2)
    temperature: float = option(0.5, "sampling temperature of the candidates", min=0.01)
    margin: float = option(0.1, "keep a pair only when best - worst reward >= margin", min=0.0)
    sample_residual_codes: bool = option(True, "sample the code predictor's codebooks 1..G-1 too; off: they are its most likely codes, so the "
                                         "candidates of a prompt differ only in codebook 0, READ and EOS (then set dpo.code_predictor_weight=0)")


@dataclass
class DPOConfig:
    beta: float = option(0.1, "DPO beta (strength of the pull to the reference)", min=0.0)
    label_smoothing: float = option(0.0, "conservative DPO: assumed rate of flipped preferences", min=0.0, max=0.5)
    batch_size: int = option(8, "pairs per optimiser step", min=1)
    code_predictor_weight: float = option(1.0, "weight of the residual codebooks' log-probs in a sequence's log-prob", min=0.0)
    sft_weight: float = option(0.0, "add this x the chosen sequences' NLL per token (RPO-style anchor)", min=0.0)


@dataclass
class EvalConfig:
    sentences: int = option(20, "held-out sentences spoken greedily for the WER (from the Talker's held-out set)", min=1)


def _default_rewards() -> list[RewardConfig]:
    return [RewardConfig("wer", 1.0, {"transform": "1-wer"}), RewardConfig("prosody", 0.5)]


@dataclass
class Config(RunConfig):
    policy: TalkerPolicyConfig = option(default_factory=TalkerPolicyConfig, help="the Talker to align")
    pairs: PairsConfig = option(default_factory=PairsConfig, help="preference pairs")
    dpo: DPOConfig = option(default_factory=DPOConfig, help="DPO loss")
    eval: EvalConfig = option(default_factory=EvalConfig, help="held-out evaluation")
    optim: OptimConfig = option(default_factory=OptimConfig, help="optimiser")
    rewards: list[RewardConfig] = option(default_factory=_default_rewards, help="rewards that rank candidates [{name, weight, params}]")
    rollout_batch: int = option(32, "utterances generated together", min=1)

    def validate(self) -> None:
        if not self.rewards:
            raise ConfigError("config key 'rewards': give at least one reward plugin to rank candidates, e.g. rewards=[{name: wer}]")
        self.policy.check()
        if not self.pairs.sample_residual_codes and self.dpo.code_predictor_weight > 0:
            raise ConfigError("config key 'dpo.code_predictor_weight': the residual codes are not sampled (pairs.sample_residual_codes=false), "
                              "so they are not a choice the pairs compare; set dpo.code_predictor_weight=0 or pairs.sample_residual_codes=true")
        for key in ("path", "eval_path"):
            value = getattr(self.pairs, key)
            if value and not os.path.exists(value):
                raise ConfigError(f"config key 'pairs.{key}': {value!r} does not exist")


# --------------------------------------------------------------------------- pieces


def pair_batch_logps(bundle, pairs, cfg, with_grad: bool):
    candidates = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    voices = [p.voice for p in pairs] * 2
    with torch.set_grad_enabled(with_grad):
        lp = candidate_logps(bundle, candidates, voices, code_predictor_weight=cfg.dpo.code_predictor_weight)
    n = len(pairs)
    return lp["total"][:n], lp["total"][n:], lp["tokens"][:n]


@torch.no_grad()
def pair_logps(bundle, pairs, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) summed log-probs of every pair, without gradients."""
    lp = candidate_logps_chunked(bundle, [p.chosen for p in pairs] + [p.rejected for p in pairs], [p.voice for p in pairs] * 2,
                                 code_predictor_weight=cfg.dpo.code_predictor_weight)["total"]
    return lp[: len(pairs)], lp[len(pairs) :]


@torch.no_grad()
def preference_accuracy(policy, reference_logps, pairs, cfg) -> dict:
    """Share of pairs whose implicit reward ranks chosen above rejected (ties count half), and
    whether the policy's per-token likelihood alone already prefers the chosen."""
    if not pairs:
        return {"preference_accuracy": None, "likelihood_preference": None}
    pc, pr = pair_logps(policy, pairs, cfg)
    margin = (pc - reference_logps[0]) - (pr - reference_logps[1])
    right = float((margin > 1e-6).sum()) + 0.5 * float((margin.abs() <= 1e-6).sum())
    lengths_c = torch.tensor([p.chosen.codes.shape[1] + len(p.chosen.stream) for p in pairs], dtype=torch.float)
    lengths_r = torch.tensor([p.rejected.codes.shape[1] + len(p.rejected.stream) for p in pairs], dtype=torch.float)
    likely = float((pc / lengths_c > pr / lengths_r).sum())
    return {"preference_accuracy": right / len(pairs), "likelihood_preference": likely / len(pairs)}


# --------------------------------------------------------------------------- the recipe


def run(cfg: Config) -> RunResult:
    quiet_libraries()
    torch.manual_seed(cfg.seed)
    rewards = RewardSet(cfg.rewards)
    talker_dir = resolve_talker(cfg.policy.path, cfg.policy.pretrain_steps, cfg.seed, cfg.policy.pretrain_style)
    bundle = load_bundle(talker_dir)
    run_dir = Run(RECIPE, cfg)
    print(f"{RECIPE}: run directory {run_dir.path}; start: {talker_dir}", flush=True)

    reference = frozen_copy(bundle)  # the DPO reference, and the sampler of the pairs
    talker = make_trainable(bundle, code_predictor=cfg.policy.train == "talker")

    wer_sentences, eval_prompts = split_held_out(bundle, cfg.eval.sentences, cfg.pairs.eval_prompts)
    references = voice_reference_embeddings(bundle.voices) or None
    sampler = TalkerEngine(reference, share_weights=True, batch_size=cfg.rollout_batch)
    engine = TalkerEngine(bundle, share_weights=True, batch_size=cfg.rollout_batch)

    # 1. Pairs: sampled from the starting Talker (offline DPO), or loaded.
    pairs_dir = run_dir.file("data")
    code_t = None if cfg.pairs.sample_residual_codes else 0.0  # the residual codes: sampled, or the code predictor's most likely
    os.makedirs(pairs_dir, exist_ok=True)
    if cfg.pairs.path:
        train_pairs = load_pairs(cfg.pairs.path, bundle.voices)
        print(f"loaded {len(train_pairs)} training pairs from {cfg.pairs.path}", flush=True)
    elif os.path.exists(os.path.join(pairs_dir, "pairs_train.jsonl")):
        train_pairs = load_pairs(os.path.join(pairs_dir, "pairs_train.jsonl"))
    else:
        prompts = training_prompts(bundle, cfg.pairs.train_prompts, cfg.seed, salt=RECIPE)
        train_pairs, stats = build_pairs(sampler, rewards, prompts, cfg.pairs.candidates, cfg.pairs.temperature, cfg.pairs.margin, seed=cfg.seed,
                                         code_temperature=code_t)
        save_pairs(os.path.join(pairs_dir, "pairs_train.jsonl"), train_pairs)
        print(f"training pairs: {stats['pairs']} of {stats['prompts']} prompts ({stats['candidates']} candidates); "
              f"mean best reward {stats['best_reward']:.3f}, worst {stats['worst_reward']:.3f}, kept margin {stats['mean_margin']:.3f}", flush=True)
    if cfg.pairs.eval_path:
        eval_pairs = load_pairs(cfg.pairs.eval_path, bundle.voices)
    elif os.path.exists(os.path.join(pairs_dir, "pairs_eval.jsonl")):
        eval_pairs = load_pairs(os.path.join(pairs_dir, "pairs_eval.jsonl"))
    else:
        eval_pairs, stats = build_pairs(sampler, rewards, eval_prompts, cfg.pairs.candidates, cfg.pairs.temperature, cfg.pairs.margin, seed=cfg.seed + 10_000,
                                        code_temperature=code_t)
        save_pairs(os.path.join(pairs_dir, "pairs_eval.jsonl"), eval_pairs)
        print(f"held-out pairs: {stats['pairs']} of {stats['prompts']} held-out prompts", flush=True)
    if not train_pairs:
        raise DataError(f"no training pairs: no prompt's candidates differed by pairs.margin={cfg.pairs.margin}; lower the margin, raise pairs.candidates or pairs.temperature")

    ref_train = pair_logps(reference, train_pairs, cfg)
    ref_eval = pair_logps(reference, eval_pairs, cfg)

    # 2. Before.
    optimizer = make_optimizer(talker, cfg.optim.lr)
    scheduler = make_scheduler(optimizer, cfg.optim.warmup_steps, cfg.max_steps)
    start_step = run_dir.resume({"talker": talker}, optimizer, scheduler)
    before = run_dir.load_json("before.json")
    if before is None:
        _, speech, _ = speak_all(engine, wer_sentences, references)
        before = {**preference_accuracy(bundle, ref_eval, eval_pairs, cfg), **speech}
        run_dir.save_json("before.json", before)
    print("before: " + format_metrics({k: before[k] for k in ("preference_accuracy", "likelihood_preference", "wer", "f0_range")}), flush=True)

    # 3. DPO.
    talker.train()
    bar = tqdm(range(start_step, cfg.max_steps), desc=RECIPE, initial=start_step, total=cfg.max_steps, mininterval=1.0)
    per_epoch = max(1, len(train_pairs) // cfg.dpo.batch_size)
    for step in bar:
        epoch, k = divmod(step, per_epoch)
        order = list(range(len(train_pairs)))
        random.Random(f"{cfg.seed}-{epoch}").shuffle(order)
        idx = order[k * cfg.dpo.batch_size : (k + 1) * cfg.dpo.batch_size] or order[: cfg.dpo.batch_size]
        batch = [train_pairs[i] for i in idx]
        pc, pr, tokens = pair_batch_logps(bundle, batch, cfg, with_grad=True)
        rc, rr = ref_train[0][idx], ref_train[1][idx]
        loss, chosen_r, rejected_r = dpo_loss(pc, pr, rc, rr, beta=cfg.dpo.beta, label_smoothing=cfg.dpo.label_smoothing)
        if cfg.dpo.sft_weight:
            loss = loss + cfg.dpo.sft_weight * (-(pc / tokens.clamp_min(1))).mean()
        optimizer_step(loss, talker.parameters(), optimizer, scheduler, cfg.optim.grad_clip)
        accuracy = float((chosen_r > rejected_r).float().mean())
        bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{accuracy:.2f}", refresh=False)
        done = step + 1
        if done % cfg.log_every == 0 or done == cfg.max_steps:
            run_dir.log(done, {"loss": loss.item(), "train/preference_accuracy": accuracy,
                               "train/margin": float((chosen_r - rejected_r).mean()), "train/chosen_reward": float(chosen_r.mean()),
                               "train/rejected_reward": float(rejected_r.mean())})
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps:
            save_checkpoint(run_dir.checkpoints, done, {"talker": talker}, optimizer, scheduler, keep=cfg.keep_checkpoints)
    bar.close()

    # 4. After.
    talker.eval()
    rows, speech, samples = speak_all(engine, wer_sentences, references)
    write_report(run_dir.file("eval"), rows, speech, samples)
    print("eval: " + format_summary(speech), flush=True)
    after = {**preference_accuracy(bundle, ref_eval, eval_pairs, cfg), **speech}
    run_dir.log(cfg.max_steps, {f"held_out/{k}": v for k, v in after.items() if isinstance(v, float)})
    save_checkpoint(run_dir.checkpoints, cfg.max_steps, {"talker": talker}, optimizer, scheduler, keep=cfg.keep_checkpoints)
    bundle.save(run_dir.file("talker"))
    targets = {
        "preference_accuracy": (before["preference_accuracy"], after["preference_accuracy"], "higher"),
        "wer": (before["wer"], after["wer"], "lower"),
        "f0_range": (before["f0_range"], after["f0_range"], "higher"),
        "likelihood_preference": (before["likelihood_preference"], after["likelihood_preference"], "higher"),
    }
    return run_dir.finish(targets, extra={"pairs": {"train": len(train_pairs), "eval": len(eval_pairs)}, "start": talker_dir, "eval": speech})
