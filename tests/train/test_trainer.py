"""The trainer: exact resume, accumulation equivalence, schedule, optimizer groups, load balancing, MTP,
checkpoints that load as models, atomic writes, config validation."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deepseek import R1Model
from deepseek.model.moe import Routing
from deepseek.train import checkpoint as ckpt
from deepseek.train.balance import LoadTracker, moe_modules, sequence_aux_loss, update_router_bias
from deepseek.train.config import TrainConfig, apply_overrides, preset
from deepseek.train.trainer import (
    LossOutput,
    TokenBatches,
    build_model,
    causal_lm_loss,
    lr_factor,
    param_groups,
    train,
)

STREAM = (torch.arange(4000) * 7 % 53 + 3).long()  # a learnable periodic token stream


def cfg(tmp_path, name="run", **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp_path / name), max_steps=6, seq_len=32, batch_size=4, micro_batch_size=4,
                warmup_steps=2, progress=False, lr=3e-3)  # fmt: skip
    base.update(kw)
    return preset("debug", **base)


def batches(c: TrainConfig, seed=0) -> TokenBatches:
    return TokenBatches(STREAM, c.seq_len, c.batch_size, seed=seed)


class Crash(Exception):
    pass


def crashing_loss(after_calls: int):
    calls = {"n": 0}

    def loss_fn(model, batch, config):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Crash("simulated kill")
        return causal_lm_loss(model, batch, config)

    return loss_fn


def test_exact_resume_after_a_kill(tmp_path):
    c = cfg(tmp_path, "straight", max_steps=6, save_every=3, bias_update_speed=0.01, seq_aux_alpha=0.01)
    straight = train(c, train_batches=batches(c))["losses"]
    assert straight[6] < straight[1] - 0.5, "the model should learn the periodic stream"

    c2 = cfg(tmp_path, "killed", max_steps=6, save_every=3, bias_update_speed=0.01, seq_aux_alpha=0.01)
    with pytest.raises(Crash):  # dies inside step 5, after the step-3 checkpoint
        train(c2, train_batches=batches(c2), loss_fn=crashing_loss(4))
    assert [p.name for p in ckpt.list_checkpoints(c2.out_dir)] == ["step_000003"]
    resumed = train(c2, train_batches=batches(c2))["losses"]
    assert sorted(resumed) == [4, 5, 6]
    for step in (4, 5, 6):
        assert resumed[step] == straight[step], (step, resumed[step], straight[step])
    # the metrics log reads as one run: steps 1..6 once each
    steps = [r["step"] for r in map(json.loads, open(f"{c2.out_dir}/metrics.jsonl")) if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert (tmp_path / "killed" / "curves.png").stat().st_size > 10_000
    saved = json.load(open(f"{c2.out_dir}/train_config.json"))
    assert saved["seq_aux_alpha"] == 0.01 and saved["model"]["hidden_size"] == 64


def test_half_written_checkpoint_is_never_loaded(tmp_path):
    c = cfg(tmp_path, max_steps=2, save_every=1)
    train(c, train_batches=batches(c))
    root = ckpt.checkpoint_dir(c.out_dir)
    (root / ".tmp-step_000009-x").mkdir()  # what a kill during a save leaves
    (root / ".tmp-step_000009-x" / "optimizer.pt").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(c.out_dir).name == "step_000002"
    c.max_steps = 3
    assert train(c, train_batches=batches(c))["steps"] == 3
    assert not list(root.glob(".tmp-*")), "a stale temporary checkpoint is swept on the next save"
    assert [p.name for p in ckpt.list_checkpoints(c.out_dir)] == ["step_000002", "step_000003"]  # keep=2


def test_accumulation_matches_one_big_batch(tmp_path):
    c1 = cfg(tmp_path, "one", max_steps=3, batch_size=4, micro_batch_size=4)
    c2 = cfg(tmp_path, "acc", max_steps=3, batch_size=4, micro_batch_size=2)
    a = train(c1, train_batches=batches(c1))["losses"]
    b = train(c2, train_batches=batches(c2))["losses"]
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])


def test_checkpoint_loads_as_a_model_with_same_outputs(tmp_path):
    """The saved checkpoint reproduces the model the trainer holds in memory (an independent path: no save or
    load on one side), and the validation loss the trainer logged."""
    c = cfg(tmp_path, max_steps=2)
    trained = build_model(c)  # the trainer's own construction, held here to compare with what it saved
    val = [{"input_ids": STREAM[100:132][None], "labels": STREAM[100:132][None]}]
    metrics = train(c, model=trained, train_batches=batches(c), val_batches=val)
    model = R1Model.from_pretrained(metrics["checkpoint"]).eval()
    trained.eval()
    ids = STREAM[:32][None]
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, trained(input_ids=ids).logits)
        loss = model(input_ids=val[0]["input_ids"], labels=val[0]["labels"]).loss
    assert float(loss) == pytest.approx(metrics["val_loss"], rel=1e-5)
    assert math.isfinite(float(loss)) and float(loss) < math.log(c.model["vocab_size"])
    biases = [m.gate.e_score_correction_bias for m in moe_modules(model)]
    assert all(b.abs().sum() > 0 for b in biases), "the router bias update is saved with the weights"


def test_lr_schedule_warmup_then_cosine():
    c = TrainConfig(max_steps=110, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_factor(0, c) == pytest.approx(0.1)
    assert lr_factor(9, c) == pytest.approx(1.0)
    assert lr_factor(60, c) == pytest.approx(0.1 + 0.9 * 0.5)  # half way through the cosine
    assert lr_factor(110, c) == pytest.approx(0.1)


def test_no_weight_decay_on_norms_and_biases():
    model = R1Model(R1Model.config_class(**preset("debug").model))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all("norm" in names[id(p)] or names[id(p)].endswith("bias") for p in no_decay["params"])
    assert any("layernorm" in names[id(p)] for p in no_decay["params"])
    assert any("experts.gate_up_proj" in names[id(p)] for p in decay["params"])


def test_bias_update_moves_towards_balance():
    model = R1Model(R1Model.config_class(**preset("debug").model)).train()
    layers = moe_modules(model)
    tracker = LoadTracker(model)
    ids = STREAM[:64].view(2, 32)
    model(input_ids=ids)
    model(input_ids=ids)  # two micro-batches: both counted
    counts = tracker.global_counts()
    K = model.config.num_experts_per_tok
    assert float(counts[0].sum()) == 2 * ids.numel() * K
    before = layers[0].gate.e_score_correction_bias.clone()
    stats = update_router_bias(layers, counts, gamma=0.01)
    delta = layers[0].gate.e_score_correction_bias - before
    mean = counts[0].mean()
    assert torch.all(delta[counts[0] > mean] == -0.01) and torch.all(delta[counts[0] < mean] == 0.01)
    assert stats["max_violation"] == pytest.approx(float(counts[0].max() / mean - 1))
    tracker.close()


def test_sequence_aux_loss_value_and_gradient():
    model = R1Model(R1Model.config_class(**preset("debug").model)).train()
    layer = moe_modules(model)[0]
    E, K, T = layer.experts.num_experts, model.config.num_experts_per_tok, 8
    # perfectly balanced: every expert picked T*K/E times, uniform scores -> f_i = 1, P_i = 1/E -> loss 1
    idx = torch.arange(T * K).view(T, K) % E
    scores = torch.full((T, E), 0.5, requires_grad=True)
    assert float(sequence_aux_loss([Routing(idx, scores)], batch=1)) == pytest.approx(1.0)
    # all tokens on expert 0 and 1, scores peaked there -> much larger than balanced
    idx = torch.tensor([[0, 1]] * T)
    peaked = torch.full((T, E), 0.01)
    peaked[:, :2] = 0.9
    peaked.requires_grad_(True)
    loss = sequence_aux_loss([Routing(idx, peaked)], batch=1)
    assert float(loss) > 3.0
    loss.backward()
    assert peaked.grad[:, :2].sum() > 0  # pushing the overloaded experts' scores down lowers the loss


def test_mtp_loss_weight_changes_the_loss(tmp_path):
    c0 = cfg(tmp_path, "plain", max_steps=1)
    c1 = cfg(tmp_path, "mtp", max_steps=1, mtp_loss_weight=0.5)
    plain = train(c0, train_batches=batches(c0))
    mtp = train(c1, train_batches=batches(c1))
    assert mtp["losses"][1] > plain["losses"][1] + 0.5 * 3  # + 0.5 * (an untrained MTP head's CE ~ log V)
    model = R1Model.from_pretrained(mtp["checkpoint"])
    assert len(model.mtp) == 1, "MTP weights are saved when the MTP loss is on"


def test_custom_loss_hook_is_used(tmp_path):
    seen = []

    def loss_fn(model, batch, config):
        out = causal_lm_loss(model, batch, config)
        seen.append(batch["input_ids"].shape)
        return LossOutput(out.loss * 2, out.tokens, {"doubled": 1.0})

    c = cfg(tmp_path, max_steps=2, micro_batch_size=2)
    m = train(c, train_batches=batches(c), loss_fn=loss_fn)
    assert seen == [torch.Size([2, 32])] * 4
    rows = [json.loads(line) for line in open(f"{c.out_dir}/metrics.jsonl")]
    assert rows[0]["doubled"] == 1.0 and m["losses"][1] > 2 * 5


def test_config_validation_and_overrides():
    with pytest.raises(ValueError, match="batch_size=6 must be a multiple of micro_batch_size=4"):
        TrainConfig(batch_size=6, micro_batch_size=4)
    with pytest.raises(ValueError, match="mode='rl'"):
        TrainConfig(mode="rl")
    with pytest.raises(ValueError, match="unknown TrainConfig field 'lrr'"):
        apply_overrides(TrainConfig(), ["lrr=1"])
    c = apply_overrides(preset("debug"), ["lr=0.01", "model.hidden_size=96", "parallel=fsdp"])
    assert c.lr == 0.01 and c.model["hidden_size"] == 96 and c.model["num_hidden_layers"] == 2
    with pytest.raises(ValueError, match="split evenly into 3 ranks"):
        TrainConfig(batch_size=8, micro_batch_size=4).grad_accum(3)


def test_clear_error_without_data(tmp_path):
    with pytest.raises(ValueError, match="no training data"):
        train(cfg(tmp_path))
    c = cfg(tmp_path)
    with pytest.raises(ValueError, match="a batch has 2 sequences but TrainConfig.batch_size=4"):
        train(c, train_batches=TokenBatches(STREAM, 32, 2))
