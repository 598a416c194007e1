"""Entropy-adaptive routing: k bounds, no dropped tokens, exactness against the plain router at each token's k,
router gradients and the regulariser, determinism, the controller and calibration, stats, mode-off identity."""

import math

import pytest
import torch
from helpers import random_model, tiny_config, to_transformers

from deepseek import R1Config, R1ForCausalLM
from deepseek.model import routing
from deepseek.model.moe import experts_reference
from deepseek.model.routing import RoutingStats, k_from_entropy, k_from_mass


def sharpen_routers(model, factor=8.0):
    """Random routers score every expert alike; a trained one is confident for some tokens and not others."""
    with torch.no_grad():
        for _, moe in routing.moe_layers(model):
            moe.gate.weight.mul_(factor)
    return model


def adaptive_model(mode="entropy", groups=False, seed=0, **fields):
    cfg = dict(num_experts_per_tok=4, routing_mode=mode, routing_k_min=1, routing_k_max=4)
    cfg.update({f"routing_{k}": v for k, v in fields.items()})
    return sharpen_routers(random_model(tiny_config(groups=groups, **cfg), seed=seed))


def ids(n=3, t=24, seed=0):
    return torch.randint(3, 211, (n, t), generator=torch.Generator().manual_seed(seed))


def first_moe(model):
    return model.model.layers[1].mlp


def test_k_rules_on_hand_made_distributions():
    q = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.25] * 4, [0.7, 0.1, 0.1, 0.1]])
    h = routing.entropy(q)
    assert torch.allclose(h.exp(), torch.tensor([1.0, 2.0, 4.0, math.exp(-(0.7 * math.log(0.7) + 0.3 * math.log(0.1)))]))
    assert k_from_entropy(h, 1.0, 1, 4).tolist() == [1, 2, 4, 3]  # ceil(effective experts)
    assert k_from_entropy(h, 0.5, 1, 4).tolist() == [1, 1, 2, 2]
    assert k_from_entropy(h, 0.5, 2, 3).tolist() == [2, 2, 2, 2]
    assert k_from_mass(q, 0.6, 1, 4).tolist() == [1, 2, 3, 1]  # fewest experts whose mass reaches 0.6
    assert k_from_mass(q, 0.75, 1, 4).tolist() == [1, 2, 3, 2]


@pytest.mark.parametrize("mode", ["entropy", "top_p"])
@pytest.mark.parametrize("groups", [False, True])
@pytest.mark.parametrize("k_min,k_max", [(1, 4), (2, 3), (1, 1)])
def test_k_bounds_hold_and_every_token_is_routed(mode, groups, k_min, k_max):
    model = adaptive_model(mode, groups=groups, k_min=k_min, k_max=k_max)
    for threshold in (0.05, 0.5, 0.9, 1.0) if mode == "top_p" else (0.05, 0.5, 1.0, 5.0):
        for r in routing.adaptive_routers(model):
            r.threshold = threshold
        stats = routing.track_routing(model)
        seen = []
        handle = first_moe(model).observe(lambda moe, r, seen=seen: seen.append(r.idx_NK))
        with torch.no_grad():
            model(ids())
        handle.remove()
        for s in stats.values():
            hist = s.k_hist.tolist()
            assert sum(hist) == s.tokens == 72  # every token counted once
            assert sum(hist[:k_min]) == 0 and len(hist) == k_max + 1  # none below k_min: no token dropped
            assert k_min <= s.avg_k <= k_max
        idx = seen[0]
        valid = idx >= 0
        assert (valid.sum(1) >= k_min).all()
        assert (valid[:, :-1] >= valid[:, 1:]).all()  # used slots first, -1 slots after
        for row in idx:  # no expert twice in a token
            used = row[row >= 0]
            assert used.unique().numel() == used.numel()


def test_spread_of_k_follows_entropy():
    model = adaptive_model("entropy", threshold=0.6)
    with torch.no_grad():
        model(ids())
    ada = first_moe(model).gate.adaptive
    k, h = ada.last_k.float(), ada.last_entropy
    assert k.unique().numel() >= 2  # not a constant k
    # tokens given more experts are the less certain ones
    assert h[k == k.max()].mean() > h[k == k.min()].mean()
    assert torch.all(k[h.argsort()].diff() >= 0)  # k is monotone in entropy


@pytest.mark.parametrize("groups", [False, True])
def test_each_token_gets_exactly_the_plain_router_at_its_k(groups):
    """Keeping the first m candidates is the plain DeepSeek router at top-m (bias, groups, renormalisation)."""
    model = adaptive_model("entropy", groups=groups, threshold=0.6)
    moe = first_moe(model)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(3)) * 3
    with torch.no_grad():
        idx, w, scores = moe.gate(x)
        k = (idx >= 0).sum(1)
        assert k.unique().numel() >= 2
        for m in k.unique().tolist():
            rows = k == m
            ref_idx, ref_w = moe.gate.select(scores[rows], m)
            ours_idx, ours_w = idx[rows, :m], w[rows, :m]
            order_ref, order_ours = ref_idx.argsort(1), ours_idx.argsort(1)
            assert torch.equal(ref_idx.gather(1, order_ref), ours_idx.gather(1, order_ours))
            assert torch.allclose(ref_w.gather(1, order_ref), ours_w.gather(1, order_ours), atol=1e-6)
            assert (w[rows, m:] == 0).all()
        # the grouped kernel on variable k equals the per-expert loop oracle
        fast = moe.experts(x, idx, w)
        ref = experts_reference(x, idx, w, moe.experts.gate_up_proj, moe.experts.down_proj)
        assert torch.allclose(fast, ref, atol=1e-4)
        assert (fast.abs().sum(1) > 0).all()  # every token got expert output


def test_fewer_assignments_do_less_expert_work():
    model = adaptive_model("entropy", threshold=0.6)
    moe = first_moe(model)
    x = torch.randn(64, 64)
    with torch.no_grad():
        idx, w, _ = moe.gate(x)
    n_assign = int((idx >= 0).sum())
    assert n_assign < idx.numel()
    calls = []
    real = torch._grouped_mm

    def counting(a, b, offs=None, **kw):
        calls.append(a.shape[0])
        return real(a, b, offs=offs, **kw)

    torch._grouped_mm = counting
    try:
        moe.experts(x, idx, w)
    finally:
        torch._grouped_mm = real
    assert calls == [n_assign, n_assign]  # both grouped matmuls run on the kept assignments only


def test_gradients_reach_the_router_and_the_regulariser_adds_its_own():
    torch.manual_seed(0)
    grads = {}
    for weight in (0.0, 0.5):
        model = adaptive_model("entropy", threshold=0.6, entropy_weight=weight).train()
        model.zero_grad()
        out = model(ids(2, 16), labels=ids(2, 16))
        out.loss.backward()
        grads[weight] = first_moe(model).gate.weight.grad.clone()
    assert grads[0.0].abs().sum() > 0 and torch.isfinite(grads[0.0]).all()
    # the regulariser's gradient equals the gradient of weight * mean normalised entropy, computed directly
    model = adaptive_model("entropy", threshold=0.6, entropy_weight=0.5).train()
    model.zero_grad()
    regs = []
    for _, moe in routing.moe_layers(model):
        moe.register_forward_hook(lambda m, i, o: regs.append(m.gate.adaptive.last_regulariser))
    model(ids(2, 16), labels=ids(2, 16))
    assert len(regs) == 2 and all(0 < r < 0.5 for r in regs)  # 0.5 * normalised entropy in (0, 1)
    extra = grads[0.5] - grads[0.0]
    assert extra.abs().max() > 1e-6


def test_regulariser_gradient_matches_the_explicit_loss():
    model = adaptive_model("entropy", threshold=0.6, entropy_weight=0.3).train()
    gate = first_moe(model).gate
    x = torch.randn(32, 64, generator=torch.Generator().manual_seed(5))
    idx, w, scores = gate(x)
    w.sum().backward()
    injected = gate.weight.grad.clone()
    gate.weight.grad = None
    gate.adaptive.entropy_weight = 0.0
    idx, w, scores = gate(x)
    cand = idx.clone()
    full, _ = gate.select(scores, 4)  # the same candidates, for the explicit entropy
    s = scores.gather(1, full)
    q = s / s.sum(-1, keepdim=True)
    (w.sum() + 0.3 * routing.entropy(q).mean() / math.log(4)).backward()
    assert (cand >= 0).any()
    assert torch.allclose(injected, gate.weight.grad, atol=1e-6)


def test_results_are_deterministic_and_batch_independent():
    model = adaptive_model("entropy", threshold=0.6)
    x = ids(4, 20, seed=7)
    with torch.no_grad():
        a, b = model(x).logits, model(x).logits
        rows = torch.cat([model(x[i : i + 1]).logits for i in range(4)])
    assert torch.equal(a, b)
    assert torch.allclose(a, rows, atol=1e-5)  # a token's experts do not depend on its batch neighbours


def test_controller_holds_the_target_in_training():
    model = adaptive_model("entropy", threshold=1.0, target_k=2.0, controller_rate=0.2).train()
    stats = None
    with torch.no_grad():
        for step in range(30):
            if step == 22:
                stats = routing.track_routing(model)
            model.model(ids(4, 16, seed=step))
    for s in stats.values():
        assert abs(s.avg_k - 2.0) < 0.35
    assert all(r.threshold < 1.0 for r in routing.adaptive_routers(model))  # started at k ~4, moved down


@pytest.mark.parametrize("mode", ["entropy", "top_p"])
def test_training_free_calibration_on_a_topk_checkpoint(mode, tmp_path):
    base = sharpen_routers(random_model(tiny_config(groups=False, num_experts_per_tok=4)))
    base.save_pretrained(tmp_path)
    model = R1ForCausalLM.from_pretrained(tmp_path)  # plain top-k weights, no routing state in the file
    routing.set_routing(model, mode, k_min=1, k_max=4)
    values = routing.calibrate(model, ids(4, 32, seed=1), target_k=2.5)
    assert len(values) == 2 and model.config.routing.layer_thresholds == values
    stats = routing.track_routing(model)
    with torch.no_grad():
        model(ids(4, 32, seed=1))
    for s in stats.values():
        assert 2.2 <= s.avg_k <= 2.5
    # thresholds travel with the config: save, reload, apply -> same outputs
    model.save_pretrained(tmp_path / "cal")
    model.config.save_pretrained(tmp_path / "cal")
    again = R1ForCausalLM.from_pretrained(tmp_path / "cal")
    routing.apply_thresholds(again)
    with torch.no_grad():
        assert torch.equal(model(ids()).logits, again(ids()).logits)


def test_stats_histogram_and_maxvio():
    s = RoutingStats(num_experts=4, k_max=3)
    s.update(torch.tensor([[0, 1, -1], [0, -1, -1], [0, 2, 3], [1, -1, -1]]))
    assert s.k_hist.tolist() == [0, 2, 1, 1]
    assert s.avg_k == pytest.approx(7 / 4)
    assert s.load.tolist() == [3, 2, 1, 1]
    assert s.max_vio == pytest.approx((3 - 7 / 4) / (7 / 4))
    assert routing.routed_flops_per_token(tiny_config(), [2.0, 1.0]) == 2 * 3 * 64 * 32 * 3.0


def test_mode_off_is_bit_identical_to_the_plain_router(tmp_path):
    plain = random_model(tiny_config())
    x = ids()
    with torch.no_grad():
        ref = plain(x).logits
        gate = first_moe(plain).gate
        h = torch.randn(10, 64)
        idx, w, scores = gate(h)
        ref_idx, ref_w = gate.select(gate.scores(h))
        assert torch.equal(idx, ref_idx) and torch.equal(w, ref_w)
        routing.track_routing(plain)  # stats on: still the same numbers
        assert torch.equal(plain(x).logits, ref)
        routing.set_routing(plain, "entropy", k_min=1, k_max=2, threshold=0.5)
        assert not torch.equal(plain(x).logits, ref)
        routing.set_routing(plain, "topk")  # and back
        assert torch.equal(plain(x).logits, ref)
        hf = to_transformers(plain, tmp_path)
        assert (hf(x).logits - ref).abs().max() < 1e-4  # the plain path is still transformers' DeepseekV3


def test_k_max_equal_k_min_equals_fixed_topk():
    plain = random_model(tiny_config(groups=False, num_experts_per_tok=3))
    x = ids()
    with torch.no_grad():
        ref = plain(x).logits
        routing.set_routing(plain, "entropy", k_min=3, k_max=3)
        assert torch.allclose(plain(x).logits, ref, atol=1e-5)


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(routing_mode="dynamic"), r"routing\.mode"),
        (dict(routing_k_min=0), r"routing\.k_min"),
        (dict(routing_k_min=3, routing_k_max=2), r"routing\.k_min"),
        (dict(routing_k_max=9), r"routing\.k_min=1, k_max=9"),
        (dict(routing_threshold=-1.0), r"routing\.threshold"),
        (dict(routing_mode="top_p", routing_threshold=1.5), r"routing\.threshold"),
        (dict(routing_target_k=7.0), r"routing\.target_k"),
        (dict(routing_controller_rate=-0.1), r"routing\.controller_rate"),
        (dict(routing_entropy_weight=-1), r"routing\.entropy_weight"),
        (dict(routing_layer_thresholds=[1.0, -2.0]), r"routing\.layer_thresholds"),
    ],
)
def test_bad_routing_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(groups=False, **kwargs)


def test_set_routing_rejects_bad_values_and_leaves_the_model_alone():
    model = random_model(tiny_config(groups=True))  # 2 of 4 groups of 2 experts: 4 reachable
    with pytest.raises(ValueError, match=r"routing\.k_min=1, k_max=6"):
        routing.set_routing(model, "entropy", k_max=6)
    assert model.config.routing.mode == "topk" and first_moe(model).gate.adaptive is None
    with pytest.raises(ValueError, match="unknown routing field"):
        routing.set_routing(model, "entropy", kmax=2)
    with pytest.raises(ValueError, match="set_routing"):
        routing.calibrate(model, ids(), 2.0)
    assert isinstance(R1Config(), R1Config)  # real DeepSeek-V3 defaults still validate (k_max = 8 of 256)


def test_cli_calibrates_a_checkpoint_and_reports_stats(tmp_path, capsys):
    from deepseek.cli import main
    from deepseek.tokenizer import train_tokenizer

    text = " ".join(f"What is {a} + {b}? It is {a + b}." for a, b in zip(range(50, 350, 3), range(7, 900, 9)))
    model = sharpen_routers(random_model(tiny_config(groups=False, num_experts_per_tok=4, vocab_size=320)))
    model.save_pretrained(tmp_path / "m")
    train_tokenizer([text], vocab_size=300, out_dir=str(tmp_path / "m"))
    (tmp_path / "data.txt").write_text(text)
    assert main(["routing", "calibrate", "--model", str(tmp_path / "m"), "--data", str(tmp_path / "data.txt"),
                 "--target-k", "2.5", "--out", str(tmp_path / "cal")]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "thresholds" in out and "model.layers.2.mlp" in out
    cal = R1ForCausalLM.from_pretrained(tmp_path / "cal")
    assert cal.config.routing.mode == "entropy" and len(cal.config.routing.layer_thresholds) == 2
    assert main(["routing", "stats", "--model", str(tmp_path / "cal"), "--data", str(tmp_path / "data.txt")]) == 0
    mean_line = [line for line in capsys.readouterr().out.splitlines() if line.startswith("mean")][0]
    assert 2.0 <= float(mean_line.split()[1]) <= 2.5
    assert main(["routing", "stats", "--model", str(tmp_path / "cal"), "--data", str(tmp_path / "nope.txt")]) == 2
