"""A posttrain GSPO step vs a raw TRL GRPOTrainer step: the same model, data, rewards and
GRPOConfig, measured side by side in one process on one thread.

posttrain's `EngineGRPOTrainer` is TRL's GRPOTrainer with completions from a rollout engine
(`HFEngine`, colocated: it holds the trainer's model) and a weight push after every optimiser
step. Everything else (grouping, advantages, the GSPO loss, the optimiser) is TRL's, so the
ratio is the cost of that indirection. The model is a tiny random Qwen3 decoder (hidden 128, 2
layers): raw TRL scores a Qwen-Omni Thinker through a fused LM head the Thinker lacks, so a
plain causal LM is what both sides can run. A random model almost never samples EOS, so both
sides generate the full ``max_completion_length`` tokens (the completion lengths are reported).

Each repetition trains a fresh copy of the same initial weights for ``steps`` optimiser steps
on each side (order flipped every repetition); the time counted is from the end of the first
rollout batch (``steps_per_generation`` steps: warm-up) to the last step, so every counted
span holds the same number of generations and optimiser steps. The ratio is of CPU seconds (one
thread per side, so CPU time is the work done whatever else runs on the machine); the wall-time
ratio is reported beside it.

    python -m bench.bench_trl_step      # or: make bench
Goal: posttrain step time <= 1.03x TRL's.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time

from bench.common import alternate, result, set_threads

STEPS_PER_GENERATION = 4


def _model(tokenizer):
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=2048,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, tie_word_embeddings=True,
    )
    return Qwen3ForCausalLM(config)


class _StepClock:
    """Wall and CPU time at every on_step_end, for the span after the warm-up rollout batch."""

    def __init__(self):
        from transformers import TrainerCallback

        clock = self

        class Callback(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                clock.ends.append((time.perf_counter(), time.process_time()))

        self.ends: list[tuple[float, float]] = []
        self.callback = Callback()

    def span(self) -> tuple[float, float]:
        """(wall, CPU) seconds from the end of the first rollout batch to the last step."""
        (w0, c0), (w1, c1) = self.ends[STEPS_PER_GENERATION - 1], self.ends[-1]
        return w1 - w0, c1 - c0


def run(steps: int = 8, reps: int = 3, batch_size: int = 32, num_generations: int = 8, completion_length: int = 24) -> dict:
    set_threads(1)
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.data.conversations import make_conversations
    from posttrain.registry import RewardSet
    from posttrain.config import RewardConfig
    from posttrain.logging import quiet_libraries
    from posttrain.rollout import HFEngine
    from posttrain.trainers import EngineGRPOTrainer, trl_reward_functions

    quiet_libraries()
    from recipes.thinker_interaction_rl import Config, policy_tokenizer

    tokenizer = policy_tokenizer(Config())  # the recipe's BPE: prompts of ~140 tokens, not ~400 bytes
    initial = _model(tokenizer)
    rows = make_conversations(256, turns=1, seed=0, languages=["en", "de"])
    columns = sorted({k for r in rows for k in r})
    dataset = Dataset.from_list([{k: r.get(k) for k in columns} for r in rows])
    reward_funcs, weights = trl_reward_functions(RewardSet([RewardConfig("language", 1.0), RewardConfig("persona", 1.0)]))
    workdir = tempfile.mkdtemp(prefix="bench-trl-step-")
    lengths: dict[str, list[float]] = {"posttrain": [], "trl": []}
    wall: dict[str, list[float]] = {"posttrain": [], "trl": []}

    def train(side: str) -> float:
        model = copy.deepcopy(initial)
        args = GRPOConfig(
            output_dir=os.path.join(workdir, side), importance_sampling_level="sequence", loss_type="grpo", beta=0.0,
            epsilon=3e-4, epsilon_high=4e-4, num_generations=num_generations, per_device_train_batch_size=batch_size,
            steps_per_generation=STEPS_PER_GENERATION, gradient_accumulation_steps=1, reward_weights=weights,
            temperature=1.0, top_p=1.0, top_k=0, max_completion_length=completion_length, max_steps=steps,
            learning_rate=5e-4, seed=0, logging_steps=STEPS_PER_GENERATION, save_strategy="no", report_to="none",
            use_cpu=True, bf16=False, fp16=False, disable_tqdm=True, shuffle_dataset=True,
        )
        clock = _StepClock()
        common = dict(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset, processing_class=tokenizer,
                      callbacks=[clock.callback])
        if side == "posttrain":
            trainer = EngineGRPOTrainer(engine=HFEngine(model, tokenizer), **common)
        else:
            trainer = GRPOTrainer(**common)
        trainer.remove_callback(ProgressCallback)
        trainer.remove_callback(PrinterCallback)
        trainer.train()
        lengths[side] += [log["completions/mean_length"] for log in trainer.state.log_history if "completions/mean_length" in log]
        wall_s, cpu_s = clock.span()
        wall[side].append(wall_s)
        return cpu_s

    # One thread per side, so CPU seconds are the work done, whatever else shares the machine.
    times = alternate({"posttrain": lambda: train("posttrain"), "trl": lambda: train("trl")}, reps)
    counted = steps - STEPS_PER_GENERATION
    ratio = sum(times["posttrain"]) / sum(times["trl"])
    mean = lambda xs: round(sum(xs) / len(xs), 2)
    return {
        "posttrain_vs_trl_step_time": result(
            ratio, "<= 1.03",
            unit="CPU seconds per optimiser step (generation included, 1 thread), posttrain EngineGRPOTrainer / TRL GRPOTrainer",
            wall_ratio=round(sum(wall["posttrain"]) / sum(wall["trl"]), 3),
            posttrain_cpu_s_per_step=round(sum(times["posttrain"]) / (reps * counted), 3),
            trl_cpu_s_per_step=round(sum(times["trl"]) / (reps * counted), 3),
            per_rep_ratios=[round(a / b, 3) for a, b in zip(times["posttrain"], times["trl"])],
            completion_length_posttrain=mean(lengths["posttrain"]), completion_length_trl=mean(lengths["trl"]),
            setup=f"tiny Qwen3 (hidden 128, 2 layers), GSPO, {batch_size} replies/step, {num_generations} per group, "
                  f"{completion_length} tokens, {STEPS_PER_GENERATION} steps per rollout batch, {counted} steps counted x {reps} reps, 1 thread",
            torch_threads=torch.get_num_threads(),
        )
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
