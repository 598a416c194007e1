"""Real-prose families for long-context haystacks: sizes, the held-out family disjoint from training by
construction, and prompts that draw only from the family they name."""

import random
import re

import pytest

from deepseek.tasks import corpus
from deepseek.tasks.passkey import Passkey


def test_every_family_has_prose_enough_for_long_haystacks():
    sizes = {f: corpus.size(f) for f in corpus.FAMILIES}
    assert sizes[corpus.HELD_OUT] > 300_000, sizes  # a 128K-byte haystack never wraps around
    assert sum(sizes[f] for f in corpus.TRAIN_FAMILIES) > 1_000_000, sizes
    assert all(s > 40_000 for s in sizes.values()), sizes
    for f in corpus.FAMILIES:
        paras = corpus.paragraphs(f)
        assert len(set(paras)) == len(paras)
        assert all(p.isascii() and "```" not in p and "  " not in p for p in paras)


def test_held_out_shares_no_word_run_with_any_training_family():
    train = set().union(*(corpus.shingles(p) for f in corpus.TRAIN_FAMILIES for p in corpus.paragraphs(f)))
    held = [p for p in corpus.paragraphs(corpus.HELD_OUT)]
    shared = [p for p in held if corpus.shingles(p) & train]
    assert not shared, shared[:3]
    train_sentences = {s.lower() for f in corpus.TRAIN_FAMILIES for s in corpus.sentences(f) if len(s.split()) >= 6}
    assert not [s for s in corpus.sentences(corpus.HELD_OUT) if s.lower() in train_sentences]


def test_the_filter_drops_code_tables_and_headings():
    text = ("# Title\n\nSome words here that make a real sentence, long enough to count as a paragraph of prose "
            "for the filter.\n\n```python\nx = compute(1, 2)  # this is code and must not be kept at all ever\n```\n\n"
            "| col | col |\n|---|---|\n| a | b |\n\n    indented = code_block(that, is, long, enough, to, count, "
            "as, prose, otherwise)\n")  # fmt: skip
    paras = corpus._prose_paragraphs(text)
    assert paras == ["Some words here that make a real sentence, long enough to count as a paragraph of prose for "
                     "the filter."]  # fmt: skip


def haystack_sentences(prompt: str) -> list[str]:
    body = prompt.split("information there. ", 1)[1].rsplit("\n", 1)[0]
    body = re.sub(r"The pass key(?: for \w+)? is \d+\. Remember it\. \d+ is the pass key(?: for \w+)?\.", " ", body)
    return [s.strip() for s in corpus._SENTENCE_RE.findall(body) if len(s.split()) >= 6]


@pytest.mark.parametrize("filler", ["train", corpus.HELD_OUT])
def test_prompts_draw_only_from_their_families(filler):
    held = {s.strip() for s in corpus.sentences(corpus.HELD_OUT)}
    train = {s.strip() for f in corpus.TRAIN_FAMILIES for s in corpus.sentences(f)}
    task = Passkey(num_keys=4, filler=filler)
    rng = random.Random(5)
    for _ in range(12):
        ex = task.make_example(rng, rng.choice([600, 3000]))
        sents = haystack_sentences(ex["prompt"])
        assert len(sents) >= 3
        home, other = (held, train) if filler == corpus.HELD_OUT else (train, held)
        assert all(s in home for s in sents), [s for s in sents if s not in home][:2]
        assert not any(s in other for s in sents)
        assert task.parse_prompt(ex["prompt"])["key"] == ex["key"]


def test_bad_filler_and_training_on_the_held_out_family_are_refused(tmp_path):
    from deepseek.train.passkey import train

    with pytest.raises(ValueError, match="filler must be"):
        Passkey(filler="novels")
    with pytest.raises(ValueError, match="held-out prose family"):
        train(str(tmp_path / "m"), steps=1, filler=corpus.HELD_OUT)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("family", [*corpus.FAMILIES, "train"])
def test_every_needle_is_in_the_prompt_whatever_the_sentence_lengths(family):
    # a family of long sentences once shrank the haystack below zero units, dropping every needle
    from deepseek.eval.passkey import BYTES, needle_spans, passkey_sample

    rng = random.Random(family)
    for _ in range(150):
        keys, length = rng.randint(1, 4), rng.randint(1200, 3000)
        prompt, key = passkey_sample(rng, length, keys, BYTES, family)
        assert len(needle_spans(prompt, BYTES)) == keys
        assert prompt.numel() <= length
