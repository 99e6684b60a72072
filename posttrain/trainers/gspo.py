"""GSPO through TRL's GRPOTrainer, with completions from a posttrain rollout engine.

TRL's GRPOTrainer is GSPO (Zheng et al. 2025) when its importance ratio is one per sequence:
``GRPOConfig(importance_sampling_level="sequence", loss_type="grpo", beta=0, epsilon=3e-4,
epsilon_high=4e-4, steps_per_generation=4)`` is the setting TRL's paper index gives for the
paper (`GSPO_PAPER`). We keep all of TRL's algorithm (grouping, advantages, the clipped loss,
the optimiser step) and change one thing: where completions come from.

`EngineGRPOTrainer` overrides ``GRPOTrainer._generate_single_turn``, the one method that turns
tokenised prompts into completion token ids, so that completions come from a
`posttrain.rollout.RolloutEngine` (``engine.generate``) instead of ``model.generate`` or TRL's own
vLLM client. After every optimiser step the engine receives the new weights
(``engine.update_weights(state, version=global_step)``; ``state=None`` when the engine holds the
trainer's own model object), so every completion carries the weight version that produced it;
the staleness at generation time is logged (``rollout/staleness``, 0 = on-policy). The later
mini-batches of one rollout batch (``steps_per_generation > 1``) are off-policy by design: that
is what GSPO's clipped sequence ratio is for.

A Qwen-Omni Thinker also needs ``_get_per_token_logps_and_entropies``: TRL's fused LM head
runs ``model.base_model``, which for the Thinker is the Thinker itself (see the method).

Also here: reward plugins as TRL reward functions (`trl_reward_functions`) and the callbacks
that make a TRL run a posttrain run directory (`RunDirCallback`: metrics.jsonl, a progress
bar, evaluations; `AtomicCheckpointCallback`: checkpoints renamed into place when complete).
"""

from __future__ import annotations

import inspect
import os
import shutil
from typing import Callable

import torch
from transformers import TrainerCallback

from posttrain.registry import RewardSet, call_reward
from posttrain.rollout import GenerationRequest, RolloutEngine, SamplingParams

# TRL's paper-index configuration for GSPO (GSPO paper v2, section 5.1): sequence-level
# ratio, clipping range 3e-4 / 4e-4, no KL term, each rollout batch split into 4 mini-batches.
GSPO_PAPER = dict(
    importance_sampling_level="sequence",
    loss_type="grpo",
    beta=0.0,
    epsilon=3e-4,
    epsilon_high=4e-4,
    steps_per_generation=4,
    gradient_accumulation_steps=1,
)

# The keyword arguments TRL passes to reward functions besides the dataset columns.
_TRL_REWARD_EXTRAS = ("completion_ids", "trainer_state", "log_extra", "log_metric", "environments")


def _import_grpo_trainer():
    from trl import GRPOTrainer

    expected = ["self", "prompt_ids", "images", "multimodal_fields", "num_generations"]
    params = list(inspect.signature(GRPOTrainer._generate_single_turn).parameters)
    if params[: len(expected)] != expected:  # a TRL release that moved the generation hook
        raise ImportError(
            f"trl {__import__('trl').__version__}: GRPOTrainer._generate_single_turn{tuple(params)} is not the "
            f"hook posttrain overrides {tuple(expected)}; use the trl version pinned in pyproject.toml"
        )
    return GRPOTrainer


GRPOTrainer = _import_grpo_trainer()


class EngineGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer (GSPO with a sequence-level ratio) whose completions come from ``engine``."""

    def __init__(self, *args, engine: RolloutEngine, **kwargs):
        self.engine = engine
        super().__init__(*args, **kwargs)
        self.add_callback(_PushWeightsCallback(self))
        unsupported = {
            "use_vllm": self.args.use_vllm,
            "use_transformers_continuous_batching": self.args.use_transformers_continuous_batching,
            "min_p": self.args.min_p is not None,
            "repetition_penalty": self.args.repetition_penalty != 1.0,
            "generation_kwargs": bool(self.args.generation_kwargs),
            "tools": bool(self.tools),
        }
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"EngineGRPOTrainer generates with a posttrain rollout engine; unsupported GRPOConfig options: {', '.join(bad)}")

    def _engine_shares_model(self) -> bool:
        return getattr(self.engine, "model", None) is self.accelerator.unwrap_model(self.model)

    def sync_engine(self) -> None:
        """Push the current weights to the engine (version = global step), unless it has them."""
        version = self.state.global_step
        if self.engine.weight_version == version:
            return
        if self._engine_shares_model():
            state = None  # the engine holds this very model: the weights are already there
        else:
            model = self.accelerator.unwrap_model(self.model)
            state = {k: v.detach() for k, v in model.state_dict().items()}
        self.engine.update_weights(state, version)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        unwrapped = self.accelerator.unwrap_model(model)
        if unwrapped.base_model is not unwrapped or any(v is not None for v in multimodal.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss, **multimodal
            )
        # TRL's fused LM head runs `model.base_model` and then the head; a Qwen-Omni Thinker has no
        # such backbone (its base_model_prefix names the Thinker inside the full model, so
        # base_model is the Thinker itself, whose forward also computes the M-RoPE positions).
        # Score from its logits instead, chunk by chunk: the same log-probabilities.
        batch_size = batch_size or input_ids.size(0)
        logps, entropies, aux = [], [], []
        for start in range(0, input_ids.size(0), batch_size):
            ids, mask = input_ids[start:start + batch_size], attention_mask[start:start + batch_size]
            kwargs = {"output_router_logits": True} if compute_aux_loss else {}
            with self.accelerator.autocast():
                out = model(input_ids=ids, attention_mask=mask, use_cache=False, **kwargs)
            logits = out.logits[:, -logits_to_keep - 1:-1].float() / self.temperature
            logp = torch.log_softmax(logits, dim=-1)
            logps.append(logp.gather(-1, ids[:, -logits_to_keep:].unsqueeze(-1)).squeeze(-1))
            if compute_entropy:
                entropies.append(-(logp.exp() * logp).sum(-1))
            if compute_aux_loss:
                aux.append(out.aux_loss)
        return (
            torch.cat(logps),
            torch.cat(entropies) if compute_entropy else None,
            torch.stack(aux).mean() if compute_aux_loss else None,
        )

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        if images is not None or multimodal_fields:
            raise ValueError("EngineGRPOTrainer handles text prompts; audio/vision inputs go through the recipe's own engine requests")
        self.sync_engine()  # a no-op after a step's push; needed after a resume (fresh engine)
        sampling = SamplingParams(
            max_new_tokens=self.max_completion_length,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k or 0,
        )
        requests = [GenerationRequest(list(map(int, ids)), sampling, i) for i, ids in enumerate(prompt_ids)]
        # A seed per optimiser step: a resumed run samples what an uninterrupted one would.
        seed = self.args.seed * 1_000_003 + self.state.global_step
        completions = self.engine.generate(requests, seed=seed)
        mode = "train" if self.model.training else "eval"
        staleness = max(self.state.global_step - c.weight_version for c in completions)
        self._metrics[mode]["rollout/staleness"].append(float(staleness))
        return [list(c.token_ids) for c in completions], None


class _PushWeightsCallback(TrainerCallback):
    """Pushes the weights to the engine after every optimiser step."""

    def __init__(self, trainer: EngineGRPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        self.trainer.sync_engine()


# --------------------------------------------------------------------------- rewards


def trl_reward_functions(rewards: RewardSet) -> tuple[list[Callable], list[float]]:
    """The plugins of ``rewards`` as TRL reward functions (named by label, so TRL logs
    ``rewards/<label>/mean``), with weights normalised to sum |w| = 1 so TRL's ``reward``
    is the weighted mean `RewardSet.score` reports (TRL counts a ``None`` as 0 in that sum).
    Every call is validated like any posttrain reward call (wrong length, NaN, a raise -> a
    RewardError naming the plugin and the sample)."""
    functions, weights = [], []
    total = sum(abs(spec.weight) for spec in rewards.specs) or 1.0
    for spec in rewards.specs:
        label = rewards.label(spec)
        fn = rewards.functions[label]

        def reward(prompts, completions, _name=spec.name, _fn=fn, **kwargs):
            n = len(completions)
            columns = {
                k: v for k, v in kwargs.items()
                if k not in _TRL_REWARD_EXTRAS and isinstance(v, (list, tuple)) and len(v) == n
            }
            return call_reward(_name, _fn, prompts, completions, columns)

        reward.__name__ = label
        functions.append(reward)
        weights.append(spec.weight / total)
    return functions, weights


# --------------------------------------------------------------------------- run directory


def _rename(key: str) -> str | None:
    """TRL's log key -> the run directory's metric name (None: not kept)."""
    if key.startswith("rewards/") and key.endswith("/mean"):
        return "reward/" + key[len("rewards/"):-len("/mean")]
    renames = {
        "reward": "reward/combined",
        "reward_std": "reward_std",
        "loss": "loss",
        "learning_rate": "lr",
        "grad_norm": "grad_norm",
        "entropy": "entropy",
        "kl": "kl",
        "clip_ratio/region_mean": "clip_ratio/region",
        "clip_ratio/low_mean": "clip_ratio/low",
        "clip_ratio/high_mean": "clip_ratio/high",
        "completions/mean_length": "completion_length",
        "frac_reward_zero_std": "frac_reward_zero_std",
        "rollout/staleness": "rollout/staleness",
    }
    return renames.get(key)


class RunDirCallback(TrainerCallback):
    """Writes TRL's logs into a posttrain `Run` (metrics.jsonl), shows one progress bar, and runs
    ``evaluate(step) -> metrics`` every ``eval_every`` steps (not at the last step: the recipe
    evaluates after training)."""

    def __init__(self, run_dir, desc: str, evaluate: Callable[[int], dict] | None = None, eval_every: int = 0):
        self.run_dir = run_dir
        self.desc = desc
        self.evaluate = evaluate
        self.eval_every = eval_every
        self.bar = None

    def on_train_begin(self, args, state, control, **kwargs):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.desc, mininterval=1.0)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)
        step = state.global_step
        if self.evaluate and self.eval_every and step % self.eval_every == 0 and step < state.max_steps:
            metrics = self.evaluate(step)
            self.run_dir.log(step, metrics)
            (self.bar.write if self.bar is not None else print)(
                f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in metrics.items() if v is not None)
            )

    def on_log(self, args, state, control, logs=None, **kwargs):
        kept = {}
        for key, value in (logs or {}).items():
            name = _rename(key)
            if name is not None and isinstance(value, (int, float)):
                kept[name] = float(value)
        if kept:
            self.run_dir.log(state.global_step, kept)
            if self.bar is not None:
                post = {k: f"{kept[k]:.3f}" for k in ("reward/combined", "loss") if k in kept}
                self.bar.set_postfix(post, refresh=False)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class AtomicCheckpointCallback(TrainerCallback):
    """The Trainer writes ``checkpoint-N`` into a staging folder (``args.output_dir``); once it is
    complete this renames it to ``checkpoints/step-NNNNNN`` with a ``state.json`` (the marker
    `posttrain.checkpoint.list_checkpoints` looks for) and keeps the newest ``keep``."""

    def __init__(self, checkpoints: str, keep: int = 2):
        self.checkpoints = checkpoints
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        import json

        from posttrain.checkpoint import _fsync_dir, list_checkpoints

        src = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(src):
            return
        with open(os.path.join(src, "state.json"), "w", encoding="utf-8") as fh:
            json.dump({"step": state.global_step, "format": "transformers-trainer"}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        final = os.path.join(self.checkpoints, f"step-{state.global_step:06d}")
        if os.path.exists(final):  # a resumed run re-saving the same step
            shutil.rmtree(final)
        os.rename(src, final)
        _fsync_dir(self.checkpoints)
        for old in list_checkpoints(self.checkpoints)[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)

