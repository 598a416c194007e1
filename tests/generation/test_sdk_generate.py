"""R1Model.generate: transformers' call, our generation loop, transformers' tokens."""

import logging

import torch
from helpers import padded_batch, random_model, tiny_config, to_transformers

from deepseek import R1Model
from deepseek.generation import loop


def test_generate_runs_the_loop_and_matches_transformers_with_stops(tmp_path, monkeypatch):
    model = random_model(tiny_config(), cls=R1Model)
    hf = to_transformers(model, tmp_path)
    ids, mask = padded_batch(model.config.vocab_size, seed=1)
    free = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=2)
    eos = int(free[0, 14 + 5])  # a token row 0 emits at step 5: rows stop at different steps
    calls = []
    real = loop.generate
    monkeypatch.setattr(loop, "generate", lambda *a, **k: calls.append(1) or real(*a, **k))
    ours = model.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=2)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False, eos_token_id=eos,
                         pad_token_id=2)  # fmt: skip
    assert calls == [1]  # the fast path ran
    assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    assert (ours[0, 14 + 6 :] == 2).all()  # row 0 padded after its stop token


def test_defaults_come_from_generation_config_and_streamer_sees_every_token(tmp_path):
    model = random_model(tiny_config(), cls=R1Model)
    ids = torch.randint(3, 200, (1, 9), generator=torch.Generator().manual_seed(3))
    model.generation_config.max_new_tokens = 7
    model.generation_config.eos_token_id = None

    class Collect:
        def __init__(self):
            self.puts, self.ended = [], False

        def put(self, t):
            self.puts.append(t.tolist())

        def end(self):
            self.ended = True

    s = Collect()
    out = model.generate(ids, streamer=s)
    assert out.shape == (1, 16)  # max_new_tokens from generation_config
    assert s.puts[0] == ids.tolist() and [p[0] for p in s.puts[1:]] == out[0, 9:].tolist() and s.ended
    ref = loop.generate(model, ids, max_new_tokens=7).sequences
    assert torch.equal(out, ref)


def test_unsupported_settings_fall_back_to_transformers_with_one_note(tmp_path, caplog):
    model = random_model(tiny_config(), cls=R1Model)
    hf = to_transformers(model, tmp_path)
    ids, mask = padded_batch(model.config.vocab_size, seed=1)
    with caplog.at_level(logging.WARNING, logger="deepseek.sdk"):
        ours = model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=2, eos_token_id=None,
                              pad_token_id=2)  # fmt: skip
        model.generate(ids, attention_mask=mask, max_new_tokens=2, repetition_penalty=1.3, pad_token_id=2)
    theirs = hf.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=2, do_sample=False, eos_token_id=None,
                         pad_token_id=2)  # fmt: skip
    assert torch.equal(ours, theirs)  # beam search: transformers' own, on our model
    notes = [r.getMessage() for r in caplog.records if "GenerationMixin" in r.getMessage()]
    assert len(notes) == 1 and "num_beams" in notes[0]
