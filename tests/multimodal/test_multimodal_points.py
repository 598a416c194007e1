"""Points: FPS and kNN against brute-force references, encoder shapes, bad input."""

import numpy as np
import pytest
import torch

from deepseek.multimodal import (
    MultimodalConfig,
    PointsEncoder,
    farthest_point_sample,
    knn,
    prepare_clouds,
    validate_points,
)

CFG = MultimodalConfig()


def fps_reference(p: np.ndarray, G: int) -> list[int]:
    chosen = [0]
    for _ in range(G - 1):
        d = np.min([((p - p[c]) ** 2).sum(1) for c in chosen], axis=0)
        chosen.append(int(d.argmax()))
    return chosen


def test_fps_matches_brute_force():
    rng = np.random.default_rng(0)
    p = rng.random((2, 200, 3)).astype(np.float32)
    got = farthest_point_sample(torch.from_numpy(p), 16)
    for b in range(2):
        assert got[b].tolist() == fps_reference(p[b], 16)
    line = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0.4, 0, 0], [10, 0, 0]]])
    assert farthest_point_sample(line, 3)[0].tolist() == [0, 3, 1]  # hand-computable


def test_knn_matches_brute_force():
    rng = np.random.default_rng(1)
    p, q = rng.random((1, 100, 3)).astype(np.float32), rng.random((1, 7, 3)).astype(np.float32)
    got = knn(torch.from_numpy(q), torch.from_numpy(p), 5)[0].numpy()
    d = ((q[0][:, None] - p[0][None]) ** 2).sum(-1)
    assert (got == np.argsort(d, axis=1)[:, :5]).all()


def test_prepare_normalises_and_resamples():
    rng = np.random.default_rng(2)
    x = prepare_clouds([rng.random((5, 3)) * 50 + 7, rng.random((3000, 6))], CFG)
    assert x.shape == (2, CFG.sample_points, 6)
    assert torch.allclose(x[0, :, :3].norm(dim=1).max(), torch.tensor(1.0), atol=1e-5)  # unit sphere
    assert (x[0, :, 3:] == 0).all()  # xyz-only clouds get zero extra channels


def test_encoder_shapes_and_batch_independence():
    torch.manual_seed(0)
    enc = PointsEncoder(CFG).eval()
    rng = np.random.default_rng(3)
    clouds = [rng.random((40, 3)), rng.random((2000, 6)), torch.rand(CFG.max_points, 3)]
    with torch.no_grad():
        out = enc(clouds)
        alone = enc([clouds[1]])
    assert out.tokens.shape == (3, CFG.n_groups, CFG.dim) and out.pooled.shape == (3, CFG.dim)
    assert torch.allclose(out.pooled.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(alone.pooled[0], out.pooled[1], atol=1e-5)


def test_bad_point_clouds():
    with pytest.raises(ValueError, match="empty"):
        validate_points(np.zeros((0, 3)), CFG.max_points)
    with pytest.raises(ValueError, match="NaN"):
        validate_points(np.array([[0, 0, np.nan]]), CFG.max_points)
    with pytest.raises(ValueError, match=f"limit is {CFG.max_points}"):
        validate_points(np.zeros((CFG.max_points + 1, 3), np.float32), CFG.max_points)
    with pytest.raises(ValueError, match=r"\(N, 3\) xyz or \(N, 6\)"):
        validate_points(np.zeros((10, 4)), CFG.max_points)
    with pytest.raises(ValueError, match="numeric"):
        validate_points(np.array([["a", "b", "c"]]), CFG.max_points)
