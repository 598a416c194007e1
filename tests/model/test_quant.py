import torch
from helpers import random_model, tiny_config

from deepseek.generation.loop import generate
from deepseek.model.quant import Int8Experts, Int8Linear, quantize_int8


def test_int8_linear_kernel_matches_its_reference_and_the_float_layer():
    lin = torch.nn.Linear(64, 96, bias=False)
    q = Int8Linear(lin)
    x = torch.randn(5, 64)
    assert torch.allclose(q(x), q.reference(x), atol=1e-4)
    rel = (q(x) - lin(x)).norm() / lin(x).norm()
    assert rel < 0.01


def test_int8_model_shrinks_weights_and_keeps_greedy_tokens_mostly():
    model = random_model(tiny_config())
    ids = torch.randint(3, model.config.vocab_size, (2, 8))
    ref = generate(model, ids, max_new_tokens=8).sequences
    with torch.no_grad():
        ref_logits = model(ids).logits
    fp32_bytes = sum(p.numel() * 4 for n, p in model.named_parameters() if "gate.weight" not in n)
    quantize_int8(model)
    assert any(isinstance(m, Int8Linear) for m in model.modules())
    assert any(isinstance(m, Int8Experts) for m in model.modules())
    int8_bytes = sum(b.nbytes for b in model.buffers()) + sum(p.nbytes for p in model.parameters())
    assert int8_bytes < 0.4 * fp32_bytes
    with torch.no_grad():
        q_logits = model(ids).logits
    assert ((q_logits - ref_logits).norm() / ref_logits.norm()) < 0.05  # per-channel int8 on amplified random weights
    out = generate(model, ids, max_new_tokens=8).sequences
    assert (out == ref).float().mean() > 0.8
