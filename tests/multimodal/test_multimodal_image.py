"""Image: any size and mode, resizing, encoder shapes, bad input."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from deepseek.multimodal import ImageEncoder, MultimodalConfig, image_to_array, preprocess_images

CFG = MultimodalConfig()


def test_modes_map_to_rgb_in_unit_range():
    g = image_to_array(np.full((5, 7), 128, np.uint8))
    assert g.shape == (5, 7, 3) and np.allclose(g, 128 / 255)
    d = image_to_array(np.full((8, 8), 16.0))  # scikit-learn digits: 0..16 floats scaled by the max
    assert np.allclose(d, 1.0)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 255, 0  # white but fully transparent -> black
    assert np.allclose(image_to_array(Image.fromarray(rgba, "RGBA")), 0.0)
    rgba[..., 3] = 255
    assert np.allclose(image_to_array(Image.fromarray(rgba, "RGBA")), 1.0)
    rgb = image_to_array(Image.fromarray(np.dstack([np.full((3, 3), v, np.uint8) for v in (0, 128, 255)])))
    assert np.allclose(rgb[0, 0], [0, 128 / 255, 1])
    assert image_to_array(np.zeros((6, 6, 1), np.float32)).shape == (6, 6, 3)


def test_png_bytes_decode_and_resize_keeps_constant_images_constant():
    buf = io.BytesIO()
    Image.fromarray(np.full((50, 90), 200, np.uint8), "L").save(buf, "PNG")
    x = preprocess_images([buf.getvalue(), np.full((3, 3), 200, np.uint8)], CFG.image_grid)
    assert x.shape == (2, 3, CFG.image_grid, CFG.image_grid)
    assert torch.allclose(x, torch.full_like(x, 200 / 255), atol=1e-5)


def test_encoder_shapes_any_size_and_mode():
    torch.manual_seed(0)
    enc = ImageEncoder(CFG).eval()
    ims = [np.random.rand(8, 8), Image.new("RGB", (300, 100)), Image.new("RGBA", (17, 29)), Image.new("L", (28, 28))]
    with torch.no_grad():
        out = enc(ims)
    P = (CFG.image_grid // 4) ** 2
    assert out.tokens.shape == (4, P, CFG.dim) and out.tokens.dtype == torch.float32
    assert out.pooled.shape == (4, CFG.dim) and torch.allclose(out.pooled.norm(dim=1), torch.ones(4), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(enc(ims[:1]).pooled, out.pooled[:1], atol=1e-5)


def test_bad_images():
    with pytest.raises(ValueError, match="undecodable image"):
        image_to_array(b"not an image at all")
    with pytest.raises(ValueError, match=r"\(H, W\) or \(H, W, 1\|3\|4\)"):
        image_to_array(np.zeros((4, 4, 2)))
    with pytest.raises(ValueError, match="NaN"):
        image_to_array(np.full((4, 4), np.nan))
    with pytest.raises(ValueError, match="non-empty"):
        image_to_array(np.zeros((0, 4)))
