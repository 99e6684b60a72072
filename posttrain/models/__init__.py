"""Models: the Qwen-Omni adapter (`qwen_omni`), tokenizers, and where weights come from."""
