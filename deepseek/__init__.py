"""deepseek: an open implementation of the DeepSeek-R1 system.

    from deepseek import R1Model
    model = R1Model.from_pretrained("deepseek/r1-base")

Importing `deepseek` is cheap (no torch, no transformers), so `deepseek --help` answers at once. The model
classes load on first access (`deepseek.R1Model`, `from deepseek import R1Config`), which also registers
them with transformers' AutoConfig / AutoModelForCausalLM (model_type `deepseek_r1`).
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"
__all__ = ["LatentCache", "R1Config", "R1ForCausalLM", "R1Model", "R1TextModel", "__version__"]

# public name -> (module, attribute); R1Model is the SDK class the source document names (deepseek/sdk.py)
MODEL_NAMES = {"LatentCache": (".model", "LatentCache"), "R1Config": (".model", "R1Config"),
               "R1ForCausalLM": (".model", "R1ForCausalLM"), "R1TextModel": (".model", "R1TextModel"),
               "R1Model": (".sdk", "R1Model")}  # fmt: skip


def register_auto_classes() -> None:
    """Make transformers' AutoConfig / AutoModelForCausalLM resolve `deepseek_r1` configs (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .model import R1Config
    from .sdk import R1Model

    AutoConfig.register(R1Config.model_type, R1Config, exist_ok=True)
    AutoModelForCausalLM.register(R1Config, R1Model, exist_ok=True)


def __getattr__(name: str):
    if name not in MODEL_NAMES:
        raise AttributeError(f"module 'deepseek' has no attribute {name!r}")
    register_auto_classes()
    for public, (module, attr) in MODEL_NAMES.items():  # cache them all: later accesses skip __getattr__
        globals()[public] = getattr(importlib.import_module(module, __name__), attr)
    return globals()[name]


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
