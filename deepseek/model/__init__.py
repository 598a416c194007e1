"""The DeepSeek-V3/R1 model: config, MLA, MoE, rotary, cache, transformer. No training or serving code."""

from .cache import LatentCache
from .config import R1Config
from .transformer import R1ForCausalLM, R1TextModel

__all__ = ["LatentCache", "R1Config", "R1ForCausalLM", "R1TextModel"]
