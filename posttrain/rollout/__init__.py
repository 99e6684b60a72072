"""Rollout engines: where completions come from. Recipes call ``engine.generate(requests)``
and ``engine.update_weights(state, version)``, never ``model.generate``, so an in-process
Hugging Face engine and a Ray pool of HF / vLLM engines are interchangeable."""

from posttrain.rollout.engine import Completion, GenerationRequest, RolloutEngine, SamplingParams
from posttrain.rollout.hf import HFEngine

__all__ = ["Completion", "GenerationRequest", "HFEngine", "RolloutEngine", "SamplingParams", "VLLMEngine"]


def __getattr__(name):
    # vLLM is optional and slow to import: VLLMEngine loads on first use
    if name == "VLLMEngine":
        from posttrain.rollout.vllm_engine import VLLMEngine

        return VLLMEngine
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
