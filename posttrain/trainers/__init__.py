"""Trainers: TRL's trainers where they fit, adapted to posttrain's rollout engines and run
directories (see `posttrain.trainers.gspo`)."""

from posttrain.trainers.gspo import (
    GSPO_PAPER,
    AtomicCheckpointCallback,
    EngineGRPOTrainer,
    RunDirCallback,
    trl_reward_functions,
)

__all__ = ["GSPO_PAPER", "AtomicCheckpointCallback", "EngineGRPOTrainer", "RunDirCallback", "trl_reward_functions"]
