"""Weight sync time over optimiser step time, with LoRA sync to a Ray pool of 2 HF engines.

The trainer's policy is a tiny Thinker (hidden 256, 4 layers, MoE) with a peft LoRA adapter (rank
16 on the attention projections); the engines hold the same base model. One optimiser step is
what `thinker_interaction_rl` does per step at its defaults: a GSPO loss (`posttrain.losses.
gspo_loss`) over 32 sampled replies of 48 tokens to ~140-token conversations, forward + backward +
AdamW. One sync is ``pool.update_weights(LoraUpdate, version)``: the adapter's tensors put in Ray's
object store once and loaded by both engines (wall time until both have it). Steps and syncs
alternate, as they do in training; the trainer runs on one thread, the engines on one each.

The same sync with the full state dict (what a trainer without LoRA sends) is reported beside it,
and ``cpu_ratio``: the sync's CPU seconds (the trainer's part plus the slower engine's) over the
step's. On a shared machine other jobs delay the actors' wake-ups, which stretches the sync's
wall time (the ratio) but not its CPU time; the 1-minute load average is reported with them.

    python -m bench.bench_sync      # or: make bench
Goal: sync time <= 5% of the step time (LoRA sync).
"""

from __future__ import annotations

import json
import os
import time

from bench.common import median, result, set_threads
from bench.bench_pool import actor_cpu_seconds, conversation_requests, tiny_policy_folder

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


def run(reps: int = 8, batch_size: int = 32, completion_tokens: int = 48) -> dict:
    set_threads(1)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import torch
    from peft import LoraConfig, get_peft_model

    from posttrain.losses import gspo_loss
    from posttrain.models.qwen_omni import load_language_model
    from posttrain.rollout.pool import EngineSpec, RolloutPool, start_ray, weights_for_engine
    from posttrain.training import make_optimizer

    folder, tokenizer = tiny_policy_folder()
    base, _ = load_language_model(folder, "bench policy")
    full_state = weights_for_engine(base, "full")
    full_bytes = sum(t.numel() * t.element_size() for t in full_state.values())
    policy = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS, bias="none"))
    optimizer = make_optimizer(policy, 1e-4)

    # A batch shaped like the recipe's: prompts of real conversations + sampled-length replies.
    requests = conversation_requests(tokenizer, batch_size // 8, completion_tokens)
    prompts = [r.prompt_ids for r in requests for _ in range(8)]
    width = max(map(len, prompts)) + completion_tokens
    ids = torch.full((batch_size, width), tokenizer.pad_token_id)
    mask = torch.zeros((batch_size, width), dtype=torch.long)
    generator = torch.Generator().manual_seed(0)
    for i, p in enumerate(prompts):
        row = p + torch.randint(0, len(tokenizer), (completion_tokens,), generator=generator).tolist()
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    response = torch.zeros_like(mask[:, 1:], dtype=torch.bool)
    response[:, -completion_tokens:] = True
    rewards = torch.rand(batch_size, generator=generator)

    def step() -> float:
        start = time.process_time()
        logits = policy(input_ids=ids, attention_mask=mask).logits[:, :-1]
        logps = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        loss = gspo_loss(logps, logps.detach(), response, rewards, group_size=8)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return time.process_time() - start

    owns_ray = start_ray("local", num_cpus=2)
    pool = RolloutPool(EngineSpec(kind="hf", model_path=folder, num_cpus=1.0), num_engines=2)
    try:
        # Full-state syncs first (the engines still hold the plain model), then LoRA rounds.
        full_syncs = []
        for version in (1, 2, 3):
            pool.update_weights(full_state, version)
            full_syncs.append(pool.last_sync["seconds"])
        step()  # warm-up (first backward allocates)
        # The first LoRA update wraps each engine's model with the adapter (once per training run).
        pool.update_weights(weights_for_engine(policy, "lora"), version=4)
        first_lora = pool.last_sync["seconds"]
        steps, syncs, sync_cpu = [], [], []
        for k in range(reps):
            steps.append(step())
            before = actor_cpu_seconds(pool) + [time.process_time()]
            pool.update_weights(weights_for_engine(policy, "lora"), version=5 + k)
            syncs.append(pool.last_sync["seconds"])
            used = [b - a for a, b in zip(before, actor_cpu_seconds(pool) + [time.process_time()])]
            sync_cpu.append(used[-1] + max(used[:-1]))  # the trainer's part + the slower engine's
        lora_bytes, lora_tensors = pool.last_sync["bytes"], len(pool.last_sync["tensors"])
        # the engines hold what the trainer holds: one reply scored the same on both sides
        check = requests[0].prompt_ids
        engine_logits = ray.get(pool.actors[0].__ray_call__.remote(
            lambda self, x: self.engine.model(input_ids=__import__("torch").tensor([x])).logits[0, -1], check))
        with torch.no_grad():
            same = torch.allclose(policy(input_ids=torch.tensor([check])).logits[0, -1], engine_logits, atol=1e-4)
    finally:
        pool.close()
        if owns_ray:
            ray.shutdown()
    step_s, sync_s = median(steps), median(syncs)
    return {
        "sync_over_step": result(
            sync_s / step_s, "<= 0.05",
            unit="LoRA weight sync to 2 engine actors (wall s) / optimiser step (CPU s, 1 thread), medians",
            step_s=round(step_s, 3), lora_sync_s=round(sync_s, 4), lora_bytes=lora_bytes, lora_tensors=lora_tensors,
            cpu_ratio=round(median(sync_cpu) / step_s, 4), lora_sync_cpu_s=round(median(sync_cpu), 4),
            first_lora_sync_s=round(first_lora, 4),
            full_sync_s=round(median(full_syncs), 4), full_bytes=full_bytes,
            full_sync_over_step=round(median(full_syncs) / step_s, 3),
            engines_match_trainer=bool(same), load_average=round(os.getloadavg()[0], 1),
            setup=f"tiny Thinker (hidden 256, 4 layers, MoE) + LoRA r16 on {'/'.join(LORA_TARGETS)}; GSPO step on "
                  f"{batch_size} x ({width - completion_tokens} prompt + {completion_tokens} reply) tokens; {reps} step+sync rounds",
        )
    }


if __name__ == "__main__":
    print(json.dumps(run(), indent=2))
