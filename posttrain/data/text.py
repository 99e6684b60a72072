"""Turning prompts and responses into token ids, and batches into padded tensors."""

from __future__ import annotations

from typing import Any

import torch


def encode_prompt(tokenizer, prompt: Any) -> list[int]:
    """Token ids of a prompt: a string (one user turn) or a list of chat messages, in the
    tokenizer's chat template, ending with the assistant's turn opening."""
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if getattr(tokenizer, "chat_template", None):
        out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(out, dict) or hasattr(out, "input_ids"):
            out = out["input_ids"]
        return list(out)
    text = "\n".join(m["content"] for m in messages)
    return tokenizer(text, add_special_tokens=True)["input_ids"]


def encode_response(tokenizer, response: str) -> list[int]:
    """Token ids of a response, ending with the end-of-turn token."""
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def collate(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids``, ``attention_mask`` and ``response_mask`` (1 on the positions
    whose *next* token is a response token, i.e. aligned with the logits that predict it),
    plus ``targets`` (the next token at each position) and ``response_start``."""
    seqs = [p + r for p, r in zip(prompts, responses)]
    width = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    attention = torch.zeros((n, width), dtype=torch.long)
    response_mask = torch.zeros((n, width), dtype=torch.float)
    targets = torch.full((n, width), pad_id, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs)):
        input_ids[i, : len(s)] = torch.tensor(s)
        attention[i, : len(s)] = 1
        targets[i, : len(s) - 1] = torch.tensor(s[1:])
        response_mask[i, len(p) - 1 : len(s) - 1] = 1.0
    return {
        "input_ids": input_ids,
        "attention_mask": attention,
        "response_mask": response_mask,
        "targets": targets,
        "response_start": torch.tensor([len(p) for p in prompts]),
    }
