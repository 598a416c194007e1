"""GRPO: advantages, the k3 KL, the clipped loss under each normalisation (hand-computed), pass@k, batch
layout, and that one GRPO step moves a real model towards the rewarded completion."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_model, tiny_config

from deepseek import R1ForCausalLM
from deepseek.eval.tasks import pass_at_k
from deepseek.train.data import left_pad
from deepseek.train.rl.grpo import GRPOConfig, RolloutBatches, make_loss_fn
from deepseek.train.rl.loss import group_advantages, grpo_loss, k3_kl, token_logprobs
from deepseek.train.rl.rollout import Rollout, to_batch


# ---------------------------------------------------------------------------- advantages and KL
def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]])
    a = group_advantages(r, scale=True, eps=0.0)
    # group 0: mean 0.5, sample std sqrt(4 * 0.25 / 3) = 0.57735 -> +-0.8660
    assert torch.allclose(a[0], torch.tensor([0.8660254, -0.8660254, -0.8660254, 0.8660254]), atol=1e-6)
    # group 1: mean 0.75, sample std sqrt((3 * 0.5625 + 5.0625) / 3) = 1.5 -> (-0.5, -0.5, -0.5, 1.5)
    assert torch.allclose(a[1], torch.tensor([-0.5, -0.5, -0.5, 1.5]), atol=1e-6)
    assert torch.allclose(group_advantages(r, scale=False)[0], torch.tensor([0.5, -0.5, -0.5, 0.5]))
    flat = group_advantages(torch.ones(2, 5))
    assert torch.equal(flat, torch.zeros(2, 5))  # no signal when every completion scores the same
    with pytest.raises(ValueError, match="prompts, group"):
        group_advantages(torch.ones(6))


def test_k3_kl_values():
    logp = torch.log(torch.tensor([0.5, 0.25, 0.3]))
    ref = torch.log(torch.tensor([0.25, 0.5, 0.3]))
    kl = k3_kl(logp, ref)
    # r = ref/p: 0.5 -> 0.5 - ln 0.5 - 1 = 0.19315; 2 -> 2 - ln 2 - 1 = 0.30685; 1 -> 0
    assert torch.allclose(kl, torch.tensor([0.5 + math.log(2) - 1, 2 - math.log(2) - 1, 0.0]), atol=1e-6)
    # unbiased: E_p[k3] = KL(p || ref) on a 2-outcome distribution
    p, q = torch.tensor([0.7, 0.3]), torch.tensor([0.4, 0.6])
    expected = float((p * (p / q).log()).sum())
    assert float((p * k3_kl(p.log(), q.log())).sum()) == pytest.approx(expected, abs=1e-6)


# ---------------------------------------------------------------------------- the loss
def _case():
    # two sequences: one completion token with A=+1, three with A=-1 (T = 4 positions)
    mask = torch.tensor([[0, 1, 0, 0], [0, 1, 1, 1]])
    adv = torch.tensor([1.0, -1.0])
    logp = torch.full((2, 4), -1.0, requires_grad=True)
    return logp, adv, mask


@pytest.mark.parametrize("norm,loss,grad_a,grad_b", [
    ("sequence", 0.0, -1 / 2, 1 / 3 / 2),    # -(mean_i A_i): d/dlogp = -A_i / (n_i * B)
    ("token", -(1 - 3) / 4, -1 / 4, 1 / 4),  # -(sum A n) / N: d/dlogp = -A / N
    ("constant", -(1 - 3) / 8, -1 / 8, 1 / 8),  # Dr. GRPO: / (B * T)
])  # fmt: skip
def test_on_policy_loss_and_gradients(norm, loss, grad_a, grad_b):
    logp, adv, mask = _case()
    out = grpo_loss(logp, adv, mask, norm=norm)
    assert float(out.loss.detach()) == pytest.approx(loss, abs=1e-6)
    out.loss.backward()
    assert float(logp.grad[0, 1]) == pytest.approx(grad_a, abs=1e-6)
    assert float(logp.grad[1, 2]) == pytest.approx(grad_b, abs=1e-6)
    assert float(logp.grad[0, 0]) == 0.0 and float(logp.grad[1, 0]) == 0.0  # prompt positions get nothing
    assert out.tokens == 4 and out.clip_fraction == 0.0 and out.ratio_mean == pytest.approx(1.0)


def test_clipping_hand_computed():
    mask = torch.ones(4, 1)
    adv = torch.tensor([1.0, 1.0, -1.0, -1.0])
    ratio = torch.tensor([1.5, 0.5, 0.5, 1.5])
    old = torch.zeros(4, 1)
    logp = ratio.log()[:, None].clone().requires_grad_(True)
    out = grpo_loss(logp, adv, mask, old_logp_BT=old, clip_eps=0.2, norm="token")
    # objectives: min(1.5, 1.2)=1.2 (clipped); min(0.5, 0.8)=0.5; min(-0.5, -0.8)=-0.8 (clipped); min(-1.5,-1.2)=-1.5
    assert float(out.loss.detach()) == pytest.approx(-(1.2 + 0.5 - 0.8 - 1.5) / 4, abs=1e-6)
    assert out.clip_fraction == pytest.approx(0.5)
    out.loss.backward()
    g = logp.grad[:, 0]
    assert float(g[0]) == 0.0 and float(g[2]) == 0.0  # clipped: no gradient
    assert float(g[1]) == pytest.approx(-0.5 / 4) and float(g[3]) == pytest.approx(1.5 / 4)  # -A * r / N
    # clip-higher (DAPO): eps_high 0.6 lets ratio 1.5 through
    out_high = grpo_loss(logp.detach(), adv, mask, old_logp_BT=old, clip_eps=0.2, clip_eps_high=0.6, norm="token")
    assert float(out_high.loss) == pytest.approx(-(1.5 + 0.5 - 0.8 - 1.5) / 4, abs=1e-6)


def test_kl_term_weighted_by_beta():
    logp, adv, mask = _case()
    ref = torch.full((2, 4), -1.0 + math.log(2))  # ref/p = 2 everywhere -> k3 = 1 - ln 2
    k3 = 1 - math.log(2)
    base = float(grpo_loss(logp, adv, mask, norm="token").loss.detach())
    out = grpo_loss(logp, adv, mask, ref_logp_BT=ref, beta=0.1, norm="token")
    assert out.kl == pytest.approx(k3, abs=1e-6)
    assert float(out.loss.detach()) == pytest.approx(base + 0.1 * k3, abs=1e-6)
    logged = grpo_loss(logp, adv, mask, ref_logp_BT=ref, beta=0.0, norm="token")  # beta 0: logged, not added
    assert float(logged.loss.detach()) == pytest.approx(base) and logged.kl == pytest.approx(k3, abs=1e-6)


def test_loss_rejects_bad_input():
    logp, adv, mask = _case()
    with pytest.raises(ValueError, match="norm"):
        grpo_loss(logp, adv, mask, norm="mean")
    with pytest.raises(ValueError, match="shapes"):
        grpo_loss(logp, adv[:1], mask)


# ---------------------------------------------------------------------------- rollout helpers
def test_pass_at_k():
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - 3 / 6)
    assert pass_at_k(4, 0, 4) == 0.0 and pass_at_k(4, 1, 4) == 1.0
    with pytest.raises(ValueError, match="pass@5"):
        pass_at_k(4, 1, 5)


def test_left_pad_and_to_batch_layout():
    ids, mask = left_pad([[5, 6, 7], [8]], pad_id=2)
    assert ids.tolist() == [[5, 6, 7], [2, 2, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="at least one row"):
        left_pad([], pad_id=2)
    with pytest.raises(ValueError, match="row 1 is empty"):
        left_pad([[5], []], pad_id=2)
    rolls = [Rollout({}, [0, 5, 6], [9, 1], "", 1.0, 1.0, 1.1, True), Rollout({}, [0, 7], [9, 9, 9], "", 0, 0, 0, False)]
    b = to_batch(rolls, pad_id=2)
    assert b["input_ids"].tolist() == [[0, 5, 6, 9, 1], [0, 7, 9, 9, 9]]
    assert b["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 0, 1, 1, 1]]
    assert b["labels"].tolist() == [[-100, -100, -100, 9, 1], [-100, -100, 9, 9, 9]]


def test_token_logprobs_match_a_real_forward():
    model = random_model(tiny_config(), seed=1)
    ids = torch.randint(3, 200, (2, 7))
    logits = model(input_ids=ids).logits
    lp = token_logprobs(logits, ids)
    assert lp.shape == (2, 7) and torch.all(lp[:, 0] == 0)
    want = torch.log_softmax(logits[1, 3].float(), -1)[ids[1, 4]]
    assert float(lp[1, 4]) == pytest.approx(float(want), abs=1e-5)


# ---------------------------------------------------------------------------- a real GRPO step
def test_grpo_step_moves_the_model_towards_rewarded_completions():
    """One prompt, two completions, rewards 1 and 0: after a few AdamW steps on the GRPO loss the rewarded
    completion's log-prob rises and the other's falls; the KL to the frozen start is then positive."""
    torch.manual_seed(0)
    model = R1ForCausalLM(tiny_config(num_hidden_layers=2))
    ref = R1ForCausalLM(tiny_config(num_hidden_layers=2))
    ref.load_state_dict(model.state_dict())
    rolls = [Rollout({}, [0, 5, 6], [40, 41, 1], "", 1.0, 1.0, 1.0, True),
             Rollout({}, [0, 5, 6], [70, 71, 1], "", 0.0, 1.0, 0.0, True)]  # fmt: skip
    batch = to_batch(rolls, pad_id=2)
    batch["advantages"] = group_advantages(torch.tensor([[1.0, 0.0]])).reshape(-1)
    cfg = GRPOConfig(beta=0.05, norm="sequence", eval_tasks=[])

    def seq_logp(m):
        lp = token_logprobs(m(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                            batch["input_ids"])  # fmt: skip
        return (lp * batch["completion_mask"]).sum(1)

    with torch.no_grad():
        before = seq_logp(model)
        batch["ref_logp"] = token_logprobs(ref(input_ids=batch["input_ids"]).logits, batch["input_ids"])
    loss_fn = make_loss_fn(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(3):
        out = loss_fn(model, batch, None)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    with torch.no_grad():
        after = seq_logp(model)
    assert float(after[0] - before[0]) > 0.1 and float(after[1] - before[1]) < -0.1
    assert loss_fn(model, batch, None).stats["kl"] > 0


def test_rollout_prompts_are_deterministic_and_avoid_held_out():
    cfg = GRPOConfig(tasks=["addition:1"], prompts_per_step=6, eval_tasks=["addition:1"], eval_examples=10)
    held = {"addition:1": [{"prompt": f"What is {a} + 3?"} for a in range(10)]}
    a = RolloutBatches(cfg, None, None, None, held, None).prompts(7)
    b = RolloutBatches(cfg, None, None, None, held, None).prompts(7)
    assert [e["prompt"] for e in a] == [e["prompt"] for e in b]
    assert not any(e["prompt"].endswith("+ 3?") for e in a)


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="group_size"):
        GRPOConfig(group_size=1)
    with pytest.raises(ValueError, match="norm"):
        GRPOConfig(norm="avg")
    with pytest.raises(ValueError, match="unknown task"):
        GRPOConfig(tasks=["algebra:2"])
