"""lm-evaluation-harness against a live `deepseek serve` (r1-tiny): its CLI with local YAML tasks over JSONL
items, `local-completions` (a log-likelihood task: token-id prompts, echo + logprobs; a generation task with
more stop strings than OpenAI's 4) and `local-chat-completions` (generation), each score equal to
`deepseek eval` on the same items."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("uvicorn")

from serve_support import LiveServer  # noqa: E402

from deepseek.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
MODEL_DIR = ROOT / "deepseek" / "bundled" / "r1-tiny"
N_GEN = 12

CHOICE_YAML = """task: ds_choice
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
"""

GEN_YAML = """task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: generate_until
doc_to_text: "{{{{{field}}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n\\n\\n\\n", "Question:", "###", "User:", "<|im_end|>"]
  max_gen_toks: 512
  do_sample: false
  temperature: 0
filter_list:
  - name: answer
    filter:
      - function: regex
        regex_pattern: "(-?[0-9]+)\\\\s*$"
      - function: take_first
metric_list:
  - metric: exact_match
"""


@pytest.fixture(scope="module")
def server():
    from deepseek.serve.api import create_app
    from deepseek.serve.engine import Engine, EngineConfig

    engine = Engine.from_pretrained(str(MODEL_DIR), EngineConfig(max_running=16))
    with LiveServer(create_app(engine)) as live:
        yield live, engine.model_name


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    from transformers import AutoTokenizer

    from deepseek.chat import chat_prompt_ids
    from deepseek.tasks import get_task

    root = tmp_path_factory.mktemp("lmeval")
    tok = AutoTokenizer.from_pretrained(MODEL_DIR)
    choice_items = []  # the chat prompt, the reference reasoning
    # without its last line ('So A * B = C.'), then the answer: which choice follows?
    for ex in get_task("multiplication").generate(10, seed=12345, difficulty=2):
        a = int(ex["answer"])
        choices = [str(a), str(a + 1), str(a - 10), str(a + 100)]
        rot = ex["index"] % 4
        choices = choices[rot:] + choices[:rot]
        context = tok.decode(chat_prompt_ids(tok, ex)) + ex["reasoning"].rsplit("\n", 1)[0] + "\n</think>\n\n"
        choice_items.append({"context": context, "choices": choices, "label": choices.index(str(a))})
    (root / "choice.jsonl").write_text("".join(json.dumps(i) + "\n" for i in choice_items))
    gen = get_task("subtraction").generate(N_GEN, seed=12345, difficulty=3)
    rows = [{"prompt": ex["prompt"], "text": tok.decode(chat_prompt_ids(tok, ex)), "answer": ex["answer"]} for ex in gen]
    (root / "gen.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "ds_choice.yaml").write_text(CHOICE_YAML.format(data=root / "choice.jsonl"))
    (root / "ds_gen.yaml").write_text(GEN_YAML.format(name="ds_gen", data=root / "gen.jsonl", field="text"))
    (root / "ds_chat.yaml").write_text(GEN_YAML.format(name="ds_chat", data=root / "gen.jsonl", field="prompt"))
    return root


def lm_eval(root: Path, model: str, model_args: str, tasks: str, *extra: str) -> dict:
    out = root / f"out-{model}"
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", model, "--model_args", model_args,
           "--include_path", str(root), "--tasks", tasks, "--output_path", str(out), "--batch_size", "1", "--log_samples", *extra]  # fmt: skip
    env = os.environ | {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=root, env=env)  # no hub, no downloads
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(next(out.rglob("results_*.json")).read_text())
    samples = {}
    for f in out.rglob("samples_*.jsonl"):
        rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
        samples[f.name.split("_")[1] + "_" + f.name.split("_")[2]] = sorted(rows, key=lambda r: r["doc_id"])
    return result["results"] | {"samples": samples}


def test_lm_eval_local_completions_equals_deepseek_eval(server, tasks, capsys):
    live, name = server
    args = (f"base_url={live.url}/v1/completions,model={name},tokenizer_backend=huggingface,"
            f"tokenizer={MODEL_DIR},num_concurrent=4,max_retries=1,max_length=1024")  # fmt: skip
    res = lm_eval(tasks, "local-completions", args, "ds_choice,ds_gen")
    assert main(["eval", "--model", str(MODEL_DIR), "--choices", str(tasks / "choice.jsonl"), "--task", "subtraction",
                 "--n", str(N_GEN), "--difficulty", "3", "--max-new-tokens", "512"]) == 0  # fmt: skip
    ours = {r["data"]: r["accuracy"] for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"]}
    print(res, ours)
    assert res["ds_choice"]["acc,none"] == pytest.approx(ours[str(tasks / "choice.jsonl")])
    # and each choice's log-likelihood through the server (echo + logprobs on token ids) is the model's own
    from deepseek.eval import load_model_and_tokenizer
    from deepseek.eval.choices import continuation_logprob, read_items

    model, tok = load_model_and_tokenizer(str(MODEL_DIR))
    items = read_items(tasks / "choice.jsonl")
    rows = res["samples"]["ds_choice"]
    assert len(rows) == len(items)
    for row, item in zip(rows, items):
        served = [float(r[0][0]) for r in row["resps"]]
        direct = [continuation_logprob(model, tok, item["context"], c)[0] for c in item["choices"]]
        assert served == pytest.approx(direct, abs=1e-3)
        assert len(set(round(x, 2) for x in direct)) == len(direct)  # the choices are told apart
    assert res["ds_gen"]["exact_match,answer"] == pytest.approx(ours["subtraction"])


def test_lm_eval_local_chat_completions_equals_deepseek_eval(server, tasks, capsys):
    live, name = server
    args = f"base_url={live.url}/v1/chat/completions,model={name},num_concurrent=4,max_retries=1"
    res = lm_eval(tasks, "local-chat-completions", args, "ds_chat", "--apply_chat_template")
    assert main(["eval", "--model", str(MODEL_DIR), "--task", "subtraction", "--n", str(N_GEN), "--difficulty", "3",
                 "--max-new-tokens", "512"]) == 0  # fmt: skip
    ours = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["results"][0]["accuracy"]
    print(res, ours)
    assert res["ds_chat"]["exact_match,answer"] == pytest.approx(ours)


def test_stop_lists_up_to_16(server):
    import httpx

    from deepseek.serve.protocol import MAX_STOP

    live, name = server
    body = {"model": name, "prompt": "What is 2 + 3?", "max_tokens": 4}
    ok = httpx.post(f"{live.url}/v1/completions", json=body | {"stop": [f"stop{i}" for i in range(MAX_STOP)]})
    assert ok.status_code == 200 and MAX_STOP == 16
    over = httpx.post(f"{live.url}/v1/completions", json=body | {"stop": [f"stop{i}" for i in range(MAX_STOP + 1)]})
    assert over.status_code == 400 and "at most 16" in over.json()["error"]["message"]
