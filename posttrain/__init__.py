"""posttrain: post-training and alignment recipes for Thinker/Talker omni models."""

__version__ = "0.1.0"
