"""The bundled models: load offline by name, are DeepSeek-V3 in miniature (MLA, shared + routed experts with
the balancing bias, MTP), are small, and actually reason (r1-tiny solves unseen problems greedily)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from deepseek import R1Model
from deepseek.compat.checkpoint import BUNDLED_DIR, bundled_names, resolve
from deepseek.tasks import get_task
from deepseek.train.recipe import recipe, training_prompts
from deepseek.train.rl.rollout import evaluate

NAMES = ["deepseek/r1-base", "deepseek/r1-tiny"]


def test_both_models_are_bundled_and_small():
    assert set(NAMES) <= set(bundled_names())
    for name in NAMES:
        folder = resolve(name)
        files = {p.name for p in folder.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
        size = sum(p.stat().st_size for p in folder.iterdir())
        assert size < 25 * 2**20, f"{name} is {size / 2**20:.1f} MiB"
        note = json.loads((folder / "training.json").read_text())
        assert note["seconds"]["pretrain"] > 0  # the measured recipe time travels with the weights


@pytest.mark.parametrize("name", NAMES)
def test_loads_offline_with_the_r1_architecture(name):
    code = (f"from deepseek import R1Model; m = R1Model.from_pretrained({name!r}); c = m.config; "
            "print(c.kv_lora_rank, c.n_routed_experts, c.n_shared_experts, c.num_experts_per_tok, len(m.mtp), "
            "sum(p.numel() for p in m.parameters()))")  # fmt: skip
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr
    kv, routed, shared, k, mtp, params = map(int, r.stdout.split())
    assert (routed, shared, k, mtp) == (8, 1, 2, 1) and kv > 0 and 1e6 < params < 5e6


def test_router_bias_was_trained_and_unknown_names_list_bundled():
    model = R1Model.from_pretrained("deepseek/r1-base")
    biases = [b for n, b in model.named_buffers() if n.endswith("e_score_correction_bias")]
    assert biases and any(float(b.abs().max()) > 0 for b in biases)  # aux-loss-free balancing moved them
    with pytest.raises(FileNotFoundError, match="deepseek/r1-tiny"):
        R1Model.from_pretrained("deepseek/r1-huge")


def test_r1_tiny_solves_unseen_in_distribution_problems():
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(str(BUNDLED_DIR / "r1-tiny"))
    model = R1Model.from_pretrained("deepseek/r1-tiny")
    seen = training_prompts(recipe("r1-tiny"))
    exs = [e for e in get_task("addition").generate(60, seed=777, difficulty=2) if e["prompt"] not in seen][:16]
    res = evaluate(model, tok, exs, max_new_tokens=160)
    assert res["format"] >= 0.9  # replies are <think> reasoning </think> answer
    # 2-digit addition: 100% on the benchmark's 100 unseen problems (docs/reasoning.md); allow one slip in 16
    assert res["greedy"] >= 15 / 16, [p["completion"][-40:] for p in res["per_example"] if not p["greedy"]]
