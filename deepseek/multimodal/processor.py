"""R1Processor: one call turning text (or chat messages) + media into model inputs.

    processor = R1Processor.from_pretrained("deepseek/r1-tiny-mm")        # tokenizer + config.json "multimodal"
    inputs = processor(text="<image>\\nWhich digit is this?", images=["seven.png"])
    inputs = processor(messages=[{"role": "user", "content": [{"type": "image", "image": "seven.png"},
                                                              {"type": "text", "text": "Which digit?"}]}])
    inputs["input_ids"] (B, T) left-padded, inputs["attention_mask"] (B, T), inputs["media"] {modality: [decoded]}
    model.generate(**inputs, max_new_tokens=64)

Every `<image>` / `<audio>` / `<points>` in the text becomes K copies of its placeholder id (K =
tokens_per_item); the i-th placeholder of a modality, in order over the batch, takes that modality's i-th
item. With `messages` the chat template is applied and each media part becomes its placeholder in place.
Content parts: {"type": "text", "text"}, {"type": "image" | "audio" | "points", <that key>: item} (a path,
bytes, PIL image, (samples, rate), array), and OpenAI's {"type": "image_url", "image_url": {"url":
"data:image/png;base64,..."}}, {"type": "input_audio", "input_audio": {"data": b64, "format": "wav"}},
{"type": "input_points", "input_points": {"data": b64 of a file, "format": "npy" | "ply" | "xyz"}}.
"""

from __future__ import annotations

import base64
import binascii
import json
from pathlib import Path

import torch

from .lm import PLACEHOLDERS, MultimodalLMConfig, check_placeholders
from .media import LM_MODALITIES, decode

PROCESSOR_FILE = "processor_config.json"
OPENAI_PARTS = {"image_url": "image", "input_audio": "audio", "input_points": "points"}
POINT_FORMATS = ("npy", "ply", "xyz")


def _b64(data, what: str) -> bytes:
    if not isinstance(data, str) or not data:
        raise ValueError(f"{what}: expected a non-empty base64 string")
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what}: not valid base64") from None


def part_media(part: dict, allow_remote: bool = False) -> tuple[str, object] | None:
    """(modality, item) of a media content part; None for a text part. ValueError for anything else."""
    if not isinstance(part, dict) or "type" not in part:
        raise ValueError(f"a content part must be an object with a 'type', got {str(part)[:60]!r}")
    kind = part["type"]
    if kind == "text":
        return None
    if kind in LM_MODALITIES:
        if part.get(kind) is None:
            raise ValueError(f"a {kind!r} content part needs its item under {kind!r}")
        return kind, part[kind]
    if kind == "image_url":
        url = (part.get("image_url") or {}).get("url") if isinstance(part.get("image_url"), dict) else None
        if not isinstance(url, str) or not url:
            raise ValueError("image_url part: expected {'image_url': {'url': 'data:image/png;base64,...'}}")
        if url.startswith("data:"):
            head, _, data = url.partition(",")
            if not head.endswith(";base64") or head[5:].split(";")[0] not in ("image/png", "image/jpeg", "image/jpg"):
                raise ValueError(f"image_url: only base64 PNG or JPEG data URLs are accepted, got {head[:40]!r}")
            return "image", _b64(data, "image_url")
        if url.startswith(("http://", "https://")):
            if not allow_remote:
                raise ValueError("image_url: remote URLs are not fetched by this server; send a data: URL "
                                 "(data:image/png;base64,...)")  # fmt: skip
            raise ValueError("image_url: remote URLs are not supported yet; send a data: URL")
        raise ValueError(f"image_url: expected a data: URL, got {url[:40]!r}")
    if kind == "input_audio":
        spec = part.get("input_audio")
        if not isinstance(spec, dict):
            raise ValueError("input_audio part: expected {'input_audio': {'data': '<base64 wav>', 'format': 'wav'}}")
        if spec.get("format") != "wav":
            raise ValueError(f"input_audio: unsupported format {spec.get('format')!r}; only 'wav' is accepted")
        return "audio", _b64(spec.get("data"), "input_audio.data")
    if kind == "input_points":
        spec = part.get("input_points")
        if not isinstance(spec, dict):
            raise ValueError("input_points part: expected {'input_points': {'data': '<base64 .npy>', 'format': 'npy'}}")
        fmt = spec.get("format")
        if fmt not in POINT_FORMATS:
            raise ValueError(f"input_points: unsupported format {fmt!r}; expected one of {', '.join(POINT_FORMATS)}")
        from .media import read_points_file

        return "points", read_points_file(_b64(spec.get("data"), "input_points.data"), "." + fmt)
    raise ValueError(f"unknown content part type {kind!r}: expected text, image_url, input_audio, input_points "
                     "(or image, audio, points)")  # fmt: skip


def flatten_messages(messages, allow_remote: bool = False) -> tuple[list[dict], dict[str, list]]:
    """Messages whose content may be a list of parts -> (messages with string content holding the
    placeholders, {modality: [items in order]})."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    flat, media = [], {m: [] for m in LM_MODALITIES}
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            pieces = []
            for part in content:
                found = part_media(part, allow_remote)
                if found is None:
                    text = part.get("text")
                    if not isinstance(text, str):
                        raise ValueError("a text content part needs a string under 'text'")
                    pieces.append(text)
                else:
                    media[found[0]].append(found[1])
                    pieces.append(PLACEHOLDERS[found[0]])
            content = "\n".join(pieces)
        flat.append({**message, "content": content if content is not None else ""})
    return flat, media


def text_only(messages) -> list[dict]:
    """Messages for a text model: content parts joined; any media part is refused."""
    flat, media = flatten_messages(messages)
    if any(media.values()):
        kinds = ", ".join(m for m, items in media.items() if items)
        raise ValueError(f"this model is a text model: it takes no {kinds} (load a multimodal checkpoint)")
    return flat


class R1Processor:
    def __init__(self, tokenizer, config: MultimodalLMConfig | dict):
        self.tokenizer = tokenizer
        self.config = config if isinstance(config, MultimodalLMConfig) else MultimodalLMConfig(**config)
        self.encoder_config = self.config.encoder_config
        for modality, ph in self.config.placeholder_ids.items():
            if tokenizer.convert_tokens_to_ids(PLACEHOLDERS[modality]) != ph:
                raise ValueError(f"the tokenizer's {PLACEHOLDERS[modality]} is not token {ph} as the model's config says")

    @classmethod
    def from_pretrained(cls, folder) -> R1Processor:
        from transformers import AutoTokenizer

        from ..compat.checkpoint import resolve

        path = resolve(folder)
        section = json.loads((path / "config.json").read_text()).get("multimodal")
        if not section:
            raise ValueError(f"{path} is a text model: its config.json has no 'multimodal' section")
        return cls(AutoTokenizer.from_pretrained(str(path)), section)

    def save_pretrained(self, folder) -> Path:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(str(folder))
        spec = {"processor_class": "R1Processor", **self.config.to_dict()}
        (folder / PROCESSOR_FILE).write_text(json.dumps(spec, indent=1) + "\n")
        return folder

    def expand(self, ids: list[int]) -> list[int]:
        """Each placeholder id -> tokens_per_item copies of it."""
        K, phs = self.config.tokens_per_item, set(self.config.placeholder_ids.values())
        out = []
        for i in ids:
            out.extend([i] * K if i in phs else [i])
        return out

    def __call__(self, text=None, images=None, audio=None, points=None, messages=None,
                 allow_remote: bool = False) -> dict:  # fmt: skip
        from ..chat import chat_prompt_ids

        if (text is None) == (messages is None):
            raise ValueError("pass text=... or messages=..., not both")
        media = {"image": list(images or []), "audio": list(audio or []), "points": list(points or [])}
        rows: list[list[int]] = []
        if messages is not None:
            conversations = [messages] if isinstance(messages, str) or isinstance(messages[0], dict) else messages
            for conversation in conversations:
                flat, found = flatten_messages(conversation, allow_remote)
                for m in LM_MODALITIES:
                    media[m] += found[m]
                rows.append(chat_prompt_ids(self.tokenizer, flat))
        else:
            for t in [text] if isinstance(text, str) else list(text):
                rows.append(self.tokenizer.encode(t, add_special_tokens=False))
        rows = [self.expand(r) for r in rows]
        unsupported = [m for m in LM_MODALITIES if media[m] and m not in self.config.placeholder_ids]
        if unsupported:
            raise ValueError(f"this model takes no {', '.join(unsupported)}")
        T = max(len(r) for r in rows)
        if T == 0:
            raise ValueError("the prompt is empty")
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros(len(rows), T, dtype=torch.long)
        for b, r in enumerate(rows):  # left padding, as generation expects
            if r:
                ids[b, T - len(r):] = torch.tensor(r)
                mask[b, T - len(r):] = 1
        check_placeholders(self.config, ids, media)  # before decoding anything
        decoded = {m: [decode(m, item, self.encoder_config) for item in items] for m, items in media.items() if items}
        return {"input_ids": ids, "attention_mask": mask, "media": decoded}
