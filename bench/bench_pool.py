"""A Ray pool of 2 Hugging Face engines vs a pool of 1: generated tokens per second, side by side.

Both pools serve the same saved tiny Thinker (hidden 256, 4 layers, MoE) and the same 128
requests (one rollout batch of `thinker_interaction_rl`: 32 replies x 4 optimiser steps), which
every engine generates in batches of 64 (the engine's default): one engine runs two batches
one after the other, two engines one each, side by side;
sampling is seeded per request (`posttrain.rollout.hf.request_seed`), so both return the very
same completions and the token counts are equal by construction. Every engine actor is one
process with ONE torch thread (checked inside the actors and reported): two engines on two cores
then use both cores without fighting over them, on an otherwise idle machine. Other jobs on the
cores stretch wall time, so ``cpu_bound_ratio`` is reported beside the ratio: the busiest
engine's CPU seconds per batch, 1 engine over 2, i.e. the ratio with a free core per engine
(and the 1-minute load average at the end), and ``free_cores_before/after``: the summed CPU share
of two busy loops run side by side just before and after (2.0 on an idle 2-core machine), the
most any ratio of two parallel processes can reach at that moment. Both pools live in one Ray session (3 actors,
never more than 2 busy) and the repetitions alternate 1-2, 2-1, ...

    python -m bench.bench_pool      # or: make bench
Goal: the 2-engine pool generates >= 1.8x the tokens per second of the 1-engine pool.
"""

from __future__ import annotations

import json
import os
import tempfile

from bench.common import alternate, free_cores, result, set_threads


def tiny_policy_folder(hidden_size: int = 256, num_layers: int = 4) -> tuple[str, object]:
    """A saved random tiny Thinker (the interaction recipe's tokenizer) and its tokenizer."""
    from posttrain.models.qwen_omni import TinyThinkerSpec, build_tiny_thinker, save_model
    from recipes.thinker_interaction_rl import Config, policy_tokenizer

    tokenizer = policy_tokenizer(Config())
    model = build_tiny_thinker(tokenizer, TinyThinkerSpec(hidden_size=hidden_size, num_layers=num_layers), seed=0)
    folder = os.path.join(tempfile.mkdtemp(prefix="bench-policy-"), "model")
    save_model(model, tokenizer, folder)
    return folder, tokenizer


def conversation_requests(tokenizer, n: int, max_new_tokens: int):
    from posttrain.data.conversations import make_conversations
    from posttrain.data.text import encode_prompt
    from posttrain.rollout import GenerationRequest, SamplingParams

    rows = make_conversations(n, turns=1, seed=0, languages=["en", "de"])
    sampling = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0)
    return [GenerationRequest(encode_prompt(tokenizer, r["prompt"]), sampling, i) for i, r in enumerate(rows)]


def actor_threads(pool) -> list[int]:
    import ray

    return [ray.get(a.__ray_call__.remote(lambda self: __import__("torch").get_num_threads())) for a in pool.actors]


def actor_cpu_seconds(pool) -> list[float]:
    """CPU seconds each engine actor's process has used so far."""
    import ray

    return ray.get([a.__ray_call__.remote(lambda self: __import__("time").process_time()) for a in pool.actors])


def run(requests: int = 128, new_tokens: int = 32, reps: int = 4, engine_batch: int = 64) -> dict:
    set_threads(1)  # the driver and, through the environment, every Ray worker: one thread each
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from posttrain.rollout.pool import EngineSpec, RolloutPool, start_ray

    cores_before = free_cores()
    folder, tokenizer = tiny_policy_folder()
    batch = conversation_requests(tokenizer, requests, new_tokens)
    owns_ray = start_ray("local", num_cpus=3)  # logical CPUs for 3 actors; at most 2 busy at a time
    spec = EngineSpec(kind="hf", model_path=folder, batch_size=engine_batch, num_cpus=1.0)
    pools = {"1 engine": RolloutPool(spec, num_engines=1), "2 engines": RolloutPool(spec, num_engines=2)}
    try:
        threads = {name: actor_threads(pool) for name, pool in pools.items()}
        outputs = {}
        for name, pool in pools.items():  # warm-up: first-call allocations are not throughput
            outputs[name] = pool.generate(batch[:8], seed=1)
        tokens = {}
        busiest_cpu = {name: [] for name in pools}  # per rep: CPU seconds of the busiest engine

        def generate(name):
            def side():
                before = actor_cpu_seconds(pools[name])
                completions = pools[name].generate(batch, seed=0)
                used = [b - a for a, b in zip(before, actor_cpu_seconds(pools[name]))]
                busiest_cpu[name].append(max(used))
                tokens[name] = sum(len(c.token_ids) for c in completions)
                outputs[name] = [c.token_ids for c in completions]

            return side

        times = alternate({name: generate(name) for name in pools}, reps)
        same = outputs["1 engine"] == outputs["2 engines"]
        rate = {name: tokens[name] / (sum(times[name]) / reps) for name in pools}
        # What the pool would reach with a free core per engine: the busiest engine's CPU time
        # bounds the batch (other jobs on a shared machine stretch wall time, not CPU time).
        cpu_bound = sum(busiest_cpu["1 engine"]) / sum(busiest_cpu["2 engines"])
        return {
            "pool_2_vs_1": result(
                rate["2 engines"] / rate["1 engine"], ">= 1.8",
                unit="generated tokens per wall second, 2 HF engine actors / 1",
                tokens_per_s_1=round(rate["1 engine"], 1), tokens_per_s_2=round(rate["2 engines"], 1),
                per_rep_ratios=[round(a / b, 3) for a, b in zip(times["1 engine"], times["2 engines"])],
                cpu_bound_ratio=round(cpu_bound, 3),
                tokens_per_batch=tokens["1 engine"], identical_completions=same,
                load_average=round(os.getloadavg()[0], 1),
                free_cores_before=cores_before, free_cores_after=free_cores(),
                torch_threads_per_engine=threads, cpu_cores=os.cpu_count(),
                setup=f"tiny Thinker (hidden 256, 4 layers, MoE), {requests} requests x {new_tokens} new tokens, "
                      f"HF generate batches of {engine_batch} in every engine, {reps} reps alternating",
            )
        }
    finally:
        for pool in pools.values():
            pool.close()
        if owns_ray:
            ray.shutdown()


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
