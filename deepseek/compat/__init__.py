"""Checkpoint formats: the only place Hugging Face / DeepSeek checkpoint key names live."""
