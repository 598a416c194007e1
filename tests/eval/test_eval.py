"""Evaluation: perplexity numbers against the model's own loss, window coverage, pass@k arithmetic, batched
(left-padded) generation equal to one-at-a-time, graders applied, the `deepseek eval` command."""

from __future__ import annotations

import json
import math

import pytest
import torch

from deepseek import R1Config, R1Model
from deepseek.chat import chat_prompt_ids
from deepseek.cli import main
from deepseek.eval import generate_completions, load_model_and_tokenizer, pass_at_k, perplexity, task_accuracy
from deepseek.tasks import get_task
from deepseek.tokenizer import default_corpus, train_tokenizer
from deepseek.train.config import model_preset


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("evalmodel")
    tok = train_tokenizer(default_corpus(n_per_task=30, prose_repeats=2), vocab_size=300, out_dir=out,
                          show_progress=False)  # fmt: skip
    kw = {**model_preset("debug"), "vocab_size": len(tok), "num_nextn_predict_layers": 0}
    torch.manual_seed(0)
    R1Model(R1Config(**kw)).save_pretrained(out)
    return out


def test_perplexity_matches_the_model_loss(model_dir, tmp_path):
    model, tok = load_model_and_tokenizer(model_dir)
    text = tmp_path / "held_out.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 20)
    stream = torch.tensor([tok.bos_token_id] + tok(text.read_text(), add_special_tokens=False)["input_ids"]
                          + [tok.eos_token_id])  # fmt: skip
    r = perplexity(model, tok, str(text), seq_len=64, batch_size=3)
    assert r["tokens"] == stream.numel() - 1, "every token after the first is predicted exactly once"
    # the same number from the model's own loss, window by window
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, stream.numel() - 1, 63):
            w = stream[s : s + 64][None]
            if w.shape[1] < 2:
                continue
            nll += float(model(input_ids=w, labels=w).loss) * (w.shape[1] - 1)
            n += w.shape[1] - 1
    assert n == r["tokens"]
    assert r["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-4)
    assert 50 < r["perplexity"] < 3 * len(tok)  # an untrained model: near-uniform over the vocabulary


def test_pass_at_k_arithmetic():
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(5, 0, 2) == 0.0
    assert pass_at_k(4, 3, 2) == 1.0
    assert pass_at_k(4, 1, 2) == pytest.approx(0.5)  # 1 - C(3,2)/C(4,2) = 1 - 3/6
    with pytest.raises(ValueError, match="pass@5 needs 1 <= k <= samples, got 4 samples"):
        pass_at_k(4, 1, 5)  # fewer samples than k: no unbiased estimate
    with pytest.raises(ValueError, match="pass@0"):
        pass_at_k(4, 1, 0)
    with pytest.raises(ValueError, match="5 correct out of 4"):
        pass_at_k(4, 5, 1)


def test_batched_generation_equals_one_at_a_time(model_dir):
    model, tok = load_model_and_tokenizer(model_dir)
    task = get_task("addition")
    examples = task.generate(2, seed=1, difficulty=1) + task.generate(3, seed=1, difficulty=4)
    prompts = [chat_prompt_ids(tok, ex) for ex in examples]
    assert len({len(p) for p in prompts}) > 1, "prompts of different lengths exercise the left padding"
    batched = generate_completions(model, tok, prompts, max_new_tokens=12, batch_size=5)
    single = [generate_completions(model, tok, [p], max_new_tokens=12, batch_size=1)[0] for p in prompts]
    assert batched == single


def test_task_accuracy_uses_the_grader(model_dir):
    model, tok = load_model_and_tokenizer(model_dir)
    r = task_accuracy(model, tok, "addition", n=4, max_new_tokens=8, difficulty=2)
    assert r["n"] == 4 and r["k"] == 1 and r["temperature"] == 0.0
    assert r["accuracy"] == 0.0 and r["mean_reward"] == 0.0  # an untrained model cannot add
    ex = r["examples"][0]
    assert get_task("addition").grade(ex["prompt"], ex["completion"]) == ex["reward"]
    answer = get_task("addition").generate(4, seed=12345, difficulty=2)[0]
    assert get_task("addition").grade(answer, answer["completion"]) == 1.0  # the grader itself accepts truth
    with pytest.raises(ValueError, match="needs temperature > 0"):
        task_accuracy(model, tok, "addition", n=2, k=2, temperature=0.0)


def test_eval_command_prints_table_then_json(model_dir, tmp_path, capsys):
    text = tmp_path / "t.txt"
    text.write_text("twelve plus seven is nineteen. " * 10)
    rc = main(["eval", "--model", str(model_dir), "--ppl", str(text), "--task", "addition", "--n", "2",
               "--max-new-tokens", "4", "--difficulty", "1"])  # fmt: skip
    out = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and out[0].startswith("eval")
    result = json.loads(out[-1])
    assert [r["eval"] for r in result["results"]] == ["perplexity", "accuracy"]
    assert main(["eval", "--model", str(model_dir), "--task", "nosuchtask"]) == 2
    assert "unknown task 'nosuchtask'" in capsys.readouterr().err
    assert main(["eval", "--model", str(tmp_path / "missing"), "--task", "addition"]) == 2
