"""deepseek: an open implementation of the DeepSeek-R1 system.

    from deepseek import R1Model
    model = R1Model.from_pretrained("deepseek/r1-base")
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .model import LatentCache, R1Config, R1ForCausalLM, R1TextModel

R1Model = R1ForCausalLM  # the SDK name used by the source document

AutoConfig.register(R1Config.model_type, R1Config, exist_ok=True)
AutoModelForCausalLM.register(R1Config, R1ForCausalLM, exist_ok=True)

__version__ = "0.1.0"
__all__ = ["LatentCache", "R1Config", "R1ForCausalLM", "R1Model", "R1TextModel", "__version__"]
