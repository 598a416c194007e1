"""The SDK: `R1Model.from_pretrained(path).finetune(dataset=..., epochs=...)` with LoRA (merged or as an
adapter) and full fine-tuning, saving with save_pretrained, and clear data errors before any training."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

from deepseek import R1Config, R1Model
from deepseek.tasks import get_task
from deepseek.tokenizer import default_corpus, train_tokenizer
from deepseek.train.config import model_preset


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("base")
    tok = train_tokenizer(default_corpus(n_per_task=30, prose_repeats=2), vocab_size=320, out_dir=out,
                          show_progress=False)  # fmt: skip
    torch.manual_seed(0)
    R1Model(R1Config(**{**model_preset("debug"), "vocab_size": len(tok), "num_nextn_predict_layers": 0})
            ).save_pretrained(out)  # fmt: skip
    return out


@pytest.fixture(scope="module")
def records():
    return [{"messages": ex["messages"]} for ex in get_task("addition").generate(32, seed=3, difficulty=1)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_lora_finetune_merges_and_saves(base_dir, records, tmp_path):
    data = write_jsonl(tmp_path / "custom_data.jsonl", records)
    model = R1Model.from_pretrained(base_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    metrics = model.finetune(dataset=str(data), epochs=2, seq_len=128, batch_size=8, lr=1e-2, progress=False,
                             out_dir=tmp_path / "run")  # fmt: skip
    losses = list(metrics["losses"].values())
    assert metrics["method"] == "lora" and metrics["data"]["kind"] == "messages"
    assert len(losses) >= 6 and losses[-1] < losses[0] - 0.3, losses
    assert 0 < metrics["trainable_parameters"] < 0.5 * sum(v.numel() for v in before.values())
    after = model.state_dict()
    assert set(after) == set(before), "merged back into the plain model (no PEFT keys left)"
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any("q_b_proj" in k for k in changed) and any("experts.gate_up_proj" in k for k in changed)
    assert not any("embed_tokens" in k or "lm_head" in k or "norm" in k for k in changed)
    model.save_pretrained(tmp_path / "tuned")
    reloaded = R1Model.from_pretrained(tmp_path / "tuned").eval()
    ids = torch.randint(3, 300, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)


def test_full_finetune_from_a_dataset_and_adapter_mode(base_dir, records, tmp_path):
    model = R1Model.from_pretrained(base_dir)
    emb = model.model.embed_tokens.weight.clone()
    m = model.finetune(dataset=datasets.Dataset.from_list(records[:16]), epochs=1, lora=False, seq_len=128,
                       batch_size=8, progress=False, out_dir=tmp_path / "full")  # fmt: skip
    assert m["method"] == "full" and m["trainable_parameters"] == sum(p.numel() for p in model.parameters())
    assert not torch.equal(model.model.embed_tokens.weight, emb)

    model = R1Model.from_pretrained(base_dir)
    m = model.finetune(dataset=records[:16], epochs=1, seq_len=128, batch_size=8, progress=False, merge=False,
                       adapter_dir=tmp_path / "adapter", out_dir=tmp_path / "ad")  # fmt: skip
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert any("lora_A" in n for n, _ in m["peft_model"].named_parameters())


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda p: str(p / "nope.jsonl"), FileNotFoundError, "nope.jsonl: no such file"),
        (lambda p: str(write_jsonl(p / "empty.jsonl", [])), ValueError, "empty"),
        (lambda p: str(write_jsonl(p / "bad.jsonl", [{"foo": 1, "bar": 2}])), ValueError, "columns"),
    ],
)
def test_bad_data_fails_before_training(base_dir, tmp_path, make, error, match):
    model = R1Model.from_pretrained(base_dir)
    with pytest.raises(error, match=match):
        model.finetune(dataset=make(tmp_path), epochs=1, progress=False, out_dir=tmp_path / "never")
    assert not (tmp_path / "never").exists(), "nothing is written before the data is known good"
    with pytest.raises(ValueError, match="epochs must be a positive integer"):
        model.finetune(dataset="x", epochs=0)
