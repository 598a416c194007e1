"""Training checkpoints: model weights (DeepSeek-V3 layout safetensors, loadable by R1Model.from_pretrained),
optimizer, scheduler, RNG and data position, written to a temporary folder and renamed into place.

    <out_dir>/checkpoints/step_000100/  config.json, model.safetensors, [tokenizer files],
                                         optimizer.pt, trainer_state.json, rng.pt
    <out_dir>/checkpoints/.tmp-step_000100-*   a checkpoint being written (never loaded, swept on the next save)

A checkpoint folder exists under its final name only once every file in it is complete, so a run killed at
any moment leaves either the previous checkpoints or the new one, never a half-written one that later loads.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..compat.checkpoint import save_pretrained
from ..compat.keys import module_to_checkpoint
from ..model.transformer import R1ForCausalLM

PREFIX = "step_"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
RAW_WEIGHTS = "trainer_model.safetensors"  # a model that is not a plain R1ForCausalLM (e.g. a PEFT wrapper)


def checkpoint_dir(out_dir) -> Path:
    return Path(out_dir) / "checkpoints"


def list_checkpoints(out_dir) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(out_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(out_dir) -> Path | None:
    found = list_checkpoints(out_dir)
    return found[-1] if found else None


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(out_dir, step: int, model, model_state: dict, optim_state: dict, trainer_state: dict,
                    tokenizer_dir=None, keep: int = 2) -> Path:  # fmt: skip
    """Write one checkpoint (call on rank 0 with full, CPU state dicts). Returns its folder."""
    root = checkpoint_dir(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"{PREFIX}{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        save_model(model, model_state, tmp)
        if tokenizer_dir is not None:
            for name in TOKENIZER_FILES:
                if (Path(tokenizer_dir) / name).is_file():
                    shutil.copy2(Path(tokenizer_dir) / name, tmp / name)
        torch.save(optim_state, tmp / "optimizer.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        _fsync_dir(tmp)
        if final.exists():  # re-saving the same step (e.g. the end of a resumed run)
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _fsync_dir(path: Path) -> None:
    for f in path.iterdir():
        if f.is_file():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())


def save_model(model, state: dict, folder: Path) -> None:
    """R1ForCausalLM -> the DeepSeek-V3 HF layout (from_pretrained loads it); anything else (a PEFT wrapper)
    -> its raw state dict."""
    if isinstance(model, R1ForCausalLM):
        L = model.config.num_hidden_layers
        tied = model.config.tie_word_embeddings
        tensors = {}
        for name, tensor in state.items():
            if name.endswith("inv_freq") or (tied and name == "lm_head.weight"):
                continue
            for key, t in module_to_checkpoint(name, tensor, L):
                tensors[key] = t.detach().cpu().contiguous()
        save_pretrained(model, folder, state_dict=tensors)
    else:
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, str(folder / RAW_WEIGHTS))
        if hasattr(model, "config") and hasattr(model.config, "to_json_string"):
            (folder / "config.json").write_text(model.config.to_json_string())


def load_model_state(model, folder: Path) -> None:
    """Fill `model` (unwrapped, unsharded) from a checkpoint written by save_model."""
    folder = Path(folder)
    if (folder / RAW_WEIGHTS).is_file():
        missing, unexpected = model.load_state_dict(load_file(str(folder / RAW_WEIGHTS)), strict=False)
    else:
        loaded = R1ForCausalLM.from_pretrained(folder, use_mtp=len(getattr(model, "mtp", [])) > 0)
        missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if not k.endswith("inv_freq")]
    if missing or unexpected:
        raise ValueError(f"checkpoint {folder} does not match the model: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")  # fmt: skip


def load_training_state(folder: Path) -> dict:
    folder = Path(folder)
    return {
        "optimizer": torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=False),
        "rng": torch.load(folder / "rng.pt", map_location="cpu", weights_only=False),
        "trainer": json.loads((folder / "trainer_state.json").read_text()),
    }
