"""DP fine-tuning: per-record gradients through every LoRA target (attention, dense MLP, shared and routed
experts) equal each record's gradient taken from a batched forward (an independent computation: one padded
batch, autograd of that record's loss alone), clipping bounds every per-record norm, noise has std sigma*C,
noise 0 gives the mean of clipped grads, the reported epsilon is Opacus' own, bad settings fail before training."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import lora_model as make_lora_model
from torch import nn

from deepseek import R1Model
from deepseek.tasks import get_task
from deepseek.train.finetune import small_data_batch
from deepseek.train.privacy import (
    PrivacyConfig,
    Records,
    clip,
    epsilon_spent,
    noise_multiplier,
    noisy_mean,
    pad_batch,
    per_sample_grads,
    private_parameters,
    resolve_privacy,
    sequence_losses,
)

GROUPS = {"attention": "self_attn.", "dense_mlp": "layers.0.mlp.", "shared_experts": "shared_experts.",
          "routed_experts": "mlp.experts."}  # fmt: skip


@pytest.fixture(scope="module")
def lora_model():
    return make_lora_model(experts=True)


@pytest.fixture(scope="module")
def records():
    g = torch.Generator().manual_seed(0)
    ids, labels = [], []
    for n in (9, 14, 6, 11):
        x = torch.randint(3, 211, (n,), generator=g)
        lab = x.clone()
        lab[:3] = -100  # a "prompt" without loss
        ids.append(x)
        labels.append(lab)
    return Records(ids, labels)


def test_per_record_grads_equal_batched_reference_for_every_lora_target(lora_model, records):
    named = private_parameters(lora_model)
    assert not any(".mtp." in n for n, _ in named), "MTP adapters are frozen while the MTP loss is off"
    params = [p for _, p in named]
    loop = {i: flat for i, flat, _ in per_sample_grads(lora_model, params, records, list(range(len(records))))}
    ids, labels = pad_batch(records, list(range(len(records))), pad_id=2)
    losses = sequence_losses(lora_model, ids, labels)
    for i in range(len(records)):
        ref = torch.autograd.grad(losses[i], params, retain_graph=True, allow_unused=True)
        ref = torch.cat([(g if g is not None else torch.zeros_like(p)).reshape(-1) for g, p in zip(ref, params)])
        torch.testing.assert_close(loop[i], ref, rtol=1e-4, atol=1e-6)
    offsets = torch.tensor([0] + [p.numel() for p in params]).cumsum(0)
    for group, key in GROUPS.items():
        sel = [k for k, (n, _) in enumerate(named) if key in n and "lora_" in n]
        assert sel, f"no LoRA parameters for {group}"
        part = torch.cat([loop[0][offsets[k] : offsets[k + 1]] for k in sel])
        assert part.abs().max() > 0, f"{group} gets a zero per-record gradient"
    # the sum of per-record gradients is the batch gradient of the summed per-record losses
    total = torch.autograd.grad(losses.sum(), params)
    torch.testing.assert_close(sum(loop.values()), torch.cat([g.reshape(-1) for g in total]), rtol=1e-4, atol=1e-6)


def test_records_never_share_a_gradient(lora_model, records):
    params = [p for _, p in private_parameters(lora_model)]
    before = dict((i, f) for i, f, _ in per_sample_grads(lora_model, params, records, [0, 1]))
    changed = Records(list(records.ids), list(records.labels))
    changed.ids[1] = torch.randint(3, 211, (20,))
    changed.labels[1] = changed.ids[1].clone()
    after = dict((i, f) for i, f, _ in per_sample_grads(lora_model, params, changed, [0, 1]))
    torch.testing.assert_close(after[0], before[0], rtol=0, atol=0)
    assert not torch.allclose(after[1], before[1])


def test_dp_steps_use_poisson_batches(lora_model):
    from deepseek.train.privacy import LoopConfig, train_records

    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(3, 211, (8,), generator=g) for _ in range(20)]
    m = train_records(lora_model, Records(ids, [x.clone() for x in ids]), None,
                      LoopConfig(steps=6, batch_size=5, lr=1e-4, progress=False), PrivacyConfig(delta=1e-3, accountant="rdp"), 2)  # fmt: skip
    assert m["sample_rate"] == 0.25 and len(set(m["batch_sizes"])) > 1, m["batch_sizes"]
    assert m["privacy_unit"] == "sequence" and m["sampling"] == "poisson" and 0 < m["epsilon"] <= 8.0


def test_noise_free_dp_step_applies_the_mean_of_clipped_grads(lora_model, records, monkeypatch):
    """End to end through train_records: with sigma forced to 0 the gradient handed to the optimizer is
    sum(clip(g_i, C) for the Poisson-sampled i) / (q N)."""
    import deepseek.train.privacy as privacy

    lora_model.train()  # as train_records runs it (an earlier test's train_records left it in eval mode)
    params = [p for _, p in private_parameters(lora_model)]
    C, N, B, seed = 0.05, len(records), 2, 4
    g = torch.Generator().manual_seed(seed)
    torch.randperm(N, generator=g)  # train_records draws its (unused) permutation first
    idx = torch.nonzero(torch.rand(N, generator=g) < B / N).flatten().tolist()
    assert idx, "seed gives a non-empty batch"
    expected = sum(clip(f, C) for _, f, _ in per_sample_grads(lora_model, params, records, idx)) / B
    seen = []
    monkeypatch.setattr(privacy, "noise_multiplier", lambda *a: 0.0)
    monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, *a, **k: seen.append(
        torch.cat([p.grad.reshape(-1).clone() for p in params])))  # fmt: skip
    privacy.train_records(lora_model, records, None, privacy.LoopConfig(steps=1, batch_size=B, seed=seed,
                          progress=False), PrivacyConfig(delta=1e-3, max_grad_norm=C, accountant="rdp"), 2)  # fmt: skip
    assert len(seen) == 1
    torch.testing.assert_close(seen[0], expected, rtol=1e-5, atol=1e-7)


def test_clipping_noise_and_mean():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5000, generator=g) * s for s in (0.01, 0.5, 3.0, 40.0)]
    C = 1.0
    clipped = [clip(x, C) for x in grads]
    norms = [float(c.norm()) for c in clipped]
    assert all(n <= C + 1e-5 for n in norms) and abs(norms[0] - float(grads[0].norm())) < 1e-6
    assert all(abs(n - C) < 1e-4 for n in norms[2:])
    total = sum(clipped)
    torch.testing.assert_close(noisy_mean(total, 0.0, C, 4.0), total / 4.0)
    sigma = 0.7
    noise = noisy_mean(torch.zeros(200_000), sigma, 2.0, 1.0, torch.Generator().manual_seed(1))
    assert abs(float(noise.std()) - sigma * 2.0) < 0.01 * sigma * 2.0 and abs(float(noise.mean())) < 0.01


@pytest.mark.parametrize("accountant", ["prv", "rdp"])
def test_epsilon_is_opacus_accountant(accountant):
    from opacus.accountants import PRVAccountant, RDPAccountant

    cfg = PrivacyConfig(epsilon=3.0, delta=1e-5, accountant=accountant)
    q, steps = 0.05, 200
    sigma = noise_multiplier(cfg, q, steps)
    acc = PRVAccountant() if accountant == "prv" else RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    eps = acc.get_epsilon(delta=1e-5)
    assert eps == pytest.approx(epsilon_spent(sigma, q, steps, 1e-5, accountant), rel=1e-6)
    assert 3.0 - 0.05 <= eps <= 3.0 + 1e-6, eps


@pytest.mark.parametrize(
    "privacy, match",
    [
        ({"epsilon": 0}, "epsilon must be a number > 0"),
        ({"epsilon": -1.0}, "epsilon must be a number > 0"),
        ({"delta": 1.5}, "delta must be in"),
        ({"accountant": "gdp-ish"}, "unknown privacy accountant"),
        ({"max_grad_norm": 0}, "max_grad_norm must be > 0"),
        ({"epsilon_": 1}, "unknown privacy option"),
        ("yes", "privacy must be True"),
    ],
)
def test_bad_privacy_settings_are_one_line_errors(privacy, match):
    with pytest.raises(ValueError, match=match) as e:
        resolve_privacy(privacy)
    assert "\n" not in str(e.value)


def test_batchnorm_target_is_refused():
    m = nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))
    with pytest.raises(ValueError, match="cannot get per-sample gradients"):
        private_parameters(m)


@pytest.fixture(scope="module")
def chat_records():
    return [{"messages": ex["messages"]} for ex in get_task("addition").generate(40, seed=5, difficulty=1)]


def test_sdk_private_finetune_reports_its_privacy(chat_records):
    model = R1Model.from_pretrained("deepseek/r1-tiny")
    with pytest.raises(ValueError, match=r"delta=0.1 is >= 1/N"):  # before any training
        model.finetune(dataset=chat_records, epochs=1, privacy={"delta": 0.1}, progress=False)
    before = model.model.layers[1].mlp.experts.gate_up_proj.detach().clone()
    m = model.finetune(dataset=chat_records, epochs=1, batch_size=2, max_steps=2, progress=False, seq_len=48,
                       privacy={"epsilon": 8.0, "delta": 1e-3, "max_grad_norm": 0.5, "accountant": "rdp"})  # fmt: skip
    N = m["data"]["train_records"]
    assert m["privacy_unit"] == "sequence" and m["accountant"] == "rdp" and m["steps"] == 2
    assert m["sample_rate"] == pytest.approx(2 / N) and m["max_grad_norm"] == 0.5 and m["delta"] == 1e-3
    planned = noise_multiplier(PrivacyConfig(8.0, 1e-3, 0.5, "rdp"), 2 / N, 2)
    assert m["noise_multiplier"] == pytest.approx(planned)
    assert m["epsilon"] == pytest.approx(epsilon_spent(planned, 2 / N, 2, 1e-3, "rdp")) and m["epsilon"] <= 8.0
    assert list(m["epsilon_per_epoch"].values())[-1] == pytest.approx(m["epsilon"])
    assert not any(".mtp." in n for n in m["private_parameters"])
    assert m["out_dir"] is None and m["method"] == "dp-lora"
    assert not torch.equal(model.model.layers[1].mlp.experts.gate_up_proj, before), "routed experts trained"


def test_small_data_gets_enough_steps_and_no_temp_folder(chat_records, tmp_path, monkeypatch):
    assert small_data_batch(n_blocks=5, batch_size=8, epochs=5, min_steps=50) == 1
    assert small_data_batch(n_blocks=400, batch_size=8, epochs=1, min_steps=50) == 8
    assert small_data_batch(n_blocks=64, batch_size=8, epochs=1, min_steps=50) == 1
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    model = R1Model.from_pretrained("deepseek/r1-tiny")
    m = model.finetune(dataset=chat_records[:20], epochs=1, seq_len=128, min_steps=4, progress=False)
    assert m["steps"] >= 4 and m["batch_size"] < 8, (m["steps"], m["batch_size"])
    assert m["out_dir"] is None and list(tmp_path.iterdir()) == [], "temporary run folder removed"
    assert math.isfinite(m["final_loss"])
