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

**Rollout pool, reward workers, one-step-off.** The engine may be a Ray
`posttrain.rollout.pool.RolloutPool`; it then receives the full state dict or, with
``sync="lora"``, only the peft adapter (`weights_for_engine`), and the time spent is logged
(``rollout/sync_seconds``; in one-step-off mode the push does not wait for the engines' loads,
which queue behind the batch they are generating, so it is the time the trainer waited). ``reward_pool`` (a `posttrain.rollout.reward_pool.RewardPool`) scores
each rollout batch on reward workers instead of in-process. ``one_step_off=True`` overlaps
generation with training: the batch trained at step ``u`` is submitted at the start of step
``u - 1`` with the weights of version ``u - 1`` (the trainer looks one dataloader batch ahead),
so while the trainer scores and trains step ``u - 1`` the pool is already generating; the
staleness is exactly one version (``rollout/staleness`` = 1; the very first batch and the first
of each epoch, which cannot be seen ahead, are generated on the spot with staleness 0). The
importance correction: GSPO's ratio needs the behaviour policy in its denominator, so in this
mode ``old_per_token_logps`` are the engine-reported log-probs of the sampled tokens under the
weights that sampled them (`Completion.logprobs`, softmax(logits / T) over the vocabulary, as TRL
scores), not TRL's recomputation with the current weights; the sequence ratio is then
``exp(mean_t log pi_theta - log pi_behaviour)``, clipped as usual.

A Qwen-Omni Thinker also needs ``_get_per_token_logps_and_entropies``: TRL's fused LM head
runs ``model.base_model``, which for the Thinker is the Thinker itself (see the method).

Also here: reward plugins as TRL reward functions (`trl_reward_functions`) and the callbacks
that make a TRL run a posttrain run directory (`RunDirCallback`: metrics.jsonl, a progress
bar, evaluations; `AtomicCheckpointCallback`: checkpoints renamed into place when complete).
"""

from __future__ import annotations

import contextlib
import inspect
import os
from typing import Callable

import torch
from transformers import TrainerCallback

from posttrain.checkpoint import load_pretrained_into
from posttrain.faults import fault_point
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

    def __init__(self, *args, engine: RolloutEngine, sync: str = "full", one_step_off: bool = False,
                 reward_pool=None, **kwargs):
        self.engine = engine
        self.sync = sync
        self.one_step_off = one_step_off
        self.reward_pool = reward_pool
        self._pending = {}  # one-step-off: step -> (prompt ids, submitted batch) of the rollout batch it trains
        self._lookahead, self._lookahead_of, self._next_batch = [], None, None
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
        if one_step_off and self.args.gradient_accumulation_steps != 1:
            unsupported["gradient_accumulation_steps != 1 with one_step_off"] = True
        bad = [k for k, v in unsupported.items() if v]
        if bad:
            raise ValueError(f"EngineGRPOTrainer generates with a posttrain rollout engine; unsupported GRPOConfig options: {', '.join(bad)}")

    def _engine_shares_model(self) -> bool:
        return getattr(self.engine, "model", None) is self.accelerator.unwrap_model(self.model)

    def _zero3(self) -> bool:
        plugin = getattr(self.accelerator.state, "deepspeed_plugin", None)
        return bool(self.is_deepspeed_enabled and plugin is not None and plugin.zero_stage == 3)

    def full_weights(self):
        """A context in which the policy holds all of its weights. Under DeepSpeed ZeRO-3 each
        process keeps only a shard of every parameter; here they are gathered for the duration
        (TRL's ``unwrap_model_for_generation``), as generation by an in-process engine, held-out
        evaluation, a weight sync and saving need. Elsewhere a no-op."""
        if not self._zero3():
            return contextlib.nullcontext()
        from trl.models.utils import unwrap_model_for_generation

        return unwrap_model_for_generation(self.model_wrapped, self.accelerator, gather_deepspeed3_params=True)

    def sync_engine(self) -> None:
        """Push the current weights to the engine (version = global step), unless it has them."""
        version = self.state.global_step
        if self.engine.weight_version == version:
            return
        if self._engine_shares_model():
            state = None  # the engine holds this very model: the weights are already there
        else:
            from posttrain.rollout.pool import LoraUpdate, weights_for_engine

            with self.full_weights():
                state = weights_for_engine(self.accelerator.unwrap_model(self.model), self.sync)
                if self._zero3():  # the gathered tensors are released when the context ends: copy them
                    tensors = state.tensors if isinstance(state, LoraUpdate) else state
                    for k in tensors:
                        tensors[k] = tensors[k].clone()
        if self.one_step_off and hasattr(self.engine, "confirm_weights"):
            # a pool: queue the loads behind the batch the engines are generating, and go on
            # training; they are confirmed at the next push (the versions prove them meanwhile)
            self.engine.update_weights(state, version, wait=False)
        else:
            self.engine.update_weights(state, version)
        last = getattr(self.engine, "last_sync", None)
        if last:
            self._metrics["train"]["rollout/sync_seconds"].append(float(last["seconds"]))
            self._metrics["train"]["rollout/sync_mb"].append(float(last["bytes"]) / 1e6)

    # ------------------------------------------------------------------ one-step-off

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """The Trainer's next batches, keeping one more in hand (one-step-off submits it early)."""
        if not self.one_step_off:
            return super().get_batch_samples(epoch_iterator, num_batches, device)
        if self._lookahead_of is not epoch_iterator:  # a new epoch
            self._lookahead, self._lookahead_of = [], epoch_iterator
        while len(self._lookahead) < num_batches + 1:
            try:
                self._lookahead.append(next(epoch_iterator))
            except StopIteration:
                break
        batches, self._lookahead = self._lookahead[:num_batches], self._lookahead[num_batches:]
        self._next_batch = self._lookahead[0] if self._lookahead else None
        return batches, self._get_num_items_in_batch(batches, device)

    def _prepare_inputs(self, generation_batch):
        generate_every = self.args.steps_per_generation * self.num_iterations
        if (self.one_step_off and self.model.training and self._next_batch is not None
                and (self._step + 1) % generate_every == 0):
            # the next step starts a new rollout batch: submit it now, with this step's weights,
            # and score and train this step while the engines generate it
            import copy

            prompts = [x["prompt"] for x in self._next_batch]
            prompt_ids, _, _ = self._tokenize_prompts(copy.deepcopy(prompts))
            prompt_ids = [list(map(int, ids)) for ids in prompt_ids]
            requests, seed = self._requests(prompt_ids, step=self.state.global_step + 1)
            self.sync_engine()  # (a no-op except after a resume)
            self._pending[self.state.global_step + 1] = (prompt_ids, _submit(self.engine, requests, seed))
            self._next_batch = None
        return super()._prepare_inputs(generation_batch)

    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.one_step_off and out.get("sampling_per_token_logps") is not None:
            # the behaviour policy (one version old) in the ratio's denominator
            out["old_per_token_logps"] = out["sampling_per_token_logps"]
        return out

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        if self.reward_pool is None:
            return super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        from accelerate.utils import gather

        keys = [k for k in inputs[0] if k not in ("prompt", "completion", "completion_ids")]
        columns = {k: [x[k] for x in inputs] for k in keys}
        _, per_reward = self.reward_pool.score(prompts, completions, **columns)
        values = [[float("nan") if v is None else v for v in per_reward[label]] for label in self.reward_pool.labels]
        return gather(torch.tensor(values, dtype=torch.float32, device=self.accelerator.device).T.contiguous())

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        unwrapped = self.accelerator.unwrap_model(model or self.model)
        if os.path.exists(os.path.join(resume_from_checkpoint, "model.safetensors")) and not hasattr(unwrapped, "peft_config"):
            # The Trainer's plain load_state_dict skips fused MoE experts (saved one by one).
            load_pretrained_into(unwrapped, resume_from_checkpoint)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        unwrapped = self.accelerator.unwrap_model(model)
        if hasattr(unwrapped, "peft_config"):  # a LoRA policy: look at the model inside the adapter
            unwrapped = unwrapped.get_base_model()
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
        prompt_ids = [list(map(int, ids)) for ids in prompt_ids]
        pending = self._pending.pop(self.state.global_step, None)
        if pending is not None and pending[0] == prompt_ids:  # submitted a step ago (one-step-off)
            completions = _collect(self.engine, pending[1])
        else:
            self.sync_engine()  # a no-op after a step's push; needed after a resume (fresh engine)
            requests, seed = self._requests(prompt_ids, step=self.state.global_step)
            with self.full_weights() if self._engine_shares_model() else contextlib.nullcontext():
                completions = self.engine.generate(requests, seed=seed)
        mode = "train" if self.model.training else "eval"
        staleness = max(self.state.global_step - c.weight_version for c in completions)
        self._metrics[mode]["rollout/staleness"].append(float(staleness))
        if not self.one_step_off:
            return [list(c.token_ids) for c in completions], None
        if any(c.logprobs is None for c in completions):
            raise ValueError("one-step-off needs the engine to report sampling log-probs (Completion.logprobs)")
        return [list(c.token_ids) for c in completions], [list(c.logprobs) for c in completions]

    def _requests(self, prompt_ids: list[list[int]], step: int) -> tuple[list[GenerationRequest], int]:
        sampling = SamplingParams(
            max_new_tokens=self.max_completion_length,
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k or 0,
        )
        # A seed per optimiser step: a resumed run samples what an uninterrupted one would.
        seed = self.args.seed * 1_000_003 + step
        return [GenerationRequest(ids, sampling, i) for i, ids in enumerate(prompt_ids)], seed


def _submit(engine: RolloutEngine, requests, seed):
    """Start generating (a pool returns at once; an in-process engine generates now)."""
    return engine.submit(requests, seed) if hasattr(engine, "submit") else engine.generate(requests, seed=seed)


def _collect(engine: RolloutEngine, submitted):
    return engine.collect(submitted) if hasattr(engine, "collect") else submitted


class _PushWeightsCallback(TrainerCallback):
    """Pushes the weights to the engine after every optimiser step."""

    def __init__(self, trainer: EngineGRPOTrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        fault_point("step")  # crash/resume tests: die between a step and its checkpoint
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
        "rollout/sync_seconds": "rollout/sync_seconds",
        "rollout/sync_mb": "rollout/sync_mb",
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

        from posttrain.checkpoint import publish

        src = os.path.join(args.output_dir, f"checkpoint-{state.global_step}")
        if not os.path.isdir(src):
            return
        with open(os.path.join(src, "state.json"), "w", encoding="utf-8") as fh:
            json.dump({"step": state.global_step, "format": "transformers-trainer"}, fh)
            fh.flush()
            os.fsync(fh.fileno())
        fault_point("checkpoint")  # complete but not yet renamed into place
        publish(src, self.checkpoints, state.global_step, keep=self.keep)

