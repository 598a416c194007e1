import json

import helpers
import pytest
import torch

from deepseek import R1Config, R1ForCausalLM
from deepseek.model.rope import rope_frequencies, softmax_scale

DATA = helpers.DATA


def test_real_deepseek_v3_config_loads_as_is(tmp_path):
    (tmp_path / "config.json").write_text((DATA / "deepseek_v3_config.json").read_text())
    config = R1Config.from_pretrained(tmp_path)
    assert config.hidden_size == 7168 and config.num_hidden_layers == 61
    assert config.q_lora_rank == 1536 and config.kv_lora_rank == 512
    assert config.n_group == 8 and config.topk_group == 4 and config.topk_method == "noaux_tc"
    rope = config.rope_parameters
    assert rope["rope_type"] == "yarn" and rope["factor"] == 40 and rope["mscale_all_dim"] == 1.0
    assert rope["original_max_position_embeddings"] == 4096 and rope["rope_theta"] == 10000
    # YaRN mscale folds into the softmax scale: (0.1 * ln 40 + 1)^2 / sqrt(192)
    expected = (0.1 * torch.log(torch.tensor(40.0)).item() + 1) ** 2 / 192**0.5
    assert softmax_scale(rope, 192) == pytest.approx(expected)
    inv_freq, attn_factor = rope_frequencies(rope, 64)
    assert attn_factor == pytest.approx(1.0)  # mscale == mscale_all_dim
    assert inv_freq[0] == pytest.approx(1.0) and inv_freq[-1] == pytest.approx(10000 ** (-62 / 64) / 40)


def test_full_671b_on_meta_reports_published_sizes():
    config = R1Config(**{k: v for k, v in json.loads((DATA / "deepseek_v3_config.json").read_text()).items()
                         if k not in ("architectures", "auto_map", "model_type")})  # fmt: skip
    config.build_mtp = False
    with torch.device("meta"):
        model = R1ForCausalLM(config)
    total = model.num_parameters()
    active = model.num_parameters(active=True)
    assert 670e9 < total < 672e9, total  # "671B total"
    assert 36.5e9 < active < 37.7e9, active  # "37B activated per token"
    config.build_mtp = True
    with torch.device("meta"):
        with_mtp = R1ForCausalLM(config).num_parameters()
    assert 684e9 < with_mtp < 686e9  # "685B including the 14B MTP module"


def test_q_lora_null_and_rope_parameters_spelling():
    c = R1Config(q_lora_rank=None, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 5e4},
                 max_position_embeddings=1024)  # fmt: skip
    assert c.q_lora_rank is None
    assert c.rope_parameters["rope_theta"] == 5e4 and c.rope_parameters["original_max_position_embeddings"] == 1024
    again = R1Config.from_dict(c.to_dict())
    assert again.rope_parameters == c.rope_parameters


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
        ({"topk_group": 9}, "topk_group"),
        ({"n_routed_experts": 250}, "n_routed_experts"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"kv_lora_rank": -1}, "kv_lora_rank"),
        ({"q_lora_rank": 0}, "q_lora_rank"),
        ({"rope_scaling": {"type": "ntk-by-parts", "factor": 2}}, "rope_scaling.type"),
        ({"rope_scaling": {"type": "yarn"}}, "rope_scaling.factor"),
        ({"scoring_func": "relu"}, "scoring_func"),
        ({"topk_method": "random"}, "topk_method"),
    ],
)
def test_impossible_configs_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        R1Config(**kwargs)


def test_unknown_rope_type_lists_allowed_values():
    with pytest.raises(ValueError, match="allowed: default, yarn, linear"):
        R1Config(rope_scaling={"type": "dynamic", "factor": 2.0})


def test_component_settings_are_declared_sub_configs_and_flat_keys_still_load(tmp_path):
    import json

    from deepseek.model.config import CompressionConfig, RoutingConfig

    flat = R1Config(num_experts_per_tok=4, routing_mode="entropy", routing_k_max=3, kv_compress=True, kv_window=64,
                    kv_lead_layer=-1)  # fmt: skip  # an earlier checkpoint's flat keys
    assert isinstance(flat.routing, RoutingConfig) and isinstance(flat.compression, CompressionConfig)
    assert (flat.routing.mode, flat.routing.k_max, flat.compression.enabled, flat.compression.window) == (
        "entropy", 3, True, 64)  # fmt: skip
    assert R1Config(num_experts_per_tok=4).routing.k_max == 4  # k_max defaults to the router's k
    flat.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["routing"]["mode"] == "entropy" and saved["compression"]["window"] == 64
    assert not [k for k in saved if k.startswith("routing_") or k in ("kv_compress", "kv_window")]  # written nested
    again = R1Config.from_pretrained(tmp_path)
    assert again.routing == flat.routing and again.compression == flat.compression
    with pytest.raises(AttributeError, match=r"config\.compression\.window"):
        flat.kv_window = 128  # an earlier flat name is refused, never silently ignored
    with pytest.raises(ValueError, match="unknown CompressionConfig field"):
        R1Config(compression={"windw": 3})
    with pytest.raises(ValueError, match=r"compression\.window"):
        flat.set_components(kv_window=-1)
    assert flat.compression.window == 64  # a failed change leaves the config as it was
