"""The language model's multimodal component: bound encoders + one projector per modality, spliced into the
LM's input embeddings at the placeholder tokens.

Shapes: B batch, T tokens, D LM hidden size, n items of one modality, K LM tokens per item.

    adapter = MultimodalAdapter(MultimodalLMConfig(...), lm_hidden=128)
    x_BTD = adapter.splice(embed_tokens(ids_BT), ids_BT, {"image": [img, ...], "audio": [...], "points": [...]})

A prompt holds K copies of a modality's placeholder id per item (the processor expands each `<image>` into
K); the i-th run of K placeholders of a modality, in row-major order over the batch, takes that modality's
i-th item. The embedding at every placeholder position is exactly the projector's output, so the latent
cache, continuous batching and billing treat media like tokens. `R1Model` (deepseek/sdk.py) owns one of
these when its config has a "multimodal" section; a checkpoint without one is a text model.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .base import MultimodalConfig
from .binding import EMBED_KEYS, BindingModel
from .media import LM_MODALITIES, decode
from .projector import Projector

PLACEHOLDERS = {"image": "<image>", "audio": "<audio>", "points": "<points>"}
WEIGHTS_FILE = "multimodal.safetensors"  # next to the LM's model.safetensors; keys "multimodal.*"


@dataclass
class MultimodalLMConfig:
    """Saved as config.json's "multimodal" section."""

    placeholder_ids: dict[str, int]  # modality -> token id of its placeholder in the LM's vocabulary
    tokens_per_item: int = 8  # K LM embeddings per image / audio clip / point cloud
    encoder: dict = field(default_factory=lambda: MultimodalConfig().to_dict())  # MultimodalConfig fields
    anchor: str = "text"
    max_items: int = 8  # media items per prompt (each costs K prompt tokens)

    def __post_init__(self):
        unknown = set(self.placeholder_ids) - set(LM_MODALITIES)
        if unknown or not self.placeholder_ids:
            raise ValueError(f"multimodal.placeholder_ids must map some of {LM_MODALITIES} to token ids, "
                             f"got {self.placeholder_ids}")  # fmt: skip
        if len(set(self.placeholder_ids.values())) != len(self.placeholder_ids):
            raise ValueError(f"multimodal.placeholder_ids must be distinct, got {self.placeholder_ids}")
        if self.tokens_per_item < 2:
            raise ValueError(f"multimodal.tokens_per_item must be >= 2, got {self.tokens_per_item}")
        if self.max_items < 1:
            raise ValueError(f"multimodal.max_items must be >= 1, got {self.max_items}")
        MultimodalConfig(**self.encoder)  # validates

    @property
    def encoder_config(self) -> MultimodalConfig:
        return MultimodalConfig(**self.encoder)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in LM_MODALITIES if m in self.placeholder_ids)

    def to_dict(self) -> dict:
        return asdict(self)


def check_placeholders(config: MultimodalLMConfig, input_ids: torch.Tensor, media: dict[str, list] | None) -> None:
    """Each modality's placeholder count must be K x its number of items (one-line ValueError otherwise)."""
    K = config.tokens_per_item
    per_row = sum((input_ids == ph).sum(-1) for ph in config.placeholder_ids.values()) // K
    if per_row.numel() and int(per_row.max()) > config.max_items:
        raise ValueError(f"{int(per_row.max())} media items in one prompt: the limit is {config.max_items}")
    for modality, ph in config.placeholder_ids.items():
        n_ph = int((input_ids == ph).sum())
        n_items = len((media or {}).get(modality) or [])
        if n_ph == K * n_items:
            continue
        what = PLACEHOLDERS[modality]
        if n_items and not n_ph:
            raise ValueError(f"{n_items} {modality} item(s) given but the prompt has no {what} placeholder")
        if n_ph and not n_items:
            raise ValueError(f"the prompt has a {what} placeholder but no {modality} was given")
        raise ValueError(f"the prompt has {n_ph / K:g} {what} placeholder(s) ({n_ph} tokens, {K} per item) "
                         f"for {n_items} {modality} item(s)")  # fmt: skip


class MultimodalAdapter(nn.Module):
    def __init__(self, config: MultimodalLMConfig | dict, lm_hidden: int):
        super().__init__()
        self.config = config if isinstance(config, MultimodalLMConfig) else MultimodalLMConfig(**config)
        cfg = self.config.encoder_config
        self.binding = BindingModel(cfg, anchor=self.config.anchor)
        K = self.config.tokens_per_item
        self.projectors = nn.ModuleDict({m: Projector(cfg.dim, lm_hidden, K) for m in self.config.modalities})

    # ------------------------------------------------------------------ inputs
    def decode(self, media: dict[str, list]) -> dict[str, list]:
        """Validate and decode every item (one-line ValueError naming the problem); unknown kinds refused."""
        out = {}
        for modality, items in (media or {}).items():
            if modality not in self.config.modalities:
                raise ValueError(f"this model takes {', '.join(self.config.modalities)} media, not {modality!r}")
            out[modality] = [decode(modality, item, self.binding.cfg) for item in list(items or [])]
        return out

    # ------------------------------------------------------------------ forward
    def project(self, modality: str, items: list) -> torch.Tensor:
        """Decoded items -> (n, K, D) LM embeddings."""
        out = self.binding.encode(modality, items)
        return self.projectors[modality](out.tokens, out.mask, out.pooled)

    def splice(self, embeds_BTD: torch.Tensor, input_ids_BT: torch.Tensor, media: dict[str, list]) -> torch.Tensor:
        """Replace the placeholder positions of `embeds_BTD` with the projected media (decoded items)."""
        check_placeholders(self.config, input_ids_BT, media)
        x_BTD = embeds_BTD
        for modality, items in (media or {}).items():
            if not items:
                continue
            at_BT = input_ids_BT == self.config.placeholder_ids[modality]
            proj_nKD = self.project(modality, items).to(x_BTD.dtype)
            x_BTD = x_BTD.masked_scatter(at_BT[..., None], proj_nKD.reshape(-1, x_BTD.shape[-1]))
        return x_BTD

    def embed(self, **inputs) -> dict[str, torch.Tensor]:
        """Shared-space unit vectors: embed(text=[...], images=[...], audio=[...], points=[...])."""
        decoded = {}
        for key, items in inputs.items():
            if items is None:
                continue
            if key not in EMBED_KEYS:
                raise ValueError(f"embed() takes text, images, audio, points; got {key!r}")
            modality = EMBED_KEYS[key]
            items = [items] if isinstance(items, str) else list(items)
            decoded[key] = items if modality == "text" else [decode(modality, x, self.binding.cfg) for x in items]
        return self.binding.embed(**decoded)


def attach(model, tokenizer, binding: BindingModel, tokens_per_item: int = 8, modalities=LM_MODALITIES) -> None:
    """Give an R1Model (a text checkpoint) the multimodal component: `binding`'s trained encoders plus fresh
    projectors; the config gains its "multimodal" section, so save_pretrained writes both."""
    ids = {m: tokenizer.convert_tokens_to_ids(PLACEHOLDERS[m]) for m in modalities}
    unk = getattr(tokenizer, "unk_token_id", None)
    missing = [PLACEHOLDERS[m] for m, i in ids.items() if i is None or (unk is not None and i == unk)]
    if missing:
        raise ValueError(f"the tokenizer has no {', '.join(missing)} token(s): add them before attaching media")
    config = MultimodalLMConfig(placeholder_ids=ids, tokens_per_item=tokens_per_item,
                                encoder=binding.cfg.to_dict(), anchor=binding.anchor)  # fmt: skip
    adapter = MultimodalAdapter(config, model.config.hidden_size)
    adapter.binding.load_state_dict(binding.state_dict())
    model.multimodal = adapter.to(next(model.parameters()).device)
    model.config.multimodal = config.to_dict()
