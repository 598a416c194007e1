"""DP-SGD's fast path (deepseek/train/grad_sample.py): per-sequence gradients from one batched forward equal the
per-record loop (the reference path) for LoRA on attention, the dense MLP and the shared experts; a model
whose trainable weights the hooks cannot see (PEFT's routed-expert adapters, full fine-tuning) falls back to
the loop; a noise-free DP step through the fast path hands the optimizer the mean of clipped gradients."""

from __future__ import annotations

import pytest
import torch
from helpers import lora_model, random_model, tiny_config

from deepseek.train.grad_sample import LinearGrads
from deepseek.train.privacy import (
    LoopConfig,
    PrivacyConfig,
    Records,
    clip,
    pad_batch,
    per_sample_grads,
    private_parameters,
    sample_grads,
    sequence_losses,
    train_records,
)

GROUPS = {"attention": "self_attn.", "dense_mlp": "layers.0.mlp.", "shared_experts": "shared_experts."}


@pytest.fixture(scope="module")
def records():
    g = torch.Generator().manual_seed(0)
    ids, labels = [], []
    for n in (9, 14, 6, 11, 3, 17, 8):
        x = torch.randint(3, 211, (n,), generator=g)
        lab = x.clone()
        lab[: n // 3] = -100  # a "prompt" without loss
        ids.append(x)
        labels.append(lab)
    return Records(ids, labels)


def probe(model, records, fast):
    ids, labels = pad_batch(records, [0, 1], 2)
    return fast.works(lambda: sequence_losses(model, ids, labels), *ids.shape)


@pytest.mark.parametrize("token_budget", [40, 10_000])  # several padded chunks, or one
def test_batched_grads_equal_the_per_record_loop(records, token_budget):
    model = lora_model(experts=False)
    named = private_parameters(model)
    params = [p for _, p in named]
    fast = LinearGrads.of(model, params)
    assert fast is not None and probe(model, records, fast)
    idx = [0, 2, 3, 5, 6, 1]
    loop = {i: (flat, loss) for i, flat, loss in per_sample_grads(model, params, records, idx)}
    got, losses = [], []
    for grads_BP, losses_B in sample_grads(model, params, records, idx, 2, fast, token_budget):
        got.append(grads_BP)
        losses.append(losses_B)
    got, losses = torch.cat(got), torch.cat(losses)
    order = sorted(idx, key=lambda i: records.ids[i].numel())
    assert got.shape == (len(idx), sum(p.numel() for p in params))
    torch.testing.assert_close(got, torch.stack([loop[i][0] for i in order]), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses, torch.tensor([loop[i][1] for i in order]), rtol=1e-5, atol=1e-6)
    offsets = torch.tensor([0] + [p.numel() for p in params]).cumsum(0)
    for group, key in GROUPS.items():  # each target really gets a gradient
        sel = [k for k, (n, _) in enumerate(named) if key in n and "lora_" in n]
        assert sel, group
        assert torch.cat([got[0, offsets[k] : offsets[k + 1]] for k in sel]).abs().max() > 0, group


def test_routed_expert_adapters_and_full_finetuning_use_the_loop(records):
    model = lora_model(experts=True)  # PEFT target_parameters: nn.Linear lora_A / lora_B that are never called
    params = [p for _, p in private_parameters(model)]
    fast = LinearGrads.of(model, params)
    assert fast is not None and not probe(model, records, fast)
    m = train_records(model, records, None, LoopConfig(steps=1, batch_size=3, progress=False),
                      PrivacyConfig(delta=1e-3, accountant="rdp"), 2)  # fmt: skip
    assert m["per_sample_gradients"] == "per-record loop"
    full = random_model(tiny_config())
    assert LinearGrads.of(full, [p for p in full.parameters()]) is None  # embeddings, norms, stacked experts


def test_noise_free_fast_dp_step_applies_the_mean_of_clipped_grads(records, monkeypatch):
    import deepseek.train.privacy as privacy

    model = lora_model(experts=False)
    params = [p for _, p in private_parameters(model)]
    C, N, B, seed = 0.05, len(records), 4, 4
    g = torch.Generator().manual_seed(seed)
    torch.randperm(N, generator=g)  # train_records draws its (unused) permutation first
    idx = torch.nonzero(torch.rand(N, generator=g) < B / N).flatten().tolist()
    assert len(idx) >= 2, "seed gives a batch of several records"
    expected = sum(clip(f, C) for _, f, _ in per_sample_grads(model, params, records, idx)) / B
    seen = []
    monkeypatch.setattr(privacy, "noise_multiplier", lambda *a: 0.0)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: seen.append(
        torch.cat([p.grad.reshape(-1).clone() for p in params])))  # fmt: skip
    m = train_records(model, records, None, LoopConfig(steps=1, batch_size=B, seed=seed, progress=False),
                      PrivacyConfig(delta=1e-3, max_grad_norm=C, accountant="rdp"), 2)  # fmt: skip
    assert m["per_sample_gradients"] == "batched (linear hooks)"
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected, rtol=1e-4, atol=1e-7)


def test_batched_records_never_share_a_gradient(records):
    model = lora_model(experts=False)
    params = [p for _, p in private_parameters(model)]
    fast = LinearGrads.of(model, params)
    ids, labels = pad_batch(records, [0, 1, 2], 2)
    before = fast.grads(lambda: sequence_losses(model, ids, labels), *ids.shape)
    ids2, labels2 = ids.clone(), labels.clone()
    ids2[1, :10] = torch.randint(3, 211, (10,))  # another record in row 1, same padded shape
    labels2[1, 1:10] = ids2[1, 1:10]
    after = fast.grads(lambda: sequence_losses(model, ids2, labels2), *ids2.shape)
    torch.testing.assert_close(after[[0, 2]], before[[0, 2]], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(after[1], before[1])
