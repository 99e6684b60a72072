"""In-process Hugging Face ``generate`` engine (CPU or GPU)."""

from __future__ import annotations

from itertools import groupby

import torch

from posttrain.rollout.engine import Completion, GenerationRequest, RolloutEngine, SamplingParams


PLACEHOLDER_TOKENS = ("<|audio_pad|>", "<|image_pad|>", "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<|vision_start|>", "<|vision_end|>")


class HFEngine(RolloutEngine):
    """Batched ``model.generate`` with left padding.

    Colocated with a trainer, the engine holds the trainer's own model object, so a weight
    update only advances the version; given a separate copy, ``update_weights`` loads the
    state into it.
    """

    def __init__(self, model, tokenizer, batch_size: int = 64, stop_token_ids: list[int] | None = None):
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        stops = stop_token_ids if stop_token_ids is not None else [tokenizer.eos_token_id]
        self.stop_token_ids = sorted({int(t) for t in stops if t is not None})
        # placeholders stand for audio/vision features: a sampled one would break the next
        # forward pass (more placeholders than features), so they are never generated
        vocab = tokenizer.get_vocab()
        self.suppress_token_ids = sorted(vocab[t] for t in PLACEHOLDER_TOKENS if t in vocab)
        self.weight_version = 0

    def update_weights(self, state: dict | None, version: int) -> None:
        if state is not None:
            missing, unexpected = self.model.load_state_dict(state, strict=False)
            if unexpected:
                raise ValueError(f"weight update has {len(unexpected)} unknown tensors, e.g. {unexpected[0]}")
        self.weight_version = version

    @torch.no_grad()
    def _generate_batch(self, requests: list[GenerationRequest], sampling: SamplingParams) -> list[Completion]:
        width = max(len(r.prompt_ids) for r in requests)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(requests), width), dtype=torch.long)
        for i, r in enumerate(requests):
            ids[i, width - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
            mask[i, width - len(r.prompt_ids):] = 1
        device = next(self.model.parameters()).device
        extra = {}
        if any(r.inputs for r in requests):
            # audio clips (per-request features) batch into padded model inputs
            from posttrain.models.qwen_omni import batch_audio_inputs

            if not all(r.inputs for r in requests):
                raise ValueError("a batch mixes requests with and without audio inputs")
            extra = {k: v.to(device) for k, v in batch_audio_inputs([r.inputs for r in requests]).items()}
        kwargs = dict(
            **extra,
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=sampling.max_new_tokens,
            pad_token_id=self.pad_id,
            eos_token_id=self.stop_token_ids,
        )
        if self.suppress_token_ids:
            kwargs["suppress_tokens"] = self.suppress_token_ids
        if sampling.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k or None)
        out = self.model.generate(**kwargs)[:, width:].tolist()
        completions = []
        for r, row in zip(requests, out):
            tokens, reason = [], "length"
            for t in row:
                tokens.append(t)
                if t in self.stop_token_ids:
                    reason = "stop"
                    break
            completions.append(
                Completion(
                    request_id=r.request_id,
                    prompt_ids=list(r.prompt_ids),
                    token_ids=tokens,
                    text=self.tokenizer.decode(tokens, skip_special_tokens=True),
                    finish_reason=reason,
                    weight_version=self.weight_version,
                )
            )
        return completions

    def generate(self, requests: list[GenerationRequest], seed: int | None = None) -> list[Completion]:
        was_training = self.model.training
        self.model.eval()
        results: dict[int, Completion] = {}
        try:
            with torch.random.fork_rng(devices=[]):
                if seed is not None:
                    torch.manual_seed(seed)
                def kind(i):  # batch requests that share sampling settings and input kind
                    return (requests[i].sampling, bool(requests[i].inputs))

                order = sorted(range(len(requests)), key=lambda i: (repr(kind(i)), len(requests[i].prompt_ids)))
                for (sampling_key, _), group in groupby(order, key=kind):
                    group = list(group)
                    for start in range(0, len(group), self.batch_size):
                        chunk = group[start:start + self.batch_size]
                        for i, c in zip(chunk, self._generate_batch([requests[i] for i in chunk], sampling_key)):
                            results[i] = c
        finally:
            self.model.train(was_training)
        return [results[i] for i in range(len(requests))]
