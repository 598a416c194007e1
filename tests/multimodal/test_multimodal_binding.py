"""Binding: InfoNCE on hand-computable cases, text encoder, trained/emergent pairs, save/load round trip."""

import math

import pytest
import torch

from deepseek.multimodal import BindingModel, MultimodalConfig, info_nce
from deepseek.multimodal.text import encode_bytes

SMALL = MultimodalConfig(dim=32, heads=2)


def test_info_nce_hand_computed():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # identical pairs, scale 1: logits [[1, 0], [0, 1]] -> loss = log(1 + e^-1) in both directions
    assert math.isclose(info_nce(a, a, 1.0).item(), math.log(1 + math.exp(-1)), rel_tol=1e-6)
    # swapped partners: the positive is the orthogonal vector -> loss = log(1 + e)
    assert math.isclose(info_nce(a, a.flip(0), 1.0).item(), math.log(1 + math.e), rel_tol=1e-6)
    # three rows, row 2 shares row 0's label: it is dropped from row 0's denominator (and vice versa)
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    lab = torch.tensor([0, 1, 0])
    row1 = math.log(1 + 2 * math.exp(-1))  # row 1: positive logit 1, two negatives with logit 0
    row0 = math.log(1 + math.exp(-1))  # rows 0 and 2: positive 1, one negative (row 1) 0
    assert math.isclose(info_nce(b, b, 1.0, lab).item(), (2 * row0 + row1) / 3, rel_tol=1e-6)
    # large scale, perfect alignment -> loss -> 0
    assert info_nce(a, a, 100.0).item() < 1e-10


def test_info_nce_shape_error():
    with pytest.raises(ValueError, match="equal shapes"):
        info_nce(torch.zeros(2, 3), torch.zeros(3, 3), 1.0)


def test_text_bytes_and_errors():
    ids, mask = encode_bytes(["Seven ", "7"], 16)
    assert ids[0, :5].tolist() == list(b"seven") and mask.sum(1).tolist() == [5, 1]
    with pytest.raises(ValueError, match="empty"):
        encode_bytes(["  "], 16)
    with pytest.raises(ValueError, match="limit is 4"):
        encode_bytes(["abcdef"], 4)


def test_pairs_and_embed_and_round_trip(tmp_path):
    torch.manual_seed(0)
    m = BindingModel(SMALL, anchor="text").eval()
    assert m.trained_pairs == [("text", "image"), ("text", "audio"), ("text", "points")]
    assert m.emergent_pairs == [("image", "audio"), ("image", "points"), ("audio", "points")]
    assert BindingModel(SMALL, anchor="image").emergent_pairs == [("text", "audio"), ("text", "points"),
                                                                   ("audio", "points")]
    with torch.no_grad():
        e = m.embed(text=["the digit seven", "7"], images=[torch.rand(8, 8).numpy()],
                    audio=[(torch.randn(4000).numpy(), 16000)], points=[torch.rand(100, 3)])
    assert {k: tuple(v.shape) for k, v in e.items()} == {"text": (2, 32), "image": (1, 32), "audio": (1, 32),
                                                         "points": (1, 32)}
    m.save(tmp_path, dtype=torch.float32)
    m2 = BindingModel.load(tmp_path)
    with torch.no_grad():
        assert torch.equal(m2.embed(text=["7"])["text"], m.embed(text=["7"])["text"])
    with pytest.raises(ValueError, match="anchor must be one of"):
        BindingModel(SMALL, anchor="video")
