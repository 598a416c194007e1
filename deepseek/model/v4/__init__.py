"""DeepSeek-V4 (Flash, Pro): config.py (V4Config, the published config.json as is), model.py (V4ForCausalLM:
shared-KV attention with window / CSA / HCA entries, hyper-connections, hash-routed and sqrtsoftplus MoE),
cache.py (V4Cache: window, compressed entries, indexer keys). Checkpoints: deepseek/compat/v4.py."""

from .cache import V4Cache
from .config import V4Config
from .model import V4ForCausalLM

__all__ = ["V4Cache", "V4Config", "V4ForCausalLM"]
