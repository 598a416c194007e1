"""Image encoder: any size and mode (PIL or numpy; grayscale, RGB, RGBA) -> patch tokens + pooled vector.

Shapes: B batch, C=3 channels, G grid (config.image_grid), P = (G/4)^2 patch tokens, D shared width.
Preprocessing: alpha is composited over black, grayscale is replicated to RGB, values scaled to [0, 1],
then bilinear (antialiased) resize to G x G. A conv stem (two stride-2 stages) turns the grid into P tokens.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import EncoderOutput, MultimodalConfig, Trunk


def image_to_array(image) -> np.ndarray:
    """PIL image, numpy array (H, W) / (H, W, 1|3|4), or encoded bytes -> float32 (H, W, 3) in [0, 1]."""
    if isinstance(image, (bytes, bytearray)):
        from PIL import Image, UnidentifiedImageError

        try:
            image = Image.open(io.BytesIO(image))
            image.load()
        except (UnidentifiedImageError, OSError) as e:
            raise ValueError(f"undecodable image ({len(image)} bytes): expected PNG or JPEG data ({e})") from None
    if hasattr(image, "mode") and hasattr(image, "convert"):  # PIL
        image = image.convert("RGBA" if "A" in image.mode or image.mode == "P" else "RGB")
        image = np.asarray(image)
    a = np.asarray(image)
    if a.dtype == object or a.size == 0:
        raise ValueError(f"image must be a non-empty numeric array, got dtype {a.dtype} shape {a.shape}")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[-1] not in (3, 4)):
        raise ValueError(f"image array must be (H, W) or (H, W, 1|3|4), got shape {a.shape}")
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    elif a.dtype == np.uint16:
        a = a.astype(np.float32) / 65535.0
    elif a.dtype == bool:
        a = a.astype(np.float32)
    else:
        a = a.astype(np.float32)
        if not np.isfinite(a).all():
            raise ValueError("image contains NaN or infinite values")
        hi = float(a.max())
        if hi > 1.0:  # e.g. scikit-learn's digits (0..16) or 0..255 floats: scale by the max
            a = a / hi
        a = np.clip(a, 0.0, 1.0)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    elif a.shape[-1] == 4:
        a = a[..., :3] * a[..., 3:4]  # composite over black
    return np.ascontiguousarray(a, dtype=np.float32)


def preprocess_images(images, grid: int) -> torch.Tensor:
    """A list of images (any size/mode) or a float tensor (B, 3, H, W) -> (B, 3, grid, grid) in [0, 1]."""
    if isinstance(images, torch.Tensor):
        x_BCHW = images.float()
        if x_BCHW.ndim != 4 or x_BCHW.shape[1] != 3:
            raise ValueError(f"image tensor must be (B, 3, H, W), got {tuple(x_BCHW.shape)}")
    else:
        if not isinstance(images, (list, tuple)):
            images = [images]
        x_BCHW = None
        outs = []
        for im in images:
            t_CHW = torch.from_numpy(image_to_array(im)).permute(2, 0, 1)
            outs.append(resize(t_CHW[None], grid)[0])
        x_BCHW = torch.stack(outs)
    return resize(x_BCHW, grid)


def resize(x_BCHW: torch.Tensor, grid: int) -> torch.Tensor:
    if x_BCHW.shape[-2:] == (grid, grid):
        return x_BCHW
    return F.interpolate(x_BCHW, size=(grid, grid), mode="bilinear", antialias=True, align_corners=False)


class ImageEncoder(nn.Module):
    def __init__(self, cfg: MultimodalConfig):
        super().__init__()
        self.cfg = cfg
        D, c = cfg.dim, cfg.dim // 2

        def block(i, o, s):
            return nn.Sequential(nn.Conv2d(i, o, 3, s, 1), nn.GroupNorm(8, o), nn.GELU())

        self.stem = nn.Sequential(block(3, c, 2), block(c, D, 2))
        P = (cfg.image_grid // 4) ** 2
        self.pos_PD = nn.Parameter(torch.zeros(P, D))
        self.trunk = Trunk(cfg)

    def forward(self, images) -> EncoderOutput:
        x_BCHW = preprocess_images(images, self.cfg.image_grid).to(self.pos_PD.device)
        f_BDhw = self.stem(x_BCHW * 2.0 - 1.0)
        tokens_BPD = f_BDhw.flatten(2).transpose(1, 2) + self.pos_PD
        return self.trunk(tokens_BPD)
