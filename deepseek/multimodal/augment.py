"""Training-time augmentation of images (the binding's training in benchmarks/multimodal.py, and the LM stage's
augmented feature views in deepseek/train/multimodal.py).

Shapes: B batch, H x W input pixels, G the encoder's grid (MultimodalConfig.image_grid).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def U(g, n, lo, hi):
    return lo + (hi - lo) * torch.rand(n, generator=g)


def aug_images(x_BHW, g, grid):
    """Random affine, stroke thickness (dilated half the time), resolution (always down to 7-10 px and back:
    the test digits are 8x8) with 17-level quantisation half the time, and contrast."""
    B = x_BHW.shape[0]
    x = F.interpolate(x_BHW[:, None], size=(grid, grid), mode="bilinear", antialias=True)
    ang, sc, sh = U(g, B, -0.3, 0.3), U(g, B, 0.8, 1.15), U(g, B, -0.25, 0.25)
    tx, ty = U(g, B, -0.12, 0.12), U(g, B, -0.12, 0.12)
    A = torch.stack([torch.stack([torch.cos(ang) / sc, -torch.sin(ang) / sc + sh, tx], 1),
                     torch.stack([torch.sin(ang) / sc, torch.cos(ang) / sc, ty], 1)], 1)
    x = F.grid_sample(x, F.affine_grid(A, x.shape, align_corners=False), align_corners=False)
    r = torch.rand(B, generator=g)
    x = torch.where((r < 0.5).view(-1, 1, 1, 1), F.max_pool2d(x, 3, 1, 1), x)
    x = torch.where((r > 0.9).view(-1, 1, 1, 1), -F.max_pool2d(-x, 3, 1, 1), x)
    out = []
    for i in range(B):
        res = int(torch.randint(7, 11, (1,), generator=g))
        lo = F.interpolate(x[i:i + 1], size=(res, res), mode="area")
        if torch.rand(1, generator=g) < 0.5:
            lo = torch.round(lo * 16) / 16  # the test digits have 17 grey levels
        out.append(F.interpolate(lo, size=(grid, grid), mode="bilinear", antialias=True))
    x = torch.cat(out).clamp(0, 1)
    x = x / x.amax((1, 2, 3), keepdim=True).clamp_min(1e-3)
    return (x ** U(g, B, 0.6, 1.5).view(-1, 1, 1, 1)).expand(-1, 3, -1, -1)
