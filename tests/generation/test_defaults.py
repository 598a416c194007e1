"""One default per sampling setting: the model's generation_config.json, read by the CLI, SDK, API, playground."""

import argparse

import pytest
from helpers import random_model, tiny_config
from transformers import GenerationConfig

from deepseek import R1Model
from deepseek.cli.sampling import add_sampling_arguments, check_sampling_arguments, resolve_sampling
from deepseek.generation.defaults import SamplingDefaults, sampling_defaults


def test_generation_config_round_trips_and_sets_the_defaults(tmp_path):
    model = random_model(tiny_config(), cls=R1Model)
    assert sampling_defaults(model) == SamplingDefaults(0.0, 1.0, 0, 512)  # no generation config: greedy
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.7, top_p=0.9, top_k=40,
                                               max_new_tokens=64)  # fmt: skip
    model.save_pretrained(tmp_path)
    assert (tmp_path / "generation_config.json").is_file()
    loaded = R1Model.from_pretrained(tmp_path)
    assert sampling_defaults(loaded) == SamplingDefaults(0.7, 0.9, 40, 64)


def test_bundled_models_are_greedy_by_their_own_config():
    for name in ("deepseek/r1-tiny", "deepseek/r1-base"):
        assert sampling_defaults(R1Model.from_pretrained(name)) == SamplingDefaults(0.0, 1.0, 0, 512)


def test_cli_flags_override_the_model_defaults_and_bad_ones_fail_first():
    model = random_model(tiny_config(), cls=R1Model)
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, max_new_tokens=100)
    p = argparse.ArgumentParser()
    add_sampling_arguments(p)
    assert resolve_sampling(p.parse_args([]), model) == SamplingDefaults(0.6, 0.95, 50, 100)  # top_k: HF's 50
    assert resolve_sampling(p.parse_args(["--temperature", "0"]), model).temperature == 0.0
    with pytest.raises(ValueError, match="--top-p must be in"):
        check_sampling_arguments(p.parse_args(["--top-p", "0"]))


def test_api_uses_the_model_defaults_for_unset_fields():
    from deepseek.serve.api import Server
    from deepseek.serve.engine import Engine
    from deepseek.serve.protocol import ChatCompletionRequest

    model = random_model(tiny_config(), cls=R1Model)
    model.generation_config = GenerationConfig(do_sample=True, temperature=0.6, top_p=0.95, top_k=0)

    class Tok:  # the server reads nothing else of the tokenizer here
        eos_token_id, bos_token_id = 1, 0

        def decode(self, ids, **kw):
            return ""

        def convert_ids_to_tokens(self, ids):
            return ["a" for _ in ids]

        def __len__(self):
            return 211

    engine = Engine(model, Tok())
    try:
        server = Server(engine, None, False, None)
        req = ChatCompletionRequest(model="model", messages=[{"role": "user", "content": "hi"}])
        p = server.params(req, 4, 3)
        assert (p.temperature, p.top_p, p.top_k) == (0.6, 0.95, 0)
        req = ChatCompletionRequest(model="model", messages=[{"role": "user", "content": "hi"}], temperature=0)
        assert server.params(req, 4, 3).temperature == 0
    finally:
        engine.close()
