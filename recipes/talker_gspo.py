"""Talker RL: GSPO over spoken rollouts with WER, prosody and speaker rewards measured on the decoded waveform.

Each rollout batch, the Talker speaks ``gspo.prompts_per_step`` sentences ``gspo.num_generations``
times through the speech rollout engine (ARIA constraint on), sampling its own decisions
(codebook 0, READ, EOS) at ``gspo.temperature``; by default the frozen code predictor picks its
most likely residual codes, so that utterances of a group differ only in decisions the ratio
scores (``gspo.sample_residual_codes=true`` samples them too and puts them in the ratio); the codec decodes them and the
weighted reward plugins score what a listener hears: ``wer`` (the packaged ASR, greedy at
temperature 0), ``prosody`` (F0 range, speaking rate, pauses; Praat) and
``speaker_similarity`` (Resemblyzer, to the intended voice's reference). GSPO (Zheng et al.
2025) then optimises one importance ratio per utterance, the geometric mean of its per-decision
ratios (codebook-0 tokens, READ/EOS under the ARIA masks, residual codebooks), clipped to
``[1 - gspo.epsilon, 1 + gspo.epsilon_high]``, with group-normalised advantages and no KL term
by default (``gspo.beta``: a sequence-level k3 estimate against the starting Talker).

WER-only speech RL is known to flatten prosody into monotone speech; the ``prosody`` reward
is there to stop that (see the README for the measured WER-only vs WER+prosody comparison).

Target metrics on held-out sentences spoken greedily: ``wer`` (lower), ``f0_range``
(semitones, higher) and ``speaker_similarity`` (higher). Per-reward curves go to
``metrics.jsonl`` and ``plots/``; example wavs of two held-out sentences at every evaluation
go to ``examples/step_N/``.
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from posttrain.checkpoint import save_checkpoint
from posttrain.config import RewardConfig, RunConfig, option
from posttrain.errors import ConfigError
from posttrain.eval_tts import format_summary, write_report
from posttrain.logging import Run, RunResult, format_metrics, quiet_libraries
from posttrain.losses import gspo_loss_from_log_ratio
from posttrain.registry import RewardSet
from posttrain.rollout.speech import SpeechRequest, TalkerEngine, score_completions
from posttrain.talker import candidate_logps, candidate_logps_chunked, load_bundle, speak_all, voice_reference_embeddings
from posttrain.training import make_optimizer, make_scheduler
from recipes._talker_stage import OptimConfig, TalkerPolicyConfig, optimizer_step, frozen_copy, make_trainable, resolve_talker, split_held_out, training_prompts

RECIPE = "talker_gspo"


@dataclass
class GSPOConfig:
    prompts_per_step: int = option(4, "sentences per rollout batch", min=1)
    num_generations: int = option(8, "utterances sampled per sentence (the group of the advantage)", min=2)
    steps_per_generation: int = option(1, "optimiser steps per rollout batch (mini-batches of whole groups)", min=1)
    temperature: float = option(0.3, "sampling temperature of the rollouts", min=0.01)
    epsilon: float = option(3e-4, "lower clipping range of the sequence ratio (GSPO paper: 3e-4)", min=0.0)
    epsilon_high: float = option(4e-4, "upper clipping range (GSPO paper: 4e-4)", min=0.0)
    beta: float = option(0.0, "KL penalty to the starting Talker (sequence-level k3 estimate); 0 = none", min=0.0)
    scale_rewards: bool = option(True, "divide advantages by the group's reward std")
    code_predictor_weight: float = option(0.0, "weight of the residual codebooks in a sequence's log-prob (> 0 only with gspo.sample_residual_codes)", min=0.0)
    sample_residual_codes: bool = option(False, "sample the code predictor's codebooks 1..G-1 too (at gspo.temperature); off: they are its most likely codes, so rollouts differ only in the decisions the ratio scores")


@dataclass
class EvalConfig:
    sentences: int = option(20, "held-out sentences spoken greedily (from the Talker's held-out set)", min=1)
    every: int = option(0, "evaluate (and save example wavs) every N optimiser steps; 0 = only before and after", min=0)
    examples: int = option(2, "example wavs saved per evaluation", min=0)


def _default_rewards() -> list[RewardConfig]:
    return [
        RewardConfig("wer", 1.0, {"transform": "1-wer"}),
        RewardConfig("prosody", 0.25),
        RewardConfig("speaker_similarity", 0.1),
    ]


@dataclass
class Config(RunConfig):
    policy: TalkerPolicyConfig = option(default_factory=TalkerPolicyConfig, help="the Talker to train")
    gspo: GSPOConfig = option(default_factory=GSPOConfig, help="GSPO")
    eval: EvalConfig = option(default_factory=EvalConfig, help="held-out evaluation")
    optim: OptimConfig = option(default_factory=OptimConfig, help="optimiser")
    rewards: list[RewardConfig] = option(default_factory=_default_rewards, help="weighted reward plugins on the decoded speech [{name, weight, params}]")
    rollout_batch: int = option(32, "utterances generated together", min=1)

    def validate(self) -> None:
        if not self.rewards:
            raise ConfigError("config key 'rewards': give at least one reward plugin, e.g. rewards=[{name: wer}]")
        self.policy.check()
        g = self.gspo
        if g.sample_residual_codes and g.code_predictor_weight == 0:
            raise ConfigError("config key 'gspo.code_predictor_weight': 0 while gspo.sample_residual_codes=true; the ratio would ignore sampled "
                              "decisions. Set gspo.code_predictor_weight=1 or gspo.sample_residual_codes=false")
        if not g.sample_residual_codes and g.code_predictor_weight > 0:
            raise ConfigError("config key 'gspo.code_predictor_weight': the residual codes are not sampled (gspo.sample_residual_codes=false), "
                              "so they have no probability in the ratio; set it to 0 or set gspo.sample_residual_codes=true")
        if self.max_steps % self.gspo.steps_per_generation:
            raise ConfigError(f"config key 'max_steps': {self.max_steps} is not a multiple of gspo.steps_per_generation={self.gspo.steps_per_generation}")


# --------------------------------------------------------------------------- pieces


def reference_files(folder: str, references: dict[str, np.ndarray]) -> dict[str, str]:
    """Each voice's reference embedding as a .npy file (speaker_similarity embeds files once)."""
    os.makedirs(folder, exist_ok=True)
    out = {}
    for voice, emb in references.items():
        path = os.path.join(folder, f"{voice.replace('/', '_')}.npy")
        np.save(path, emb)
        out[voice] = path
    return out


def rollout(engine, bundle, rewards, prompts, cfg, seed: int, ref_paths: dict[str, str]):
    """Spoken completions, their rewards and their log-probs under the sampling policy."""
    g = cfg.gspo.num_generations
    code_t = None if cfg.gspo.sample_residual_codes else 0.0
    requests = [SpeechRequest(t, v, cfg.gspo.temperature, request_id=(i, k), code_temperature=code_t)
                for i, (t, v) in enumerate(prompts) for k in range(g)]
    completions = engine.generate(requests, seed=seed)
    columns = {}
    if any(r.name == "speaker_similarity" for r in cfg.rewards) and ref_paths:
        columns["reference_audio"] = [ref_paths.get(c.voice) for c in completions]
    combined, per = score_completions(rewards, completions, **columns)
    # scored at the sampling temperature: the ratio's denominator is the policy that sampled
    old = candidate_logps_chunked(bundle, completions, [c.voice for c in completions], temperature=cfg.gspo.temperature,
                                  code_predictor_weight=cfg.gspo.code_predictor_weight)
    return {
        "completions": completions,
        "rewards": torch.tensor(combined, dtype=torch.float),
        "per_reward": per,
        "old_logps": old["total"],
        "tokens": old["tokens"].float(),
    }


def evaluate(engine, sentences, references, run_dir, step: int, examples: int):
    rows, summary, samples = speak_all(engine, sentences, references)
    if examples:
        from posttrain.audio.io import save_wav

        for i, s in enumerate(samples[:examples]):
            save_wav(run_dir.file("examples", f"step_{step}", f"{i:02d}.wav"), s.wav, s.sample_rate)
    return rows, summary, samples


# --------------------------------------------------------------------------- the recipe


def run(cfg: Config) -> RunResult:
    quiet_libraries()
    torch.manual_seed(cfg.seed)
    rewards = RewardSet(cfg.rewards)
    talker_dir = resolve_talker(cfg.policy.path, cfg.policy.pretrain_steps, cfg.seed, cfg.policy.pretrain_style)
    bundle = load_bundle(talker_dir)
    run_dir = Run(RECIPE, cfg)
    print(f"{RECIPE}: run directory {run_dir.path}; start: {talker_dir}", flush=True)

    reference = frozen_copy(bundle) if cfg.gspo.beta > 0 else None
    talker = make_trainable(bundle, code_predictor=cfg.policy.train == "talker")
    engine = TalkerEngine(bundle, share_weights=True, batch_size=cfg.rollout_batch)
    held_sentences, _ = split_held_out(bundle, cfg.eval.sentences)
    references = voice_reference_embeddings(bundle.voices) or None
    ref_paths = reference_files(run_dir.file("references"), references or {})

    optimizer = make_optimizer(talker, cfg.optim.lr)
    scheduler = make_scheduler(optimizer, cfg.optim.warmup_steps, cfg.max_steps, kind="constant")
    start_step = run_dir.resume({"talker": talker}, optimizer, scheduler)
    before = run_dir.load_json("before.json")
    if before is None:
        _, before, _ = evaluate(engine, held_sentences, references, run_dir, 0, cfg.eval.examples)
        run_dir.save_json("before.json", before)
        run_dir.log(0, {f"held_out/{k}": v for k, v in before.items() if isinstance(v, float)})
    print("before: " + format_metrics({k: before[k] for k in ("wer", "f0_range", "speaker_similarity")}), flush=True)

    all_prompts = training_prompts(bundle, 4096, cfg.seed, salt=RECIPE)
    spg = cfg.gspo.steps_per_generation
    g = cfg.gspo.num_generations
    bar = tqdm(range(start_step, cfg.max_steps), desc=RECIPE, initial=start_step, total=cfg.max_steps, mininterval=1.0)
    batch = None
    for step in bar:
        if step % spg == 0 or batch is None:
            r = step // spg
            rng = random.Random(f"{cfg.seed}-{r}")
            prompts = rng.sample(all_prompts, cfg.gspo.prompts_per_step)
            engine.update_weights(None, step)
            talker.eval()
            batch = rollout(engine, bundle, rewards, prompts, cfg, seed=cfg.seed * 100_003 + r, ref_paths=ref_paths)
            talker.train()
            metrics = {"reward/combined": float(batch["rewards"].mean())}
            metrics.update({f"reward/{k}": float(np.mean(v)) for k, v in batch["per_reward"].items()})
            metrics["rollout/frames"] = float(np.mean([c.frames for c in batch["completions"]]))
            metrics["rollout/ended"] = float(np.mean([c.ended for c in batch["completions"]]))
            rollout_metrics = metrics
            order = list(range(cfg.gspo.prompts_per_step))
            rng.shuffle(order)
        # one mini-batch of whole groups
        k = step % spg
        groups = order[k::spg]
        idx = [p * g + j for p in groups for j in range(g)]
        chunk = [batch["completions"][i] for i in idx]
        lp = candidate_logps(bundle, chunk, [c.voice for c in chunk], temperature=cfg.gspo.temperature,
                             code_predictor_weight=cfg.gspo.code_predictor_weight)
        tokens = batch["tokens"][idx].clamp_min(1.0)
        log_ratio = (lp["total"] - batch["old_logps"][idx]) / tokens
        loss = gspo_loss_from_log_ratio(log_ratio, batch["rewards"][idx], g, tokens > 0, cfg.gspo.epsilon, cfg.gspo.epsilon_high, cfg.gspo.scale_rewards)
        kl = torch.zeros(())
        if reference is not None:
            with torch.no_grad():
                ref_lp = candidate_logps(reference, chunk, [c.voice for c in chunk], temperature=cfg.gspo.temperature,
                                         code_predictor_weight=cfg.gspo.code_predictor_weight)["total"]
            d = (ref_lp - lp["total"]) / tokens
            kl = (torch.exp(d) - d - 1).mean()
            loss = loss + cfg.gspo.beta * kl
        optimizer_step(loss, talker.parameters(), optimizer, scheduler, cfg.optim.grad_clip)
        done = step + 1
        clipped = float(((log_ratio.exp() < 1 - cfg.gspo.epsilon) | (log_ratio.exp() > 1 + cfg.gspo.epsilon_high)).float().mean())
        bar.set_postfix(reward=f"{rollout_metrics['reward/combined']:.3f}", refresh=False)
        if done % cfg.log_every == 0 or done == cfg.max_steps or k == 0:
            run_dir.log(done, {**rollout_metrics, "loss": loss.item(), "clip_ratio": clipped, "kl": float(kl)})
        if cfg.eval.every and done % cfg.eval.every == 0 and done < cfg.max_steps:
            talker.eval()
            _, ev, _ = evaluate(engine, held_sentences, references, run_dir, done, cfg.eval.examples)
            talker.train()
            run_dir.log(done, {f"held_out/{k2}": v for k2, v in ev.items() if isinstance(v, float)})
        if cfg.save_every and done % cfg.save_every == 0 and done < cfg.max_steps and done % spg == 0:
            save_checkpoint(run_dir.checkpoints, done, {"talker": talker}, optimizer, scheduler, keep=cfg.keep_checkpoints)
    bar.close()

    talker.eval()
    rows, after, samples = evaluate(engine, held_sentences, references, run_dir, cfg.max_steps, cfg.eval.examples)
    write_report(run_dir.file("eval"), rows, after, samples)
    print("eval: " + format_summary(after), flush=True)
    run_dir.log(cfg.max_steps, {f"held_out/{k}": v for k, v in after.items() if isinstance(v, float)})
    save_checkpoint(run_dir.checkpoints, cfg.max_steps, {"talker": talker}, optimizer, scheduler, keep=cfg.keep_checkpoints)
    bundle.save(run_dir.file("talker"))
    targets = {
        "wer": (before["wer"], after["wer"], "lower"),
        "f0_range": (before["f0_range"], after["f0_range"], "higher"),
        "speaker_similarity": (before["speaker_similarity"], after["speaker_similarity"], "higher"),
    }
    f0_kept = after["f0_range"] / before["f0_range"] if before.get("f0_range") and after.get("f0_range") is not None else None
    return run_dir.finish(targets, extra={"start": talker_dir, "f0_range_kept": f0_kept, "eval": after,
                                          "rewards": [{"name": r.name, "weight": r.weight, "params": r.params} for r in cfg.rewards]})
