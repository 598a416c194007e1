"""Training-time augmentation of images and log-mels (the binding's training in benchmarks/multimodal.py, and the
LM stage's augmented feature views in deepseek/train/multimodal.py).

Shapes: B batch, H x W input pixels, G the encoder's grid (MultimodalConfig.image_grid), M mel bins, T frames.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .audio import frontend, pad_mels


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


def aug_mels(mels, g, cfg):
    """Log-mel augmentation of the raw (un-front-ended) clips: time stretch, frequency warp (vocal tract
    length), spectral tilt and ripple, a band limit (as from an 8 kHz recording) 30% of the time, a noise
    floor; then the encoder's own front end (floor, trim, lifter, mean normalisation) and padding."""
    out = []
    for m in mels:
        M, T = m.shape
        t2 = max(8, int(T * float(U(g, 1, 0.75, 1.3))))
        m = F.interpolate(m[None, None], size=(M, t2), mode="bilinear", align_corners=False)[0, 0]
        w = float(U(g, 1, 0.85, 1.15))
        src = (torch.arange(M) * w).clamp(max=M - 1)
        lo = src.floor().long()
        frac = (src - lo)[:, None]
        m = m[lo] * (1 - frac) + m[(lo + 1).clamp(max=M - 1)] * frac
        k = torch.linspace(-1, 1, M)[:, None]
        m = m + float(U(g, 1, -3, 3)) * k + float(U(g, 1, -1, 1)) * torch.sin(k * float(U(g, 1, 2, 8)) + float(U(g, 1, 0, 6)))
        if torch.rand(1, generator=g) < 0.3:
            m[int(M * float(U(g, 1, 0.625, 0.94))):] = m.min()
        floor = m.max() - float(U(g, 1, 6, 14))
        m = torch.logaddexp(m, floor + 0.5 * torch.randn(m.shape, generator=g))
        out.append(frontend(m, cfg))
    return pad_mels(out)
