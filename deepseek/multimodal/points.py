"""Point-cloud encoder: (N, 3) xyz or (N, 6) xyz + colour/normals -> group tokens + pooled vector.

Shapes: B batch, N points (<= config.max_points), S = config.sample_points after subsampling, G groups
(config.n_groups, farthest-point sampled centres), K neighbours per group (config.group_size), D shared width.
Each cloud is centred and scaled to the unit sphere; a cloud with 3 channels gets zero extra channels.
A shared PointNet (3-layer point MLP + max over the group) embeds each group from its points' offsets to the
centre (in units of the group's radius), their extra channels and their absolute positions; a transformer
layer mixes the groups.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

from .base import EncoderOutput, MultimodalConfig, Trunk


def validate_points(points, max_points: int) -> torch.Tensor:
    """Array-like (N, 3|6) -> float32 tensor; one-line ValueError for empty, NaN, oversized, wrong shape."""
    if isinstance(points, torch.Tensor):
        p = points.detach().float().cpu()
    else:
        a = np.asarray(points)
        if a.dtype == object or not np.issubdtype(a.dtype, np.number):
            raise ValueError(f"point cloud must be numeric (N, 3) or (N, 6), got dtype {a.dtype}")
        p = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    if p.ndim != 2 or p.shape[1] not in (3, 6):
        raise ValueError(f"point cloud must be (N, 3) xyz or (N, 6) xyz + colour/normals, got {tuple(p.shape)}")
    if p.shape[0] == 0:
        raise ValueError("point cloud is empty: need at least 1 point")
    if p.shape[0] > max_points:
        raise ValueError(f"point cloud has {p.shape[0]} points: the limit is {max_points} (subsample it first)")
    if not torch.isfinite(p).all():
        raise ValueError("point cloud contains NaN or infinite coordinates")
    return p


def normalise_points(p_N6: torch.Tensor) -> torch.Tensor:
    xyz = p_N6[:, :3] - p_N6[:, :3].mean(0)
    return torch.cat([xyz / xyz.norm(dim=1).max().clamp_min(1e-6), p_N6[:, 3:]], 1)


def farthest_point_sample(xyz_BS3: torch.Tensor, G: int) -> torch.Tensor:
    """Indices (B, G): start at point 0, then repeatedly the point farthest from those already chosen."""
    B, S, _ = xyz_BS3.shape
    idx_BG = torch.zeros(B, G, dtype=torch.long, device=xyz_BS3.device)
    dist_BS = torch.full((B, S), float("inf"), device=xyz_BS3.device)
    far_B = torch.zeros(B, dtype=torch.long, device=xyz_BS3.device)
    ar = torch.arange(B, device=xyz_BS3.device)
    for g in range(G):
        idx_BG[:, g] = far_B
        d_BS = ((xyz_BS3 - xyz_BS3[ar, far_B][:, None]) ** 2).sum(-1)
        dist_BS = torch.minimum(dist_BS, d_BS)
        far_B = dist_BS.argmax(1)
    return idx_BG


def knn(query_BG3: torch.Tensor, xyz_BS3: torch.Tensor, K: int) -> torch.Tensor:
    """Indices (B, G, K) of the K nearest points of each query, nearest first."""
    d_BGS = torch.cdist(query_BG3, xyz_BS3)
    return d_BGS.topk(K, dim=-1, largest=False, sorted=True).indices


def gather(x_BSC: torch.Tensor, idx_B_: torch.Tensor) -> torch.Tensor:
    B = x_BSC.shape[0]
    flat = idx_B_.reshape(B, -1)
    out = torch.gather(x_BSC, 1, flat[..., None].expand(-1, -1, x_BSC.shape[-1]))
    return out.reshape(*idx_B_.shape, x_BSC.shape[-1])


def prepare_clouds(clouds, cfg: MultimodalConfig, seed: int = 0) -> torch.Tensor:
    """A list of (N_i, 3|6) clouds (or one) -> (B, S, 6): validated, resampled to S points (random subset
    without replacement if larger, drawn with replacement if smaller; seeded per cloud), normalised. A (B, S, 6)
    tensor given to PointsEncoder is taken as already prepared."""
    if isinstance(clouds, torch.Tensor) and clouds.ndim == 3:
        clouds = list(clouds)
    elif not isinstance(clouds, (list, tuple)):
        clouds = [clouds]
    S = cfg.sample_points
    out = []
    for c in clouds:
        g = torch.Generator().manual_seed(seed)  # per cloud: a cloud's subset does not depend on its batch
        p = validate_points(c, cfg.max_points)
        if p.shape[1] == 3:
            p = torch.cat([p, torch.zeros_like(p)], 1)
        n = p.shape[0]
        sel = torch.randperm(n, generator=g)[:S] if n >= S else torch.randint(n, (S,), generator=g)
        out.append(normalise_points(p[sel]))
    return torch.stack(out)


class PointsEncoder(nn.Module):
    def __init__(self, cfg: MultimodalConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.dim
        self.point_mlp = nn.Sequential(nn.Linear(9, D // 2), nn.LayerNorm(D // 2), nn.GELU(), nn.Linear(D // 2, D),
                                       nn.LayerNorm(D), nn.GELU(), nn.Linear(D, D))
        self.trunk = Trunk(cfg)

    def forward(self, clouds) -> EncoderOutput:
        p_BS6 = clouds if isinstance(clouds, torch.Tensor) and clouds.ndim == 3 and clouds.shape[-1] == 6 \
            else prepare_clouds(clouds, self.cfg)
        p_BS6 = p_BS6.to(self.point_mlp[0].weight.device)
        xyz_BS3 = p_BS6[..., :3]
        centres_BG = farthest_point_sample(xyz_BS3, self.cfg.n_groups)
        c_BG3 = gather(xyz_BS3, centres_BG)
        nb_BGK = knn(c_BG3, xyz_BS3, self.cfg.group_size)
        g_BGK6 = gather(p_BS6, nb_BGK)
        rel_BGK3 = g_BGK6[..., :3] - c_BG3[:, :, None]
        radius_BG11 = rel_BGK3.norm(dim=-1).amax(-1)[..., None, None].clamp_min(1e-6)
        # offsets in group radii, extra channels, and the absolute position (so max-pooling keeps "what where")
        local_BGK9 = torch.cat([rel_BGK3 / radius_BG11, g_BGK6[..., 3:], g_BGK6[..., :3]], -1)
        h_BGKD = self.point_mlp(local_BGK9)
        # the PointNet: max over the group. No separate centre embedding: the absolute positions are in the
        # point features, and an added centre term (same size for every cloud) drowned the max-pooled signal
        return self.trunk(h_BGKD.amax(2))
