"""The rollout-engine interface shared by every backend."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one completion. ``temperature=0`` means greedy."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


@dataclass
class GenerationRequest:
    """One prompt to complete. ``inputs`` carries extra model inputs (e.g. audio features)."""

    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    request_id: Any = None
    inputs: dict[str, Any] | None = None


@dataclass
class Completion:
    """A finished completion, tagged with the request it answers and the weight version
    that produced it."""

    request_id: Any
    prompt_ids: list[int]
    token_ids: list[int]  # the response, including the stop token when one was produced
    text: str  # the decoded response, without special tokens
    finish_reason: str  # "stop" or "length"
    weight_version: int
    # log-probability of each token under the sampling distribution (the behaviour policy),
    # when the engine reports it
    logprobs: list[float] | None = None


class RolloutEngine(ABC):
    """Generates completions; receives new weights from the trainer."""

    weight_version: int = 0

    @abstractmethod
    def generate(self, requests: list[GenerationRequest], seed: int | None = None) -> list[Completion]:
        """Completions for ``requests``, in the same order."""

    @abstractmethod
    def update_weights(self, state: dict | None, version: int) -> None:
        """Load ``state`` (a full or partial state dict; ``None`` when the engine shares the
        trainer's model in-process) and tag later completions with ``version``."""

    def close(self) -> None:
        """Release resources held by the engine."""
