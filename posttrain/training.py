"""Small pieces every training loop needs: optimiser, schedule, deterministic batches,
forward passes that return float logits."""

from __future__ import annotations

import math
import random

import torch

from posttrain.data.text import collate
from posttrain.losses import response_logits


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.95)) -> torch.optim.AdamW:
    """AdamW over the trainable parameters (no decay on norms and biases)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas)


def make_scheduler(optimizer, warmup_steps: int, total_steps: int, kind: str = "cosine", min_ratio: float = 0.05):
    """Linear warm-up, then cosine / linear decay to ``min_ratio`` of the peak, or constant."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / max(1, warmup_steps)
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if kind == "linear":
            return max(min_ratio, 1.0 - progress)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> list[int]:
    """The rows of step ``step``: a function of (seed, step) only, so a resumed run sees the
    same batches as an uninterrupted one."""
    rng = random.Random(f"{seed}-{step}")
    return [rng.randrange(n) for _ in range(batch_size)]


def step_generator(seed: int, step: int) -> torch.Generator:
    """A torch generator for the random choices of step ``step`` (e.g. input noise): like
    `batch_indices`, a function of (seed, step) only, so a resumed run repeats them."""
    return torch.Generator().manual_seed(seed * 100003 + step)


def logits_of(model, batch: dict[str, torch.Tensor], extra: dict | None = None) -> torch.Tensor:
    """Float logits of a causal LM (a Thinker or any text model) for a collated batch;
    ``extra`` carries further model inputs (the Thinker's audio features)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False, **(extra or {}))
    logits = out.logits
    return logits.float()


def cpu_threads() -> int:
    """Threads torch uses here (all cores unless the user set OMP_NUM_THREADS)."""
    return torch.get_num_threads()


def response_view(model, prompts: list[list[int]], responses: list[list[int]], pad_id: int, vocab: int | None = None, extra: dict | None = None):
    """Logits that predict each response token, ``[batch, max_response_len, vocab]``, with the
    response mask and targets. Prompts may differ between models (a teacher reading text, a
    student hearing audio, different chat templates): the views align on the response."""
    batch = collate(prompts, responses, pad_id)
    logits = logits_of(model, batch, extra)
    length = max(len(r) for r in responses)
    out = response_logits(logits, batch["response_start"], length)
    if vocab is not None:
        out = out[..., :vocab]  # drop the padding rows of an lm_head rounded up past the tokenizer
    mask = torch.zeros((len(responses), length))
    targets = torch.full((len(responses), length), pad_id, dtype=torch.long)
    for i, r in enumerate(responses):
        mask[i, : len(r)] = 1.0
        targets[i, : len(r)] = torch.tensor(r)
    return out, mask, targets
