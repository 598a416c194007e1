"""User-data loading (every format, clear errors), assistant-only labels, packing, the content-hash split
(never overlapping, duplicates included) and the resumable batch iterator."""

from __future__ import annotations

import csv
import json
import random
import shutil

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from transformers import AutoTokenizer

from deepseek.tasks import get_task
from deepseek.tokenizer import default_corpus, train_tokenizer
from deepseek.train.data import (
    IGNORE,
    BatchIterator,
    chat_ids_labels,
    content_key,
    detect_kind,
    load_records,
    pack,
    prepare_data,
    split_by_hash,
    tokenize_record,
)  # fmt: skip

QA = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(12)]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer(default_corpus(n_per_task=60), vocab_size=800, out_dir=out, show_progress=False)
    return AutoTokenizer.from_pretrained(out)


def write_all_formats(d):
    (d / "qa.jsonl").write_text("\n".join(json.dumps(r) for r in QA) + "\n\n")
    (d / "qa.json").write_text(json.dumps(QA))
    (d / "qa_cols.json").write_text(json.dumps({"question": [r["question"] for r in QA],
                                                "answer": [r["answer"] for r in QA]}))  # fmt: skip
    for name, delim in (("qa.csv", ","), ("qa.tsv", "\t")):
        with open(d / name, "w", newline="") as f:
            w = csv.DictWriter(f, ["question", "answer"], delimiter=delim)
            w.writeheader()
            w.writerows(QA)
    pq.write_table(pa.Table.from_pylist(QA), d / "qa.parquet")


def test_every_file_format_reads_the_same_records(tmp_path):
    write_all_formats(tmp_path)
    for name in ("qa.jsonl", "qa.json", "qa_cols.json", "qa.csv", "qa.tsv", "qa.parquet"):
        ds = load_records(tmp_path / name)
        assert [dict(r) for r in ds] == QA, name
        assert detect_kind(ds.column_names) == "question_answer"
    (tmp_path / "doc.txt").write_text("Some plain text.\nSecond line.")
    assert [dict(r) for r in load_records(str(tmp_path / "doc.txt"))] == [{"text": "Some plain text.\nSecond line."}]


def test_folders_datasets_and_save_to_disk(tmp_path):
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        (folder / ("sub" if i else "") / f"{i}.txt").write_text(f"document {i}")
    (folder / "notes.bin").write_bytes(b"\x00")  # not a data file: ignored
    assert sorted(r["text"] for r in load_records(folder)) == ["document 0", "document 1", "document 2"]
    ds = datasets.Dataset.from_list(QA)
    assert load_records(ds) is ds
    dd = datasets.DatasetDict({"train": ds, "test": ds.select(range(2))})
    assert len(load_records(dd, split="test")) == 2
    with pytest.raises(ValueError, match="no split 'validation'.*train, test"):
        load_records(dd, split="validation")
    ds.save_to_disk(str(tmp_path / "saved"))
    assert [dict(r) for r in load_records(tmp_path / "saved")] == QA


def test_dataset_name_from_the_local_hf_cache(tmp_path, monkeypatch):
    """A name resolves offline from the datasets cache layout (<cache>/<owner>___<name>/<config>/<ver>/<hash>)."""
    src = tmp_path / "qa.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in QA))
    datasets.load_dataset("json", data_files=str(src), cache_dir=str(tmp_path / "build"))
    built = next((tmp_path / "build" / "json").glob("*/*/*"))  # default-<hash>/0.0.0/<fingerprint>
    target = tmp_path / "cache" / "someone___tiny_qa" / "default" / built.parent.name / built.name
    shutil.copytree(built, target)
    (target / "json-train.arrow").rename(target / "tiny_qa-train.arrow")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    assert [dict(r) for r in load_records("someone/tiny_qa")] == QA
    with pytest.raises(ValueError, match="no split 'test'"):
        load_records("someone/tiny_qa", split="test")
    with pytest.raises(FileNotFoundError, match="someone/other: no such file or folder.*cache"):
        load_records("someone/other")


def test_clear_errors_before_any_work(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.jsonl: no such file"):
        load_records(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: the dataset is empty"):
        load_records(tmp_path / "empty.jsonl")
    (tmp_path / "cols.jsonl").write_text(json.dumps({"foo": 1, "bar": 2}))
    with pytest.raises(ValueError, match=r"no usable columns \(found: bar, foo\)"):
        load_records(tmp_path / "cols.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(ValueError, match="bad.jsonl:2: not valid JSON"):
        load_records(tmp_path / "bad.jsonl")
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(ValueError, match="unsupported file type"):
        load_records(tmp_path / "x.xlsx")
    (tmp_path / "nodata").mkdir()
    with pytest.raises(ValueError, match="no data files"):
        load_records(tmp_path / "nodata")
    with pytest.raises(ValueError, match="empty"):
        load_records(datasets.Dataset.from_list([]))


def test_kind_detection_order():
    assert detect_kind(["messages", "text"]) == "messages"
    assert detect_kind(["prompt", "completion", "text"]) == "prompt_completion"
    assert detect_kind(["instruction", "input", "output"]) == "prompt_completion"
    assert detect_kind(["problem", "solution"]) == "question_answer"
    assert detect_kind(["content"]) == "text"
    with pytest.raises(ValueError, match="found: prompt"):
        detect_kind(["prompt"])  # a prompt without a completion is unusable


def test_labels_only_on_assistant_tokens(tok):
    ex = get_task("addition").generate(1, seed=0)[0]
    ids, labels = tokenize_record(ex, tok)
    assert len(ids) == len(labels)
    trained = [t for t in labels if t != IGNORE]
    assert tok.decode(trained) == ex["completion"] + "<|eos|>"  # exactly the assistant turn and its eos
    assert all(labels[i] in (IGNORE, ids[i]) for i in range(len(ids)))
    # identical to transformers' own {% generation %} mask
    ref = tok.apply_chat_template(ex["messages"], return_assistant_tokens_mask=True, return_dict=True)
    assert ref["input_ids"] == ids and list(ref["assistant_masks"]) == [int(t != IGNORE) for t in labels]
    # multi-turn: both assistant turns trained, the user turns not
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"}, {"role": "assistant", "content": "a2"}]  # fmt: skip
    ids, labels = chat_ids_labels(msgs, tok)
    assert tok.decode([t for t in labels if t != IGNORE]) == "a1<|eos|>a2<|eos|>"
    # question/answer and prompt/completion go through the chat template too
    ids, labels = tokenize_record({"question": "2+2?", "answer": "4"}, tok)
    assert tok.decode(ids) == "<|bos|><|user|>2+2?<|assistant|>4<|eos|>"
    assert tok.decode([t for t in labels if t != IGNORE]) == "4<|eos|>"
    # plain text: bos + text + eos, every token trained
    ids, labels = tokenize_record({"text": "hello world"}, tok)
    assert ids == labels and ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    # no chat template: prompt + completion + eos, loss on the completion
    ids, labels = tokenize_record({"prompt": "2+2?", "completion": " 4"}, tok, chat=False)
    assert tok.decode(ids) == "<|bos|>2+2? 4<|eos|>" and tok.decode([t for t in labels if t != IGNORE]) == " 4<|eos|>"


def test_split_never_overlaps_even_with_duplicates():
    rng = random.Random(0)
    base = [{"text": f"document {i} " + "word " * rng.randint(1, 5)} for i in range(300)]
    records = [rng.choice(base) for _ in range(2000)]  # many exact duplicates
    records += [{"text": "  " + r["text"].upper() + "\n"} for r in base[:50]]  # case/whitespace variants
    keys = [content_key(r) for r in records]
    for frac, salt in ((0.05, ""), (0.2, ""), (0.5, "other"), (0.001, "")):
        train, val = split_by_hash(keys, frac, salt)
        assert sorted(train + val) == list(range(len(records)))  # a partition of the records
        train_keys, val_keys = {keys[i] for i in train}, {keys[i] for i in val}
        assert not train_keys & val_keys  # no content on both sides
        assert not {" ".join(records[i]["text"].split()).lower() for i in train} & {
            " ".join(records[i]["text"].split()).lower() for i in val}  # fmt: skip
        assert val and train
        if frac >= 0.05:
            assert abs(len(val_keys) / len(set(keys)) - frac) < 0.08
        assert split_by_hash(keys, frac, salt) == (train, val)  # deterministic
    # stable under adding records: an existing record never changes side
    t1, v1 = split_by_hash(keys[:1000], 0.2)
    t2, v2 = split_by_hash(keys, 0.2)
    assert set(v1) == set(v2) & set(range(1000))


def test_packing_stream_and_whole_sequences():
    seqs = [([1, 2, 3], [1, 2, 3]), ([4, 5], [IGNORE, 5]), ([6, 7, 8, 9, 10], [6, 7, 8, 9, 10])]
    b = pack(seqs, block_size=4, pad_id=0)
    assert b.input_ids.tolist() == [[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 0, 0]]
    assert b.labels.tolist() == [[1, 2, 3, IGNORE], [5, 6, 7, 8], [9, 10, IGNORE, IGNORE]]
    b = pack(seqs, block_size=5, pad_id=0, split_documents=False)
    assert b.input_ids.tolist() == [[1, 2, 3, 4, 5], [6, 7, 8, 9, 10]]
    b = pack(seqs, block_size=4, pad_id=0, split_documents=False)  # the 5-token sequence is truncated
    assert b.input_ids.tolist() == [[1, 2, 3, 0], [4, 5, 0, 0], [6, 7, 8, 9]]
    assert b.num_label_tokens == 3 + 1 + 4


def test_prepare_data_end_to_end(tok, tmp_path):
    rows = get_task("multiplication").generate(60, seed=0, difficulty=2)
    (tmp_path / "sft.jsonl").write_text("\n".join(json.dumps({"messages": r["messages"]}) for r in rows * 2))
    data = prepare_data(tmp_path / "sft.jsonl", tok, block_size=256, val_fraction=0.1, show_progress=False)
    assert data.kind == "messages" and data.stats["records"] == 120
    assert data.stats["train_records"] + data.stats["val_records"] == 120
    assert data.train.input_ids.shape[1] == 256 and data.val is not None
    train_texts = {tok.decode(row[row != tok.pad_token_id]) for row in data.train.input_ids}
    val_texts = {tok.decode(row[row != tok.pad_token_id]) for row in data.val.input_ids}
    prompts = lambda texts: {p for t in texts for p in t.split("<|user|>")[1:]}  # noqa: E731
    assert not prompts(train_texts) & prompts(val_texts)  # no question on both sides after packing
    text = prepare_data([{"text": "word " * 100}] * 5, tok, block_size=64, val_fraction=0.0, show_progress=False)
    assert text.kind == "text" and text.val is None and text.stats["train_tokens"] > 64
    with pytest.raises(ValueError, match="kind must be one of"):
        prepare_data(rows, tok, 64, kind="images")


def test_batch_iterator_resume_epochs_and_ranks():
    n, T = 23, 4
    blocks = pack([(list(range(i * T, (i + 1) * T)),) * 2 for i in range(n)], T, pad_id=0)
    it = BatchIterator(blocks, batch_size=5, seed=7)
    assert len(it) == 4  # 23 // 5, remainder dropped
    epoch0 = [next(it)["input_ids"][:, 0] // T for _ in range(4)]
    seen = torch.cat(epoch0).tolist()
    assert len(set(seen)) == 20  # no block twice within an epoch
    first_of_epoch1 = next(it)["input_ids"]
    assert it.epoch == 1 and not torch.equal(torch.cat(epoch0)[:5], first_of_epoch1[:, 0] // T)  # reshuffled
    # exact resume: continue from a saved state in a fresh iterator
    state = it.state_dict()
    expected = [next(it)["input_ids"] for _ in range(9)]
    fresh = BatchIterator(blocks, batch_size=5, seed=7)
    fresh.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON round trip
    assert all(torch.equal(a, next(fresh)["input_ids"]) for a in expected)
    # ranks: disjoint slices of the same global batch, together the single-process order
    single = BatchIterator(blocks, batch_size=4, seed=3)
    ranks = [BatchIterator(blocks, batch_size=2, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(7):
        parts = [next(r)["input_ids"] for r in ranks]
        assert torch.equal(torch.cat(parts), next(single)["input_ids"])
    with pytest.raises(ValueError, match="saved batch_size=5"):
        BatchIterator(blocks, batch_size=4).load_state_dict(state)
    with pytest.raises(ValueError, match="only 23 blocks"):
        BatchIterator(blocks, batch_size=24)
