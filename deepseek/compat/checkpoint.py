"""Loading and saving checkpoints in the DeepSeek-V3 Hugging Face layout (safetensors, sharded).

Reads: our own checkpoints, DeepSeek-V3/R1 release folders (per-expert keys, MTP layer, FP8 block-quantised
weights with `weight_scale_inv`), and checkpoints written by transformers' DeepseekV3ForCausalLM.
Every module tensor must be filled from the file: a missing or unexpected key, a wrong shape or an unreadable
file is an error naming it. Saving writes each file under a temporary name and renames it into place.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import register_auto_classes
from ..model.config import R1Config
from .keys import (
    MULTIMODAL_FILE,
    SCALE_SUFFIX,
    checkpoint_to_module,
    is_mtp_key,
    is_multimodal_key,
    module_to_checkpoint,
)

log = logging.getLogger(__name__)
INDEX_FILE = "model.safetensors.index.json"
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "bundled"
FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n))


# ---------------------------------------------------------------------------- names
def bundled_names() -> list[str]:
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(f"deepseek/{p.name}" for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file())


def resolve(name_or_path: str | os.PathLike) -> Path:
    """A local folder, a bundled name (`deepseek/r1-tiny`), or a repo id present in the local HF cache."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json; is it a model folder?")
        return path
    name = str(name_or_path)
    short = name.removeprefix("deepseek/")
    if (BUNDLED_DIR / short / "config.json").is_file():
        return BUNDLED_DIR / short
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, local_files_only=True))
    except Exception:
        pass
    bundled = ", ".join(bundled_names()) or "(none bundled)"
    raise FileNotFoundError(
        f"model {name!r} not found: not a folder, not bundled ({bundled}), not in the local Hugging Face cache"
    )


# ---------------------------------------------------------------------------- FP8
def dequantize_fp8(weight: torch.Tensor, scale_inv: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """Block-quantised FP8 (one fp32 scale per block, DeepSeek-V3 uses 128x128) -> dtype."""
    out_dim, in_dim = weight.shape
    rows, cols = scale_inv.shape
    block_r, block_c = -(-out_dim // rows), -(-in_dim // cols)
    scale = scale_inv.float().repeat_interleave(block_r, 0)[:out_dim].repeat_interleave(block_c, 1)[:, :in_dim]
    return (weight.float() * scale).to(dtype)


def quantize_fp8(weight: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of dequantize_fp8 (e4m3, per-block absmax scaling), used to write FP8 test checkpoints."""
    out_dim, in_dim = weight.shape
    rows, cols = -(-out_dim // block), -(-in_dim // block)
    padded = torch.zeros(rows * block, cols * block)
    padded[:out_dim, :in_dim] = weight.float()
    blocks = padded.view(rows, block, cols, block)
    scale = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / 448.0  # e4m3 max
    q = (blocks / scale[:, None, :, None]).to(torch.float8_e4m3fn).view(rows * block, cols * block)
    return q[:out_dim, :in_dim].contiguous(), scale


# ---------------------------------------------------------------------------- load
def _open(file: Path):
    try:
        return safe_open(str(file), framework="pt")
    except Exception as exc:  # truncated, corrupt or not safetensors
        raise ValueError(f"cannot read checkpoint file {file}: {exc}") from None


def checkpoint_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / f for f in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists files that are not there: {', '.join(missing)}")
        return files + [path / MULTIMODAL_FILE] * (path / MULTIMODAL_FILE).is_file()
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {path} (only safetensors checkpoints are supported)")
    return files


def load_pretrained(cls, name_or_path, config: R1Config | None = None, dtype=None, torch_dtype=None,
                    device="cpu", use_mtp: bool | None = None, **overrides):  # fmt: skip
    path = resolve(name_or_path)
    overrides.pop("trust_remote_code", None)
    if config is None:  # from the dict: a "deepseek_v3" config.json is ours to read (no model-type warning)
        config_dict, _ = R1Config.get_config_dict(str(path))
        if config_dict.get("model_type") == "deepseek_v2":  # V2 / V2-Lite / V2.5 / Coder-V2: softmax scores
            config_dict = {"scoring_func": "softmax", "norm_topk_prob": False, **config_dict}
        config = R1Config.from_dict({**{k: v for k, v in config_dict.items() if k != "model_type"}, **overrides})
    config._name_or_path = str(path)  # where the weights came from (the SDK finds the tokenizer there)
    dtype = dtype or torch_dtype
    if dtype in (None, "auto"):
        dtype = torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    elif isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    files = checkpoint_files(path)
    handles = {f: _open(f) for f in files}
    key_file = {k: f for f, h in handles.items() for k in h.keys()}
    has_mtp = any(is_mtp_key(k, config.num_hidden_layers) for k in key_file)
    if use_mtp is None:
        use_mtp = has_mtp
    config.build_mtp = bool(use_mtp and config.num_nextn_predict_layers > 0)
    if config.build_mtp and not has_mtp:
        raise ValueError(f"use_mtp=True but {path} holds no MTP weights (model.layers.{config.num_hidden_layers}.*)")
    if getattr(config, "quantization_config", None):
        del config.quantization_config  # weights are dequantised on load

    with torch.device("meta"):
        model = cls(config)
    model.to_empty(device=device)
    model.to(dtype)
    for module in model.modules():  # routers in fp32, rotary tables recomputed (to_empty left them garbage)
        if hasattr(module, "e_score_correction_bias"):
            module.float()
        if hasattr(module, "inv_freq"):
            from ..model.rope import rope_frequencies

            module.inv_freq = rope_frequencies(config.rope_parameters, config.qk_rope_head_dim)[0].to(device)
    adapter = getattr(model, "multimodal", None)  # R1Model's multimodal component (None for a text model)
    if adapter is not None:  # rebuilt off the meta device (its mel filterbank and positions are computed, not
        # stored) and kept in fp32 whatever the LM's dtype (1M parameters; STFTs want fp32)
        model.multimodal = type(adapter)(adapter.config, config.hidden_size).to(device)
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    filled: dict[str, torch.Tensor] = {}  # name -> bool mask of filled (expert, part) slots or scalar
    unexpected = []
    skipped_media = False
    for key, file in key_file.items():
        if key.endswith(SCALE_SUFFIX):
            continue
        if is_mtp_key(key, config.num_hidden_layers) and not config.build_mtp:
            continue
        if is_multimodal_key(key) and key not in params:  # a text-only class reading a multimodal checkpoint
            skipped_media = True
            continue
        target = checkpoint_to_module(key, config.num_hidden_layers)
        if target.name not in params:
            unexpected.append(key)
            continue
        tensor = _read(handles[file], key, file)
        if tensor.dtype in FP8_DTYPES:
            scale_key = key + SCALE_SUFFIX
            if scale_key not in key_file:
                raise ValueError(f"FP8 weight {key} in {file.name} has no {scale_key}")
            tensor = dequantize_fp8(tensor, _read(handles[key_file[scale_key]], scale_key, key_file[scale_key]))
        _assign(params[target.name], target, tensor, key, filled)
    if unexpected:
        raise ValueError(f"unexpected keys in {path}: {', '.join(sorted(unexpected)[:8])}"
                         + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else ""))  # fmt: skip
    if skipped_media:
        log.info("%s: multimodal weights not loaded (%s is a text model class; use deepseek.R1Model)", path,
                 cls.__name__)
    if config.multimodal and not any(is_multimodal_key(k) for k in key_file):
        raise ValueError(f"{path}/config.json has a 'multimodal' section but there is no {MULTIMODAL_FILE}")
    if config.tie_word_embeddings and "lm_head.weight" not in filled:
        filled["lm_head.weight"] = torch.tensor(True)
        model.lm_head.weight = model.model.embed_tokens.weight
    saved = set(model.state_dict())
    persistent_buffers = {n for n, _ in model.named_buffers() if not n.endswith("inv_freq") and n in saved}
    missing = [n for n in list(dict(model.named_parameters())) + sorted(persistent_buffers)
               if n not in filled or not bool(filled[n].all())]  # fmt: skip
    if missing:
        raise ValueError(f"checkpoint {path} lacks weights for: {', '.join(missing[:8])}"
                         + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))  # fmt: skip
    if (path / "generation_config.json").is_file():  # the model's own sampling defaults (one for every front end)
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(str(path))
    model.eval()
    return model


def _read(handle, key: str, file: Path) -> torch.Tensor:
    try:
        return handle.get_tensor(key)
    except Exception as exc:
        raise ValueError(f"cannot read tensor {key} from {file}: {exc}") from None


def _assign(param: torch.Tensor, target, tensor: torch.Tensor, key: str, filled: dict) -> None:
    with torch.no_grad():
        if target.expert is None:
            if tuple(tensor.shape) != tuple(param.shape):
                raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, model {tuple(param.shape)}")
            param.copy_(tensor.to(param.dtype))
            filled[target.name] = torch.tensor(True)
            return
        E = param.shape[0]
        if target.expert >= E:
            raise ValueError(f"{key}: expert {target.expert} but the config has {E} routed experts")
        if target.part == "down":
            dest, slot = param[target.expert], 0
        else:
            half = param.shape[1] // 2
            slot = 0 if target.part == "gate" else 1
            dest = param[target.expert, slot * half : (slot + 1) * half]
        if tuple(tensor.shape) != tuple(dest.shape):
            raise ValueError(f"shape mismatch for {key}: checkpoint {tuple(tensor.shape)}, model {tuple(dest.shape)}")
        dest.copy_(tensor.to(param.dtype))
        slots = filled.setdefault(target.name, torch.zeros(E, 1 if target.part == "down" else 2, dtype=torch.bool))
        slots[target.expert, slot] = True


# ---------------------------------------------------------------------------- save
def _parse_size(size: int | str) -> int:
    if isinstance(size, int):
        return size
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = size.upper().strip()
    for unit, mult in sorted(units.items(), key=lambda u: -len(u[0])):
        if s.endswith(unit):
            return int(float(s[: -len(unit)]) * mult)
    return int(s)


def _atomic_write(path: Path, writer) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        writer(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def checkpoint_state_dict(model) -> dict[str, torch.Tensor]:
    """The model's tensors under DeepSeek-V3 checkpoint keys (tied lm_head omitted)."""
    L = model.config.num_hidden_layers
    tied = model.config.tie_word_embeddings
    out = {}
    for name, tensor in model.state_dict().items():
        if name.endswith("inv_freq") or (tied and name == "lm_head.weight"):
            continue
        for key, t in module_to_checkpoint(name, tensor, L):
            out[key] = t.detach().contiguous()
    return out


def save_pretrained(model, save_directory, max_shard_size: int | str = "5GB", state_dict=None, **_):
    out_dir = Path(save_directory)
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = state_dict if state_dict is not None else checkpoint_state_dict(model)
    media = {k: tensors[k] for k in tensors if is_multimodal_key(k)}  # encoders + projectors: their own file
    tensors = {k: v for k, v in tensors.items() if not is_multimodal_key(k)}
    limit = _parse_size(max_shard_size)
    shards: list[dict] = [{}]
    size = 0
    for key in sorted(tensors):
        nbytes = tensors[key].numel() * tensors[key].element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][key] = tensors[key]
        size += nbytes
    for stale in list(out_dir.glob("model*.safetensors")) + [out_dir / INDEX_FILE, out_dir / MULTIMODAL_FILE]:
        stale.unlink(missing_ok=True)
    meta = {"format": "pt"}
    if media:
        _atomic_write(out_dir / MULTIMODAL_FILE, lambda p: save_file(media, p, metadata=meta))
    if len(shards) == 1:
        _atomic_write(out_dir / "model.safetensors", lambda p: save_file(shards[0], p, metadata=meta))
    else:
        weight_map = {}
        for i, shard in enumerate(shards, 1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            _atomic_write(out_dir / name, lambda p, s=shard: save_file(s, p, metadata=meta))
            weight_map.update(dict.fromkeys(shard, name))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        _atomic_write(out_dir / INDEX_FILE, lambda p: Path(p).write_text(json.dumps(index, indent=2)))
    _atomic_write(out_dir / "config.json", lambda p: Path(p).write_text(json.dumps(hf_config_dict(model.config),
                                                                                   indent=2, sort_keys=True)))
    if getattr(model, "generation_config", None) is not None:
        _atomic_write(out_dir / "generation_config.json",
                      lambda p: Path(p).write_text(model.generation_config.to_json_string()))  # fmt: skip
    return out_dir


def hf_config_dict(config: R1Config) -> dict:
    """config.json as DeepSeek-V3 itself writes it (model_type "deepseek_v3", DeepseekV3ForCausalLM), so
    transformers, vLLM, SGLang and llama.cpp's converter read it unchanged; this project's own settings stay
    under their own keys ("routing", "compression", ...), which those tools ignore."""
    d = config.to_dict()
    if config.scoring_func == "softmax" and config.indexer is None:  # DeepSeek-V2's routing: its own model type
        d.update(model_type="deepseek_v2", architectures=["DeepseekV2ForCausalLM"])
    elif config.indexer is None:
        d.update(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"])
    else:  # DeepSeek Sparse Attention: DeepSeek-V3.2's own config (index_topk, index_n_heads, index_head_dim)
        d.update(model_type="deepseek_v32", architectures=["DeepseekV32ForCausalLM"])
    return d


# Whatever reads or writes our checkpoints also makes transformers' AutoConfig / AutoModelForCausalLM (and so
# AutoTokenizer on a model folder) know `deepseek_r1`; `deepseek.R1Model` does the same on first access.
register_auto_classes()
