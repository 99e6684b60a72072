"""Rollout engines: where completions come from. Recipes call ``engine.generate(requests)``
and ``engine.update_weights(state, version)``, never ``model.generate``, so an in-process
Hugging Face engine and a Ray pool of HF / vLLM engines are interchangeable."""

from posttrain.rollout.engine import Completion, GenerationRequest, RolloutEngine, SamplingParams
from posttrain.rollout.hf import HFEngine

__all__ = ["Completion", "GenerationRequest", "HFEngine", "RolloutEngine", "SamplingParams"]
