"""Pipelined vs fully serial GSPO steps of the Thinker interaction RL trainer, side by side.

Both sides are `EngineGRPOTrainer` (what `thinker_interaction_rl` runs) on the recipe's default
tiny Thinker (random weights, the recipe's tokenizer), its data and its three rewards (language,
persona, instruction_following), with the same GRPOConfig:

- **serial** (``rollout.engines=0``): an in-process HF engine sharing the trainer's model; every
  step generates, scores, then trains, one after the other, on one thread.
- **pipelined** (``rollout.engines=1 rollout.one_step_off=true rollout.reward_workers=2``): a Ray
  pool with one HF engine actor (one thread) generates the next rollout batch with the previous
  weights while the trainer (one thread) scores and trains the current one; two reward worker
  actors score; the full weights go to the engine after every optimiser step.

One-step-off submits the next rollout batch during the last optimiser step of the current one,
so the overlap window is one optimiser step: this bench uses ``steps_per_generation=1`` (one
optimiser step per rollout batch, the setting where generation can hide behind training; with
the GSPO paper's 4 mini-batches at most a quarter of the training can overlap).

Each repetition trains a fresh copy of the same initial weights on each side (order flipped
every repetition; the pipelined side gets a fresh engine pool each time, as a run does). Wall
time counts from the end of the first step (warm-up; its batch cannot be generated ahead) to the
last step, so both sides count the same steps. Other jobs on a shared machine stretch wall
time, so ``cpu_bound_ratio`` is reported beside the ratio: the serial side's CPU seconds over the
least wall time the pipelined side's CPU seconds need on two free cores (max of its busiest
process and half of its total), i.e. the ratio an otherwise idle 2-core machine would allow;
``free_cores_before/after`` are the cores two busy loops actually got side by side just before
and after (2.0 when idle).

    python -m bench.bench_pipeline      # or: make bench
Goal: pipelined steps >= 1.6x faster than serial.
"""

from __future__ import annotations

import copy
import json
import os
import tempfile
import time

from bench.common import alternate, free_cores, result, set_threads

WARMUP_STEPS = 1


def run(steps: int = 7, reps: int = 2, batch_size: int = 32, num_generations: int = 8, completion_length: int = 48) -> dict:
    set_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback, TrainerCallback
    from trl import GRPOConfig

    from posttrain.config import RewardConfig
    from posttrain.data.conversations import make_conversations
    from posttrain.logging import quiet_libraries
    from posttrain.models.qwen_omni import TinyThinkerSpec, build_tiny_thinker, load_language_model, save_model
    from posttrain.registry import RewardSet
    from posttrain.rollout import HFEngine
    from posttrain.rollout.pool import EngineSpec, RolloutPool, start_ray
    from posttrain.rollout.reward_pool import RewardPool
    from posttrain.trainers import EngineGRPOTrainer, trl_reward_functions
    from recipes.thinker_interaction_rl import Config, check_row, policy_tokenizer

    quiet_libraries()
    cores_before = free_cores()
    tokenizer = policy_tokenizer(Config())
    folder = os.path.join(tempfile.mkdtemp(prefix="bench-pipeline-"), "policy")
    save_model(build_tiny_thinker(tokenizer, TinyThinkerSpec(), seed=0), tokenizer, folder)
    initial, _ = load_language_model(folder, "bench policy")
    specs = [RewardConfig("language", 1.0), RewardConfig("persona", 1.0), RewardConfig("instruction_following", 1.0)]
    reward_funcs, weights = trl_reward_functions(RewardSet(specs))
    rows = [check_row(r, f"row {i}") for i, r in enumerate(make_conversations(512, turns=2, seed=0))]
    columns = sorted({k for r in rows for k in r})
    dataset = Dataset.from_list([{k: r.get(k) for k in columns} for r in rows])
    owns_ray = start_ray("local", num_cpus=2)
    reward_pool = RewardPool(specs, num_workers=2, num_cpus=0.5)
    staleness: dict[str, list[float]] = {"serial": [], "pipelined": []}

    def actors_cpu(actors) -> list[float]:
        return ray.get([a.__ray_call__.remote(lambda self: __import__("time").process_time()) for a in actors])

    class Clock(TrainerCallback):
        """Wall time at every step's end; CPU seconds of the trainer and of every actor at the
        end of the warm-up step and of the last step."""

        def __init__(self, actors):
            self.ends, self.actors, self.cpu = [], actors, []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())
            if state.global_step in (WARMUP_STEPS, args.max_steps):
                self.cpu.append([time.process_time()] + actors_cpu(self.actors))

    cpu_bound: dict[str, list[float]] = {"serial": [], "pipelined": []}

    def train(side: str) -> float:
        model = copy.deepcopy(initial)
        args = GRPOConfig(
            output_dir=tempfile.mkdtemp(prefix=f"bench-pipeline-{side}-"), importance_sampling_level="sequence",
            loss_type="grpo", beta=0.0, epsilon=3e-4, epsilon_high=4e-4, num_generations=num_generations,
            per_device_train_batch_size=batch_size, steps_per_generation=1, gradient_accumulation_steps=1,
            reward_weights=weights, temperature=1.0, top_p=1.0, top_k=0, max_completion_length=completion_length,
            max_steps=steps, learning_rate=5e-4, seed=0, logging_steps=1, save_strategy="no", report_to="none",
            use_cpu=True, bf16=False, fp16=False, disable_tqdm=True, shuffle_dataset=True,
        )
        pool = None
        if side == "serial":
            options = dict(engine=HFEngine(model, tokenizer))
            clock = Clock([])
        else:
            pool = RolloutPool(EngineSpec(kind="hf", model_path=folder, num_cpus=1.0), num_engines=1)
            options = dict(engine=pool, one_step_off=True, reward_pool=reward_pool)
            clock = Clock(pool.actors + reward_pool.workers)
        try:
            trainer = EngineGRPOTrainer(model=model, reward_funcs=reward_funcs, args=args, train_dataset=dataset,
                                        processing_class=tokenizer, callbacks=[clock], **options)
            trainer.remove_callback(ProgressCallback)
            trainer.remove_callback(PrinterCallback)
            trainer.train()
        finally:
            if pool is not None:
                pool.close()
        staleness[side] += [log["rollout/staleness"] for log in trainer.state.log_history if "rollout/staleness" in log]
        used = [b - a for a, b in zip(*clock.cpu)]  # trainer, then engine and reward workers
        # the least wall time these CPU seconds need with two free cores, one thread each
        cpu_bound[side].append(max(max(used), sum(used) / 2) if side == "pipelined" else used[0])
        return clock.ends[-1] - clock.ends[WARMUP_STEPS - 1]

    try:
        times = alternate({"serial": lambda: train("serial"), "pipelined": lambda: train("pipelined")}, reps)
    finally:
        reward_pool.close()
        if owns_ray:
            ray.shutdown()
    counted = steps - WARMUP_STEPS
    return {
        "pipelined_vs_serial": result(
            sum(times["serial"]) / sum(times["pipelined"]), ">= 1.6",
            unit="wall seconds per optimiser step, serial / pipelined (one-step-off + 2 reward workers)",
            serial_s_per_step=round(sum(times["serial"]) / (reps * counted), 3),
            pipelined_s_per_step=round(sum(times["pipelined"]) / (reps * counted), 3),
            per_rep_ratios=[round(s / p, 3) for s, p in zip(times["serial"], times["pipelined"])],
            cpu_bound_ratio=round(sum(cpu_bound["serial"]) / sum(cpu_bound["pipelined"]), 3),
            staleness_serial=sorted(set(staleness["serial"])), staleness_pipelined=sorted(set(staleness["pipelined"])),
            load_average=round(os.getloadavg()[0], 1), torch_threads=torch.get_num_threads(),
            free_cores_before=cores_before, free_cores_after=free_cores(),
            setup=f"thinker_interaction_rl's tiny Thinker (random weights), {batch_size} replies/step, {num_generations} per group, "
                  f"{completion_length} tokens, steps_per_generation=1, full weight sync, {counted} steps counted x {reps} reps",
        )
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
