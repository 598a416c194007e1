"""The `deepseek` command: help answers without importing torch or transformers; the package stays lazy but
still registers with transformers' Auto classes; `deepseek recipe --bundle` bundles a finished run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import helpers
import pytest

from deepseek.cli import main

ROOT = helpers.ROOT
HEAVY = ("torch", "transformers")
COMMANDS = ["generate", "train", "eval", "tokenizer", "serve", "keys", "usage", "recipe", "chat", "routing"]


def python(code: str) -> str:
    """Run code in a fresh interpreter (nothing imported yet) from the repository root; its stdout."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def heavy_modules_after(code: str) -> list[str]:
    return json.loads(python(f"import sys, json\n{code}\nprint(json.dumps(sorted("
                             f"m for m in sys.modules if m.split('.')[0] in {HEAVY!r})))").splitlines()[-1])  # fmt: skip


def test_building_the_parser_and_help_import_no_torch_or_transformers():
    assert heavy_modules_after("import deepseek") == []
    assert heavy_modules_after("from deepseek.cli import build_parser\nbuild_parser()") == []
    for argv in [["--help"], *[[c, "--help"] for c in COMMANDS], ["routing", "calibrate", "--help"]]:
        code = f"from deepseek.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit as e:\n    assert e.code == 0"
        assert heavy_modules_after(code) == [], argv


def test_the_help_lists_every_command():
    text = python("from deepseek.cli import build_parser\nprint(build_parser().format_help())")
    for command in COMMANDS:
        assert command in text


def test_python_dash_m_deepseek_cli_runs_the_command():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run([sys.executable, "-m", "deepseek.cli", "recipe", "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=120)  # fmt: skip
    assert out.returncode == 0 and "usage: deepseek recipe" in out.stdout
    bad = subprocess.run([sys.executable, "-m", "deepseek.cli", "nope"], capture_output=True, text=True, cwd=ROOT,
                         env=env, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and "invalid choice: 'nope'" in bad.stderr


def test_model_names_load_on_first_access_and_register_the_auto_classes():
    code = """
import deepseek, sys
assert "deepseek.model" not in sys.modules
from deepseek import R1Model
from transformers import AutoConfig, AutoModelForCausalLM
from deepseek.model import R1Config, R1ForCausalLM
assert issubclass(R1Model, R1ForCausalLM) and R1ForCausalLM is deepseek.R1ForCausalLM and deepseek.R1Config is R1Config
config = AutoConfig.for_model("deepseek_r1", vocab_size=64, hidden_size=32, intermediate_size=64,
    moe_intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, kv_lora_rank=16, q_lora_rank=None,
    qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
    n_group=1, topk_group=1)
print(type(config).__name__, type(AutoModelForCausalLM.from_config(config)).__name__)
"""
    assert python(code).split() == ["R1Config", "R1Model"]  # the SDK class: fast generate, finetune
    # loading a checkpoint (or its tokenizer, through the one loader) registers them too
    code = "import deepseek.compat.checkpoint\nfrom transformers import AutoConfig\nprint(type(AutoConfig.for_model('deepseek_r1')).__name__)"
    assert python(code).strip() == "R1Config"
    with pytest.raises(AttributeError, match="no attribute 'R2Model'"):
        import deepseek

        deepseek.R2Model  # noqa: B018


def fake_model(folder: Path, tag: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps({"tag": tag}))
    (folder / "model.safetensors").write_bytes(tag.encode())
    (folder / "tokenizer.json").write_text("{}")
    (folder / "optimizer.pt").write_bytes(b"state")  # trainer state: must stay behind
    return folder


def test_recipe_bundle_copies_the_last_sft_and_the_grpo_model(tmp_path, monkeypatch, capsys):
    import deepseek.compat.checkpoint as checkpoint

    bundled = tmp_path / "bundled"
    monkeypatch.setattr(checkpoint, "BUNDLED_DIR", bundled)  # never the package's own bundled models
    assert checkpoint.BUNDLED_DIR == bundled
    run = tmp_path / "run"
    outputs = {"tokenizer": str(run / "tokenizer"), "sft": str(fake_model(run / "sft" / "final", "sft")),
               "sft3": str(fake_model(run / "sft3" / "final", "sft3")),
               "grpo": str(fake_model(run / "grpo" / "final", "grpo"))}  # fmt: skip
    (run / "recipe.json").write_text(json.dumps({"seconds": {"sft": 1.0, "sft3": 2.0, "grpo": 3.0},
                                                 "outputs": outputs}))  # fmt: skip
    assert main(["recipe", "debug", "--out", str(run), "--stages", "", "--bundle"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[:2] == [f"[recipe] bundled r1-base: {bundled / 'r1-base'}", f"[recipe] bundled r1-tiny: {bundled / 'r1-tiny'}"]
    assert json.loads(lines[-1])["outputs"] == outputs  # no stage ran
    assert sorted(p.name for p in bundled.iterdir()) == ["r1-base", "r1-tiny"]
    base, tiny = bundled / "r1-base", bundled / "r1-tiny"
    assert (base / "model.safetensors").read_bytes() == b"sft3"  # the last SFT stage, not the first
    assert (tiny / "model.safetensors").read_bytes() == b"grpo"
    assert sorted(p.name for p in tiny.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                      "training.json"]  # fmt: skip
    note = json.loads((base / "training.json").read_text())
    assert note["stage"] == "sft3" and note["recipe"] == "debug" and note["total_seconds"] == 6.0


def test_recipe_errors_are_one_line(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["recipe", "debug", "--out", str(run), "--stages", "", "--bundle"]) == 2
    assert capsys.readouterr().err.strip() == "deepseek recipe: error: nothing to bundle: the run has no finished SFT or GRPO stage"
    assert main(["recipe", "debug", "--out", str(run), "--stages", "sft"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "deepseek recipe: error: recipe stage sft starts from the pretrain stage, which has not run in this folder"
    assert main(["recipe", "debug", "--out", str(run), "--stages", "pretrain,rl"]) == 2
    assert "unknown recipe stage(s) ['rl']" in capsys.readouterr().err
