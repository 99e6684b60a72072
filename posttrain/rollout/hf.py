"""In-process Hugging Face ``generate`` engine (CPU or GPU).

Sampling is per request: each request draws its tokens with Gumbel-max noise from a
``torch.Generator`` of its own, seeded from (batch seed, the request's position in the call), so
a completion does not depend on which other requests share its batch, its engine or its pool
(a Ray pool passes each request's global position). Top-k / top-p masks apply before the noise;
greedy (temperature 0) stays plain argmax. Every completion carries the log-probabilities of
its tokens under ``softmax(logits / temperature)`` over the whole vocabulary (before top-k /
top-p masking and placeholder suppression): the behaviour policy's log-probs as a trainer
scores them, so an importance ratio against them is 1 when the weights are the same.
"""

from __future__ import annotations

from itertools import groupby

import torch

from posttrain.faults import fault_point
from posttrain.rollout.engine import Completion, GenerationRequest, RolloutEngine, SamplingParams

_SEED_MIX = (6364136223846793005, 1442695040888963407)


def request_seed(seed: int, position: int) -> int:
    """The sampling seed of the request at ``position`` of a call seeded with ``seed``."""
    return (seed * _SEED_MIX[0] + (position + 1) * _SEED_MIX[1]) % (2**63 - 1)


class PerRequestSampler:
    """A logits processor that samples every row from its own generator (Gumbel-max) and
    records each chosen token's log-probability; ``generate`` then runs greedy on its output,
    whose argmax is the sampled token."""

    def __init__(self, sampling: SamplingParams, seeds: list[int], suppress_token_ids: list[int] = ()):
        self.sampling = sampling
        self.suppress_token_ids = list(suppress_token_ids)
        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.logprobs: list[list[float]] = [[] for _ in seeds]

    def _mask(self, scores: torch.Tensor) -> torch.Tensor:
        k, p = self.sampling.top_k, self.sampling.top_p
        if k and k < scores.size(-1):
            kth = torch.topk(scores, k, dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if p < 1.0:
            ordered, index = torch.sort(scores, dim=-1, descending=True)
            probs = torch.softmax(ordered, dim=-1)
            # drop a token when the tokens ranked above it already cover top_p (the first stays)
            drop = (probs.cumsum(-1) - probs) >= p
            scores = scores.masked_fill(drop.scatter(-1, index, drop), float("-inf"))
        return scores

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        scores = scores.float()
        # log-probs over the whole vocabulary, as the trainer scores the same tokens; the
        # suppressed tokens (a tiny share) are masked only for the draw
        tempered = scores if self.sampling.greedy else scores / self.sampling.temperature
        logp = torch.log_softmax(tempered, -1)
        if self.suppress_token_ids:
            index = torch.tensor(self.suppress_token_ids, device=scores.device)
            tempered = tempered.index_fill(-1, index, float("-inf"))
        if self.sampling.greedy:
            chosen, out = tempered.argmax(-1), tempered
        else:
            vocab = scores.size(-1)
            uniform = torch.stack([torch.rand(vocab, generator=g) for g in self.generators]).to(scores.device)
            gumbel = -torch.log(-torch.log(uniform.clamp(1e-20, 1.0 - 1e-7)))
            out = self._mask(tempered) + gumbel
            chosen = out.argmax(-1)
        for row, value in enumerate(logp.gather(-1, chosen.unsqueeze(-1)).squeeze(-1).tolist()):
            self.logprobs[row].append(value)
        return out


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
        fault_point("weight_sync")  # crash/resume tests: die mid-sync
        self.weight_version = version

    @torch.no_grad()
    def _generate_batch(self, requests: list[GenerationRequest], sampling: SamplingParams, seeds: list[int]) -> list[Completion]:
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
        # The sampler does the sampling; generate itself only takes the argmax of its output.
        sampler = PerRequestSampler(sampling, seeds, self.suppress_token_ids)
        from transformers import LogitsProcessorList

        kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None, logits_processor=LogitsProcessorList([sampler]))
        out = self.model.generate(**kwargs)[:, width:].tolist()
        completions = []
        for r, row, logprobs in zip(requests, out, sampler.logprobs):
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
                    logprobs=logprobs[: len(tokens)],
                )
            )
        return completions

    def generate(self, requests: list[GenerationRequest], seed: int | None = None,
                 positions: list[int] | None = None) -> list[Completion]:
        """Completions in request order. Request ``i`` samples with ``request_seed(seed,
        positions[i])`` (positions default to 0..n-1; a pool passes global positions)."""
        if seed is None:  # unseeded: a fresh draw from torch's global generator
            seed = int(torch.randint(0, 2**62, ()))
        positions = list(range(len(requests))) if positions is None else list(positions)
        if len(positions) != len(requests):
            raise ValueError(f"{len(positions)} positions for {len(requests)} requests")
        was_training = self.model.training
        self.model.eval()
        results: dict[int, Completion] = {}
        try:
            def kind(i):  # batch requests that share sampling settings and input kind
                return (requests[i].sampling, bool(requests[i].inputs))

            order = sorted(range(len(requests)), key=lambda i: (repr(kind(i)), len(requests[i].prompt_ids)))
            for (sampling_key, _), group in groupby(order, key=kind):
                group = list(group)
                for start in range(0, len(group), self.batch_size):
                    chunk = group[start:start + self.batch_size]
                    seeds = [request_seed(seed, positions[i]) for i in chunk]
                    for i, c in zip(chunk, self._generate_batch([requests[i] for i in chunk], sampling_key, seeds)):
                        results[i] = c
        finally:
            self.model.train(was_training)
        return [results[i] for i in range(len(requests))]
