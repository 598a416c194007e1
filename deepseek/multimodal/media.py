"""Media items as users hand them over -> the decoded, validated form the encoders take.

    decode("image", "photo.png" | png_bytes | PIL.Image | array)       -> float32 (H, W, 3) in [0, 1]
    decode("audio", "clip.wav" | wav_bytes | (samples, rate))           -> (float32 samples at 16 kHz, 16000)
    decode("points", "cloud.npy|.ply|.xyz" | file bytes | (N, 3|6) array) -> float32 (N, 3|6)

Every front end (processor, SDK, CLI, API) decodes here, before any model work, so bad media fails in one
line that says what was wrong. Decoded items are what `BindingModel.encode` accepts.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .base import MultimodalConfig

LM_MODALITIES = ("image", "audio", "points")  # what the language model takes besides text
MAX_IMAGE_PIXELS = 4096 * 4096  # larger images are refused before decoding (decompression bombs)


def decode(modality: str, item, cfg: MultimodalConfig):
    if modality == "image":
        return decode_image(item)
    if modality == "audio":
        return decode_audio(item, cfg)
    if modality == "points":
        return decode_points(item, cfg)
    raise ValueError(f"unknown media type {modality!r}: expected one of {', '.join(LM_MODALITIES)}")


def _read(item, what: str) -> bytes | None:
    """The bytes of a path (str / Path) or bytes-like item; None for in-memory objects."""
    if isinstance(item, (bytes, bytearray, memoryview)):
        return bytes(item)
    if isinstance(item, (str, Path)):
        path = Path(item).expanduser()
        if not path.is_file():
            raise ValueError(f"{what} file not found: {item}")
        return path.read_bytes()
    return None


def decode_image(item) -> np.ndarray:
    from .image import image_to_array

    data = _read(item, "image")
    if data is not None:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(io.BytesIO(data)) as probe:  # reads the header only
                w, h = probe.size
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"undecodable image ({len(data)} bytes): expected PNG or JPEG data ({e})") from None
        if w * h > MAX_IMAGE_PIXELS:
            raise ValueError(f"image is {w}x{h} pixels: the limit is {MAX_IMAGE_PIXELS} pixels")
        item = data
    return image_to_array(item)


def decode_audio(item, cfg: MultimodalConfig) -> tuple[np.ndarray, int]:
    from .audio import load_audio

    data = _read(item, "audio")
    x_T = load_audio(data if data is not None else item, cfg)
    return x_T.numpy(), cfg.sample_rate


def decode_points(item, cfg: MultimodalConfig) -> np.ndarray:
    from .pointfiles import load_points
    from .points import validate_points

    if isinstance(item, (str, Path, bytes, bytearray, memoryview)):
        item = load_points(item)
    return validate_points(item, cfg.max_points).numpy()


def read_points_file(data: bytes, suffix: str = "") -> np.ndarray:
    """.npy, .ply or .xyz bytes -> (N, 3|6) array (format from the suffix, else sniffed from the content)."""
    from .pointfiles import load_points

    return load_points(data, suffix.lstrip(".") or None)
